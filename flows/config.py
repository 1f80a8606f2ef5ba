"""Flow and node configuration, as Pipecat Flows users write it: dicts, or YAML/JSON files.

A node is ``{"task_messages": [...]}`` plus optional ``name``, ``role_message``,
``role_messages`` (deprecated), ``functions``, ``pre_actions``, ``post_actions``,
``context_strategy`` and ``respond_immediately``. `parse_node` validates one into a `NodeConfig`;
every problem is an `InvalidNodeError` naming the node and the key.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import msgspec

from .calling import is_seconds
from .errors import FlowError, InvalidFunctionError

Handler = Callable[..., Any]
NODE_KEYS = frozenset(
    {
        "name",
        "task_messages",
        "role_message",
        "role_messages",
        "functions",
        "pre_actions",
        "post_actions",
        "context_strategy",
        "respond_immediately",
    }
)
#: ``{{ key }}`` or ``{{ key.sub }}`` (identifiers and dots only, so prose braces stay as they
#: are); a backslash before it, ``\{{ key }}``, leaves the literal ``{{ key }}``. As Pipecat's.
_PLACEHOLDER = re.compile(
    r"(\\?)\{\{\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\s*\}\}"
)


class InvalidNodeError(FlowError, ValueError):
    """A node configuration that cannot be used; `node` and `key` say where."""

    def __init__(self, node: str, key: str, problem: str) -> None:
        super().__init__(f"node {node!r}, key {key!r}: {problem}")
        self.node, self.key = node, key


class ContextStrategy(Enum):
    """How entering a node changes the LLM context."""

    APPEND = "APPEND"
    RESET = "RESET"
    RESET_WITH_SUMMARY = "RESET_WITH_SUMMARY"  # deprecated upstream (needs a summary_prompt)


def summary_prompt_of(value: Any) -> str | None:
    """The ``summary_prompt`` of a context strategy in any of Pipecat's forms (None if none);
    `ValueError` if it is RESET_WITH_SUMMARY and has none, as in Pipecat."""
    prompt = value.get("summary_prompt") if isinstance(value, Mapping) else None
    prompt = getattr(value, "summary_prompt", prompt)
    if context_strategy_of(value) is ContextStrategy.RESET_WITH_SUMMARY and not prompt:
        raise ValueError("summary_prompt is required when using RESET_WITH_SUMMARY strategy")
    return str(prompt) if prompt else None


def context_strategy_of(value: Any) -> ContextStrategy:
    """A `ContextStrategy` from any of Pipecat's forms: its enum, its name or value (either
    case, as YAML writes it), or a ``ContextStrategyConfig`` (or its dict). `ValueError` else."""
    if isinstance(value, Mapping):  # {"strategy": "reset", ...} as in Pipecat Flows
        value = value.get("strategy", "APPEND")
    value = getattr(value, "strategy", value)  # Pipecat's ContextStrategyConfig
    try:  # Pipecat's enum values and YAML are lower case, this one's names upper case
        return ContextStrategy(str(getattr(value, "value", value)).upper())
    except ValueError:
        allowed = ", ".join(s.value for s in ContextStrategy)
        raise ValueError(f"one of {allowed}, not {value!r}") from None


class _TransitionInYaml:
    def __repr__(self) -> str:
        return "TRANSITION_IN_YAML"


#: What a function of a flow file returns as its next node to let the file's `transition_to`
#: decide (Pipecat 1.14's sentinel; None does the same here). A function with no
#: `transition_to` that was not read from a file returns it in error: the LLM is told so.
TRANSITION_IN_YAML: Any = _TransitionInYaml()


def case_key(value: Any) -> str:
    """The string a `Branch` matches a result's value and its cases' keys by, as Pipecat's:
    booleans, and strings spelling one in any case, are ``true`` and ``false``; anything
    else is its ``str()``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    return text.lower() if text.lower() in ("true", "false") else text


@dataclass(frozen=True, slots=True)
class Branch:
    """A flow file's transition chosen by the function's result: the node `cases` names for
    the value of its `field` (matched by `case_key`), else `default`, else none (it stays)."""

    field: str
    cases: Mapping[str, str]
    default: str | None = None

    def targets(self) -> list[str]:
        return [*self.cases.values(), *([self.default] if self.default else [])]

    def destination(self, function: str, result: Any) -> str | None:
        """The node to go to after `function` returned `result`; `FlowError` if the result
        has no `field`."""
        if not isinstance(result, Mapping) or self.field not in result:
            raise FlowError(
                f"function {function!r} branches on its result's {self.field!r}, which its "
                "result does not have"
            )
        return self.cases.get(case_key(result[self.field]), self.default)


@dataclass(frozen=True, slots=True)
class FunctionConfig:
    """A function the LLM may call in a node. Its handler is ``handler(args, flow_manager)``
    returning ``(result, next_node)``; `next_node` may be None to stay."""

    name: str
    description: str = ""
    properties: Mapping[str, Any] = field(default_factory=dict)
    required: Sequence[str] = ()
    handler: Handler | None = None
    #: The node of the flow to go to once it was called (when the handler names none), or a
    #: `Branch` on its result.
    transition_to: str | Branch | None = None
    #: Seconds its handler may take (Pipecat's ``timeout_secs``); None: the manager's.
    timeout: float | None = None
    #: `FlowManager.interrupt` (the caller spoke up) cancels its handler, as Pipecat's option.
    cancel_on_interruption: bool = False
    #: Read by `load_flow`: without a `transition_to`, a handler's ``TRANSITION_IN_YAML``
    #: stays in the node (the file gave it none); elsewhere, as in Pipecat, that is an error.
    from_file: bool = False

    def targets(self) -> list[str]:
        """Every node its `transition_to` may go to."""
        target = self.transition_to
        return [target] if isinstance(target, str) else target.targets() if target else []

    def schema(self) -> dict[str, Any]:
        """The function as an LLM tool definition (OpenAI format)."""
        parameters = {
            "type": "object",
            "properties": dict(self.properties),
            "required": list(self.required),
        }
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": parameters,
            },
        }


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """A validated node. `pre_actions` and `post_actions` keep their dict form (the wire form);
    a callable ``handler`` in one stays a callable, run in the bot."""

    name: str
    task_messages: list[dict[str, Any]]
    role_message: str | None = None
    #: Deprecated ``role_messages``: as in Pipecat, messages of the context, put before the
    #: task messages (when the node has no `role_message`), not filled from state.
    role_messages: list[dict[str, Any]] = field(default_factory=list)
    functions: list[FunctionConfig] = field(default_factory=list)
    pre_actions: list[dict[str, Any]] = field(default_factory=list)
    post_actions: list[dict[str, Any]] = field(default_factory=list)
    #: None: the `FlowManager`'s default (APPEND unless it was given another).
    context_strategy: ContextStrategy | None = None
    #: What the LLM is asked to summarize the context by, for RESET_WITH_SUMMARY.
    summary_prompt: str | None = None
    respond_immediately: bool = True

    def with_state(self, state: Mapping[str, Any]) -> NodeConfig:
        """The node with ``{{ key }}`` placeholders filled from `state`, as Pipecat Flows
        does: in its role message, its task messages and its ``tts_say`` actions' ``text``
        (dotted keys reach into nested dicts). Raises `FlowError` for a key not in `state`."""

        def filled(text: str) -> str:
            return fill(text, state, node=self.name)

        def messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [
                {**m, "content": filled(m["content"])} if isinstance(m.get("content"), str) else m
                for m in items
            ]

        def actions(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [
                {**a, "text": filled(a["text"])}
                if a.get("type") == "tts_say" and isinstance(a.get("text"), str)
                else a
                for a in items
            ]

        return replace(
            self,
            task_messages=messages(self.task_messages),
            role_message=filled(self.role_message) if self.role_message else self.role_message,
            pre_actions=actions(self.pre_actions),
            post_actions=actions(self.post_actions),
        )


def fill(text: str, state: Mapping[str, Any], *, node: str = "") -> str:
    """`text` with its placeholders filled from `state`; `FlowError` for a key not in it."""

    def value(match: re.Match[str]) -> str:
        if match[1]:  # escaped
            return match[0][1:]
        found: Any = state
        for part in match[2].split("."):
            if not isinstance(found, Mapping) or part not in found:
                raise FlowError(f"node {node!r} uses '{{{{ {match[2]} }}}}', which is not in state")
            found = found[part]
        return str(found)

    return _PLACEHOLDER.sub(value, text)


def parse_node(
    config: Mapping[str, Any] | NodeConfig,
    *,
    name: str | None = None,
    handlers: Mapping[str, Handler] | None = None,
) -> NodeConfig:
    """Validate a Pipecat-Flows node dict into a `NodeConfig`.

    `name` is used when the dict has none (else a fresh UUID, as in Pipecat Flows). String
    handlers of functions and actions (from YAML/JSON) are looked up in `handlers`; a
    ``function`` action's that is not there names a function of the actions service.
    """
    if isinstance(config, NodeConfig):
        return config
    if not isinstance(config, Mapping):
        raise InvalidNodeError(
            name or "?", "-", f"a node is a mapping, not {type(config).__name__}"
        )
    node = str(config.get("name") or name or uuid.uuid4())
    unknown = sorted(set(config) - NODE_KEYS)
    if unknown:
        raise InvalidNodeError(
            node, unknown[0], f"unknown key; known: {', '.join(sorted(NODE_KEYS))}"
        )
    if "task_messages" not in config:
        raise InvalidNodeError(node, "task_messages", "required")
    role = _role(node, config)
    deprecated = config.get("role_messages") or []
    role_messages = [] if role else _messages(node, "role_messages", deprecated)
    strategy = config.get("context_strategy")
    try:
        context_strategy = None if strategy is None else context_strategy_of(strategy)
        summary_prompt = None if strategy is None else summary_prompt_of(strategy)
    except ValueError as exc:
        raise InvalidNodeError(node, "context_strategy", str(exc)) from None
    respond = config.get("respond_immediately", True)
    if not isinstance(respond, bool):
        raise InvalidNodeError(node, "respond_immediately", "must be true or false")
    functions = [parse_function(node, f, handlers or {}) for f in _list(node, "functions", config)]
    return NodeConfig(
        name=node,
        task_messages=_messages(node, "task_messages", config["task_messages"]),
        role_message=role or None,
        role_messages=role_messages,
        functions=unique_functions(node, functions),
        pre_actions=[
            _action(node, "pre_actions", a, handlers or {})
            for a in _list(node, "pre_actions", config)
        ],
        post_actions=[
            _action(node, "post_actions", a, handlers or {})
            for a in _list(node, "post_actions", config)
        ],
        context_strategy=context_strategy,
        summary_prompt=summary_prompt,
        respond_immediately=respond,
    )


@dataclass(frozen=True, slots=True)
class FlowConfig:
    """A whole flow from a file: its nodes by name, the one to start with, and the functions
    offered in every node (which a `FlowManager` given the flow offers, as Pipecat's
    ``FlowManager(global_functions=flow.global_functions)``)."""

    initial_node: str
    nodes: dict[str, NodeConfig]
    global_functions: list[FunctionConfig] = field(default_factory=list)


def load_flow(path: str | Path, *, handlers: Any = None) -> FlowConfig:
    """Read a flow from JSON (a ``.json`` file) or YAML (any other file), as Pipecat 1.14
    writes one: ``{initial_node: NAME, nodes: {NAME: node, ...}, global_functions: [function,
    ...]}``; in YAML, ``!include PATH`` reads another file (PATH relative to the flow file's
    directory).

    A function names its *direct function* in `handlers` (a mapping of names, an object such
    as a module, or a list of those), which describes it; or it is ``transition_only`` (a
    ``description``, no parameters, no code); or, flowbus's own form, it describes itself and
    names its handler (``handler: check_order``). Its ``transition_to`` names a node, or
    chooses one by a field of its result (``{field: status, cases: {ok: confirm}, default:
    retry}``); its handler returns ``(result, TRANSITION_IN_YAML)`` (or None) to let it.
    Raises `InvalidNodeError`, or `FlowError` for a file that does not parse.
    """
    path = Path(path)
    text = path.read_text()
    form = "JSON" if path.suffix == ".json" else "YAML"  # as Pipecat's FlowConfig.from_file
    try:
        if form == "YAML":
            import yaml

            data = yaml.load(text, _including_loader(path.parent))
        else:
            data = json.loads(text)
    except Exception as exc:
        raise FlowError(f"{path}: not valid {form}: {exc}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("nodes"), Mapping):
        raise FlowError(f"{path}: expected a mapping with 'nodes' (and 'initial_node')")
    unused = sorted(set(data) - {"initial_node", "nodes", "global_functions"})
    if unused:
        raise FlowError(f"{path}: unsupported key(s) {', '.join(map(repr, unused))}")
    lookup = _Handlers(handlers)
    for n, c in data["nodes"].items():  # transitions and current_node go by the key
        if isinstance(c, Mapping) and c.get("name", n) != n:
            problem = f"a node of a flow file is named by its key, not {c['name']!r}"
            raise InvalidNodeError(str(n), "name", problem)
        if isinstance(c, Mapping) and isinstance(c.get("task_messages"), list):
            _file_messages(str(n), c["task_messages"])
    nodes = {n: parse_node(c, name=n, handlers=lookup) for n, c in data["nodes"].items()}
    nodes = {n: replace(c, functions=_from_file(c.functions)) for n, c in nodes.items()}
    initial = data.get("initial_node") or next(iter(nodes), None)
    if initial not in nodes:
        raise FlowError(f"{path}: initial_node {initial!r} is not one of the nodes")
    where = "global_functions"
    shared = unique_functions(
        where, _from_file([parse_function(where, f, lookup) for f in _list(where, where, data)])
    )
    shared_names = {f.name for f in shared}
    for node, functions in [(n.name, n.functions) for n in nodes.values()] + [(where, shared)]:
        for function in functions:
            at = f"functions.{function.name}"
            if function.handler is None and function.transition_to is None:
                problem = "no handler of that name in the handlers, and no transition_to"
                raise InvalidNodeFunctionError(node, at, problem)
            for name in function.targets():
                if name not in nodes:
                    problem = f"transition_to {name!r} is not one of the nodes"
                    raise InvalidNodeFunctionError(node, at, problem)
            if functions is not shared and function.name in shared_names:
                raise InvalidNodeFunctionError(node, at, "it is also a global function")
    return FlowConfig(str(initial), nodes, shared)


def _from_file(functions: list[FunctionConfig]) -> list[FunctionConfig]:
    return [replace(f, from_file=True) for f in functions]


def _including_loader(base: Path) -> Any:
    """A YAML safe loader that reads Pipecat's ``!include PATH`` (PATH relative to `base`,
    the flow file's directory, in included files too) as that file's YAML."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def include(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise yaml.constructor.ConstructorError(
                None, None, "!include takes a file's path", node.start_mark
            )
        return yaml.load((base / str(loader.construct_scalar(node))).read_text(), Loader)

    Loader.add_constructor("!include", include)
    return Loader


class _Handlers(Mapping[str, Handler]):
    """`load_flow`'s handlers, as Pipecat takes them: a mapping of names, an object whose
    attributes they are (a module, say), or a list of those; a name that is two different
    callables in them is a `FlowError`."""

    def __init__(self, given: Any) -> None:
        self._spaces = list(given) if isinstance(given, list | tuple) else [given or {}]

    def __getitem__(self, name: str) -> Handler:
        found: dict[int, Handler] = {}
        for space in self._spaces:
            target = space.get(name) if isinstance(space, Mapping) else getattr(space, name, None)
            if target is not None:
                found[id(target)] = target
        if len(found) > 1:
            raise FlowError(f"handler {name!r} is defined in more than one of the handlers")
        if not found:
            raise KeyError(name)
        return next(iter(found.values()))

    def __iter__(self) -> typing.Iterator[str]:
        for space in self._spaces:
            yield from (
                space
                if isinstance(space, Mapping)
                else (n for n in dir(space) if not n.startswith("_"))
            )

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _role(node: str, config: Mapping[str, Any]) -> str | None:
    role = config.get("role_message")
    if role is not None and not isinstance(role, str):
        raise InvalidNodeError(node, "role_message", "must be a string")
    return role


def _list(node: str, key: str, config: Mapping[str, Any]) -> list[Any]:
    value = config.get(key) or []
    if not isinstance(value, list):
        raise InvalidNodeError(node, key, f"must be a list, not {type(value).__name__}")
    return value


def _messages(node: str, key: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise InvalidNodeError(node, key, "must be a list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, Mapping) or "role" not in message:
            raise InvalidNodeError(node, f"{key}[{i}]", "a message is a mapping with a 'role'")
    return [dict(m) for m in value]


def _file_messages(node: str, messages: list[Any]) -> None:
    """A flow file's task messages are ``{role, content}``, both text, as Pipecat's
    ``FlowConfig.Message`` (in code, a message may be anything the LLM service takes)."""
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            continue  # _messages says what is wrong
        where = f"task_messages[{i}]"
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise InvalidNodeError(
                node, where, f"unknown key {extra[0]!r}: a message is role, content"
            )
        if not isinstance(message.get("content"), str):
            raise InvalidNodeError(
                node, where, "a message in a flow file needs its content, as text"
            )


def _action(node: str, key: str, action: Any, handlers: Mapping[str, Handler]) -> dict[str, Any]:
    if not isinstance(action, Mapping):
        raise InvalidNodeError(node, key, f"an action is a mapping, not {type(action).__name__}")
    kind = action.get("type")
    if not isinstance(kind, str) or not kind:
        raise InvalidNodeError(node, key, f"action without a 'type': {dict(action)!r}")
    handler = action.get("handler")
    if isinstance(handler, str):  # as in Pipecat's flow files: a name in the handlers
        if kind in ("tts_say", "end_conversation"):
            raise InvalidNodeError(node, key, f"the built-in {kind!r} action takes no handler")
        found = _named(node, key, handlers, handler)
        if found is not None:
            action = {**action, "handler": found}
            handler = found
        elif kind != "function":
            problem = f"action {kind!r} names handler {handler!r}, which is not in the handlers"
            raise InvalidNodeError(node, key, problem)
    named = kind == "function" and isinstance(handler, str)  # else a worker's function, by name
    if handler is not None and not named and not callable(handler):
        raise InvalidNodeError(node, key, f"the handler of action {kind!r} is not callable")
    try:  # what goes to the actions service is JSON
        msgspec.json.encode({k: v for k, v in action.items() if not callable(v)})
    except (TypeError, msgspec.EncodeError) as exc:
        problem = f"action {kind!r} has a value that is not JSON: {exc}"
        raise InvalidNodeError(node, key, problem) from None
    return dict(action)


def _transition(node: str, where: str, value: Any) -> str | Branch | None:
    """A function's ``transition_to``: a node's name, or a `Branch` (``{field, cases,
    default}``)."""
    if value is None or (isinstance(value, str) and value):
        return value
    if isinstance(value, Mapping) and set(value) <= {"field", "cases", "default"}:
        field_, cases, default = value.get("field"), value.get("cases"), value.get("default")
        if (
            isinstance(field_, str)
            and isinstance(cases, Mapping)
            and cases
            and all(isinstance(v, str) for v in cases.values())
            and (default is None or isinstance(default, str))
        ):
            return Branch(field_, {case_key(k): v for k, v in cases.items()}, default)
    problem = "transition_to names a node, or is {field, cases: {value: node}, default}"
    raise InvalidNodeFunctionError(node, where, problem)


class InvalidNodeFunctionError(InvalidNodeError, InvalidFunctionError):
    """A node's function that cannot be used: Pipecat's `InvalidFunctionError` and an
    `InvalidNodeError` both."""


def unique_functions(node: str, functions: Sequence[FunctionConfig]) -> list[FunctionConfig]:
    """`functions`, or an `InvalidNodeFunctionError` if two have one name: the LLM would be
    offered two tools of that name (as Pipecat's flow files, which allow none)."""
    names: set[str] = set()
    for function in functions:
        if function.name in names:
            problem = "two functions of that name"
            raise InvalidNodeFunctionError(node, f"functions.{function.name}", problem)
        names.add(function.name)
    return list(functions)


def parse_function(node: str, spec: Any, handlers: Mapping[str, Handler]) -> FunctionConfig:
    """Validate one of `node`'s functions in any of the forms Pipecat takes (a dict, flat or
    OpenAI's; a direct function; a `FlowsFunctionSchema`), named handlers from `handlers`."""
    key = "functions"
    if isinstance(spec, FunctionConfig):
        return spec
    if inspect.isfunction(spec) or inspect.ismethod(spec):
        return _direct_function(node, spec)
    if all(hasattr(spec, a) for a in ("name", "properties", "required", "handler")):
        spec = {  # Pipecat's FlowsFunctionSchema
            "name": spec.name,
            "description": getattr(spec, "description", ""),
            "properties": spec.properties,
            "required": spec.required,
            "handler": spec.handler,
            "timeout_secs": getattr(spec, "timeout_secs", None),
            "cancel_on_interruption": getattr(spec, "cancel_on_interruption", False),
        }
    if not isinstance(spec, Mapping):
        raise InvalidNodeFunctionError(
            node, key, f"a function is a mapping, not {type(spec).__name__}"
        )
    body: Mapping[str, Any] = spec.get("function", spec)  # OpenAI format, or flat
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidNodeFunctionError(node, key, "a function needs a 'name'")
    parameters = body.get("parameters", {})
    handler = body.get("handler", spec.get("handler"))
    if isinstance(handler, str):
        named = handler
        handler = _named(node, f"{key}.{name}", handlers, named)
        if handler is None:
            raise InvalidNodeFunctionError(node, f"{key}.{name}", f"no handler named {named!r}")
    if handler is not None and not callable(handler):
        raise InvalidNodeFunctionError(node, f"{key}.{name}", "handler is not callable")
    transition_to = _transition(
        node, f"{key}.{name}", body.get("transition_to", spec.get("transition_to"))
    )
    if _flag(node, f"{key}.{name}.transition_only", body.get("transition_only", False)):
        # Pipecat 1.14's flow files: a tool with no code
        if not isinstance(transition_to, str) or not body.get("description"):
            problem = "a transition_only function needs a description and a transition_to node"
            raise InvalidNodeFunctionError(node, f"{key}.{name}", problem)
        return FunctionConfig(name, str(body["description"]), transition_to=transition_to)
    direct_fn = None if handler is not None else _named(node, f"{key}.{name}", handlers, name)
    if direct_fn is not None:
        # Pipecat 1.14's flow files: an entry names the direct function that is the tool.
        if "description" in body:
            problem = "a direct function describes itself in its docstring: no description"
            raise InvalidNodeFunctionError(node, f"{key}.{name}", problem)
        direct = _direct_function(node, direct_fn)
        return replace(direct, name=name, transition_to=transition_to)
    timeout = body.get("timeout_secs", spec.get("timeout_secs"))
    if timeout is not None and not is_seconds(timeout):
        raise InvalidNodeFunctionError(node, f"{key}.{name}", "timeout_secs is seconds, above 0")
    cancellable = body.get("cancel_on_interruption", spec.get("cancel_on_interruption", False))
    return FunctionConfig(
        name=name,
        description=str(body.get("description", "")),
        properties=body.get("properties", parameters.get("properties", {})),
        required=list(body.get("required", parameters.get("required", []))),
        handler=handler,
        transition_to=transition_to,
        timeout=timeout,
        cancel_on_interruption=_flag(node, f"{key}.{name}.cancel_on_interruption", cancellable),
    )


#: What Pipecat's flow files (pydantic, lax) read as a yes or a no, as text.
_FLAGS = {"true": True, "yes": True, "on": True, "1": True, "t": True, "y": True}
_FLAGS |= {"false": False, "no": False, "off": False, "0": False, "f": False, "n": False}


def _flag(node: str, where: str, value: Any) -> bool:
    """A yes-or-no value as Pipecat's flow files read it: a boolean, 0 or 1, or one of
    `_FLAGS` in any case (``"false"`` is no, where its truth would be yes)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _FLAGS:
        return _FLAGS[value.strip().lower()]
    raise InvalidNodeFunctionError(node, where, f"must be true or false, not {value!r}")


def _named(node: str, where: str, handlers: Mapping[str, Handler], name: str) -> Handler | None:
    """The callable `name` in `handlers` (None if it is not there); an error naming `node` and
    `where` if it is not callable or is two different callables in them."""
    try:
        found = handlers.get(name)
    except FlowError as exc:  # `_Handlers`: in more than one of them
        raise InvalidNodeFunctionError(node, where, str(exc)) from None
    if found is not None and not callable(found):
        raise InvalidNodeFunctionError(node, where, f"{name!r} in the handlers is not callable")
    return found


#: JSON Schema of the parameter types a direct function may declare.
_JSON_TYPES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
}
_SECTION = re.compile(
    r"^\s*(Args|Arguments|Parameters|Params|Returns?|Yields?|Raises|Examples?|Notes?|"
    r"Attributes|See Also|Warnings?|Todo):\s*$",
    re.MULTILINE,
)
_ARG_LINE = re.compile(r"^\s+(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_PARAMETERS = ("Args", "Arguments", "Parameters", "Params")
#: NumPy style: a section's name underlined with dashes; a parameter is ``name : type``.
_NUMPY_SECTION = re.compile(r"^[ \t]*(\w[\w ]*?)[ \t]*\n[ \t]*-{3,}[ \t]*$", re.MULTILINE)
_NUMPY_ARG = re.compile(r"^(\*{0,2}\w+)\s*(?::.*)?$")
#: reST style: fields such as ``:param [type] name: text`` and ``:returns: text``.
_REST_FIELD = re.compile(r"^[ \t]*:\w[^:\n]*:", re.MULTILINE)
_REST_PARAM = re.compile(
    r"^[ \t]*:(?:param|parameter|arg|argument|key|keyword)\s+(?:[^:\n]*\s)?(\*{0,2}\w+)"
    r"\s*:\s*(.*)$"
)


def _direct_function(node: str, fn: Callable[..., Any]) -> FunctionConfig:
    """A Pipecat Flows *direct function*: ``async def name(flow_manager, arg: type, ...)``,
    described by its docstring (a description, then Google-style ``Args:``); called as
    ``fn(flow_manager=..., **args)``, it returns ``(result, next_node)``."""
    where = f"functions.{getattr(fn, '__name__', '?')}"
    params = list(inspect.signature(fn).parameters.values())
    if not inspect.iscoroutinefunction(fn):
        raise InvalidNodeFunctionError(node, where, "a direct function must be async")
    if not params or params[0].name != "flow_manager":
        raise InvalidNodeFunctionError(
            node, where, "a direct function's first parameter must be named 'flow_manager'"
        )
    description, documented = _docstring(inspect.getdoc(fn) or "")
    hints = typing.get_type_hints(fn)
    properties: dict[str, Any] = {}
    for p in params[1:]:
        properties[p.name] = _json_type(hints.get(p.name))
        if p.name in documented:
            properties[p.name]["description"] = documented[p.name]
    required = [p.name for p in params[1:] if p.default is inspect.Parameter.empty]

    async def call(args: Mapping[str, Any], flow_manager: Any) -> Any:
        returned = await fn(flow_manager=flow_manager, **args)
        if not isinstance(returned, tuple):
            raise InvalidFunctionError(
                f"direct function {fn.__name__!r} must return (result, next_node), "
                f"not {type(returned).__name__}"
            )
        return returned

    # From Pipecat's @flows_tool_options:
    timeout = getattr(fn, "_pipecat_timeout_secs", None)
    cancellable = bool(getattr(fn, "_pipecat_cancel_on_interruption", False))
    return FunctionConfig(
        fn.__name__,
        description,
        properties,
        required,
        call,
        timeout=timeout,
        cancel_on_interruption=cancellable,
    )


def _docstring(doc: str) -> tuple[str, dict[str, str]]:
    """A docstring's description (what comes before its first section) and its parameters'
    descriptions by name: Google style (``Args:``), or NumPy's or reST's, as Pipecat reads
    them."""
    if numpy := list(_NUMPY_SECTION.finditer(doc)):
        return _numpy_docstring(doc, numpy)
    if rest := _REST_FIELD.search(doc):
        return _rest_docstring(doc, rest.start())
    sections = list(_SECTION.finditer(doc))
    description = doc[: sections[0].start()].strip() if sections else doc.strip()
    args = next((m for m in sections if m[1] in _PARAMETERS), None)
    if args is None:
        return description, {}
    described: dict[str, str] = {}
    name, indent = "", 0
    for line in doc[args.end() :].splitlines():
        arg = _ARG_LINE.match(line)
        depth = len(line) - len(line.lstrip())
        if arg and (not name or depth <= indent):  # a deeper one continues the one before
            name, indent = arg[1], depth
            described[name] = arg[2].strip()
        elif name and line.strip() and line[:1].isspace():
            described[name] = f"{described[name]} {line.strip()}".strip()
        elif line.strip():  # the next section
            break
    return description, described


def _numpy_docstring(doc: str, sections: list[re.Match[str]]) -> tuple[str, dict[str, str]]:
    described: dict[str, str] = {}
    ends = [m.start() for m in sections[1:]] + [len(doc)]
    for section, end in zip(sections, ends, strict=True):
        if section[1] not in (*_PARAMETERS, "Other Parameters"):
            continue
        name = ""
        for line in doc[section.end() : end].splitlines():
            if line.strip() and not line[:1].isspace():  # ``name : type``
                arg = _NUMPY_ARG.match(line)
                name = arg[1] if arg else ""
                if name:
                    described[name] = ""
            elif name and line.strip():
                described[name] = f"{described[name]} {line.strip()}".strip()
    return doc[: sections[0].start()].strip(), described


def _rest_docstring(doc: str, start: int) -> tuple[str, dict[str, str]]:
    described: dict[str, str] = {}
    name = ""
    for line in doc[start:].splitlines():
        if param := _REST_PARAM.match(line):
            name = param[1]
            described[name] = param[2].strip()
        elif _REST_FIELD.match(line):  # ``:returns:``, ``:type name:``...
            name = ""
        elif name and line.strip() and line[:1].isspace():
            described[name] = f"{described[name]} {line.strip()}"
    return doc[:start].strip(), described


def _json_type(hint: Any) -> dict[str, Any]:
    """The JSON Schema of a parameter's type hint (``{}``: any)."""
    if hint is type(None):
        return {"type": "null"}
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_json_type(a) for a in args]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (list, tuple, set) and args:
        return {"type": "array", "items": _json_type(args[0])}
    if origin is dict and len(args) == 2:
        return {"type": "object", "additionalProperties": _json_type(args[1])}
    if typing.is_typeddict(hint):
        fields = typing.get_type_hints(hint)
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {k: _json_type(v) for k, v in fields.items()},
        }
        required = sorted(getattr(hint, "__required_keys__", fields))
        return schema | ({"required": required} if required else {})
    return {}
