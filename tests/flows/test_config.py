"""Node configuration errors, without a server."""

from __future__ import annotations

import re
from typing import Any

import pytest

from flows import InvalidFunctionError, InvalidNodeError
from flows.config import parse_node


def node(*actions: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "n",
        "task_messages": [{"role": "system", "content": "Hi"}],
        "pre_actions": list(actions),
    }


@pytest.mark.parametrize(
    ("action", "says"),
    [
        ({"type": "greet", "handler": 123}, "the handler of action 'greet' is not callable"),
        ({"type": "function", "handler": 123}, "the handler of action 'function' is not callable"),
        ({"type": "greet", "at": object()}, "action 'greet' has a value that is not JSON"),
    ],
    ids=["custom-handler", "function-handler", "not-json"],
)
def test_an_unusable_action_is_a_value_error_naming_the_node_and_key(
    action: dict[str, Any], says: str
) -> None:
    with pytest.raises(InvalidNodeError, match=f"node 'n', key 'pre_actions.*{re.escape(says)}"):
        parse_node(node(action))
    assert issubclass(InvalidNodeError, ValueError)  # what Pipecat raises for a bad handler


def test_a_handler_may_be_a_callable_or_for_a_function_action_a_workers_name() -> None:
    def greet(action: dict[str, Any]) -> None:
        pass

    parsed = parse_node(
        node({"type": "greet", "handler": greet}, {"type": "function", "handler": "lookup"})
    )
    assert [a["type"] for a in parsed.pre_actions] == ["greet", "function"]


@pytest.mark.parametrize(
    "function",
    [{"name": "pick", "handler": 5}, {"description": "no name"}, "pick"],
    ids=["handler-not-callable", "no-name", "not-a-mapping"],
)
def test_an_unusable_function_is_pipecats_invalid_function_error(function: Any) -> None:
    config = node() | {"functions": [function]}
    with pytest.raises(InvalidFunctionError, match="node 'n', key 'functions"):
        parse_node(config)
    with pytest.raises(InvalidNodeError):  # and flowbus's own name for a node's error
        parse_node(config)
