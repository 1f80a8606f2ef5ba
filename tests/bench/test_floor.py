"""The contract's floor keeps the order it claims to: every event once, each session in order,
and its acks refused once the lease is someone else's."""

from __future__ import annotations

import time
from typing import Any

import pytest
from redis.exceptions import ResponseError

from bench import floor_consumer
from bench.noop import Noop
from bench.workload import fill_plain, session_ids
from bus import Bus, Keys

pytestmark = pytest.mark.anyio


async def fill(bus: Bus, sessions: list[str], events: int) -> None:
    payload = Noop(sent_ns=time.time_ns())
    await fill_plain(bus.redis, bus.keys, sessions, events, payload, floor_consumer.GROUP)
    await floor_consumer.prepare(bus.redis, bus.keys)


async def test_every_event_is_handled_once_in_order_each_after_the_last_was_acknowledged(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions, seen, heads = session_ids(40), [], []

    async def record(stream: bytes, entry_id: bytes, payload: Any) -> None:
        seen.append((stream, entry_id))
        (head,) = await bus.redis.xpending_range(stream, floor_consumer.GROUP, "-", "+", 1)
        heads.append(head["message_id"] == entry_id)  # nothing before it is unacknowledged

    monkeypatch.setattr(floor_consumer, "handle", record)
    await fill(bus, sessions, 45)  # more than a read batch (32) per session

    assert await floor_consumer.consume(bus.settings.url, bus.keys, sessions) == 40 * 45
    for session in sessions:
        stream = bus.keys.session(session)
        ids = [entry_id for entry_id, _ in await bus.redis.xrange(stream) or []]
        assert [e for s, e in seen if s == stream.encode()] == ids
        (group,) = [g for g in await bus.redis.xinfo_groups(stream) if g["name"] == b"floor"]
        assert group["pending"] == 0 and group["lag"] == 0
    assert all(heads)


async def test_its_acks_are_refused_once_the_lease_is_not_its_own(bus: Bus) -> None:
    sessions = session_ids(3)
    await fill(bus, sessions, 5)
    keys: Keys = bus.keys
    for p in range(keys.partitions):
        await bus.redis.set(keys.lease(p, floor_consumer.GROUP), "2:someone-else")

    with pytest.raises(BaseExceptionGroup) as caught:
        await floor_consumer.consume(bus.settings.url, keys, sessions)
    assert caught.group_contains(ResponseError, match="^FENCED")
