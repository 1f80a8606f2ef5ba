"""The README's example runs as written: a worker process of greeter.py and the bot."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import anyio
import pytest

from bus import Bus, Settings
from tests.flows.test_events import ready
from tests.support import ROOT, WorkerProcesses, settings_env, wait_for

pytestmark = pytest.mark.anyio

FILE_BLOCK = re.compile(r"<!-- file: (?P<name>\S+) -->\n```python\n(?P<code>.*?)```", re.S)


def readme_files() -> dict[str, str]:
    return {m["name"]: m["code"] for m in FILE_BLOCK.finditer((ROOT / "README.md").read_text())}


async def run_example(
    tmp_path: Path,
    settings: Settings,
    workers: WorkerProcesses,
    service: str,
    group: str,
    bot: str,
) -> str:
    """Write the README's files, start a worker of `service` (MODULE:ATTR, consumer group
    `group`), wait until it holds every partition, run the `bot` file; return its output."""
    for name, code in readme_files().items():
        (tmp_path / name).write_text(code)
    # From there, not the repository: copies a reader made there by the README must not count.
    workers.start(service, settings, cwd=tmp_path)
    env = {**os.environ, **settings_env(settings)}
    async with Bus.connect(settings) as bus:
        await ready(bus, group)
    with anyio.fail_after(60):
        done = await anyio.run_process([sys.executable, bot], cwd=tmp_path, env=env, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return str(done.stdout.decode())


async def test_the_readme_example_greets_the_caller(
    tmp_path: Path, settings: Settings, workers: WorkerProcesses
) -> None:
    # (pipecat_call.py is run by tests/flows/test_pipecat_bot.py)
    files = {"greeter.py", "bot.py", "support_actions.py", "call.py", "pipecat_call.py"}
    assert set(readme_files()) == files
    printed = await run_example(tmp_path, settings, workers, "greeter:service", "greeter", "bot.py")
    assert printed == "Hello Ada (event 1 of call-42)\n"


async def test_the_readme_flow_runs_its_actions_where_pipecat_flows_puts_them(
    tmp_path: Path, settings: Settings, workers: WorkerProcesses
) -> None:
    printed = await run_example(
        tmp_path, settings, workers, "support_actions:actions", "actions", "call.py"
    )
    stream = printed.splitlines()[-1]  # after the bot's own log lines
    expected = "session.started > node.entered > tts.spoken > llm.completed > tts.finished"
    assert stream == expected + " > session.ended"
    assert f"# {stream}" in (ROOT / "README.md").read_text()


async def test_the_readmes_examples_run_in_its_order_on_one_deployment_without_dead_letters(
    tmp_path: Path, settings: Settings, workers: WorkerProcesses
) -> None:
    """As a reader runs them: the greeter's worker is still up when the flow's call runs."""
    greeted = await run_example(tmp_path, settings, workers, "greeter:service", "greeter", "bot.py")
    assert greeted == "Hello Ada (event 1 of call-42)\n"
    printed = await run_example(
        tmp_path, settings, workers, "support_actions:actions", "actions", "call.py"
    )
    assert printed.splitlines()[-1].endswith("> session.ended")
    async with Bus.connect(settings) as bus:
        ended = bus.keys.ended(bus.keys.partition("call-7"))

        async def retired() -> bool:  # every group, the greeter's too, is done with the call
            return await bus.redis.zscore(ended, "call-7") is not None

        await wait_for(retired, what="call-7 to retire")
        letters = [await bus.redis.xlen(bus.keys.dead(p)) for p in range(settings.partitions)]
    assert sum(letters) == 0  # the greeter acknowledged the flow's events, unseen


def test_the_readme_names_the_session_key_of_its_example() -> None:
    from bus import Keys

    assert f"XRANGE '{Keys().session('call-42')}' - +" in (ROOT / "README.md").read_text()
