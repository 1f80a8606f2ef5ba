"""Ending a session whose bot went away without a final publish (`Bus.end_session`)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from redis.exceptions import ConnectionError

from bus import Bus, Codec, Consumer, Delivery, Service, ServiceInfo, SessionEndedError, scripts
from tests.apps.recorder import Tick
from tests.support import raw, wait_for
from workers.inspection import counted_lag

pytestmark = pytest.mark.anyio


async def retired(bus: Bus, session: str) -> bool:
    p = bus.keys.partition(session)
    live = await raw(bus).sismember(bus.keys.live(p), session)
    ttl = await raw(bus).pttl(bus.keys.session(session))
    return not live and ttl > 0


async def test_a_session_every_group_handled_retires_at_once_and_takes_no_new_event(
    bus: Bus,
) -> None:
    await bus.publish("call-1", Tick(n=1))  # no service: no group has anything to do
    assert not await retired(bus, "call-1")
    assert await bus.end_session("call-1", reason="bot gone") == "retired"
    assert await retired(bus, "call-1")
    meta = await raw(bus).hgetall(bus.keys.meta("call-1"))
    assert meta[b"end_reason"] == b"bot gone" and int(meta[b"ended"]) > 0
    with pytest.raises(SessionEndedError):
        await bus.publish("call-1", Tick(n=2))
    assert await bus.end_session("call-1") == "ended"
    assert await bus.end_session("call-2") == "unknown"


async def test_a_session_a_group_still_owes_retires_once_the_group_handled_it(bus: Bus) -> None:
    seen: list[int] = []

    async def handle(delivery: Delivery) -> None:
        seen.append(delivery.seq)

    await bus.register_service(ServiceInfo("svc"))
    for n in (1, 2, 3):
        await bus.publish("call-1", Tick(n=n))
    assert await bus.end_session("call-1") == "ending"
    assert not await retired(bus, "call-1")
    consumer = Consumer(bus, Service("svc", handle, Codec([Tick])))
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        await wait_for(lambda: retired(bus, "call-1"), what="the session to retire")
        consumer.stop()
    assert seen == [1, 2, 3]


async def test_a_session_whose_last_entry_a_group_read_but_did_not_acknowledge_stays_live(
    bus: Bus,
) -> None:
    """Nothing unacknowledged expires: an entry read and not acknowledged (its handler still
    running, or its worker gone) keeps the session live, however few such entries there are."""
    await bus.register_service(ServiceInfo("svc"))
    await bus.publish("call-1", Tick(n=1))
    stream = bus.keys.session("call-1")
    await raw(bus).xreadgroup("svc", "p0", {stream: ">"})  # read by the group, pending
    assert await bus.end_session("call-1") == "ending"
    assert not await retired(bus, "call-1")
    assert await raw(bus).pttl(stream) == -1


async def test_a_retirement_forgets_the_sessions_whose_keys_have_expired(bus: Bus) -> None:
    """The partition's index of ended sessions holds each until its keys expire, no longer:
    each retirement drops those past their time (here one put there as expired long ago)."""
    ended = bus.keys.ended(bus.keys.partition("call-1"))
    await raw(bus).zadd(ended, {"call-0": 1})
    await bus.publish("call-1", Tick(n=1))
    assert await bus.end_session("call-1") == "retired"
    assert await raw(bus).zrange(ended, 0, -1) == [b"call-1"]


async def test_a_session_retires_although_the_server_reports_a_lag_its_group_does_not_have(
    bus: Bus,
) -> None:
    """Redis 7.0 keeps a group's read counter stale after a restart from a rewritten AOF (and
    on a replica): a group that read everything shows a lag. Here the counter is made stale
    by hand; the session retires all the same, and `counted_lag` shows no lag."""

    async def handle(delivery: Delivery) -> None:
        pass

    await bus.register_service(ServiceInfo("svc"))
    for n in (1, 2, 3):
        await bus.publish("call-1", Tick(n=n))
    stream = bus.keys.session("call-1")
    consumer = Consumer(bus, Service("svc", handle, Codec([Tick])))
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)

        async def all_acknowledged() -> bool:
            [group] = await raw(bus).xinfo_groups(stream)
            return bool(group["pending"] == 0 and group["lag"] == 0)

        await wait_for(all_acknowledged, what="the three events handled")
        consumer.stop()
    [group] = await raw(bus).xinfo_groups(stream)
    await raw(bus).execute_command(
        "XGROUP", "SETID", stream, "svc", group["last-delivered-id"], "ENTRIESREAD", 0
    )
    [group] = await raw(bus).xinfo_groups(stream)
    assert group["lag"] == 3 and group["pending"] == 0
    [[counted]] = await counted_lag(bus, [stream], [[group]])
    assert counted["lag"] == 0
    assert await bus.end_session("call-1") == "retired"


async def test_a_retry_after_a_lost_reply_reports_what_the_first_attempt_did(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = scripts.END
    lost: list[Any] = []

    async def reply_lost(*args: Any, **kwargs: Any) -> Any:
        outcome = await real(*args, **kwargs)
        if not lost:  # the script ran; its reply never came back
            lost.append(outcome)
            raise ConnectionError("connection lost")
        return outcome

    monkeypatch.setattr(scripts, "END", reply_lost)
    await bus.publish("call-1", Tick(n=1))
    assert await bus.end_session("call-1") == "retired"
    assert lost == [b"retired"]

    lost.clear()
    await bus.register_service(ServiceInfo("svc"))
    await bus.publish("call-2", Tick(n=1))
    assert await bus.end_session("call-2") == "ending"
    assert lost == [b"ending"]
    assert await bus.end_session("call-2") == "ended"  # another request
