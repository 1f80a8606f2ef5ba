"""100 concurrent calls through a 4-node flow on 2 action workers, one killed mid-run."""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
import pytest

from bus import Bus, Settings
from flows import FlowManager, FunctionCall, LLMResponse, ScriptedLLM, SimulatedTTS
from tests.flows.test_actions import before, key, node, note, say, timeline
from tests.flows.test_events import ready
from tests.support import WorkerProcesses, raw, wait_for

pytestmark = pytest.mark.anyio
CALLS = 100
NODES = ["greeting", "collect", "confirm", "goodbye"]
REPLIES = {n: f"Reply of {n}" for n in NODES}


def flow() -> dict[str, dict[str, Any]]:
    def to(target: str) -> dict[str, Any]:
        async def go(args: dict[str, Any], fm: FlowManager) -> tuple[dict[str, str], Any]:
            return {"status": "ok"}, nodes[target]

        return {"name": f"to_{target}", "handler": go}

    nodes: dict[str, Any] = {
        "greeting": node(
            "greeting",
            pre=[say("Welcome"), note("a1")],
            post=[note("b1")],
            functions=[to("collect")],
        ),
        "collect": node("collect", pre=[note("a2")], post=[note("b2")], functions=[to("confirm")]),
        "confirm": node(
            "confirm",
            pre=[note("a3"), say("Confirmed")],
            post=[note("b3")],
            functions=[to("goodbye")],
        ),
        "goodbye": node(
            "goodbye",
            pre=[note("a4")],
            post=[note("b4"), {"type": "end_conversation", "text": "Goodbye"}],
        ),
    }
    return nodes


def script() -> dict[str, list[LLMResponse]]:
    nexts = dict(zip(NODES, [*NODES[1:], None], strict=True))
    return {
        n: [
            LLMResponse(
                text=REPLIES[n], function_calls=[FunctionCall(f"to_{nexts[n]}")] if nexts[n] else []
            )
        ]
        for n in NODES
    }


async def run_call(bus: Bus, session: str, done: list[str]) -> None:
    async def observe(kind: str, detail: str) -> None:
        await raw(bus).rpush(key(bus, session), f"{kind}:{detail}")

    llm = ScriptedLLM(script(), observer=observe)
    tts = SimulatedTTS(0.0005, observer=observe)
    async with FlowManager.open(bus, session, llm=llm, tts=tts, actions_timeout=60) as fm:
        await fm.initialize(flow()["greeting"])
        with anyio.fail_after(120):
            await fm.ended.wait()
    done.append(session)


async def test_a_hundred_calls_keep_their_timing_through_a_worker_kill(
    bus: Bus, settings: Settings, workers: WorkerProcesses
) -> None:
    procs = [workers.start("tests.apps.actions:app", settings) for _ in range(2)]
    await ready(bus, "actions")
    victim = procs[0]
    sessions = [f"call-{i}" for i in range(CALLS)]
    done: list[str] = []
    starts_key = f"{settings.prefix}:test:starts"

    async def victim_busy() -> bool:
        starts: list[bytes] = await raw(bus).lrange(starts_key, 0, -1)
        return sum(s.decode().endswith(f"|{victim.pid}") for s in starts) >= 60

    async with anyio.create_task_group() as tg:
        for session in sessions:
            tg.start_soon(run_call, bus, session, done)
        await wait_for(victim_busy, limit=60, what="the victim to run 60 actions")
        workers.kill(victim)
    assert sorted(done) == sorted(sessions)  # every call completed

    starts = Counter(s.decode() for s in await raw(bus).lrange(starts_key, 0, -1))
    restarted: Counter[str] = Counter()
    for entry, count in starts.items():
        session, _label, _pid = entry.split("|")
        assert count == 1, entry
    per_action = Counter(e.rsplit("|", 1)[0] for e in starts)
    for action, count in per_action.items():
        if count > 1:  # run again by the survivor: it was the victim's, in flight at the kill
            assert count == 2 and f"{action}|{victim.pid}" in starts, action
            restarted[action.split("|")[0]] += 1
    assert all(n <= 1 for n in restarted.values()), restarted

    for session in sessions:
        events = await timeline(bus, session)
        assert events.count("action.finished:b4") == 1
        assert before(events, "tts.finished:Welcome", "action.started:a1")
        for i, name in enumerate(NODES, start=1):
            assert before(events, f"action.finished:a{i}", f"llm.started:{name}"), (session, i)
            assert before(events, f"tts.finished:{REPLIES[name]}", f"action.started:b{i}")
        assert before(events, "action.finished:a3", "tts.started:Confirmed")
        assert before(events, "action.finished:b4", "tts.finished:Goodbye")
        assert (await bus.history(session))[-1].type == "session.ended"
