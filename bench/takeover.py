"""Benchmark 4, takeover after ``kill -9``: how long a dead worker's sessions wait.

3 worker processes of the probe service run with a lease TTL of 2 s while a publisher sends a
steady load (round-robin over the sessions, each in order). One worker is killed with SIGKILL;
for every session of the partitions it held, the gap is the time from the kill until the first
event of that session handled by another worker. The contract: under 2 lease TTLs. Every run
also checks that no event was lost, each session stayed in order and every repeat is an event in
flight at the kill (at most one per session of the victim's); the verdict needs all of it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence

import anyio
import msgspec
import structlog

from bus import Bus
from workers.demo_report import check_order
from workers.observe import lease_owners
from workers.probe import GROUP, Handling, handled_key, percentiles, read_handlings

from .latency import paced_publish
from .workload import BenchError, fleet_of, fresh_settings, session_ids, wait_until

log = structlog.get_logger("flowbus.bench")


class TakeoverRun(msgspec.Struct, frozen=True):
    """One kill: the gaps of the victim's sessions (seconds) and the order check."""

    victim_partitions: int
    victim_sessions: int
    max_gap_s: float
    p50_gap_s: float
    events: int
    duplicates: int
    lost_or_out_of_order: int
    #: Repeats that are not the one allowed per victim session: the last event the victim
    #: started (in flight at the kill), handled once more by another worker after the kill.
    unexpected_duplicates: int = 0

    @property
    def clean(self) -> bool:
        return self.lost_or_out_of_order == 0 and self.unexpected_duplicates == 0


class TakeoverResult(msgspec.Struct, frozen=True):
    """All kills of the takeover benchmark."""

    workers: int
    lease_ttl_s: float
    rate: float
    sessions: int
    runs: list[TakeoverRun]

    @property
    def max_gap_s(self) -> float:
        return max(r.max_gap_s for r in self.runs)

    @property
    def clean(self) -> bool:
        return all(r.clean for r in self.runs)


def unexpected_repeats(
    handlings: Sequence[Handling], victim_sessions: set[str], victim_pid: int, killed_ns: int
) -> int:
    """Handlings that repeat an event and are not the repeat a kill allows: one per session of
    the victim's partitions, of the last event the victim started, by another worker after the
    kill."""
    by_event: dict[tuple[str, int], list[Handling]] = defaultdict(list)
    last_of_victim: dict[str, int] = {}
    for h in handlings:
        by_event[(h.session, h.seq)].append(h)
        if h.pid == victim_pid:
            last_of_victim[h.session] = max(last_of_victim.get(h.session, 0), h.seq)
    unexpected = 0
    for (session, seq), hs in by_event.items():
        if len(hs) == 1:
            continue
        allowed = (
            len(hs) == 2
            and session in victim_sessions
            and seq == last_of_victim.get(session)
            and hs[0].pid == victim_pid
            and hs[1].pid != victim_pid
            and hs[1].handled_ns >= killed_ns
        )
        unexpected += 0 if allowed else len(hs) - 1
    return unexpected


async def run_once(
    url: str,
    *,
    lease_ttl: float = 2.0,
    workers: int = 3,
    sessions: int = 200,
    rate: float = 400.0,
    before_kill: float = 1.5,
    after_kill: float = 6.0,
) -> TakeoverRun:
    """Start the workers, publish steadily, kill one, measure; `BenchError` if it cannot."""
    settings = fresh_settings(url, "takeover", lease_ttl_seconds=lease_ttl)
    names = session_ids(sessions)
    async with Bus.connect(settings) as bus:
        async with fleet_of(
            bus, "workers.probe:service", GROUP, workers, id_prefix="probe"
        ) as fleet:
            victim = fleet.workers[0]
            published = 0
            async with anyio.create_task_group() as tg:

                async def publish() -> None:
                    nonlocal published
                    seconds = before_kill + after_kill
                    published = await paced_publish(bus, names, rate, seconds, publishers=2)

                tg.start_soon(publish)
                await anyio.sleep(before_kill)
                partitions = (await lease_owners(bus, GROUP)).get(victim.worker_id, [])
                killed_ns = time.time_ns()
                fleet.kill(victim)
            log.info("takeover_published", events=published, victim=victim.worker_id)

            async def all_handled() -> bool:
                fleet.check_alive()
                if await bus.redis.llen(handled_key(settings.prefix)) < published:
                    return False
                return await _distinct_handled(bus) >= published

            await wait_until(all_handled, within=60, what=f"{published} events handled")
        handlings = await read_handlings(bus.redis, settings.prefix)

    mine = {s for s in names if bus.keys.partition(s) in set(partitions)}
    first_after: dict[str, int] = {}
    for h in handlings:
        if h.session in mine and h.pid != victim.pid and h.handled_ns >= killed_ns:
            first_after[h.session] = min(first_after.get(h.session, h.handled_ns), h.handled_ns)
    if not mine or first_after.keys() != mine:
        raise BenchError(f"{len(mine) - len(first_after)} of the victim's sessions never resumed")
    gaps = [(ns - killed_ns) / 1e9 for ns in first_after.values()]
    order = check_order(handlings, dict.fromkeys(names, published // sessions))
    p = percentiles(gaps, (50, 100))
    return TakeoverRun(
        len(partitions),
        len(mine),
        round(p["max"], 3),
        round(p["p50"], 3),
        published,
        order.duplicates,
        len(order.incomplete) + len(order.out_of_order) + len(order.unexpected),
        unexpected_repeats(handlings, mine, victim.pid, killed_ns),
    )


async def _distinct_handled(bus: Bus) -> int:
    """Events handled at least once (a redelivered event counts once)."""
    if not await bus.redis.llen(handled_key(bus.settings.prefix)):
        return 0
    return len({(h.session, h.seq) for h in await read_handlings(bus.redis, bus.settings.prefix)})


async def run(
    url: str,
    *,
    repeats: int = 3,
    lease_ttl: float = 2.0,
    workers: int = 3,
    sessions: int = 200,
    rate: float = 400.0,
) -> TakeoverResult:
    """`repeats` kills, each on fresh workers and keys."""
    runs = []
    for i in range(repeats):
        runs.append(
            await run_once(url, lease_ttl=lease_ttl, workers=workers, sessions=sessions, rate=rate)
        )
        log.info("takeover_measured", run=i + 1, max_gap_s=runs[-1].max_gap_s)
    return TakeoverResult(workers, lease_ttl, rate, sessions, runs)
