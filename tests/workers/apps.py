"""Services for the CLI tests, configured by the environment.

``steps`` (group ``STEPS_GROUP``, default ``steps``) records every `Step` it handles as
``session|seq|n|deliveries|type`` in ``<prefix>:test:steps:<group>``; a step with ``fail`` set
raises while the key ``<prefix>:test:broken:<group>`` exists. It takes every type (no
``subscribes``), so a replay reaches it through the runtime's codec.
"""

from __future__ import annotations

import os
import time

import anyio
from redis.asyncio import Redis

from bus import Codec, Delivery, Payload, Service, Settings


class Step(Payload, tag="step"):
    n: int
    fail: bool = False


SETTINGS = Settings.from_env()
GROUP = os.environ.get("STEPS_GROUP", "steps")
redis = Redis.from_url(SETTINGS.url)
not_a_service = {"steps": "a dict is not a service"}


def records_key(prefix: str, group: str) -> str:
    return f"{prefix}:test:steps:{group}"


def broken_key(prefix: str, group: str) -> str:
    return f"{prefix}:test:broken:{group}"


async def handle(delivery: Delivery) -> None:
    step = delivery.payload
    assert isinstance(step, Step)
    if step.fail and await redis.exists(broken_key(SETTINGS.prefix, GROUP)):
        raise RuntimeError(f"step {step.n} is broken")
    record = f"{delivery.session}|{delivery.seq}|{step.n}|{delivery.deliveries}|{delivery.type}"
    await redis.rpush(records_key(SETTINGS.prefix, GROUP), record)


steps = Service(GROUP, handle, Codec([Step]))


def make_steps() -> Service:
    """A factory, as `flowbus worker tests.workers.apps:make_steps` accepts."""
    return steps


async def make_steps_later() -> Service:
    """An async factory, which `flowbus worker` cannot call before its event loop runs."""
    return steps


async def handle_stuck(delivery: Delivery) -> None:
    """Record the step, then hang (a handler no drain outlasts)."""
    await redis.rpush(records_key(SETTINGS.prefix, "stuck"), str(delivery.seq))
    await anyio.sleep_forever()


stuck = Service("stuck", handle_stuck, Codec([Step]))


async def handle_stuck_in_thread(delivery: Delivery) -> None:
    """Record the step, then hang in a thread (as a plain handler can): no cancelling it."""
    await redis.rpush(records_key(SETTINGS.prefix, "stuck"), str(delivery.seq))
    await anyio.to_thread.run_sync(time.sleep, 3600)


stuck_in_thread = Service("stuck", handle_stuck_in_thread, Codec([Step]))
