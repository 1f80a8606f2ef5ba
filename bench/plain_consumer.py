"""The baseline's consumer process: a plain redis-py asyncio loop, no ordering guarantees.

``python -m bench.plain_consumer URL PREFIX SESSIONS INDEX OF``: consumes the streams of the
sessions ``i`` with ``i % OF == INDEX`` in the consumer group ``plain``: XREADGROUP over many
streams at once (``>``, COUNT 100), each entry's data decoded with msgspec and passed to a no-op
async handler, then one XACK per stream of the batch, pipelined. Prints ``ready`` once
connected, starts on a ``go`` line on stdin, prints ``{"events": n, "done_us": t}`` (t: the
server's clock after its last ack) when its streams are drained, and exits on the next line (or
end) of stdin, so that its CPU time can be read first.
"""

from __future__ import annotations

import sys
from typing import cast

import anyio
import msgspec
from redis.asyncio import Redis
from redis.typing import KeyT, StreamIdT

from bus import Keys
from workers.runtime import run

from .workload import server_us, session_ids

GROUP = "plain"
NOTE = (
    "plain redis-py asyncio loop: XREADGROUP over 100 streams per call (>, COUNT 100), "
    "msgspec decode + no-op async handler per entry, pipelined XACK per stream; "
    "same number of processes as flowbus workers, each consuming half of the streams"
)
COUNT = 100
STREAMS_PER_CALL = 100
_decoder = msgspec.json.Decoder()

#: What XREADGROUP returns (RESP2): [(stream, [(entry id, {field: value})])].
StreamReply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]


async def prepare(redis: Redis, keys: Keys) -> None:
    """Nothing to prepare: the streams and their group are all this consumer needs."""


async def handle(stream: bytes, entry_id: bytes, payload: object) -> None:
    """The no-op handler every entry is passed to."""


async def consume(redis: Redis, streams: list[str], consumer: str) -> int:
    """Read and acknowledge everything new in `streams`; return the entries handled."""
    handled = 0
    for start in range(0, len(streams), STREAMS_PER_CALL):
        chunk: dict[KeyT, StreamIdT] = dict.fromkeys(streams[start : start + STREAMS_PER_CALL], ">")
        while True:
            reply = cast(StreamReply, await redis.xreadgroup(GROUP, consumer, chunk, count=COUNT))
            if not reply:
                break
            pipe = redis.pipeline(transaction=False)
            for stream, entries in reply:
                for entry_id, fields in entries:
                    await handle(stream, entry_id, _decoder.decode(fields[b"data"]))
                pipe.xack(stream, GROUP, *(entry_id for entry_id, _ in entries))
                handled += len(entries)
            await pipe.execute()
    return handled


async def main(url: str, prefix: str, sessions: int, index: int, of: int) -> None:
    keys = Keys(prefix)
    mine = [keys.session(s) for i, s in enumerate(session_ids(sessions)) if i % of == index]
    redis = Redis.from_url(url)
    try:
        await redis.ping()
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        handled = await consume(redis, mine, f"c{index}")
        done_us = await server_us(redis)  # the server's clock, just after the last ack
        print(msgspec.json.encode({"events": handled, "done_us": done_us}).decode(), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)  # alive until its CPU time is read
    finally:
        await redis.aclose()


if __name__ == "__main__":
    url, prefix, sessions, index, of = sys.argv[1:6]
    run(main, url, prefix, int(sessions), int(index), int(of))  # on the workers' event loop
