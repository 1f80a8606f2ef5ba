"""Benchmark 2, flowbus throughput: the baseline's workload through the bus.

Like the baseline's consumers, the workers are ready before the clock starts: 2 worker processes
of `bench.noop` start and split the partitions, then are frozen (SIGSTOP) while 1,000 sessions x
20 events are published with `Bus.publish` (each session in order). The clock (the server's)
starts when they are thawed (SIGCONT) and stops when the last session retired, which the bus
does only once the group acknowledged all of the session; ``XINFO GROUPS`` of every stream
confirms it at the end. The leases outlive the freeze (their TTL is 30 s here).

Benchmark 2b is the same with the workers' `ack_mode` 'batch': a read batch's entries are
acknowledged together, by the step after the last one, instead of each before the next.
"""

from __future__ import annotations

import os
import signal
import time

import msgspec
import structlog

from bus import Bus, ServiceInfo
from bus.settings import AckMode
from workers.observe import live_session_count, server_identity

from .cpu import CpuMeter
from .noop import GROUP, Noop
from .workload import (
    BenchError,
    backlog,
    fleet_of,
    fresh_settings,
    last_retired_ms,
    publish_all,
    server_ms,
    session_ids,
    wait_until,
)

log = structlog.get_logger("flowbus.bench")


class ThroughputResult(msgspec.Struct, frozen=True):
    """Events per second of flowbus workers on a backlog published while they were frozen."""

    workers: int
    sessions: int
    events: int
    publish_seconds: float
    #: From the thaw until every event was acknowledged.
    seconds: float
    events_per_second: float
    #: CPU time per event (µs) of the server and of the workers, while timed.
    server_cpu_us: float
    client_cpu_us: float
    #: CPU cores other processes of the machine kept busy meanwhile.
    other_cores_busy: float
    #: The workers' `Settings.ack_mode`.
    ack_mode: AckMode = "each"


async def run(
    url: str,
    *,
    sessions: int = 1000,
    events: int = 20,
    workers: int = 2,
    ack_mode: AckMode = "each",
) -> ThroughputResult:
    """Start and freeze the workers, publish the backlog, time the thawed workers draining it;
    `BenchError` on a timeout or an event left unacknowledged."""
    settings = fresh_settings(url, "noop", lease_ttl_seconds=30, ack_mode=ack_mode)
    names = session_ids(sessions)
    total = sessions * events
    async with Bus.connect(settings) as bus:
        server = await server_identity(bus.redis)
        await bus.register_service(ServiceInfo(GROUP))
        async with fleet_of(
            bus, "bench.noop:service", GROUP, workers, id_prefix="noop", within=90
        ) as fleet:
            for w in fleet.workers:
                os.kill(w.pid, signal.SIGSTOP)
            started = time.perf_counter()
            await publish_all(bus, names, events, lambda: Noop(sent_ns=time.time_ns()))
            publish_seconds = time.perf_counter() - started
            log.info("backlog_published", events=total, seconds=round(publish_seconds, 2))

            async def drained() -> bool:
                fleet.check_alive()
                return await live_session_count(bus) == 0

            meter = CpuMeter({"server": server.pid, **{w.worker_id: w.pid for w in fleet.workers}})
            thawed = await server_ms(bus.redis)
            meter.start()
            metered = time.perf_counter()
            for w in fleet.workers:
                os.kill(w.pid, signal.SIGCONT)
            await wait_until(
                drained, within=300, what=f"the workers to handle {total} events", every=0.05
            )
            meter.stop()
            metered = time.perf_counter() - metered  # the meter's interval: to the poll that saw it
            seconds = (await last_retired_ms(bus) - thawed) / 1000

        left = await backlog(bus.redis, [bus.keys.session(s) for s in names], GROUP)
        if left.acked != total or left.pending or left.lag:
            raise BenchError(f"flowbus acknowledged {left.acked} of {total} events ({left})")
    return ThroughputResult(
        workers,
        sessions,
        total,
        round(publish_seconds, 3),
        round(seconds, 4),
        round(total / seconds),
        meter.per_event_us(total, ["server"]),
        meter.per_event_us(total, [n for n in meter.used if n != "server"]),
        round(meter.other / metered, 2),
        ack_mode,
    )
