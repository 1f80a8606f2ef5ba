"""Benchmark 2, flowbus throughput: the baseline's workload through the bus.

1,000 sessions x 20 events are published with `Bus.publish` (each session in order) to a
deployment where the ``noop`` service is registered, so each stream has its group from the first
event on. Then 2 worker processes of `bench.noop` start, and the clock runs until every session
has retired, which the bus does only once the group acknowledged all of the session (its live
index empties); ``XINFO GROUPS`` of every stream confirms it at the end.

Two times are reported: from the first partition lease taken (process start-up excluded: the
figure compared with the baseline) and from the spawn of the processes.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import msgspec
import structlog

from bus import Bus, ServiceInfo
from workers.fleet import Fleet
from workers.observe import lease_owners, live_session_count, server_identity

from .cpu import CpuMeter
from .noop import GROUP, Noop
from .workload import BenchError, backlog, fresh_settings, publish_all, session_ids, wait_until

ROOT = Path(__file__).resolve().parent.parent
log = structlog.get_logger("flowbus.bench")


class ThroughputResult(msgspec.Struct, frozen=True):
    """Events per second of flowbus workers on a pre-published backlog."""

    workers: int
    sessions: int
    events: int
    publish_seconds: float
    #: From the first partition lease until every event was acknowledged.
    seconds: float
    events_per_second: float
    #: From the spawn of the worker processes (interpreter start-up included).
    seconds_from_spawn: float
    events_per_second_from_spawn: float
    #: CPU time per event (µs) of the server and of the workers, from the first lease on.
    server_cpu_us: float
    client_cpu_us: float
    #: CPU cores other processes of the machine kept busy meanwhile.
    other_cores_busy: float


async def run(
    url: str, *, sessions: int = 1000, events: int = 20, workers: int = 2
) -> ThroughputResult:
    """Publish the backlog, then time the workers draining it; `BenchError` on a timeout or an
    event left unacknowledged."""
    settings = fresh_settings(url, "noop")
    names = session_ids(sessions)
    total = sessions * events
    async with Bus.connect(settings) as bus:
        server = await server_identity(bus.redis)
        await bus.register_service(ServiceInfo(GROUP))
        started = time.perf_counter()
        await publish_all(bus, names, events, lambda: Noop(sent_ns=time.time_ns()))
        publish_seconds = time.perf_counter() - started
        log.info("backlog_published", events=total, seconds=round(publish_seconds, 2))

        with tempfile.TemporaryDirectory(prefix="flowbus-bench-") as logs:
            fleet = Fleet(settings, "bench.noop:service", GROUP, Path(logs), cwd=ROOT)
            try:
                spawned = time.perf_counter()
                fleet.start(workers, id_prefix="noop")

                async def leased() -> bool:
                    fleet.check_alive()
                    return bool(await lease_owners(bus, GROUP))

                async def drained() -> bool:
                    fleet.check_alive()
                    return await live_session_count(bus) == 0

                meter = CpuMeter(
                    {"server": server.pid, **{w.worker_id: w.pid for w in fleet.workers}}
                )
                await wait_until(leased, within=30, what="a worker to take a partition")
                first_lease = time.perf_counter()
                meter.start()
                await wait_until(drained, within=300, what=f"the workers to handle {total} events")
                done = time.perf_counter()
                meter.stop()
                await fleet.stop(within=30)
            finally:
                fleet.kill_all()

        left = await backlog(bus.redis, [bus.keys.session(s) for s in names], GROUP)
        if left.acked != total or left.pending or left.lag:
            raise BenchError(f"flowbus acknowledged {left.acked} of {total} events ({left})")
    seconds, from_spawn = done - first_lease, done - spawned
    return ThroughputResult(
        workers,
        sessions,
        total,
        round(publish_seconds, 3),
        round(seconds, 4),
        round(total / seconds),
        round(from_spawn, 4),
        round(total / from_spawn),
        meter.per_event_us(total, ["server"]),
        meter.per_event_us(total, [n for n in meter.used if n != "server"]),
        round(meter.other / seconds, 2),
    )
