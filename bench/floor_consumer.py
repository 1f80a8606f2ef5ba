"""The contract's floor: the least Python that keeps flowbus's ordering contract.

It does per event what the contract makes every implementation do, and nothing more: each
session's events one at a time, each acknowledged by a fenced script (the partition's lease
checked) whose reply comes back before the next handling starts; reads that name the lease's
fence stream; the steps of every session of one turn of the event loop sent together, on two
connections ("lanes") per process, the last ack of a read batch with the next read; a task per
session; each entry's data decoded with msgspec and passed to a no-op async handler.
Everything else flowbus does is left out: the envelope check, retries and dead letters, the
replay of inherited entries, retiring ended sessions, leases that expire and move, handler
timeouts, logs and metrics. So its throughput is what no implementation of the contract on the
same machine can beat by much, and the measure flowbus's should be read against.

``python -m bench.floor_consumer URL PREFIX SESSIONS INDEX OF`` handles the sessions of the
partitions ``p`` with ``p % OF == INDEX``, and speaks on stdin and stdout as
`bench.plain_consumer` does.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import hiredis
import msgspec
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

from bus import Keys
from workers.runtime import run, tune_gc

from .plain_consumer import handle
from .workload import server_us, session_ids

GROUP = "floor"
NOTE = (
    "the ordering contract in the least Python: per session one event at a time, each ack a "
    "fenced script whose reply comes before the next handling, fenced reads, the steps of a "
    "loop turn in one write on 2 lanes per process; no envelope check, retries, replay or "
    "retiring"
)
#: The lease every partition is held by while the floor runs (`prepare`).
TOKEN = "1:floor"
LANES = 2
READ_COUNT = 32  # as flowbus's default read batch

#: Acknowledge one entry per stream of KEYS[2:] if KEYS[1], the lease, is still ARGV[1].
_ACK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('FENCED') end
for i = 2, #KEYS do redis.call('XACK', KEYS[i], ARGV[2], ARGV[i + 1]) end
return 0
"""
_decoder = msgspec.json.Decoder()
_pack: Any = hiredis.pack_command  # its stub wants a tuple of one argument


async def prepare(redis: Redis, keys: Keys) -> None:
    """Give every partition's lease to `TOKEN`, with its fence stream."""
    pipe = redis.pipeline(transaction=False)
    for p in range(keys.partitions):
        pipe.set(keys.lease(p, GROUP), TOKEN)
        pipe.xgroup_create(keys.fence(p, GROUP, TOKEN), GROUP, id="$", mkstream=True)
    await pipe.execute()


class _Lane:
    """Sends the steps queued during a turn of the event loop in one write on its connection:
    per lease one ack script for all its sessions' acks, then the reads; each step's reply
    comes in its future."""

    def __init__(self, connection: AbstractConnection, sha: str) -> None:
        self.connection, self._sha = connection, sha
        self._acks: dict[str, list[tuple[str, bytes, asyncio.Future[Any]]]] = {}
        self._reads: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._ready = asyncio.Event()

    def ack(self, lease: str, stream: str, entry_id: bytes) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        self._ready.set()
        self._acks.setdefault(lease, []).append((stream, entry_id, future))
        return future

    def read(self, command: tuple[Any, ...]) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        self._ready.set()
        self._reads.append((command, future))
        return future

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            acks, self._acks = self._acks, {}
            reads, self._reads = self._reads, []
            commands: list[tuple[Any, ...]] = []
            waiting: list[list[asyncio.Future[Any]]] = []
            for lease, steps in acks.items():
                streams = [stream for stream, _, _ in steps]
                ids = [entry_id for _, entry_id, _ in steps]
                commands.append(
                    ("EVALSHA", self._sha, 1 + len(steps), lease, *streams, TOKEN, GROUP, *ids)
                )
                waiting.append([future for _, _, future in steps])
            for command, future in reads:
                commands.append(command)
                waiting.append([future])
            await self.connection.send_packed_command(b"".join(map(_pack, commands)))
            for futures in waiting:
                reply = await self.connection.read_response()  # an error raises: the run fails
                for future in futures:
                    future.set_result(reply)


def _entries(reply: Any) -> list[Any]:
    """The entries of an XREADGROUP reply over the fence and one session (RESP2 or RESP3)."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else (pair[1] for pair in reply)
    return next((list(entries) for entries in streams if entries), [])


async def follow(lane: _Lane, keys: Keys, session: str) -> int:
    """Handle `session` to its end, each event acknowledged before the next; the events."""
    p, stream = keys.partition(session), keys.session(session)
    lease, fence = keys.lease(p, GROUP), keys.fence(p, GROUP, TOKEN)
    group = ("GROUP", GROUP, keys.consumer(p), "COUNT", READ_COUNT)
    read = ("XREADGROUP", *group, "STREAMS", fence, stream, ">", ">")
    handled, name = 0, stream.encode()
    entries = _entries(await lane.read(read))
    while entries:
        for i, (entry_id, fields) in enumerate(entries):
            await handle(name, entry_id, _decoder.decode(fields[fields.index(b"data") + 1]))
            acked = lane.ack(lease, stream, entry_id)
            if i < len(entries) - 1:
                await acked
        handled += len(entries)
        following = lane.read(read)  # in the same write as the last ack, after it
        await acked
        entries = _entries(await following)
    return handled


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[tuple[Redis, list[_Lane]]]:
    """A client (for the script and the clock) and the lanes' connections, all made before the
    clock starts, as the baseline's consumer and flowbus's workers are."""
    redis = Redis.from_url(url)
    try:
        sha = await redis.script_load(_ACK)
        pool: Any = redis.connection_pool  # its connections are untyped in redis-py
        lanes = [_Lane(pool.make_connection(), sha) for _ in range(LANES)]
        for lane in lanes:
            await lane.connection.connect()  # type: ignore[no-untyped-call]
        try:
            yield redis, lanes
        finally:
            for lane in lanes:
                await lane.connection.disconnect()
    finally:
        await redis.aclose()


async def handle_all(lanes: list[_Lane], keys: Keys, sessions: list[str]) -> int:
    """Handle every one of `sessions` to its end on connected `lanes`; the events handled."""
    async with anyio.create_task_group() as senders:  # a sender's failure ends the run
        for lane in lanes:
            senders.start_soon(lane.run)
        async with asyncio.TaskGroup() as tg:  # the cheapest task per session there is
            tasks = [
                tg.create_task(follow(lanes[keys.partition(s) % LANES], keys, s)) for s in sessions
            ]
        senders.cancel_scope.cancel()
    return sum(t.result() for t in tasks)


async def consume(url: str, keys: Keys, sessions: list[str]) -> int:
    """Handle every one of `sessions` to its end; the events handled."""
    async with connected(url) as (_, lanes):
        return await handle_all(lanes, keys, sessions)


async def main(url: str, prefix: str, sessions: int, index: int, of: int) -> None:
    keys = Keys(prefix)
    mine = [s for s in session_ids(sessions) if keys.partition(s) % of == index]
    tune_gc()  # as a flowbus worker does
    async with connected(url) as (redis, lanes):
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        handled = await handle_all(lanes, keys, mine)
        done_us = await server_us(redis)  # the server's clock, just after the last ack
        print(msgspec.json.encode({"events": handled, "done_us": done_us}).decode(), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)  # alive until its CPU time is read


if __name__ == "__main__":
    url, prefix, sessions, index, of = sys.argv[1:6]
    run(main, url, prefix, int(sessions), int(index), int(of))
