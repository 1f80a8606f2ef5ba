"""A reply's function calls, run as Pipecat runs them: each handler within its timeout, the call
and its result into the LLM's context in OpenAI's form, the node it asks for (its handler's, else
its `transition_to`); one ``cancel_on_interruption`` cancelled when the caller speaks up."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from .calling import invoke_function
from .config import NodeConfig
from .errors import FlowTransitionError, InvalidFunctionError, InvalidNodeError
from .functions import TRANSITION_IN_YAML
from .speech import FunctionCall

if TYPE_CHECKING:
    from .manager import FlowManager

log = structlog.get_logger("flowbus.flow")

#: What the LLM gets back from a function that returned no result (``(None, next_node)``).
ACKNOWLEDGED = {"status": "acknowledged"}
#: What the LLM gets from a function call `interrupt` cancelled (Pipecat's words).
CANCELLED = "CANCELLED"


class _NoResponse:
    def __repr__(self) -> str:
        return "NO_RESPONSE"


#: Return ``(result, NO_RESPONSE)`` from a node function to stay in the node without another
#: LLM turn (as Pipecat's ``NO_RESPONSE``).
NO_RESPONSE: Any = _NoResponse()

NodeLike = NodeConfig | Mapping[str, Any]


class Calls:
    """What a reply's function calls gave: the node they ask for, whether the LLM is to see
    their results, the messages for the context; `interrupts` is the manager's count of
    interruptions when the LLM was asked."""

    def __init__(self, interrupts: int) -> None:
        self.interrupts = interrupts
        self.next_node: NodeLike | None = None
        self.again = False
        self.messages: list[dict[str, Any]] = []


class Interrupted(Exception):
    """A ``cancel_on_interruption`` function's handler was cancelled by `interrupt`."""


def content_of(result: Any) -> str:
    """A function's result as the tool message holds it, as Pipecat writes it: JSON, or
    "COMPLETED" for a falsy one (an object JSON has no form for: its `str`)."""
    return json.dumps(result, ensure_ascii=False, default=str) if result else "COMPLETED"


def function_call_messages(call: FunctionCall, content: str) -> list[dict[str, Any]]:
    """A function call and what it gave as Pipecat's context holds them, in OpenAI's form: the
    assistant's call, then the tool's message with `content`."""
    call_id = call.id or f"call_{secrets.token_hex(12)}"  # (an LLM that gave the call none)
    arguments = json.dumps(call.arguments, ensure_ascii=False, default=str)
    asked = {"id": call_id, "function": {"name": call.name, "arguments": arguments}}
    return [
        {"role": "assistant", "tool_calls": [asked | {"type": "function"}]},
        {"role": "tool", "content": content, "tool_call_id": call_id},
    ]


@contextmanager
def interruptible(scopes: set[anyio.CancelScope]) -> Iterator[anyio.CancelScope]:
    """A scope that `FlowManager.interrupt` cancels, kept in `scopes` while it is open."""
    with anyio.CancelScope() as scope:
        scopes.add(scope)
        try:
            yield scope
        finally:
            scopes.discard(scope)


async def call_function(
    manager: FlowManager,
    node: NodeConfig,
    call: FunctionCall,
    context: list[dict[str, Any]],
    *,
    cancellable: set[anyio.CancelScope],
    checked: Callable[[NodeLike], NodeConfig],
    after_interrupt: bool = False,
) -> tuple[NodeLike | None, bool]:
    """Run the function the LLM called in `manager`'s `node` (not one
    ``cancel_on_interruption`` if the caller interrupted already: `after_interrupt`; one
    running is cancelled with the scopes in `cancellable`), and put what the LLM gets back
    into `context`; the node it asks for (its handler's, else its `transition_to`; a config
    its handler returns, validated by `checked`), if any, and whether the LLM is to see its
    result (as Pipecat: a function that stays in the node, unless its handler returned
    ``(result, NO_RESPONSE)``)."""
    function = next((f for f in node.functions if f.name == call.name), None)
    next_node: Any = None
    result: Any = ACKNOWLEDGED  # a function with only a transition_to
    try:
        if function is None:
            raise FlowTransitionError(f"function {call.name!r} is not a function of this node")
        target = function.transition_to
        if function.handler is None and target is None:
            raise FlowTransitionError(f"function {call.name!r} has no handler")
        if any(manager.flow is None or t not in manager.flow.nodes for t in function.targets()):
            raise FlowTransitionError(
                f"function {call.name!r} goes to {target!r}, no node of the flow"
            )
        if after_interrupt and function.cancel_on_interruption:
            raise Interrupted
        if function.handler is not None:
            timeout = function.timeout or manager.function_timeout
            # (a set of its own for one that nothing is to cancel)
            interruptible_by = cancellable if function.cancel_on_interruption else set()
            with (
                anyio.move_on_after(timeout) as scope,
                interruptible(interruptible_by) as interrupted,
            ):
                returned = await invoke_function(function.handler, call.arguments, manager)
            # (a plain handler's thread returns late, not cancelled)
            if interrupted.cancel_called:
                raise Interrupted
            if scope.cancel_called:
                raise TimeoutError(f"timed out after {timeout}s")
            if isinstance(returned, tuple):
                result, next_node = returned
            else:
                result = returned
        if next_node is TRANSITION_IN_YAML:
            if target is None and not function.from_file:  # (as Pipecat: nothing decides)
                raise InvalidFunctionError(
                    f"function {call.name!r} returned TRANSITION_IN_YAML, but it has no "
                    "transition_to and is not of a flow file: return a node's config, or "
                    "None to stay"
                )
            next_node = None
        if next_node is None and target is not None and manager.flow is not None:
            name = target if isinstance(target, str) else target.destination(call.name, result)
            next_node = manager.flow.nodes[name] if name else None
        if next_node and next_node is not NO_RESPONSE:  # (as Pipecat, a falsy one stays)
            if isinstance(next_node, str):
                raise InvalidFunctionError(
                    f"function {call.name!r} returned the node name {next_node!r}: return "
                    "its config, or (result, TRANSITION_IN_YAML) and give it a transition_to"
                )
            try:  # an error of the function's, as in Pipecat, not of the LLM turn
                next_node = checked(next_node)
            except InvalidNodeError as exc:
                problem = f"function {call.name!r} returned a node that cannot be entered"
                raise InvalidFunctionError(f"{problem}: {exc}") from None
        result = ACKNOWLEDGED if result is None else result
    except Interrupted:
        log.info("function_call_cancelled", function=call.name, why="interrupt")
        context.extend(function_call_messages(call, CANCELLED))
        return None, False  # nowhere, and no LLM turn for it: the caller's turn comes
    except Exception as exc:
        result = {"status": "error", "error": str(exc)}  # as Pipecat gives it; it stays
        next_node = None
        log.error("function_call_failed", function=call.name, error=str(exc))
    context.extend(function_call_messages(call, content_of(result)))
    if next_node is NO_RESPONSE:
        return None, False
    return (next_node or None), not next_node
