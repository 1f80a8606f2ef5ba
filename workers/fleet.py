"""Worker processes started from Python: for the demo and the benchmarks.

A `Fleet` runs ``python -m workers worker MODULE:ATTR`` as real, separate processes, passes them
the deployment's settings through ``FLOWBUS_*`` variables, writes each one's log to a file, waits
(bounded) until they have split the partitions, and stops them: SIGTERM first, so they drain,
then SIGKILL past a deadline.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from bus import Bus, Settings
from bus.settings import VARIABLES

from .observe import lease_owners
from .orphans import ending_with_parent


class FleetError(RuntimeError):
    """A worker process exited early or a wait on the workers timed out; the message says
    which, with the tail of the worker's log."""


def settings_env(settings: Settings) -> dict[str, str]:
    """Every setting as the ``FLOWBUS_*`` variable `Settings.from_env` reads."""
    return {name: str(getattr(settings, field)) for field, name in VARIABLES.items()}


@dataclass(eq=False)
class WorkerProcess:
    """One ``flowbus worker`` process, its id in the group's membership and its log file."""

    worker_id: str
    log_path: Path
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass(eq=False)
class Fleet:
    """Worker processes of one service (consumer group) `group`, all loading `target`."""

    settings: Settings
    target: str
    group: str
    log_dir: Path
    #: Working directory of the workers: `target`'s package must be importable from it.
    cwd: Path = field(default_factory=Path.cwd)
    extra_env: Mapping[str, str] = field(default_factory=dict)
    log_level: str = "info"
    workers: list[WorkerProcess] = field(default_factory=list)
    #: Workers stopped on purpose (`kill`, `stop`): their exit is not an error.
    stopped: set[str] = field(default_factory=set)

    def start(self, count: int, *, id_prefix: str = "worker") -> list[WorkerProcess]:
        """Start `count` more workers, named ``<id_prefix>-<n>`` in the group's membership."""
        env = {**os.environ, **settings_env(self.settings), **self.extra_env}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        started = []
        for _ in range(count):
            n = len(self.workers) + 1
            worker_id = f"{id_prefix}-{n}"
            log_path = self.log_dir / f"{worker_id}.log"
            with log_path.open("wb") as log:
                popen = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "workers",
                        "worker",
                        self.target,
                        "--worker-id",
                        worker_id,
                        "--log-format",
                        "json",
                        "--log-level",
                        self.log_level,
                    ],
                    cwd=self.cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    preexec_fn=ending_with_parent(),
                )
            worker = WorkerProcess(worker_id, log_path, popen)
            self.workers.append(worker)
            started.append(worker)
        return started

    @property
    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.alive]

    def check_alive(self) -> None:
        """Raise `FleetError` if a worker that was not stopped on purpose has exited."""
        for w in self.workers:
            code = w.popen.poll()
            if code is not None and w.worker_id not in self.stopped:
                raise FleetError(
                    f"worker {w.worker_id} (pid {w.pid}) exited with status {code}; "
                    f"its log ({w.log_path}) ends with:\n{w.log_tail()}"
                )

    async def wait_split(self, bus: Bus, *, within: float = 30.0) -> dict[str, list[int]]:
        """Wait until the live workers hold every partition's lease, each at most its fair
        share (ceil(P/N)); return worker id -> partitions. Raises `FleetError` on timeout."""
        expected = {w.worker_id for w in self.alive}
        partitions = bus.settings.partitions
        cap = math.ceil(partitions / max(1, len(expected)))
        owners: dict[str, list[int]] = {}
        with anyio.move_on_after(within):
            while True:
                self.check_alive()
                owners = await lease_owners(bus, self.group)
                counts = [len(ps) for ps in owners.values()]
                if owners.keys() == expected and sum(counts) == partitions and max(counts) <= cap:
                    return owners
                await anyio.sleep(0.05)
        held = {w: len(ps) for w, ps in owners.items()}
        raise FleetError(
            f"the {len(expected)} workers did not split the {partitions} partitions within "
            f"{within:g}s (leases held: {held or 'none'}); worker logs are in {self.log_dir}"
        )

    async def stop(self, *, within: float) -> dict[str, int]:
        """SIGTERM every live worker (they drain), SIGKILL those still running after `within`
        seconds; return worker id -> exit status."""
        for w in self.alive:
            self.stopped.add(w.worker_id)
            w.popen.send_signal(signal.SIGTERM)
        with anyio.move_on_after(within):
            while self.alive:  # noqa: ASYNC110  # a process's exit is not awaitable; polled
                await anyio.sleep(0.05)
        for w in self.alive:
            w.popen.kill()
        for w in self.workers:
            w.popen.wait()
        return {w.worker_id: w.popen.returncode for w in self.workers}

    async def terminate(self, worker: WorkerProcess, *, within: float) -> int:
        """SIGTERM one worker (it drains), SIGKILL it if it still runs after `within` seconds;
        return its exit status (0: it drained and stopped)."""
        self.stopped.add(worker.worker_id)
        worker.popen.send_signal(signal.SIGTERM)
        with anyio.move_on_after(within):
            while worker.alive:  # noqa: ASYNC110  # a process's exit is not awaitable; polled
                await anyio.sleep(0.05)
        if worker.alive:
            worker.popen.kill()
        return worker.popen.wait()

    def kill(self, worker: WorkerProcess) -> None:
        """SIGKILL one worker, as a crash would; its leases lapse after their TTL."""
        self.stopped.add(worker.worker_id)
        worker.popen.kill()
        worker.popen.wait()

    def kill_all(self) -> None:
        """SIGKILL whatever still runs (cleanup after an error or an interrupt)."""
        for w in self.workers:
            if w.alive:
                w.popen.kill()
            w.popen.wait()
