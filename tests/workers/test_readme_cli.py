"""The README's command-line walk-through runs as written: its service of your own handles the
simulated calls' events, and every flowbus command it shows exists."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
from pathlib import Path

import anyio
import pytest
from anyio.abc import ByteReceiveStream

from bus import Bus, Settings
from tests.flows.test_events import ready
from tests.support import ROOT, WorkerProcesses, settings_env, wait_for
from workers.cli import parser

EXAMPLE = re.compile(r"<!-- cli-example: (?P<name>\S+) -->\n```python\n(?P<code>.*?)```", re.S)


def readme() -> str:
    return (ROOT / "README.md").read_text()


def test_every_flowbus_command_the_readme_shows_parses() -> None:
    lines = [
        line.split("#")[0].strip().rstrip("&").strip()
        for block in re.findall(r"```sh\n(.*?)```", readme(), re.S)
        for line in block.splitlines()
    ]
    commands = [
        x.removeprefix(".venv/bin/") for x in lines if re.match(r"(\.venv/bin/)?flowbus ", x)
    ]
    synopsis = re.compile(r"[\[|]|\b[A-Z][A-Z:]+\b|\.\.\.")  # MODULE:ATTR [--x N] a|b REF...
    concrete = [c for c in commands if not synopsis.search(c)]
    assert len(concrete) >= 8, concrete
    for command in concrete:
        try:
            parser().parse_args(shlex.split(command)[1:])
        except SystemExit:
            pytest.fail(f"the README shows a command flowbus does not take: {command}")


@pytest.mark.anyio
async def test_the_walk_through_runs_a_service_of_your_own(
    tmp_path: Path, bus: Bus, settings: Settings, workers: WorkerProcesses
) -> None:
    [(name, code)] = [(m["name"], m["code"]) for m in EXAMPLE.finditer(readme())]
    (tmp_path / name).write_text(code)
    env = {"PYTHONPATH": str(tmp_path)}
    for target in ("workers.sample:actions", "workers.sample:crm", "myapp:audit"):
        workers.start(target, settings, env)
    await ready(bus, "actions", "crm", "audit")
    with anyio.fail_after(120):
        done = await anyio.run_process(
            [sys.executable, "-m", "workers", "simulate", "--calls", "4", "--rate", "10"],
            cwd=ROOT,
            env={**os.environ, **settings_env(settings)},
            check=False,
        )
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert "4 calls ended, 0 failed" in stderr
    actions_log = workers.terminate(workers.procs[0])
    turns = [json.loads(x) for x in actions_log.splitlines() if '"turn_logged"' in x]
    assert len(turns) == 4 * 3  # a post-action in each of the three nodes of each call
    assert {x["node"] for x in turns} == {"greeting", "order", "goodbye"}
    assert all({"session", "seq", "type", "traceparent"} <= x.keys() for x in turns)
    log = workers.terminate(workers.procs[-1])
    lines = [json.loads(x) for x in log.splitlines() if x.startswith("{")]
    connected = [x for x in lines if x["event"] == "caller_connected"]
    over = [x for x in lines if x["event"] == "call_over"]
    assert len(connected) == len(over) == 4
    assert len({x["session"] for x in connected}) == 4
    cut = {  # the fourth caller spoke over the bot
        x["session"]: [
            e.seq for e in await bus.history(x["session"]) if b'"interrupted":true' in e.data
        ]
        for x in connected
    }
    assert [s[-5:] for s, seqs in sorted(cut.items()) if seqs] == ["00004"], cut
    for x in connected:
        assert (x["caller"], x["seq"], x["type"], x["group"]) == (
            "+15550100",
            1,
            "on_client_connected",
            "audit",
        )
        assert x["traceparent"].startswith("00-")


@pytest.mark.anyio
@pytest.mark.parametrize("signals", [1, 2], ids=["graceful", "hard"])
async def test_simulate_stopped_by_a_signal_reports_and_leaves_no_call_live(
    bus: Bus, settings: Settings, workers: WorkerProcesses, signals: int
) -> None:
    """A first SIGTERM lets the running calls end; a second cuts them short and ends their
    sessions. Either way the summary is printed and no call stays live."""
    for target in ("workers.sample:actions", "workers.sample:crm"):
        workers.start(target, settings)
    await ready(bus, "actions", "crm")
    proc = await anyio.open_process(
        [sys.executable, "-m", "workers", "simulate", "--calls", "0", "--rate", "20"],
        cwd=ROOT,
        env={**os.environ, **settings_env(settings)},
    )
    output = bytearray()

    async def read(stream: ByteReceiveStream) -> None:
        async for chunk in stream:
            output.extend(chunk)

    async with proc, anyio.create_task_group() as tg:
        assert proc.stderr is not None
        tg.start_soon(read, proc.stderr)

        async def calling() -> bool:
            return len(await live_sessions(bus)) >= 3

        await wait_for(calling, what="calls to start")
        proc.send_signal(signal.SIGTERM)
        if signals == 2:  # once the first one was taken: a second one pending would merge
            await wait_for(lambda: b"simulate_stopping" in output, what="the first signal")
            proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(60):
            status = await proc.wait()
    stderr = output.decode()
    summary = re.search(r"(\d+) calls ended, (\d+) failed(, (\d+) cut short)?", stderr)
    assert summary is not None, stderr
    if signals == 1:
        assert status == 0 and summary[3] is None and int(summary[1]) >= 3, stderr
    else:
        assert status == 128 + signal.SIGTERM and int(summary[4]) >= 1, stderr
    assert await live_sessions(bus) == []  # ended, or ended by the simulator as it stopped


async def live_sessions(bus: Bus) -> list[str]:
    pipe = bus.redis.pipeline(transaction=False)
    for p in range(bus.settings.partitions):
        pipe.smembers(bus.keys.live(p))
    live = [s.decode() for members in await pipe.execute() for s in members]
    ended = [await bus.redis.hexists(bus.keys.meta(s), "ended") for s in live]
    return [s for s, e in zip(live, ended, strict=True) if not e]
