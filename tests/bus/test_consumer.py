"""Consumer behaviour in-process, on the real server: policies, filters, drain, renewal."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal, cast

import anyio
import msgspec
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from bus import (
    Bus,
    Codec,
    ConfigError,
    Consumer,
    Delivery,
    FencedError,
    LifespanError,
    NoSuchSessionError,
    Payload,
    Service,
    ServiceInfo,
    Settings,
    connection,
    hints,
    scripts,
    steps,
)
from bus.consumer import STEP_LANES
from bus.ownership import Leases, Renewal
from bus.runs import Partition, Run, Runs
from bus.steps import Step, reader
from tests.apps.recorder import Tick
from tests.conftest import make_settings
from tests.support import Proxy, lease_owners, raw, running, wait_for
from workers.server import LocalServer

pytestmark = pytest.mark.anyio


class Note(Payload, tag="note"):
    text: str = ""


class Log:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int, int]] = []

    def count(self, session: str) -> int:
        return sum(s == session for s, _, _ in self.seen)


async def test_a_session_handled_to_its_end_but_left_unretired_retires_at_its_next_run(
    bus: Bus,
) -> None:
    """As a drain leaves it: the new owner's first read finds nothing, its next step retires."""
    await bus.register_service(ServiceInfo("svc"))
    p = bus.keys.partition("call-d")
    for n in (1, 2):
        await bus.publish("call-d", Tick(n=n), final=n == 2)
    stream = bus.keys.session("call-d")
    await raw(bus).xreadgroup("svc", "p0", {stream: ">"})
    await raw(bus).xack(stream, "svc", *[e[0] for e in await raw(bus).xrange(stream)])
    assert await raw(bus).sismember(bus.keys.live(p), "call-d")
    seen: list[Delivery] = []

    async def handle(d: Delivery) -> None:
        seen.append(d)

    async with running(bus, Service("svc", handle, Codec([Tick]))):

        async def retired() -> bool:
            return not await raw(bus).sismember(bus.keys.live(p), "call-d")

        await wait_for(retired, what="call-d to retire")
    assert seen == []
    assert 0 < await raw(bus).ttl(stream) <= bus.settings.retention_seconds


async def test_a_session_whose_reads_all_come_back_full_is_handled_and_retires(
    server: LocalServer,
) -> None:
    """Reads of 2 over 4 events: full, full, then nothing; the step after that retires it."""
    settings = make_settings(server.url, read_batch=2)
    async with Bus.connect(settings) as bus:
        await bus.register_service(ServiceInfo("svc"))
        for n in range(1, 5):
            await bus.publish("call-f", Tick(n=n), final=n == 4)
        seen: list[int] = []

        async def handle(d: Delivery) -> None:
            seen.append(d.seq)

        p = bus.keys.partition("call-f")
        async with running(bus, Service("svc", handle, Codec([Tick]))):

            async def retired() -> bool:
                return not await raw(bus).sismember(bus.keys.live(p), "call-f")

            await wait_for(retired, what="call-f to retire")
        assert seen == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("mode", "expected_steps", "short_acks"),
    [
        ("each", [("p", True, 0), (">", False, 1)], 2),
        ("batch", [("p", True, 0), (">", False, 3)], 0),
    ],
)
async def test_ack_mode_each_acknowledges_every_entry_before_the_next_and_batch_a_batch_at_once(
    server: LocalServer, mode: str, expected_steps: list[tuple[str, bool, int]], short_acks: int
) -> None:
    """Three events read at once: 'each' acknowledges the first two by short steps, each before
    the next handling, and the third with the last step; 'batch' all three with the last step.
    That step retires the session and sends no read, which could only find nothing."""
    async with Bus.connect(make_settings(server.url, ack_mode=mode)) as bus:
        await bus.register_service(ServiceInfo("svc"))
        for n in (1, 2, 3):
            await bus.publish("call-n", Tick(n=n), final=n == 3)
        ours, p = bus.keys.session("call-n"), bus.keys.partition("call-n")
        seen: list[int] = []

        async def handle(d: Delivery) -> None:
            seen.append(d.seq)

        consumer = Consumer(bus, Service("svc", handle, Codec([Tick])))
        steps: list[tuple[str, bool, int]] = []  # each step of call-n: read, reads, acks
        acks: list[bytes] = []  # its short steps, each acknowledging one entry
        for lane in consumer._lanes:

            def recording(step: Step, submit: Any = lane.submit) -> Any:
                if step.stream == ours:
                    steps.append((step.read, step.reads, len(step.acks)))
                return submit(step)

            def acking(
                lease: str, token: str, stream: str, entry_id: bytes, ack: Any = lane.ack
            ) -> Any:
                if stream == ours:
                    acks.append(entry_id)
                return ack(lease, token, stream, entry_id)

            lane.submit = recording  # type: ignore[method-assign]
            lane.ack = acking  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:
            await tg.start(consumer.run)

            async def retired() -> bool:
                return not await raw(bus).sismember(bus.keys.live(p), "call-n")

            await wait_for(retired, what="call-n to retire")
            consumer.stop()
        assert seen == [1, 2, 3]
        assert (steps, len(acks)) == (expected_steps, short_acks)


async def test_a_graceful_stop_in_batch_ack_mode_acknowledges_what_was_handled(
    server: LocalServer,
) -> None:
    """A worker stopping halfway through a read batch writes the acks of the entries it
    handled, so the next owner goes on from the first one it did not handle, repeating none;
    the entries it read and did not handle it gave back: each is a first delivery there."""
    async with Bus.connect(make_settings(server.url, ack_mode="batch")) as bus:
        await bus.register_service(ServiceInfo("svc"))
        for n in range(1, 11):
            await bus.publish("call-g", Tick(n=n), final=n == 10)
        seen: list[tuple[int, int]] = []  # (consumer, seq)
        counts: set[int] = set()  # the deliveries the second consumer sees
        third, release = anyio.Event(), anyio.Event()

        def service(number: int) -> Service:
            async def handle(d: Delivery) -> None:
                seen.append((number, d.seq))
                if number == 2:
                    counts.add(d.deliveries)
                if d.seq == 3 and number == 1:
                    third.set()
                    await release.wait()

            return Service("svc", handle, Codec([Tick]))

        async with running(bus, service(1)) as first:
            await third.wait()
            first.stop()
            # (at once: the worker's loop may be in a heartbeat, and in batch mode the handler
            # would go on through its read batch before that returns)
            assert all(part.draining for part in first._parts.values())
            release.set()
        p = bus.keys.partition("call-g")
        async with running(bus, service(2)):

            async def retired() -> bool:
                return not await raw(bus).sismember(bus.keys.live(p), "call-g")

            await wait_for(retired, what="call-g to retire")
        assert seen == [(1, 1), (1, 2), (1, 3), *((2, n) for n in range(4, 11))]
        assert counts == {1}


async def test_events_published_while_the_last_of_a_batch_is_handled_are_handled_too(
    bus: Bus,
) -> None:
    """Each handling publishes the next event, so every batch's last step races the hint of
    the event after it: whether the hint comes before that step, while it is out or after
    the session's run ended, the next event is handled, in order."""
    await bus.register_service(ServiceInfo("svc"))
    seen: list[int] = []

    async def handle(d: Delivery) -> None:
        seen.append(d.seq)
        if d.seq < 30:
            await bus.publish("call-c", Tick(n=d.seq + 1), final=d.seq == 29)

    p = bus.keys.partition("call-c")
    async with running(bus, Service("svc", handle, Codec([Tick]))):
        await bus.publish("call-c", Tick(n=1))

        async def retired() -> bool:
            return not await raw(bus).sismember(bus.keys.live(p), "call-c")

        await wait_for(retired, what="call-c to retire")
    assert seen == list(range(1, 31))


async def test_a_type_with_a_route_goes_to_its_handler_the_others_to_handle(bus: Bus) -> None:
    seen: list[tuple[str, int]] = []

    async def handle(d: Delivery) -> None:
        seen.append(("handle", d.seq))

    async def noted(d: Delivery) -> None:
        seen.append(("route", d.seq))

    service = Service("svc", handle, Codec([Tick, Note]), routes={"note": noted})
    async with running(bus, service):
        for payload in (Tick(n=1), Note(), Tick(n=3)):
            await bus.publish("call-r", payload)
        await wait_for(lambda: len(seen) == 3, what="three handlings")
    assert seen == [("handle", 1), ("route", 2), ("handle", 3)]


async def test_a_worker_whose_hint_connection_is_killed_subscribes_again_and_misses_nothing(
    bus: Bus,
) -> None:
    seen: list[str] = []

    async def handle(d: Delivery) -> None:
        seen.append(d.session)

    with capture_logs() as logs:
        async with running(bus, Service("svc", handle, Codec([Tick]))):
            await bus.publish("call-before", Tick(n=1))
            await wait_for(lambda: seen == ["call-before"], what="the first hint's session")
            killed = await raw(bus).execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            assert killed >= 1
            await bus.publish("call-after", Tick(n=1))  # its hint may find nobody listening
            await wait_for(lambda: "call-after" in seen, what="the session published after")
    assert seen == ["call-before", "call-after"]
    assert any(entry["event"] == "hints_interrupted" for entry in logs)


async def test_pause_policy_holds_the_session_until_an_operator_resumes_it(
    server: LocalServer,
) -> None:
    settings = make_settings(server.url, max_deliveries=2, dead_letter_policy="pause")
    log, failing = Log(), {"call-p": True}

    async def handle(d: Delivery) -> None:
        assert isinstance(d.payload, Tick)
        if d.payload.fail and failing[d.session]:
            raise RuntimeError("downstream is down")
        log.seen.append((d.session, d.seq, d.deliveries))

    async with Bus.connect(settings) as bus, running(bus, Service("svc", handle, Codec([Tick]))):
        for n in (1, 2, 3):
            await bus.publish("call-p", Tick(n=n, fail=n == 2))
        for n in (1, 2):
            await bus.publish("call-q", Tick(n=n))
        p = bus.keys.partition("call-p")

        async def paused() -> bool:
            return bool(await raw(bus).hexists(bus.keys.paused(p, "svc"), "call-p"))

        await wait_for(paused, what="call-p to pause")
        await wait_for(lambda: log.count("call-q") == 2, what="the other session")
        assert [seq for s, seq, _ in log.seen if s == "call-p"] == [1]  # 3 waits behind 2
        [(_, dead)] = await raw(bus).xrange(bus.keys.dead(p))
        assert dead[b"policy"] == b"pause" and dead[b"error"] == b"RuntimeError: downstream is down"

        failing["call-p"] = False
        assert await bus.resume("call-p", "svc") is not None
        assert await raw(bus).xlen(bus.keys.dead(p)) == 0  # its letter removed: settled
        await wait_for(lambda: log.count("call-p") == 3, what="call-p to resume")
        assert [(seq, n) for s, seq, n in log.seen if s == "call-p"] == [(1, 1), (2, 1), (3, 1)]
        assert await bus.resume("call-p", "svc") is None  # not paused any more


async def paused_by_hand(bus: Bus, session: str, group: str) -> str:
    """`session` paused for `group` on its first entry, as the step script leaves it."""
    await bus.register_service(ServiceInfo(group))
    await bus.publish(session, Tick(n=1))
    p = bus.keys.partition(session)
    stream = bus.keys.session(session)
    [(_, [(entry_id, _)])] = await raw(bus).xreadgroup(group, f"p{p}", {stream: ">"}, count=1)
    await raw(bus).hset(bus.keys.paused(p, group), session, entry_id)
    return str(entry_id.decode())


async def test_a_resume_removes_a_pause_letter_that_no_meta_notes(bus: Bus) -> None:
    """A pause from before the step noted its letter in the meta (`paused_letter:<group>`):
    the resume finds the letters of pauses on its entry among those written since, and removes
    them (they stayed listed); the partition's other letters stay."""
    entry = await paused_by_hand(bus, "call-1", "svc")
    p = bus.keys.partition("call-1")
    neighbour = next(
        s for s in (f"call-{i}" for i in range(2, 10_000)) if bus.keys.partition(s) == p
    )
    other = await paused_by_hand(bus, neighbour, "svc")  # the same partition's other session
    # call-1's later entry: not `other`, which is another stream's and may have entry's id
    later = f"{int(entry.split('-')[0]) + 1}-0"
    dead = bus.keys.dead(p)

    async def letter(session: str, group: str, of: str, policy: str) -> bytes:
        fields = {"session": session, "group": group, "entry": of, "deliveries": 5}
        fields |= {"error": "RuntimeError: down", "policy": policy, "type": "tick", "seq": 1}
        return bytes(await raw(bus).xadd(dead, fields))

    kept = [
        await letter(neighbour, "svc", other, "pause"),
        await letter("call-1", "crm", entry, "pause"),  # another group's
        await letter("call-1", "svc", later, "skip"),
    ]
    earlier = await letter("call-1", "svc", entry, "pause")  # a pause resumed before
    kept.append(await letter("call-1", "svc", later, "pause"))
    paused_on = await letter("call-1", "svc", entry, "pause")
    assert not await raw(bus).hexists(bus.keys.meta("call-1"), "paused_letter:svc")
    assert await bus.resume("call-1", "svc") == entry
    left = [letter_id for letter_id, _ in await raw(bus).xrange(dead)]
    assert left == kept and earlier not in left and paused_on not in left


async def test_a_resume_finds_a_letter_of_its_entrys_millisecond_with_a_lower_sequence(
    bus: Bus,
) -> None:
    """Ids are per stream: the letter of entry T-5 may be T-3 of the dead stream."""
    first = await paused_by_hand(bus, "call-1", "svc")
    ms = first.split("-")[0]
    entry, p = f"{ms}-5", bus.keys.partition("call-1")  # as if the 6th entry of that ms
    await raw(bus).hset(bus.keys.paused(p, "svc"), "call-1", entry)
    fields = {"session": "call-1", "group": "svc", "entry": entry, "deliveries": 1}
    fields |= {"error": "DecodeError: bad", "policy": "pause", "type": "tick", "seq": 6}
    await raw(bus).xadd(bus.keys.dead(p), fields, id=f"{ms}-3")
    assert await bus.resume("call-1", "svc", drop=True) == entry
    assert await raw(bus).xlen(bus.keys.dead(p)) == 0


async def test_a_resume_retried_after_a_lost_reply_reports_the_entry_it_resumed(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = await paused_by_hand(bus, "call-1", "svc")
    paused = bus.keys.paused(bus.keys.partition("call-1"), "svc")
    real = scripts.RESUME
    lost: list[Any] = []
    pause_again = False

    async def reply_lost(*args: Any, **kwargs: Any) -> Any:
        outcome = await real(*args, **kwargs)
        if not lost:  # it ran; its reply never came back
            lost.append(outcome)
            if pause_again:  # before the retry came, the entry failed and paused again
                await raw(bus).hset(paused, "call-1", entry)
            raise RedisConnectionError("connection lost")
        return outcome

    monkeypatch.setattr(scripts, "RESUME", reply_lost)
    assert await bus.resume("call-1", "svc") == entry  # not None: the first attempt resumed
    assert lost == [entry.encode()] and not await raw(bus).hexists(paused, "call-1")
    assert await bus.resume("call-1", "svc") is None  # another call: nothing is paused

    await raw(bus).hset(paused, "call-1", entry)
    lost.clear()
    pause_again = True
    assert await bus.resume("call-1", "svc") == entry
    assert lost == [entry.encode()]
    assert await raw(bus).hget(paused, "call-1") == entry.encode()  # not resumed twice
    assert await bus.resume("call-1", "svc") == entry  # another call resumes the new pause


async def test_a_service_sees_only_what_it_subscribes_to_and_acks_the_rest(bus: Bus) -> None:
    got: list[str] = []

    async def handle(d: Delivery) -> None:
        got.append(d.type)

    service = Service("notes", handle, Codec([Tick, Note]), subscribes=frozenset({"note"}))
    async with running(bus, service) as consumer:
        await bus.publish("call-1", Tick(n=1))
        await bus.publish("call-1", Note(text="hi"))
        await bus.publish("call-1", Tick(n=2), final=True)
        stream = bus.keys.session("call-1")

        async def retired() -> bool:
            return bool(await raw(bus).ttl(stream) > 0)

        await wait_for(retired, what="the session to retire once handled")
    assert got == ["note"] and consumer.stats.skipped == 2
    [group] = await raw(bus).xinfo_groups(stream)
    assert group["pending"] == 0 and group["lag"] == 0


async def test_a_worker_spreads_its_partitions_evenly_over_its_step_lanes(bus: Bus) -> None:
    got: list[str] = []

    async def handle(d: Delivery) -> None:
        got.append(d.session)

    async with running(bus, Service("svc", handle, Codec([Tick]))) as consumer:
        parts = consumer._parts.values()
        loads = [sum(part.steps is lane for part in parts) for lane in consumer._lanes]
        assert len(loads) == STEP_LANES > 1 and sum(loads) == bus.settings.partitions
        assert max(loads) - min(loads) <= 1
        lanes = {bus.keys.partition(f"call-{n}"): f"call-{n}" for n in range(40)}
        sessions = [s for p, s in lanes.items() if consumer._parts[p].steps is consumer._lanes[1]]
        sessions += [s for p, s in lanes.items() if consumer._parts[p].steps is consumer._lanes[0]]
        for session in sessions:
            await bus.publish(session, Tick(n=1))
        await wait_for(lambda: sorted(got) == sorted(sessions), what="every lane's sessions")


async def test_a_hung_handler_times_out_is_retried_and_dead_lettered(server: LocalServer) -> None:
    settings = make_settings(server.url, handler_timeout_seconds=0.05, max_deliveries=2)
    calls: list[int] = []

    async def handle(d: Delivery) -> None:
        calls.append(d.deliveries)
        if d.seq == 1:
            await anyio.sleep_forever()

    async with Bus.connect(settings) as bus, running(bus, Service("svc", handle, Codec([Tick]))):
        await bus.publish("call-1", Tick(n=1))
        await bus.publish("call-1", Tick(n=2))
        await wait_for(lambda: len(calls) == 3, what="two attempts then seq 2")
        [(_, dead)] = await raw(bus).xrange(bus.keys.dead(bus.keys.partition("call-1")))
    assert calls == [1, 2, 1]
    assert dead[b"error"] == b"handler timed out after 0.05s" and dead[b"deliveries"] == b"2"


async def test_a_graceful_stop_finishes_in_flight_work_and_hands_back_every_lease(
    bus: Bus,
) -> None:
    started, release = anyio.Event(), anyio.Event()
    done: list[int] = []

    async def handle(d: Delivery) -> None:
        started.set()
        await release.wait()
        done.append(d.seq)

    consumer = Consumer(bus, Service("svc", handle, Codec([Tick])))
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        await bus.publish("call-1", Tick(n=1))
        await started.wait()
        consumer.stop()  # drain begins while the handler runs
        release.set()
    assert done == [1]
    [group] = await raw(bus).xinfo_groups(bus.keys.session("call-1"))
    assert group["pending"] == 0  # acked before leaving
    leases = [bus.keys.lease(p, "svc") for p in range(bus.settings.partitions)]
    assert await raw(bus).exists(*leases) == 0
    assert await raw(bus).exists(bus.keys.members("svc")) == 0


async def test_a_handler_longer_than_the_lease_runs_once_while_another_worker_waits(
    bus: Bus, settings: Settings
) -> None:
    runs: list[str] = []
    finished = anyio.Event()

    async def slow(d: Delivery) -> None:
        runs.append(d.group)
        await anyio.sleep(settings.lease_ttl_seconds * 2.5)  # the handler's own work
        finished.set()

    service = Service("svc", slow, Codec([Tick]))
    async with running(bus, service) as first:
        await bus.publish("call-1", Tick(n=1))
        async with Bus.connect(settings) as other, running(other, service) as second:
            await finished.wait()
            assert first.stats.partitions_lost == second.stats.partitions_lost == 0
    assert runs == ["svc"]


async def test_a_graceful_stop_keeps_its_leases_while_a_handler_outlives_them(
    bus: Bus, settings: Settings
) -> None:
    """The drain renews the leases: no other worker takes the partition and runs the event
    again while the stopping worker's handler still runs."""
    handled: list[tuple[str, int, int]] = []
    running: list[str] = []
    overlaps: list[str] = []

    def service(name: str, hold: float) -> Service:
        async def handle(d: Delivery) -> None:
            handled.append((name, d.seq, d.deliveries))
            overlaps.extend(running)
            running.append(name)
            try:
                await anyio.sleep(hold)  # the handler's own work
            finally:
                running.remove(name)

        return Service("svc", handle, Codec([Tick]))

    first = Consumer(bus, service("first", settings.lease_ttl_seconds * 3))
    async with Bus.connect(settings) as other, anyio.create_task_group() as tg:
        await tg.start(first.run)
        await bus.publish("call-1", Tick(n=1))
        await wait_for(lambda: bool(running), what="the first handler")
        second = Consumer(other, service("second", 0))
        await tg.start(second.run)
        first.stop()  # the drain waits three lease TTLs for the handler
        await wait_for(lambda: not first._parts, what="the first worker's drain")

        async def second_owns_all() -> bool:
            owners = await lease_owners(bus, "svc")
            return len(owners.get(second.worker_id, [])) == bus.settings.partitions

        await wait_for(second_owns_all, what="the second worker taking every partition")
        await bus.publish("call-1", Tick(n=2))
        await wait_for(lambda: len(handled) == 2, what="the next event")
        second.stop()
    assert overlaps == [] and first.stats.partitions_lost == 0
    assert handled == [("first", 1, 1), ("second", 2, 1)]  # nothing ran twice


async def test_a_pending_entry_deleted_from_the_stream_is_dead_lettered_and_the_rest_handled(
    bus: Bus,
) -> None:
    """As a trim by someone else leaves it (redis/redis#6199): pending, with no fields."""
    await bus.register_service(ServiceInfo("svc"))
    for n in (1, 2, 3):
        await bus.publish("call-1", Tick(n=n))
    stream, p = bus.keys.session("call-1"), bus.keys.partition("call-1")
    # A previous owner read the first entry and died; then the entry was deleted.
    [[_, [(first, _)]]] = await raw(bus).xreadgroup("svc", f"p{p}", {stream: ">"}, count=1)
    await raw(bus).xdel(stream, first)
    seen: list[int] = []

    async def handle(d: Delivery) -> None:
        seen.append(d.seq)

    async with running(bus, Service("svc", handle, Codec([Tick]))):
        await wait_for(lambda: seen == [2, 3], what="the entries after it")
    [(_, letter)] = await raw(bus).xrange(bus.keys.dead(p))
    assert letter[b"entry"] == first
    assert letter[b"error"] == b"the entry was deleted from the stream before it was handled"


async def test_a_dead_letter_keeps_an_entry_field_named_as_one_of_its_own_as_orig(
    bus: Bus,
) -> None:
    """A letter's own fields (session, error...) are the letter's; an entry's field of the
    same name is kept beside them, as ``orig.<name>``, not taken for the letter's."""
    await bus.register_service(ServiceInfo("svc"))
    stream, p = bus.keys.session("call-1"), bus.keys.partition("call-1")
    await bus.publish("call-1", Tick(n=1))
    fields = {"type": "nobody.knows", "seq": "9", "ts": "1", "data": "{}", "error": "a field"}
    await raw(bus).xadd(stream, fields)  # appended by hand
    await bus.publish("call-1", Tick(n=2))
    seen: list[int] = []

    async def handle(d: Delivery) -> None:
        seen.append(d.seq)

    async with running(bus, Service("svc", handle, Codec([Tick]))):
        await wait_for(lambda: seen == [1, 2], what="the events around it")
    [(_, letter)] = await raw(bus).xrange(bus.keys.dead(p))
    assert letter[b"error"] == b"unknown type 'nobody.knows'"
    assert letter[b"orig.error"] == b"a field" and letter[b"type"] == b"nobody.knows"


class _BusyLaneWakeUp(asyncio.Event):
    """A step lane's wake-up that comes a little late, as when its last batch is still out:
    steps made meanwhile go in one batch."""

    async def wait(self) -> Literal[True]:
        await super().wait()
        await asyncio.sleep(0.005)
        return True


async def test_events_after_a_handler_cut_short_in_its_step_are_handled(
    server: LocalServer,
) -> None:
    """A handler that swallows its timeout returns, and the run is cancelled in the step that
    acknowledges it and reads on; that step's read must not take entries nobody handles."""
    settings = make_settings(server.url, handler_timeout_seconds=0.2)
    seen: list[int] = []
    started = anyio.Event()

    async def handle(d: Delivery) -> None:
        if d.seq == 1 and d.deliveries == 1:
            started.set()
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                pass  # swallowed: the cancellation comes again at the run's next wait
        seen.append(d.seq)

    async with Bus.connect(settings) as bus:
        consumer = Consumer(bus, Service("svc", handle, Codec([Tick])))
        for lane in consumer._lanes:
            lane._ready = _BusyLaneWakeUp()
        async with anyio.create_task_group() as tg:
            await tg.start(consumer.run)
            await bus.publish("call-1", Tick(n=1))
            await started.wait()
            await bus.publish("call-1", Tick(n=2))
            await bus.publish("call-1", Tick(n=3), final=True)
            await wait_for(lambda: {2, 3} <= set(seen), limit=10, what="the events after it")
            consumer.stop()


async def test_a_resume_whose_hint_comes_as_the_paused_run_ends_runs_the_session(
    server: LocalServer,
) -> None:
    """The paused run's last step (it gives back the entry it read along) is held until the
    resume's hint has reached the consumer: the run must not end with the hint lost."""
    settings = make_settings(server.url, max_deliveries=1, dead_letter_policy="pause")
    seen: list[int] = []
    failing = [True]

    async def handle(d: Delivery) -> None:
        if failing[0]:
            raise RuntimeError("downstream is down")
        seen.append(d.seq)

    async with Bus.connect(settings) as bus:
        await bus.register_service(ServiceInfo("svc"))
        consumer = Consumer(bus, Service("svc", handle, Codec([Tick])))
        stream, p = bus.keys.session("call-1"), bus.keys.partition("call-1")
        held: list[Step] = []
        for lane in consumer._lanes:

            def submit(step: Step, submit: Any = lane.submit) -> Any:
                if step.stream == stream and step.give and not step.read and not held:
                    held.append(step)

                    async def after_the_resume() -> Any:
                        failing[0] = False
                        assert await bus.resume("call-1", "svc") is not None
                        part = consumer._parts[p]
                        await wait_for(lambda: part.sessions.get("call-1") is True)
                        return await submit(step)

                    return asyncio.ensure_future(after_the_resume())
                return submit(step)

            lane.submit = submit  # type: ignore[method-assign]

        async with anyio.create_task_group() as tg:
            await tg.start(consumer.run)
            await bus.publish("call-1", Tick(n=1))

            async def paused() -> bool:
                return bool(await raw(bus).hexists(bus.keys.paused(p, "svc"), "call-1"))

            await wait_for(paused, what="the session to pause")
            await bus.publish("call-1", Tick(n=2), final=True)  # read along, given back
            await wait_for(lambda: seen == [1, 2], limit=10, what="the resumed session")
            consumer.stop()
        assert held


async def test_a_hint_missed_while_the_first_scan_still_runs_is_made_up_for(bus: Bus) -> None:
    await bus.register_service(ServiceInfo("svc"))
    p = bus.keys.partition("call-1")
    await bus.publish("call-1", Tick(n=1))
    seen: list[int] = []
    returned = anyio.Event()
    sscan = bus.redis.sscan_iter

    async def slow_sscan(key: str, **options: Any) -> AsyncIterator[bytes]:
        async for member in sscan(key, **options):
            yield member
            if key == bus.keys.live(p) and not returned.is_set():
                returned.set()
                await anyio.sleep(1.5)  # the rest of a large live set

    async def handle(d: Delivery) -> None:
        seen.append(d.seq)

    bus.redis.sscan_iter = slow_sscan  # type: ignore[method-assign,assignment]
    consumer = Consumer(bus, Service("svc", handle, Codec([Tick])))
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        await returned.wait()
        await wait_for(lambda: seen == [1], what="the first event")
        await wait_for(lambda: "call-1" not in consumer._parts[p].sessions, what="its run's end")
        await raw(bus).execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # hints lost now
        await bus.publish("call-1", Tick(n=2))
        await wait_for(lambda: seen == [1, 2], limit=10, what="the event published meanwhile")
        consumer.stop()


async def test_a_stop_while_the_first_scan_cannot_reach_the_server_ends(
    server: LocalServer,
) -> None:
    settings = make_settings(server.url, drain_timeout_seconds=1.0, partitions=4)
    scans: list[str] = []

    async def down(key: str, **options: Any) -> AsyncIterator[bytes]:
        scans.append(key)
        raise RedisConnectionError("Error 111 connecting: Connection refused.")
        yield b""  # an async generator

    async def handle(d: Delivery) -> None:
        pass

    async with Bus.connect(settings) as bus:
        bus.redis.sscan_iter = down  # type: ignore[method-assign,assignment]
        consumer = Consumer(bus, Service("svc", handle, Codec([Tick])))
        with anyio.fail_after(60):  # it waited as long as the server was away: here, forever
            async with anyio.create_task_group() as tg:
                await tg.start(consumer.run)
                await wait_for(lambda: len(scans) >= 4, what="the first scans failing")
                consumer.stop()


@pytest.mark.parametrize("mode", ["each", "batch"])
async def test_a_drain_out_of_time_settles_what_was_handled_and_gives_back_the_rest(
    server: LocalServer, mode: str
) -> None:
    """The next owner repeats neither the events handled before the stuck one, nor counts a
    second delivery of those read along but never started."""
    settings = make_settings(server.url, drain_timeout_seconds=0.3, ack_mode=mode)
    first: list[int] = []
    after: list[tuple[int, int]] = []

    async def stuck_at_3(d: Delivery) -> None:
        first.append(d.seq)
        if d.seq == 3:
            await anyio.sleep_forever()

    async def record(d: Delivery) -> None:
        after.append((d.seq, d.deliveries))

    async with Bus.connect(settings) as bus:
        await bus.register_service(ServiceInfo("svc"))
        for n in range(1, 6):
            await bus.publish("call-1", Tick(n=n))  # one read takes all five
        consumer = Consumer(bus, Service("svc", stuck_at_3, Codec([Tick])))
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consumer.run)
                await wait_for(lambda: first == [1, 2, 3], what="the stuck handler")
                consumer.stop()  # its drain runs out of time
        async with running(bus, Service("svc", record, Codec([Tick]))):
            await wait_for(lambda: len(after) == 3, what="the rest handled")
    assert after == [(3, 2), (4, 1), (5, 1)]


async def test_a_drain_out_of_time_gives_back_what_waited_for_a_handler_slot(
    server: LocalServer,
) -> None:
    """One slot (`concurrency` 1), held by a stuck handler: the other session (of the same
    partition, so that both are cut short at once) read its entries but started none, so the
    next owner delivers them for the first time."""
    settings = make_settings(server.url, drain_timeout_seconds=0.3, concurrency=1)
    after: list[tuple[str, int, int]] = []
    stuck = anyio.Event()

    async def stick(d: Delivery) -> None:
        stuck.set()
        await anyio.sleep_forever()

    async def record(d: Delivery) -> None:
        after.append((d.session, d.seq, d.deliveries))

    async with Bus.connect(settings) as bus:
        await bus.register_service(ServiceInfo("svc"))
        p = bus.keys.partition("call-1")
        other = next(f"call-{i}" for i in range(2, 10_000) if bus.keys.partition(f"call-{i}") == p)
        await bus.publish("call-1", Tick(n=1))
        consumer = Consumer(bus, Service("svc", stick, Codec([Tick])))
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consumer.run)
                await stuck.wait()
                for n in (1, 2):
                    await bus.publish(other, Tick(n=n))

                async def read_and_waiting() -> bool:  # its first, or both if read at once
                    [group] = await raw(bus).xinfo_groups(bus.keys.session(other))
                    return bool(group["pending"] >= 1)

                await wait_for(read_and_waiting, what="the other read, waiting for the slot")
                consumer.stop()
        async with running(bus, Service("svc", record, Codec([Tick]))):
            await wait_for(lambda: len(after) == 3, what="the rest handled")
    assert sorted(after) == [("call-1", 1, 2), (other, 1, 1), (other, 2, 1)]


async def test_a_service_keeps_its_own_state_per_session_and_a_stale_owner_cannot_write_it(
    bus: Bus,
) -> None:
    seen: list[bytes | None] = []
    deliveries: list[Delivery] = []

    async def handle(d: Delivery) -> None:
        seen.append(await d.load_state())
        await d.save_state(b"after-%d" % d.seq)
        deliveries.append(d)

    async with running(bus, Service("svc", handle, Codec([Tick]))):
        for n in (1, 2):
            await bus.publish("call-1", Tick(n=n))
        await wait_for(lambda: len(seen) == 2, what="two events")
    assert seen == [None, b"after-1"]
    with pytest.raises(FencedError, match="lost partition"):  # its leases were released
        await deliveries[-1].save_state(b"late")
    assert (await bus.read_state("call-1"))["group:svc"] == b"after-2"


async def test_shared_state_fields_are_written_and_read_by_anyone(bus: Bus) -> None:
    await bus.publish("call-1", Tick(n=1), final=True)  # retired at once: no group reads it
    await bus.write_state("call-1", {"flow.count": "3"})
    assert await bus.read_state("call-1") == {"flow.count": b"3"}
    assert 0 < await raw(bus).ttl(bus.keys.state("call-1")) <= bus.settings.retention_seconds
    with pytest.raises(NoSuchSessionError):
        await bus.write_state("call-none", {"flow.x": "1"})
    with pytest.raises(TypeError, match=r"state field 'flow\.y': names are str, values str or"):
        await bus.write_state("call-1", {"flow.count": "4", "flow.y": None})  # type: ignore[dict-item]
    assert await bus.read_state("call-1") == {"flow.count": b"3"}  # nothing of it written


async def test_no_more_handlers_run_at_once_than_the_concurrency_setting(
    server: LocalServer,
) -> None:
    settings = make_settings(server.url, concurrency=2)
    running_now, most, handled = 0, 0, 0

    async def handle(d: Delivery) -> None:
        nonlocal running_now, most, handled
        running_now += 1
        most = max(most, running_now)
        await anyio.sleep(0.005)
        running_now -= 1
        handled += 1

    async with Bus.connect(settings) as bus, running(bus, Service("svc", handle, Codec([Tick]))):
        for n in range(1, 4):
            for i in range(8):
                await bus.publish(f"call-{i}", Tick(n=n))
        await wait_for(lambda: handled == 24, what="every event")
    assert most == 2


async def test_a_handler_that_swallows_its_timeout_does_not_stop_the_session(
    server: LocalServer,
) -> None:
    settings = make_settings(server.url, handler_timeout_seconds=0.05)
    seen: list[int] = []

    async def handle(d: Delivery) -> None:
        if d.seq == 1:
            try:
                await anyio.sleep(5)
            except anyio.get_cancelled_exc_class():
                pass  # a handler should not do this; the worker must survive it
        seen.append(d.seq)

    async with Bus.connect(settings) as bus:
        await bus.publish("call-1", Tick(n=1))
        await bus.publish("call-1", Tick(n=2))
        async with running(bus, Service("svc", handle, Codec([Tick]))):
            await wait_for(lambda: seen == [1, 2], what="both events, once each")
            await bus.publish("call-1", Tick(n=3))
            await wait_for(lambda: seen == [1, 2, 3], what="the session to go on")


async def test_a_fenced_owner_never_starts_the_next_event_of_the_session(bus: Bus) -> None:
    seen: list[int] = []
    p = bus.keys.partition("call-1")

    async def handle(d: Delivery) -> None:
        seen.append(d.seq)
        if d.seq == 1:  # meanwhile another worker takes the partition (this one stalled, say)
            await raw(bus).delete(bus.keys.lease(p, "svc"))
            thief = Leases(bus.redis, bus.keys, "svc", "thief", ttl_ms=60_000)
            assert await thief.acquire([p])

    for n in (1, 2, 3):  # read in one batch: 2 and 3 wait in this worker
        await bus.publish("call-1", Tick(n=n))
    async with running(bus, Service("svc", handle, Codec([Tick]))) as consumer:
        await wait_for(lambda: consumer.stats.partitions_lost == 1, what="the partition lost")
        assert p not in consumer.partitions
    assert seen == [1]  # its ack was refused, so it stopped before seq 2


async def test_a_partition_handed_back_while_leases_are_renewed_is_not_counted_lost(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer = Consumer(bus, Service("svc", _ignore, Codec([Tick])), worker_id="w")
    lease, read = bus.keys.lease(7, "svc"), reader(bus.keys, 7, "svc", "3:w", 32)
    consumer._parts[7] = Partition(7, "3:w", consumer._lanes[0], lease, read)

    async def members(*, leave: bool = False) -> list[str]:
        return ["other"]  # everything is the other worker's now

    async def renew(tokens: dict[int, str], **_: Any) -> Renewal:
        del consumer._parts[7]  # its drain ended meanwhile, and released the lease
        return Renewal({7}, {})  # so it is no longer held

    monkeypatch.setattr(consumer._leases, "heartbeat", members)
    monkeypatch.setattr(consumer._leases, "renew", renew)
    await consumer._rebalance()  # a KeyError here stopped the whole worker
    assert consumer.stats.partitions_lost == 0


async def test_a_server_lost_during_a_heartbeat_round_fails_the_round_not_the_worker(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gone after the renewal, before the registry check: the heartbeat fails, the renewal
    stands. A lease whose renewal got no answer is let go once renewed a TTL ago. (The check
    used to retry for 15 s, then stop the worker with `ConnectionFailedError`.)"""
    consumer = Consumer(bus, Service("svc", _ignore, Codec([Tick])), worker_id="w")
    lease, read = bus.keys.lease(7, "svc"), reader(bus.keys, 7, "svc", "3:w", 32)
    consumer._parts[7] = part = Partition(7, "3:w", consumer._lanes[0], lease, read)
    gone = RedisConnectionError("Error 111 connecting to the server. Connection refused.")
    renewal = Renewal(set(), {})

    async def members(*, leave: bool = False) -> list[str]:
        return ["w"]

    async def renew(tokens: dict[int, str], **_: Any) -> Renewal:
        return renewal

    async def refused(*args: object) -> None:
        raise gone

    monkeypatch.setattr(consumer._leases, "heartbeat", members)
    monkeypatch.setattr(consumer._leases, "renew", renew)
    monkeypatch.setattr(bus.redis, "hsetnx", refused)
    with capture_logs() as logs:
        with anyio.fail_after(5):
            assert await consumer._rebalance() is False
    assert [e["event"] for e in logs] == ["heartbeat_failed"]
    assert time.monotonic() < part.vouched_until  # renewed all the same

    renewal = Renewal(set(), {7: gone})
    lease8, read8 = bus.keys.lease(8, "svc"), reader(bus.keys, 8, "svc", "3:w", 32)
    consumer._parts[8] = Partition(8, "3:w", consumer._lanes[0], lease8, read8)
    part.vouched_until = time.monotonic() - 0.001  # last renewed a TTL ago
    consumer._renewed_at = 0.0
    with capture_logs() as logs:
        await consumer._rebalance()
    events = [(e["event"], e.get("reason")) for e in logs]
    assert ("renewal_failed", None) in events
    assert ("partition_lost", "lease_expired") in events
    assert consumer._renewed_at > 0  # alive: partition 8's lease was renewed


async def _ignore(d: Delivery) -> None:
    pass


async def test_a_new_owner_replays_what_was_left_pending_then_reads_on_counting_deliveries(
    bus: Bus,
) -> None:
    p = bus.keys.partition("call-1")
    await bus.register_service(ServiceInfo("svc"))
    for n in (1, 2, 3, 4, 5):
        await bus.publish("call-1", Tick(n=n))
    # a worker that died had read seq 1-3 (pending for the partition's consumer), not 4 and 5
    stream = bus.keys.session("call-1")
    await raw(bus).xreadgroup("svc", bus.keys.consumer(p), {stream: ">"}, count=3)
    seen: list[tuple[int, int]] = []

    async def handle(d: Delivery) -> None:
        seen.append((d.seq, d.deliveries))
        if d.seq == 1:  # published while the inherited entries are replayed
            await bus.publish("call-1", Tick(n=6))

    async with running(bus, Service("svc", handle, Codec([Tick]))):
        await wait_for(lambda: len(seen) == 6, what="six events handled")
    assert seen == [(1, 2), (2, 2), (3, 2), (4, 1), (5, 1), (6, 1)]
    pending = await bus.redis.xpending(stream, "svc")
    assert pending["pending"] == 0


async def test_a_drain_out_of_time_cancels_the_handlers_left_even_one_that_resists(
    server: LocalServer,
) -> None:
    settings = make_settings(server.url, drain_timeout_seconds=0.3, handler_timeout_seconds=60)
    started: list[str] = []
    cancelled_again: list[str] = []

    async def handle(d: Delivery) -> None:
        started.append(d.session)
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            if d.session == "call-2":  # a handler should not do this: it is cancelled again
                try:
                    await anyio.sleep(30)
                except anyio.get_cancelled_exc_class():
                    cancelled_again.append(d.session)
            raise

    async with Bus.connect(settings) as bus:
        for session in ("call-1", "call-2"):
            await bus.publish(session, Tick(n=1))
        consumer = Consumer(bus, Service("svc", handle, Codec([Tick])))
        with anyio.fail_after(10), capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(consumer.run)
                await wait_for(lambda: len(started) == 2, what="both handlers running")
                consumer.stop()  # run() returns once the drain ran out of time
        assert cancelled_again == ["call-2"]
        timed_out = [x for x in logs if x["event"] == "drain_timed_out"]
        assert sum(x["left"] for x in timed_out) == 2  # the sessions it left running
        for session in ("call-1", "call-2"):  # not acknowledged: the next owner handles them
            pending = await bus.redis.xpending(bus.keys.session(session), "svc")
            assert pending["pending"] == 1


class _FakeRun:
    """What `Runs` needs of a `Run`: a cancel scope that `close()` cancels."""

    def __init__(self) -> None:
        self.scope, self.closing = anyio.CancelScope(), False

    def close(self) -> None:
        self.closing = True
        self.scope.cancel()


async def test_a_partitions_runs_are_joined_fail_together_and_close_through_their_scopes() -> None:
    failed: list[str] = []
    runs = Runs(lambda: failed.append("partition"))
    gate, done = anyio.Event(), []

    async def waits() -> None:
        await gate.wait()

    async def fails() -> None:
        await gate.wait()
        raise KeyError("a bug")

    runs.spawn(cast(Run, _FakeRun()), waits())
    runs.spawn(cast(Run, _FakeRun()), fails())
    gate.set()
    with anyio.fail_after(5):
        await runs.join()
    assert failed == ["partition"] and isinstance(runs.error, KeyError)

    waiting: list[str] = []

    async def shields(run: _FakeRun) -> None:
        with run.scope:
            with anyio.CancelScope(shield=True):  # as the bus's own batches are
                waiting.append("shields")
                await anyio.sleep(0.2)
                done.append("shielded")
            await anyio.sleep(30)

    async def resists(run: _FakeRun) -> None:
        with run.scope:
            try:
                waiting.append("resists")
                await anyio.sleep(30)
            except anyio.get_cancelled_exc_class():
                pass  # a session should not do this: its next wait is cancelled too
            await anyio.sleep(30)
            done.append("never")

    for session in (shields, resists):
        run = _FakeRun()
        runs.spawn(cast(Run, run), session(run))
    await wait_for(lambda: len(waiting) == 2, what="both sessions waiting")
    with anyio.fail_after(5):
        await runs.close()
    assert done == ["shielded"]

    late = _FakeRun()  # spawned after the close began: closed at once
    runs.spawn(cast(Run, late), waits())
    assert late.closing
    await runs.join()


async def test_a_hint_link_that_goes_silent_is_found_out_and_nothing_is_missed(
    bus: Bus, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link a NAT forgot drops what is sent on it without closing: the worker pings its
    quiet wake-up link, and when no answer comes, subscribes again and rescans."""
    monkeypatch.setattr(hints, "HINT_READ_SECONDS", 0.3)
    proxy = Proxy(int(settings.url.rsplit(":", 1)[1].split("/")[0]))
    through = msgspec.structs.replace(settings, url=await proxy.start())
    seen: list[str] = []

    async def handle(d: Delivery) -> None:
        seen.append(d.session)

    async with anyio.create_task_group() as tg:
        tg.start_soon(proxy.serve)
        async with Bus.connect(through) as worker_bus:
            async with running(worker_bus, Service("svc", handle, Codec([Tick]))):
                await bus.publish("call-before", Tick(n=1))
                await wait_for(lambda: seen == ["call-before"], what="the first hint's session")
                proxy.silence(b"SSUBSCRIBE")
                await bus.publish("call-after", Tick(n=1))  # its hint is dropped on the way
                await wait_for(lambda: "call-after" in seen, limit=10, what="the later session")
        tg.cancel_scope.cancel()
    assert seen == ["call-before", "call-after"]


async def test_a_partition_taken_again_before_its_channel_was_let_go_is_told_at_once(
    bus: Bus,
) -> None:
    """A partition lost and taken again (a new partition object) before the hint follower saw
    it go keeps its channel's subscription, so no confirmation will come: it is told at once
    that its hints reach it, or it would wait for one, handling nothing. A channel no longer
    wanted is let go."""
    old, new = object(), object()
    wanted = {3: old}
    channel = bus.keys.wake(3)

    async def listeners() -> int:
        [_, count] = await raw(bus).execute_command("PUBSUB", "SHARDNUMSUB", channel)
        return int(count)

    told: list[tuple[object, bool]] = []
    follower: hints.Hints[object] = hints.Hints(
        bus.settings,
        bus.keys,
        wanted=lambda: wanted,
        on_hint=lambda part, session: None,
        on_subscribed=lambda part, confirmed: told.append((part, confirmed)),
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(follower.run)
        await wait_for(lambda: told == [(old, True)], what="the channel subscribed")
        wanted = {3: new}
        follower.changed()
        await wait_for(lambda: told == [(old, True), (new, False)], what="the new one told")
        assert await listeners() == 1
        wanted = {}
        follower.changed()

        async def let_go() -> bool:
            return await listeners() == 0

        await wait_for(let_go, what="the channel let go")
        tg.cancel_scope.cancel()


async def test_a_stale_owner_cannot_write_the_sessions_shared_state_either(bus: Bus) -> None:
    """DESIGN: a stale owner is fenced, "its acks and state writes are refused". A worker's
    action writes the flow's `state` through `write_session_state`: after its lease is gone,
    that write must be refused as `save_state` is, not overwrite what the new owner wrote."""
    deliveries: list[Delivery] = []

    async def handle(d: Delivery) -> None:
        await d.write_session_state({"flow.step": b'"first"'})
        deliveries.append(d)

    async with running(bus, Service("svc", handle, Codec([Tick]))):
        await bus.publish("call-1", Tick(n=1))
        await wait_for(lambda: len(deliveries) == 1, what="the event")
    await bus.write_state("call-1", {"flow.step": b'"newer"'})  # the session went on
    with pytest.raises(FencedError, match="lost partition"):  # its leases were released
        await deliveries[-1].write_session_state({"flow.step": b'"stale"'})
    assert (await bus.read_state("call-1"))["flow.step"] == b'"newer"'


async def test_a_client_or_worker_given_another_partition_count_than_the_deployments_is_refused(
    bus: Bus, settings: Settings
) -> None:
    """With another count a session maps to other keys: its events would go unhandled."""
    other = msgspec.structs.replace(settings, partitions=settings.partitions * 2)
    async with Bus.connect(other):  # nothing recorded yet: no worker has started
        pass
    async with running(bus, Service("svc", _ignore, Codec([Tick]))):
        pass
    assert await raw(bus).hget(bus.keys.deployment(), "partitions") == b"64"
    with pytest.raises(ConfigError, match=r"partitions is 128, but the deployment .* has 64"):
        async with Bus.connect(other):
            pass
    async with Bus.connect(settings):  # the same count
        pass
    with pytest.raises(ConfigError, match="has 64"):
        await Consumer(Bus(bus.redis, other), Service("svc", _ignore, Codec([Tick]))).run()


async def test_a_stop_while_a_lease_is_being_taken_gives_it_back(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leases are taken in the background: a stop that comes before the reply waits for it
    and gives back what was taken. (The stop cancelled the taking, and the server held the
    lease for nobody until its TTL ran out: the next owner waited that long.)"""
    settings = make_settings(server.url, lease_ttl_seconds=30.0, partitions=4)
    async with Bus.connect(settings) as bus:
        p, lease = 2, bus.keys.lease(2, "svc")
        other = Leases(bus.redis, bus.keys, "svc", "other", ttl_ms=60_000)
        [token] = (await other.acquire([p])).values()  # so the start leaves it to take
        consumer = Consumer(bus, Service("svc", _ignore, Codec([Tick])))
        acquire, heartbeat = consumer._leases.acquire, consumer._leases.heartbeat
        taken, reply = anyio.Event(), anyio.Event()

        async def answered_late(partitions: list[int], **kwargs: Any) -> dict[int, str]:
            tokens = await acquire(partitions, **kwargs)
            if tokens:  # the server took it; its reply is still on its way
                taken.set()
                await reply.wait()
            return tokens

        async def leave(*, leave: bool = False) -> list[str]:
            members = await heartbeat(leave=leave)
            if leave:  # the reply comes just after the worker left its group
                asyncio.get_running_loop().call_soon(reply.set)
            return members

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                await tg.start(consumer.run)
                assert consumer.partitions == [0, 1, 3]
                monkeypatch.setattr(consumer._leases, "acquire", answered_late)
                monkeypatch.setattr(consumer._leases, "heartbeat", leave)
                await other.release(p, token)
                await taken.wait()
                consumer.stop()
        assert await raw(bus).get(lease) is None


async def test_a_worker_records_the_partition_count_again_when_the_server_lost_it(
    bus: Bus,
) -> None:
    async with running(bus, Service("svc", _ignore, Codec([Tick]))):
        await raw(bus).delete(bus.keys.services(), bus.keys.deployment())  # a restart, no data

        async def recorded() -> bool:
            return bool(await raw(bus).hget(bus.keys.deployment(), "partitions") == b"64")

        await wait_for(recorded, what="the count recorded again")


async def test_entries_whose_read_reply_was_lost_are_handled_next_from_the_pending_list(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read the server ran whose reply never came delivered its entries all the same (they
    are ours, pending): the step's retry reads the pending head, not new entries, so they are
    handled next, in order, with their count of deliveries, without waiting for another event.
    (Batches of 2: the lost read is the run's second, a read-on after a full batch.)"""
    seen: list[tuple[int, int]] = []
    lose = anyio.Event()
    real_batch = connection.batch

    async def reply_lost(link: Any, commands: list[Any], **kwargs: Any) -> list[Any]:
        replies = await real_batch(link, commands, **kwargs)
        if lose.is_set() and any(c[0] == "XREADGROUP" for c in commands):
            monkeypatch.setattr(steps, "batch", real_batch)
            return [RedisConnectionError("Connection reset by peer")] * len(commands)
        return replies

    async def handle(d: Delivery) -> None:
        seen.append((d.seq, d.deliveries))
        if d.seq == 2:  # the next read is the one whose reply is lost
            lose.set()

    monkeypatch.setattr(steps, "batch", reply_lost)
    async with Bus.connect(make_settings(server.url, read_batch=2)) as bus:
        await bus.register_service(ServiceInfo("svc"))
        for n in (1, 2, 3, 4):
            await bus.publish("call-1", Tick(n=n))
        async with running(bus, Service("svc", handle, Codec([Tick]))):
            await wait_for(lambda: len(seen) == 4, what="the entries of the lost reply")
    assert seen == [(1, 1), (2, 1), (3, 2), (4, 2)]


async def test_a_handler_fenced_because_its_lease_moved_loses_the_partition_at_once(
    server: LocalServer,
) -> None:
    """Its command refused (`FencedError` from `Delivery.send`), the handler is not retried
    here: the partition is another's now, and so is the event. (Leases of 30 s: a renewal,
    every 6 s, does not come between the move and the send, where it would find the lease
    lost first, as it did once in CI with the tests' 1 s.)"""
    calls: list[int] = []
    settings = make_settings(server.url, lease_ttl_seconds=30.0)
    async with Bus.connect(settings) as bus:

        async def handle(d: Delivery) -> None:
            calls.append(d.deliveries)
            lease = bus.keys.lease(bus.keys.partition(d.session), "svc")
            await raw(bus).set(lease, "999:another-worker")  # it moved while this ran
            await d.send(Tick(n=0))

        consumer = Consumer(bus, Service("svc", handle, Codec([Tick])))
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                await tg.start(consumer.run)
                await bus.publish("call-1", Tick(n=1))
                await wait_for(
                    lambda: consumer.stats.partitions_lost == 1, what="the partition lost"
                )
                consumer.stop()
        assert await raw(bus).xlen(bus.keys.inbox("call-1")) == 0  # its command not written
    assert calls == [1] and consumer.stats.retries == 0
    [lost] = [x for x in logs if x["event"] == "partition_lost"]
    assert lost["reason"] == "fenced"
    assert not [x for x in logs if x["event"] == "handler_failed"]


async def test_a_handler_that_stalled_past_its_lease_goes_on_once_the_lease_is_renewed(
    bus: Bus,
) -> None:
    """`Delivery.ensure_owned` after a stall of a lease TTL, the lease still ours: it returns
    after the next renewal (vouched for again), and the handling goes on."""
    vouched: list[bool] = []

    async def handle(d: Delivery) -> None:
        await d.ensure_owned()  # vouched for: at once
        part = consumer._parts[bus.keys.partition(d.session)]
        part.vouched_until = time.monotonic() - 0.001  # it stalled: renewed a TTL ago
        await d.ensure_owned()
        vouched.append(time.monotonic() < part.vouched_until)

    consumer = Consumer(bus, Service("svc", handle, Codec([Tick])))
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        await bus.publish("call-1", Tick(n=1))
        await wait_for(lambda: consumer.stats.handled == 1, what="the event handled")
        consumer.stop()
    assert vouched == [True] and consumer.stats.partitions_lost == 0


async def test_a_services_lifespan_holds_what_its_handlers_use_while_the_consumer_runs(
    bus: Bus,
) -> None:
    """Entered before the consumer joins its group, left once it drained: a handling still
    running at the stop finishes with what the lifespan holds."""
    seen: list[str] = []
    started = anyio.Event()
    release = anyio.Event()

    @asynccontextmanager
    async def pool() -> AsyncIterator[None]:
        seen.append(f"entered, registered: {[s.name for s in await bus.services(fresh=True)]}")
        yield
        seen.append("left")

    async def handle(d: Delivery) -> None:
        started.set()
        await release.wait()
        seen.append(f"handled {d.seq}")

    async with running(bus, Service("svc", handle, Codec([Tick]), lifespan=pool)) as consumer:
        await bus.publish("call-1", Tick(n=1))
        await started.wait()
        consumer.stop()  # the drain waits for the handling, the lifespan for the drain
        release.set()
    assert seen == ["entered, registered: []", "handled 1", "left"]


async def nothing(d: Delivery) -> None:
    pass  # (a handler that is never called)


async def test_a_lifespan_that_fails_to_start_fails_the_consumer_before_it_joins(
    bus: Bus,
) -> None:
    @asynccontextmanager
    async def unreachable() -> AsyncIterator[None]:
        raise OSError("the database is out of reach")
        yield

    consumer = Consumer(bus, Service("svc", nothing, Codec([Tick]), lifespan=unreachable))
    with pytest.raises(LifespanError, match="'svc' failed to start") as failed:
        with anyio.fail_after(10):
            await consumer.run()
    assert isinstance(failed.value.__cause__, OSError)
    assert await bus.services(fresh=True) == []


def test_a_lifespan_must_be_a_function() -> None:
    with pytest.raises(ConfigError, match="lifespan of service 'svc' must be a function"):
        Service("svc", nothing, Codec([Tick]), lifespan=object())  # type: ignore[arg-type]
