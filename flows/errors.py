"""Errors users of `flows` see.

The names of Pipecat Flows are kept for what Pipecat Flows users already catch::

    FlowError
    ├── FlowInitializationError
    ├── FlowTransitionError
    ├── InvalidFunctionError
    │   └── InvalidNodeFunctionError  a node's function; an InvalidNodeError too
    ├── InvalidNodeError            a node's configuration: `node` and `key` say where
    ├── ActionError                 an action failed, is unknown, or is malformed
    └── EventError                  event-handler errors
        ├── UnknownEventError       a name neither in the catalog nor declared
        └── InvalidHandlerError     not callable, or for an emitter that never emits the event
"""

from __future__ import annotations

from collections.abc import Sequence


class FlowError(Exception):
    """Base class of every error raised by `flows`."""


class FlowInitializationError(FlowError):
    """The flow could not be initialized."""


class FlowTransitionError(FlowError):
    """A node was set before `initialize`, or a transition could not happen."""


class InvalidFunctionError(FlowError):
    """A function definition or handler is invalid."""


class ActionError(FlowError):
    """An action is malformed, of an unregistered type, or its handler failed."""


class EventError(FlowError):
    """Base of the event-handler errors."""


class UnknownEventError(EventError, KeyError):
    """An event name that is neither in the catalog nor declared by the service."""

    def __init__(self, name: str, suggestions: Sequence[str], known: Sequence[str] = ()) -> None:
        hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
        listed = f"; known events: {', '.join(known)}" if known else ""
        super().__init__(f"unknown event {name!r}{hint} (declare custom events first){listed}")
        self.name, self.suggestions = name, list(suggestions)

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


class InvalidHandlerError(EventError, ValueError):
    """A handler that is not callable, or filtered on an emitter that never emits its event."""


class InvalidNodeError(FlowError, ValueError):
    """A node configuration that cannot be used; `node` and `key` say where."""

    def __init__(self, node: str, key: str, problem: str) -> None:
        super().__init__(f"node {node!r}, key {key!r}: {problem}")
        self.node, self.key = node, key


class InvalidNodeFunctionError(InvalidNodeError, InvalidFunctionError):
    """A node's function that cannot be used: Pipecat's `InvalidFunctionError` and an
    `InvalidNodeError` both."""
