"""Handler slots of a worker: how many handlings run at once (`Settings.concurrency`)."""

from __future__ import annotations

from collections import deque

import anyio


class Slots:
    """Handler slots of the worker (`Settings.concurrency`): a counting semaphore whose fast
    path is two attribute accesses (anyio's limiter looks up the current task every time,
    which is a good share of the cost of a no-op handler)."""

    def __init__(self, total: int) -> None:
        self.free = total
        self._waiters: deque[anyio.Event] = deque()

    def take(self) -> bool:
        """Take a free slot if there is one (no waiting, no coroutine: the common case)."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        return False

    async def acquire(self) -> None:
        if self.take():
            return
        event = anyio.Event()
        self._waiters.append(event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():  # handed a slot, then cancelled: pass it on
                self.release()
            else:
                self._waiters.remove(event)
            raise

    def release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()  # the slot goes straight to the first waiter
        else:
            self.free += 1
