"""What the benchmark ran on: CPUs, Python, the server, and how busy the machine was."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import msgspec
from redis.asyncio import Redis

from workers.observe import server_identity


class Machine(msgspec.Struct, frozen=True):
    """The machine and server of one benchmark run."""

    nproc: int
    cpu_model: str
    python: str
    server: str
    server_version: str
    #: 1-minute load average when the run started: other work on the machine skews results.
    load_at_start: float
    #: `cpu_probe_ms()` when the run started: how fast the CPUs were then.
    probe_ms_at_start: float = 0.0


def cpu_model() -> str:
    """The ``model name`` of the first CPU in /proc/cpuinfo (or the platform's guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_probe_ms() -> float:
    """Milliseconds a fixed piece of Python (calls, dicts, lists: 200,000 rounds) takes, best
    of three. A shared virtual machine's speed varies by day and by minute (twice as slow has
    been seen here); runs of different days compare by their figures over this one."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        table: dict[int, list[int]] = {}
        for i in range(200_000):
            table.setdefault(i & 1023, []).append(abs(i))
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)


def nproc() -> int:
    """CPUs this process may run on (what ``nproc`` prints)."""
    return len(os.sched_getaffinity(0))


async def describe(redis: Redis) -> Machine:
    """Describe this machine and the server behind `redis`."""
    identity = await server_identity(redis)
    return Machine(
        nproc=nproc(),
        cpu_model=cpu_model(),
        python=platform.python_version(),
        server=identity.name,
        server_version=identity.version,
        load_at_start=round(os.getloadavg()[0], 2),
        probe_ms_at_start=cpu_probe_ms(),
    )
