"""The probe service of the benchmarks: records every handling in Redis.

Workers load it as ``workers.probe:service`` (group ``probe``), with their settings in the
``FLOWBUS_*`` environment. Each handling appends one `Handling` (a JSON array: session, seq,
pid, deliveries, sent_ns, handled_ns, due_ns) to the list ``<prefix>:probe:handled``, before the
event is acknowledged, so a handling the list does not show was not acknowledged either (the
takeover benchmark counts on it). ``workers.probe:holding`` keeps its records in memory until a
`ProbeFlush` event reaches it, then appends them all at once, so its handler is next to a
no-op while it is measured, as the latency benchmark asks (no round trip of its own per event;
the records of a worker that dies before the flush are lost). With ``PROBE_MAX_DELAY_MS`` in its
environment, a handler waits a random time up to that after it started, as a handler that calls
a service would (the chaos run: more events in flight at a disruption). The publisher puts
``time.time_ns()`` in the payload right before publishing; the difference with the time the
handler started is the publish-to-handler latency. A paced publisher also puts the time its
schedule gave the event, for the latency from there.

    redis-cli LRANGE '<prefix>:probe:handled' 0 9
"""

from __future__ import annotations

import os
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from itertools import pairwise

import anyio
import msgspec
from redis.asyncio import Redis

from bus import Codec, Delivery, Payload, Service, Settings, make_client
from bus.connection import close

GROUP = "probe"
#: Session names listed in a failed check, at most.
LISTED = 10


class ProbeTick(Payload, tag="probe.tick"):
    """One probe event; `sent_ns` is the publisher's ``time.time_ns()`` just before publishing,
    `due_ns` the time its schedule gave it (0: none), on the same clock."""

    sent_ns: int = 0
    due_ns: int = 0


class ProbeFlush(Payload, tag="probe.flush"):
    """Tells a holding probe to write the records it holds; a plain probe has none."""


class Handling(msgspec.Struct, array_like=True, frozen=True):
    """One handling of one event by one worker process."""

    session: str
    seq: int
    pid: int
    deliveries: int
    sent_ns: int
    handled_ns: int
    due_ns: int = 0

    @property
    def latency_us(self) -> float:
        """Publish-to-handler latency (microseconds); both clocks are this machine's."""
        return (self.handled_ns - self.sent_ns) / 1000

    @property
    def due_latency_us(self) -> float:
        """Latency from the time the publisher's schedule gave the event if it was published
        later (from its publish if earlier, or if it had none): a publisher held up adds its
        delay here, not only to its later publishes (what a paced load measured from the
        publish alone leaves out, "coordinated omission")."""
        start = min(self.sent_ns, self.due_ns) if self.due_ns else self.sent_ns
        return (self.handled_ns - start) / 1000


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
    """The handler: one bounded connection pool per worker process, held while it runs
    (`opened`, the service's lifespan); with `hold`, records wait in memory for the next
    `ProbeFlush`."""

    def __init__(self, *, hold: bool = False) -> None:
        self._redis: Redis | None = None
        self._key = ""
        self._pid = os.getpid()
        self._hold = hold
        self._held: list[bytes] = []
        self._max_delay = float(os.environ.get("PROBE_MAX_DELAY_MS", "0")) / 1000

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        """Its connection pool, to the deployment of the ``FLOWBUS_*`` environment, closed on
        the way out."""
        settings = Settings.from_env()
        self._key = handled_key(settings.prefix)
        self._redis = make_client(settings, max_connections=32)
        try:
            yield
        finally:
            redis, self._redis = self._redis, None
            await close(redis)

    async def __call__(self, delivery: Delivery) -> None:
        handled_ns = time.time_ns()
        if self._redis is None:
            raise RuntimeError("the probe records within its lifespan (Recorder.opened) only")
        match delivery.payload:
            case ProbeTick(sent_ns=sent_ns, due_ns=due_ns):
                session, seq, deliveries = delivery.session, delivery.seq, delivery.deliveries
                record = Handling(session, seq, self._pid, deliveries, sent_ns, handled_ns, due_ns)
                if self._max_delay:
                    await anyio.sleep(random.uniform(0, self._max_delay))
                if self._hold:
                    self._held.append(msgspec.json.encode(record))
                else:
                    await self._redis.rpush(self._key, msgspec.json.encode(record))
            case ProbeFlush():
                held, self._held = self._held, []  # other sessions' handlers go on meanwhile
                try:
                    if held:
                        await self._redis.rpush(self._key, *held)
                except BaseException:
                    self._held[:0] = held  # for the flush's retry
                    raise
            case other:
                raise AssertionError(f"the codec knows no {type(other).__name__}")


_CODEC = Codec([ProbeTick, ProbeFlush])
_plain, _holding = Recorder(), Recorder(hold=True)
service = Service(GROUP, _plain, _CODEC, lifespan=_plain.opened)
holding = Service(GROUP, _holding, _CODEC, lifespan=_holding.opened)
