"""The step script and the wake-up hints: batched reads, acks, give-backs, idle-only hints."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import pytest

from bus import Bus, ServiceInfo, Settings
from bus import scripts as s
from bus.consumer import _Slots
from bus.ownership import Leases
from bus.steps import Step, StepBatcher
from tests.apps.recorder import Tick
from tests.support import raw

pytestmark = pytest.mark.anyio


async def step(
    bus: Bus,
    session: str,
    token: str,
    read: str,
    acks: Sequence[bytes] = (),
    give: Sequence[bytes] = (),
    verdict: Sequence[s.Arg] = (),
) -> Any:
    keys = [bus.keys.lease(bus.keys.partition(session), "g"), bus.keys.session(session)]
    args: list[s.Arg] = [token, 32, 1000, read, len(acks), *acks, len(give), *give]
    args += [len(verdict), *verdict]
    [reply] = await s.STEP(bus.redis, keys, args)
    return reply


async def test_a_step_reads_a_batch_and_entries_given_back_count_as_first_deliveries(
    bus: Bus,
) -> None:
    leases = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    [token] = (await leases.acquire([bus.keys.partition("call-1")])).values()
    for n in (1, 2, 3):
        await bus.publish("call-1", Tick(n=n))
    reply = await step(bus, "call-1", token, ">")
    assert reply[:3] == [b"entries", 0, 1] and len(reply) == 6  # all three, first deliveries
    first, second, third = (entry[0] for entry in reply[3:])

    # seq 1 handled, 2 and 3 given back (a drain, say): nothing is read, nothing is lost
    assert await step(bus, "call-1", token, "", acks=[first], give=[second, third]) == [b"idle"]
    pending = await raw(bus).xpending_range(bus.keys.session("call-1"), "g", "-", "+", 10)
    assert [(p["message_id"], p["times_delivered"]) for p in pending] == [(second, 0), (third, 0)]

    again = await step(bus, "call-1", token, "p")  # the next reader: one pending head at a time
    assert again[:3] == [b"entries", 1, 1] and again[3][0] == second
    again = await step(bus, "call-1", token, "p", acks=[second])
    assert again[:3] == [b"entries", 1, 1] and again[3][0] == third
    assert await step(bus, "call-1", token, "p", acks=[third]) == [b"idle"]


async def test_a_publish_wakes_the_partition_only_when_a_group_may_be_idle(bus: Bus) -> None:
    await bus.register_service(ServiceInfo("g"))
    p = bus.keys.partition("call-1")
    channel = bus.keys.wake(p)
    leases = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    [token] = (await leases.acquire([p])).values()
    pubsub = raw(bus).pubsub()
    await pubsub.ssubscribe(channel)

    async def hints_until_marker() -> list[bytes]:
        await raw(bus).spublish(channel, "marker")
        got: list[bytes] = []
        with anyio.fail_after(10):
            while True:
                message = await pubsub.get_message(timeout=1)
                if message is None or message["type"] != "smessage":
                    continue
                if message["data"] == b"marker":
                    return got
                got.append(message["data"])

    try:
        for n in (1, 2, 3):  # the group reads nothing meanwhile: only the first wakes it
            await bus.publish("call-1", Tick(n=n))
        assert await hints_until_marker() == [b"call-1"]
        reply = await step(bus, "call-1", token, ">")  # the group reads everything
        await bus.publish("call-1", Tick(n=4))  # so this one may find it idle
        assert await hints_until_marker() == [b"call-1"]
        await step(bus, "call-1", token, ">", acks=[e[0] for e in reply[3:]])
        await bus.publish("call-1", Tick(n=5))  # it read seq 4: idle again
        await bus.publish("call-1", Tick(n=6))  # seq 5 is unread: no hint needed
        assert await hints_until_marker() == [b"call-1"]
    finally:
        await pubsub.aclose()


async def test_handler_slots_pass_over_cancelled_waiters_and_are_never_lost() -> None:
    slots = _Slots(1)
    await slots.acquire()
    order: list[str] = []
    scopes: dict[str, anyio.CancelScope] = {}

    async def wait(name: str) -> None:
        with anyio.CancelScope() as scopes[name]:
            await slots.acquire()
            order.append(name)
            slots.release()

    async with anyio.create_task_group() as tg:
        for name in ("a", "b", "c"):
            tg.start_soon(wait, name)
        await anyio.wait_all_tasks_blocked()
        scopes["b"].cancel()  # gives up while waiting
        await anyio.wait_all_tasks_blocked()
        slots.release()
    assert order == ["a", "c"] and slots.free == 1

    await slots.acquire()
    async with anyio.create_task_group() as tg:
        for name in ("d", "e"):
            tg.start_soon(wait, name)
        await anyio.wait_all_tasks_blocked()
        slots.release()  # handed to d...
        scopes["d"].cancel()  # ...which is cancelled before it resumed: it uses or passes it
    assert order[-1] == "e" and slots.free == 1


async def test_one_call_steps_many_sessions_and_a_broken_one_fails_alone(bus: Bus) -> None:
    sessions = [f"call-{i}" for i in range(200)]
    p = bus.keys.partition(sessions[0])
    mine = [x for x in sessions if bus.keys.partition(x) == p][:3]
    assert len(mine) == 3
    leases = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    [token] = (await leases.acquire([p])).values()
    for session in mine[:2]:
        await bus.publish(session, Tick(n=1))
    await raw(bus).set(bus.keys.session(mine[2]), "not a stream")
    keys = [bus.keys.lease(p, "g"), *(bus.keys.session(x) for x in mine)]
    one_step: list[s.Arg] = [">", 0, 0, 0]
    replies = await s.STEP(bus.redis, keys, [token, 32, 1000, *one_step * 3])
    assert [r[0] for r in replies] == [b"entries", b"entries", b"error"]
    assert b"WRONGTYPE" in replies[2][1]


async def test_the_short_ack_step_acknowledges_and_a_broken_one_fails_alone(bus: Bus) -> None:
    sessions = [f"call-{i}" for i in range(200)]
    p = bus.keys.partition(sessions[0])
    good, bad = [x for x in sessions if bus.keys.partition(x) == p][:2]
    leases = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    [token] = (await leases.acquire([p])).values()
    for n in (1, 2):
        await bus.publish(good, Tick(n=n))
    reply = await step(bus, good, token, ">")
    first = reply[3][0]
    await raw(bus).set(bus.keys.session(bad), "not a stream")
    keys = [bus.keys.lease(p, "g"), bus.keys.session(good), bus.keys.session(bad)]
    replies = await s.STEP(bus.redis, keys, [token, 32, 1000, "a", first, "a", first])
    assert replies[0] == 0 and replies[1][0] == b"error" and b"WRONGTYPE" in replies[1][1]
    pending = await bus.redis.xpending(bus.keys.session(good), "g")
    assert pending["pending"] == 1 and pending["min"] == reply[4][0]  # only the second is left


@pytest.mark.parametrize("policy", ["skip", "pause"])
async def test_a_verdict_sent_again_after_a_lost_reply_writes_one_dead_letter(
    bus: Bus, policy: str
) -> None:
    leases = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    [token] = (await leases.acquire([bus.keys.partition("call-1")])).values()
    await bus.publish("call-1", Tick(n=1))
    [entry, _fields] = (await step(bus, "call-1", token, ">"))[3]
    verdict = (policy, entry, 3, "ValueError: boom", b"type", b"tick")
    for _ in range(2):  # the second is the retry of a step whose reply was lost
        await step(bus, "call-1", token, "", verdict=verdict)
    letters = await raw(bus).xrange(bus.keys.dead(bus.keys.partition("call-1")))
    assert [fields[b"entry"] for _, fields in letters] == [entry]
    pending = await bus.redis.xpending(bus.keys.session("call-1"), "g")
    assert pending["pending"] == (1 if policy == "pause" else 0)


async def test_steps_and_scripts_go_on_after_the_server_lost_its_script_cache(
    bus: Bus, settings: Settings
) -> None:
    p = bus.keys.partition("call-1")
    leases = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    [token] = (await leases.acquire([p])).values()
    stream, lease = bus.keys.session("call-1"), bus.keys.lease(p, "g")
    await raw(bus).script_flush()  # a restart without persistence, or SCRIPT FLUSH
    for n in (1, 2):
        await bus.publish("call-1", Tick(n=n))  # a script called through the client
    batcher = StepBatcher(settings, count=32, retention_ms=1000)
    async with anyio.create_task_group() as tg:
        tg.start_soon(batcher.run)
        await raw(bus).script_flush()
        reply = await batcher.submit(Step(stream, lease, token, read=">"))  # on its connection
        assert reply[:3] == [b"entries", 0, 1] and len(reply) == 5
        await raw(bus).script_flush()
        assert await batcher.submit(Step(stream, lease, token, acks=[reply[3][0]])) == 0
        tg.cancel_scope.cancel()
    await raw(bus).script_flush()
    assert await leases.renew({p: token}) == set()  # several calls in one pipeline
    pending = await bus.redis.xpending(stream, "g")
    assert pending["pending"] == 1 and pending["min"] == reply[4][0]
