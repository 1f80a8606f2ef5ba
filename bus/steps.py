"""Batching of step calls: every session's fenced acks and reads go out in one pipeline.

Each session handles one event at a time, but hundreds of sessions step at once. `StepBatcher`
collects the steps made during one turn of the event loop and sends them together, so the cost
per event is a share of a round trip. A `Step` stays open, taking more acks, until its batch is
sent: a session that handles several events in one turn acknowledges them in one call.
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
class Step:
    """One call of `scripts.STEP` for one session (see ``lua/step.lua`` for the fields)."""

    keys: Sequence[str]
    token: str
    retention_ms: int
    acks: list[str] = field(default_factory=list)
    read: str = ""
    count: int = 1
    give: Sequence[scripts.Arg] = ()
    verdict: Sequence[scripts.Arg] = ()
    sent: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Any = None
    error: BaseException | None = None

    def args(self) -> list[scripts.Arg]:
        return [
            self.token,
            self.read,
            self.count,
            self.retention_ms,
            len(self.acks),
            *self.acks,
            len(self.give),
            *self.give,
            *self.verdict,
        ]

    async def reply(self) -> Any:
        """Wait for the step's batch; its reply, or its error raised."""
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class StepBatcher:
    """Sends `Step`s in shared pipelines, one pipeline at a time. Start `run()` in a task group
    first."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._queue: list[Step] = []
        self._ready = anyio.Event()
        self.batches = 0
        self.calls = 0

    def submit(self, step: Step) -> None:
        """Queue `step` for the next batch; it may change until it is `sent`."""
        self._queue.append(step)
        self._ready.set()

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready = anyio.Event()
            batch, self._queue = self._queue, []
            for step in batch:
                step.sent = True
            await self._send(batch)
            self.batches += 1
            self.calls += len(batch)

    async def _send(self, batch: list[Step]) -> None:
        try:
            results = await scripts.call_many(
                self._redis, [(scripts.STEP, s.keys, s.args()) for s in batch]
            )
        except TRANSIENT as exc:
            results = [exc] * len(batch)
        for step, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                step.error = result
            else:
                step.result = result
            step.done.set()
