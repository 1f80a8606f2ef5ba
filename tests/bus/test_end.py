"""Ending a session whose bot went away without a final publish (`Bus.end_session`)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from redis.exceptions import ConnectionError

from bus import Bus, Codec, Consumer, Delivery, Service, ServiceInfo, SessionEndedError, scripts
from tests.apps.recorder import Tick
from tests.support import raw, wait_for

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
