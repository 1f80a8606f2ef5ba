"""A test service: records every event it handles, after a random small delay.

Each handling appends ``session|seq|pid|deliveries|token`` to ``<prefix>:test:handled:<group>``;
the token, random per handling, tells a handling twice from one record written twice (a client
resends a write whose reply a failover cut off).
An event whose payload has ``fail`` set raises every time (each attempt is recorded under
``<prefix>:test:attempts:<group>``). Settings come from the FLOWBUS_* environment;
``RECORDER_GROUP`` names the group and ``RECORDER_MAX_DELAY_MS`` bounds the delay; with
``RECORDER_HOLD_AT_SEQ`` set, the handler of that seq of every session never returns (a worker
to kill in the middle of its sessions' read batches).
"""

from __future__ import annotations

import os
import random
from secrets import token_hex

import anyio
from redis.asyncio import Redis

from bus import Codec, Delivery, Payload, Service, Settings, make_client


class Tick(Payload, tag="tick"):
    n: int = 0
    fail: bool = False


GROUP = os.environ.get("RECORDER_GROUP", "recorder")
MAX_DELAY = float(os.environ.get("RECORDER_MAX_DELAY_MS", "2")) / 1000
HOLD_AT = int(os.environ.get("RECORDER_HOLD_AT_SEQ", "0"))
SETTINGS = Settings.from_env()
_redis: Redis | None = None


async def handle(delivery: Delivery) -> None:
    global _redis
    if _redis is None:
        _redis = make_client(SETTINGS)  # a cluster client when FLOWBUS_CLUSTER is set
    if delivery.seq == HOLD_AT:
        await anyio.sleep_forever()
    await anyio.sleep(random.uniform(0, MAX_DELAY))
    record = "|".join(
        map(str, (delivery.session, delivery.seq, os.getpid(), delivery.deliveries, token_hex(4)))
    )
    assert isinstance(delivery.payload, Tick)
    if delivery.payload.fail:
        await _redis.rpush(f"{SETTINGS.prefix}:test:attempts:{GROUP}", record)
        raise RuntimeError(f"tick {delivery.seq} always fails")
    await _redis.rpush(f"{SETTINGS.prefix}:test:handled:{GROUP}", record)


service = Service(GROUP, handle, Codec([Tick]))
