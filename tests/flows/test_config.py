"""Node configuration errors, without a server."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

import anyio
import pytest
from pipecat.flows.types import FlowsFunctionSchema, flows_tool_options

from flows import FlowError, InvalidFunctionError, InvalidNodeError
from flows.config import ContextStrategy, checked_node, load_flow, parse_node
from flows.functions import FunctionConfig, case_key

RESET = ContextStrategy.RESET


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


def _branch(**branch: Any) -> dict[str, Any]:
    return {"name": "pick", "handler": print, "transition_to": branch}


@pytest.mark.parametrize(
    "function",
    [
        {"name": "pick", "handler": 5},
        {"description": "no name"},
        "pick",
        {"name": "pick", "handler": print, "transition_to": ""},
        _branch(field="size", cases={}),
        _branch(field="size", cases={"small": "confirm"}, default=3),
        {"name": "pick", "handler": print, "timeout_secs": 0},
        {"name": "pick", "handler": print, "cancel_on_interruption": 2},
    ],
    ids=[
        "handler-not-callable",
        "no-name",
        "not-a-mapping",
        "transition-to-nothing",
        "branch-without-cases",
        "branch-default-not-a-node",
        "timeout-not-above-0",
        "flag-neither-0-nor-1",
    ],
)
def test_an_unusable_function_is_pipecats_invalid_function_error(function: Any) -> None:
    config = node() | {"functions": [function]}
    with pytest.raises(InvalidFunctionError, match="node 'n', key 'functions"):
        parse_node(config)
    with pytest.raises(InvalidNodeError):  # and flowbus's own name for a node's error
        parse_node(config)


class _PipecatStrategy:  # the shape of Pipecat's ContextStrategyConfig and its enum
    def __init__(self, value: str) -> None:
        self.strategy = type("Strategy", (), {"value": value})()


@pytest.mark.parametrize(
    "strategy",
    ["reset", "RESET", {"strategy": "reset"}, _PipecatStrategy("reset")],
    ids=["lower", "upper", "mapping", "pipecat-config"],
)
def test_a_context_strategy_is_read_in_pipecats_forms(strategy: Any) -> None:
    assert parse_node(node() | {"context_strategy": strategy}).context_strategy is RESET


def test_a_yaml_flow_with_lower_case_strategies_and_transition_to_loads(tmp_path: Path) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(YAML_FLOW)
    flow = load_flow(path)
    [choose] = flow.nodes["greet"].functions
    assert (choose.name, choose.handler, choose.transition_to) == ("choose_pizza", None, "pizza")
    assert flow.nodes["pizza"].context_strategy is RESET
    path.write_text(YAML_FLOW.replace("transition_to: pizza", "transition_to: sushi"))
    with pytest.raises(InvalidFunctionError, match="transition_to 'sushi' is not one of the"):
        load_flow(path)


YAML_FLOW = """\
initial_node: greet
nodes:
  greet:
    role_message: You take orders.
    task_messages:
      - role: developer
        content: Ask whether they want pizza.
    functions:
      - name: choose_pizza
        transition_to: pizza
  pizza:
    task_messages:
      - role: developer
        content: Take a pizza order.
    context_strategy: reset
"""


def test_placeholders_are_filled_as_pipecat_fills_them() -> None:
    """In the role and task messages and in ``tts_say`` text, not in other actions; a
    backslash escapes one; a key not in state is a `FlowError` naming node and key."""
    config = node({"type": "tts_say", "text": "Hello {{ caller.name }}"}) | {
        "role_message": "You serve {{caller.name}}.",
        "task_messages": [{"role": "system", "content": "Greet {{ caller.name }}, \\{{ as_is }}"}],
        "post_actions": [{"type": "end_conversation", "text": "Bye {{ caller.name }}"}],
    }
    filled = parse_node(config).with_state({"caller": {"name": "Ada"}})
    assert filled.role_message == "You serve Ada."
    assert filled.task_messages[0]["content"] == "Greet Ada, {{ as_is }}"
    assert filled.pre_actions[0]["text"] == "Hello Ada"
    assert filled.post_actions[0]["text"] == "Bye {{ caller.name }}"  # not a tts_say
    with pytest.raises(FlowError, match=r"node 'n' uses '\{\{ caller.age \}\}', which is not"):
        parse_node(node() | {"name": "n", "role_message": "{{ caller.age }}"}).with_state(
            {"caller": {"name": "Ada"}}
        )


async def check_order(flow_manager: Any, order_id: str, rush: bool = False) -> Any:
    """Look an order up.

    Args:
        order_id: The order's number,
            as the caller says it.
        rush (bool): Whether to hurry.

    Returns:
        The order, and no next node.
    """
    return {"order": order_id, "rush": rush}, None


@dataclass
class SchemaLike:  # the shape of Pipecat's FlowsFunctionSchema
    name: str
    description: str
    properties: dict[str, Any]
    required: list[str]
    handler: Any


def test_functions_may_be_direct_functions_or_function_schemas_as_in_pipecat() -> None:
    schema = SchemaLike("pick", "Pick a size.", {"size": {"type": "string"}}, ["size"], print)
    direct, picked = parse_node(node() | {"functions": [check_order, schema]}).functions
    assert direct.schema()["function"] == {
        "name": "check_order",
        "description": "Look an order up.",
        "parameters": {
            "type": "object",
            "properties": {
                "order_id": {
                    "type": "string",
                    "description": "The order's number, as the caller says it.",
                },
                "rush": {"type": "boolean", "description": "Whether to hurry."},
            },
            "required": ["order_id"],
        },
    }
    assert (picked.name, picked.required, picked.handler) == ("pick", ["size"], print)

    def not_async(flow_manager: Any) -> None:
        """Sync."""

    async def first_param(manager: Any) -> None:
        """Misnamed."""

    for bad, problem in ((not_async, "must be async"), (first_param, "named 'flow_manager'")):
        with pytest.raises(InvalidFunctionError, match=problem):
            parse_node(node() | {"functions": [bad]})


def test_two_functions_of_one_name_in_a_node_are_refused() -> None:
    """As Pipecat's flow files: the LLM would be offered two tools of that name (which its
    API refuses, or it calls the first), and the second could never run."""
    pick = {"name": "pick", "handler": print}
    with pytest.raises(
        InvalidFunctionError, match=re.escape("node 'n', key 'functions.pick': two")
    ):
        parse_node(node() | {"functions": [pick, pick | {"description": "other"}]})


async def rest_style(flow_manager: Any, order_id: str, rush: bool = False) -> Any:
    """Look an order up.

    :param order_id: The order's number,
        as the caller says it.
    :param bool rush: Whether to hurry.
    :returns: The order,
        and no next node.
    """
    return {}, None


async def numpy_style(flow_manager: Any, order_id: str, rush: bool = False) -> Any:
    """Look an order up.

    Parameters
    ----------
    order_id : str
        The order's number,
        as the caller says it.
    rush : bool
        Whether to hurry.

    Returns
    -------
    tuple
        The order, and no next node.
    """
    return {}, None


async def google_params(flow_manager: Any, order_id: str, rush: bool = False) -> Any:
    """Look an order up.

    Params:
        order_id: The order's number,
            as the caller says it.
        rush: Whether to hurry.
    """
    return {}, None


@pytest.mark.parametrize("fn", [check_order, rest_style, numpy_style, google_params])
def test_a_direct_functions_docstring_is_read_in_the_styles_pipecat_reads(fn: Any) -> None:
    """Google, reST and NumPy style, as Pipecat's docstring parser reads them: the description
    is what comes before the parameters, each parameter gets its own."""
    [parsed] = parse_node(node() | {"functions": [fn]}).functions
    assert parsed.description == "Look an order up."
    assert parsed.properties == {
        "order_id": {"type": "string", "description": "The order's number, as the caller says it."},
        "rush": {"type": "boolean", "description": "Whether to hurry."},
    }


def test_cancel_on_interruption_is_read_from_each_of_pipecats_forms() -> None:
    async def lookup(args: dict[str, Any]) -> Any:
        return None, None

    @flows_tool_options(cancel_on_interruption=True)
    async def direct(flow_manager: Any) -> tuple[Any, Any]:
        """A direct function."""
        return None, None

    schema = FlowsFunctionSchema("schema", "", {}, [], lookup, cancel_on_interruption=True)
    as_dict = {"name": "as_dict", "handler": lookup, "cancel_on_interruption": "yes"}
    plain = {"name": "plain", "handler": lookup}
    functions = parse_node(node() | {"functions": [schema, direct, as_dict, plain]}).functions
    assert [(f.name, f.cancel_on_interruption) for f in functions] == [
        ("schema", True),
        ("direct", True),
        ("as_dict", True),
        ("plain", False),
    ]
    bad = {"name": "bad", "handler": lookup, "cancel_on_interruption": "maybe"}
    with pytest.raises(InvalidNodeError, match="cancel_on_interruption': must be true or false"):
        parse_node(node() | {"functions": [bad]})


class _Street(TypedDict):
    street: str


class Address(_Street, total=False):  # (NotRequired is lost to this module's string annotations)
    floor: int


async def book(
    flow_manager: Any,
    kind: Literal["table", "room"],
    to: Address,
    seats: dict[str, int],
    note: str | None,
    nights: list[int],
) -> Any:
    """Book something.

    Parameters
    ----------
    kind : str
        What to book.

    Other Parameters
    ----------------
    note : str
        For the staff: keep it short.
    """
    return "booked"  # not (result, next_node)


def test_a_direct_functions_types_and_docstring_become_its_schema_as_in_pipecat() -> None:
    """Literals, TypedDicts (their required keys), dicts' values, optional and list types;
    NumPy's Other Parameters; a described parameter's line that holds a colon. Called, a
    direct function that returns no (result, next_node) is an error the LLM is told of."""
    [parsed] = parse_node(node() | {"functions": [book]}).functions
    assert parsed.properties == {
        "kind": {"enum": ["table", "room"], "description": "What to book."},
        "to": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "floor": {"type": "integer"}},
            "required": ["street"],
        },
        "seats": {"type": "object", "additionalProperties": {"type": "integer"}},
        "note": {
            "anyOf": [{"type": "string"}, {"type": "null"}],
            "description": "For the staff: keep it short.",
        },
        "nights": {"type": "array", "items": {"type": "integer"}},
    }
    assert parsed.handler is not None
    with pytest.raises(InvalidFunctionError, match=r"must return \(result, next_node\), not str"):
        args: dict[str, Any] = {
            "kind": "table",
            "to": {"street": "Main"},
            "seats": {},
            "note": None,
            "nights": [],
        }
        anyio.run(parsed.handler, args, None)


async def google_colons(flow_manager: Any, order_id: str) -> Any:
    """Look an order up.

    Args:
        order_id: The order's number,
            format: digits only.
    """
    return {}, None


def test_a_google_style_description_may_go_on_in_a_line_with_a_colon() -> None:
    [parsed] = parse_node(node() | {"functions": [google_colons]}).functions
    assert parsed.properties == {
        "order_id": {"type": "string", "description": "The order's number, format: digits only."}
    }


def test_a_function_schemas_timeout_and_branch_cases_are_read_as_pipecat_reads_them() -> None:
    async def lookup(args: dict[str, Any]) -> Any:
        return None, None

    schema = FlowsFunctionSchema("schema", "", {}, [], lookup, timeout_secs=2.5)
    [parsed] = parse_node(node() | {"functions": [schema]}).functions
    assert parsed.timeout == 2.5
    assert [case_key(v) for v in (True, "TRUE", "False", 1, "Yes")] == [
        "true",
        "true",
        "false",
        "1",
        "Yes",
    ]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"task": "x"}, "key 'task': unknown key; known:"),
        ({"respond_immediately": "yes"}, "key 'respond_immediately': must be true or false"),
        ({"role_message": 3}, "key 'role_message': must be a string"),
        ({"task_messages": [{"content": "Hi"}]}, "a message is a mapping with a 'role'"),
    ],
    ids=["unknown-key", "respond-not-a-flag", "role-not-text", "message-without-role"],
)
def test_a_node_that_cannot_work_is_refused_naming_the_key(
    change: dict[str, Any], says: str
) -> None:
    with pytest.raises(InvalidNodeError, match=re.escape(says)):
        parse_node(node() | change)


def test_a_nodes_own_function_wins_over_a_global_one_of_its_name() -> None:
    """As in Pipecat: the LLM is offered one tool of that name, the node's."""
    own = {"name": "pick", "handler": print, "description": "the node's"}
    shared = FunctionConfig("pick", "the global one", handler=print)
    other = FunctionConfig("help", "another global one", handler=print)
    config = checked_node(node() | {"functions": [own]}, None, [shared, other])
    assert [(f.name, f.description) for f in config.functions] == [
        ("help", "another global one"),
        ("pick", "the node's"),
    ]


def test_a_json_flow_file_that_is_not_json_says_so(tmp_path: Path) -> None:
    """Read by its suffix, as Pipecat's: a ``.json`` file is JSON, not YAML that looks so."""
    path = tmp_path / "flow.json"
    path.write_text("initial_node: a\nnodes: {a: {task_messages: []}}\n")  # YAML, not JSON
    with pytest.raises(FlowError, match="not valid JSON"):
        load_flow(path)
