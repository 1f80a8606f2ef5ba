"""The ordering contract with real worker processes on a real server (issue: bus, tests 1-6)."""

from __future__ import annotations

import itertools
import signal
from collections import Counter
from collections.abc import Collection, Iterable
from functools import partial

import anyio
import pytest

from bus import Bus, Settings
from tests.apps.recorder import Tick
from tests.conftest import KIND, make_settings
from tests.support import (
    Handled,
    WorkerProcesses,
    assert_in_order,
    assert_replayed_in_order,
    by_session,
    handled,
    lease_owners,
    raw,
    wait_for,
)
from workers.observe import live_session_count
from workers.server import LocalServer

pytestmark = pytest.mark.anyio
RECORDER = "tests.apps.recorder:service"


async def publish(
    bus: Bus,
    sessions: Iterable[str],
    events: int,
    fail: Collection[int] = (),
    *,
    hold: tuple[int, anyio.Event] | None = None,
    final: bool = True,
    first: int = 1,
) -> dict[str, int]:
    """Publish `events` ticks to each session (numbered from `first`), sessions concurrently,
    each in order, the last one final unless not `final`; with `hold` (n, event), tick n and
    later wait for the event."""
    sessions = list(sessions)

    async def one(session: str) -> None:
        for i in range(first, first + events):
            if hold and i == hold[0]:
                await hold[1].wait()
            await bus.publish(
                session, Tick(n=i, fail=i in fail), final=final and i == first + events - 1
            )

    async with anyio.create_task_group() as tg:
        for session in sessions:
            tg.start_soon(one, session)
    return dict.fromkeys(sessions, events)


async def settled(bus: Bus, group: str, workers: int) -> None:
    async def balanced() -> bool:
        owners = await lease_owners(bus, group)
        counts = sorted(len(p) for p in owners.values())
        return (
            len(owners) == workers
            and sum(counts) == bus.settings.partitions
            and counts[-1] - counts[0] <= 1
        )

    await wait_for(balanced, what=f"{workers} workers to split the partitions")


async def count_handled(bus: Bus, group: str = "recorder") -> int:
    return int(await raw(bus).llen(f"{bus.settings.prefix}:test:handled:{group}"))


async def progressed(bus: Bus, n: int, group: str = "recorder") -> bool:
    """At least `n` handlings recorded."""
    return await count_handled(bus, group) >= n


async def all_handled(bus: Bus, events: int, group: str = "recorder") -> bool:
    """At least `events` distinct events (session, seq) handled, redeliveries aside."""
    return len({(r.session, r.seq) for r in await handled(bus, group)}) >= events


async def no_live_sessions(bus: Bus) -> bool:
    return await live_session_count(bus) == 0


#: For the tests that kill nothing and want no duplicate: the default lease, not the tests'
#: 1 s, which a worker starved of the CPU for most of a second (five processes on two cores)
#: would lose, its in-flight event then handled again by the next owner.
CALM = {"lease_ttl_seconds": Settings().lease_ttl_seconds}


async def test_four_workers_handle_every_session_in_order_exactly_once(
    server: LocalServer, workers: WorkerProcesses
) -> None:
    settings = make_settings(server.url, **CALM)
    async with Bus.connect(settings) as bus:
        procs = [workers.start(RECORDER, settings) for _ in range(4)]
        await settled(bus, "recorder", 4)
        expected = await publish(bus, (f"call-{i}" for i in range(200)), 50)

        await wait_for(lambda: progressed(bus, 200 * 50), limit=120, what="10,000 events")
        records = await handled(bus, "recorder")
        duplicates = assert_in_order(records, expected)
        assert sum(duplicates.values()) == 0 and len(records) == 10_000
        sessions_per_worker = Counter(pid for pid, _ in {(r.pid, r.session) for r in records})
        assert sessions_per_worker.keys() == {p.pid for p in procs}
        assert min(sessions_per_worker.values()) >= 200 / 4 / 2, sessions_per_worker  # fair share


async def test_kill_9_of_a_worker_loses_nothing_and_duplicates_only_in_flight_events(
    bus: Bus, settings: Settings, workers: WorkerProcesses
) -> None:
    procs = [workers.start(RECORDER, settings, {"RECORDER_MAX_DELAY_MS": "4"}) for _ in range(4)]
    await settled(bus, "recorder", 4)
    victim = procs[0]
    expected = dict.fromkeys((f"call-{i}" for i in range(200)), 50)
    killed = anyio.Event()
    async with anyio.create_task_group() as tg:  # the last 30 of each once the victim is dead
        tg.start_soon(partial(publish, bus, expected, 50, hold=(21, killed)))

        async def victim_busy() -> bool:
            return sum(r.pid == victim.pid for r in await handled(bus, "recorder")) >= 300

        await wait_for(victim_busy, what="the victim to handle 300 events")
        workers.kill(victim)
        killed.set()

    await wait_for(lambda: all_handled(bus, 10_000), limit=120, what="every event after the kill")
    records = await handled(bus, "recorder")
    duplicates = assert_in_order(records, expected)
    first_by: dict[tuple[str, int], Handled] = {}
    for r in records:
        if (r.session, r.seq) in first_by:  # a duplicate: the first handling was the victim's,
            assert first_by[r.session, r.seq].pid == victim.pid, r  # in flight at the kill
            assert r.pid != victim.pid and r.deliveries >= 2, r
        else:
            first_by[r.session, r.seq] = r
    assert max(duplicates.values()) <= 1
    owners = await lease_owners(bus, "recorder")
    assert str(victim.pid) not in " ".join(owners) and sum(map(len, owners.values())) == 64
    assert any(r.pid != victim.pid for r in records if first_by[r.session, 1].pid == victim.pid)


async def test_in_batch_ack_mode_a_kill_9_loses_nothing_and_repeats_at_most_a_batch(
    server: LocalServer, workers: WorkerProcesses
) -> None:
    """ack_mode 'batch' acknowledges a read batch with one step: handlers still see every
    session in order, one event at a time, and a kill -9 repeats at most a read batch of a
    session, only events the victim handled first. The victim is frozen while the first 20
    events of each session are published, so that it reads full batches; it handles seqs 1-5
    of each and never returns from seq 6's handler, so that the kill comes within its batches
    (a kill timed by its progress alone sometimes came after it had acknowledged them all)."""
    settings = make_settings(server.url, ack_mode="batch", read_batch=8, lease_ttl_seconds=3)
    async with Bus.connect(settings) as bus:
        procs = [workers.start(RECORDER, settings, {"RECORDER_HOLD_AT_SEQ": "6"})]
        procs += [workers.start(RECORDER, settings) for _ in range(2)]
        await settled(bus, "recorder", 3)
        victim = procs[0]
        expected = dict.fromkeys((f"call-{i}" for i in range(100)), 40)
        victim.send_signal(signal.SIGSTOP)  # its sessions' first 20 events wait: full reads
        await publish(bus, expected, 20, final=False)
        victim.send_signal(signal.SIGCONT)

        async def victim_held() -> bool:  # seqs 1-5 of a session handled, none acknowledged
            return any(r.pid == victim.pid and r.seq == 5 for r in await handled(bus, "recorder"))

        await wait_for(victim_held, what="the victim to hold a session at seq 6")
        workers.kill(victim)

        async def the_rest(session: str) -> None:
            for n in range(21, 41):
                await bus.publish(session, Tick(n=n), final=n == 40)

        async with anyio.create_task_group() as tg:
            for session in expected:
                tg.start_soon(the_rest, session)

        await wait_for(lambda: all_handled(bus, 4_000), limit=120, what="every event")
        await wait_for(lambda: no_live_sessions(bus), what="every session to retire (all acked)")
        records = await handled(bus, "recorder")
        sessions = by_session(records)
        assert sessions.keys() == expected.keys()
        for session, recs in sessions.items():
            seqs = [r.seq for r in recs]
            assert sorted(set(seqs)) == list(range(1, 41)), (session, seqs)
            for a, b in itertools.pairwise(recs):  # in order, but where the next owner
                if b.seq != a.seq + 1:  # replays what the victim handled since its last step
                    assert a.pid == victim.pid != b.pid, (session, seqs)
                    assert a.seq - 8 < b.seq <= a.seq and b.deliveries >= 2, (session, seqs)
        first_by: dict[tuple[str, int], Handled] = {}
        for r in records:
            if (r.session, r.seq) in first_by:
                assert first_by[r.session, r.seq].pid == victim.pid != r.pid, r
            else:
                first_by[r.session, r.seq] = r
        repeated = [len(recs) - len({r.seq for r in recs}) for recs in sessions.values()]
        assert 1 < max(repeated) <= 8  # more than the one in flight: the victim's acks lagged


@pytest.mark.parametrize("ack_mode", ["each", "batch"])
async def test_a_frozen_worker_is_fenced_and_its_late_handlings_are_only_those_in_flight(
    bus: Bus, settings: Settings, workers: WorkerProcesses, ack_mode: str
) -> None:
    """Thawed, it starts no handler: its leases are not vouched for (renewed within their
    TTL). With 'batch' it would otherwise go on through its read batches until their step."""
    settings = make_settings(settings.url, prefix=settings.prefix, ack_mode=ack_mode)
    env = {"RECORDER_MAX_DELAY_MS": "4"}
    frozen, other = workers.start(RECORDER, settings, env), workers.start(RECORDER, settings, env)
    await settled(bus, "recorder", 2)
    sessions = [f"call-{i}" for i in range(100)]
    froze = anyio.Event()
    async with anyio.create_task_group() as tg:  # the last 10 of each once it is frozen
        tg.start_soon(partial(publish, bus, sessions, 30, hold=(21, froze)))

        async def frozen_busy() -> bool:
            return sum(r.pid == frozen.pid for r in await handled(bus, "recorder")) >= 200

        await wait_for(frozen_busy, what="the worker to freeze to handle 200 events")
        frozen.send_signal(signal.SIGSTOP)  # a stall past its lease TTL (1 s), not a death
        froze.set()
        await wait_for(
            lambda: all_handled(bus, 3000), limit=60, what="the other worker to handle everything"
        )
    before_thaw = len(await handled(bus, "recorder"))
    frozen.send_signal(signal.SIGCONT)
    await settled(bus, "recorder", 2)  # it learned it was fenced, rejoined and took its share
    assert "partition_lost" in workers.log(frozen)
    records = await handled(bus, "recorder")
    late = records[before_thaw:]  # handlers that were running when it froze, finishing now
    assert all(r.pid == frozen.pid for r in late), late
    assert len({r.session for r in late}) == len(late)  # at most one per session
    handled_before = {(r.session, r.seq) for r in records[:before_thaw]}
    assert all((r.session, r.seq) in handled_before for r in late)  # the other one did it too
    expected = dict.fromkeys(sessions, 30)
    if ack_mode == "each":
        assert max(assert_in_order(records[:before_thaw], expected).values()) <= 1
    else:  # the other one repeats what the frozen one handled but had not acknowledged
        window = settings.read_batch
        assert (
            max(assert_replayed_in_order(records[:before_thaw], expected, window).values())
            <= window
        )
    assert other.poll() is None


async def test_a_joining_worker_takes_partitions_and_a_graceful_stop_duplicates_nothing(
    server: LocalServer, workers: WorkerProcesses
) -> None:
    settings = make_settings(server.url, **CALM)
    async with Bus.connect(settings) as bus:
        procs = [
            workers.start(RECORDER, settings, {"RECORDER_MAX_DELAY_MS": "4"}) for _ in range(4)
        ]
        await settled(bus, "recorder", 4)
        expected = dict.fromkeys((f"call-{i}" for i in range(200)), 50)
        joined = anyio.Event()
        async with anyio.create_task_group() as tg:  # the last 30 of each once the fifth is in
            tg.start_soon(partial(publish, bus, expected, 50, hold=(21, joined)))
            await wait_for(lambda: progressed(bus, 1_000), what="1,000 events")
            fifth = workers.start(RECORDER, settings, {"RECORDER_MAX_DELAY_MS": "4"})
            await settled(bus, "recorder", 5)
            joined.set()
            await wait_for(lambda: progressed(bus, 5_000), limit=60, what="5,000 events")
            log = workers.terminate(procs[1])
            assert procs[1].returncode == 0, log
            assert "worker_stopped" in log

        await wait_for(lambda: progressed(bus, 10_000), limit=120, what="every event")
        records = await handled(bus, "recorder")
        assert sum(assert_in_order(records, expected).values()) == 0
        assert len(records) == 10_000
        assert any(r.pid == fifth.pid for r in records)


async def test_an_always_failing_handler_is_retried_then_dead_lettered(
    server: LocalServer, workers: WorkerProcesses
) -> None:
    settings = make_settings(server.url, max_deliveries=3)
    async with Bus.connect(settings) as bus:
        workers.start(RECORDER, settings)
        await settled(bus, "recorder", 1)
        expected = await publish(bus, ["call-a", "call-b"], 6, fail={3})

        await wait_for(lambda: progressed(bus, 2 * 5), what="the events after the failing one")
        records = await handled(bus, "recorder")
        for session in expected:
            assert [r.seq for r in records if r.session == session] == [1, 2, 4, 5, 6]
        attempts = await raw(bus).lrange(f"{settings.prefix}:test:attempts:recorder", 0, -1)
        per_session = Counter(a.decode().split("|")[0] for a in attempts)
        assert per_session == {"call-a": 3, "call-b": 3}
        dead = await dead_letters(bus)
        assert len(dead) == 2
        for fields in dead:
            assert fields["error"] == "RuntimeError: tick 3 always fails"
            assert fields["deliveries"] == "3" and fields["seq"] == "3"
            assert fields["group"] == "recorder" and fields["policy"] == "skip"


async def dead_letters(bus: Bus) -> list[dict[str, str]]:
    out = []
    for p in range(bus.settings.partitions):
        for _id, fields in await raw(bus).xrange(bus.keys.dead(p)):
            out.append(
                {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}
            )
    return out


async def test_garbage_entries_are_dead_lettered_and_valid_events_still_handled(
    server: LocalServer, workers: WorkerProcesses
) -> None:
    settings = make_settings(server.url, max_payload_bytes=1024)
    async with Bus.connect(settings) as bus:
        proc = workers.start(RECORDER, settings)
        await settled(bus, "recorder", 1)
        session, stream = "call-junk", bus.keys.session("call-junk")
        await bus.publish(session, Tick(n=1))
        garbage: list[dict[bytes | str, bytes | str]] = [
            {"type": "tick", "seq": "9"},
            {"type": "tick", "seq": "9", "ts": "1", "data": "{not json"},
            {"type": "no.such.type", "seq": "9", "ts": "1", "data": "{}"},
            {
                "type": "tick",
                "seq": "9",
                "ts": "1",
                "data": '{"type":"tick","n":' + "1" * 2000 + "}",
            },
            {b"\xff\xfe": b"\x00\x01", b"type": b"\xc3\x28"},
            {"type": "tick", "seq": "x", "ts": "1", "data": '{"type":"tick"}'},
            {"type": "tick", "seq": "9", "ts": "1", "data": '{"type":"tick","n":"one"}'},
            {"type": "tick", "seq": "9", "ts": "1", "data": "{}", "traceparent": "0" * 5000},
        ]
        for fields in garbage:
            await raw(bus).xadd(stream, fields)
        await bus.publish(session, Tick(n=2), final=True)

        await wait_for(lambda: progressed(bus, 2), what="the valid events around the garbage")
        assert [r.seq for r in await handled(bus, "recorder")] == [1, 2]
        reasons = [d["error"] for d in await dead_letters(bus)]
        assert len(reasons) == 8
        assert reasons[1].startswith("invalid data for 'tick': JSON is malformed")
        assert reasons[:1] + reasons[2:] == [
            "missing field(s) ts, data",
            "unknown type 'no.such.type'",
            "data is 2020 bytes; the limit is 1024",
            "a field name is not UTF-8",
            "type, seq, ts or an optional field is malformed",
            "invalid data for 'tick': Expected `int`, got `str` - at `$.n`",
            "traceparent is 5000 bytes; the limit is 1024",
        ]
        assert proc.poll() is None


async def test_two_services_each_see_every_event_in_order(
    server: LocalServer, workers: WorkerProcesses
) -> None:
    settings = make_settings(server.url, **CALM)
    async with Bus.connect(settings) as bus:
        for group in ("alpha", "beta"):
            for _ in range(2):
                workers.start(RECORDER, settings, {"RECORDER_GROUP": group})
            await settled(bus, group, 2)
        expected = await publish(bus, (f"call-{i}" for i in range(50)), 20)

        async def both_done() -> bool:
            return await progressed(bus, 1000, "alpha") and await progressed(bus, 1000, "beta")

        await wait_for(both_done, limit=60, what="both services")
        for group in ("alpha", "beta"):
            records = await handled(bus, group)
            assert sum(assert_in_order(records, expected).values()) == 0 and len(records) == 1000


async def test_a_redis_restart_with_aof_loses_nothing_and_keeps_every_session_in_order(
    workers: WorkerProcesses,
) -> None:
    with LocalServer(KIND, appendonly=True) as server:
        settings = make_settings(server.url)
        workers.start(RECORDER, settings, {"RECORDER_MAX_DELAY_MS": "4"})
        sessions = [f"call-{i}" for i in range(50)]
        async with Bus.connect(settings) as bus:
            await settled(bus, "recorder", 1)
            await publish(bus, sessions, 5, final=False)
            await wait_for(lambda: progressed(bus, 250), what="work before the AOF's rewrite")
            # What the server reads at its restart: the rewritten AOF, then what came after.
            # (Redis 7.0's stale read counters come from there: every session must retire.)
            await raw(bus).bgrewriteaof()
            await wait_for(lambda: aof_rewritten(bus), what="the AOF's rewrite")
            await publish(bus, sessions, 5, final=False, first=6)
            await wait_for(lambda: progressed(bus, 500), what="work before the crash")
            server.kill()  # SIGKILL: only what the AOF holds survives
            server.start()
            await publish(bus, sessions, 10, first=11)
            await wait_for(
                lambda: all_handled(bus, 1000), limit=60, what="every event after the restart"
            )
            assert_in_order(await handled(bus, "recorder"), dict.fromkeys(sessions, 20))
            await wait_for(lambda: no_live_sessions(bus), what="every session to retire")


async def aof_rewritten(bus: Bus) -> bool:
    info = await raw(bus).info("persistence")
    return not (info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"]) and (
        info["aof_last_bgrewrite_status"] == "ok"
    )


async def test_after_a_restart_without_its_data_the_workers_register_again_and_go_on(
    workers: WorkerProcesses,
) -> None:
    with LocalServer(KIND) as server:  # no AOF: a restart empties it
        settings = make_settings(server.url)
        workers.start(RECORDER, settings, {})
        async with Bus.connect(settings) as bus, Bus.connect(settings) as idle_publisher:
            await settled(bus, "recorder", 1)
            await publish(bus, [f"call-{i}" for i in range(10)], 3)
            await publish(bus, ["going"], 3, final=False)  # a call that goes on across it
            await wait_for(lambda: progressed(bus, 33), what="work before the restart")
            server.kill()
            server.start()

            async def registered() -> bool:
                return [s.name for s in await bus.services(fresh=True)] == ["recorder"]

            await wait_for(registered, what="the worker to register its service again")
            # A publisher whose connection died with the server, and whose list of services is
            # out of date, reads the list again on a new connection.
            expected = await publish(idle_publisher, [f"new-{i}" for i in range(10)], 3)
            for n in (4, 5):  # its publisher remembers where the call was
                await bus.publish("going", Tick(n=n), final=n == 5)
            await wait_for(lambda: progressed(bus, 32), what="the new sessions handled")
            records = await handled(bus, "recorder")
            assert [r.seq for r in records if r.session == "going"] == [4, 5]
            assert_in_order([r for r in records if r.session != "going"], expected)


async def test_an_outage_longer_than_the_lease_loses_nothing_once_the_server_is_back(
    workers: WorkerProcesses,
) -> None:
    with LocalServer(KIND, appendonly=True) as server:
        settings = make_settings(server.url)
        worker = workers.start(RECORDER, settings, {"RECORDER_MAX_DELAY_MS": "4"})
        sessions = [f"call-{i}" for i in range(50)]
        async with Bus.connect(settings) as bus:
            await settled(bus, "recorder", 1)
            await publish(bus, sessions, 10, final=False)
            server.kill()
            await wait_for(
                lambda: "lease_expired" in workers.log(worker), what="its leases to lapse"
            )
            server.start()
            await publish(bus, sessions, 10)
            await wait_for(
                lambda: all_handled(bus, 1000), limit=60, what="every event after the outage"
            )
            assert_in_order(await handled(bus, "recorder"), dict.fromkeys(sessions, 20))
