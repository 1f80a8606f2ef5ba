"""Benchmark 3, publish-to-handler latency at a steady rate.

2 worker processes of the holding probe (`workers.probe:holding`: no round trip of its own
per event; its records go to Redis once the load is over) run; publishers paced at 1,000
events/s in total spread over 1,000 sessions (round-robin, each session in order) publish for
~10 s. Each event carries ``time.time_ns()`` taken right before its publish, and the time its
schedule gave it; the handler records the difference with its own start. Percentiles are over
the first delivery of every event, from the publish (the target's measure) and from the
schedule: a publisher held up (by the machine, or by a slow publish before) publishes late and
stamps a fresh time, which hides the delay from the first ("coordinated omission"); the second
counts it.
"""

from __future__ import annotations

import itertools
import os
import time

import anyio
import msgspec
import structlog

from bus import Bus
from workers.observe import live_session_count, server_identity
from workers.probe import (
    GROUP,
    ProbeFlush,
    ProbeTick,
    handled_key,
    percentiles,
    read_handlings,
)

from .cpu import CpuMeter
from .workload import BenchError, fleet_of, fresh_settings, session_ids, wait_until

log = structlog.get_logger("flowbus.bench")

#: Publisher tasks; each owns every PUBLISHERS-th session and a share of the rate.
PUBLISHERS = 4


class LatencyResult(msgspec.Struct, frozen=True):
    """Latency percentiles (ms) at a paced publish rate."""

    workers: int
    sessions: int
    events: int
    target_rate: float
    achieved_rate: float
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    #: The same from the times the publishers' schedule gave the events.
    due_p50_ms: float
    due_p99_ms: float
    due_max_ms: float
    #: CPU cores kept busy by the server, the workers and the publisher while publishing (out
    #: of `nproc`): near the machine's count, queueing dominates the latency.
    cores_busy: float
    #: CPU cores other processes of the machine kept busy meanwhile.
    other_cores_busy: float
    #: CPU time of the workers per event (µs): at a low rate few steps share a round trip.
    worker_cpu_us: float


async def paced_publish(
    bus: Bus, sessions: list[str], rate: float, seconds: float, *, publishers: int = PUBLISHERS
) -> int:
    """Publish ProbeTicks round-robin over `sessions` at `rate` events/s for `seconds`; the
    last round is final. Each publisher task owns a slice of the sessions, so every session's
    events are published in order. Returns the events published."""
    rounds = max(1, round(rate * seconds / len(sessions)))
    started, started_ns = anyio.current_time(), time.time_ns()

    async def publisher(mine: list[str], offset: int) -> None:
        for r in range(rounds):
            for i, session in enumerate(mine):
                after = (r * len(sessions) + i * publishers + offset) / rate
                delay = started + after - anyio.current_time()
                if delay > 0:
                    await anyio.sleep(delay)
                due_ns = started_ns + round(after * 1e9)
                tick = ProbeTick(sent_ns=time.time_ns(), due_ns=due_ns)
                await bus.publish(session, tick, final=r == rounds - 1)

    async with anyio.create_task_group() as tg:
        for k in range(publishers):
            tg.start_soon(publisher, sessions[k::publishers], k)
    return rounds * len(sessions)


async def flush_probes(bus: Bus) -> None:
    """Send a `ProbeFlush` to a session of every partition, so every worker writes what it
    holds."""
    sessions: dict[int, str] = {}
    for n in itertools.count():
        name = f"probe-flush-{n}"
        sessions.setdefault(bus.keys.partition(name), name)
        if len(sessions) == bus.settings.partitions:
            break
    for name in sessions.values():
        await bus.publish(name, ProbeFlush(), final=True)


async def run(
    url: str,
    *,
    sessions: int = 1000,
    rate: float = 1000.0,
    seconds: float = 10.0,
    workers: int = 2,
) -> LatencyResult:
    """Run the paced load against fresh workers; `BenchError` if an event is not handled."""
    settings = fresh_settings(url, "latency")
    names = session_ids(sessions)
    async with Bus.connect(settings) as bus:
        async with fleet_of(
            bus, "workers.probe:holding", GROUP, workers, id_prefix="probe"
        ) as fleet:
            server = await server_identity(bus.redis)
            workers_cpu = {w.worker_id: w.pid for w in fleet.workers}
            meter = CpuMeter({"server": server.pid, "publisher": os.getpid(), **workers_cpu})
            meter.start()
            started = time.perf_counter()
            published = await paced_publish(bus, names, rate, seconds)
            elapsed = time.perf_counter() - started
            meter.stop()
            log.info("paced_load_published", events=published, seconds=round(elapsed, 2))

            async def all_handled() -> bool:
                fleet.check_alive()
                return await live_session_count(bus) == 0  # each ended, all acknowledged

            async def all_recorded() -> bool:
                fleet.check_alive()
                count = await bus.redis.llen(handled_key(settings.prefix))
                return int(count) >= published

            await wait_until(all_handled, within=60, what=f"{published} events handled")
            await flush_probes(bus)
            await wait_until(all_recorded, within=30, what=f"{published} handlings recorded")
        handlings = await read_handlings(bus.redis, settings.prefix)
    first = [h for h in handlings if h.deliveries == 1]
    if len({(h.session, h.seq) for h in handlings}) != published:
        raise BenchError(f"{len(handlings)} handlings recorded for {published} events")
    p = percentiles([h.latency_us / 1000 for h in first], (50, 90, 99, 100))
    due = percentiles([h.due_latency_us / 1000 for h in first], (50, 99, 100))
    return LatencyResult(
        workers,
        sessions,
        published,
        rate,
        round(published / elapsed, 1),
        round(elapsed, 2),
        round(p["p50"], 3),
        round(p["p90"], 3),
        round(p["p99"], 3),
        round(p["max"], 3),
        round(due["p50"], 3),
        round(due["p99"], 3),
        round(due["max"], 3),
        round(sum(meter.used.values()) / elapsed, 2),
        round(meter.other / elapsed, 2),
        meter.per_event_us(published, workers_cpu),
    )
