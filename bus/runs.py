"""A partition's session runs: each session's handling by one worker (`Run`), its fenced steps
and its handlers' access to the session (`Context`). The `Consumer` drives them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup
from redis.exceptions import ResponseError

from . import scripts
from .connection import TRANSIENT, backoff, call
from .envelope import Payload
from .errors import FencedError, NoSuchSessionError
from .scripts import Arg
from .steps import Step, StepBatcher

if TYPE_CHECKING:
    from .consumer import Consumer


@dataclass(frozen=True, slots=True)
class Settle:
    """How to settle an entry that was not simply handled: dead-letter it, then go on ('skip')
    or pause the session ('pause'); `dead_letter` is (deliveries, error, field, value...)."""

    verdict: str = ""
    dead_letter: tuple[Arg, ...] = ()


ACK = Settle()  # handled (or not this service's business): acknowledge it


class Runs:
    """The session runs of one partition, each in a plain asyncio task: anyio's `start_soon`
    cost a worker about a tenth of its CPU at 20 events per session (CHANGELOG). They are kept
    as structured as a task group's: the first error calls `on_error` (which cancels the
    partition) and is kept in `error` for the partition to raise; `close()` cancels the runs
    left through their own cancel scopes (`Run.close`), so shields inside handlers and the
    bus hold as they would in a task group, and waits for them."""

    def __init__(self, on_error: Callable[[], None]) -> None:
        self._runs: dict[asyncio.Task[None], Run] = {}
        self._on_error = on_error
        self._closing = False
        self.error: BaseException | None = None

    def spawn(self, run: Run, work: Coroutine[Any, Any, None]) -> None:
        if self._closing:  # a hint that came as the partition closes: the run ends at once
            run.close()
        task = asyncio.get_running_loop().create_task(work)
        self._runs[task] = run
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        del self._runs[task]
        if not task.cancelled() and task.exception() is not None and self.error is None:
            self.error = task.exception()
            self._on_error()

    async def join(self) -> None:
        """Wait until every run has ended."""
        while self._runs:
            await asyncio.wait(list(self._runs))

    async def close(self) -> list[Run]:
        """Cancel the runs left, and wait until they have ended; the runs it cancelled."""
        with anyio.CancelScope(shield=True):
            self._closing = True
            closed = list(self._runs.values())
            for run in closed:
                run.close()
            await self.join()
        return closed


@dataclass(slots=True, eq=False)
class Partition:
    """A partition this worker holds: its lease, the lane its steps go by, its sessions' runs,
    and how long the lease is surely still ours."""

    number: int
    token: str
    steps: StepBatcher  # the lane its sessions' steps go by
    lease: str  # its lease's key
    reader: Callable[[str], tuple[Arg, ...]]  # a session stream's fenced read (`steps.reader`)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    tg: TaskGroup | None = None
    runs: Runs = field(init=False)  # its sessions' tasks
    sessions: dict[str, bool] = field(default_factory=dict)  # session -> new work since read
    subscribed: anyio.Event = field(default_factory=anyio.Event)  # its hints reach us
    draining: bool = False
    lost: bool = False
    drain: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    #: Until when (`time.monotonic()`) the lease is surely ours: the TTL from just before the
    #: request that took or last renewed it. No handler starts later than that.
    vouched_until: float = 0.0
    renewed: anyio.Event = field(default_factory=anyio.Event)  # set (and replaced) by `vouch`

    def __post_init__(self) -> None:
        self.runs = Runs(self.scope.cancel)

    def vouch(self, until: float) -> None:
        """The lease was renewed: it is ours until `until`."""
        self.vouched_until = until
        self.renewed.set()
        self.renewed = anyio.Event()

    async def vouched(self) -> None:
        """Wait until the lease is vouched for now (a lease found lost cancels the runs)."""
        while time.monotonic() >= self.vouched_until:
            await self.renewed.wait()


#: Fields a dead letter adds to the original entry's; an original field of the same name is
#: kept as ``orig.<name>``.
DEAD_LETTER_FIELDS = frozenset({b"session", b"group", b"entry", b"deliveries", b"error", b"policy"})


def original_fields(raw_fields: list[bytes] | None) -> tuple[bytes, ...]:
    """The original fields for a dead letter (none for an entry deleted from the stream)."""
    return tuple(
        b"orig." + f if i % 2 == 0 and f in DEAD_LETTER_FIELDS else f
        for i, f in enumerate(raw_fields or ())
    )


class Overran(Exception):
    """A handler returned after its run was cancelled for its timeout: the run starts over
    (outside the cancelled scope), acknowledging it first."""


class Run:
    """One session's handling by this worker: the batch it read, and its steps."""

    def __init__(self, consumer: Consumer, part: Partition, session: str) -> None:
        self.consumer, self.part, self.session = consumer, part, session
        self.stream = consumer.keys.session(session)
        self.reader = part.reader(self.stream)
        self.context = Context(consumer, part, session)
        self.scope: anyio.CancelScope | None = None  # around the handling, see `_watch_handlers`
        self.read = "p"  # the next read; the first replays what a previous owner left pending
        self.acks: list[bytes] = []  # settled by the next step...
        self.give: list[bytes] = []
        self.verdict: tuple[Arg, ...] = ()
        self.entries: list[Any] = []  # the last batch read, `done` of them handled
        self.done = 0
        self.started = -1  # the index in `entries` of the last entry whose handler started
        self.deliveries = 0  # of the next entry to handle
        self.resumed = False  # ...and whether `Bus.resume` retried it (its count started over)
        self.timed_out = False  # its handler was cancelled by `Consumer._watch_handlers`
        self.overran = False  # ...and returned all the same
        self.trace: Any = ...  # the traceparent in its log context (`...`: none)
        self.closing = False  # its partition closes: see `close`

    def close(self) -> None:
        """End this run: its partition is lost, or its drain ran out of time."""
        self.closing = True
        if self.scope is not None:
            self.scope.cancel()

    def then(self, settle: Settle | None) -> None:
        """After the entry at `done` was not simply handled: give back the rest of the batch,
        settle it (None: retry it) and go on from the pending list."""
        self.give += [e[0] for e in self.entries[self.done + 1 :]]
        self.read = "p"
        if settle is not None:
            self.verdict = (settle.verdict, self.entries[self.done][0], *settle.dead_letter)

    async def call(self, read: str, *, reads: bool = True) -> Any:
        """A step that settles (`acks`, `give`, `verdict`) and reads (`read`, see
        ``lua/step.lua``); its reply, once it came. Transient errors are retried. Without
        `reads`, a '>' step reads nothing: its reply is the script's (``[b"read"]`` or
        ``[b"idle"]``); a retry reads, as any 'p' step does."""
        part, acks, give, verdict = self.part, self.acks, self.give, self.verdict
        self.acks, self.give, self.verdict = [], [], ()
        for attempt in range(1, 1_000_000):
            reader = self.reader if reads or attempt > 1 else ()
            step = Step(self.stream, part.lease, part.token, acks, read, give, verdict, reader)
            try:
                reply: Any = await part.steps.submit(step)
                self.give += step.strays
                return reply
            except anyio.get_cancelled_exc_class():
                # Cut short (a drain out of time, say): what it was to settle is the run's
                # again, for its last step (`Consumer._settle_closed`); sent twice, it is the
                # same (an ack, a give-back and a dead letter are written once).
                self.acks, self.give = [*acks, *self.acks], [*give, *step.strays, *self.give]
                self.verdict = self.verdict or verdict
                raise
            except ResponseError as exc:
                if str(exc).startswith("FENCED"):
                    group, p = self.consumer.service.name, part.number
                    raise FencedError(group, p, self.stream) from None
                error: Exception = exc
            except TRANSIENT as exc:
                error = exc
            # Retrying is safe: an ack is idempotent, and the retry reads our pending head first
            # ('p'), so entries whose reply was lost are read again rather than skipped; those
            # read while the step failed go back first.
            give = [*give, *step.strays]
            self.consumer.stats.step_failures += 1
            self.consumer.log.warning(
                "step_failed", session=self.session, error=str(error), attempt=attempt
            )
            try:
                await anyio.sleep(backoff(attempt))
            except anyio.get_cancelled_exc_class():  # as above
                self.acks, self.give = [*acks, *self.acks], [*give, *self.give]
                self.verdict = self.verdict or verdict
                raise
            read = "p" if read else ""
        raise AssertionError("unreachable")


@dataclass(frozen=True, slots=True)
class Context:
    """A delivery's access to its session: inbox writes, and this group's fenced state."""

    consumer: Consumer
    part: Partition
    session: str

    async def send(self, payload: Payload, dedupe: str, extra: Mapping[str, str] | None) -> object:
        """As `Bus.send`, but fenced: a stale owner's command is refused (`FencedError`), so
        that one whose action ended after its partition moved tells the bot nothing the new
        owner does not."""
        bus, group, p = self.consumer.bus, self.consumer.service.name, self.part.number
        lease = (bus.keys.lease(p, group), self.part.token)
        try:
            return await bus._send(self.session, payload, dedupe, extra, lease)
        except ResponseError:  # FENCED (`_send` raises any other as its own error)
            raise FencedError(group, p, bus.keys.inbox(self.session)) from None

    async def load_state(self) -> bytes | None:
        bus, field = self.consumer.bus, f"group:{self.consumer.service.name}"
        read = partial(bus.redis.hget, bus.keys.state(self.session), field)
        data: Any = await call("load_state", read, bus.settings, self.session)
        return None if data is None else bytes(data)

    async def read_session_state(self) -> dict[str, bytes]:
        return await self.consumer.bus.read_state(self.session)

    async def write_session_state(self, fields: Mapping[str, str | bytes]) -> None:
        """As `Bus.write_state`, but fenced: a stale owner's write is refused (DESIGN)."""
        for name, value in fields.items():
            if not isinstance(name, str) or not isinstance(value, str | bytes):
                raise TypeError(f"state field {name!r}: names are str, values str or bytes")
        if fields:
            await self._write_fenced([x for kv in fields.items() for x in kv])

    async def save_state(self, data: bytes) -> None:
        await self._write_fenced([f"group:{self.consumer.service.name}", data])

    async def server_ms(self) -> int:
        bus = self.consumer.bus
        now = partial(scripts.NOW, bus.redis, [bus.keys.meta(self.session)], [])
        return int(await call("server_ms", now, bus.settings, self.session))

    async def ensure_owned(self) -> None:
        await self.part.vouched()

    async def _write_fenced(self, pairs: list[str | bytes]) -> None:
        bus, group, p = self.consumer.bus, self.consumer.service.name, self.part.number
        keys = [bus.keys.lease(p, group), bus.keys.state(self.session), bus.keys.meta(self.session)]
        write = partial(scripts.SAVE_STATE, bus.redis, keys, [self.part.token, *pairs])
        expected = ("FENCED", "NOSESSION")
        try:
            await call("save_state", write, bus.settings, self.session, expected=expected)
        except ResponseError as exc:
            if str(exc).startswith("NOSESSION"):
                raise NoSuchSessionError(self.session) from None
            raise FencedError(group, p, keys[1]) from None
