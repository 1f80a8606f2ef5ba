"""The bot's side of the bus: publish a session's events, read its inbox; and inbox writes."""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import msgspec
import structlog
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from . import scripts
from .connection import call, close, connect, make_client
from .envelope import (
    MAX_EXTRA_BYTES,
    OPTIONAL_FIELDS,
    Codec,
    DecodeError,
    Entry,
    Payload,
    encode,
    type_name,
)
from .errors import (
    ConfigError,
    DeadLetterGoneError,
    InvalidExtraError,
    NoSuchSessionError,
    PayloadTooLargeError,
    SessionEndedError,
)
from .keys import Keys, check_session_id
from .publisher import ClusterPublisher, Publisher
from .settings import Settings

#: How long the list of registered services is trusted before it is read again.
SERVICES_TTL = 5.0
#: Sessions whose last published seq a `Bus` remembers (the oldest is forgotten first).
REMEMBERED_SESSIONS = 100_000

log = structlog.get_logger("flowbus.bus")


@dataclass(frozen=True, slots=True)
class Published:
    """Where a publish or an inbox write landed."""

    seq: int
    entry_id: str


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded inbox entry."""

    entry_id: str
    type: str
    seq: int
    ts: int
    payload: Payload
    extra: Mapping[str, str]


class ServiceInfo(msgspec.Struct, frozen=True):
    """What a running service registers under ``<prefix>:services``."""

    name: str
    subscribes: list[str] | None = None


class Bus:
    """A connection to one deployment. Cheap to share: one per process is enough.

    Open it with ``async with Bus.connect(settings) as bus:``.
    """

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.prefix, settings.partitions)
        self._services: tuple[float, list[ServiceInfo]] = (float("-inf"), [])
        # The last seq published to each session still going, for a server that lost them.
        self._last_seq: dict[str, int] = {}
        # A session's publishes go one at a time: the script recognises the retry of the
        # session's last publish only, so two in flight could both be appended again.
        self._publishing: dict[str, anyio.Lock] = {}
        self._publisher: Publisher | ClusterPublisher | None = None  # else through `redis`

    @classmethod
    @asynccontextmanager
    async def connect(cls, settings: Settings, *, attempts: int = 1) -> AsyncIterator[Bus]:
        """Connect and check the server; raises `ConnectionFailedError`. Its publishes and
        inbox writes share writes on a connection of their own (`bus.publisher`; in a cluster,
        one per node)."""
        async with connect(settings, attempts=attempts) as redis:
            bus = cls(redis, settings)
            if isinstance(redis, RedisCluster):
                bus._publisher = ClusterPublisher(settings, redis)
            else:
                bus._publisher = Publisher(settings)
            try:
                await bus.check_partitions()
                yield bus
            finally:
                if bus._publisher is not None:
                    await bus._publisher.aclose()

    def _encode(self, session: str, payload: Payload) -> tuple[str, bytes]:
        data = encode(payload)
        name = type_name(type(payload))
        if len(data) > self.settings.max_payload_bytes:
            raise PayloadTooLargeError(session, name, len(data), self.settings.max_payload_bytes)
        return name, data

    async def publish(
        self,
        session: str,
        payload: Payload,
        *,
        final: bool = False,
        extra: Mapping[str, str] | None = None,
        dead_letter: str | None = None,
    ) -> Published:
        """Append `payload` to the session's stream with the next `seq`.

        `final` marks the session's last event: afterwards the session retires once every group
        handled it. `extra` carries optional envelope fields (``traceparent``, ``corr``…).
        `dead_letter` is the id of a dead letter of the session's partition (in `Keys.dead`)
        that this event replays: it is removed as the event is appended, and if it is gone
        (replayed or dropped already) nothing is appended and `DeadLetterGoneError` is raised.

        A connection failure is retried with backoff for up to 15 s (`connection.RETRY_SECONDS`);
        a retry never appends twice (with one publisher per session, as with one bot per call).
        If the server lost the session (a restart without its data), the session goes on at the
        seq after the last one this `Bus` published to it, not at 1
        (``session_counter_restored`` is logged). With `Settings.min_replicas`, it returns once
        that many replicas hold the event too, and sends it again while they do not (for as long
        as a lost connection). Raises `SessionEndedError`, `PayloadTooLargeError`,
        `InvalidSessionIdError`, `DeadLetterGoneError`, `CommandRefusedError`, and
        `ConnectionFailedError` once retrying gives up. Concurrent publishes to one session
        from one `Bus` go one after another, in the order they were made.
        """
        check_session_id(session)
        lock = self._publishing.get(session)
        if lock is None:
            lock = self._publishing[session] = anyio.Lock()
        try:
            async with lock:
                return await self._publish(session, payload, final, extra, dead_letter)
        finally:
            # Not while another holds it: a release hands the lock to the next waiter, who
            # then no longer counts as waiting.
            if (
                not lock.locked()
                and not lock.statistics().tasks_waiting
                and (self._publishing.get(session) is lock)
            ):
                del self._publishing[session]

    async def _publish(
        self,
        session: str,
        payload: Payload,
        final: bool,
        extra: Mapping[str, str] | None,
        dead_letter: str | None,
    ) -> Published:
        name, data = self._encode(session, payload)
        # A session's groups are made at its first event: for that one, the registry as it
        # is now, not as it was up to SERVICES_TTL ago.
        first = session not in self._last_seq
        groups = [s.name for s in await self.services(fresh=first)]
        p = self.keys.partition(session)
        args: list[scripts.Arg] = [
            self.keys.tag(p),
            session,
            name,
            data,
            int(final),
            int(self.settings.retention_seconds * 1000),
            secrets.token_hex(8),  # the same in every retry: no second append
            self._last_seq.get(session, 0),
            dead_letter or "",
            len(groups),
            *groups,
            *_flat(extra),
        ]
        keys = [self.keys.session(session)]
        append = self._script(scripts.PUBLISH, keys, args)
        try:
            seq, entry_id, restored = await call(
                "publish", append, self.settings, session, expected=("ENDED", "NODEADLETTER")
            )
        except ResponseError as exc:
            if str(exc).startswith("NODEADLETTER"):
                raise DeadLetterGoneError(session, self.keys.dead(p), str(dead_letter)) from None
            raise SessionEndedError(session, keys[0]) from None
        if restored:
            log.warning("session_counter_restored", session=session, seq=seq)
        self._remember(session, None if final else int(seq))
        return Published(int(seq), entry_id.decode())

    def _script(
        self, script: scripts.Script, keys: list[str], args: list[scripts.Arg]
    ) -> Callable[[], Awaitable[Any]]:
        """A call of `script`, on the publisher's connection if this bus has one."""
        if self._publisher is None:
            if self.settings.min_replicas:
                raise ConfigError("min_replicas needs a Bus opened with Bus.connect")
            return partial(script, self.redis, keys, args)
        return partial(self._publisher.call, script, keys, args)

    def _remember(self, session: str, seq: int | None) -> None:
        """Keep `seq` as the session's last published one, unless a concurrent publish's was
        later (None: it ended, forget it)."""
        before = self._last_seq.pop(session, 0)  # re-inserted last: the oldest come first
        if seq is None:
            return
        self._last_seq[session] = max(seq, before)
        if len(self._last_seq) > REMEMBERED_SESSIONS:
            del self._last_seq[next(iter(self._last_seq))]

    async def send(
        self,
        session: str,
        payload: Payload,
        *,
        dedupe: str | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> Published | None:
        """Write a command or reply to the session's bot inbox.

        With `dedupe`, a second write with the same key is dropped and returns None: a handler
        redelivered after a crash sends its command once. Connection failures are retried as for
        `publish`; a retry whose first try was written returns that write. Raises
        `NoSuchSessionError`, `ConnectionFailedError`.
        """
        return await self._send(session, payload, dedupe, extra)

    async def _send(
        self,
        session: str,
        payload: Payload,
        dedupe: str | None,
        extra: Mapping[str, str] | None,
        lease: tuple[str, str] | None = None,
    ) -> Published | None:
        """`send`; with `lease` (its key and the token a handler's consumer holds), written
        only while that token holds the lease: else ``ResponseError('FENCED …')``."""
        check_session_id(session)
        name, data = self._encode(session, payload)
        keys = [self.keys.inbox(session), self.keys.meta(session), self.keys.sent(session)]
        token = ""
        if lease is not None:
            keys.append(lease[0])
            token = lease[1]
        call_id = secrets.token_hex(8)  # the same in every retry of this call
        dedupe = dedupe or f"send/{call_id}"
        args: list[scripts.Arg] = [name, data, dedupe, call_id, token, *_flat(extra)]
        write = self._script(scripts.SEND, keys, args)
        expected = ("NOSESSION", "FENCED")
        try:
            result = await call("send", write, self.settings, session, expected=expected)
        except ResponseError as exc:
            if str(exc).startswith("FENCED"):
                raise
            raise NoSuchSessionError(session) from None
        return None if result is None else Published(int(result[0]), result[1].decode())

    async def read_state(self, session: str) -> dict[str, bytes]:
        """Every field of the session's state hash (see `Keys.state`)."""
        read = partial(self.redis.hgetall, self.keys.state(check_session_id(session)))
        raw: Any = await call("read_state", read, self.settings, session)
        return {k.decode(): v for k, v in raw.items()}

    async def write_state(self, session: str, fields: Mapping[str, str | bytes]) -> None:
        """Set application fields of the session's state (last writer wins per field).
        Raises `NoSuchSessionError`, and `TypeError` for a name or value that is not text."""
        if not fields:
            return
        for name, value in fields.items():
            if not isinstance(name, str) or not isinstance(value, str | bytes):
                raise TypeError(f"state field {name!r}: names are str, values str or bytes")
        keys = [self.keys.state(check_session_id(session)), self.keys.meta(session)]
        args = [x for kv in fields.items() for x in kv]
        write = partial(scripts.WRITE_STATE, self.redis, keys, args)
        try:
            await call("write_state", write, self.settings, session, expected=("NOSESSION",))
        except ResponseError:
            raise NoSuchSessionError(session) from None

    async def resume(
        self, session: str, group: str, *, drop: bool = False, dead_letter: str | None = None
    ) -> str | None:
        """Resume a session that `group` paused on a dead letter (policy ``pause``).

        The entry is retried with a fresh delivery count, or with `drop` acknowledged unhandled.
        `dead_letter` is the id of its dead letter (in `Keys.dead`), removed in the same step.
        Returns its entry id, or None if the session was not paused. A retry after a lost reply
        is known as the same call: it returns the entry the first attempt resumed.
        """
        p = self.keys.partition(check_session_id(session))
        keys = [
            self.keys.paused(p, group),
            self.keys.session(session),
            self.keys.meta(session),
            self.keys.dead(p),
        ]
        args: list[scripts.Arg] = [
            session,
            group,
            Keys.consumer(p),
            int(drop),
            self.keys.wake(p),
            secrets.token_hex(8),  # the same in every retry of this call
            dead_letter or "",
        ]
        resume = partial(scripts.RESUME, self.redis, keys, args)
        entry = await call("resume", resume, self.settings, session)
        return None if entry is None else str(entry.decode())

    async def end_session(self, session: str, *, reason: str = "ended by an operator") -> str:
        """Mark `session` ended without publishing an event: for a session whose bot went away
        without a ``final`` publish, which would otherwise stay live, its keys kept for good.
        It takes no new event, and its keys expire `retention_seconds` after every group has
        handled all of it. Returns ``"retired"`` (every group was done: the keys expire from
        now), ``"ending"`` (it retires once its groups are done), ``"ended"`` (it had ended
        before: nothing changed) or ``"unknown"`` (no such session)."""
        p = self.keys.partition(check_session_id(session))
        args: list[scripts.Arg] = [
            self.keys.tag(p),
            session,
            int(self.settings.retention_seconds * 1000),
            reason,
            secrets.token_hex(8),  # a retry after a lost reply is known as the same request
        ]
        end = partial(scripts.END, self.redis, [self.keys.session(session)], args)
        outcome: Any = await call("end_session", end, self.settings, session)
        return str(outcome.decode())

    async def check_partitions(self, *, record: bool = False) -> None:
        """Raise `ConfigError` if the deployment's partition count (`Keys.deployment`) is not
        ours: with another, sessions map to other keys, and the events published under them
        would go unhandled. With `record` (a worker's start), ours is recorded if none is."""
        key, ours = self.keys.deployment(), self.settings.partitions

        async def read() -> Any:
            if record:
                await self.redis.hsetnx(key, "partitions", ours)
            return await self.redis.hget(key, "partitions")

        recorded = await call("checking the partitions", read, self.settings)
        if recorded is not None and int(recorded) != ours:
            raise ConfigError(
                f"partitions is {ours}, but the deployment of prefix {self.settings.prefix!r} "
                f"has {int(recorded)} ({key}): every client and worker of a deployment must "
                "use the same (FLOWBUS_PARTITIONS, --partitions)"
            )

    async def services(self, *, fresh: bool = False) -> list[ServiceInfo]:
        """Services registered in this deployment, sorted by name (cached for `SERVICES_TTL`
        seconds unless `fresh`). Connection failures are retried as for `publish`."""
        fetched, services = self._services
        if fresh or time.monotonic() - fetched > SERVICES_TTL:
            read = partial(self.redis.hgetall, self.keys.services())
            raw: Any = await call("reading the services", read, self.settings)
            services = sorted(map(_service_info, raw.items()), key=lambda s: s.name)
            self._services = (time.monotonic(), services)
        return services

    async def register_service(
        self, info: ServiceInfo, *, replace: bool = True, retry: bool = True
    ) -> bool:
        """Record a service so that new sessions get its consumer group from their first event;
        without `replace`, only if it is not recorded (a worker's check that the registry still
        knows its service, say after a server restarted without its data). True if written.
        With `retry=False` it is one attempt: a lost connection or a refusal raises redis-py's
        own error, for a caller with a retry loop of its own."""
        key, value = self.keys.services(), msgspec.json.encode(info)
        write = partial(self.redis.hset if replace else self.redis.hsetnx, key, info.name, value)
        written = await call("register_service", write, self.settings) if retry else await write()
        if not written and not replace:
            return False
        self._services = (float("-inf"), [])
        return True

    async def history(self, session: str, *, max_data: int | None = None) -> list[Entry]:
        """The session's events so far, in order (entries that do not parse are skipped)."""
        read = partial(self.redis.xrange, self.keys.session(check_session_id(session)))
        raw: Any = await call("history", read, self.settings, session)
        entries = []
        for entry_id, fields in raw:
            try:
                entries.append(Entry.parse(entry_id.decode(), fields, max_data=max_data or 1 << 62))
            except DecodeError:
                continue
        return entries

    @asynccontextmanager
    async def inbox(self, session: str, codec: Codec, *, after: str = "0") -> AsyncIterator[Inbox]:
        """A reader of the session's inbox, on a connection of its own (reads block). `after`
        is an entry id; ``"$"``: what is written from now on (resolved before this returns)."""
        check_session_id(session)
        if after == "$":
            last = partial(self.redis.xrevrange, self.keys.inbox(session), count=1)
            newest: Any = await call("reading the inbox", last, self.settings, session)
            after = newest[0][0].decode() if newest else "0"
        client = make_client(self.settings, block_seconds=Inbox.BLOCK_SECONDS)
        try:
            yield Inbox(client, session, self.keys.inbox(session), codec, after, self.settings)
        finally:
            await close(client)


class Inbox:
    """Reads one session's inbox in order. Undecodable entries are skipped and listed in
    `rejected` with the reason. Iterate it (``async for message in inbox``) to wait for each
    message in turn, or call `read`."""

    BLOCK_SECONDS = 5.0

    def __init__(
        self, redis: Redis, session: str, key: str, codec: Codec, after: str, settings: Settings
    ) -> None:
        self.redis, self.session, self.key, self.codec = redis, session, key, codec
        self.last_id, self.settings = after, settings
        self.max_data = settings.max_payload_bytes
        self.rejected: list[tuple[str, str]] = []
        # Read by an iteration but not returned yet: the next iteration (or read) starts there.
        self._unreturned: deque[Message] = deque()

    async def read(self, wait: float) -> list[Message]:
        """Messages after the last one read, waiting up to `wait` seconds for the first.
        Connection failures are retried as for `Bus.publish`."""
        if self._unreturned:
            messages = list(self._unreturned)
            self._unreturned.clear()
            return messages
        block = max(1, int(min(wait, self.BLOCK_SECONDS) * 1000))
        read = partial(self.redis.xread, {self.key: self.last_id}, count=100, block=block)
        reply: Any = await call("reading the inbox", read, self.settings, self.session)
        messages = []
        for _key, entries in reply or ():
            for raw_id, fields in entries:
                self.last_id = raw_id.decode()
                try:
                    entry = Entry.parse(self.last_id, fields, max_data=self.max_data)
                    payload = self.codec.decode(entry.type, entry.data)
                except DecodeError as exc:
                    self.rejected.append((self.last_id, exc.reason))
                    continue
                messages.append(
                    Message(entry.id, entry.type, entry.seq, entry.ts, payload, entry.extra)
                )
        return messages

    async def __aiter__(self) -> AsyncIterator[Message]:
        while True:
            if not self._unreturned:
                self._unreturned.extend(await self.read(self.BLOCK_SECONDS))
            while self._unreturned:  # an iteration that stops leaves the rest to the next
                yield self._unreturned.popleft()


def _service_info(item: tuple[bytes, bytes]) -> ServiceInfo:
    """A registry entry; one that does not decode (written by hand, say) still names its
    service, so new sessions keep getting the service's group."""
    name, value = item
    try:
        return msgspec.json.decode(value, type=ServiceInfo)
    except msgspec.DecodeError as exc:  # a ValidationError too
        log.error("service_entry_invalid", service=name.decode(errors="replace"), error=str(exc))
        return ServiceInfo(name.decode(errors="replace"))


def _flat(extra: Mapping[str, str] | None) -> Sequence[str]:
    """`extra` as the entry's field-value list; `InvalidExtraError` for a field the envelope
    does not carry (one of its own would be overwritten, another one dropped on reading)."""
    flat: list[str] = []
    for field, value in (extra or {}).items():
        if field not in OPTIONAL_FIELDS:
            carried = ", ".join(OPTIONAL_FIELDS)
            raise InvalidExtraError(field, f"the envelope carries only {carried}")
        if not isinstance(value, str):
            raise InvalidExtraError(field, f"its value must be a string, not {value!r}")
        if len(value.encode()) > MAX_EXTRA_BYTES:
            size = len(value.encode())
            raise InvalidExtraError(
                field, f"its value is {size} bytes; the limit is {MAX_EXTRA_BYTES}"
            )
        flat += (field, value)
    return flat
