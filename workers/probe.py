"""The probe service of the benchmarks: records every handling in Redis.

Workers load it as ``workers.probe:service`` (group ``probe``), with their settings in the
``FLOWBUS_*`` environment. Each handling appends one `Handling` (a JSON array: session, seq,
pid, deliveries, sent_ns, handled_ns) to the list ``<prefix>:probe:handled``, before the event is
acknowledged, so a handling the list does not show was not acknowledged either (the takeover
benchmark counts on it). ``workers.probe:buffered`` keeps the records in memory and appends them
together every `FLUSH_SECONDS`, so its handler is next to a no-op, as the latency benchmark asks:
no round trip of its own per event (records of the last moments before a worker dies are lost).
The publisher puts ``time.time_ns()`` in the payload right before publishing; the difference
with the time the handler started is the publish-to-handler latency.

    redis-cli LRANGE '<prefix>:probe:handled' 0 9
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise

import msgspec
from redis.asyncio import Redis

from bus import Codec, Delivery, Payload, Service, Settings, make_client

GROUP = "probe"
#: How long the buffered probe keeps a record before appending it with the others.
FLUSH_SECONDS = 0.05
#: Session names listed in a failed check, at most.
LISTED = 10


class ProbeTick(Payload, tag="probe.tick"):
    """One probe event; `sent_ns` is the publisher's ``time.time_ns()`` just before publishing."""

    sent_ns: int = 0


class Handling(msgspec.Struct, array_like=True, frozen=True):
    """One handling of one event by one worker process."""

    session: str
    seq: int
    pid: int
    deliveries: int
    sent_ns: int
    handled_ns: int

    @property
    def latency_us(self) -> float:
        """Publish-to-handler latency (microseconds); both clocks are this machine's."""
        return (self.handled_ns - self.sent_ns) / 1000


def handled_key(prefix: str) -> str:
    """The list of `Handling` records of a deployment."""
    return f"{prefix}:probe:handled"


_decoder = msgspec.json.Decoder(Handling)


async def read_handlings(redis: Redis, prefix: str) -> list[Handling]:
    """Every handling recorded so far, in the order they were recorded."""
    raw = await redis.lrange(handled_key(prefix), 0, -1)
    return [_decoder.decode(item) for item in raw]


def percentiles(values: Sequence[float], points: Sequence[float]) -> dict[str, float]:
    """``{"p50": …, "p99": …}`` by the nearest-rank method; ``max`` is the 100th. Empty in,
    empty out."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {}
    for q in points:
        rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
        name = "max" if q == 100 else f"p{q:g}"
        out[name] = ordered[int(rank) - 1]
    return out


class OrderCheck(msgspec.Struct, frozen=True):
    """How the handlings of each session compare with what was published to it."""

    sessions_in_order: int
    #: Sessions with a seq missing (lost) or never handled.
    incomplete: list[str]
    #: Sessions complete but with a seq handled after a later one.
    out_of_order: list[str]
    #: Sessions handled that were never published to.
    unexpected: list[str]
    duplicates: int

    @property
    def ok(self) -> bool:
        return not (self.incomplete or self.out_of_order or self.unexpected) and (
            self.duplicates == 0
        )


def check_order(handlings: Iterable[Handling], expected: Mapping[str, int]) -> OrderCheck:
    """Check that each session of `expected` (session -> events published) was handled
    seq 1..N in order. A redelivery repeats a seq right after itself: it is counted as a
    duplicate, not as disorder."""
    seqs: dict[str, list[int]] = defaultdict(list)
    for h in handlings:
        seqs[h.session].append(h.seq)
    in_order, duplicates = 0, 0
    incomplete, out_of_order = [], []
    for session, n in expected.items():
        got = seqs.pop(session, [])
        duplicates += len(got) - len(set(got))
        if set(got) != set(range(1, n + 1)):
            incomplete.append(session)
        elif any(b < a for a, b in pairwise(got)):
            out_of_order.append(session)
        else:
            in_order += 1
    return OrderCheck(
        in_order, incomplete[:LISTED], out_of_order[:LISTED], sorted(seqs)[:LISTED], duplicates
    )


class Recorder:
    """The handler: one bounded connection pool per worker process, made on first use; with
    `flush_seconds`, records are appended in bulk that long after the first of them."""

    def __init__(self, flush_seconds: float = 0.0) -> None:
        self._redis: Redis | None = None
        self._key = ""
        self._pid = os.getpid()
        self._flush_seconds = flush_seconds
        self._held: list[bytes] = []
        self._flusher: asyncio.Task[None] | None = None  # referenced while it runs

    async def __call__(self, delivery: Delivery) -> None:
        handled_ns = time.time_ns()
        assert isinstance(delivery.payload, ProbeTick)  # the codec knows no other type
        if self._redis is None:
            settings = Settings.from_env()
            self._redis, self._key = (
                make_client(settings, max_connections=32),
                handled_key(settings.prefix),
            )
        record = Handling(
            delivery.session,
            delivery.seq,
            self._pid,
            delivery.deliveries,
            delivery.payload.sent_ns,
            handled_ns,
        )
        if not self._flush_seconds:
            await self._redis.rpush(self._key, msgspec.json.encode(record))
            return
        self._held.append(msgspec.json.encode(record))
        if len(self._held) == 1:
            self._flusher = asyncio.get_running_loop().create_task(self._flush(self._redis))

    async def _flush(self, redis: Redis) -> None:
        await asyncio.sleep(self._flush_seconds)
        held, self._held = self._held, []
        await redis.rpush(self._key, *held)


service = Service(GROUP, Recorder(), Codec([ProbeTick]))
buffered = Service(GROUP, Recorder(flush_seconds=FLUSH_SECONDS), Codec([ProbeTick]))
