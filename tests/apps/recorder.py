"""A test service: records every event it handles, after a random small delay.

Each handling appends ``session|seq|pid|deliveries`` to ``<prefix>:test:handled:<group>``.
An event whose payload has ``fail`` set raises every time (each attempt is recorded under
``<prefix>:test:attempts:<group>``). Settings come from the FLOWBUS_* environment;
``RECORDER_GROUP`` names the group and ``RECORDER_MAX_DELAY_MS`` bounds the delay.
"""

from __future__ import annotations

import os
import random

import anyio
from redis.asyncio import Redis

from bus import Codec, Delivery, Payload, Service, Settings, make_client


class Tick(Payload, tag="tick"):
    n: int = 0
    fail: bool = False


GROUP = os.environ.get("RECORDER_GROUP", "recorder")
MAX_DELAY = float(os.environ.get("RECORDER_MAX_DELAY_MS", "2")) / 1000
SETTINGS = Settings.from_env()
_redis: Redis | None = None


async def handle(delivery: Delivery) -> None:
    global _redis
    if _redis is None:
        _redis = make_client(SETTINGS)  # a cluster client when FLOWBUS_CLUSTER is set
    await anyio.sleep(random.uniform(0, MAX_DELAY))
    record = f"{delivery.session}|{delivery.seq}|{os.getpid()}|{delivery.deliveries}"
    assert isinstance(delivery.payload, Tick)
    if delivery.payload.fail:
        await _redis.rpush(f"{SETTINGS.prefix}:test:attempts:{GROUP}", record)
        raise RuntimeError(f"tick {delivery.seq} always fails")
    await _redis.rpush(f"{SETTINGS.prefix}:test:handled:{GROUP}", record)


service = Service(GROUP, handle, Codec([Tick]))
