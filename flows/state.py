"""The flow's shared `state`: a dict the bot and every worker read and write.

It lives in the session's state hash, one field ``flow.<key>`` per key holding JSON (empty once
the key was deleted), so writers of different keys never clash (the last writer of one key
wins). A `SharedState` is a plain
mutable mapping in memory; `load` refreshes it, `flush` writes the keys changed since.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from typing import Any

import msgspec

PREFIX = "flow."
Reader = Callable[[], Awaitable[dict[str, bytes]]]
Writer = Callable[[Mapping[str, str | bytes]], Awaitable[None]]


#: What a deleted key's field holds (not JSON, so that a stored ``null`` stays a value).
DELETED = b""


class SharedState(MutableMapping[str, Any]):
    """The session's flow state (JSON values). What changed since the last `load` or `flush`
    is found by comparing each value's JSON with the stored one, so a change inside a nested
    value (``state["order"]["size"] = "L"``) is written as any other."""

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}
        self._stored: dict[str, bytes] = {}  # each key's JSON as last loaded or flushed
        self._reading = 0  # loads under way
        self._flushed: dict[str, bytes] = {}  # what flushes wrote meanwhile (newer than a read)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):  # a field name of the state hash
            raise TypeError(f"state keys are str, not {type(key).__name__} ({key!r})")
        msgspec.json.encode(value)  # refuse what cannot be shared, where it is set
        self._data[key] = value

    def __delitem__(self, key: str) -> None:
        del self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"SharedState({self._data!r})"

    def _changed(self) -> dict[str, bytes]:
        """Key -> its JSON (`DELETED` if deleted), for every key that differs from its stored
        value."""
        changed = {k: msgspec.json.encode(v) for k, v in self._data.items()}
        changed = {k: v for k, v in changed.items() if self._stored.get(k) != v}
        return changed | dict.fromkeys(self._stored.keys() - self._data.keys(), DELETED)

    async def load(self, read: Reader) -> None:
        """Replace the contents with the stored state, keeping what changed here and was not
        flushed yet."""
        self._reading += 1
        try:
            fields = await read()  # first: what is set meanwhile counts as changed here
        finally:
            self._reading -= 1
        changed = self._changed()
        stored = {k.removeprefix(PREFIX): v for k, v in fields.items() if k.startswith(PREFIX)}
        stored |= self._flushed  # written while the read was on its way: newer than it
        stored = {k: v for k, v in stored.items() if v != DELETED}
        if not self._reading:
            self._flushed.clear()
        data = {k: msgspec.json.decode(v) for k, v in stored.items()}
        for key, value in changed.items():
            if value == DELETED:
                data.pop(key, None)
            else:
                data[key] = self._data[key]
        self._data, self._stored = data, stored

    async def flush(self, write: Writer) -> None:
        """Write the keys that changed since they were loaded or flushed."""
        changed = self._changed()
        if not changed:
            return
        await write({PREFIX + k: v for k, v in changed.items()})
        if self._reading:
            self._flushed |= changed
        for key, value in changed.items():
            if value == DELETED:
                self._stored.pop(key, None)
            else:
                self._stored[key] = value
