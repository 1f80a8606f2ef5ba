"""Flow and node configuration, as Pipecat Flows users write it: dicts, or YAML/JSON files.

A node is ``{"task_messages": [...]}`` plus optional ``name``, ``role_message``,
``role_messages`` (deprecated), ``functions``, ``pre_actions``, ``post_actions``,
``context_strategy`` and ``respond_immediately``. `parse_node` validates one into a `NodeConfig`;
every problem is an `InvalidNodeError` naming the node and the key.
"""

from __future__ import annotations

import json
import re
import typing
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import msgspec

from .errors import FlowError, InvalidNodeError, InvalidNodeFunctionError
from .functions import (
    FunctionConfig,
    Handler,
    named_handler,
    parse_function,
    unique_functions,
)

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
        found = named_handler(node, key, handlers, handler)
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


def checked_node(
    node: NodeConfig | Mapping[str, Any],
    flow: FlowConfig | None,
    global_functions: Sequence[FunctionConfig] = (),
) -> NodeConfig:
    """`node` validated for a manager of `flow` (None: of no flow), with the global functions
    first; `InvalidNodeError` if it cannot be entered."""
    config = parse_node(node)
    if global_functions:  # (a function of the node's own of the same name wins)
        own = {f.name for f in config.functions}
        shared = [f for f in global_functions if f.name not in own]
        config = replace(config, functions=[*shared, *config.functions])
    for function in config.functions:  # refused now, not when the LLM calls it
        if function.handler is None and function.transition_to is None:
            where = f"functions.{function.name}"
            raise InvalidNodeFunctionError(config.name, where, "no handler and no transition_to")
        nodes = flow.nodes if flow else {}
        for target in (t for t in function.targets() if t not in nodes):
            problem = f"transition_to {target!r} is not a node of the manager's flow"
            if flow is None:
                problem = f"transition_to {target!r} needs a FlowManager given a flow"
            raise InvalidNodeFunctionError(config.name, f"functions.{function.name}", problem)
    return config
