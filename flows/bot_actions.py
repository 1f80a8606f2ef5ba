"""The actions a bot runs itself: those of the types registered with
`FlowManager.register_action`, and a node's inline handlers. A node entry's actions go to the
actions service as data; one whose handler is here names it by a key (``gen/phase/index``)
instead, and the service asks the bot to run it by that key, at its place in the list."""

from __future__ import annotations

from typing import Any, Literal

from .actions import BUILTINS
from .functions import Handler


class BotActions:
    """The handlers of one bot's actions: registered by type, and wired by key per node entry
    (dropped once taken, or once the actions service will not ask for them)."""

    def __init__(self) -> None:
        self._registered: dict[str, Handler] = {}
        self._wired: dict[str, tuple[int, Handler]] = {}  # key -> (node entry, handler)

    def register(self, action_type: str, handler: Handler) -> None:
        if not callable(handler):
            raise ValueError(f"the handler of action {action_type!r} is not callable")
        self._registered[action_type] = handler

    def wire(
        self, actions: list[dict[str, Any]], gen: int, phase: Literal["pre", "post"]
    ) -> list[dict[str, Any]]:
        """Actions of node entry `gen` as data; a callable handler (inline, or registered in
        this bot) stays here and its action names it by a key instead."""
        wired = []
        for i, action in enumerate(actions):
            handler, kind = action.get("handler"), action["type"]
            if kind in BUILTINS and kind != "function":  # as Pipecat: an inline handler of a
                handler = self._registered.get(kind)  # built-in is ignored (registered ones run)
            elif callable(handler) and kind not in BUILTINS:  # as Pipecat: registered
                handler = self._registered.setdefault(kind, handler)  # on first sight only
            elif not callable(handler):
                handler = self._registered.get(kind)
            if callable(action.get("handler")):  # the bot's own: not data
                action = {k: v for k, v in action.items() if k != "handler"}
            if handler is None:
                wired.append(action)
                continue
            key = f"{gen}/{phase}/{i}"
            self._wired[key] = (gen, handler)
            wired.append(action | {"bot_handler": key})
        return wired

    def take(self, key: str) -> Handler | None:
        """The handler wired as `key`, once (a worker that runs the action again does not ask
        again): dropped, the table does not grow with every node entry of a long call."""
        wired = self._wired.pop(key, None)
        return None if wired is None else wired[1]

    def drop(self, gen: int) -> None:
        """Node entry `gen` did not happen: its actions will not be asked for."""
        self._wired = {k: a for k, a in self._wired.items() if a[0] != gen}

    def drop_before(self, gen: int) -> None:
        """The actions service is done with every node entry before `gen`."""
        self._wired = {k: a for k, a in self._wired.items() if a[0] >= gen}

    def clear(self) -> None:
        self._wired.clear()

    def due(self) -> list[str]:
        """The keys of the wired actions not taken yet."""
        return list(self._wired)
