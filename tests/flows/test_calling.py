"""Calling user handlers with the signature Pipecat would choose for them."""

from __future__ import annotations

import math
from typing import Any

import pytest

from flows.calling import invoke_action, invoke_function, is_seconds

pytestmark = pytest.mark.anyio
MANAGER = object()


async def test_an_action_handler_gets_the_manager_unless_it_declares_one_parameter() -> None:
    def legacy(action: dict[str, Any]) -> Any:
        return ("legacy", action)

    async def optional(action: dict[str, Any], flow_manager: Any = None) -> Any:
        return ("optional", flow_manager)

    async def both(action: dict[str, Any], flow_manager: Any) -> Any:
        return ("both", flow_manager)

    action = {"type": "x"}
    assert await invoke_action(legacy, action, MANAGER) == ("legacy", action)
    assert await invoke_action(optional, action, MANAGER) == ("optional", MANAGER)
    assert await invoke_action(both, action, MANAGER) == ("both", MANAGER)


async def test_a_function_handler_is_called_with_as_many_arguments_as_it_declares() -> None:
    async def none() -> Any:
        return "none"

    def args_only(args: dict[str, Any]) -> Any:
        return ("args", args)

    async def modern(args: dict[str, Any], flow_manager: Any) -> Any:
        return ("modern", args, flow_manager)

    args = {"size": "large"}
    assert await invoke_function(none, args, MANAGER) == "none"
    assert await invoke_function(args_only, args, MANAGER) == ("args", args)
    assert await invoke_function(modern, args, MANAGER) == ("modern", args, MANAGER)


def test_a_time_limit_is_a_finite_number_of_seconds_and_not_a_bool() -> None:
    limits = (1, 0.5, True, 0, -1, math.inf, math.nan, "1", None)
    assert [is_seconds(v) for v in limits] == [True, True] + [False] * 7
    assert is_seconds(0, zero=True) and not is_seconds(False, zero=True)
