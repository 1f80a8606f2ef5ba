"""Calling user handlers the way Pipecat users write them: `def` or `async def`, functions or
callable objects, with the legacy shorter signature where Pipecat accepts one."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any


def required_positionals(handler: Callable[..., Any]) -> int:
    """How many positional arguments `handler` requires (-1 if it cannot be inspected)."""
    try:
        params = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):
        return -1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in params if p.default is p.empty and p.kind in kinds)


async def invoke(handler: Callable[..., Any], *args: Any) -> Any:
    """Await an async handler (an object with an async ``__call__`` too, which Pipecat misses);
    run a plain one in a worker thread, so blocking code stalls no other session; await
    whatever awaitable it returns."""
    call_method = None if inspect.isroutine(handler) else type(handler).__call__
    if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call_method):
        result = handler(*args)
    else:
        import anyio

        result = await anyio.to_thread.run_sync(functools.partial(handler, *args))
    return await result if inspect.isawaitable(result) else result


async def invoke_action(handler: Callable[..., Any], action: dict[str, Any], manager: Any) -> Any:
    """``handler(action, flow_manager)``, or the legacy ``handler(action)``."""
    if required_positionals(handler) == 1:
        return await invoke(handler, action)
    return await invoke(handler, action, manager)
