"""`Fleet.terminate`: one worker stopped gracefully, or killed past its deadline."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bus import Settings
from workers.fleet import Fleet, WorkerProcess

pytestmark = pytest.mark.anyio

#: A stand-in worker that says when its SIGTERM handler is set, then waits.
STANDIN = """
import signal, sys, time
signal.signal(signal.SIGTERM, {handler})
print("ready", flush=True)
time.sleep(60)
"""


def standin(handler: str) -> subprocess.Popen[bytes]:
    """The stand-in started, its SIGTERM handler set."""
    popen = subprocess.Popen(
        [sys.executable, "-c", STANDIN.format(handler=handler)], stdout=subprocess.PIPE
    )
    assert popen.stdout is not None and popen.stdout.readline() == b"ready\n"
    return popen


@pytest.mark.parametrize(
    ("handler", "status"),
    [
        ("lambda *_: sys.exit(0)", 0),  # drains and exits, as `flowbus worker` does
        ("signal.SIG_IGN", -signal.SIGKILL),  # does not stop: killed once `within` is over
    ],
)
async def test_terminate_returns_the_exit_status_and_kills_a_worker_that_does_not_stop(
    tmp_path: Path, handler: str, status: int
) -> None:
    fleet = Fleet(Settings(), "unused:service", "group", tmp_path)
    with standin(handler) as popen:  # (its pipe closed on the way out)
        worker = WorkerProcess("w-1", tmp_path / "w-1.log", popen)
        fleet.workers.append(worker)
        assert await fleet.terminate(worker, within=0.5) == status
    assert not worker.alive and fleet.stopped == {"w-1"}
    fleet.check_alive()  # stopped on purpose: not an error
