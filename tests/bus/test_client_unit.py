"""Fast unit tests of client paths that run no script and no blocking read (fakeredis)."""

from __future__ import annotations

import socket
from types import SimpleNamespace
from typing import Any

import anyio
import fakeredis
import pytest
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    NoPermissionError,
    RedisClusterUnreachableError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from bus import Bus, CommandRefusedError, ServiceInfo, Settings
from bus import connection as connection_module
from bus.connection import (
    TRANSIENT,
    _reason,
    _reset_is_lost,
    batch,
    call,
    dedicated_pool,
    make_client,
)
from bus.publisher import ClusterPublisher
from bus.scripts import PUBLISH
from tests.support import wait_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def fake_bus() -> Bus:
    return Bus(fakeredis.FakeAsyncRedis(), Settings(prefix="unit"))


async def test_registered_services_are_listed_by_name(fake_bus: Bus) -> None:
    await fake_bus.register_service(ServiceInfo("crm", subscribes=["on_client_connected"]))
    await fake_bus.register_service(ServiceInfo("actions"))
    assert await fake_bus.services() == [
        ServiceInfo("actions"),
        ServiceInfo("crm", subscribes=["on_client_connected"]),
    ]


async def test_a_workers_check_registers_a_missing_service_and_leaves_a_present_one(
    fake_bus: Bus,
) -> None:
    assert await fake_bus.register_service(ServiceInfo("crm"), replace=False)  # it was missing
    newer = ServiceInfo("crm", subscribes=["on_client_connected"])
    assert await fake_bus.register_service(newer)  # a starting worker's registration replaces
    assert not await fake_bus.register_service(ServiceInfo("crm"), replace=False)
    assert await fake_bus.services(fresh=True) == [newer]


async def test_a_registry_entry_that_does_not_decode_still_names_its_service(
    fake_bus: Bus,
) -> None:
    await fake_bus.register_service(ServiceInfo("actions"))
    await fake_bus.redis.hset(fake_bus.keys.services(), "crm", "written by hand")
    with capture_logs() as logs:
        assert await fake_bus.services() == [ServiceInfo("actions"), ServiceInfo("crm")]
    assert [(e["event"], e["service"]) for e in logs] == [("service_entry_invalid", "crm")]


async def test_history_skips_entries_that_do_not_parse(fake_bus: Bus) -> None:
    stream = fake_bus.keys.session("call-1")
    await fake_bus.redis.xadd(stream, {"type": "a", "seq": "1", "ts": "5", "data": "{}"})
    await fake_bus.redis.xadd(stream, {"type": "a"})
    await fake_bus.redis.xadd(stream, {"type": "b", "seq": "2", "ts": "6", "data": "{}"})
    assert [(e.type, e.seq) for e in await fake_bus.history("call-1")] == [("a", 1), ("b", 2)]


def test_every_connection_shares_one_client_identity() -> None:
    from bus import make_client
    from bus.connection import CONNECTION_OPTIONS
    from bus.steps import StepBatcher

    try:
        from redis.driver_info import DriverInfo
    except ImportError:  # an older redis-py names itself once, at import: nothing to share
        assert CONNECTION_OPTIONS == {}
        return
    identity = CONNECTION_OPTIONS["driver_info"]  # redis-py looks its version up once, here
    assert isinstance(identity, DriverInfo)
    clients = [make_client(Settings()), make_client(Settings(), block_seconds=1.0)]
    connections = [c.connection_pool.make_connection() for c in clients]  # type: ignore[no-untyped-call]  # untyped in redis-py
    connections.append(StepBatcher(Settings(), group="g", retention_ms=1)._connection)
    assert all(c.driver_info is identity for c in connections)


@pytest.mark.parametrize(
    "error",
    [
        AttributeError("'NoneType' object has no attribute 'writelines'"),  # asyncio's loop
        RuntimeError("unable to perform operation on <TCPTransport>; the handler is closed"),
    ],
    ids=["asyncio", "uvloop"],
)
def test_a_cluster_connection_closed_under_a_command_is_a_lost_connection(
    error: Exception,
) -> None:
    with pytest.raises(RedisConnectionError, match="closed under a command"), _reset_is_lost():
        raise error


def test_other_runtime_errors_of_the_cluster_client_are_not_hidden() -> None:
    with pytest.raises(RuntimeError, match="something else"), _reset_is_lost():
        raise RuntimeError("something else")


@pytest.mark.parametrize(
    "anyio_backend", ["asyncio", ("asyncio", {"use_uvloop": True})], ids=["asyncio", "uvloop"]
)
@pytest.mark.parametrize("client", ["pooled", "dedicated"])
async def test_a_write_on_a_connection_reset_under_it_is_a_lost_connection(client: str) -> None:
    """As a reconnect finds it when the kernel accepted the connection for a server that was
    being killed: on uvloop the write raised `RuntimeError`, which nothing retried."""
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts in the kernel only
        settings = Settings(url=f"redis://127.0.0.1:{listener.getsockname()[1]}")
        pool = (
            make_client(settings).connection_pool
            if client == "pooled"
            else dedicated_pool(settings)
        )
        connection = pool.make_connection()  # type: ignore[no-untyped-call]  # untyped in redis-py
        await connection._connect()  # the socket alone, before the handshake a reconnect sends
    # The listener closed with the connection unaccepted: the kernel resets it.
    await wait_for(lambda: connection._writer.transport.is_closing(), what="the reset")
    with pytest.raises(RedisConnectionError):
        await connection.send_packed_command(b"PING\r\n", check_health=False)
    await connection.disconnect()  # (its socket, closed under it: nothing left open)


async def _socket_only(connection: Any) -> None:
    """Connect `connection` without the handshake, which would wait for a reply."""
    await connection._connect()
    connection._parser.on_connect(connection)


@pytest.mark.parametrize(
    "anyio_backend", ["asyncio", ("asyncio", {"use_uvloop": True})], ids=["asyncio", "uvloop"]
)
async def test_a_batch_without_replies_fails_as_lost_and_a_cancelled_one_is_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connection_module, "BATCH_TIMEOUT_SECONDS", 0.1)
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts, never answers
        settings = Settings(url=f"redis://127.0.0.1:{listener.getsockname()[1]}")
        connection = dedicated_pool(settings).make_connection()  # type: ignore[no-untyped-call]  # untyped in redis-py
        await _socket_only(connection)
        with anyio.fail_after(5):  # not a hang
            [error, _] = await batch(connection, [("PING",), ("PING",)])
        assert isinstance(error, TimeoutError) and connection._writer is None  # dropped
        monkeypatch.setattr(connection_module, "BATCH_TIMEOUT_SECONDS", 10.0)
        await _socket_only(connection)
        with anyio.move_on_after(0.1) as scope:
            await batch(connection, [("PING",)])
        assert scope.cancelled_caught  # the caller's cancellation, not a timeout
        await connection.disconnect()


@pytest.mark.parametrize(
    "error",
    [
        ClusterError("TTL exhausted."),  # the cluster client gave up redirecting
        TryAgainError("Multiple keys request during rehashing of slot"),
        ClusterDownError("The cluster is down"),
        # redis-py's cluster client, not `RedisError`s: a failover's gap, or no node answering
        # for a moment (they reached the caller raw)
        SlotNotCoveredError('Slot "7" is not covered by the cluster.'),
        RedisClusterUnreachableError("Redis Cluster cannot be connected."),
        # a blocking read (the bot's inbox) on a primary that became a replica
        ResponseError(
            "UNBLOCKED force unblock from blocking operation, instance state changed "
            "(master -> replica?)"
        ),
    ],
    ids=["ttl", "tryagain", "clusterdown", "slot-not-covered", "unreachable", "unblocked"],
)
async def test_a_cluster_busy_moving_slots_is_retried(error: Exception) -> None:
    failures = [error, error]

    async def operation() -> str:
        if failures:
            raise failures.pop()
        return "done"

    assert await call("publish", operation, Settings()) == "done"


async def test_a_refusal_is_not_retried() -> None:
    attempts = []

    async def operation() -> None:
        attempts.append(1)
        raise ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")

    with pytest.raises(CommandRefusedError, match="WRONGTYPE"):
        await call("publish", operation, Settings())
    assert len(attempts) == 1


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ResponseError("ERR unknown command 'FOO'"), "ERR unknown command 'FOO'"),
        (
            NoPermissionError(
                "Command # 1 (SCRIPT LOAD -- a script (its comment)) of pipeline caused error: "
                "(\"this user has no permissions to run the 'script|load' command\",)"
            ),
            "NOPERM this user has no permissions to run the 'script|load' command",
        ),
    ],
    ids=["plain", "pipeline"],
)
def test_a_refusal_reads_as_the_server_sent_it(error: ResponseError, reason: str) -> None:
    assert _reason(error) == reason


async def test_a_publish_to_a_slot_no_node_serves_is_a_transient_error() -> None:
    """As for a moment in a failover: `connection.call` retries it, nothing is sent."""

    class Nodes:
        def get_node_from_slot(self, slot: int) -> None:
            raise SlotNotCoveredError(f"Slot {slot} not covered by the cluster")

    cluster: Any = SimpleNamespace(nodes_manager=Nodes())
    publisher = ClusterPublisher(Settings(cluster=True), cluster)
    with pytest.raises(ClusterDownError, match="no node serves"):
        await publisher.call(PUBLISH, ["flowbus:{7}:session:call-1"], [])
    assert isinstance(ClusterDownError("x"), TRANSIENT)
