"""Pipecat-style event handlers, run in a service of their own.

::

    crm = EventService("crm")

    @crm.event_handler("on_client_connected")
    async def connected(transport, client):
        await transport.send(Say(text="Welcome back"))

``flowbus worker myapp:crm`` runs it; every replica shares the ``crm`` consumer group, and each
call's events reach the handlers in order.
"""

from __future__ import annotations

import difflib
import inspect
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import anyio
import msgspec
import structlog

from bus import Codec, Delivery, FencedError, Lifespan, Payload, Service

from .calling import invoke, is_seconds
from .catalog import CATALOG, Event, EventSpec, Info
from .errors import EventError, InvalidHandlerError, UnknownEventError
from .protocol import COMMANDS, FLOW_EVENTS, HandlerOutcome

log = structlog.get_logger("flowbus.handlers")

#: How long before the bus would cut an event short its handlers stop (at most a tenth of
#: its time).
RESERVE_SECONDS = 0.5

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Retry:
    """Opt-in retry of one handler: up to `attempts` runs, `backoff` seconds doubling between."""

    attempts: int = 3
    backoff: float = 0.1

    def __post_init__(self) -> None:
        whole = isinstance(self.attempts, int) and not isinstance(self.attempts, bool)
        # (an infinite backoff was taken and made no retry: the next run was never due in
        # the event's time; a string or None failed with a TypeError comparing it)
        if not (whole and self.attempts >= 1 and is_seconds(self.backoff, zero=True)):
            raise InvalidHandlerError(
                "Retry needs attempts of 1 or more and a backoff of 0 or more seconds, a "
                f"finite number, not {self}"
            )


@dataclass(frozen=True, slots=True)
class EmitterRef:
    """What a handler's first argument is: a read-only description of the object that emitted
    the event in the bot, and a way to send commands back to that session's bot."""

    kind: str
    name: str
    session: str
    seq: int
    deliveries: int
    _delivery: Delivery
    _handler: int = 0  # the handler's place among the event's
    _sends: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    async def send(self, command: Payload) -> bool:
        """Send `command` to the bot of this session: the n-th send of a handler's run once,
        even if the handler runs again (a retry, a redelivery of the event)."""
        delivery = self._delivery
        key = f"{delivery.group}/{delivery.entry_id}/{self._handler}/{next(self._sends)}"
        return await delivery.send(command, dedupe=key)


@dataclass(frozen=True, slots=True)
class _Registration:
    handler: Callable[..., Any]
    emitter: str | None
    retry: Retry | None
    #: How many of the event's arguments it takes after the emitter (None: all of them).
    takes: int | None = None
    #: Seconds one run of it may take (None: what is left of the event's time).
    timeout: float | None = None

    @property
    def name(self) -> str:
        return getattr(self.handler, "__qualname__", type(self.handler).__qualname__)


def _takes(handler: Callable[..., Any]) -> int | None:
    """How many arguments `handler` takes after the emitter, if it declares fewer than an
    event may carry (``on_connected(service)``: Pipecat passes nothing there, while the
    event's payload always holds its fields); None for ``*args`` or no signature."""
    try:
        params = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return max(0, len(positional) - 1)


def _cannot_take(handler: Callable[..., Any], spec: EventSpec) -> str:
    """Why `handler` cannot be called as its event's handlers are (the emitter, then the
    event's arguments, as many as it has positional parameters for: see `_takes`), or "" if
    it can, or has no signature to read."""
    try:
        params = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError):  # (a builtin, say): it fails when called, if it does
        return ""
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    variadic = any(p.kind is p.VAR_POSITIONAL for p in params)
    required = [p.name for p in positional if p.default is p.empty]
    keyword_only = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    if not positional and not variadic:
        return "it has no positional parameter for the emitter"
    if len(required) > 1 + len(spec.args):
        return f"it requires {len(required)} positional arguments ({', '.join(required)})"
    if keyword_only:
        # (nothing is passed by keyword; a functools.partial given a keyword argument makes
        # the parameters after it keyword-only)
        return f"it requires keyword-only {', '.join(keyword_only)}, which nothing passes"
    return ""


def declare(
    name: str,
    payload: type[Event] | None = None,
    *,
    sync: bool = False,
    emitters: Iterable[str] = (),
) -> EventSpec:
    """A custom event, to declare on both sides (service and bot) with the same arguments.

    Without `payload` the event carries one argument, ``data`` (a JSON object). With
    `emitters`, the kinds of object that emit it: another emitting it, or a handler filtered
    on another (``emitter=``), is refused, as for catalog events; without, any kind may.
    """
    if not isinstance(name, str) or not name:
        raise InvalidHandlerError(f"a custom event's name is a non-empty string, not {name!r}")
    kinds = frozenset(emitters)
    if isinstance(emitters, str) or not all(isinstance(k, str) and k for k in kinds):
        raise InvalidHandlerError(
            f"the emitters of {name!r} must be kinds' names, not {emitters!r}"
        )
    if name in CATALOG:
        raise InvalidHandlerError(f"{name!r} is a catalog event; custom events need new names")
    if name in FLOW_EVENTS or name in COMMANDS:
        raise InvalidHandlerError(f"{name!r} is one of flowbus's own messages; choose another")
    if payload is None:
        generic: Any = msgspec.defstruct(
            "CustomEvent",
            [("data", Info, msgspec.field(default_factory=dict))],
            bases=(Event,),
            tag=name,
            kw_only=True,
        )
        return EventSpec(name, generic, kinds, sync)
    if not (isinstance(payload, type) and issubclass(payload, Event)):
        # (a plain Payload has no `emitter`: every emit of it failed with "Unexpected keyword
        # argument 'emitter'"; anything else, with an AttributeError here)
        raise InvalidHandlerError(
            f"the payload of {name!r} must be a subclass of flows.Event, which carries the "
            f"emitter (class X(Event, tag={name!r}): ...), not {payload!r}"
        )
    if payload.__struct_config__.tag != name:
        raise InvalidHandlerError(f"the payload of {name!r} must have tag={name!r}")
    return EventSpec(name, payload, kinds, sync)


def _not_a_name(name: object, handler: object = None) -> str:
    """What to say of an event name that is not a string (`handler`: what came with it)."""
    # (difflib's close matches failed on it: "'NoneType' object is not iterable", or
    # "unhashable type: 'list'" in the look-up before)
    swapped = isinstance(handler, str) and callable(name)
    hint = f"; the name comes first: add_event_handler({handler!r}, handler)" if swapped else ""
    return f"an event's name is a string such as 'on_client_connected', not {name!r}{hint}"


def find_spec(name: str, custom: dict[str, EventSpec]) -> EventSpec:
    """The spec of `name`, or `UnknownEventError` with the closest known names (`EventError`
    for a name that is not a string)."""
    if not isinstance(name, str):
        raise EventError(_not_a_name(name))
    spec = custom.get(name) or CATALOG.get(name)
    if spec is None:
        known = sorted({*CATALOG, *custom})
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        raise UnknownEventError(name, close, [] if close else known)
    return spec


class EventService:
    """A service of event handlers with Pipecat's registration API.

    Handlers run in registration order, each after the previous one finished; a handler's
    exception is logged with the session, event and handler and does not stop the others.
    `def` handlers run in a worker thread so that blocking code cannot stall other sessions.

    An event's handlers share the bus's `handler_timeout_seconds`: a handler still running
    shortly before it ends (`RESERVE_SECONDS`, at most a tenth of it) is cut short and counts
    as failed, and the handlers after it are not run (each logged, and in a sync event's
    outcome), so the event is not delivered again for one slow handler. A handler given a
    `timeout` of its own is cut short after that long, and the others go on; a retry that
    would end past the event's time is not made. A `def` handler runs in a thread, which
    cannot be stopped: past its time it counts as timed out once it returns.

    `lifespan` holds what the handlers use while a worker runs (`bus.Service.lifespan`).
    """

    def __init__(
        self,
        name: str,
        *,
        events: Iterable[EventSpec] = (),
        lifespan: Lifespan | None = None,
    ) -> None:
        self.name = name
        self.lifespan = lifespan
        self._custom = {spec.name: spec for spec in events}
        self._handlers: dict[str, list[_Registration]] = {}
        self._started = False  # `as_service()` was called: what it subscribes to is fixed

    def _check_open(self, what: str) -> None:
        if self._started:
            raise InvalidHandlerError(
                f"{what} after service {self.name!r} was started (as_service()): its events "
                "are fixed by then, so register every handler and event before"
            )

    def declare_event(
        self,
        name: str,
        payload: type[Event] | None = None,
        *,
        sync: bool = False,
        emitters: Iterable[str] = (),
    ) -> EventSpec:
        """Declare a custom event this service handles (see `declare`)."""
        self._check_open(f"declaring {name!r}")
        spec = self._custom[name] = declare(name, payload, sync=sync, emitters=emitters)
        return spec

    def event_handler(
        self,
        name: str,
        *,
        emitter: str | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
    ) -> Callable[[F], F]:
        """Decorator form of `add_event_handler`."""
        if not isinstance(name, str):  # ``@event_handler`` without the event's name
            raise InvalidHandlerError("@x.event_handler takes the event's name")

        def register(handler: F) -> F:
            self.add_event_handler(name, handler, emitter=emitter, retry=retry, timeout=timeout)
            return handler

        return register

    def add_event_handler(
        self,
        name: str,
        handler: Callable[..., Any],
        *,
        emitter: str | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
    ) -> None:
        """Run `handler(emitter, *args)` for every `name` event (without the arguments it has
        no positional parameter for: Pipecat passes some events fewer than their payload
        holds); with `emitter`, only for events from emitters of that kind; with `timeout`, a
        run of it still going after that many seconds counts as failed (see the class
        docstring). Raises `UnknownEventError` for a name that is not in the catalog nor
        declared, `InvalidHandlerError` for a name that is not a string, a handler that is
        not callable or cannot be called so (no positional parameter for the emitter, more
        required ones than the emitter and the event's arguments, a required keyword-only
        one), a bad emitter kind, retry or timeout, or after `as_service()`."""
        if not isinstance(name, str):
            raise InvalidHandlerError(_not_a_name(name, handler))
        self._check_open(f"adding a handler for {name!r}")
        spec = find_spec(name, self._custom)
        if not callable(handler):
            raise InvalidHandlerError(f"handler for {name!r} is not callable: {handler!r}")
        if timeout is not None and not is_seconds(timeout):
            raise InvalidHandlerError(
                f"the timeout of a handler for {name!r} must be a positive number of seconds, "
                f"not {timeout!r}"
            )
        if retry is not None and not isinstance(retry, Retry):
            # (it failed the whole event instead, which the bus then ran again, every other
            # handler of it included)
            raise InvalidHandlerError(
                f"the retry of a handler for {name!r} is a Retry, e.g. "
                f"retry=Retry(attempts=3), not {retry!r}"
            )
        if emitter is not None and not spec.emitted_by(emitter):
            sources = ", ".join(sorted(spec.emitters))
            raise InvalidHandlerError(f"{emitter!r} never emits {name!r}; it comes from {sources}")
        registration = _Registration(handler, emitter, retry, _takes(handler), timeout)
        why = _cannot_take(handler, spec)
        if why:  # (it was taken, and failed with a TypeError at every event)
            called = ", ".join(("emitter", *spec.args))
            raise InvalidHandlerError(
                f"handler {registration.name} for {name!r} cannot be called as "
                f"handler({called}) nor with fewer of the event's arguments: {why}"
            )
        self._handlers.setdefault(name, []).append(registration)

    def remove_event_handler(self, name: str, handler: Callable[..., Any]) -> None:
        """Remove the first registration of `handler` for `name`, as Pipecat does (nothing if
        it has none). Raises `UnknownEventError` for a name neither in the catalog nor
        declared, `InvalidHandlerError` for one that is not a string or after `as_service()`."""
        if not isinstance(name, str):
            raise InvalidHandlerError(_not_a_name(name, handler))
        if self._started:
            # In Pipecat a removal concerns one call's object; here it would concern every
            # session this replica handles, and no other replica's.
            raise InvalidHandlerError(
                f"removing a handler for {name!r} after service {self.name!r} was started "
                "(as_service()) would stop it for every session of this worker and for none "
                "of the others; to act once per session, check emitter.session in the handler"
            )
        find_spec(name, self._custom)
        registrations = self._handlers.get(name, [])
        for i, registration in enumerate(registrations):
            if registration.handler == handler:
                del registrations[i]
                return

    @property
    def subscribes(self) -> frozenset[str]:
        return frozenset(name for name, regs in self._handlers.items() if regs)

    def as_service(self) -> Service:
        """The bus service that runs these handlers (what ``flowbus worker`` runs). Handlers
        and events cannot be added after it (`InvalidHandlerError`): it subscribes to the
        events that have handlers now; one with none is refused, as a service that would
        acknowledge every event unseen (an app whose handlers' module was not imported)."""
        if not self.subscribes:
            raise InvalidHandlerError(
                f"service {self.name!r} has no event handlers: register some "
                "(@service.event_handler(...)) before it is started"
            )
        self._started = True
        specs = [*CATALOG.values(), *self._custom.values()]
        codec = Codec(spec.payload for spec in specs)
        return Service(
            self.name, self._handle, codec, subscribes=self.subscribes, lifespan=self.lifespan
        )

    async def _handle(self, delivery: Delivery) -> None:
        event = delivery.payload
        assert isinstance(event, Event)
        spec = find_spec(delivery.type, self._custom)
        ref = EmitterRef(
            event.emitter.kind,
            event.emitter.name,
            delivery.session,
            delivery.seq,
            delivery.deliveries,
            delivery,
        )
        args = [getattr(event, name) for name in spec.args]
        # The handlers stop a little before the bus would cut the event short, so that the
        # event counts as handled (with errors) instead of running them all again.
        left = delivery.deadline - time.monotonic()
        until = delivery.deadline - min(RESERVE_SECONDS, left / 10)
        errors = []
        for i, registration in enumerate(list(self._handlers.get(delivery.type, ()))):
            if registration.emitter in (None, event.emitter.kind):
                error = await self._run(registration, replace(ref, _handler=i), args, until)
                if error:
                    errors.append(f"{registration.name}: {error}")
        corr = delivery.extra.get("corr")
        if corr:  # the bot waits for the outcome (even if this service thinks it need not)
            outcome = HandlerOutcome(corr=corr, service=self.name, errors=errors)
            # A key of its own: the default one counts the handlers' sends, which a redelivery
            # may make fewer or more of, and the outcome would then be sent twice.
            key = f"{delivery.group}/{delivery.entry_id}/outcome"
            await delivery.send(outcome, dedupe=key, extra={"corr": corr})

    async def _run(
        self, registration: _Registration, ref: EmitterRef, args: list[Any], until: float
    ) -> str:
        """Run one handler (with its retries), each run cut short at its `timeout` or at
        `until` (monotonic), whichever is first; return its error, or "" if it succeeded."""
        retry = registration.retry or Retry(attempts=1)
        error = "not run: the event's time ran out"
        with structlog.contextvars.bound_contextvars(handler=registration.name):
            for attempt in range(1, retry.attempts + 1):
                left = until - time.monotonic()
                if left <= 0:  # no time for (another) run
                    break
                budget = min(registration.timeout or math.inf, left)
                failure: Exception | None = None
                try:
                    # A worker that stalled past its lease (a pause, a frozen VM) starts it
                    # only once the lease is renewed: the partition may be another's now,
                    # which may have run it already.
                    await ref._delivery.ensure_owned()
                    run = replace(ref, _sends=itertools.count(1))  # its sends, numbered anew
                    with anyio.move_on_after(budget) as scope:
                        await invoke(registration.handler, run, *args[: registration.takes])
                    if not scope.cancel_called:  # (a thread returns late, not cancelled)
                        return ""
                    error = f"timed out after {budget:.3g}s"
                except FencedError:  # its partition is another worker's now, and so is the
                    raise  # event: not a failure of the handler's
                except Exception as exc:
                    error, failure = f"{type(exc).__name__}: {exc}", exc
                delay = retry.backoff * 2 ** (attempt - 1)
                if attempt < retry.attempts and time.monotonic() + delay < until:
                    log.warning("event_handler_retried", error=error, attempt=attempt)
                    await anyio.sleep(delay)
                    continue
                log.error("event_handler_failed", error=error, attempts=attempt, exc_info=failure)
                return error
            log.error("event_handler_failed", error=error, attempts=attempt - 1)
            return error
        raise AssertionError("unreachable")
