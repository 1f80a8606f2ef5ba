"""Calls go on across a restart of the server (with AOF, as compose.yaml runs it)."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest

from bus import Bus
from flows import FlowManager, FunctionCall, LLMResponse, ScriptedLLM, SimulatedTTS
from tests.conftest import KIND, make_settings
from tests.flows.test_actions import node, say
from tests.flows.test_events import ready
from tests.support import WorkerProcesses, wait_for
from workers.server import LocalServer

pytestmark = pytest.mark.anyio
NODES = ["greeting", "collect", "confirm", "goodbye"]


def flow() -> dict[str, dict[str, Any]]:
    """Four nodes with built-in actions only (the test's custom actions write to Redis
    themselves, and would fail while it is down, as any action would)."""

    def to(target: str) -> dict[str, Any]:
        async def go(args: dict[str, Any], fm: FlowManager) -> tuple[dict[str, str], Any]:
            return {"status": "ok"}, nodes[target]

        return {"name": f"to_{target}", "handler": go}

    nodes = {
        "greeting": node("greeting", pre=[say("Welcome")], functions=[to("collect")]),
        "collect": node("collect", pre=[say("Noted")], functions=[to("confirm")]),
        "confirm": node("confirm", pre=[say("Confirmed")], functions=[to("goodbye")]),
        "goodbye": node("goodbye", post=[{"type": "end_conversation", "text": "Goodbye"}]),
    }
    return nodes


def script() -> dict[str, list[LLMResponse]]:
    after = dict(zip(NODES, [*NODES[1:], None], strict=True))
    return {
        n: [LLMResponse(f"Reply of {n}", [FunctionCall(f"to_{after[n]}")] if after[n] else [])]
        for n in NODES
    }


async def test_calls_complete_in_order_across_a_server_restart(workers: WorkerProcesses) -> None:
    with LocalServer(KIND, appendonly=True) as server:
        settings = make_settings(server.url)
        workers.start("tests.apps.actions:app", settings)
        async with Bus.connect(settings) as bus:
            await ready(bus, "actions")
            sessions = [f"call-{i}" for i in range(20)]
            spoken: list[str] = []

            async def speech(kind: str, text: str) -> None:
                spoken.append(text)

            async def call(session: str) -> None:
                tts = SimulatedTTS(0.02, observer=speech)
                async with FlowManager.open(
                    bus, session, llm=ScriptedLLM(script()), tts=tts, actions_timeout=60
                ) as fm:
                    await fm.initialize(flow()["greeting"])
                    with anyio.fail_after(60):
                        await fm.ended.wait()

            async with anyio.create_task_group() as tg:
                for session in sessions:
                    tg.start_soon(call, session)
                await wait_for(lambda: len(spoken) >= 60, what="the calls to be under way")
                server.kill()  # SIGKILL: what the AOF holds comes back
                server.start()
            for session in sessions:  # every call ended, through every node once, in order
                history = await bus.history(session)
                entered = [
                    msgspec.json.decode(e.data)["node"] for e in history if e.type == "node.entered"
                ]
                assert entered == NODES and history[-1].type == "session.ended", session
