"""The bus on a three-node cluster (its own): every session's keys in one slot, steps and
hints per node."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from functools import partial
from types import SimpleNamespace
from typing import Any, cast

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from redis.crc import key_slot

from bus import Bus, Codec, Delivery, Service, ServiceInfo, Settings
from bus import connection as bus_connection
from bus import hints as hints_module
from bus.hints import RESUBSCRIBE_PAUSE_CAP, Hints
from bus.keys import Keys
from bus.ownership import Leases
from bus.steps import StepBatcher
from tests.apps.recorder import Tick
from tests.bus.test_inbox import Say, left_open
from tests.bus.test_scenarios import (
    RECORDER,
    all_handled,
    progressed,
    publish,
    settled,
)
from tests.conftest import KIND, make_settings
from tests.support import (
    Stepper,
    WorkerProcesses,
    assert_in_order,
    handled,
    raw,
    running,
    wait_for,
)
from tests.workers.test_cli import flowbus
from tests.workers.test_inspect_follow import follow, next_line
from workers import inspection
from workers.observe import dead_letter_count
from workers.server import LocalCluster

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(kind=KIND) as cluster:
        yield cluster


@pytest.fixture
def cluster_settings(cluster: LocalCluster) -> Settings:
    return make_settings(cluster.url, cluster=True)


def test_the_test_cluster_starts_with_a_config_epoch_per_primary(cluster: LocalCluster) -> None:
    # With colliding epochs a slot moved early could end up claimed by no node (see
    # `test_a_slot_migrating_mid_run_takes_its_sessions_along`).
    import redis  # the sync client, to read the cluster's view

    client: Any = redis.Redis(port=cluster.nodes[0].port)  # untyped
    try:
        nodes = client.execute_command("CLUSTER", "NODES").decode().splitlines()
    finally:
        client.close()
    # Left to resolve their collisions, nodes that all started at epoch 0 keep one at 0.
    epochs = [int(line.split()[6]) for line in nodes if "master" in line.split()[2]]
    assert len(epochs) == cluster.size and len(set(epochs)) == len(epochs) and 0 not in epochs


async def test_sessions_on_every_node_are_handled_in_order(cluster_settings: Settings) -> None:
    seen: list[tuple[str, int]] = []

    async def handle(delivery: Delivery) -> None:
        seen.append((delivery.session, delivery.seq))

    sessions = [f"call-{i}" for i in range(60)]
    async with Bus.connect(cluster_settings) as bus:
        async with running(bus, Service("svc", handle, Codec([Tick]))):
            await publish(bus, sessions, 5)
            await wait_for(lambda: len(seen) >= 300, what="every event handled")
        for session in sessions:
            assert [seq for s, seq in seen if s == session] == [1, 2, 3, 4, 5]


async def test_worker_processes_share_the_cluster_and_a_kill_9_loses_nothing(
    cluster_settings: Settings, workers: WorkerProcesses
) -> None:
    async with Bus.connect(cluster_settings) as bus:
        procs = [workers.start(RECORDER, cluster_settings) for _ in range(2)]
        await settled(bus, "recorder", 2)
        victim = procs[0]
        sessions = [f"call-{i}" for i in range(100)]
        killed = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(publish, bus, sessions, 20, hold=(11, killed)))

            async def victim_busy() -> bool:
                return sum(r.pid == victim.pid for r in await handled(bus, "recorder")) >= 200

            await wait_for(victim_busy, what="the victim to handle 200 events")
            workers.kill(victim)
            killed.set()

        await wait_for(lambda: all_handled(bus, 2000), limit=60, what="every event after the kill")
        duplicates = assert_in_order(await handled(bus, "recorder"), dict.fromkeys(sessions, 20))
        assert max(duplicates.values()) <= 1


async def test_a_bot_inbox_works_across_slots(cluster_settings: Settings) -> None:
    async with Bus.connect(cluster_settings) as bus:
        for session in ("call-1", "call-2", "call-3"):
            await bus.publish(session, Tick(n=1))
            await bus.send(session, Say(text=f"hello {session}"))
            async with bus.inbox(session, Codec([Say])) as inbox:
                assert [m.payload for m in await inbox.read(1)] == [Say(text=f"hello {session}")]


async def test_a_bot_inbox_reader_cancelled_closes_its_connections(
    cluster_settings: Settings,
) -> None:
    """As a bot's call cancelled between reads: the cluster client's connections closed."""
    async with Bus.connect(cluster_settings) as bus:
        assert await left_open(bus, "cancelled between reads") == []


async def test_a_bot_inbox_and_a_follower_read_on_through_a_failover_of_their_node() -> None:
    """A blocked read on a primary that becomes a replica is answered ``UNBLOCKED``: read
    again, it goes to the new primary (a call failed on it, found by the flows chaos run; and
    `flowbus inspect session --follow` ended)."""
    import redis  # the sync client, to steer the cluster

    with LocalCluster(kind=KIND, replicas=1) as cluster:
        clients: list[Any] = [redis.Redis(port=n.port) for n in cluster.nodes]  # untyped
        primary, replica = clients[0], clients[-1]
        settings = make_settings(cluster.url, cluster=True)
        async with Bus.connect(settings) as bus:
            served = cluster.nodes[0].port  # the shard with the replica
            nodes = bus.redis.nodes_manager  # type: ignore[attr-defined]  # a cluster client
            session = next(
                s
                for s in (f"call-{i}" for i in range(1000))
                if nodes.get_node_from_slot(key_slot(bus.keys.inbox(s).encode())).port == served
            )
            await bus.publish(session, Tick(n=1))
            detail = await inspection.session_detail(bus, session)
            async with bus.inbox(session, Codec([Say])) as inbox:
                read: list[Any] = []
                followed: list[int] = []

                async def first_message() -> None:
                    async for message in inbox:
                        read.append(message.payload)
                        return

                async def first_event() -> None:
                    async for _stream, row in inspection.follow(bus, detail):
                        followed.append(row.seq)
                        return

                async with anyio.create_task_group() as tg:
                    tg.start_soon(first_message)
                    tg.start_soon(first_event)
                    await wait_for(
                        lambda: primary.info("clients")["blocked_clients"] == 2,
                        what="the inbox read and the follower to block",
                    )
                    replica.execute_command("CLUSTER", "FAILOVER")
                    await wait_for(
                        lambda: replica.info("replication")["role"] == "master",
                        what="the replica to take over",
                    )
                    await bus.send(session, Say(text="after the failover"))
                    await bus.publish(session, Tick(n=2))
            assert read == [Say(text="after the failover")] and followed == [2]
        for client in clients:
            client.close()


async def test_the_command_line_reads_a_cluster(
    cluster_settings: Settings, workers: WorkerProcesses
) -> None:
    async with Bus.connect(cluster_settings) as bus:
        workers.start(RECORDER, cluster_settings)
        await settled(bus, "recorder", 1)
        await publish(bus, [f"call-{i}" for i in range(12)], 3, fail=[2])

        async def all_dead_lettered() -> bool:
            return await dead_letter_count(bus) >= 12

        await wait_for(all_dead_lettered, what="a dead letter of every session")
        url, prefix = cluster_settings.url, cluster_settings.prefix
        base = ["--cluster", "--redis-url", url, "--prefix", prefix]
        groups = flowbus("inspect", "groups", *base)
        assert groups.returncode == 0, groups.stderr
        assert groups.stdout.splitlines()[1].split()[:3] == ["recorder", "1", "64"]
        dead = flowbus("dead", "list", *base)
        assert dead.returncode == 0, dead.stderr
        assert sum("always fails" in line for line in dead.stdout.splitlines()) == 12
        # (a read of the session's stream and its inbox together: two keys of one slot)
        followed = flowbus("inspect", "session", "call-0", "--follow", "--inbox", *base)
        assert followed.returncode == 0, followed.stderr
        assert followed.stdout.endswith("session call-0 ended\n"), followed.stdout


async def test_following_a_session_reads_its_stream_and_inbox_on_their_node(
    cluster_settings: Settings,
) -> None:
    async with Bus.connect(cluster_settings) as bus:
        await bus.publish("call-f", Tick(n=1))
        async with follow(cluster_settings, "call-f", "--inbox", "--json") as process:
            assert process.stdout is not None
            lines = BufferedByteReceiveStream(process.stdout)
            assert [e["seq"] for e in (await next_line(lines))["events"]] == [1]
            await bus.send("call-f", Say(text="hello"))
            assert (await next_line(lines))["stream"] == "inbox"
            await bus.publish("call-f", Tick(n=2), final=True)
            assert (await next_line(lines))["entry"]["seq"] == 2
            with anyio.fail_after(10):
                assert await process.wait() == 0


async def test_the_pause_before_subscribing_anew_is_short_again_after_a_round_that_held(
    cluster_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wake-up subscriptions start over after a failover or a slot move; the pauses before
    that grow while rounds end at once, and start short again after a round that held. (They
    only grew: after a few start-overs in a worker's life, every later one paused a second.)"""
    attempts: list[int] = []

    def pause(attempt: int, base: float = 0.05, cap: float = 5.0) -> float:
        attempts.append(attempt)  # which pause of a row it is
        return 0.0

    monkeypatch.setattr(hints_module, "backoff", pause)
    confirmed: list[tuple[Any, int]] = []  # (the round, the partition)
    async with Bus.connect(cluster_settings) as bus:
        hints: Hints[int] = Hints(
            bus.settings,
            bus.keys,
            wanted=lambda: {p: p for p in range(8)},
            on_hint=lambda part, session: None,
            on_subscribed=lambda part, _: confirmed.append((hints._topology, part)),
            cluster=raw(bus),
        )

        async def next_round(last: anyio.CancelScope | None) -> anyio.CancelScope:
            await wait_for(lambda: hints._topology is not last, what="a round of subscriptions")
            assert hints._topology is not None
            return hints._topology

        async with anyio.create_task_group() as tg:
            tg.start_soon(hints.run)
            round_ = await next_round(None)
            for _ in range(6):  # rounds that end at once, as in a failover
                hints.topology_changed()
                round_ = await next_round(round_)
            assert attempts == [1, 2, 3, 4, 5, 6]
            began = anyio.current_time()
            await wait_for(
                lambda: {p for r, p in confirmed if r is round_} == set(range(8)),
                what="every channel subscribed",
            )
            await wait_for(
                lambda: anyio.current_time() - began > RESUBSCRIBE_PAUSE_CAP, what="a round held"
            )
            hints.topology_changed()  # a failover later in the worker's life
            await next_round(round_)
            assert attempts[-1] == 1
            tg.cancel_scope.cancel()


async def test_a_round_of_subscriptions_follows_the_nodes_of_the_slot_map_it_watches(
    settings: Settings,
) -> None:
    """After a failover the client's list of primaries and its slot map may disagree for a
    moment (the old primary still listed, the slots already the new one's): the nodes
    followed are the slot map's, the one watched for changes, so no channel is left to no
    follower while the map stays as it is."""
    old, new = SimpleNamespace(host="10.0.0.1", port=1), SimpleNamespace(host="10.0.0.2", port=2)

    class Cluster:  # the moment in between: listed primaries stale, the slot map current
        nodes_manager = SimpleNamespace(get_node_from_slot=lambda slot: new)

        def get_primaries(self) -> list[Any]:
            return [old]

    followed: list[Any] = []
    hints: Hints[int] = Hints(
        settings,
        Keys(settings.prefix, settings.partitions),
        wanted=lambda: {},
        on_hint=lambda part, session: None,
        on_subscribed=lambda part, confirmed: None,
        cluster=cast(Any, Cluster()),
    )

    async def follow(node: Any, topology: Any) -> None:
        followed.append(node)
        await anyio.sleep_forever()

    hints._follow = follow  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg:
        tg.start_soon(hints.run)
        await wait_for(lambda: bool(followed), what="a round of subscriptions")
        tg.cancel_scope.cancel()
    assert followed == [("10.0.0.2", 2)]


async def test_a_closed_runs_step_held_for_a_busy_node_counts_no_delivery(
    cluster_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step waits while its node's last batch is out; if its run is closed meanwhile (a
    drain out of time), it goes out settling what it says and reads nothing: neither new
    entries (its read is dropped) nor its pending head (the script's own read of it counted
    a delivery that no handler saw)."""
    async with Bus.connect(cluster_settings) as bus:
        p = bus.keys.partition("call-1")
        other = next(
            s for s in (f"call-{i}" for i in range(2, 10_000)) if bus.keys.partition(s) == p
        )
        [token] = (await Leases(bus.redis, bus.keys, "g", "w", ttl_ms=60_000).acquire([p])).values()
        await bus.register_service(ServiceInfo("g"))
        for n in (1, 2):
            await bus.publish("call-1", Tick(n=n))
        batcher = StepBatcher(cluster_settings, group="g", retention_ms=1000, cluster=raw(bus))
        step = Stepper(bus, batcher)
        exchange, out, gate = batcher._exchange, anyio.Event(), anyio.Event()

        async def held_up(connection: Any, calls: Any) -> Any:
            if not gate.is_set():  # the node's batch is out until the gate opens
                out.set()
                await gate.wait()
            return await exchange(connection, calls)

        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.run)
            read = await step("call-1", token, "p")
            assert read[:3] == [b"entries", 0, 1] and len(read) == 5  # pending, delivered once
            monkeypatch.setattr(batcher, "_exchange", held_up)
            busy = batcher.submit(step.make(other, token, ""))  # a session of the same node
            await out.wait()
            closed = step.make("call-1", token, "p")
            future = batcher.submit(closed)
            await wait_for(lambda: any(closed in s for s, _ in batcher._held.values()))
            await bus.publish("call-1", Tick(n=3))  # new: a read would take it
            future.cancel()  # its run was closed
            gate.set()
            await busy
            await step(other, token, "")  # sent after the held one
            tg.cancel_scope.cancel()
        pending = await raw(bus).xpending_range(bus.keys.session("call-1"), "g", "-", "+", 10)
        assert [(x["message_id"], x["times_delivered"]) for x in pending] == [
            (read[3][0], 1),
            (read[4][0], 1),
        ]


@pytest.mark.parametrize("how", ["handshake", "kill"])
async def test_a_failover_moves_steps_and_hints_to_the_new_primary(
    workers: WorkerProcesses, how: str
) -> None:
    """`CLUSTER FAILOVER` to the first primary's replica mid-run, or a kill -9 of that primary
    (its replica is elected once the other primaries see it fail)."""
    import redis  # the sync client, to steer the cluster

    with LocalCluster(kind=KIND, replicas=1) as cluster:
        nodes: list[Any] = [redis.Redis(port=node.port) for node in cluster.nodes]  # untyped
        primary, replica = nodes[0], nodes[-1]
        settings = make_settings(cluster.url, cluster=True)
        async with Bus.connect(settings) as bus:
            workers.start(RECORDER, settings)
            await settled(bus, "recorder", 1)
            sessions = [f"call-{i}" for i in range(60)]
            await publish(bus, sessions, 5, final=False)
            if how == "handshake":
                await wait_for(lambda: progressed(bus, 300), what="work before the failover")
                replica.execute_command("CLUSTER", "FAILOVER")  # no write is lost
            else:
                for node in nodes:  # elect within seconds, not the default 15 s
                    node.config_set("cluster-node-timeout", 1000)
                await wait_for(lambda: all_handled(bus, 300), what="work before the kill")
                # Replication is asynchronous: what a killed primary did not pass on dies with
                # it. Killed once its replica has it all, it takes nothing with it.
                offset = primary.info("replication")["master_repl_offset"]
                await wait_for(
                    lambda: replica.info("replication")["slave_repl_offset"] >= offset,
                    what="the replica to catch up",
                )
                assert cluster.nodes[0].process is not None
                cluster.nodes[0].process.kill()
            await wait_for(
                lambda: replica.info("replication")["role"] == "master",
                limit=30,
                what="the replica to take over",
            )
            await publish(bus, sessions, 5)
            await wait_for(
                lambda: all_handled(bus, 600), limit=60, what="every event after the failover"
            )
            records = await handled(bus, "recorder")
            assert_in_order(records, dict.fromkeys(sessions, 10))
            deliveries: dict[tuple[str, int], int] = {}
            for r in records:  # a handler's own write may fail in the failover: then it is
                key = (r.session, r.seq)  # delivered again, and only then handled again
                assert r.deliveries > deliveries.get(key, 0), r
                deliveries[key] = r.deliveries
        for node in nodes:
            node.close()


async def test_a_slot_migrating_mid_run_takes_its_sessions_along(
    workers: WorkerProcesses,
) -> None:
    import redis  # the sync client, to steer the cluster

    with LocalCluster(kind=KIND) as cluster:
        settings = make_settings(cluster.url, cluster=True)
        async with Bus.connect(settings) as bus:
            workers.start(RECORDER, settings)
            await settled(bus, "recorder", 1)
            names = (f"call-{i}" for i in range(10_000))
            moving = [s for s in names if bus.keys.partition(s) == 3][:10]  # slot 1584
            sessions = [*moving, *(f"other-{i}" for i in range(10))]
            await publish(bus, sessions, 5, final=False)
            await wait_for(lambda: progressed(bus, 100), what="work before the move")
            nodes: list[Any] = [redis.Redis(port=node.port) for node in cluster.nodes]  # untyped
            slot = key_slot(bus.keys.lease(3, "recorder").encode())
            migrate(nodes, cluster.nodes[1].port, slot)
            await publish(bus, sessions, 5)
            await wait_for(
                lambda: all_handled(bus, 200), limit=60, what="every event after the move"
            )
            records = await handled(bus, "recorder")
            assert_in_order(records, dict.fromkeys(sessions, 10))
            assert not nodes[0].execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)
            for node in nodes:
                node.close()


def migrate(nodes: list[Any], target_port: int, slot: int) -> None:
    """Move `slot` from the first of `nodes` to the second, as `redis-cli --cluster reshard`
    does, and tell every node."""
    source, target = nodes[:2]
    source_id = source.execute_command("CLUSTER", "MYID").decode()
    target_id = target.execute_command("CLUSTER", "MYID").decode()
    target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        source.execute_command("MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *keys)
    for node in [target, source, *nodes[2:]]:
        node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


async def test_a_node_out_of_reach_holds_up_only_the_sessions_it_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A primary that stops answering (frozen, as a host gone dark before its failover) holds
    up the partitions whose slots it serves, and the steps sent to it; the worker goes on with
    the other nodes' sessions (before, it lost every lease and took none back, and a step to
    the dark node held up every other step of its lane)."""
    seen: list[tuple[str, int]] = []
    gate = anyio.Event()  # the dark node's sessions finish their handling once it is dark

    with LocalCluster(kind=KIND) as cluster:
        settings = make_settings(cluster.url, cluster=True, partitions=12)
        async with Bus.connect(settings) as bus:
            keys, nodes = bus.keys, raw(bus).nodes_manager

            def port(key: str) -> int:
                return int(nodes.get_node_from_slot(key_slot(key.encode())).port)

            shared = {port(keys.members("svc")), port(keys.services())}
            dark = next(n for n in cluster.nodes if n.port not in shared)
            served = {p: port(keys.tag(p)) for p in range(settings.partitions)}
            theirs = {p for p, at in served.items() if at == dark.port}
            calls = [f"call-{i}" for i in range(200)]
            healthy = [s for s in calls if keys.partition(s) not in theirs][:30]
            benighted = [s for s in calls if keys.partition(s) in theirs][:6]

            async def handle(delivery: Delivery) -> None:
                seen.append((delivery.session, delivery.seq))
                if delivery.session in benighted:
                    await gate.wait()

            assert dark.process is not None
            # A step sent to the dark node waits for it (not for a timeout of 10 s).
            monkeypatch.setattr(bus_connection, "BATCH_TIMEOUT_SECONDS", 3600)
            async with running(bus, Service("svc", handle, Codec([Tick]))) as consumer:
                acquire, tries = consumer._leases.acquire, []

                async def counted(partitions: list[int], **kwargs: Any) -> dict[int, str]:
                    tries.append(partitions)  # each try waits for the dark node
                    return await acquire(partitions, **kwargs)

                monkeypatch.setattr(consumer._leases, "acquire", counted)
                await publish(bus, healthy + benighted, 1, final=False)
                await wait_for(lambda: len(seen) == 36, what="the first events")
                dark.process.send_signal(signal.SIGSTOP)
                try:
                    gate.set()  # their steps go to the dark node

                    def given_up() -> bool:  # a lease TTL without their renewal
                        return not theirs & set(consumer.partitions)

                    await wait_for(given_up, what="the dark node's partitions to lapse")
                    tries.clear()
                    await wait_for(lambda: len(tries) >= 3, what="tries to take them back")
                    await publish(bus, healthy, 1)
                    await wait_for(lambda: len(seen) == 66, what="events on the other nodes")
                    assert consumer.stats.partitions_lost == len(theirs)  # the others' held
                finally:
                    dark.process.send_signal(signal.SIGCONT)
                await wait_for(lambda: len(consumer.partitions) == 12, what="the dark node back")
        for session in healthy:
            assert [seq for s, seq in seen if s == session] == [1, 2]
