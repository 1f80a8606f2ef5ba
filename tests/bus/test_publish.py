"""Publishing and retirement against the real server."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import msgspec
import pytest
from anyio import wait_all_tasks_blocked
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from bus import (
    Bus,
    InvalidExtraError,
    PayloadTooLargeError,
    ServiceInfo,
    SessionEndedError,
    publisher,
)
from bus import scripts as s
from bus.publisher import Publisher
from tests.apps.recorder import Tick
from tests.support import raw

pytestmark = pytest.mark.anyio


async def test_concurrent_publishers_get_gap_free_seqs_in_stream_order(bus: Bus) -> None:
    async with anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(bus.publish, "call-1", Tick(n=i))
    entries = await bus.history("call-1")
    assert [e.seq for e in entries] == list(range(1, 201))
    assert sorted(msgspec.json.decode(e.data)["n"] for e in entries) == list(range(200))


async def test_concurrent_publishes_to_a_session_go_one_at_a_time_so_a_lost_reply_adds_none(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The script knows the retry of a session's last publish only: two of one session in one
    batch whose replies were lost were both retried, and the first appended again."""
    sent = publisher.batch  # type: ignore[attr-defined]
    sizes: list[int] = []

    async def replies_lost_once(connection: Any, commands: list[Any]) -> list[Any]:
        replies = await sent(connection, commands)
        sizes.append(len(commands))
        if len(sizes) == 2:  # the first batch after the session's start: ran, replies lost
            return [RedisConnectionError("Connection reset by peer")] * len(commands)
        return replies

    await bus.publish("call-1", Tick(n=0))
    monkeypatch.setattr(publisher, "batch", replies_lost_once)
    async with anyio.create_task_group() as tg:
        for n in (1, 2, 3):
            tg.start_soon(bus.publish, "call-1", Tick(n=n))
    assert max(sizes) == 1  # never two of the session in one batch
    entries = await bus.history("call-1")
    assert [(e.seq, msgspec.json.decode(e.data)["n"]) for e in entries] == [
        (1, 0),
        (2, 1),
        (3, 2),
        (4, 3),
    ]


async def test_a_replay_between_a_publish_whose_reply_was_lost_and_its_retry_adds_nothing(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The script remembered the session's last publish only, so the bot's retry after a
    replay (`flowbus dead replay`) appended the bot's event a second time."""
    sent = publisher.batch  # type: ignore[attr-defined]
    await bus.publish("call-1", Tick(n=0))
    letter = await raw(bus).xadd(bus.keys.dead(bus.keys.partition("call-1")), {"seq": "1"})
    operator = Bus(bus.redis, bus.settings)  # another process's, through its own connection

    async def replay_then_reply_lost(connection: Any, commands: list[Any]) -> list[Any]:
        await sent(connection, commands)
        monkeypatch.setattr(publisher, "batch", sent)
        await operator.publish("call-1", Tick(n=99), dead_letter=letter.decode())
        return [RedisConnectionError("Connection reset by peer")] * len(commands)

    monkeypatch.setattr(publisher, "batch", replay_then_reply_lost)
    published = await bus.publish("call-1", Tick(n=1))  # retried after the lost reply
    entries = await bus.history("call-1")
    assert [(e.seq, msgspec.json.decode(e.data)["n"]) for e in entries] == [(1, 0), (2, 1), (3, 99)]
    assert (published.seq, published.entry_id) == (2, entries[1].id)

    async def reply_lost(connection: Any, commands: list[Any]) -> list[Any]:
        await sent(connection, commands)
        monkeypatch.setattr(publisher, "batch", sent)
        return [RedisConnectionError("Connection reset by peer")] * len(commands)

    letter = await raw(bus).xadd(bus.keys.dead(bus.keys.partition("call-1")), {"seq": "2"})
    monkeypatch.setattr(publisher, "batch", reply_lost)
    replayed = await bus.publish("call-1", Tick(n=98), dead_letter=letter.decode())
    assert replayed.seq == 4  # a replay's retry is known too (its letter is gone by then)
    assert len(await bus.history("call-1")) == 4


async def test_an_entry_is_flat_and_readable(bus: Bus) -> None:
    published = await bus.publish("call-2", Tick(n=7), extra={"traceparent": "00-abc-def-01"})
    [(entry_id, fields)] = await raw(bus).xrange(bus.keys.session("call-2"))
    assert entry_id.decode() == published.entry_id
    assert list(fields) == [b"type", b"seq", b"ts", b"data", b"traceparent"]
    assert fields[b"type"] == b"tick" and fields[b"seq"] == b"1"
    assert msgspec.json.decode(fields[b"data"]) == {"type": "tick", "n": 7, "fail": False}


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"seq": "999"}, "'seq': the envelope carries only v, traceparent, reply_to, corr"),
        ({"data": "{}"}, "'data': the envelope carries only"),
        ({"tenant": "acme"}, "'tenant': the envelope carries only"),
        ({"corr": 7}, "'corr': its value must be a string, not 7"),
        ({"traceparent": "0" * 1025}, "'traceparent': its value is 1025 bytes; the limit is 1024"),
    ],
)
async def test_an_extra_field_the_envelope_does_not_carry_is_refused_and_nothing_written(
    bus: Bus, extra: dict[str, object], says: str
) -> None:
    await bus.publish("call-4", Tick(n=1))
    with pytest.raises(InvalidExtraError, match=re.escape(says)):
        await bus.publish("call-4", Tick(n=2), extra=extra)  # type: ignore[arg-type]
    with pytest.raises(InvalidExtraError, match=re.escape(says)):
        await bus.send("call-4", Tick(n=2), extra=extra)  # type: ignore[arg-type]
    assert [(e.seq, e.type) for e in await bus.history("call-4")] == [(1, "tick")]
    assert await raw(bus).exists(bus.keys.inbox("call-4")) == 0


async def test_a_payload_that_is_not_a_payload_type_is_refused(bus: Bus) -> None:
    with pytest.raises(TypeError, match="is not a payload type"):
        await bus.publish("call-5", {"type": "tick", "n": 1})  # type: ignore[arg-type]
    assert await bus.history("call-5") == []


async def test_nothing_follows_the_final_event(bus: Bus) -> None:
    await bus.publish("call-3", Tick(n=1), final=True)
    with pytest.raises(SessionEndedError, match="call-3"):
        await bus.publish("call-3", Tick(n=2))
    assert [e.seq for e in await bus.history("call-3")] == [1]


async def test_an_oversized_payload_is_refused_and_nothing_is_appended(bus: Bus) -> None:
    big = Tick(n=int("9" * 10))
    limited = Bus(bus.redis, msgspec.structs.replace(bus.settings, max_payload_bytes=20))
    with pytest.raises(PayloadTooLargeError, match="the limit is 20"):
        await limited.publish("call-4", big)
    assert await raw(bus).exists(bus.keys.session("call-4")) == 0


async def test_a_session_retires_only_when_every_group_handled_it(bus: Bus) -> None:
    await bus.register_service(ServiceInfo("crm"))
    for n in (1, 2):
        await bus.publish("call-5", Tick(n=n), final=n == 2)
    keys = bus.keys
    stream, p = keys.session("call-5"), keys.partition("call-5")
    assert {g["name"] for g in await raw(bus).xinfo_groups(stream)} == {b"crm"}
    assert await raw(bus).ttl(stream) == -1  # crm has not read it: it must not expire
    assert await raw(bus).sismember(keys.live(p), "call-5")
    # A session ending before any crm worker ran still waits for crm: its group exists.
    await bus.publish("call-6", Tick(n=1), final=True)
    assert await raw(bus).ttl(keys.session("call-6")) == -1


async def test_a_session_no_service_reads_retires_at_its_end(bus: Bus) -> None:
    await bus.publish("call-7", Tick(n=1), final=True)
    p = bus.keys.partition("call-7")
    ttl = await raw(bus).ttl(bus.keys.session("call-7"))
    assert 0 < ttl <= bus.settings.retention_seconds

    async def expires(key: str) -> int:  # (in ms, not a TTL: two TTL reads may differ)
        return int(await raw(bus).execute_command("PEXPIRETIME", key))

    # Set in one script, each PEXPIRE from the clock it reads (prelude.lua): together, to the
    # millisecond or so; not a second apart, as keys expired by separate steps would be.
    meta, stream = await expires(bus.keys.meta("call-7")), await expires(bus.keys.session("call-7"))
    assert stream > 0 and abs(meta - stream) < 1000
    assert not await raw(bus).sismember(bus.keys.live(p), "call-7")
    assert await raw(bus).zscore(bus.keys.ended(p), "call-7") is not None


async def test_a_retried_publish_appends_once(bus: Bus) -> None:
    p = bus.keys.partition("call-8")
    keys = [bus.keys.session("call-8")]
    args: list[s.Arg] = [bus.keys.tag(p), "call-8", "tick", b'{"type":"tick"}', 0, 1000, "id-1"]
    args += [0, "", 0]  # nothing published before, no dead letter replayed, no group
    first = await s.PUBLISH(bus.redis, keys, args)
    again = await s.PUBLISH(bus.redis, keys, args)  # the reply of the first was "lost"
    assert first == again == [1, first[1], 0]
    assert [e.seq for e in await bus.history("call-8")] == [1]


async def test_a_session_the_server_lost_goes_on_at_the_next_seq_of_its_publisher(
    bus: Bus,
) -> None:
    await bus.register_service(ServiceInfo("recorder"))
    for n in (1, 2, 3):
        await bus.publish("call-9", Tick(n=n))
    stream = bus.keys.session("call-9")
    await raw(bus).delete(stream, bus.keys.meta("call-9"))  # as a restart without data does
    await raw(bus).srem(bus.keys.live(bus.keys.partition("call-9")), "call-9")
    with capture_logs() as logs:
        assert (await bus.publish("call-9", Tick(n=4))).seq == 4
    assert {"event": "session_counter_restored", "session": "call-9", "seq": 4} in [
        {k: v for k, v in x.items() if k in ("event", "session", "seq")} for x in logs
    ]
    assert (await bus.publish("call-9", Tick(n=5), final=True)).seq == 5
    assert [e.seq for e in await bus.history("call-9")] == [4, 5]
    # Set up again as a new session is: live, with its services' groups.
    [group] = await raw(bus).xinfo_groups(stream)
    assert group["name"] == b"recorder"
    assert await raw(bus).sismember(bus.keys.live(bus.keys.partition("call-9")), "call-9")


async def test_a_publisher_that_never_published_to_a_session_starts_it_at_one(bus: Bus) -> None:
    await bus.publish("call-10", Tick(n=1))
    await raw(bus).delete(bus.keys.session("call-10"), bus.keys.meta("call-10"))
    async with Bus.connect(bus.settings) as other:  # another process, say a restarted bot
        assert (await other.publish("call-10", Tick(n=1))).seq == 1


async def test_a_publisher_forgets_a_session_once_it_ended(bus: Bus) -> None:
    await bus.publish("call-11", Tick(n=1), final=True)
    await raw(bus).delete(bus.keys.session("call-11"), bus.keys.meta("call-11"))
    assert (await bus.publish("call-11", Tick(n=1))).seq == 1  # a new session of that name


@asynccontextmanager
async def writes_paused(bus: Bus) -> AsyncIterator[Callable[[], Awaitable[object]]]:
    """The server's writes paused until the function given is called (or the block ends)."""
    unpause = partial(raw(bus).execute_command, "CLIENT", "UNPAUSE")
    await raw(bus).execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
    try:
        yield unpause
    finally:
        await unpause()


async def test_publishes_sent_meanwhile_wait_their_turn_and_a_cancelled_one_stalls_nobody(
    bus: Bus,
) -> None:
    published: dict[str, int] = {}

    async def one(session: str) -> None:
        published[session] = (await bus.publish(session, Tick(n=1))).seq

    gone = anyio.CancelScope()

    async def cancelled() -> None:
        with gone:
            await one("gone")

    async with writes_paused(bus) as unpause, anyio.create_task_group() as tg:
        tg.start_soon(one, "first")  # sends alone, and waits out the pause
        await wait_all_tasks_blocked()
        tg.start_soon(cancelled)  # next in turn, cancelled while it waits (below)
        await wait_all_tasks_blocked()
        for i in range(20):
            tg.start_soon(one, f"call-{i}")
        await wait_all_tasks_blocked()
        gone.cancel()
        await unpause()  # once all are set up
    assert published.keys() == {"first", *(f"call-{i}" for i in range(20))}
    assert set(published.values()) == {1}


async def test_a_publish_cancelled_while_its_batch_is_out_returns_at_once_and_the_batch_goes_on(
    bus: Bus,
) -> None:
    """A caller's time limit holds with a server that does not answer (a sync event's
    `sync_timeout`): the batch it started used to be shielded from it until its replies came,
    the socket's timeout later."""
    published: dict[str, int] = {}

    async def one(session: str) -> None:
        published[session] = (await bus.publish(session, Tick(n=1))).seq

    first = anyio.CancelScope()

    async def cancelled() -> None:
        with first:
            await one("first")

    async with writes_paused(bus) as unpause, anyio.create_task_group() as tg:
        tg.start_soon(cancelled)  # starts a batch, which waits out the pause
        await wait_all_tasks_blocked()
        tg.start_soon(one, "next")  # waits its turn
        await wait_all_tasks_blocked()
        first.cancel()
        await wait_all_tasks_blocked()
        assert first.cancelled_caught  # returned while its batch is still out
        await unpause()
    assert published == {"next": 1}
    assert [e.seq for e in await bus.history("first")] == [1]  # its batch went on


async def test_a_caller_cancelled_just_as_it_is_given_the_turn_passes_it_on(bus: Bus) -> None:
    # anyio delivers a cancellation only to a task whose wait is not over, so this takes
    # asyncio's own Task.cancel (as asyncio.wait_for or asyncio.timeout around a publish do).
    publisher = bus._publisher
    assert isinstance(publisher, Publisher)
    published: dict[str, int] = {}

    async def one(session: str) -> None:
        published[session] = (await bus.publish(session, Tick(n=1))).seq

    give_turn = publisher._give_turn

    def give_turn_then_cancel() -> None:  # the turn reaches "gone", which is cancelled at once
        give_turn()
        if not gone.done():
            gone.cancel()

    publisher._give_turn = give_turn_then_cancel  # type: ignore[method-assign]
    async with writes_paused(bus) as unpause, anyio.create_task_group() as tg:
        tg.start_soon(one, "first")
        await wait_all_tasks_blocked()
        gone = asyncio.ensure_future(one("gone"))
        await wait_all_tasks_blocked()
        tg.start_soon(one, "after")
        await wait_all_tasks_blocked()
        await unpause()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert published == {"first": 1, "after": 1}
