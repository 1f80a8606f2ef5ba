"""Batching of steps: every session's fenced acks and reads go out together.

Each session handles one event at a time, but hundreds of sessions step at once. `StepBatcher`
collects the steps made during one turn of the event loop and sends them together: one script
call per partition, all of them in one write on the batcher's own connection, so the cost per
event is a share of a call and of a round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from redis.asyncio import ConnectionPool
from redis.exceptions import ResponseError

from . import scripts
from .connection import CONNECTION_OPTIONS, TRANSIENT
from .settings import Settings

#: A batch whose replies have not all come after this long fails as a connection error would.
BATCH_TIMEOUT_SECONDS = 10.0


@dataclass(slots=True, eq=False)
class Step:
    """One session's step (see ``lua/step.lua`` for the fields); await `future` for its reply
    (a transient or response error is raised from it)."""

    stream: str
    lease: str
    token: str
    acks: Sequence[bytes] = ()
    read: str = ""
    give: Sequence[bytes] = ()
    verdict: Sequence[scripts.Arg] = ()
    future: asyncio.Future[Any] | None = None  # set by `StepBatcher.submit`

    def args(self) -> list[scripts.Arg]:
        if len(self.acks) == 1 and not (self.read or self.give or self.verdict):
            return ["a", self.acks[0]]  # the common step, in its short form
        return [
            self.read,
            len(self.acks),
            *self.acks,
            len(self.give),
            *self.give,
            len(self.verdict),
            *self.verdict,
        ]


class StepBatcher:
    """Sends `Step`s in shared batches, one at a time, on a connection of its own; each read
    takes up to `count` entries, a retiring session's keys live `retention_ms`. Start `run()`
    in a task group first.

    A step's reply comes in an asyncio future of its own, the cheapest wait there is; a waiter
    that is cancelled cancels only its own future. (The bus runs on asyncio, as redis-py does.)
    """

    def __init__(self, settings: Settings, *, count: int, retention_ms: int) -> None:
        pool = ConnectionPool.from_url(
            settings.url, socket_timeout=None, socket_connect_timeout=5.0, **CONNECTION_OPTIONS
        )
        # It connects on first use, and again after a failure.
        self._connection = pool.make_connection()  # type: ignore[no-untyped-call]  # untyped in redis-py
        self._count, self._retention_ms = count, retention_ms
        self._queue: list[Step] = []
        self._ready = anyio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def submit(self, step: Step) -> asyncio.Future[Any]:
        """Queue `step` for the next batch; return the future of its reply."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        step.future = future = self._loop.create_future()
        if not self._queue:  # the first step of the next batch wakes the sender
            self._ready.set()
        self._queue.append(step)
        return future

    async def run(self) -> None:
        try:
            with contextlib.suppress(*TRANSIENT):  # now rather than at the first event's step
                await self._connection.connect()
            while True:
                await self._ready.wait()
                self._ready = anyio.Event()
                batch, self._queue = self._queue, []
                await self._send(batch)
        finally:
            with anyio.CancelScope(shield=True):
                await self._connection.disconnect()

    async def _send(self, batch: list[Step]) -> None:
        by_lease: dict[tuple[str, str], list[Step]] = {}
        for step in batch:
            by_lease.setdefault((step.lease, step.token), []).append(step)
        calls: list[scripts.Call] = []
        for (lease, token), steps in by_lease.items():
            args: list[scripts.Arg] = [token, self._count, self._retention_ms]
            for step in steps:
                args += step.args()
            calls.append((scripts.STEP, [lease, *(s.stream for s in steps)], args))
        try:
            with anyio.fail_after(BATCH_TIMEOUT_SECONDS):
                results = await scripts.call_on(self._connection, calls)
        except TRANSIENT as exc:  # a timeout too (an OSError): the replies are lost
            await self._connection.disconnect(nowait=True)
            results = [exc] * len(calls)
        except BaseException:
            for step in batch:  # cancelled (or broken): these steps get no reply
                assert step.future is not None
                step.future.cancel()
            raise
        for steps, result in zip(by_lease.values(), results, strict=True):
            for i, step in enumerate(steps):
                future = step.future
                assert future is not None
                if future.done():  # its waiter was cancelled
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                    continue
                reply = result[i]
                if type(reply) is list and reply[0] == b"error":
                    future.set_exception(ResponseError(reply[1].decode(errors="replace")))
                else:
                    future.set_result(reply)
