"""The consumer runtime: one service (one consumer group) in one worker process.

The worker joins the group's membership, takes the leases of the partitions the balanced
assignment gives it, and handles the sessions of those partitions: every session one event at a
time, in stream order, many sessions at once. Each step (settle the previous entry, read the
next) is one fenced script call, batched with other sessions' steps (see `steps`).

A new owner's first step in a session returns the entry the previous owner left pending, so
inherited work is replayed in id order before anything new. A failing handler is retried with
backoff at the head of its session; after `max_deliveries` the entry is dead-lettered and the
session goes on (or pauses, by policy). Stopping drains: in-flight handlers finish, their acks
are written, leases are released so the next owner starts at once.
"""

from __future__ import annotations

import os
import random
import secrets
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus
from redis.exceptions import ResponseError

from . import scripts
from .client import Bus, ServiceInfo
from .connection import TRANSIENT, make_client
from .envelope import Codec, DecodeError, Delivery, Entry, Payload
from .errors import ConfigError, FencedError
from .keys import Keys
from .ownership import Leases, assign
from .settings import NAME_PATTERN
from .steps import StepBatcher

log = structlog.get_logger("flowbus.consumer")

Handler = Callable[[Delivery], Awaitable[None]]

#: How long one read of the wake-up subscription waits before it is issued again.
HINT_READ_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Service:
    """A service: its name (= consumer group), its handler and the payload types it knows.

    With `subscribes`, other types are acknowledged unseen (other services' business); without
    it, every type goes to `handle` and a type the codec does not know is dead-lettered.
    """

    name: str
    handle: Handler
    codec: Codec
    subscribes: frozenset[str] | None = None

    def wants(self, type_: str) -> bool:
        return self.subscribes is None or type_ in self.subscribes

    def __post_init__(self) -> None:
        if not NAME_PATTERN.match(self.name):
            raise ConfigError(f"service name {self.name!r} must match {NAME_PATTERN.pattern}")


@dataclass(slots=True)
class Stats:
    """Counters of one consumer, for logs, metrics and the demo."""

    handled: int = 0
    skipped: int = 0
    retries: int = 0
    dead_lettered: int = 0
    partitions_lost: int = 0


@dataclass(frozen=True, slots=True)
class _Settle:
    """How to settle the entry just handled: ack it, or dead-letter it ('skip'/'pause')."""

    entry_id: str = ""
    verdict: str = ""
    deliveries: int = 0
    error: str = ""
    fields: tuple[bytes, ...] = ()


_NOTHING = _Settle()


@dataclass(slots=True, eq=False)
class _Partition:
    number: int
    token: str
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    tg: TaskGroup | None = None
    sessions: dict[str, bool] = field(default_factory=dict)  # session -> new work since read
    subscribed: anyio.Event = field(default_factory=anyio.Event)  # its hints reach us
    scanned: bool = False  # its live sessions were scheduled once subscribed
    draining: bool = False
    lost: bool = False
    drain: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)


class Consumer:
    """Runs `service` in this process until `stop()`; see the module docstring."""

    def __init__(self, bus: Bus, service: Service, *, worker_id: str | None = None) -> None:
        self.bus, self.service, self.settings = bus, service, bus.settings
        self.keys: Keys = bus.keys
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.stats = Stats()
        ttl_ms = int(self.settings.lease_ttl_seconds * 1000)
        self._leases = Leases(bus.redis, self.keys, service.name, self.worker_id, ttl_ms)
        self._steps = StepBatcher(bus.redis)
        self._limiter = anyio.CapacityLimiter(self.settings.concurrency)
        self._retention = int(self.settings.retention_seconds * 1000)
        self._parts: dict[int, _Partition] = {}
        self._stop = anyio.Event()
        self._hints_changed = anyio.Event()
        self._subscribed_once = anyio.Event()
        self._last_renewal = 0.0
        self._tg: TaskGroup | None = None
        self._log = log.bind(group=service.name, worker=self.worker_id)

    @property
    def partitions(self) -> list[int]:
        """The partitions this worker holds right now."""
        return sorted(p for p, part in self._parts.items() if not part.lost)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Begin a graceful stop; `run()` returns once drained."""
        self._stop.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Join the group and handle events until `stop()`; then drain and leave."""
        subscribes = sorted(self.service.subscribes) if self.service.subscribes else None
        await self.bus.register_service(ServiceInfo(self.service.name, subscribes))
        tick = self.settings.lease_ttl_seconds / 5
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._steps.run)
            tg.start_soon(self._follow_hints)
            self._last_renewal = anyio.current_time()
            wanting = await self._rebalance()
            self._log.info("worker_started", partitions=len(self._parts))
            task_status.started()
            while not self._stop.is_set():
                with anyio.move_on_after(min(tick, 0.2) if wanting else tick):
                    await self._stop.wait()
                if not self._stop.is_set():
                    wanting = await self._rebalance()
            await self._drain_all()
            tg.cancel_scope.cancel()
        self._log.info("worker_stopped", **vars_of(self.stats))

    # -- ownership --------------------------------------------------------------------------
    async def _rebalance(self) -> bool:
        """Heartbeat, renew, hand back what is no longer ours, take what is. True while some
        partition we should own is still held by another worker."""
        held = {p: part.token for p, part in self._parts.items() if not part.lost}
        try:
            members = await self._leases.heartbeat()
            lost = await self._leases.renew(held) if held else set()
        except (*TRANSIENT, ResponseError) as exc:
            self._log.warning("heartbeat_failed", error=str(exc))
            if anyio.current_time() - self._last_renewal > self.settings.lease_ttl_seconds:
                for part in list(self._parts.values()):  # others may own them by now
                    self._lose(part, "lease_expired")
            return False
        self._last_renewal = anyio.current_time()
        for p in lost:
            self._lose(self._parts[p], "lease_lost")
        desired = assign(members, self.settings.partitions).get(self.worker_id, set())
        for p, part in self._parts.items():
            if p not in desired and not part.draining:
                self._log.info("partition_handed_over", partition=p)
                self._begin_drain(part)
        missing = desired - self._parts.keys()
        if not missing:
            return False
        try:
            tokens = await self._leases.acquire(sorted(missing))
        except (*TRANSIENT, ResponseError) as exc:
            self._log.warning("acquire_failed", error=str(exc))
            return True
        assert self._tg is not None
        for p, token in tokens.items():
            self._parts[p] = part = _Partition(p, token)
            self._tg.start_soon(self._run_partition, part)
        if tokens:
            self._log.info("partitions_acquired", partitions=sorted(tokens), members=len(members))
        return bool(missing - tokens.keys())

    def _lose(self, part: _Partition, reason: str) -> None:
        if not part.lost:
            part.lost = True
            self.stats.partitions_lost += 1
            self._log.warning("partition_lost", partition=part.number, reason=reason)
            part.scope.cancel()

    def _begin_drain(self, part: _Partition) -> None:
        part.draining = True
        part.drain.set()
        part.subscribed.set()  # a draining partition waits for no subscription
        self._notify_hint_follower()

    async def _drain_all(self) -> None:
        for part in list(self._parts.values()):
            self._begin_drain(part)
        for part in list(self._parts.values()):
            await part.done.wait()
        with anyio.move_on_after(2, shield=True):
            try:
                await self._leases.heartbeat(leave=True)
            except (*TRANSIENT, ResponseError) as exc:
                self._log.warning("leave_failed", error=str(exc))

    async def _run_partition(self, part: _Partition) -> None:
        try:
            with part.scope:
                async with anyio.create_task_group() as tg:
                    part.tg = tg
                    self._notify_hint_follower()
                    await part.subscribed.wait()  # hints from here on reach us; the scan
                    if not part.draining:  # covers what was published before
                        await self._rescan(part)
                        part.scanned = True
                    await part.drain.wait()
                    part.scope.deadline = anyio.current_time() + self.settings.drain_timeout_seconds
            if part.scope.cancelled_caught and not part.lost:
                self._log.warning("drain_timed_out", partition=part.number, left=len(part.sessions))
        except* FencedError:
            self._lose(part, "fenced")
        finally:
            del self._parts[part.number]
            self._notify_hint_follower()
            if not part.lost:
                with anyio.move_on_after(2, shield=True):
                    try:
                        await self._leases.release(part.number, part.token)
                    except (*TRANSIENT, ResponseError):
                        pass  # the lease lapses by itself after its TTL
            part.done.set()

    # -- finding work -----------------------------------------------------------------------
    async def _rescan(self, part: _Partition) -> None:
        """Schedule every live session of the partition (on takeover, or after hints may have
        been missed)."""
        for attempt in range(1, 1_000_000):
            try:
                async for session in self.bus.redis.sscan_iter(
                    self.keys.live(part.number), count=1000
                ):
                    self._schedule(part, session.decode())
                return
            except TRANSIENT as exc:
                self._log.warning("rescan_failed", partition=part.number, error=str(exc))
                await anyio.sleep(_backoff(attempt))

    def _notify_hint_follower(self) -> None:
        self._hints_changed.set()

    async def _follow_hints(self) -> None:
        """Subscribe to the wake channels of the partitions we own and schedule the sessions
        they name. A partition is scanned once its subscription is confirmed, and every
        partition again after a reconnect, so no hint is missed for good."""
        failures = 0
        while True:
            client = make_client(self.settings, block_seconds=HINT_READ_SECONDS)
            pubsub = client.pubsub()
            channels: dict[bytes, _Partition] = {}
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._subscribe, pubsub, channels)
                    while True:
                        await self._subscribed_once.wait()
                        message = await pubsub.get_message(timeout=HINT_READ_SECONDS)
                        failures = 0
                        if message is not None:
                            self._take_hint(message, channels)
            except* TRANSIENT as group:  # raised in the reader or in the subscriber task
                failures += 1
                self._log.warning("hints_interrupted", error=str(group.exceptions[0]))
                await anyio.sleep(_backoff(failures))
            finally:
                self._subscribed_once = anyio.Event()
                with anyio.CancelScope(shield=True):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py
                    await client.aclose()

    async def _subscribe(self, pubsub: Any, channels: dict[bytes, _Partition]) -> None:
        """Keep the subscriptions equal to the partitions we own and are not draining."""
        while True:
            self._hints_changed = anyio.Event()
            want = {
                self.keys.wake(p).encode(): part
                for p, part in self._parts.items()
                if not part.draining and not part.lost
            }
            new = [c for c in want if c not in channels]
            gone = [c for c in channels if c not in want]
            for channel, part in want.items():
                if channel in channels and channels[channel] is not part:
                    part.subscribed.set()  # the subscription never lapsed: no hint was missed
            channels.clear()
            channels.update(want)
            if new:
                await pubsub.ssubscribe(*new)
                self._subscribed_once.set()
            if gone:
                await pubsub.sunsubscribe(*gone)
            await self._hints_changed.wait()

    def _take_hint(self, message: dict[str, Any], channels: dict[bytes, _Partition]) -> None:
        part = channels.get(message["channel"])
        if part is None or part.lost or part.draining:
            return
        if message["type"] == "smessage":
            self._schedule(part, message["data"].decode())
        elif message["type"] == "ssubscribe":
            if part.scanned:  # subscribed again after a reconnect: hints may have been missed
                self._spawn_rescan(part)
            part.subscribed.set()

    def _spawn_rescan(self, part: _Partition) -> None:
        if part.tg is not None and not part.draining:
            part.tg.start_soon(self._rescan, part)

    def _schedule(self, part: _Partition, session: str) -> None:
        if part.draining or part.tg is None:
            return
        if session in part.sessions:
            part.sessions[session] = True
            return
        part.sessions[session] = True
        part.tg.start_soon(self._run_session, part, session)

    # -- one session ------------------------------------------------------------------------
    async def _run_session(self, part: _Partition, session: str) -> None:
        keys = [self.keys.session(session), self.keys.lease(part.number, self.service.name)]
        settle = _NOTHING
        try:
            while True:
                part.sessions[session] = False
                reply = await self._step(part, keys, session, settle, read=not part.draining)
                if reply[0] != b"entry":
                    if reply[0] == b"idle" and part.sessions[session] and not part.draining:
                        settle = _NOTHING
                        continue
                    return
                settle = await self._handle(part, session, reply)
        finally:
            part.sessions.pop(session, None)

    async def _step(
        self, part: _Partition, keys: list[str], session: str, settle: _Settle, *, read: bool
    ) -> list[Any]:
        args: list[Any] = [part.token, settle.entry_id, "1" if read else "", self._retention]
        if settle.verdict:
            args += [settle.verdict, settle.deliveries, settle.error, *settle.fields]
        for attempt in range(1, 1_000_000):
            try:
                reply: list[Any] = await self._steps.step(keys, args)
                return reply
            except ResponseError as exc:
                if str(exc).startswith("FENCED"):
                    raise FencedError(self.service.name, part.number, keys[0]) from None
                error: Exception = exc
            except TRANSIENT as exc:
                error = exc
            # Retrying is safe: an ack is idempotent, and the retry reads our pending head first
            # ('p'), so an entry whose reply was lost is read again rather than skipped.
            self._log.warning("step_failed", session=session, error=str(error), attempt=attempt)
            if read:
                args[2] = "p"
            await anyio.sleep(_backoff(attempt))
        raise AssertionError("unreachable")

    async def _handle(self, part: _Partition, session: str, reply: list[Any]) -> _Settle:
        """Run the handler for one entry; say how to settle it (or `_NOTHING` to retry)."""
        _, raw_id, raw_fields, raw_deliveries, _replayed = reply
        entry_id, deliveries = raw_id.decode(), int(raw_deliveries)
        fields = dict(zip(raw_fields[::2], raw_fields[1::2], strict=True))
        service = self.service
        try:
            entry = Entry.parse(entry_id, fields, max_data=self.settings.max_payload_bytes)
            if not service.wants(entry.type):
                self.stats.skipped += 1
                return _Settle(entry_id)
            payload = service.codec.decode(entry.type, entry.data)
        except DecodeError as exc:
            self.stats.dead_lettered += 1
            self._log.error("entry_rejected", session=session, entry=entry_id, reason=exc.reason)
            return _Settle(entry_id, "skip", deliveries, exc.reason, _original(raw_fields))
        delivery = Delivery(
            session,
            service.name,
            entry_id,
            entry.type,
            entry.seq,
            entry.ts,
            payload,
            deliveries,
            entry.extra,
            _Context(self, part, session),
        )
        with structlog.contextvars.bound_contextvars(
            session=session, type=entry.type, seq=entry.seq, group=service.name
        ):
            try:
                async with self._limiter:
                    with anyio.fail_after(self.settings.handler_timeout_seconds):
                        await service.handle(delivery)
            except Exception as exc:
                error = (
                    f"handler timed out after {self.settings.handler_timeout_seconds}s"
                    if isinstance(exc, TimeoutError)
                    else f"{type(exc).__name__}: {exc}"
                )
                if deliveries >= self.settings.max_deliveries:
                    self.stats.dead_lettered += 1
                    policy = self.settings.dead_letter_policy
                    self._log.error(
                        "event_dead_lettered", error=error, deliveries=deliveries, policy=policy
                    )
                    return _Settle(entry_id, policy, deliveries, error, _original(raw_fields))
                self.stats.retries += 1
                delay = _backoff(
                    deliveries,
                    self.settings.retry_backoff_seconds,
                    self.settings.retry_backoff_max_seconds,
                )
                self._log.warning(
                    "handler_failed", error=error, deliveries=deliveries, retry_in=round(delay, 3)
                )
                await anyio.sleep(delay)
                return _NOTHING  # the next step reads this entry again, as the pending head
        self.stats.handled += 1
        return _Settle(entry_id)


#: Fields a dead letter adds to the original entry's; an original field of the same name is
#: kept as ``orig.<name>``.
DEAD_LETTER_FIELDS = frozenset({b"session", b"group", b"entry", b"deliveries", b"error", b"policy"})


def _original(raw_fields: list[bytes]) -> tuple[bytes, ...]:
    return tuple(
        b"orig." + f if i % 2 == 0 and f in DEAD_LETTER_FIELDS else f
        for i, f in enumerate(raw_fields)
    )


@dataclass(frozen=True, slots=True)
class _Context:
    """A delivery's access to its session: inbox writes, and this group's fenced state."""

    consumer: Consumer
    part: _Partition
    session: str

    async def send(self, payload: Payload, dedupe: str, extra: Mapping[str, str] | None) -> object:
        return await self.consumer.bus.send(self.session, payload, dedupe=dedupe, extra=extra)

    async def load_state(self) -> bytes | None:
        bus = self.consumer.bus
        data: Any = await bus.redis.hget(
            bus.keys.state(self.session), f"group:{self.consumer.service.name}"
        )
        return None if data is None else bytes(data)

    async def read_session_state(self) -> dict[str, bytes]:
        return await self.consumer.bus.read_state(self.session)

    async def write_session_state(self, fields: Mapping[str, str | bytes]) -> None:
        await self.consumer.bus.write_state(self.session, fields)

    async def save_state(self, data: bytes) -> None:
        bus, group, p = self.consumer.bus, self.consumer.service.name, self.part.number
        keys = [bus.keys.lease(p, group), bus.keys.state(self.session), bus.keys.meta(self.session)]
        try:
            await scripts.SAVE_STATE(bus.redis, keys, [self.part.token, f"group:{group}", data])
        except ResponseError as exc:
            if str(exc).startswith("FENCED"):
                raise FencedError(group, p, keys[1]) from None
            raise


def _backoff(attempt: int, base: float = 0.05, cap: float = 5.0) -> float:
    """Exponential backoff with full jitter (half to all of the step)."""
    return float(min(cap, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0))


def vars_of(stats: Stats) -> dict[str, int]:
    return {f: getattr(stats, f) for f in stats.__dataclass_fields__}
