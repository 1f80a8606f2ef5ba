"""The demo's journal: what the sample services did in each call, for the demo's order check.

The sample app (`workers.sample`) writes one record per custom action it ran and per event its
handlers saw, to the list ``<prefix>:demo:journal:<session>``. An action record holds the
session stream's last ``seq`` when the action started and when it ended: everything published
up to that seq was published before, everything after it later, so the demo can place each
action among the call's events without comparing clocks.

    redis-cli LRANGE '<prefix>:demo:journal:call-01' 0 -1
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import msgspec
from redis.asyncio import Redis

from bus import Keys, Settings, make_client
from bus.connection import call, close
from flows import EmitterRef, WorkerFlowManager


class ActionRecord(msgspec.Struct, tag="action", frozen=True):
    """A custom or ``function`` action ran: `key` is ``<entry>/<phase>/<index>`` of its node
    entry (`entry`: the seq of its ``node.entered``); `first` and `last` are the stream's last
    seq when it started and ended."""

    service: str
    key: str
    action: str
    first: int
    last: int
    pid: int


class EventRecord(msgspec.Struct, tag="event", frozen=True):
    """A handler saw event `event` (`seq` on the session stream) at `handled_us` (µs since
    the epoch, this machine's clock)."""

    service: str
    event: str
    seq: int
    deliveries: int
    handled_us: int
    pid: int


Record = ActionRecord | EventRecord
_decode = msgspec.json.Decoder(Record).decode


def journal_key(prefix: str, session: str) -> str:
    return f"{prefix}:demo:journal:{session}"


async def read_journal(redis: Redis, prefix: str, session: str) -> list[Record]:
    """The records of one call, in the order they were written."""
    raw: Any = await redis.lrange(journal_key(prefix, session), 0, -1)
    return [_decode(item) for item in raw]


class Journal:
    """The writer the sample services use; settings come from the ``FLOWBUS_*`` environment
    of the worker process, the connection is made on first use. Like the bus, it tries again
    through a lost connection (a server restarting) for up to 15 s: a journal write that fails
    would fail the action it records."""

    def __init__(self) -> None:
        self._redis: Redis | None = None
        self._settings = Settings()
        self._keys = Keys()
        self._pid = os.getpid()

    @asynccontextmanager
    async def open(self) -> AsyncIterator[Journal]:
        """For a service's lifespan: its connection is closed once the worker drained (made
        again should it be used after)."""
        try:
            yield self
        finally:
            if self._redis is not None:
                redis, self._redis = self._redis, None
                await close(redis)

    def _client(self) -> Redis:
        if self._redis is None:
            self._settings = Settings.from_env()
            self._redis = make_client(self._settings, max_connections=16)
            self._keys = Keys(self._settings.prefix, self._settings.partitions)
        return self._redis

    async def _last_seq(self, session: str) -> int:
        read = partial(self._client().hget, self._keys.meta(session), "seq")
        seq: Any = await call("journal read", read, self._settings, session)
        return int(seq or 0)

    async def _write(self, session: str, record: Record) -> None:
        """Append `record`; the journal lives as long as the session's keys would after its
        end (from its last record), so a deployment that runs on leaks none. (A write retried
        after a lost reply may be there twice: a check reads it as a repeat.)"""
        redis = self._client()
        key = journal_key(self._keys.prefix, session)

        async def append() -> None:  # a pipeline is empty after its execute, even a failed one
            pipe = redis.pipeline(transaction=False)
            pipe.rpush(key, msgspec.json.encode(record))
            pipe.pexpire(key, int(self._settings.retention_seconds * 1000))
            await pipe.execute()

        await call("journal write", append, self._settings, session)

    @asynccontextmanager
    async def action(
        self, flow_manager: WorkerFlowManager, action: dict[str, Any], service: str = "actions"
    ) -> AsyncIterator[None]:
        """Record the action run inside this block (only if it completes)."""
        session = flow_manager.session_id
        first = await self._last_seq(session)
        yield
        last = await self._last_seq(session)
        key = flow_manager.action_key.removeprefix(f"{session}/")
        kind = str(action.get("handler") if action.get("type") == "function" else action["type"])
        await self._write(session, ActionRecord(service, key, kind, first, last, self._pid))

    async def event(self, emitter: EmitterRef, event: str, service: str) -> None:
        """Record that a handler of `service` saw `event`."""
        handled_us = time.time_ns() // 1000
        record = EventRecord(service, event, emitter.seq, emitter.deliveries, handled_us, self._pid)
        await self._write(emitter.session, record)
