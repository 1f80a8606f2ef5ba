"""The flow's shared `state`: a dict the bot and every worker read and write.

It lives in the session's state hash, one field ``flow.<key>`` per key holding JSON, so writers
of different keys never clash (the last writer of one key wins). A `SharedState` is a plain
mutable mapping in memory; `load` refreshes it, `flush` writes the keys changed since.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from typing import Any

import msgspec

PREFIX = "flow."
Reader = Callable[[], Awaitable[dict[str, bytes]]]
Writer = Callable[[Mapping[str, str | bytes]], Awaitable[None]]


class SharedState(MutableMapping[str, Any]):
    """The session's flow state (JSON values)."""

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}
        self._dirty: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        msgspec.json.encode(value)  # refuse what cannot be shared, where it is set
        self._data[key] = value
        self._dirty.add(key)

    def __delitem__(self, key: str) -> None:
        del self._data[key]
        self._dirty.add(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"SharedState({self._data!r})"

    async def load(self, read: Reader) -> None:
        """Replace the contents with the stored state, keeping keys changed but not flushed."""
        stored = {
            k.removeprefix(PREFIX): msgspec.json.decode(v)
            for k, v in (await read()).items()
            if k.startswith(PREFIX)
        }
        for key in self._dirty:
            stored.pop(key, None)
            if key in self._data:
                stored[key] = self._data[key]
        self._data = {k: v for k, v in stored.items() if v is not None}

    async def flush(self, write: Writer) -> None:
        """Write the keys changed since the last flush (a deleted key is stored as null)."""
        if not self._dirty:
            return
        fields = {PREFIX + k: msgspec.json.encode(self._data.get(k)) for k in self._dirty}
        await write(fields)
        self._dirty.clear()
