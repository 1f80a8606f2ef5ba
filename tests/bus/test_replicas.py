"""Publishes that wait for replicas (`Settings.min_replicas`), on servers and a cluster of their
own."""

from __future__ import annotations

from typing import Any

import anyio
import fakeredis
import pytest
import redis
from redis.crc import key_slot

from bus import Bus, ConfigError, ConnectionFailedError, Published, Settings
from bus import connection as bus_connection
from tests.apps.recorder import Tick
from tests.bus.test_inbox import Say
from tests.conftest import KIND, make_settings
from tests.support import raw, wait_for
from workers.server import LocalCluster, LocalServer

pytestmark = pytest.mark.anyio


def replicate(replica: LocalServer, primary: LocalServer) -> Any:
    """Make `replica` a replica of `primary`; its (sync) client."""
    with redis.Redis(port=primary.port) as source:  # sync at once, not after the default 5 s
        source.config_set("repl-diskless-sync-delay", 0)
    client: Any = redis.Redis(port=replica.port)  # untyped
    client.replicaof("127.0.0.1", primary.port)
    return client


async def test_a_publish_returns_once_a_replica_holds_it() -> None:
    with LocalServer(KIND) as primary, LocalServer(KIND) as replica:
        client = replicate(replica, primary)
        await wait_for(lambda: client.info("replication")["master_link_status"] == "up")
        async with Bus.connect(make_settings(primary.url, min_replicas=1)) as bus:
            for n in range(1, 4):
                await bus.publish("call-1", Tick(n=n))
                assert client.xlen(bus.keys.session("call-1")) == n
            assert await waited(bus, 3)  # each publish asked: over loopback the copy is quick
        client.close()


async def test_a_publish_no_replica_confirms_fails_after_the_retries_appended_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bus_connection, "RETRY_SECONDS", 1.0)
    with LocalServer(KIND) as primary:
        settings = make_settings(primary.url, min_replicas=1, replica_timeout_seconds=0.1)
        async with Bus.connect(settings) as bus:
            with pytest.raises(ConnectionFailedError, match="0 of 1 replicas confirmed"):
                await bus.publish("call-1", Tick(n=1))
            assert await raw(bus).xlen(bus.keys.session("call-1")) == 1


async def test_a_publish_waits_out_a_replica_that_comes_back() -> None:
    with LocalServer(KIND) as primary, LocalServer(KIND) as replica:
        settings = make_settings(primary.url, min_replicas=1, replica_timeout_seconds=0.1)
        async with Bus.connect(settings) as bus, anyio.create_task_group() as tg:
            tg.start_soon(bus.publish, "call-1", Tick(n=1))
            await wait_for(lambda: waited(bus, 2), what="the publish sent again")
            client = replicate(replica, primary)
        # Valkey's `WAIT` counts a replica once the snapshot holding the entry was sent to it,
        # before it has loaded it (about a second later): read once its link is up.
        await wait_for(lambda: client.info("replication")["master_link_status"] == "up")
        assert client.xlen(bus.keys.session("call-1")) == 1  # there, and appended once
        client.close()


async def test_an_inbox_write_that_waited_for_a_replica_returns_what_it_wrote() -> None:
    with LocalServer(KIND) as primary, LocalServer(KIND) as replica:
        settings = make_settings(primary.url, min_replicas=1, replica_timeout_seconds=0.1)
        async with Bus.connect(settings) as bus:
            client = replicate(replica, primary)
            await wait_for(lambda: client.info("replication")["master_link_status"] == "up")
            await bus.publish("call-1", Tick(n=1))
            client.replicaof("no", "one")  # gone: the next write waits for its return
            sent: list[Published | None] = []

            async def send() -> None:
                sent.append(await bus.send("call-1", Say(text="hi"), dedupe="actions/1/0"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(send)
                await wait_for(lambda: waited(bus, 3), what="the write sent again")
                client.replicaof("127.0.0.1", primary.port)
            [written] = sent  # its retries found it written: not None, as for a duplicate
            assert written is not None and written.seq == 1
            assert client.xlen(bus.keys.inbox("call-1")) == 1
        client.close()


async def waited(bus: Bus, times: int) -> bool:
    """Whether the server ran ``WAIT`` at least `times` times."""
    stats = await raw(bus).info("commandstats")
    return int(stats.get("cmdstat_wait", {}).get("calls", 0)) >= times


async def test_in_a_cluster_a_publish_waits_for_the_replicas_of_its_own_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bus_connection, "RETRY_SECONDS", 1.0)
    with LocalCluster(kind=KIND, replicas=1) as cluster:  # a replica of the first primary only
        first = cluster.nodes[0].port
        replica: Any = redis.Redis(port=cluster.nodes[-1].port, single_connection_client=True)
        replica.execute_command("READONLY")  # it answers reads of its primary's slots
        settings = make_settings(
            cluster.url, cluster=True, min_replicas=1, replica_timeout_seconds=0.1
        )
        async with Bus.connect(settings) as bus:
            nodes: Any = bus.redis.nodes_manager  # type: ignore[attr-defined]  # a cluster's

            def on_first(session: str) -> bool:
                node = nodes.get_node_from_slot(key_slot(bus.keys.session(session).encode()))
                return bool(node.port == first)

            names = [f"call-{i}" for i in range(100)]
            replicated = next(s for s in names if on_first(s))
            alone = next(s for s in names if not on_first(s))
            for n in (1, 2, 3):
                await bus.publish(replicated, Tick(n=n))
                assert replica.xlen(bus.keys.session(replicated)) == n
            with pytest.raises(ConnectionFailedError, match="0 of 1 replicas confirmed"):
                await bus.publish(alone, Tick(n=1))
            assert await bus.redis.xlen(bus.keys.session(alone)) == 1  # appended once
        replica.close()


async def test_waiting_for_replicas_is_refused_where_it_cannot_be_done() -> None:
    with pytest.raises(ConfigError, match="min_replicas must be 0 or more"):
        Settings(min_replicas=-1)
    bus = Bus(fakeredis.FakeAsyncRedis(), Settings(min_replicas=1))  # no publisher of its own
    with pytest.raises(ConfigError, match=r"needs a Bus opened with Bus\.connect"):
        await bus.publish("call-1", Tick(n=1))
