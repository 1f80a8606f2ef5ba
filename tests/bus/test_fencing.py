"""Leases and fencing: a stale owner's acks and reads are refused."""

from __future__ import annotations

import pytest

from bus import Bus, Keys
from bus import scripts as s
from bus.ownership import Leases
from tests.apps.recorder import Tick

pytestmark = pytest.mark.anyio


def step_keys(keys: Keys, session: str, group: str) -> list[str]:
    return [keys.lease(keys.partition(session), group), keys.session(session)]


def step_args(token: str, *acks: str, read: str = "p") -> list[s.Arg]:
    return [token, 32, 1000, read, len(acks), *acks, 0, 0]


async def test_only_one_worker_holds_a_lease_and_a_new_epoch_fences_the_old(bus: Bus) -> None:
    a = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    b = Leases(bus.redis, bus.keys, "g", "worker-b", ttl_ms=60_000)
    session = "call-1"
    p = bus.keys.partition(session)
    [token_a] = (await a.acquire([p])).values()
    assert await b.acquire([p]) == {}
    await bus.publish(session, Tick(n=1))
    await bus.publish(session, Tick(n=2))
    keys = step_keys(bus.keys, session, "g")
    [reply] = await s.STEP(bus.redis, keys, step_args(token_a))
    assert reply[:3] == [b"entries", 0, 1] and len(reply) == 5  # seq 1 and 2, first delivery
    first_id = reply[3][0]

    await bus.redis.delete(bus.keys.lease(p, "g"))  # a's lease lapses (a was paused, say)
    [token_b] = (await b.acquire([p])).values()
    assert token_b.split(":")[0] == str(int(token_a.split(":")[0]) + 1)
    with pytest.raises(Exception, match="FENCED"):  # a's late ack of seq 1 is refused
        await s.STEP(bus.redis, keys, step_args(token_a, first_id.decode()))
    assert await a.renew({p: token_a}) == {p}

    [again] = await s.STEP(bus.redis, keys, step_args(token_b))
    assert again[:3] == [b"entries", 1, 2] and again[3][0] == first_id  # b replays seq 1
    await b.release(p, token_b)
    assert await bus.redis.exists(bus.keys.lease(p, "g")) == 0


async def test_heartbeats_list_live_members_and_a_leaver_is_gone_at_once(bus: Bus) -> None:
    a = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    b = Leases(bus.redis, bus.keys, "g", "worker-b", ttl_ms=60_000)
    await a.heartbeat()
    assert await b.heartbeat() == ["worker-a", "worker-b"]
    assert await a.heartbeat(leave=True) == ["worker-b"]
