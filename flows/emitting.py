"""Emitting catalog events from the bot, fire-and-forget or sync."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import structlog

from bus import Message, encode

from .bot import BotSession
from .calling import is_seconds
from .catalog import Emitter, Event, EventSpec
from .errors import EventError
from .handlers import declare, find_spec
from .protocol import HandlerOutcome

log = structlog.get_logger("flowbus.events")


@dataclass(frozen=True, slots=True)
class SyncOutcome:
    """What the services subscribed to a sync event said: each one's handler errors (empty when
    all succeeded), and the services that had not finished when the wait timed out. Not
    `published` if the server did not confirm the publish in time: it did not answer the
    look-up of the subscribed services (the event was not sent), or the publish itself (it
    may or may not have reached the server)."""

    event: str
    errors: dict[str, list[str]]
    timed_out: list[str]
    published: bool = True

    @property
    def ok(self) -> bool:
        return self.published and not self.timed_out and not any(self.errors.values())


class Events:
    """The bot side of event handling for one session.

    ``await events.emit(Emitter("transport.daily", "daily"), "on_client_connected", client)``
    publishes the event and returns at once. A sync event (``on_before_leave``…) waits, for at
    most `sync_timeout` seconds in all (the server out of reach included), until every service
    subscribed to it has run its handlers, and returns a `SyncOutcome`. `sync_timeout` is a
    finite number of seconds above 0, else `ValueError`.
    """

    def __init__(
        self, bot: BotSession, *, sync_timeout: float = 5.0, events: Iterable[EventSpec] = ()
    ) -> None:
        if not is_seconds(sync_timeout):
            # (0 or less: no sync event was ever published; NaN failed each emit of one, and
            # an infinite one let a stuck service hold the bot for ever)
            raise ValueError(f"sync_timeout is a number of seconds above 0, not {sync_timeout!r}")
        self.bot, self.sync_timeout = bot, sync_timeout
        self._custom = {spec.name: spec for spec in events}

    def declare_event(
        self,
        name: str,
        payload: type[Event] | None = None,
        *,
        sync: bool = False,
        emitters: Iterable[str] = (),
    ) -> EventSpec:
        """Declare a custom event, with the same arguments as in the handling service."""
        spec = self._custom[name] = declare(name, payload, sync=sync, emitters=emitters)
        return spec

    async def emit(
        self, emitter: Emitter, name: str, /, *args: Any, **kwargs: Any
    ) -> SyncOutcome | None:
        """Publish event `name` from `emitter` with the handler arguments `args`/`kwargs`
        (`emitter` and `name` by position, so that an event's own argument may be called so).

        Returns None for a default event, a `SyncOutcome` for a sync one (sync from this
        emitter's kind: Daily's own ``on_error`` is not, a frame processor's is; Vonage's
        ``on_client_connected`` is, the other transports' is not). Raises
        `UnknownEventError`, or `EventError` for a name that is not a string or arguments that
        do not fit the event.
        """
        spec = find_spec(name, self._custom)
        if not spec.emitted_by(emitter.kind):
            raise EventError(f"{emitter.kind!r} does not emit {name!r}")
        payload = _payload(spec, emitter, args, kwargs)
        if not spec.sync_for(emitter.kind):
            await self.bot.publish(payload)
            return None
        deadline = anyio.current_time() + self.sync_timeout
        services: list[str] | None = None
        with anyio.move_on_after(self.sync_timeout):
            services = [
                s.name
                for s in await self.bot.bus.services(fresh=True)
                if s.subscribes and name in s.subscribes
            ]

        wanted = set(services or ())

        def all_replied(replies: list[Message]) -> bool:
            return wanted <= {_outcome(r).service for r in replies}

        replies: list[Message] = []
        sent = anyio.Event()
        if services is not None:  # else the look-up was cut short: nothing is sent
            wait = max(0.0, deadline - anyio.current_time())
            replies = await self.bot.request(payload, done_when=all_replied, wait=wait, sent=sent)
        errors = {o.service: o.errors for o in map(_outcome, replies)}
        timed_out = sorted(wanted - errors.keys())
        outcome = SyncOutcome(name, errors, timed_out, published=sent.is_set())
        if outcome.timed_out or not outcome.published:
            log.warning(
                "sync_event_timed_out" if outcome.published else "sync_event_not_published",
                session=self.bot.session,
                event_name=name,
                services=outcome.timed_out,
                timeout=self.sync_timeout,
            )
        return outcome


def _outcome(message: Message) -> HandlerOutcome:
    assert isinstance(message.payload, HandlerOutcome)
    return message.payload


def _payload(
    spec: EventSpec, emitter: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Event:
    if len(args) > len(spec.args):
        raise EventError(
            f"{spec.name!r} takes {len(spec.args)} arguments after the emitter: "
            f"{', '.join(spec.args) or 'none'}"
        )
    given = dict(zip(spec.args, args, strict=False))
    twice = sorted(given.keys() & kwargs.keys() | kwargs.keys() & {"emitter"})
    if twice:
        raise EventError(f"{spec.name!r} got more than one value for {', '.join(twice)}")
    fields = {**given, **kwargs, "emitter": emitter}
    try:  # validate here, where the caller can fix it, not in every handling service
        return msgspec.json.decode(encode(spec.payload(**fields)), type=spec.payload)
    except (TypeError, msgspec.ValidationError, msgspec.EncodeError) as exc:
        raise EventError(f"bad arguments for {spec.name!r}: {exc}") from None
