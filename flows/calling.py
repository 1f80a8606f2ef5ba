"""Calling user handlers the way Pipecat users write them: `def` or `async def`, functions or
callable objects, with the legacy shorter signature where Pipecat accepts one."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any


def is_seconds(value: object, *, zero: bool = False) -> bool:
    """Whether `value` is a time limit or delay: a finite number of seconds above 0 (0 too
    with `zero`), not a bool. An infinite one, NaN, 0 or less, or a string made waits that
    never end, or fail at once, or fail later with a TypeError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return (0 <= value if zero else 0 < value) and value < math.inf


def parameter_count(handler: Callable[..., Any]) -> int:
    """How many parameters `handler` declares, defaults included, which is how Pipecat
    chooses the signature to call (-1 if it cannot be inspected)."""
    try:
        return len(inspect.signature(handler).parameters)
    except (TypeError, ValueError):
        return -1


async def invoke(handler: Callable[..., Any], *args: Any) -> Any:
    """Await an async handler (an object with an async ``__call__`` too, which Pipecat misses);
    run a plain one in a worker thread, so blocking code stalls no other session; await
    whatever awaitable it returns.

    A thread cannot be stopped: cancelled (a timeout), a plain handler is waited for until it
    returns, and only then does the cancellation go on. Given up on instead, it would run on
    beside its session's next event, and a stuck one would keep its worker from exiting."""
    call_method = None if inspect.isroutine(handler) else type(handler).__call__
    if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call_method):
        result = handler(*args)
    else:
        import anyio

        result = await anyio.to_thread.run_sync(functools.partial(handler, *args))
    return await result if inspect.isawaitable(result) else result


async def invoke_action(handler: Callable[..., Any], action: dict[str, Any], manager: Any) -> Any:
    """``handler(action, flow_manager)``, or the legacy ``handler(action)`` for a handler of
    one parameter."""
    if parameter_count(handler) == 1:
        return await invoke(handler, action)
    return await invoke(handler, action, manager)


async def invoke_function(handler: Callable[..., Any], args: Any, manager: Any) -> Any:
    """A node function's ``handler(args, flow_manager)``, or the older ``handler(args)`` and
    ``handler()``, by how many parameters it declares."""
    count = parameter_count(handler)
    if count == 0:
        return await invoke(handler)
    if count == 1:
        return await invoke(handler, args)
    return await invoke(handler, args, manager)
