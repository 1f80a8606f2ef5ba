"""The flow's shared state: what one side changes, the other reads, nested values and nulls
included."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import anyio
import pytest

from flows import SharedState

pytestmark = pytest.mark.anyio


class Store:
    """A session's state hash, in memory."""

    def __init__(self) -> None:
        self.fields: dict[str, bytes] = {}
        self.writes: list[set[str]] = []

    async def read(self) -> dict[str, bytes]:
        return dict(self.fields)

    async def write(self, fields: Mapping[str, str | bytes]) -> None:
        self.writes.append(set(fields))
        self.fields |= {k: v.encode() if isinstance(v, str) else v for k, v in fields.items()}


async def test_changes_inside_nested_values_nulls_and_deletions_are_shared() -> None:
    store, bot, worker = Store(), SharedState(), SharedState()
    bot["order"] = {"size": "S", "items": []}
    bot["callback"] = None  # a value like any other
    await bot.flush(store.write)

    await worker.load(store.read)
    worker["order"]["items"].append("pizza")  # changed in place
    worker["seen"] = True
    bot["order"]["size"] = "L"  # meanwhile, on the bot's side
    await worker.flush(store.write)
    assert store.writes[-1] == {"flow.order", "flow.seen"}

    await bot.load(store.read)  # keeps its unflushed change, takes the worker's other key
    assert bot == {"order": {"size": "L", "items": []}, "callback": None, "seen": True}
    del bot["callback"]
    await bot.flush(store.write)  # the last writer of a key wins
    assert store.writes[-1] == {"flow.order", "flow.callback"}

    fresh = SharedState()
    await fresh.load(store.read)
    assert fresh == {"order": {"size": "L", "items": []}, "seen": True}
    await fresh.flush(store.write)  # nothing changed: nothing written
    assert len(store.writes) == 3


async def test_a_key_that_cannot_be_shared_is_refused_where_it_is_set() -> None:
    """Keys are the hash's field names (``flow.<key>``): a non-text key must be refused where
    it is set, as a value that is not JSON is, not fail a later flush far from its cause
    (in a worker, the flush after the action: the event retried, the action run again)."""
    store, state = Store(), SharedState()
    with pytest.raises(TypeError, match="key"):
        state[1] = "one"  # type: ignore[index]
    await state.flush(store.write)
    assert store.writes == []


async def test_a_key_deleted_here_stays_deleted_through_a_load_until_it_is_flushed() -> None:
    store, state = Store(), SharedState()
    store.fields = {"flow.a": b"1"}
    await state.load(store.read)
    del state["a"]
    await state.load(store.read)  # the store has it still
    assert "a" not in state
    await state.flush(store.write)
    assert store.fields == {"flow.a": b""}


async def test_a_key_deleted_then_set_again_to_its_old_value_is_written() -> None:
    store, state = Store(), SharedState()
    for change in (lambda: state.update(a=1), lambda: state.pop("a"), lambda: state.update(a=1)):
        change()
        await state.flush(store.write)
    assert store.fields == {"flow.a": b"1"} and len(store.writes) == 3


async def test_a_key_flushed_while_two_reads_were_on_their_way_stays_after_both() -> None:
    """Each read's reply was made before the flush: the second to come back must not undo
    what the flush wrote, though the first one's load is over by then."""
    store, state = Store(), SharedState()
    store.fields = {"flow.size": b'"S"'}
    await state.load(store.read)
    made, back = [anyio.Event(), anyio.Event()], [anyio.Event(), anyio.Event()]
    loaded = anyio.Event()

    def late(i: int) -> Callable[[], Awaitable[dict[str, bytes]]]:
        async def read() -> dict[str, bytes]:
            reply = dict(store.fields)  # made now, back once let
            made[i].set()
            await back[i].wait()
            return reply

        return read

    async def first() -> None:
        await state.load(late(0))
        loaded.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await made[0].wait()
        tg.start_soon(state.load, late(1))
        await made[1].wait()
        state["size"] = "L"
        await state.flush(store.write)
        back[0].set()
        await loaded.wait()
        back[1].set()
    assert state == {"size": "L"}
