"""A test handler service, configured by the environment.

``HANDLERS_SERVICE`` names it; ``HANDLERS_EVENTS`` lists the events it records (comma
separated; ``*`` for the whole catalog). Each handling appends JSON ``{session, seq, event, kind,
args}`` to ``<prefix>:test:events:<service>``. ``HANDLERS_MODE`` adds behaviour:

- ``pair``: two handlers on each event; the first raises, the second records.
- ``stuck``: handlers block (until the process is killed).
- ``gated``: handlers wait for an item on ``<prefix>:test:gate`` before recording.
"""

from __future__ import annotations

import os
from typing import Any

import anyio
import msgspec
from redis.asyncio import Redis

from bus import Settings
from flows import CATALOG, EmitterRef, EventService

SETTINGS = Settings.from_env()
NAME = os.environ.get("HANDLERS_SERVICE", "handlers")
MODE = os.environ.get("HANDLERS_MODE", "record")
EVENTS = os.environ.get("HANDLERS_EVENTS", "")
redis = Redis.from_url(SETTINGS.url)
app = EventService(NAME)


def recorder(event: str) -> Any:
    async def record(emitter: EmitterRef, *args: Any) -> None:
        if MODE == "stuck":
            await anyio.sleep_forever()
        if MODE == "gated":
            await redis.blpop([f"{SETTINGS.prefix}:test:gate"], timeout=30)
        entry = {
            "session": emitter.session,
            "seq": emitter.seq,
            "event": event,
            "kind": emitter.kind,
            "args": list(args),
        }
        await redis.rpush(f"{SETTINGS.prefix}:test:events:{NAME}", msgspec.json.encode(entry))

    record.__qualname__ = f"record_{event}"
    return record


def first_raises(emitter: EmitterRef, *args: Any) -> None:
    raise RuntimeError(f"first handler fails on seq {emitter.seq}")


for event in CATALOG if EVENTS == "*" else filter(None, EVENTS.split(",")):
    if MODE == "pair":
        app.add_event_handler(event, first_raises)
    app.add_event_handler(event, recorder(event))
