"""What the benchmarks share: session names, settings with a fresh prefix, filling the
streams, reading a group's state, bounded waits, and where results go."""

from __future__ import annotations

import argparse
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
from redis.asyncio import Redis

from bus import Bus, Keys, Payload, Settings, encode, type_name
from workers.fleet import Fleet

ROOT = Path(__file__).resolve().parent.parent


class BenchError(RuntimeError):
    """A benchmark could not produce its figure (a wait timed out, a check failed)."""


def output_for(full: Path, only: Sequence[str] | None) -> Path:
    """Where results go by default: `full` for a full run, ``<full>-<parts>.json`` beside it
    for a run of some parts only (`only`), so that it leaves the full run's be."""
    if not only:
        return full
    return full.with_name(f"{full.stem}-{'-'.join(sorted(set(only)))}.json")


def add_server_option(p: argparse.ArgumentParser) -> None:
    """``--server redis|valkey``: the server a benchmark starts for itself."""
    p.add_argument(
        "--server",
        choices=["redis", "valkey"],
        default="redis",
        help="redis-server from the PATH (default) or the embedded Valkey",
    )


def session_ids(count: int) -> list[str]:
    """``s0000``, ``s0001``, …: session ids of a benchmark."""
    return [f"s{i:04d}" for i in range(count)]


def fresh_settings(url: str, name: str, **overrides: object) -> Settings:
    """Settings with a key prefix of their own (``bench-<name>-<hex>``), so runs never meet."""
    return Settings.from_env(
        {}, url=url, prefix=f"bench-{name}-{secrets.token_hex(3)}", **overrides
    )


@asynccontextmanager
async def fleet_of(
    bus: Bus,
    target: str,
    group: str,
    workers: int,
    *,
    id_prefix: str,
    within: float = 30,
) -> AsyncIterator[Fleet]:
    """`workers` worker processes of `target` (logging to a temporary directory), started and
    sharing the partitions within `within` seconds; stopped gracefully when the block ends,
    killed if it raises."""
    with tempfile.TemporaryDirectory(prefix="flowbus-bench-") as logs:
        fleet = Fleet(bus.settings, target, group, Path(logs), cwd=ROOT)
        try:
            fleet.start(workers, id_prefix=id_prefix)
            await fleet.wait_split(bus, within=within)
            yield fleet
            await fleet.stop(within=30)
        finally:
            fleet.kill_all()  # SIGKILL ends a frozen (SIGSTOP) worker too


async def fill_plain(
    redis: Redis, keys: Keys, sessions: Sequence[str], events: int, payload: Payload, group: str
) -> None:
    """Append `events` entries to each session's stream with plain XADDs (the bus's field
    layout, no script) and create `group` on each stream; pipelined."""
    name, data = type_name(type(payload)), encode(payload)
    pipe = redis.pipeline(transaction=False)
    for i, session in enumerate(sessions):
        stream = keys.session(session)
        for seq in range(1, events + 1):
            fields = {"type": name, "seq": seq, "ts": int(time.time() * 1000), "data": data}
            pipe.xadd(stream, fields)  # type: ignore[arg-type]  # redis-py's field typing is narrower than what it accepts
        pipe.xgroup_create(stream, group, id="0")
        if i % 50 == 49:
            await pipe.execute()
    await pipe.execute()


async def publish_all(
    bus: Bus, sessions: Sequence[str], events: int, make: Callable[[], Payload]
) -> None:
    """`Bus.publish` `events` payloads to each session: sessions concurrently, each in order,
    the last one final."""

    async def one(session: str) -> None:
        for seq in range(1, events + 1):
            await bus.publish(session, make(), final=seq == events)

    async with anyio.create_task_group() as tg:
        for session in sessions:
            tg.start_soon(one, session)


@dataclass(frozen=True, slots=True)
class Backlog:
    """The state of one consumer group over many streams."""

    read: int  # entries delivered to the group
    pending: int  # delivered, not acknowledged
    lag: int  # not delivered yet

    @property
    def acked(self) -> int:
        return self.read - self.pending


async def backlog(redis: Redis, streams: Sequence[str], group: str) -> Backlog:
    """Sum ``XINFO GROUPS`` of `group` over `streams` (one pipeline)."""
    pipe = redis.pipeline(transaction=False)
    for stream in streams:
        pipe.xinfo_groups(stream)
    read = pending = lag = 0
    for groups in await pipe.execute():
        for g in groups:
            if g["name"].decode() == group:
                read += int(g["entries-read"] or 0)
                pending += int(g["pending"])
                lag += int(g["lag"] or 0)
    return Backlog(read, pending, lag)


async def wait_until(
    condition: Callable[[], Awaitable[bool]], *, within: float, what: str, every: float = 0.01
) -> None:
    """Poll `condition` `every` seconds; `BenchError` naming `what` after `within` seconds."""
    with anyio.move_on_after(within):
        while not await condition():  # noqa: ASYNC110  # the condition lives in Redis: polled
            await anyio.sleep(every)
        return
    raise BenchError(f"timed out after {within:g}s waiting for {what}")


async def server_ms(redis: Redis) -> int:
    """The server's clock (``TIME``), in ms: the clock the scripts stamp with."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def server_us(redis: Redis) -> int:
    """The server's clock (``TIME``), in µs."""
    seconds, micros = await redis.time()
    return int(seconds) * 1_000_000 + int(micros)


async def last_retired_ms(bus: Bus) -> int:
    """When the latest session retired (server clock, ms): its score in the ended index is that
    time plus the retention."""
    pipe = bus.redis.pipeline(transaction=False)
    for p in range(bus.settings.partitions):
        pipe.zrange(bus.keys.ended(p), -1, -1, withscores=True)
    scores = [score for reply in await pipe.execute() for _, score in reply]
    if not scores:
        raise BenchError("no session has retired")
    return int(max(scores)) - int(bus.settings.retention_seconds * 1000)
