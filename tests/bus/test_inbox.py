"""The bot inbox: writes with dedupe, and the ordered reader."""

from __future__ import annotations

import anyio
import pytest

from bus import Bus, Codec, Message, NoSuchSessionError, Payload, scripts
from tests.apps.recorder import Tick
from tests.support import left_for_the_collector, raw, wait_for

pytestmark = pytest.mark.anyio


class Say(Payload, tag="say"):
    text: str


async def test_commands_arrive_in_order_once_per_dedupe_key(bus: Bus) -> None:
    await bus.publish("call-1", Tick(n=1))
    assert await bus.send("call-1", Say(text="hello"), dedupe="actions/1/0") is not None
    assert await bus.send("call-1", Say(text="hello"), dedupe="actions/1/0") is None
    await bus.send("call-1", Say(text="bye"))
    async with bus.inbox("call-1", Codec([Say])) as inbox:
        messages = await inbox.read(wait=1)
    assert [(m.seq, m.payload) for m in messages] == [(1, Say(text="hello")), (2, Say(text="bye"))]


async def test_a_send_sent_again_after_its_write_gets_that_write_back(bus: Bus) -> None:
    """As `Bus.send` retries after a lost reply (or replicas that had not confirmed it)."""
    await bus.publish("call-1", Tick(n=1))
    session = "call-1"
    keys = [bus.keys.inbox(session), bus.keys.meta(session), bus.keys.sent(session)]
    args: list[scripts.Arg] = ["say", b'{"text":"hi"}', "actions/1/0", "call-a"]
    seq, entry_id = await scripts.SEND(raw(bus), keys, args)
    assert await scripts.SEND(raw(bus), keys, args) == [seq, entry_id]  # its retry
    assert await scripts.SEND(raw(bus), keys, [*args[:3], "call-b"]) is None  # another call
    assert await raw(bus).xlen(keys[0]) == 1


async def test_a_command_sent_after_its_session_retired_expires_with_it(bus: Bus) -> None:
    """A handler that answers after the session's end (its bot gone) leaves nothing for good:
    the inbox and its dedupe hash, made by that write, take the retired session's expiry."""
    await bus.publish("call-1", Tick(n=1))
    assert await bus.end_session("call-1") == "retired"
    assert await bus.send("call-1", Say(text="too late"), dedupe="actions/1/0") is not None
    for key in (bus.keys.inbox("call-1"), bus.keys.sent("call-1")):
        assert await raw(bus).pttl(key) > 0, key


async def test_the_reader_waits_for_the_next_command(bus: Bus) -> None:
    await bus.publish("call-2", Tick(n=1))
    read: list[Message] = []

    async def blocked_reader() -> bool:
        clients = await raw(bus).client_list()
        return any(c["cmd"] == "xread" and "b" in c["flags"] for c in clients)

    async with bus.inbox("call-2", Codec([Say])) as inbox, anyio.create_task_group() as tg:
        assert await inbox.read(wait=0.05) == []

        async def reader() -> None:
            read.extend(await inbox.read(wait=5))

        tg.start_soon(reader)
        await wait_for(blocked_reader, what="the reader to block on the inbox")
        await bus.send("call-2", Say(text="late"))
    assert [m.payload for m in read] == [Say(text="late")]


async def test_junk_in_the_inbox_is_reported_not_returned(bus: Bus) -> None:
    await bus.publish("call-3", Tick(n=1))
    await raw(bus).xadd(bus.keys.inbox("call-3"), {"type": "say", "seq": "1"})
    await bus.send("call-3", Say(text="ok"))
    async with bus.inbox("call-3", Codec([Say])) as inbox:
        [message] = await inbox.read(wait=1)
        assert message.payload == Say(text="ok")
        assert [reason for _, reason in inbox.rejected] == ["missing field(s) ts, data"]


async def test_writing_to_a_session_that_never_started_is_an_error(bus: Bus) -> None:
    with pytest.raises(NoSuchSessionError, match="call-none"):
        await bus.send("call-none", Say(text="?"))


async def test_a_reader_that_stops_iterating_loses_none_of_the_messages_it_did_not_return(
    bus: Bus,
) -> None:
    """`async for message in inbox: ... break` (as the README's bot does), then iterating
    again, must give the next message: the reader goes on from the last one it returned."""
    await bus.publish("call-4", Tick(n=1))
    async with bus.inbox("call-4", Codec([Say])) as inbox:
        await bus.send("call-4", Say(text="one"))
        await bus.send("call-4", Say(text="two"))
        async for message in inbox:
            assert message.payload == Say(text="one")
            break
        got: list[Message] = []
        with anyio.move_on_after(2):  # (a reader past "two" would block here for good)
            async for message in inbox:
                got.append(message)
                break
    assert [m.payload for m in got] == [Say(text="two")]


@pytest.mark.parametrize("how", ["done", "cancelled reading", "cancelled between reads"])
async def test_a_reader_closes_its_connection_on_the_way_out(bus: Bus, how: str) -> None:
    """Its connection of its own is closed as the reader is left, also when a bot's call is
    cancelled (the caller hung up) in a read or between reads: not left open until the
    garbage collector finds it."""
    assert await left_open(bus, how) == []


async def left_open(bus: Bus, how: str) -> list[str]:
    """What an inbox reader left `how` left open for the garbage collector."""
    await bus.publish("call-1", Tick(n=1))
    await bus.send("call-1", Say(text="hello"))
    got = anyio.Event()

    async def reading() -> None:
        async with bus.inbox("call-1", Codec([Say])) as inbox:
            await inbox.read(wait=1)
            got.set()
            if how == "cancelled reading":
                await inbox.read(wait=60)
            elif how == "cancelled between reads":
                await anyio.sleep_forever()

    async def blocked() -> bool:
        return int((await raw(bus).info("clients"))["blocked_clients"]) == 1

    with left_for_the_collector() as left:
        async with anyio.create_task_group() as tg:
            tg.start_soon(reading)
            if how == "cancelled reading":
                await wait_for(blocked, what="the reader waiting")
            else:
                await got.wait()
            if how != "done":
                tg.cancel_scope.cancel()
    return left
