"""Event handlers as separate services: bot (this test) and services in separate processes."""

from __future__ import annotations

import json
import re
from typing import Any

import anyio
import pytest

from bus import Bus, ServiceInfo, Settings
from flows import (
    BotSession,
    Emitter,
    EventError,
    Events,
    EventService,
    InvalidHandlerError,
    UnknownEventError,
)
from tests.support import WorkerProcesses, lease_owners, left_for_the_collector, raw, wait_for

pytestmark = pytest.mark.anyio
APP = "tests.apps.handlers:app"
DAILY = Emitter("transport.daily", "daily")
USER = Emitter("user_aggregator", "user")


def start(
    workers: WorkerProcesses, settings: Settings, name: str, events: str, mode: str = "record"
) -> None:
    env = {"HANDLERS_SERVICE": name, "HANDLERS_EVENTS": events, "HANDLERS_MODE": mode}
    workers.start(APP, settings, env)


async def ready(bus: Bus, *names: str) -> None:
    """Every service in `names` registered and holding all its partitions."""

    async def up() -> bool:
        registered = {s.name for s in await bus.services(fresh=True)}
        owned = [sum(map(len, (await lease_owners(bus, n)).values())) for n in names]
        return set(names) <= registered and all(o == bus.settings.partitions for o in owned)

    await wait_for(up, what=f"services {names}")


async def records(bus: Bus, service: str) -> list[dict[str, Any]]:
    items = await raw(bus).lrange(f"{bus.settings.prefix}:test:events:{service}", 0, -1)
    return [json.loads(i) for i in items]


async def test_three_services_each_get_every_subscribed_event_in_order(
    bus: Bus, settings: Settings, workers: WorkerProcesses
) -> None:
    subscriptions = {
        "crm": ["on_client_connected", "on_user_turn_stopped"],
        "analytics": ["on_user_turn_stopped", "on_participant_left"],
        "recording": ["on_client_connected", "on_app_message", "on_participant_left"],
    }
    for name, events in subscriptions.items():
        start(workers, settings, name, ",".join(events))
    await ready(bus, *subscriptions)
    script = [
        (DAILY, "on_client_connected", ({"id": "caller"},)),
        (Emitter("pipeline_task", "task"), "on_pipeline_started", ()),
        (USER, "on_user_turn_stopped", ()),
        (DAILY, "on_app_message", ({"hello": 1}, "caller")),
        (USER, "on_user_turn_stopped", ()),
        (DAILY, "on_participant_left", ({"id": "caller"}, "left")),
    ]
    calls = [f"call-{i}" for i in range(20)]

    async def one_call(session: str) -> None:
        async with BotSession.open(bus, session) as bot:
            events = Events(bot)
            for emitter, name, args in script:
                await events.emit(emitter, name, *args)

    async with anyio.create_task_group() as tg:
        for session in calls:
            tg.start_soon(one_call, session)

    for service, events in subscriptions.items():
        expected = [(i + 1, name) for i, (_, name, _) in enumerate(script) if name in events]

        async def complete(service: str = service, n: int = len(expected) * len(calls)) -> bool:
            return len(await records(bus, service)) >= n

        await wait_for(complete, what=f"{service} to handle its events")
        got = await records(bus, service)
        for session in calls:
            assert [(r["seq"], r["event"]) for r in got if r["session"] == session] == expected
        assert len(got) == len(expected) * len(calls)


async def test_a_raising_handler_does_not_stop_the_next_one_and_is_logged(
    bus: Bus, settings: Settings, workers: WorkerProcesses
) -> None:
    start(workers, settings, "crm", "on_client_connected", mode="pair")
    await ready(bus, "crm")
    async with BotSession.open(bus, "call-1") as bot:
        await Events(bot).emit(DAILY, "on_client_connected", {"id": "caller"})
    await wait_for(lambda: _count(bus, "crm", 1), what="the second handler")
    [record] = await records(bus, "crm")
    assert record["args"] == [{"id": "caller"}]
    log = workers.terminate(workers.procs[-1])
    failures = [json.loads(line) for line in log.splitlines() if '"event_handler_failed"' in line]
    assert len(failures) == 1
    assert {k: failures[0][k] for k in ("session", "type", "seq", "handler", "error", "group")} == {
        "session": "call-1",
        "type": "on_client_connected",
        "seq": 1,
        "group": "crm",
        "handler": "first_raises",
        "error": "RuntimeError: first handler fails on seq 1",
    }


async def _count(bus: Bus, service: str, n: int) -> bool:
    return len(await records(bus, service)) >= n


async def test_a_sync_event_waits_for_every_subscribed_service_and_gets_their_outcomes(
    bus: Bus, settings: Settings, workers: WorkerProcesses
) -> None:
    start(workers, settings, "crm", "on_before_leave")
    start(workers, settings, "audit", "on_before_leave", mode="pair")
    await ready(bus, "crm", "audit")
    async with BotSession.open(bus, "call-1") as bot:
        outcome = await Events(bot, sync_timeout=30).emit(DAILY, "on_before_leave")
    assert outcome is not None and outcome.timed_out == []
    assert outcome.errors == {
        "crm": [],
        "audit": ["first_raises: RuntimeError: first handler fails on seq 1"],
    }
    assert len(await records(bus, "crm")) == 1  # it finished before the bot went on


async def test_a_stuck_service_ends_the_sync_wait_at_the_timeout_naming_it(
    bus: Bus, settings: Settings, workers: WorkerProcesses
) -> None:
    start(workers, settings, "crm", "on_before_leave")
    start(workers, settings, "stuck", "on_before_leave", mode="stuck")
    await ready(bus, "crm", "stuck")
    async with BotSession.open(bus, "call-1") as bot:
        # Long enough for the healthy service to answer on a busy machine.
        outcome = await Events(bot, sync_timeout=3.0).emit(DAILY, "on_before_leave")
    assert outcome is not None
    assert outcome.timed_out == ["stuck"] and outcome.errors == {"crm": []}


async def test_a_sync_event_no_service_handles_returns_at_once_with_nothing_missing(
    bus: Bus,
) -> None:
    await bus.register_service(ServiceInfo("crm", ["on_client_connected"]))  # others only
    async with BotSession.open(bus, "call-1") as bot:
        with anyio.fail_after(60):  # the wait below would be 600 s, as it was for every one
            outcome = await Events(bot, sync_timeout=600).emit(DAILY, "on_before_leave")
    assert outcome is not None and outcome.timed_out == [] and outcome.errors == {}
    [entry] = await bus.history("call-1")  # published all the same, for the record
    assert entry.type == "on_before_leave"


async def test_a_sync_event_waits_no_longer_than_its_timeout_for_a_server_that_does_not_answer(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    await bus.register_service(ServiceInfo("crm", ["on_before_leave"]))

    async def no_answer(*args: Any, **kwargs: Any) -> Any:
        await anyio.sleep_forever()  # as a publish retrying against a server out of reach

    async with BotSession.open(bus, "call-1") as bot:
        events = Events(bot, sync_timeout=0.2)
        monkeypatch.setattr(bot, "publish", no_answer)
        with anyio.fail_after(60):  # it waited for ever before
            outcome = await events.emit(DAILY, "on_before_leave")
        assert outcome is not None and outcome.timed_out == ["crm"] and not outcome.ok
        monkeypatch.setattr(bus, "services", no_answer)  # the registry's look-up as well
        with anyio.fail_after(60):
            outcome = await events.emit(DAILY, "on_before_leave")
        assert outcome is not None and not outcome.published and not outcome.ok
        monkeypatch.undo()  # the publish answers; the look-up alone does not
        monkeypatch.setattr(bus, "services", no_answer)
        with anyio.fail_after(60):
            outcome = await events.emit(DAILY, "on_before_leave")
        assert outcome is not None and not outcome.published  # nor sent: whom to wait for?
    assert await bus.history("call-1") == []


async def test_a_sync_events_look_up_of_its_services_counts_against_its_timeout(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replies are awaited for what is left of `sync_timeout` after the registry's look-up,
    not for the whole of it again."""
    await bus.register_service(ServiceInfo("crm", ["on_before_leave"]))
    services = bus.services
    waits: list[float] = []

    async def slow_services(**kwargs: Any) -> Any:
        await anyio.sleep(0.5)  # a server slow to answer
        return await services(**kwargs)

    async def request(*args: Any, wait: float, **kwargs: Any) -> list[Any]:
        waits.append(wait)
        return []

    async with BotSession.open(bus, "call-1") as bot:
        monkeypatch.setattr(bus, "services", slow_services)
        monkeypatch.setattr(bot, "request", request)
        outcome = await Events(bot, sync_timeout=10).emit(DAILY, "on_before_leave")
    assert outcome is not None and outcome.timed_out == ["crm"]
    [wait] = waits
    assert wait <= 9.5


async def test_a_bots_trace_goes_with_its_sync_events_too(bus: Bus) -> None:
    """A sync event is published with its reply fields; the bot's `traceparent` goes with
    it as with every other event."""
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b71-01"
    await bus.register_service(ServiceInfo("crm", ["on_before_leave"]))  # no worker of it runs
    async with BotSession.open(bus, "call-1", traceparent=trace) as bot:
        outcome = await Events(bot, sync_timeout=0.2).emit(DAILY, "on_before_leave")
    assert outcome is not None and outcome.timed_out == ["crm"]
    [entry] = await bus.history("call-1")
    assert entry.extra["traceparent"] == trace and entry.extra["corr"]


async def test_dailys_own_on_error_is_not_sync_where_a_frame_processors_is(bus: Bus) -> None:
    """As in Pipecat 1.14: the Daily transport registers on_error without sync, every frame
    processor with it. The bot waited up to `sync_timeout` for Daily's too."""
    await bus.register_service(ServiceInfo("crm", ["on_error"]))  # no worker of it runs
    error = {"error": "boom", "fatal": False}
    async with BotSession.open(bus, "call-1") as bot:
        events = Events(bot, sync_timeout=0.2)
        assert await events.emit(DAILY, "on_error", error) is None  # published, not waited for
        outcome = await events.emit(USER, "on_error", error)  # a frame processor's: waited for
    assert outcome is not None and outcome.timed_out == ["crm"]
    assert [e.type for e in await bus.history("call-1")] == ["on_error", "on_error"]


async def test_vonages_on_client_connected_is_sync_where_dailys_is_not(bus: Bus) -> None:
    """As in Pipecat 1.14: Vonage registers on_client_connected (and on_participant_joined,
    on_first_participant_joined) with sync=True, the other transports without."""
    await bus.register_service(ServiceInfo("crm", ["on_client_connected"]))  # no worker runs
    vonage = Emitter("transport.vonage", "vonage")
    client = {"subscriberId": "s-1", "streamId": "s-1", "connectionData": ""}
    async with BotSession.open(bus, "call-1") as bot:
        events = Events(bot, sync_timeout=0.2)
        assert await events.emit(DAILY, "on_client_connected", {"id": "p-1"}) is None
        outcome = await events.emit(vonage, "on_client_connected", client)  # waited for
    assert outcome is not None and outcome.timed_out == ["crm"]
    history = await bus.history("call-1")
    assert [e.type for e in history] == ["on_client_connected"] * 2


async def test_a_sync_event_whose_publish_did_not_go_through_in_time_is_not_reported_ok(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No service handles it, so no reply is awaited; but its publish never finished: the
    event is not in the session's history, and the outcome says so (it said ok)."""

    async def no_answer(*args: Any, **kwargs: Any) -> Any:
        await anyio.sleep_forever()  # as a publish retrying against a server out of reach

    async with BotSession.open(bus, "call-1") as bot:
        monkeypatch.setattr(bot, "publish", no_answer)
        with anyio.fail_after(60):
            outcome = await Events(bot, sync_timeout=0.2).emit(DAILY, "on_before_leave")
    assert outcome is not None and outcome.timed_out == []
    assert not outcome.published and not outcome.ok
    assert await bus.history("call-1") == []


async def test_a_default_event_returns_before_any_handler_ran(
    bus: Bus, settings: Settings, workers: WorkerProcesses
) -> None:
    start(workers, settings, "crm", "on_client_connected", mode="gated")
    await ready(bus, "crm")
    async with BotSession.open(bus, "call-1") as bot:
        assert await Events(bot).emit(DAILY, "on_client_connected", {"id": "x"}) is None
        assert await records(bus, "crm") == []  # the handler waits for the gate below
        await raw(bus).rpush(f"{settings.prefix}:test:gate", "go")
        await wait_for(lambda: _count(bus, "crm", 1), what="the handler after the gate")


async def test_unknown_names_are_refused_with_suggestions(bus: Bus) -> None:
    service = EventService("crm")
    with pytest.raises(UnknownEventError, match="did you mean on_client_connected"):
        service.add_event_handler("on_client_conected", lambda emitter: None)
    with pytest.raises(UnknownEventError, match="; known events: on_active_speaker_changed, "):
        service.add_event_handler("on_zzz", lambda emitter: None)  # nothing close: all of them
    async with BotSession.open(bus, "call-1") as bot:
        with pytest.raises(UnknownEventError, match="on_user_turn_stopped"):
            await Events(bot).emit(USER, "on_user_turn_stoped")


async def test_a_name_that_is_not_a_string_is_refused_saying_so(bus: Bus) -> None:
    """It failed in difflib, looking for close names: "'NoneType' object is not iterable"."""
    service = EventService("crm")

    def connected(emitter: Any, client: Any) -> None:
        pass

    for bad in (None, 3, ["on_client_connected"]):
        with pytest.raises(
            InvalidHandlerError, match=f"is a string .*, not {re.escape(repr(bad))}"
        ):
            service.add_event_handler(bad, connected)  # type: ignore[arg-type]  # on purpose
        with pytest.raises(InvalidHandlerError, match="is a string"):
            service.remove_event_handler(bad, connected)  # type: ignore[arg-type]  # on purpose
    with pytest.raises(InvalidHandlerError, match=r"the name comes first: add_event_handler\("):
        service.add_event_handler(connected, "on_client_connected")  # type: ignore[arg-type]
    assert not service.subscribes
    async with BotSession.open(bus, "call-1") as bot:
        with pytest.raises(EventError, match=r"is a string .*, not None"):
            await Events(bot).emit(DAILY, None)  # type: ignore[arg-type]  # on purpose


async def test_a_sync_timeout_that_is_not_a_finite_number_of_seconds_above_0_is_refused(
    bus: Bus,
) -> None:
    """With 0 or less a sync event was never published (the wait for the subscribed services'
    look-up ended at once); NaN failed every emit of one; infinity let a stuck service hold
    the bot for ever."""
    async with BotSession.open(bus, "call-1") as bot:
        for bad in (0, -1.0, float("nan"), float("inf"), "5"):
            with pytest.raises(ValueError, match="sync_timeout is a number of seconds above 0"):
                Events(bot, sync_timeout=bad)  # type: ignore[arg-type]  # "5" on purpose
        assert Events(bot, sync_timeout=0.5).sync_timeout == 0.5


async def test_a_bot_session_left_leaves_nothing_open(bus: Bus) -> None:
    """Its commands' stream and its inbox reader are closed with it: a bot process that runs
    call after call leaves nothing for the garbage collector."""

    async def a_call() -> None:  # (its objects are garbage once it returns)
        async with BotSession.open(bus, "call-1") as bot:
            await Events(bot).emit(DAILY, "on_client_connected", {"id": "caller"})

    with left_for_the_collector() as left:
        await a_call()
    assert left == []
