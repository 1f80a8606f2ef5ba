"""Batching of step calls: every session's fenced ack-and-read goes out in one pipeline.

Each session handles one event at a time, so each step is a round trip it must wait for; but
hundreds of sessions step at once. `StepBatcher` collects the steps made during one turn of the
event loop and sends them together, so the cost per event is a share of a round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from redis.asyncio import Redis

from . import scripts
from .connection import TRANSIENT


@dataclass(slots=True, eq=False)
class _Call:
    keys: Sequence[str]
    args: Sequence[scripts.Arg]
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Any = None
    error: BaseException | None = None


class StepBatcher:
    """Runs `scripts.STEP` calls in shared pipelines. Start `run()` in a task group first."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._queue: list[_Call] = []
        self._ready = anyio.Event()
        self.batches = 0
        self.calls = 0

    async def step(self, keys: Sequence[str], args: Sequence[scripts.Arg]) -> Any:
        """Queue one step, wait for its batch, return its reply or raise its error."""
        call = _Call(keys, args)
        self._queue.append(call)
        self._ready.set()
        await call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready = anyio.Event()
            batch, self._queue = self._queue, []
            await self._send(batch)
            self.batches += 1
            self.calls += len(batch)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            results = await scripts.call_many(
                self._redis, [(scripts.STEP, c.keys, c.args) for c in batch]
            )
        except TRANSIENT as exc:
            results = [exc] * len(batch)
        for call, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                call.error = result
            else:
                call.result = result
            call.done.set()
