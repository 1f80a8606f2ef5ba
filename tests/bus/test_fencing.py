"""Leases and fencing: a stale owner's acks and reads are refused."""

from __future__ import annotations

import pytest
from redis.exceptions import ResponseError

from bus import Bus, Settings, scripts
from bus.ownership import Leases
from tests.apps.recorder import Tick
from tests.support import Stepper, raw, wait_for

pytestmark = pytest.mark.anyio


async def test_only_one_worker_holds_a_lease_and_a_new_epoch_fences_the_old(
    bus: Bus, settings: Settings
) -> None:
    a = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    b = Leases(bus.redis, bus.keys, "g", "worker-b", ttl_ms=60_000)
    session = "call-1"
    p = bus.keys.partition(session)
    [token_a] = (await a.acquire([p])).values()
    assert await b.acquire([p]) == {}
    await bus.publish(session, Tick(n=1))
    await bus.publish(session, Tick(n=2))
    async with Stepper.open(bus, settings) as step:
        reply = await step(session, token_a, "p")
        assert reply[:3] == [b"entries", 0, 1] and len(reply) == 5  # seq 1 and 2, first delivery
        first_id = reply[3][0]
        await bus.publish(session, Tick(n=3))

        await bus.redis.delete(bus.keys.lease(p, "g"))  # a's lease lapses (a was paused, say)
        [token_b] = (await b.acquire([p])).values()
        assert int(token_b.split(":")[0]) > int(token_a.split(":")[0])
        with pytest.raises(ResponseError, match="FENCED"):  # a's late ack of seq 1 is refused
            await step(session, token_a, ">", acks=[first_id])
        with pytest.raises(ResponseError, match="NOGROUP"):  # and so is a read on its own
            await raw(bus).execute_command(*step.make(session, token_a, ">").reader)
        assert (await a.renew({p: token_a})).lost == {p}

        again = await step(session, token_b, "p")
        assert again[:3] == [b"entries", 1, 2] and again[3][0] == first_id  # b replays seq 1
    await b.release(p, token_b)
    assert await bus.redis.exists(bus.keys.lease(p, "g"), bus.keys.fence(p, "g", token_b)) == 0


async def test_a_lease_and_its_fence_expire_together(bus: Bus) -> None:
    leases = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    [(p, token)] = (await leases.acquire([3])).items()
    lease, fence = bus.keys.lease(p, "g"), bus.keys.fence(p, "g", token)

    async def expiry(key: str) -> int:
        return int(await raw(bus).execute_command("PEXPIRETIME", key))

    assert await expiry(fence) == await expiry(lease) > 0
    await bus.redis.delete(fence)  # evicted, say: the next renewal makes it again
    leases.ttl_ms = 120_000
    assert await leases.renew({p: token}) == (set(), {})
    assert await expiry(fence) == await expiry(lease) > 0
    assert [g["name"] for g in await raw(bus).xinfo_groups(fence)] == [b"g"]


async def test_heartbeats_list_live_members_and_a_leaver_is_gone_at_once(bus: Bus) -> None:
    a = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    b = Leases(bus.redis, bus.keys, "g", "worker-b", ttl_ms=60_000)
    await a.heartbeat()
    assert await b.heartbeat() == ["worker-a", "worker-b"]
    assert await a.heartbeat(leave=True) == ["worker-b"]


async def test_epochs_go_on_after_the_server_lost_some_or_all_of_its_data(bus: Bus) -> None:
    """An epoch repeated after a restart without data would give the new owner the fence a
    stale owner of the old epoch still reads with."""
    a = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    b = Leases(bus.redis, bus.keys, "g", "worker-b", ttl_ms=60_000)
    [(p, token_a)] = (await a.acquire([5])).items()

    async def restarted() -> bool:  # a restart takes longer than a millisecond
        seconds, micros = await raw(bus).time()
        now_ms: int = seconds * 1000 + micros // 1000
        return now_ms > int(token_a.split(":")[0])

    await wait_for(restarted, what="the server's clock to pass the first epoch")
    await raw(bus).delete(bus.keys.lease(p, "g"), bus.keys.epoch(p, "g"))  # the data lost
    [token_b] = (await b.acquire([p])).values()
    assert int(token_b.split(":")[0]) > int(token_a.split(":")[0])
    assert bus.keys.fence(p, "g", token_b) != bus.keys.fence(p, "g", token_a)

    async def later() -> bool:
        seconds, micros = await raw(bus).time()
        now_ms: int = seconds * 1000 + micros // 1000
        return now_ms > int(token_b.split(":")[0])

    await wait_for(later, what="the server's clock to pass the second epoch")
    await raw(bus).delete(bus.keys.lease(p, "g"))  # the last writes lost: the counter went
    await raw(bus).decr(bus.keys.epoch(p, "g"))  # back, but is still there
    [token_c] = (await a.acquire([p])).values()
    assert int(token_c.split(":")[0]) > int(token_b.split(":")[0])


async def test_a_refused_lease_call_fails_that_lease_alone(bus: Bus) -> None:
    """A refusal (here a lease key of the wrong type; in a cluster, a slot being migrated)
    used to fail the whole round, every other lease with it."""
    leases = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    tokens = await leases.acquire([1, 2])
    await raw(bus).delete(bus.keys.lease(2, "g"))
    await raw(bus).hset(bus.keys.lease(2, "g"), "not", "a lease")
    renewal = await leases.renew(tokens)
    assert renewal.lost == set() and list(renewal.unanswered) == [2]
    await raw(bus).hset(bus.keys.lease(4, "g"), "not", "a lease")
    assert list(await leases.acquire([3, 4])) == [3]


async def test_a_refusal_of_a_whole_pipeline_fails_its_leases_not_the_worker(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal raised for the whole call (NOPERM loading the scripts again after a restart)
    is each lease's error: before, it escaped the round's task group and ended the worker."""
    leases = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    tokens = await leases.acquire([1, 2])

    async def refused(*args: object) -> None:
        raise ResponseError("NOPERM this user has no permissions to run the 'script' command")

    monkeypatch.setattr(scripts, "call_many", refused)
    renewal = await leases.renew(tokens)
    assert renewal.lost == set() and sorted(renewal.unanswered) == [1, 2]
    with pytest.raises(ResponseError, match="NOPERM"):
        await leases.acquire([3])
