"""Benchmark 5 (opt-in, ``--soak SECONDS``): memory over a long run of short calls.

2 worker processes of `bench.noop` run while a publisher, paced at 1,000 events/s, keeps 1,000
sessions going: each gets 20 events, the last one final, and is replaced by a new session, as
calls come and go. Sessions retire 5 s after they ended. Every `SAMPLE_SECONDS` the workers'
resident memory, the server's ``used_memory`` and the live sessions are sampled (and logged, as
progress); the result compares the first sample, taken once the load is steady, with the last.
At the end every session must retire, which the bus does only once all of it was acknowledged
(else `BenchError`).
"""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import structlog

from bus import Bus, ServiceInfo
from workers.observe import live_session_count

from .noop import GROUP, Noop
from .workload import fleet_of, fresh_settings, wait_until

log = structlog.get_logger("flowbus.bench")

#: Seconds between samples; the first is taken one interval into the load.
SAMPLE_SECONDS = 15.0
#: Events of each call (session), the last one final.
EVENTS_PER_SESSION = 20


class SoakSample(msgspec.Struct, frozen=True):
    """Memory at one moment of the soak."""

    at_s: float
    events: int
    sessions_started: int
    live_sessions: int
    worker_rss_kb: list[int]
    server_used_bytes: int


class SoakResult(msgspec.Struct, frozen=True):
    """The samples of a soak (every session retired at its end, or `run` raised)."""

    workers: int
    rate: float
    seconds: float
    events: int
    calls: int
    samples: list[SoakSample]

    @property
    def rss_growth_kb(self) -> list[int]:
        """Per worker: resident memory at the last sample minus at the first."""
        first, last = self.samples[0].worker_rss_kb, self.samples[-1].worker_rss_kb
        return [b - a for a, b in zip(first, last, strict=True)]


def rss_kb(pid: int) -> int:
    """Resident memory of a process (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


async def run(
    url: str, *, seconds: float, rate: float = 1000.0, sessions: int = 1000, workers: int = 2
) -> SoakResult:
    """Run the rolling calls for `seconds`, sampling memory; see the module docstring."""
    settings = fresh_settings(url, "soak", retention_seconds=5)
    async with Bus.connect(settings) as bus:
        await bus.register_service(ServiceInfo(GROUP))
        async with fleet_of(bus, "bench.noop:service", GROUP, workers, id_prefix="soak") as fleet:
            samples: list[SoakSample] = []
            calls = [f"call-{i}" for i in range(sessions)]
            counts = [0] * sessions
            started_sessions, events = sessions, 0
            started = next_sample = anyio.current_time()
            next_sample += SAMPLE_SECONDS
            while (now := anyio.current_time()) - started < seconds:
                i = events % sessions
                counts[i] += 1
                final = counts[i] == EVENTS_PER_SESSION
                await bus.publish(calls[i], Noop(), final=final)
                if final:
                    calls[i], counts[i] = f"call-{started_sessions}", 0
                    started_sessions += 1
                events += 1
                if now >= next_sample:
                    next_sample += SAMPLE_SECONDS
                    fleet.check_alive()
                    sample = SoakSample(
                        round(now - started, 1),
                        events,
                        started_sessions,
                        await live_session_count(bus),
                        [rss_kb(w.pid) for w in fleet.workers],
                        int((await bus.redis.info("memory"))["used_memory"]),
                    )
                    samples.append(sample)
                    log.info("soak_sampled", **msgspec.structs.asdict(sample))
                delay = started + events / rate - anyio.current_time()
                if delay > 0:
                    await anyio.sleep(delay)
            calls_made = started_sessions - counts.count(0)  # named, never published to
            for i, count in enumerate(counts):  # end the calls still going
                if count:
                    await bus.publish(calls[i], Noop(), final=True)
                    events += 1

            async def retired() -> bool:
                fleet.check_alive()
                return await live_session_count(bus) == 0

            await wait_until(retired, within=60, what="every session to retire")
    return SoakResult(workers, rate, round(seconds, 1), events, calls_made, samples)
