"""Every catalog event can be emitted by a bot and handled, with its typed payload, by a
handler service in another process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from bus import Bus
from flows import CATALOG, BotSession, Emitter, Events, EventSpec
from tests.conftest import make_settings
from tests.flows.test_catalog import full
from tests.flows.test_events import ready
from tests.support import WorkerProcesses, raw, wait_for
from workers.server import LocalServer

pytestmark = pytest.mark.anyio


def emitter_of(spec: EventSpec) -> Emitter:
    return Emitter(sorted(spec.emitters)[0], "sample")


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def handled(server: LocalServer) -> AsyncIterator[dict[str, dict[str, Any]]]:
    """Emit every catalog event once (one session) to a service handling all of them."""
    settings = make_settings(server.url)
    workers = WorkerProcesses()
    try:
        env = {"HANDLERS_SERVICE": "all", "HANDLERS_EVENTS": "*"}
        workers.start("tests.apps.handlers:app", settings, env)
        async with Bus.connect(settings) as bus:
            await ready(bus, "all")
            async with BotSession.open(bus, "call-catalog") as bot:
                events = Events(bot, sync_timeout=30)
                for name, spec in CATALOG.items():
                    payload = full(spec)
                    args = [getattr(payload, f) for f in spec.args]
                    await events.emit(emitter_of(spec), name, *args)
            key = f"{settings.prefix}:test:events:all"

            async def all_handled() -> bool:
                return int(await raw(bus).llen(key)) >= len(CATALOG)

            await wait_for(all_handled, what="every catalog event")
            records = [json.loads(r) for r in await raw(bus).lrange(key, 0, -1)]
        yield {r["event"]: r for r in records}
    finally:
        workers.stop_all()


@pytest.mark.parametrize("name", sorted(CATALOG))
async def test_the_event_reaches_its_handler_with_its_payload(
    name: str, handled: dict[str, dict[str, Any]]
) -> None:
    spec = CATALOG[name]
    payload = full(spec)
    record = handled[name]
    assert record["kind"] == emitter_of(spec).kind
    assert record["args"] == [msgspec.to_builtins(getattr(payload, f)) for f in spec.args]
    assert record["seq"] == list(CATALOG).index(name) + 1  # handled in the order emitted
