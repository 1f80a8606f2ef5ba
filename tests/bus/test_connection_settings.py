"""Connection settings that cannot work, passwords kept out of messages, replica waits, and
clusters: the ACL user, wrong credentials, a slot that migrates under a publish."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from redis.crc import key_slot

import bus.connection
from bus import (
    Bus,
    CommandRefusedError,
    ConfigError,
    ConnectionFailedError,
    NotPermittedError,
    Settings,
)
from bus.connection import make_client
from tests.apps.recorder import Tick
from tests.conftest import KIND, make_settings
from tests.support import wait_for
from workers.server import LocalCluster, LocalServer

pytestmark = pytest.mark.anyio

README_RULE = "~flowbus:* &flowbus:* +@read +@write +@scripting +@pubsub +@connection +info +time"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(kind=KIND) as cluster:
        yield cluster


def _sync(port: int) -> Any:
    import redis  # the sync client, to steer the cluster

    return redis.Redis(port=port)


# -- URLs and settings ---------------------------------------------------------------------


def test_an_unencoded_at_sign_in_a_password_is_taken_and_never_shown() -> None:
    """redis-py reads the password up to the last '@', as the redacted URL does."""
    settings = Settings(url="redis://app:p@ss-word@h:6379/0")
    assert settings.redacted_url == "redis://app:***@h:6379/0"
    kwargs = make_client(settings).connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["password"]) == ("h", 6379, "p@ss-word")


@pytest.mark.parametrize(
    "url",
    [
        "redis://app:p/ss-word@h:6379/0",  # an unencoded '/'
        "redis://app:p#ss-word@h:6379/0",  # an unencoded '#'
        "redis://app:p?ss-word@h:6379/0",  # an unencoded '?'
    ],
)
def test_a_password_that_ends_the_address_early_is_refused_without_showing_it(url: str) -> None:
    with pytest.raises(ConfigError, match="must be percent-encoded") as refused:
        Settings(url=url)
    assert "ss-word" not in str(refused.value)
    assert "redis://app:***@h:6379/0" in str(refused.value)


def test_a_password_in_the_query_does_not_show() -> None:
    settings = Settings(url="redis://h:6379/0?password=s3cret")
    assert "s3cret" not in settings.redacted_url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:6379/3", "database 0"),
        ("unix:///tmp/redis.sock", "unix"),
    ],
)
def test_a_cluster_url_that_cannot_work_is_a_config_error(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_client(Settings(url=url, cluster=True))


@pytest.mark.parametrize(
    "url",
    [
        "rediss://127.0.0.1:6379/0?ssl_cert_reqs=sometimes",  # not none, optional, required
        "redis://127.0.0.1:6379/0?ssl_cert_reqs=none",  # a TLS option without TLS
    ],
)
def test_connection_options_that_cannot_work_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError, match="invalid Redis URL"):
        make_client(Settings(url=url))


# -- replicas ------------------------------------------------------------------------------


async def test_a_replica_timeout_above_the_batch_timeout_reports_the_replicas(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A `WAIT` longer than a batch's own timeout (10 s; here made short) failed as a lost
    connection each time: the publish ended in a bare timeout, never the replicas' count."""
    monkeypatch.setattr(bus.connection, "BATCH_TIMEOUT_SECONDS", 0.3)
    monkeypatch.setattr(bus.connection, "RETRY_SECONDS", 1.0)
    with LocalServer(KIND) as server:
        settings = make_settings(server.url, min_replicas=1, replica_timeout_seconds=0.6)
        async with Bus.connect(settings) as b:
            with pytest.raises(ConnectionFailedError, match="0 of 1 replicas confirmed"):
                await b.publish("call-1", Tick(n=1))
            assert [e.seq for e in await b.history("call-1")] == [1]  # appended once


# -- cluster -------------------------------------------------------------------------------


async def test_the_readme_acl_user_connects_to_a_cluster(cluster: LocalCluster) -> None:
    rule = README_RULE + " +cluster|slots"
    for node in cluster.nodes:
        client = _sync(node.port)
        client.execute_command("ACL", "SETUSER", "review", "on", ">secret", *rule.split())
        client.close()
    settings = Settings(url=cluster.url.replace("//", "//review:secret@"), cluster=True)
    async with Bus.connect(settings) as b:
        assert (await b.publish("call-1", Tick(n=1))).seq == 1


async def test_a_cluster_user_lacking_a_permission_is_told_so(cluster: LocalCluster) -> None:
    for node in cluster.nodes:
        client = _sync(node.port)
        client.execute_command("ACL", "SETUSER", "lacking", "on", ">secret", *README_RULE.split())
        client.close()
    settings = Settings(url=cluster.url.replace("//", "//lacking:secret@"), cluster=True)
    with pytest.raises(NotPermittedError, match="cluster") as refused:
        async with Bus.connect(settings):
            pass
    assert "not a cluster's node" not in str(refused.value)


async def test_a_wrong_password_on_a_cluster_is_told_so(cluster: LocalCluster) -> None:
    settings = Settings(url=cluster.url.replace("//", "//nobody:wrong@"), cluster=True)
    with pytest.raises(ConnectionFailedError, match="authentication failed") as refused:
        async with Bus.connect(settings):
            pass
    assert "not a cluster's node" not in str(refused.value)


async def test_a_publish_waits_out_a_migration_whose_meta_key_moved_first(
    cluster: LocalCluster,
) -> None:
    """The publish script reads the session's meta hash, which it does not declare: while
    its slot migrates and the hash is on the target, the server refuses the script with
    "non local key"; that was a `CommandRefusedError` instead of a wait."""
    settings = make_settings(cluster.url, cluster=True)
    async with Bus.connect(settings) as b:
        await b.publish("call-1", Tick(n=1))
        stream = b.keys.session("call-1")
        slot = key_slot(stream.encode())
        nodes = [_sync(node.port) for node in cluster.nodes[: cluster.size]]
        owner = next(n for n in nodes if n.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot))
        target = next(n for n in nodes if n is not owner)
        target_port = target.connection_pool.connection_kwargs["port"]
        owner_id = owner.execute_command("CLUSTER", "MYID").decode()
        target_id = target.execute_command("CLUSTER", "MYID").decode()
        target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", owner_id)
        owner.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        owner.execute_command(
            "MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", b.keys.meta("call-1")
        )
        errors = owner.info("stats")["total_error_replies"]
        published: list[Any] = []

        async def publish() -> None:
            try:
                published.append(await b.publish("call-1", Tick(n=2)))
            except CommandRefusedError as exc:
                published.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(publish)
            await wait_for(
                lambda: owner.info("stats")["total_error_replies"] > errors,
                what="the publish to meet the migration",
            )
            while keys := owner.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                owner.execute_command(
                    "MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *keys
                )
            for node in [target, owner, *[n for n in nodes if n not in (owner, target)]]:
                node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        assert not isinstance(published[0], Exception), published[0]
        assert published[0].seq == 2
        assert [e.seq for e in await b.history("call-1")] == [1, 2]
        for node in nodes:
            node.close()
