"""Handler slots: a waiter that gives up passes its turn on, and no slot is ever lost."""

from __future__ import annotations

import anyio
import pytest

from bus.slots import Slots

pytestmark = pytest.mark.anyio


async def test_handler_slots_pass_over_cancelled_waiters_and_are_never_lost() -> None:
    slots = Slots(1)
    await slots.acquire()
    order: list[str] = []
    scopes: dict[str, anyio.CancelScope] = {}

    async def wait(name: str) -> None:
        with anyio.CancelScope() as scopes[name]:
            await slots.acquire()
            order.append(name)
            slots.release()

    async with anyio.create_task_group() as tg:
        for name in ("a", "b", "c"):
            tg.start_soon(wait, name)
        await anyio.wait_all_tasks_blocked()
        scopes["b"].cancel()  # gives up while waiting
        await anyio.wait_all_tasks_blocked()
        slots.release()
    assert order == ["a", "c"] and slots.free == 1

    await slots.acquire()
    async with anyio.create_task_group() as tg:
        for name in ("d", "e"):
            tg.start_soon(wait, name)
        await anyio.wait_all_tasks_blocked()
        slots.release()  # handed to d...
        scopes["d"].cancel()  # ...which is cancelled before it resumed: it uses or passes it
    assert order[-1] == "e" and slots.free == 1
