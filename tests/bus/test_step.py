"""The step script and the wake-up hints: batched reads, acks, give-backs, idle-only hints."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from redis.exceptions import NoScriptError, ResponseError

from bus import Bus, ServiceInfo, Settings
from bus import scripts as s
from bus.ownership import Leases
from bus.steps import Step
from tests.apps.recorder import Tick
from tests.support import Stepper, raw

pytestmark = pytest.mark.anyio


async def test_a_step_reads_a_batch_and_entries_given_back_count_as_first_deliveries(
    bus: Bus, settings: Settings
) -> None:
    leases = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    [token] = (await leases.acquire([bus.keys.partition("call-1")])).values()
    for n in (1, 2, 3):
        await bus.publish("call-1", Tick(n=n))
    async with Stepper.open(bus, settings) as step:
        await given_back_entries_count_as_first_deliveries(bus, step, token)


async def given_back_entries_count_as_first_deliveries(bus: Bus, step: Stepper, token: str) -> None:
    reply = await step("call-1", token, "p")  # a session's first read checks its pending list
    assert reply[:3] == [b"entries", 0, 1] and len(reply) == 6  # all three, first deliveries
    first, second, third = (entry[0] for entry in reply[3:])

    # seq 1 handled, 2 and 3 given back (a drain, say): nothing is read, nothing is lost
    assert await step("call-1", token, "", acks=[first], give=[second, third]) == [b"idle"]
    pending = await raw(bus).xpending_range(bus.keys.session("call-1"), "g", "-", "+", 10)
    assert [(p["message_id"], p["times_delivered"]) for p in pending] == [(second, 0), (third, 0)]

    again = await step("call-1", token, "p")  # the next reader: one pending head at a time
    assert again[:3] == [b"entries", 1, 1] and [e[0] for e in again[3:]] == [second]
    await bus.publish("call-1", Tick(n=4))  # the last pending head, then what is new
    again = await step("call-1", token, "p", acks=[second])
    assert again[:3] == [b"entries", 1, 1] and again[3][0] == third and len(again) == 5
    assert await step("call-1", token, "p", acks=[third, again[4][0]]) == [b"idle"]


async def test_a_publish_wakes_the_partition_only_when_a_group_may_be_idle(
    bus: Bus, settings: Settings
) -> None:
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
        async with Stepper.open(bus, settings) as step:
            reply = await step("call-1", token, "p")  # the group reads everything
            await bus.publish("call-1", Tick(n=4))  # so this one may find it idle
            assert await hints_until_marker() == [b"call-1"]
            await step("call-1", token, ">", acks=[e[0] for e in reply[3:]])
        await bus.publish("call-1", Tick(n=5))  # it read seq 4: idle again
        await bus.publish("call-1", Tick(n=6))  # seq 5 is unread: no hint needed
        assert await hints_until_marker() == [b"call-1"]
        async with Stepper.open(bus, settings) as step:
            await step("call-1", token, ">")  # the group reads seqs 5 and 6
        fields = {"type": "tick", "seq": "99", "ts": "1", "data": "{}"}
        await raw(bus).xadd(bus.keys.session("call-1"), fields)  # no script, no hint
        await bus.publish("call-1", Tick(n=7))  # only that raw entry is unread before it
        assert await hints_until_marker() == [b"call-1"]
    finally:
        await pubsub.aclose()


async def test_one_call_steps_many_sessions_and_a_broken_one_fails_alone(
    bus: Bus, settings: Settings
) -> None:
    sessions = [f"call-{i}" for i in range(200)]
    p = bus.keys.partition(sessions[0])
    mine = [x for x in sessions if bus.keys.partition(x) == p][:3]
    assert len(mine) == 3
    leases = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    [token] = (await leases.acquire([p])).values()
    for session in mine[:2]:
        await bus.publish(session, Tick(n=1))
    await raw(bus).set(bus.keys.session(mine[2]), "not a stream")
    async with Stepper.open(bus, settings) as step:
        steps = [step.make(x, token, "p") for x in mine]
        futures = [step.batcher.submit(x) for x in steps]  # one batch: one call, three reads
        assert [(await f)[0] for f in futures[:2]] == [b"entries", b"entries"]
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await futures[2]


async def test_the_short_ack_step_acknowledges_a_broken_one_fails_alone_and_all_done_is_0(
    bus: Bus, settings: Settings
) -> None:
    sessions = [f"call-{i}" for i in range(200)]
    p = bus.keys.partition(sessions[0])
    good, bad = [x for x in sessions if bus.keys.partition(x) == p][:2]
    leases = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    [token] = (await leases.acquire([p])).values()
    for n in (1, 2):
        await bus.publish(good, Tick(n=n))
    async with Stepper.open(bus, settings) as step:
        reply = await step(good, token, "p")
    first = reply[3][0]
    await raw(bus).set(bus.keys.session(bad), "not a stream")
    keys = [bus.keys.lease(p, "g"), bus.keys.session(good), bus.keys.session(bad)]
    replies = await s.STEP(bus.redis, keys, [token, 1000, "g", "a", first, "a", first])
    assert replies[0] == 0 and replies[1][0] == b"error" and b"WRONGTYPE" in replies[1][1]
    pending = await bus.redis.xpending(bus.keys.session(good), "g")
    assert pending["pending"] == 1 and pending["min"] == reply[4][0]  # only the second is left
    # a call of acks only, all done, answers 0 for all of them
    assert await s.STEP(bus.redis, keys[:2], [token, 1000, "g", "a", reply[4][0]]) == 0
    assert (await bus.redis.xpending(bus.keys.session(good), "g"))["pending"] == 0


@pytest.mark.parametrize("policy", ["skip", "pause"])
async def test_a_verdict_sent_again_after_a_lost_reply_writes_one_dead_letter(
    bus: Bus, settings: Settings, policy: str
) -> None:
    leases = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    [token] = (await leases.acquire([bus.keys.partition("call-1")])).values()
    await bus.publish("call-1", Tick(n=1))
    async with Stepper.open(bus, settings) as step:
        [entry, _fields] = (await step("call-1", token, "p"))[3]
        verdict = (policy, entry, 3, "ValueError: boom", b"type", b"tick")
        for _ in range(2):  # the second is the retry of a step whose reply was lost
            await step("call-1", token, "", verdict=verdict)
    letters = await raw(bus).xrange(bus.keys.dead(bus.keys.partition("call-1")))
    assert [fields[b"entry"] for _, fields in letters] == [entry]
    pending = await bus.redis.xpending(bus.keys.session("call-1"), "g")
    assert pending["pending"] == (1 if policy == "pause" else 0)


async def test_a_paused_session_gives_back_what_its_read_took(bus: Bus, settings: Settings) -> None:
    leases = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    [token] = (await leases.acquire([bus.keys.partition("call-1")])).values()
    await bus.publish("call-1", Tick(n=1))
    async with Stepper.open(bus, settings) as step:
        [entry, _fields] = (await step("call-1", token, "p"))[3]
        verdict = ("pause", entry, 3, "ValueError: boom")
        assert await step("call-1", token, "p", verdict=verdict) == [b"paused"]  # reads nothing
        await bus.publish("call-1", Tick(n=2))
        woken = step.make("call-1", token, "p")  # a hint wakes the paused session: its read...
        assert await step.batcher.submit(woken) == [b"paused"]
        assert len(woken.strays) == 1  # ...took seq 2, which goes back
        assert await step("call-1", token, "", give=woken.strays) == [b"idle"]
    pending = await raw(bus).xpending_range(bus.keys.session("call-1"), "g", "-", "+", 10)
    assert [(p["message_id"], p["times_delivered"]) for p in pending] == [
        (entry, 1),
        (woken.strays[0], 0),
    ]


async def test_steps_go_on_after_the_server_lost_its_script_cache(
    bus: Bus, settings: Settings
) -> None:
    p = bus.keys.partition("call-1")
    leases = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    [token] = (await leases.acquire([p])).values()
    await bus.register_service(ServiceInfo("g"))  # its group is made with the stream
    await raw(bus).script_flush()  # a restart without persistence, or SCRIPT FLUSH
    for n in (1, 2):
        await bus.publish("call-1", Tick(n=n))  # a script called through the client
    async with Stepper.open(bus, settings) as step:
        await raw(bus).script_flush()
        first = step.make("call-1", token, "p")
        with pytest.raises(NoScriptError):  # the batcher loads the scripts; the caller retries
            await step.batcher.submit(first)
        assert len(first.strays) == 2  # read after the failed call: back with them first
        reply = await step("call-1", token, "p", give=first.strays)
        assert reply[:3] == [b"entries", 1, 1] and len(reply) == 4  # a first delivery again
        await raw(bus).script_flush()
        with pytest.raises(NoScriptError):
            await step("call-1", token, "", acks=[reply[3][0]])
        assert await step("call-1", token, "", acks=[reply[3][0]]) == 0
    await raw(bus).script_flush()
    assert await leases.renew({p: token}) == (set(), {})  # several calls in one pipeline
    pending = await raw(bus).xpending_range(bus.keys.session("call-1"), "g", "-", "+", 10)
    assert [(p["message_id"], p["times_delivered"]) for p in pending] == [(first.strays[1], 0)]


async def test_steps_sent_while_a_batch_is_out_wait_for_the_sessions_it_answers(
    bus: Bus, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Else the two halves go on alternating, each in a batch of its own: twice the calls."""
    sessions = [f"call-{i}" for i in range(200)]
    p = bus.keys.partition(sessions[0])
    first, second = [x for x in sessions if bus.keys.partition(x) == p][:2]
    leases = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    [token] = (await leases.acquire([p])).values()
    for session in (first, second):
        await bus.publish(session, Tick(n=1))
    async with Stepper.open(bus, settings) as step:
        sent: list[list[str]] = []
        send = step.batcher._send

        async def recording(batch: list[Step], acks: dict[Any, Any]) -> None:
            sent.append([s.stream for s in batch])
            if len(sent) == 1:  # the second session steps while the first one's batch is out
                late.append(step.batcher.submit(step.make(second, token, "p")))
            await send(batch, acks)

        late: list[Any] = []
        monkeypatch.setattr(step.batcher, "_send", recording)
        reply = await step(first, token, "p")
        await step(first, token, ">", acks=[reply[3][0]])  # at once, as a session does
        await late[0]
    streams = bus.keys.session(first), bus.keys.session(second)
    assert sent == [[streams[0]], [streams[1], streams[0]]]


async def test_only_a_read_on_step_whose_last_read_was_not_full_retires_a_session_that_is_done(
    bus: Bus, settings: Settings
) -> None:
    await bus.register_service(ServiceInfo("g"))
    p = bus.keys.partition("call-1")
    leases = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    [token] = (await leases.acquire([p])).values()
    for n in (1, 2):
        await bus.publish("call-1", Tick(n=n), final=n == 2)
    stream = bus.keys.session("call-1")
    async with Stepper.open(bus, settings) as step:
        reply = await step("call-1", token, "p")
        acks = [entry[0] for entry in reply[3:]]
        assert await step("call-1", token, "", acks=acks) == [b"idle"]  # as a drain settles
        assert await raw(bus).sismember(bus.keys.live(p), "call-1")  # done, not retired
        assert await step("call-1", token, "p") == [b"idle"]  # a first step reads on...
        assert await step("call-1", token, "+") == [b"idle"]  # ...as does one after a full read
        assert await raw(bus).ttl(stream) == -1
        assert await step("call-1", token, ">") == [b"idle"]  # ...the next one retires it
    assert not await raw(bus).sismember(bus.keys.live(p), "call-1")
    assert 0 < await raw(bus).ttl(stream) <= settings.retention_seconds


async def test_a_step_whose_run_was_closed_before_it_went_out_reads_nothing(
    bus: Bus, settings: Settings
) -> None:
    """It settles what it says; its pending head is not read (which counted a delivery that
    no handler saw), nor are new entries."""
    p = bus.keys.partition("call-1")
    [token] = (await Leases(bus.redis, bus.keys, "g", "w", ttl_ms=60_000).acquire([p])).values()
    await bus.register_service(ServiceInfo("g"))
    for n in (1, 2):
        await bus.publish("call-1", Tick(n=n))
    async with Stepper.open(bus, settings) as step:
        read = await step("call-1", token, "p")
        assert read[:3] == [b"entries", 0, 1] and len(read) == 5  # pending, delivered once
        await bus.publish("call-1", Tick(n=3))
        step.batcher.submit(step.make("call-1", token, "p")).cancel()  # before the batch left
        await step("call-1", token, "")  # sent with it, or after it
    pending = await raw(bus).xpending_range(bus.keys.session("call-1"), "g", "-", "+", 10)
    assert [(x["message_id"], x["times_delivered"]) for x in pending] == [
        (read[3][0], 1),
        (read[4][0], 1),
    ]
