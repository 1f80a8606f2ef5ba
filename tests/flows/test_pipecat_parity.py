"""Where flowbus follows Pipecat 1.14 closely: its flow files (direct functions named by the
handlers, ``transition_only``, branches, global functions), deprecated role messages, retries."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from bus import Bus
from flows import (
    TRANSITION_IN_YAML,
    ActionService,
    Branch,
    FlowError,
    FlowManager,
    FunctionCall,
    InvalidFunctionError,
    InvalidHandlerError,
    InvalidNodeError,
    LLMResponse,
    Retry,
    ScriptedLLM,
    SimulatedTTS,
    load_flow,
    parse_node,
)
from tests.flows.test_actions import node
from tests.support import running

pytestmark = pytest.mark.anyio

PIPECAT_YAML = """\
initial_node: greet
nodes:
  greet:
    task_messages:
      - role: developer
        content: Ask for the order number.
    functions:
      - name: check_order
global_functions:
  - name: check_order
"""


async def check_order(flow_manager: Any, order_id: str) -> Any:
    """Look an order up.

    Args:
        order_id: The order's number.
    """
    return {"found": order_id}, None


def test_a_pipecat_yaml_tool_named_by_its_direct_function_gets_that_function(
    tmp_path: Path,
) -> None:
    """In Pipecat 1.14's YAML a function entry names a direct function of the handlers; the
    tool is that function (its description, parameters and code). flowbus loads it as a
    function without handler, description or parameters, which fails at every call."""
    path = tmp_path / "flow.yaml"
    path.write_text(PIPECAT_YAML.replace("global_functions:\n  - name: check_order\n", ""))
    flow = load_flow(path, handlers={"check_order": check_order})
    [fn] = flow.nodes["greet"].functions
    assert fn.handler is not None
    assert "order_id" in fn.properties


async def test_deprecated_role_messages_are_context_messages_as_in_pipecat(bus: Bus) -> None:
    """Pipecat 1.14 puts a node's `role_messages` into the context, before its task messages
    (an explicit ``role_message: None`` does not hide them); they are not a system instruction
    that outlives a RESET. flowbus makes them the role message: kept after a reset, and
    dropped when ``role_message`` is present but None."""
    contexts: list[list[Any]] = []

    class Recorder:
        async def generate(self, messages: Sequence[Mapping[str, Any]], tools: Any) -> Any:
            contexts.append([(m["role"], m["content"]) for m in messages])
            return LLMResponse()

    def at(name: str, **more: Any) -> dict[str, Any]:
        return {"name": name, "task_messages": [{"role": "user", "content": f"task {name}"}]} | more

    async with FlowManager.open(bus, "call-1", llm=Recorder(), tts=SimulatedTTS(0)) as fm:
        role = [{"role": "system", "content": "You are Ada."}]
        await fm.initialize(at("a", role_messages=role))
        await fm.set_node_from_config(at("b", context_strategy="RESET"))
        await fm.set_node_from_config(at("c", role_message=None, role_messages=role))
    assert contexts[0] == [("system", "You are Ada."), ("user", "task a")]
    assert contexts[1] == [("user", "task b")]  # reset: the role messages are gone
    assert contexts[2] == [("user", "task b"), ("system", "You are Ada."), ("user", "task c")]


def test_a_yaml_tool_with_neither_a_handler_nor_a_transition_is_refused_at_load(
    tmp_path: Path,
) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(PIPECAT_YAML.replace("global_functions:\n  - name: check_order\n", ""))
    with pytest.raises(InvalidFunctionError, match="check_order"):
        load_flow(path, handlers={})


@pytest.mark.parametrize("attempts", [2.5, float("inf"), True])
def test_a_retry_whose_attempts_are_not_a_whole_number_is_refused(attempts: Any) -> None:
    """Accepted, ``Retry(attempts=2.5)`` makes `_run` raise TypeError (``range(1, 3.5)``)
    before the handler runs: the event is retried by the bus and dead-lettered, and the
    service's other handlers of that event never run."""
    with pytest.raises(InvalidHandlerError, match="attempts of 1 or more"):
        Retry(attempts=attempts)


@pytest.mark.parametrize("backoff", [float("inf"), float("nan"), -0.5, "0.1", None, True])
def test_a_retry_whose_backoff_is_not_a_finite_number_of_seconds_is_refused(
    backoff: Any,
) -> None:
    """An infinite backoff was taken and silently made no retry (the next run was never due
    within the event's time); a string or None failed with a bare TypeError."""
    with pytest.raises(InvalidHandlerError, match="a backoff of 0 or more seconds, a finite"):
        Retry(backoff=backoff)
    assert Retry(backoff=0).backoff == 0 and Retry(backoff=2).backoff == 2


#: Pipecat 1.14's own example of a flow file (its ``FlowConfig`` docstring), with a confirm
#: node added.
PIZZA_YAML = """\
initial_node: greet
nodes:
  greet:
    role_message: You are a friendly order-taking assistant.
    task_messages:
      - role: developer
        content: Greet the caller and ask whether they want pizza or sushi.
    functions:
      - name: choose_pizza
        transition_only: true
        description: The caller wants to order pizza.
        transition_to: pizza
  pizza:
    task_messages:
      - role: developer
        content: Take a pizza order.
    functions:
      - name: select_pizza_order
        transition_to:
          field: status
          cases:
            ok: confirm
            unavailable: pizza
            true: confirm
          default: greet
  confirm:
    task_messages:
      - role: developer
        content: Confirm the order.
global_functions:
  - name: get_delivery_estimate
"""


class Handlers:
    """The application's module of tools, as Pipecat's `Flow(config, handlers=module)` takes."""

    @staticmethod
    async def select_pizza_order(flow_manager: Any, size: str) -> Any:
        """Record the pizza order.

        Args:
            size: small, medium or large.
        """
        status = {"large": "unavailable", "huge": None}.get(size, "ok")
        return ({"status": status} if status else {}), TRANSITION_IN_YAML

    @staticmethod
    async def get_delivery_estimate(flow_manager: Any) -> Any:
        """How long the delivery takes."""
        return {"minutes": 30}, None


def test_a_pipecat_flow_file_loads_with_its_tools_from_a_module(tmp_path: Path) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(PIZZA_YAML)
    flow = load_flow(path, handlers=Handlers)
    [estimate] = flow.global_functions
    [choose] = flow.nodes["greet"].functions
    assert (estimate.name, estimate.description) == (
        "get_delivery_estimate",
        "How long the delivery takes.",
    )
    assert (choose.name, choose.description, choose.handler) == (
        "choose_pizza",
        "The caller wants to order pizza.",
        None,
    )
    assert (choose.properties, choose.transition_to) == ({}, "pizza")
    [select] = flow.nodes["pizza"].functions
    assert select.properties == {
        "size": {"type": "string", "description": "small, medium or large."}
    }
    assert select.transition_to == Branch(
        "status", {"ok": "confirm", "unavailable": "pizza", "true": "confirm"}, "greet"
    )
    assert flow.nodes["confirm"].functions == []


@pytest.mark.parametrize(
    ("size", "goes_to"),
    [("small", "confirm"), ("large", "pizza"), ("huge", "pizza")],
    ids=["case", "other-case", "no-field"],
)
async def test_a_branch_chooses_the_node_by_the_result(
    bus: Bus, tmp_path: Path, size: str, goes_to: str
) -> None:
    """A result without the branch's field is an error the LLM is told of; it stays."""
    path = tmp_path / "flow.yaml"
    path.write_text(PIZZA_YAML)
    flow = load_flow(path, handlers=Handlers)
    order = FunctionCall("select_pizza_order", {"size": size})
    script = {
        "greet": [LLMResponse(function_calls=[FunctionCall("choose_pizza")])],
        "pizza": [LLMResponse(function_calls=[order]), LLMResponse(text="Sorry.")],
    }
    llm = ScriptedLLM(script)
    async with FlowManager.open(bus, "call-1", llm=llm, tts=SimulatedTTS(0), flow=flow) as fm:
        await fm.initialize()
        assert fm.current_node == goes_to
        said = [json.loads(m["content"]) for m in fm.messages if m["role"] == "tool"]
    assert said[0] == {"status": "acknowledged"}  # choose_pizza: no code, a transition
    if size == "huge":
        assert "branches on its result's 'status'" in said[1]["error"]
    assert llm.calls[:2] == ["greet", "pizza"]


async def test_global_functions_are_offered_in_every_node(bus: Bus, tmp_path: Path) -> None:
    """Given to the manager, or by its flow's file: first, as Pipecat offers them."""
    tools: list[list[str]] = []

    class Recorder:
        async def generate(self, messages: Sequence[Mapping[str, Any]], tools_: Any) -> Any:
            tools.append([t["function"]["name"] for t in tools_])
            return LLMResponse()

    def at(name: str, **more: Any) -> dict[str, Any]:
        return {"name": name, "task_messages": [{"role": "user", "content": name}]} | more

    async def own(args: Any) -> Any:
        return {"mine": True}, None

    shared = [Handlers.get_delivery_estimate]
    async with FlowManager.open(
        bus, "call-1", llm=Recorder(), tts=SimulatedTTS(0), global_functions=shared
    ) as fm:
        await fm.initialize(at("a"))
        await fm.set_node_from_config(at("b", functions=[{"name": "own", "handler": own}]))
    assert tools == [["get_delivery_estimate"], ["get_delivery_estimate", "own"]]
    path = tmp_path / "flow.yaml"
    path.write_text(PIZZA_YAML)
    flow = load_flow(path, handlers=Handlers)
    async with FlowManager.open(
        bus, "call-2", llm=Recorder(), tts=SimulatedTTS(0), flow=flow
    ) as fm:
        await fm.initialize()
    assert tools[2] == ["get_delivery_estimate", "choose_pizza"]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (("        description: The caller wants to order pizza.\n", ""), "needs a description"),
        (
            ("      - name: choose_pizza\n", "      - name: get_delivery_estimate\n"),
            "also a global",
        ),
        (("default: greet", "default: dessert"), "transition_to 'dessert' is not one of the"),
        (("          field: status\n", ""), "transition_to names a node, or is {field"),
        (
            (
                "  - name: get_delivery_estimate",
                "  - name: get_delivery_estimate\n    description: x",
            ),
            "describes itself in its docstring",
        ),
        (("global_functions:", "globals:"), "unsupported key(s) 'globals'"),
        (("  - name: get_delivery_estimate", "  - name: nowhere"), "no handler of that name"),
        (
            ("  confirm:\n", "  confirm:\n    name: confirmation\n"),
            "node 'confirm', key 'name': a node of a flow file is named by its key",
        ),
        (
            ("transition_only: true", 'transition_only: "maybe"'),
            "choose_pizza.transition_only': must be true or false, not 'maybe'",
        ),
        (("        content: Confirm the order.\n", ""), "needs its content, as text"),
        (
            ("content: Confirm the order.\n", "content: Confirm the order.\n        name: x\n"),
            "task_messages[0]': unknown key 'name'",
        ),
        (("initial_node: greet", "initial_node: hello"), "initial_node 'hello' is not one of"),
        (
            ("role_message: You are", "role_message: !include {path: x}\n    # You are"),
            "!include takes a file's path",
        ),
    ],
    ids=[
        "no-description",
        "clash",
        "unknown-node",
        "bad-branch",
        "description",
        "key",
        "missing",
        "other-name",
        "not-a-flag",
        "no-content",
        "message-key",
        "no-initial-node",
        "include-not-a-path",
    ],
)
def test_a_flow_file_that_cannot_work_is_refused_at_load(
    tmp_path: Path, change: tuple[str, str], says: str
) -> None:
    path = tmp_path / "flow.yaml"
    assert change[0] in PIZZA_YAML
    path.write_text(PIZZA_YAML.replace(*change))
    with pytest.raises(FlowError, match=re.escape(says)):
        load_flow(path, handlers=Handlers)


@pytest.mark.parametrize("summarized", [True, False])
async def test_reset_with_summary_keeps_the_llms_summary_or_else_the_context(
    bus: Bus, summarized: bool
) -> None:
    """As Pipecat 1.14: the LLM is asked for a summary of the context (the summary prompt as
    its instruction); the new node's context is that summary and its task messages, or, if
    no summary comes, the context goes on as with APPEND."""
    contexts: list[list[Any]] = []

    class Recorder:
        async def generate(self, messages: Sequence[Mapping[str, Any]], tools: Any) -> Any:
            if messages[0]["content"] == "Summarize the call.":
                if not summarized:
                    raise ConnectionError("the LLM is down")
                return LLMResponse(text="They want a large pizza.")
            contexts.append([m["content"] for m in messages])
            return LLMResponse()

    def at(name: str, **more: Any) -> dict[str, Any]:
        return {"name": name, "task_messages": [{"role": "user", "content": name}]} | more

    strategy = {"strategy": "reset_with_summary", "summary_prompt": "Summarize the call."}
    async with FlowManager.open(bus, "call-1", llm=Recorder(), tts=SimulatedTTS(0)) as fm:
        await fm.initialize(at("a"))
        await fm.set_node_from_config(at("b", context_strategy=strategy))
    summary = "Here's a summary of the conversation:\nThey want a large pizza."
    assert contexts[1] == ([summary, "b"] if summarized else ["a", "b"])


def test_reset_with_summary_needs_a_summary_prompt() -> None:
    with pytest.raises(InvalidNodeError, match="summary_prompt is required"):
        parse_node({"task_messages": [], "context_strategy": "RESET_WITH_SUMMARY"})


PIZZA = {"select_pizza_order": Handlers.select_pizza_order}


@pytest.mark.parametrize(
    ("handlers", "says"),
    [
        (PIZZA | {"get_delivery_estimate": 30}, "in the handlers is not callable"),
        (
            [Handlers, {"get_delivery_estimate": Handlers.select_pizza_order}],
            "'get_delivery_estimate' is defined in more than one of the handlers",
        ),
    ],
    ids=["not-callable", "ambiguous"],
)
def test_a_tool_the_handlers_cannot_give_is_refused_naming_where_it_is(
    tmp_path: Path, handlers: Any, says: str
) -> None:
    """Not a TypeError from deep inside, nor a message without the function's place."""
    path = tmp_path / "flow.yaml"
    path.write_text(PIZZA_YAML)
    where = "node 'global_functions', key 'functions.get_delivery_estimate'"
    with pytest.raises(InvalidFunctionError, match=re.escape(where) + ".*" + re.escape(says)):
        load_flow(path, handlers=handlers)


ACTIONS_YAML = """\
initial_node: greet
nodes:
  greet:
    task_messages:
      - role: developer
        content: Greet the caller.
    respond_immediately: false
    pre_actions:
      - type: notify
        handler: notify_crm
        channel: calls
      - type: function
        handler: remember_call
"""


async def test_a_flow_files_action_handlers_are_named_in_the_handlers_as_in_pipecat(
    bus: Bus, tmp_path: Path
) -> None:
    """A custom action (or a ``function`` action) names its handler in the handlers given to
    `load_flow`, as in Pipecat 1.14; it runs in the bot, as an inline callable does."""
    ran: list[tuple[str, Any]] = []

    async def notify_crm(action: dict[str, Any], flow_manager: Any) -> None:
        ran.append(("notify_crm", action["channel"]))

    async def remember_call(action: dict[str, Any], flow_manager: Any) -> None:
        ran.append(("remember_call", flow_manager.session_id))

    path = tmp_path / "flow.yaml"
    path.write_text(ACTIONS_YAML)
    handlers = {"notify_crm": notify_crm, "remember_call": remember_call}
    flow = load_flow(path, handlers=handlers)
    async with running(bus, ActionService().as_service()):
        llm = ScriptedLLM({})
        async with FlowManager.open(bus, "call-1", llm=llm, tts=SimulatedTTS(0), flow=flow) as fm:
            await fm.initialize()
    assert ran == [("notify_crm", "calls"), ("remember_call", "call-1")]
    path.write_text(ACTIONS_YAML.replace("handler: notify_crm", "handler: nowhere"))
    with pytest.raises(InvalidNodeError, match=r"node 'greet', key 'pre_actions'.*'nowhere'"):
        load_flow(path, handlers=handlers)
    path.write_text(ACTIONS_YAML.replace("type: notify", "type: tts_say"))
    with pytest.raises(InvalidNodeError, match="the built-in 'tts_say' action takes no handler"):
        load_flow(path, handlers=handlers)


def test_a_flow_file_may_include_other_files_as_in_pipecat(tmp_path: Path) -> None:
    """Pipecat 1.14's ``!include PATH``, relative to the flow file's directory (an included
    file's own includes too)."""
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "greet.yaml").write_text(
        "- role: developer\n  content: !include prompts/greet.txt\n"
    )
    (tmp_path / "prompts" / "greet.txt").write_text("Greet the caller.\n")
    path = tmp_path / "flow.yaml"
    path.write_text(
        "initial_node: greet\nnodes:\n  greet:\n    task_messages: !include prompts/greet.yaml\n"
    )
    flow = load_flow(path)
    assert flow.nodes["greet"].task_messages == [
        {"role": "developer", "content": "Greet the caller."}
    ]


@pytest.mark.parametrize("name", ["flow.YAML", "flow", "flow.json"])
def test_a_flow_file_is_json_by_its_suffix_and_else_yaml_as_in_pipecat(
    tmp_path: Path, name: str
) -> None:
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text('{"nodes": {"greet": {"task_messages": []}}}')
    else:
        path.write_text("nodes:\n  greet:\n    task_messages: []\n")
    assert load_flow(path).initial_node == "greet"


async def test_global_functions_are_offered_once_each(bus: Bus, tmp_path: Path) -> None:
    """Pipecat's idiom ``FlowManager(global_functions=flow.global_functions)`` with the flow
    given too offers each once; two different functions of one name are refused, in a flow
    file or given to the manager."""
    tools: list[list[str]] = []

    class Recorder:
        async def generate(self, messages: Sequence[Mapping[str, Any]], tools_: Any) -> Any:
            tools.append([t["function"]["name"] for t in tools_])
            return LLMResponse()

    path = tmp_path / "flow.yaml"
    path.write_text(PIZZA_YAML)
    flow = load_flow(path, handlers=Handlers)
    shared = flow.global_functions
    async with FlowManager.open(
        bus, "call-1", llm=Recorder(), tts=SimulatedTTS(0), flow=flow, global_functions=shared
    ) as fm:
        await fm.initialize()
    assert tools == [["get_delivery_estimate", "choose_pizza"]]

    async def get_delivery_estimate(flow_manager: Any) -> Any:
        """Another estimate."""
        return {"minutes": 5}, None

    with pytest.raises(
        InvalidFunctionError, match=re.escape("'functions.get_delivery_estimate': two")
    ):
        async with FlowManager.open(
            bus,
            "call-2",
            llm=Recorder(),
            tts=SimulatedTTS(0),
            flow=flow,
            global_functions=[get_delivery_estimate],
        ):
            pass
    path.write_text(PIZZA_YAML + "  - name: get_delivery_estimate\n")
    with pytest.raises(
        InvalidFunctionError, match=re.escape("'functions.get_delivery_estimate': two")
    ):
        load_flow(path, handlers=Handlers)


@pytest.mark.parametrize(
    ("with_flow", "leave", "says"),
    [
        (False, {"transition_to": "dessert"}, "transition_to 'dessert' needs a FlowManager"),
        (True, {"transition_to": "dessert"}, "transition_to 'dessert' is not a node of the"),
        (True, {}, "no handler and no transition_to"),
    ],
    ids=["no-flow", "not-in-flow", "neither"],
)
async def test_a_function_that_cannot_work_is_refused_at_node_entry(
    bus: Bus, tmp_path: Path, with_flow: bool, leave: dict[str, Any], says: str
) -> None:
    """Not accepted, to fail only when the LLM calls the function."""
    path = tmp_path / "flow.yaml"
    path.write_text(PIZZA_YAML)
    flow = load_flow(path, handlers=Handlers) if with_flow else None
    entered = {
        "name": "help",
        "task_messages": [{"role": "developer", "content": "Help."}],
        "functions": [{"name": "leave", "description": "Leave."} | leave],
    }
    llm = ScriptedLLM({"help": [LLMResponse(function_calls=[FunctionCall("leave")])]})
    async with FlowManager.open(bus, "call-1", llm=llm, tts=SimulatedTTS(0), flow=flow) as fm:
        with pytest.raises(FlowError) as raised:
            await fm.initialize(entered)
    assert isinstance(raised.value.__cause__, InvalidNodeError)
    assert f"node 'help', key 'functions.leave': {says}" in str(raised.value)
    assert llm.calls == []


@pytest.mark.parametrize(
    ("returned", "says"),
    [
        ("confirm", "returned the node name 'confirm'"),
        ({"name": "confirm"}, "key 'task_messages': required"),
        (TRANSITION_IN_YAML, "returned TRANSITION_IN_YAML, but it has no transition_to"),
    ],
    ids=["name", "bad-node", "transition-in-yaml"],
)
async def test_a_handlers_next_node_that_is_no_node_is_an_error_the_llm_gets(
    bus: Bus, returned: Any, says: str
) -> None:
    """As a handler that raises (and as Pipecat 1.14 tells a flow file's tool that returns a
    node's name, or a tool of a node built in code that returns TRANSITION_IN_YAML): the LLM
    gets the error and the flow stays, instead of the turn failing; a log line says why."""

    async def confirm(args: Any, flow_manager: Any) -> Any:
        return {"ok": True}, returned

    entered = {
        "name": "order",
        "task_messages": [{"role": "developer", "content": "Take the order."}],
        "functions": [{"name": "confirm", "description": "Confirm.", "handler": confirm}],
    }
    script = [LLMResponse(function_calls=[FunctionCall("confirm")]), LLMResponse(text="Sorry.")]
    llm = ScriptedLLM({"order": script})
    async with FlowManager.open(bus, "call-1", llm=llm, tts=SimulatedTTS(0)) as fm:
        with capture_logs() as logs:
            await fm.initialize(entered)
        assert fm.current_node == "order"
    [said] = [json.loads(m["content"]) for m in fm.messages if m["role"] == "tool"]
    assert said["status"] == "error"
    assert "function 'confirm'" in said["error"] and says in said["error"]
    assert fm.messages[-1] == {"role": "assistant", "content": "Sorry."}
    [logged] = [x for x in logs if x["event"] == "function_call_failed"]
    assert (logged["function"], logged["error"]) == ("confirm", said["error"])


async def test_a_flow_files_function_without_transition_to_stays_on_transition_in_yaml(
    bus: Bus, tmp_path: Path
) -> None:
    """As in Pipecat 1.14: the file gave the function no transition, so it stays (the same
    return from a node built in code is an error: see above)."""

    class Estimate(Handlers):
        @staticmethod
        async def get_delivery_estimate(flow_manager: Any) -> Any:
            """How long the delivery takes."""
            return {"minutes": 30}, TRANSITION_IN_YAML

    path = tmp_path / "flow.yaml"
    path.write_text(PIZZA_YAML)
    flow = load_flow(path, handlers=Estimate)
    ask = LLMResponse(function_calls=[FunctionCall("get_delivery_estimate")])
    llm = ScriptedLLM({"greet": [ask, LLMResponse(text="Thirty minutes.")]})
    async with FlowManager.open(bus, "call-1", llm=llm, tts=SimulatedTTS(0), flow=flow) as fm:
        await fm.initialize()
        assert fm.current_node == "greet"
    assert [json.loads(m["content"]) for m in fm.messages if m["role"] == "tool"] == [
        {"minutes": 30}
    ]
    assert fm.messages[-1] == {"role": "assistant", "content": "Thirty minutes."}


async def test_a_function_call_and_its_result_are_in_the_context_as_pipecat_keeps_them(
    bus: Bus,
) -> None:
    """As Pipecat 1.14's assistant aggregator writes them, in OpenAI's form, so that a real
    LLM takes the context: the assistant's call (the id the LLM gave it, else one made), then
    the tool's message naming it, the result as JSON ("COMPLETED" for a falsy one)."""

    async def lookup(args: dict[str, Any]) -> Any:
        return {"eta": "5 min", "at": datetime(2026, 1, 1, 10)}  # no JSON form: its str

    async def note(args: dict[str, Any]) -> Any:
        return {}

    functions = [{"name": f.__name__, "handler": f} for f in (lookup, note)]
    calls = [FunctionCall("lookup", {"order": "A1"}, id="call_7"), FunctionCall("note")]
    llm = ScriptedLLM({"a": [LLMResponse(function_calls=calls), LLMResponse(text="Soon.")]})
    async with FlowManager.open(bus, "call-1", llm=llm, tts=SimulatedTTS(0)) as fm:
        await fm.initialize(node("a", functions=functions))
    made = fm.messages[-2]["tool_call_id"]
    assert re.fullmatch(r"call_[0-9a-f]{24}", made)
    assert [m for m in fm.messages if m["role"] != "system"] == [
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_7",
                    "function": {"name": "lookup", "arguments": '{"order": "A1"}'},
                    "type": "function",
                }
            ],
        },
        {
            "role": "tool",
            "content": '{"eta": "5 min", "at": "2026-01-01 10:00:00"}',
            "tool_call_id": "call_7",
        },
        {
            "role": "assistant",
            "tool_calls": [
                {"id": made, "function": {"name": "note", "arguments": "{}"}, "type": "function"}
            ],
        },
        {"role": "tool", "content": "COMPLETED", "tool_call_id": made},
        {"role": "assistant", "content": "Soon."},
    ]
