"""A node's functions, as Pipecat Flows users write them: dicts (flat, or OpenAI's tool format),
direct functions described by their signature and docstring, `FlowsFunctionSchema`s, and flow
files' ``transition_to`` (a node, or a `Branch` on the result). `parse_function` validates one
into a `FunctionConfig`; every problem is an `InvalidNodeFunctionError` naming the node and
the function."""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .calling import is_seconds
from .errors import FlowError, InvalidFunctionError, InvalidNodeFunctionError

Handler = Callable[..., Any]


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
        handler = named_handler(node, f"{key}.{name}", handlers, named)
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
    direct_fn = (
        None if handler is not None else named_handler(node, f"{key}.{name}", handlers, name)
    )
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


def named_handler(
    node: str, where: str, handlers: Mapping[str, Handler], name: str
) -> Handler | None:
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
