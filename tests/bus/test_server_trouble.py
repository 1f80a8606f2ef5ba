"""What the bus tells its callers when the server refuses or goes away (own servers)."""

from __future__ import annotations

import anyio
import msgspec
import pytest
from structlog.testing import capture_logs

from bus import (
    Bus,
    Codec,
    CommandRefusedError,
    ConnectionFailedError,
    Consumer,
    Delivery,
    NotPermittedError,
    Service,
    ServiceInfo,
)
from tests.apps.recorder import Tick
from tests.bus.test_inbox import Say
from tests.conftest import KIND, make_settings
from tests.support import raw, running, wait_for
from workers.server import LocalServer

pytestmark = pytest.mark.anyio


async def test_a_server_out_of_memory_refuses_a_publish_with_a_bus_error_then_takes_it() -> None:
    with LocalServer(KIND) as server:
        async with Bus.connect(make_settings(server.url)) as bus:
            await bus.publish("call-1", Tick(n=1))
            await bus.redis.config_set("maxmemory", 1)
            with pytest.raises(CommandRefusedError) as refused:
                await bus.publish("call-1", Tick(n=2))
            assert refused.value.reason.startswith("OOM") and refused.value.session == "call-1"
            assert "refused publish for session 'call-1'" in str(refused.value)
            assert [e.seq for e in await bus.history("call-1")] == [1]  # reads still work
            await bus.redis.config_set("maxmemory", 0)
            assert (await bus.publish("call-1", Tick(n=2))).seq == 2


async def test_an_ack_the_server_refuses_is_sent_again_until_it_takes_it_and_counted() -> None:
    """The server refuses the step that acknowledges a handled event (its user's XACK
    revoked): the session waits and the step is sent again, counted for the metrics
    (``flowbus_step_failures_total``), until the server takes it; nothing is lost or handled
    twice, and the worker's leases are kept meanwhile."""
    started, go, handled = anyio.Event(), anyio.Event(), []

    async def handle(delivery: Delivery) -> None:
        if delivery.seq == 1:
            started.set()
            await go.wait()
        handled.append((delivery.seq, delivery.deliveries))

    with LocalServer(KIND) as server:
        admin = make_settings(server.url)
        user = msgspec.structs.replace(admin, url=server.url.replace("//", "//app:secret@"))
        app = ["ACL", "SETUSER", "app"]
        async with Bus.connect(admin) as root:
            await raw(root).execute_command(*app, "on", ">secret", "~*", "&*", "+@all")
            async with Bus.connect(user) as bus:
                await bus.register_service(ServiceInfo("svc"))
                for n in (1, 2):
                    await bus.publish("call-1", Tick(n=n))
                async with running(bus, Service("svc", handle, Codec([Tick]))) as consumer:
                    await started.wait()
                    await raw(root).execute_command(*app, "-xack")
                    go.set()
                    await wait_for(lambda: consumer.stats.step_failures >= 2, what="refusals")
                    assert handled == [(1, 1)]  # the next waits for the ack
                    await raw(root).execute_command(*app, "+xack")
                    await wait_for(lambda: len(handled) == 2, what="the session going on")
    assert handled == [(1, 1), (2, 1)] and consumer.stats.partitions_lost == 0


async def test_a_read_only_replica_refuses_writes_with_a_bus_error() -> None:
    with LocalServer(KIND) as primary, LocalServer(KIND) as replica:
        async with Bus.connect(make_settings(replica.url)) as bus:
            await raw(bus).execute_command("REPLICAOF", "127.0.0.1", primary.port)
            with pytest.raises(CommandRefusedError, match="READONLY"):
                await bus.publish("call-1", Tick(n=1))


async def test_an_inbox_reader_goes_on_across_a_server_restart() -> None:
    with LocalServer(KIND, appendonly=True) as server:
        async with Bus.connect(make_settings(server.url)) as bus:
            await bus.publish("call-1", Tick(n=1))
            await bus.send("call-1", Say(text="before"))
            async with bus.inbox("call-1", Codec([Say])) as inbox:
                assert [m.payload for m in await inbox.read(1)] == [Say(text="before")]
                server.kill()
                server.start()
                await bus.send("call-1", Say(text="after"))
                assert [m.payload for m in await inbox.read(1)] == [Say(text="after")]


async def test_after_a_restart_the_first_command_on_a_pooled_connection_is_sent_again() -> None:
    with LocalServer(KIND, appendonly=True) as server:
        async with Bus.connect(make_settings(server.url)) as bus:
            await bus.publish("call-1", Tick(n=1))
            assert await raw(bus).xlen(bus.keys.session("call-1")) == 1  # a pooled connection
            server.kill()
            server.start()
            # Its connection died with the server; redis-py alone would raise ConnectionError.
            assert await raw(bus).xlen(bus.keys.session("call-1")) == 1
            await bus.publish("call-1", Tick(n=2))  # the publisher's own connection, likewise
            assert await raw(bus).xlen(bus.keys.session("call-1")) == 2


async def test_connecting_warns_when_the_server_may_evict_the_bus_keys() -> None:
    with LocalServer(KIND) as server:
        settings = make_settings(server.url)
        with capture_logs() as logs:
            async with Bus.connect(settings) as bus:  # the default: noeviction
                await bus.redis.config_set("maxmemory-policy", "allkeys-lru")
            async with Bus.connect(settings):
                pass
        warnings = [e for e in logs if e["event"] == "eviction_policy_unsafe"]
        assert [w["policy"] for w in warnings] == ["allkeys-lru"]
        assert "noeviction" in warnings[0]["hint"]


async def test_a_user_that_may_not_ask_the_eviction_policy_connects() -> None:
    with LocalServer(KIND) as server:
        admin = make_settings(server.url)
        async with Bus.connect(admin) as bus:
            await bus.redis.config_set("maxmemory-policy", "allkeys-lru")
            rule = ["on", ">secret", "~*", "&*", "+@all", "-info"]
            await raw(bus).execute_command("ACL", "SETUSER", "app", *rule)
        user = msgspec.structs.replace(admin, url=server.url.replace("//", "//app:secret@"))
        with capture_logs() as logs:
            async with Bus.connect(user) as bus:
                assert (await bus.publish("call-1", Tick(n=1))).seq == 1
        assert not [e for e in logs if e["event"] == "eviction_policy_unsafe"]


async def test_a_user_that_may_not_load_the_scripts_is_refused_with_a_bus_error() -> None:
    with LocalServer(KIND) as server:
        admin = make_settings(server.url)
        async with Bus.connect(admin) as bus:
            await raw(bus).execute_command("ACL", "SETUSER", "app", "on", ">secret", "+ping")
        user = msgspec.structs.replace(admin, url=server.url.replace("//", "//app:secret@"))
        with pytest.raises(NotPermittedError, match=r"not permitted: NOPERM .*'script") as refused:
            async with Bus.connect(user):
                pass
        assert isinstance(refused.value, ConnectionFailedError)  # as documented before


async def test_a_worker_whose_user_may_not_subscribe_to_the_wake_channels_says_so() -> None:
    """Redis 7 gives a new ACL user no channels by default (``acl-pubsub-default``): the
    worker's refused subscription was redis-py's own error, naming no channel."""

    async def handle(delivery: Delivery) -> None:
        pass

    with LocalServer(KIND) as server:
        admin = make_settings(server.url)
        user = msgspec.structs.replace(admin, url=server.url.replace("//", "//app:secret@"))
        async with Bus.connect(admin) as root:
            rule = ["on", ">secret", "~*", "resetchannels", "+@all"]
            await raw(root).execute_command("ACL", "SETUSER", "app", *rule)
        async with Bus.connect(user) as bus:
            consumer = Consumer(bus, Service("svc", handle, Codec([Tick])))
            with pytest.raises(ExceptionGroup) as failed:
                await consumer.run()
    [refused] = failed.value.exceptions
    assert isinstance(refused, NotPermittedError), refused
    assert refused.reason.startswith("NOPERM")
    assert f"{admin.prefix}:{{0}}:wake" in refused.reason
    assert f"&{admin.prefix}:*" in refused.reason
