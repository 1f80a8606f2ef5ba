"""The bot's end of one session: publish its events, read its inbox, wait for replies."""

from __future__ import annotations

import math
import secrets
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from bus import Bus, Codec, Inbox, Message, Payload, Published

from .protocol import COMMANDS

log = structlog.get_logger("flowbus.bot")

ReplyCheck = Callable[[list[Message]], bool]


@dataclass(eq=False)
class _Waiter:
    done_when: ReplyCheck
    replies: list[Message] = field(default_factory=list)
    done: anyio.Event = field(default_factory=anyio.Event)


@contextmanager
def unwrapped() -> Iterator[None]:
    """Let the one error of a task group's exception group out as itself: what the body of a
    session raised (an `EventError`, say) reaches its caller as written, not in a group."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0]  # noqa: B904  # the group is its context
        raise


class BotSession:
    """One session seen from its bot process.

    Open it with ``async with BotSession.open(bus, "call-42") as bot:``. Replies to `request`
    (matched by their ``corr`` field) go to the waiting request; every other inbox message goes
    to `commands`, which the bot reads in order. With `traceparent` (W3C trace context), every
    event it publishes carries it, so a trace follows each event into the services.
    """

    def __init__(
        self,
        bus: Bus,
        session: str,
        commands: MemoryObjectSendStream[Message],
        *,
        traceparent: str | None = None,
    ) -> None:
        self.bus, self.session, self.traceparent = bus, session, traceparent
        self._commands = commands
        self._waiters: dict[str, _Waiter] = {}

    @classmethod
    @asynccontextmanager
    async def open(
        cls, bus: Bus, session: str, *, codec: Codec = COMMANDS, traceparent: str | None = None
    ) -> AsyncIterator[BotSession]:
        send, receive = anyio.create_memory_object_stream[Message](math.inf)
        bot = cls(bus, session, send, traceparent=traceparent)
        bot.commands = receive
        with send, receive, unwrapped():
            # Only what is sent from now on: a bot that starts over on its session is not
            # told again what its predecessor was.
            reader = bus.inbox(session, codec, after="$")
            async with reader as inbox, anyio.create_task_group() as tg:
                tg.start_soon(bot._route, inbox)
                try:
                    yield bot
                finally:
                    tg.cancel_scope.cancel()

    commands: MemoryObjectReceiveStream[Message]

    async def publish(
        self, payload: Payload, *, final: bool = False, extra: Mapping[str, str] | None = None
    ) -> Published:
        """Publish one event of this session (see `Bus.publish`)."""
        if self.traceparent and not (extra and "traceparent" in extra):
            extra = {**(extra or {}), "traceparent": self.traceparent}
        return await self.bus.publish(self.session, payload, final=final, extra=extra)

    async def request(
        self,
        payload: Payload,
        *,
        done_when: ReplyCheck,
        wait: float,
        sent: anyio.Event | None = None,
    ) -> list[Message]:
        """Publish `payload` asking for replies; return them once `done_when(replies)` holds
        or `wait` seconds have passed, whichever is first: the publish's retries (the server
        out of reach) count towards `wait`, and a publish cut short by it may or may not have
        reached the server (`sent` is set once the server confirmed it). Never raises for a
        timeout: the caller sees which replies are missing."""
        corr = secrets.token_hex(8)
        waiter = self._waiters[corr] = _Waiter(done_when)
        try:
            extra = {"reply_to": self.bus.keys.inbox(self.session), "corr": corr}
            with anyio.move_on_after(wait):
                await self.publish(payload, extra=extra)
                if sent is not None:
                    sent.set()
                if not done_when([]):  # else no reply is awaited (a sync event nobody handles)
                    await waiter.done.wait()
        finally:
            del self._waiters[corr]
        return waiter.replies

    async def _route(self, inbox: Inbox) -> None:
        async for message in inbox:
            waiter = self._waiters.get(message.extra.get("corr", ""))
            if waiter is None:
                await self._commands.send(message)
                continue
            waiter.replies.append(message)
            if waiter.done_when(waiter.replies):
                waiter.done.set()
