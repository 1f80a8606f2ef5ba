"""The handler API, in-process against the real server."""

from __future__ import annotations

import functools
import re
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import pytest
from structlog.testing import capture_logs

from bus import Bus, Consumer, Delivery, Payload
from flows import (
    CATALOG,
    COMMANDS,
    ActionService,
    BotSession,
    Emitter,
    EmitterRef,
    Event,
    EventError,
    Events,
    EventService,
    InvalidHandlerError,
    Retry,
    Say,
    UnknownEventError,
    declare,
)
from tests.conftest import make_settings
from tests.support import wait_for
from workers.deadletters import list_dead
from workers.server import LocalServer

pytestmark = pytest.mark.anyio
STT = Emitter("stt", "deepgram")
TTS = Emitter("tts", "cartesia")


@asynccontextmanager
async def serving(bus: Bus, service: EventService) -> AsyncIterator[None]:
    consumer = Consumer(bus, service.as_service())
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        yield
        consumer.stop()


class Inbox:
    """The part of a consumer a delivery's handler uses, for handlings run by hand: the bot
    inbox's dedupe (what it was sent, by key), and a lease never lost."""

    def __init__(self) -> None:
        self.sent: dict[str, Any] = {}

    async def send(self, payload: Payload, dedupe: str, extra: Any) -> object | None:
        if dedupe in self.sent:
            return None
        self.sent[dedupe] = payload
        return object()

    async def ensure_owned(self) -> None:
        pass


async def emit_all(bus: Bus, *emits: tuple[Emitter, str, tuple[Any, ...]]) -> None:
    async with BotSession.open(bus, "call-1") as bot:
        events = Events(bot)
        for emitter, name, args in emits:
            await events.emit(emitter, name, *args)


async def test_handlers_select_by_emitter_and_can_be_removed(bus: Bus) -> None:
    seen: list[str] = []
    service = EventService("svc")

    @service.event_handler("on_connected", emitter="stt")
    async def stt_up(emitter: EmitterRef, data: Any) -> None:
        seen.append(f"stt:{emitter.name}")

    async def any_up(emitter: EmitterRef, data: Any) -> None:
        seen.append(f"any:{emitter.kind}")

    service.add_event_handler("on_connected", any_up)
    service.add_event_handler("on_connected", any_up)  # twice: runs twice, as in Pipecat
    service.remove_event_handler("on_connected", any_up)
    with pytest.raises(InvalidHandlerError, match="never emits 'on_connected'"):
        service.add_event_handler("on_connected", any_up, emitter="rtvi")
    async with serving(bus, service):
        await emit_all(bus, (STT, "on_connected", ()), (TTS, "on_connected", ()))
        await wait_for(lambda: len(seen) == 3, what="three handlings")
    assert seen == ["stt:deepgram", "any:stt", "any:tts"]


async def test_def_handlers_run_in_a_thread_and_async_callables_are_awaited(bus: Bus) -> None:
    seen: list[str] = []
    loop_thread = threading.get_ident()
    service = EventService("svc")

    def blocking(emitter: EmitterRef, message: Any, sender: Any) -> None:
        seen.append("thread" if threading.get_ident() != loop_thread else "loop")

    class Notifier:
        async def __call__(self, emitter: EmitterRef, message: Any, sender: Any) -> None:
            await emitter.send(Say(text=f"got {message}"))
            seen.append("awaited")

    service.add_event_handler("on_app_message", blocking)
    service.add_event_handler("on_app_message", Notifier())
    async with serving(bus, service):
        await emit_all(bus, (Emitter("transport.daily"), "on_app_message", ({"a": 1}, "x")))
        await wait_for(lambda: len(seen) == 2, what="both handlers")
        async with bus.inbox("call-1", COMMANDS) as inbox:
            [message] = await inbox.read(wait=5)
    assert seen == ["thread", "awaited"]
    assert message.payload == Say(text="got {'a': 1}")


async def test_each_handler_numbers_its_own_sends_so_a_rerun_loses_none() -> None:
    """The n-th send of a handler's run goes once. A handler that sends less when the event
    comes again (it deduplicates by seq, say) took the next handler's numbers when they were
    counted over the whole event: a send that never went out was dropped as a repeat."""
    inbox = Inbox()
    seen: set[int] = set()
    service = EventService("svc")

    @service.event_handler("on_app_message")
    async def once_per_seq(emitter: EmitterRef, message: Any, sender: Any) -> None:
        if emitter.seq not in seen:
            seen.add(emitter.seq)
            await emitter.send(Say(text="first"))

    @service.event_handler("on_app_message")
    async def steady(emitter: EmitterRef, message: Any, sender: Any) -> None:
        if emitter.deliveries == 1:
            raise RuntimeError("cut short")  # as by the worker's crash, before it sent
        await emitter.send(Say(text="second"))

    handle = service.as_service().handle
    event: Any = CATALOG["on_app_message"].payload  # the catalog's class for the event
    event = event(Emitter("transport.daily"), {"a": 1}, "x")
    for deliveries in (1, 2):  # the event comes again, as after a worker's crash
        delivery = Delivery("call-1", "svc", "1-0", "on_app_message", 7, 0, event, deliveries)
        delivery._context = inbox  # type: ignore[assignment]  # the part a handler uses
        await handle(delivery)
    assert [p.text for p in inbox.sent.values()] == ["first", "second"]


async def test_a_retried_handler_sends_each_of_its_commands_once() -> None:
    """A handler's run numbers its sends from 1 each time it is retried, so a command the
    failed run sent is not sent again by the retry."""
    inbox = Inbox()
    runs = 0
    service = EventService("svc")

    @service.event_handler("on_app_message", retry=Retry(attempts=2, backoff=0))
    async def flaky(emitter: EmitterRef, message: Any, sender: Any) -> None:
        nonlocal runs
        runs += 1
        await emitter.send(Say(text="on it"))
        if runs == 1:
            raise ConnectionError("CRM unreachable")

    event: Any = CATALOG["on_app_message"].payload
    event = event(Emitter("transport.daily"), {"a": 1}, "x")
    delivery = Delivery("call-1", "svc", "1-0", "on_app_message", 7, 0, event, 1)
    delivery._context = inbox  # type: ignore[assignment]  # the part a handler uses
    await service.as_service().handle(delivery)
    assert runs == 2
    assert [p.text for p in inbox.sent.values()] == ["on it"]


async def test_an_opted_in_handler_is_retried_the_others_are_not(bus: Bus) -> None:
    attempts = {"flaky": 0, "plain": 0}
    service = EventService("svc")

    @service.event_handler("on_user_turn_started", retry=Retry(attempts=3, backoff=0.001))
    async def flaky(emitter: EmitterRef, *args: Any) -> None:
        attempts["flaky"] += 1
        if attempts["flaky"] < 3:
            raise ConnectionError("CRM unreachable")

    @service.event_handler("on_user_turn_started")
    async def plain(emitter: EmitterRef, *args: Any) -> None:
        attempts["plain"] += 1
        raise ValueError("always")

    async with serving(bus, service):
        await emit_all(bus, (Emitter("user_aggregator"), "on_user_turn_started", ()))
        await wait_for(lambda: attempts["plain"] >= 1 and attempts["flaky"] >= 3, what="runs")
    assert attempts == {"flaky": 3, "plain": 1}  # after the drain: no retry of `plain` came late


class Escalated(Event, tag="support.escalated"):
    reason: str
    priority: int = 1


async def test_custom_events_are_declared_on_both_sides(bus: Bus) -> None:
    got: list[tuple[str, int]] = []
    service = EventService("svc")
    service.declare_event("support.escalated", Escalated, sync=True)

    @service.event_handler("support.escalated")
    async def escalate(emitter: EmitterRef, reason: str, priority: int) -> None:
        got.append((reason, priority))

    async with serving(bus, service), BotSession.open(bus, "call-1") as bot:
        events = Events(bot, sync_timeout=10)
        events.declare_event("support.escalated", Escalated, sync=True)
        outcome = await events.emit(Emitter("bot"), "support.escalated", "angry", priority=3)
    assert outcome is not None and outcome.ok and got == [("angry", 3)]


def test_a_custom_events_payload_that_is_not_an_event_is_refused_where_it_is_declared() -> None:
    """A plain `Payload` was taken, and every emit of the event then failed with
    "Unexpected keyword argument 'emitter'"; a dataclass, with an AttributeError."""

    class Plain(Payload, tag="support.escalated"):
        reason: str

    @dataclass
    class Data:
        reason: str

    for bad in (Plain, Data, Escalated(Emitter("crm"), "angry")):
        with pytest.raises(InvalidHandlerError, match=r"must be a subclass of flows\.Event"):
            declare("support.escalated", bad)  # type: ignore[arg-type]  # not an Event type
        with pytest.raises(InvalidHandlerError, match=r"class X\(Event, tag='support\.escal"):
            EventService("svc").declare_event("support.escalated", bad)  # type: ignore[arg-type]


def test_a_custom_event_whose_name_is_not_a_string_is_refused() -> None:
    """`declare(None)` made a spec that no event could match."""
    for bad in (None, "", 3):
        with pytest.raises(InvalidHandlerError, match="a custom event's name is a non-empty"):
            declare(bad)  # type: ignore[arg-type]  # not a name
        with pytest.raises(InvalidHandlerError, match="a custom event's name is a non-empty"):
            EventService("svc").declare_event(bad)  # type: ignore[arg-type]  # not a name


async def test_a_custom_event_that_names_its_emitters_refuses_others_on_both_sides(
    bus: Bus,
) -> None:
    service = EventService("svc")
    service.declare_event("support.escalated", Escalated, emitters=["crm"])
    with pytest.raises(InvalidHandlerError, match=r"'bot' never emits 'support\.escalated'; it "):
        service.add_event_handler("support.escalated", print, emitter="bot")
    service.add_event_handler("support.escalated", print, emitter="crm")
    with pytest.raises(InvalidHandlerError, match="must be kinds' names, not 'crm'"):
        declare("support.escalated", Escalated, emitters="crm")
    async with BotSession.open(bus, "call-1") as bot:
        events = Events(bot)
        events.declare_event("support.escalated", Escalated, emitters=["crm"])
        with pytest.raises(EventError, match=r"'bot' does not emit 'support\.escalated'"):
            await events.emit(Emitter("bot"), "support.escalated", "angry")
        assert await events.emit(Emitter("crm"), "support.escalated", "angry") is None


async def test_a_handler_gets_only_the_arguments_it_declares_as_pipecat_passes_them(
    bus: Bus,
) -> None:
    """Pipecat calls ``on_connected(service)`` with nothing after the emitter."""
    seen: list[str] = []
    service = EventService("svc")

    @service.event_handler("on_connected")
    async def bare(emitter: EmitterRef) -> None:
        seen.append("bare")

    @service.event_handler("on_connected")
    async def with_data(emitter: EmitterRef, data: Any) -> None:
        seen.append(f"data {data}")

    @service.event_handler("on_connected")
    def every(emitter: EmitterRef, *args: Any) -> None:
        seen.append(f"all {len(args)}")

    async with serving(bus, service):
        await emit_all(bus, (STT, "on_connected", ()))
        await wait_for(lambda: len(seen) == 3, what="the three handlers")
    assert seen == ["bare", "data {}", "all 1"]


class Recorder:
    """Handlers of on_participant_left (participant, reason) in every form Pipecat calls."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[Any, ...]] = {}

    def method(self, emitter: EmitterRef, participant: Any, reason: str) -> None:
        self.seen["method"] = (participant["id"], reason)

    async def __call__(self, emitter: EmitterRef, participant: Any) -> None:
        self.seen["object"] = (participant["id"],)


def tagged(tag: str, emitter: EmitterRef, participant: Any, reason: str, *, into: Recorder) -> None:
    into.seen[tag] = (participant["id"], reason)


async def test_every_signature_that_can_take_the_events_arguments_is_taken_and_runs(
    bus: Bus,
) -> None:
    """Those that Pipecat's ``handler(emitter, *args, **kwargs)`` can call, and those taking
    fewer of the event's arguments, which flowbus passes fewer."""
    rec = Recorder()
    service = EventService("svc")
    seen = rec.seen

    async def both(emitter: EmitterRef, participant: Any, reason: str) -> None:
        seen["both"] = (participant["id"], reason)

    def defaults(
        emitter: EmitterRef, participant: Any = None, reason: str = "", n: int = 0
    ) -> None:
        seen["defaults"] = (participant["id"], reason, n)

    def variadic(*args: Any, **kwargs: Any) -> None:
        seen["variadic"] = (args[1]["id"], args[2], kwargs)

    def positional_only(emitter: EmitterRef, /, participant: Any, *, loud: bool = False) -> None:
        seen["positional_only"] = (participant["id"], loud)

    async def emitter_only(emitter: EmitterRef) -> None:
        seen["emitter_only"] = (emitter.kind,)

    for handler in (
        both,
        defaults,
        variadic,
        positional_only,
        emitter_only,
        rec.method,
        rec,
        functools.partial(tagged, "partial", into=rec),
        lambda *args: seen.update(lambda_=(len(args),)),
    ):
        service.add_event_handler("on_participant_left", handler)
    async with serving(bus, service):
        daily = Emitter("transport.daily")
        await emit_all(bus, (daily, "on_participant_left", ({"id": "p-1"}, "leftCall")))
        await wait_for(lambda: len(seen) == 9, what="the nine handlers")
    assert seen == {
        "both": ("p-1", "leftCall"),
        "defaults": ("p-1", "leftCall", 0),
        "variadic": ("p-1", "leftCall", {}),
        "positional_only": ("p-1", False),
        "emitter_only": ("transport.daily",),
        "method": ("p-1", "leftCall"),
        "object": ("p-1",),
        "partial": ("p-1", "leftCall"),
        "lambda_": (3,),
    }


def test_a_handler_that_cannot_take_the_events_arguments_is_refused_at_registration() -> None:
    """It was taken, then failed with a TypeError at every event."""
    service = EventService("svc")

    def nothing() -> None: ...

    def keyword_emitter(*, emitter: EmitterRef) -> None: ...

    def too_many(emitter: EmitterRef, participant: Any, reason: str, extra: Any) -> None: ...

    def too_many_before_rest(emitter: EmitterRef, a: Any, b: Any, c: Any, *rest: Any) -> None: ...

    def keyword_flag(emitter: EmitterRef, participant: Any, *, flag: bool) -> None: ...

    def given_by_keyword(emitter: EmitterRef, participant: Any, reason: str) -> None: ...

    class NoEmitter:
        async def __call__(self) -> None: ...

    cases: list[tuple[Any, str]] = [
        (nothing, "no positional parameter for the emitter"),
        (keyword_emitter, "no positional parameter for the emitter"),
        (NoEmitter(), "no positional parameter for the emitter"),
        (too_many, r"requires 4 positional arguments \(emitter, participant, reason, extra\)"),
        (too_many_before_rest, "requires 4 positional arguments"),
        (keyword_flag, "requires keyword-only flag, which nothing passes"),
        # (the parameters after one a partial gives by keyword can only be given by keyword)
        (functools.partial(given_by_keyword, participant={}), "keyword-only reason"),
    ]
    for handler, why in cases:
        name = getattr(handler, "__qualname__", type(handler).__qualname__)
        with pytest.raises(InvalidHandlerError) as caught:
            service.add_event_handler("on_participant_left", handler)
        assert str(caught.value).startswith(
            f"handler {name} for 'on_participant_left' cannot be called as "
            "handler(emitter, participant, reason) nor with fewer of the event's arguments: "
        )
        assert re.search(why, str(caught.value)), (name, str(caught.value))
    assert not service.subscribes
    with pytest.raises(InvalidHandlerError, match=r"cannot be called as handler\(emitter\) nor"):
        service.add_event_handler("on_before_leave", lambda emitter, extra: None)
    service.add_event_handler("on_before_leave", max)  # no signature to read (ValueError): taken


def test_a_registration_is_removed_first_in_first_out_and_bad_ones_are_refused() -> None:
    service = EventService("svc")

    def h(emitter: EmitterRef) -> None:
        pass

    def g(emitter: EmitterRef) -> None:
        pass

    for handler in (h, g, h):
        service.add_event_handler("on_connected", handler)
    service.remove_event_handler("on_connected", h)
    service.remove_event_handler("on_connected", lambda emitter: None)  # not there: nothing
    assert [r.handler for r in service._handlers["on_connected"]] == [g, h]  # as Pipecat
    with pytest.raises(UnknownEventError):
        service.remove_event_handler("on_conected", h)
    with pytest.raises(InvalidHandlerError, match="takes the event's name"):
        service.event_handler(h)  # type: ignore[arg-type]  # @service.event_handler, bare
    with pytest.raises(InvalidHandlerError, match="attempts of 1 or more"):
        Retry(attempts=0)
    with pytest.raises(InvalidHandlerError, match="one of flowbus's own messages"):
        service.declare_event("session.ended")
    with pytest.raises(InvalidHandlerError, match="is a catalog event; custom events need new"):
        service.declare_event("on_client_connected")
    with pytest.raises(InvalidHandlerError, match=r"must have tag='support\.opened'"):
        service.declare_event("support.opened", Escalated)  # its tag: 'support.escalated'


def test_a_bound_method_is_removed_by_another_reference_to_it_as_in_pipecat() -> None:
    """Pipecat removes a handler equal to the one given: `self.on_connected` twice are two
    objects, equal."""

    class Bot:
        def on_connected(self, emitter: EmitterRef) -> None:
            pass

    bot, service = Bot(), EventService("svc")
    service.add_event_handler("on_connected", bot.on_connected)
    service.remove_event_handler("on_connected", bot.on_connected)
    assert not service.subscribes


async def test_an_argument_given_twice_is_refused_and_errors_leave_the_session_as_raised(
    bus: Bus,
) -> None:
    with pytest.raises(EventError, match="more than one value for participant"):
        async with BotSession.open(bus, "call-1") as bot:
            daily = Emitter("transport.daily", "daily")
            await Events(bot).emit(daily, "on_participant_left", {"id": 1}, participant={"id": 2})


DAILY = Emitter("transport.daily", "daily")


class Renamed(Event, tag="profile.renamed"):
    name: str


async def test_emit_takes_an_argument_called_name_and_refuses_a_second_emitter_or_a_wrong_type(
    bus: Bus,
) -> None:
    """`emit` takes its emitter and event name by position only: an event's argument called
    `name` is given by keyword (it was taken for emit's own: "got multiple values for argument
    'name'"), one called `emitter` is refused as given twice. A value of the wrong type is
    refused where it is emitted, where the caller can fix it (it went out, and failed to
    decode in every service that handles the event)."""
    async with BotSession.open(bus, "call-1") as bot:
        events = Events(bot)
        events.declare_event("profile.renamed", Renamed)
        assert await events.emit(Emitter("crm"), "profile.renamed", name="Ann") is None
        with pytest.raises(EventError, match="more than one value for emitter"):
            await events.emit(DAILY, "on_participant_left", {"id": 1}, "left", emitter=DAILY)
        with pytest.raises(EventError, match="bad arguments for 'on_participant_left'"):
            await events.emit(DAILY, "on_participant_left", {"id": 1}, 3)
    [entry] = await bus.history("call-1")
    got = msgspec.json.decode(entry.data, type=Renamed)
    assert got == Renamed(emitter=Emitter("crm"), name="Ann")


async def test_a_handler_past_its_own_timeout_is_cut_short_and_the_next_one_runs(
    bus: Bus,
) -> None:
    starts: list[str] = []
    service = EventService("svc")

    @service.event_handler("on_before_leave", timeout=0.2)
    async def hangs(emitter: EmitterRef) -> None:
        starts.append("hangs")
        await anyio.sleep_forever()

    @service.event_handler("on_before_leave", timeout=0.2)
    def blocks(emitter: EmitterRef) -> None:  # a thread: timed out only once it returns
        starts.append("blocks")
        time.sleep(0.5)  # slow blocking work
        starts.append("blocks returned")

    @service.event_handler("on_before_leave")
    async def then(emitter: EmitterRef) -> None:
        starts.append("then")

    async with serving(bus, service), BotSession.open(bus, "call-1") as bot:
        outcome = await Events(bot, sync_timeout=10).emit(DAILY, "on_before_leave")
    assert outcome is not None and outcome.timed_out == []
    assert outcome.errors == {
        "svc": [
            f"{hangs.__qualname__}: timed out after 0.2s",
            f"{blocks.__qualname__}: timed out after 0.2s",
        ]
    }
    # Never again (the event was handled), and nothing beside a running handler.
    assert starts == ["hangs", "blocks", "blocks returned", "then"]


async def test_handlers_past_the_events_time_stop_before_the_bus_would_run_them_again(
    server: LocalServer,
) -> None:
    """The bus cuts an event short after `handler_timeout_seconds` and delivers it again,
    running every handler again; the handlers stop a little earlier and the event is done."""
    starts: list[str] = []
    service = EventService("svc")

    @service.event_handler("on_before_leave")
    async def slow(emitter: EmitterRef) -> None:
        starts.append("slow")
        await anyio.sleep_forever()

    @service.event_handler("on_before_leave")
    async def after(emitter: EmitterRef) -> None:
        starts.append("after")

    settings = make_settings(server.url, handler_timeout_seconds=1.0)
    async with Bus.connect(settings) as bus:
        async with serving(bus, service), BotSession.open(bus, "call-1") as bot:
            outcome = await Events(bot, sync_timeout=10).emit(DAILY, "on_before_leave")
        assert outcome is not None and outcome.timed_out == []
        [[first, second]] = outcome.errors.values()
        cut = re.fullmatch(rf"{slow.__qualname__}: timed out after ([\d.]+)s", first)
        # Cut short before the bus would (its 1 s less the reserve, a tenth of what is left):
        # at most 0.9 s however long the event waited to start; how much less is the clock's.
        assert cut is not None and float(cut[1]) <= 0.9, first
        assert second == f"{after.__qualname__}: not run: the event's time ran out"
        assert starts == ["slow"]
        assert await list_dead(bus) == []


def test_a_handler_timeout_must_be_a_positive_number() -> None:
    service = EventService("svc")
    for bad in (0, -1.0, float("inf"), float("nan"), "1"):
        with pytest.raises(InvalidHandlerError, match="positive number of seconds"):
            service.add_event_handler("on_connected", lambda emitter: None, timeout=bad)  # type: ignore[arg-type]


def test_handlers_and_events_added_after_the_service_started_are_refused() -> None:
    """Its subscriptions are fixed when it starts: a later handler would never be called."""
    service = EventService("svc")
    service.add_event_handler("on_connected", lambda emitter: None)
    assert service.as_service().subscribes == frozenset({"on_connected"})
    with pytest.raises(InvalidHandlerError, match="after service 'svc' was started"):
        service.add_event_handler("on_disconnected", lambda emitter: None)
    with pytest.raises(InvalidHandlerError, match="after service 'svc' was started"):
        service.declare_event("support.escalated")


def test_a_service_with_no_handlers_is_refused_at_start() -> None:
    """It would acknowledge every event unseen: most likely its handlers' module was not
    imported, or its last handler was removed."""
    service = EventService("svc")
    with pytest.raises(InvalidHandlerError, match="service 'svc' has no event handlers"):
        service.as_service()

    def handler(emitter: EmitterRef) -> None:
        pass

    service.add_event_handler("on_connected", handler)
    service.remove_event_handler("on_connected", handler)
    with pytest.raises(InvalidHandlerError, match="service 'svc' has no event handlers"):
        service.as_service()


async def test_a_bot_that_waits_for_an_event_the_service_declared_default_gets_its_outcome(
    bus: Bus,
) -> None:
    """A sync flag that differs between the two sides no longer costs the bot its timeout."""
    service = EventService("svc")
    service.declare_event("support.escalated", Escalated)  # not sync here

    @service.event_handler("support.escalated")
    async def escalate(emitter: EmitterRef, reason: str, priority: int) -> None:
        pass

    async with serving(bus, service), BotSession.open(bus, "call-1") as bot:
        events = Events(bot, sync_timeout=600)
        events.declare_event("support.escalated", Escalated, sync=True)
        with anyio.fail_after(60):
            outcome = await events.emit(Emitter("bot"), "support.escalated", "angry")
    assert outcome is not None and outcome.ok


async def test_a_retry_that_would_end_past_the_events_time_is_not_made(
    server: LocalServer,
) -> None:
    starts: list[str] = []
    service = EventService("svc")

    @service.event_handler("on_before_leave", retry=Retry(attempts=2, backoff=0.5))
    async def slow(emitter: EmitterRef) -> None:
        starts.append("slow")
        await anyio.sleep_forever()

    settings = make_settings(server.url, handler_timeout_seconds=1.0)
    async with Bus.connect(settings) as bus:
        async with serving(bus, service), BotSession.open(bus, "call-1") as bot:
            outcome = await Events(bot, sync_timeout=10).emit(DAILY, "on_before_leave")
        assert outcome is not None and outcome.timed_out == []
        [[error]] = outcome.errors.values()
        assert "timed out after" in error
        assert starts == ["slow"]  # its retry's backoff would have ended past the event's time


async def test_a_sync_events_outcome_is_sent_once_when_the_event_comes_again() -> None:
    """A worker that crashed after replying to a sync event (before its ack) handles the event
    again: the bot must get one outcome per service, whatever the handlers sent this time."""
    inbox = Inbox()
    service = EventService("svc")

    @service.event_handler("on_before_leave")
    async def greet_once(emitter: EmitterRef) -> None:
        if emitter.deliveries == 1:  # it deduplicates its own side effect by delivery
            await emitter.send(Say(text="bye"))

    handle = service.as_service().handle
    event: Any = CATALOG["on_before_leave"].payload
    event = event(Emitter("transport.daily"))
    for deliveries in (1, 2):  # the event comes again, as after a worker's crash
        delivery = Delivery(
            "call-1", "svc", "1-0", "on_before_leave", 7, 0, event, deliveries, {"corr": "c1"}
        )
        delivery._context = inbox  # type: ignore[assignment]  # the part a handler uses
        await handle(delivery)
    outcomes = [p for p in inbox.sent.values() if type(p).__name__ == "HandlerOutcome"]
    assert len(outcomes) == 1, outcomes


async def test_a_handler_that_removes_itself_once_running_is_refused_and_runs_for_every_call(
    bus: Bus,
) -> None:
    """Pipecat's one-shot idiom removes a handler from one call's transport. Here it removed it
    from the whole worker: the next call's event was handled without it, and ok."""
    seen: list[str] = []
    service = EventService("svc")

    @service.event_handler("on_before_leave")
    async def once(emitter: EmitterRef) -> None:
        seen.append(emitter.session)
        service.remove_event_handler("on_before_leave", once)

    @service.event_handler("on_before_leave")
    async def always(emitter: EmitterRef) -> None:
        pass

    outcomes = []
    async with serving(bus, service):
        for session in ("call-1", "call-2"):
            async with BotSession.open(bus, session) as bot:
                outcomes.append(await Events(bot, sync_timeout=30).emit(DAILY, "on_before_leave"))
    assert seen == ["call-1", "call-2"]
    for outcome in outcomes:
        assert outcome is not None and outcome.timed_out == []
        [error] = outcome.errors["svc"]
        assert error.startswith(f"{once.__qualname__}: InvalidHandlerError: removing a handler")
        assert "check emitter.session in the handler" in error


def test_a_retry_that_is_not_a_retry_is_refused() -> None:
    """``retry=3`` was taken, then failed the whole event at each delivery: the bus ran the
    event's other handlers again every time, and dead-lettered it."""
    service = EventService("svc")
    for bad in (3, {"attempts": 3}):
        with pytest.raises(InvalidHandlerError, match=r"is a Retry, e\.g\. retry=Retry\("):
            service.add_event_handler("on_connected", lambda emitter: None, retry=bad)  # type: ignore[arg-type]
    assert "on_connected" not in service.subscribes


@pytest.mark.parametrize("found", ["fenced send", "stall"])
async def test_a_handler_whose_lease_moved_ends_the_events_handling_here(
    bus: Bus, found: str
) -> None:
    """A stale owner (its partition's lease moved while the handler ran): the event, and the
    handlers after this one, are the new owner's, not failures to log or retry here. Found by
    the handler's fenced send; or, for a worker frozen in the handler until the lease was
    another's, before the next handler starts, whose effects no fence would refuse."""
    ran: list[str] = []
    service = EventService("svc")

    @service.event_handler("on_connected", retry=Retry(attempts=3))
    async def first(emitter: EmitterRef, data: Any) -> None:
        ran.append("first")
        p = bus.keys.partition(emitter.session)
        await bus.redis.set(bus.keys.lease(p, "svc"), "999:another-worker")  # it moved
        if found == "stall":
            consumer._parts[p].vouched_until = time.monotonic() - 0.001  # renewed a TTL ago
        else:
            await emitter.send(Say(text="hi"))

    @service.event_handler("on_connected")
    async def second(emitter: EmitterRef, data: Any) -> None:
        ran.append("second")

    consumer = Consumer(bus, service.as_service())
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(consumer.run)
            await emit_all(bus, (STT, "on_connected", ()))
            await wait_for(lambda: consumer.stats.partitions_lost == 1, what="the partition lost")
            consumer.stop()
    assert ran == ["first"]
    failed = {"event_handler_retried", "event_handler_failed", "handler_failed"}
    assert [x["event"] for x in logs if x["event"] in failed] == []


def test_an_action_or_event_service_passes_its_lifespan_to_the_workers_service() -> None:
    @asynccontextmanager
    async def pool() -> AsyncIterator[None]:
        yield

    async def connected(emitter: EmitterRef, data: Any) -> None:
        pass  # (never called)

    crm, plain = EventService("crm", lifespan=pool), EventService("crm")
    for service in (crm, plain):
        service.add_event_handler("on_client_connected", connected)
    assert crm.as_service().lifespan is pool and plain.as_service().lifespan is None
    assert ActionService(lifespan=pool).as_service().lifespan is pool
