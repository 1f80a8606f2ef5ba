"""Forwarding a live Pipecat object's events to the services, without a handler per event.

``forward_events(transport, events)`` adds to `transport` (any Pipecat object) one handler per
catalog event it emits; each handler emits the event through `events` (an `Events`), its
arguments made JSON-able as the catalog describes them. Pipecat itself is not imported here:
objects are recognized by their classes' names, so flowbus runs without it.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import types
import typing
import weakref
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any

import msgspec
import structlog

from .catalog import CATALOG, Emitter, EventSpec, base
from .emitting import Events
from .handlers import find_spec

log = structlog.get_logger("flowbus.bridge")

#: Pipecat 1.14's classes whose objects emit a catalog kind's events. The first class of an
#: object's MRO found here gives its kind, so a subclass listed (RTVIClientTransport) wins over
#: its base (WebsocketClientTransport), and FrameProcessor, the base of every processor, comes
#: last. PipelineWorker covers the deprecated PipelineTask; SingleClientWebsocketServerTransport
#: the WebsocketServerTransport built on it. (TranscriptProcessor is gone from Pipecat 1.14.)
PIPECAT_KINDS: dict[str, str] = {
    "PipelineWorker": base.PIPELINE_TASK,
    "DailyTransport": base.DAILY,
    "LiveKitTransport": base.LIVEKIT,
    "FastAPIWebsocketTransport": base.FASTAPI_WEBSOCKET,
    "SingleClientWebsocketServerTransport": base.WEBSOCKET_SERVER,
    "WebsocketClientTransport": base.WEBSOCKET_CLIENT,
    "RTVIClientTransport": base.RTVI_CLIENT,
    "SmallWebRTCTransport": base.SMALL_WEBRTC,
    "HeyGenTransport": base.HEYGEN,
    "TavusTransport": base.TAVUS,
    "VonageVideoConnectorTransport": base.VONAGE,
    "LemonSliceTransport": base.LEMONSLICE,
    "MOQTransport": base.MOQ,
    "GenesysAudioHookSerializer": base.GENESYS,
    "OpenClawGatewayClient": base.OPENCLAW,
    "STTService": base.STT,
    "TTSService": base.TTS,
    "LLMService": base.LLM,
    "LLMUserAggregator": base.USER_AGGREGATOR,
    "LLMAssistantAggregator": base.ASSISTANT_AGGREGATOR,
    "UserTurnProcessor": base.USER_TURN_PROCESSOR,
    "WakePhraseUserTurnStartStrategy": base.WAKE_PHRASE_STRATEGY,
    "LLMFullResponseAggregator": base.LLM_FULL_RESPONSE_AGGREGATOR,
    "TurnTrackingObserver": base.TURN_TRACKING_OBSERVER,
    "UserBotLatencyObserver": base.USER_BOT_LATENCY_OBSERVER,
    "ServiceMetricsObserver": base.SERVICE_METRICS_OBSERVER,
    "SpeakingObserver": base.SPEAKING_OBSERVER,
    "FunctionCallObserver": base.FUNCTION_CALL_OBSERVER,
    "StartupTimingObserver": base.STARTUP_TIMING_OBSERVER,
    "ErrorObserver": base.ERROR_OBSERVER,
    "AudioBufferProcessor": base.AUDIO_BUFFER,
    "RTVIProcessor": base.RTVI,
    "ServiceSwitcher": base.SERVICE_SWITCHER,
    "VoicemailDetector": base.VOICEMAIL_DETECTOR,
    "IVRNavigator": base.IVR_NAVIGATOR,
    "FrameProcessor": base.FRAME_PROCESSOR,
}

#: Every frame processor's events that fire for each frame it handles, sync in Pipecat: left
#: out unless named in `only`, else each frame would be published and wait for the services.
PER_FRAME_EVENTS = frozenset(
    {
        "on_before_process_frame",
        "on_after_process_frame",
        "on_before_push_frame",
        "on_after_push_frame",
    }
)

Handler = Callable[..., Coroutine[Any, Any, None]]

#: The events forwarded from each object so far, with their handlers: forwarded again, each
#: would be published twice.
_FORWARDED: weakref.WeakKeyDictionary[Any, dict[str, Handler]] = weakref.WeakKeyDictionary()

#: How deep `describe` follows nested objects: a frame's context holds messages holding parts.
MAX_DEPTH = 6


def forward_events(
    obj: Any,
    events: Events,
    *,
    kind: str | None = None,
    name: str | None = None,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> list[str]:
    """Forward `obj`'s catalog events through `events`; return the names forwarded, sorted.

    `obj` is a Pipecat object (a transport, a pipeline worker, a service, an observer...);
    its emitter is ``Emitter(kind, name or obj.name)``. `kind` defaults to the one of `obj`'s
    class (`PIPECAT_KINDS`); an object of no known class needs it, else `TypeError`, and a
    kind that is not in the catalog is a `ValueError`.

    Forwarded are the catalog events of that kind that `obj` registers, but `exclude`
    (default: `PER_FRAME_EVENTS`); or, with `only`, just those (per-frame ones included), each
    of which must be one of them, else `ValueError` (as for both given; a name of `exclude`
    that is no event is an `UnknownEventError`). A sync event's handler waits for the
    services' handlers, so Pipecat waits for it as for a sync handler of its own; a default
    event's handler publishes and returns. A handler that cannot emit logs why
    (``event_not_forwarded``) and returns: Pipecat goes on. An event of `obj` forwarded already
    is a `ValueError`: it would be published twice (`stop_forwarding` first, to forward it
    through other `events`).
    """
    if only is not None and exclude is not None:
        raise ValueError("forward_events takes `only` or `exclude`, not both")
    kind = kind or kind_of(obj)
    if kind not in base.KINDS:
        raise ValueError(f"{kind!r} is no emitter kind of the catalog; known: {sorted(base.KINDS)}")
    available = _forwardable(obj, kind)
    if only is not None:
        wanted = set(only)
        missing = sorted(wanted - available)
        if missing:
            raise ValueError(
                f"{type(obj).__name__} ({kind}) emits no catalog event {', '.join(missing)}; "
                f"it emits {', '.join(sorted(available))}"
            )
    else:
        left_out = PER_FRAME_EVENTS if exclude is None else {find_spec(n, {}).name for n in exclude}
        wanted = available - left_out
    try:
        forwarded = _FORWARDED.setdefault(obj, {})
    except TypeError:  # an object that takes no weak reference is not tracked
        forwarded = {}
    twice = sorted(wanted & forwarded.keys())
    if twice:
        raise ValueError(
            f"{type(obj).__name__}'s {', '.join(twice)} forwarded already: forwarded again, "
            "each would be published twice"
        )
    emitter = Emitter(kind, name or str(getattr(obj, "name", "")) or type(obj).__name__)
    for event in sorted(wanted):
        forwarded[event] = _forwarder(events, emitter, CATALOG[event])
        obj.add_event_handler(event, forwarded[event])
    return sorted(wanted)


def stop_forwarding(obj: Any, only: Iterable[str] | None = None) -> list[str]:
    """Stop forwarding the events of `obj` that `forward_events` forwards (those of `only`,
    else all); return their names, sorted. For an object that outlives its session (a service
    kept for the next call, say), whose events may then be forwarded anew. Its other handlers
    stay. A name of `only` not forwarded is a `ValueError`. An object that takes no weak
    reference is not tracked: nothing of it is stopped."""
    try:
        forwarded = _FORWARDED.get(obj, {})
    except TypeError:
        forwarded = {}
    stopping = sorted(forwarded if only is None else set(only))
    missing = [event for event in stopping if event not in forwarded]
    if missing:
        raise ValueError(
            f"{type(obj).__name__}'s {', '.join(missing)} not forwarded; forwarded: "
            f"{', '.join(sorted(forwarded)) or 'none'}"
        )
    for event in stopping:
        obj.remove_event_handler(event, forwarded.pop(event))
    return stopping


def kind_of(obj: Any) -> str:
    """The catalog kind of Pipecat object `obj`, from its class; `TypeError` if unknown."""
    for cls in type(obj).__mro__:
        if cls.__module__.startswith("pipecat.") and cls.__name__ in PIPECAT_KINDS:
            return PIPECAT_KINDS[cls.__name__]
    raise TypeError(
        f"cannot tell the emitter kind of a {type(obj).__qualname__}: it is none of Pipecat's "
        f"classes flowbus knows; pass it as forward_events(..., kind=...)"
    )


def _forwardable(obj: Any, kind: str) -> set[str]:
    """The catalog events of `kind` that `obj` registers."""
    of_kind = {n for n, s in CATALOG.items() if s.emitted_by(kind)}
    # Pipecat 1.14's BaseObject keeps the names it registered as the keys of this private
    # dict, and has no public accessor; adding a handler to a name it did not register only
    # logs a warning, so without the dict every catalog event of the kind is assumed.
    registered = getattr(obj, "_event_handlers", None)
    return of_kind & set(registered) if isinstance(registered, Mapping) else of_kind


def _forwarder(events: Events, emitter: Emitter, spec: EventSpec) -> Handler:
    async def forward(_obj: Any, *args: Any, **kwargs: Any) -> None:
        try:
            converted = convert_args(spec, args, kwargs)
            await events.emit(emitter, spec.name, *converted[0], **converted[1])
        except Exception as exc:  # Pipecat would only log it, without the session
            log.error(
                "event_not_forwarded",
                event_name=spec.name,
                kind=emitter.kind,
                emitter=emitter.name,
                session=events.bot.session,
                error=f"{type(exc).__name__}: {exc}",
            )

    forward.__qualname__ = f"forward_{spec.name}"
    return forward


def convert_args(
    spec: EventSpec, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """Pipecat's live handler arguments of event `spec` made fit for its payload, field by
    field (`convert`); those beyond its fields stay as they are, for `Events.emit` to refuse.

    A None for a field that takes no None but has a default is that default: Pipecat passes
    None where the catalog documents an empty value (the user aggregator's on_user_turn_stopped
    at the session's end, which no strategy decided, has strategy ``""``)."""
    fields = {f.name: f for f in msgspec.structs.fields(spec.payload)}

    def fit(name: str, value: Any) -> Any:
        field = fields[name]
        if value is None and not _admits_none(field.type):
            if field.default is not msgspec.NODEFAULT:
                return field.default
            if field.default_factory is not msgspec.NODEFAULT:  # an Info's empty dict
                return field.default_factory()
        return convert(field.type, value)

    fitted = [fit(f, v) for f, v in zip(spec.args, args, strict=False)]
    positional = [*fitted, *args[len(fitted) :]]
    named = {k: fit(k, v) if k in fields else v for k, v in kwargs.items()}
    return positional, named


def _admits_none(field_type: Any) -> bool:
    """Whether a payload field of `field_type` takes None (an Optional one, or `Any`)."""
    return any(m is Any or m is None or m is type(None) for m in _members(field_type))


def convert(field_type: Any, value: Any) -> Any:
    """`value` made fit for a payload field of `field_type`: a JSON-able description
    (`describe`) for an `Info` field, a list of them or an `Any` one; an Enum's value (IVR
    statuses); in a `str` field base64 for bytes (the catalog's audio and data) and the str of
    another object (a Pipecat object's is its name); anything else as it is, for the
    payload's validation to judge."""
    members = _members(field_type)
    if any(m is Any or _is_info(m) for m in members):
        return describe(value)
    if isinstance(value, enum.Enum):
        return value.value
    if str in members and not isinstance(value, str | bool | int | float | None):
        if isinstance(value, bytes | bytearray | memoryview):
            return base64.b64encode(value).decode()
        return str(value)
    return value


def _members(field_type: Any) -> tuple[Any, ...]:
    """The types a field of `field_type` takes: a union's members, else the type itself."""
    if typing.get_origin(field_type) in (typing.Union, types.UnionType):
        return typing.get_args(field_type)
    return (field_type,)


def _is_info(field_type: Any) -> bool:
    """Whether `field_type` is `Info` (a dict) or a list of them."""
    origin = typing.get_origin(field_type)
    if origin is list:
        return any(_is_info(a) for a in typing.get_args(field_type))
    return origin is dict


def describe(value: Any, depth: int = 0) -> Any:
    """A JSON-able description of `value`, whatever it is; never raises.

    JSON's own values stay; bytes become base64 (the catalog's encoding of audio); an Enum its
    value; a dict, list, tuple or set is described item by item; a dataclass (a Pipecat frame)
    by its fields; a pydantic model is its ``model_dump(mode="json")``; an exception is
    ``{"type", "message"}``; anything else ``{"type": its qualified class name}``, with its
    ``name`` and ``id`` if it has them (a Pipecat object)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode()
    if isinstance(value, enum.Enum):
        return describe(value.value, depth)
    if depth >= MAX_DEPTH:
        return _short(value)
    if isinstance(value, Mapping):
        return {str(k): describe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [describe(v, depth + 1) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: describe(v, depth + 1) for k, v in _fields_of(value).items()}
    if isinstance(value, BaseException):
        return {"type": type(value).__name__, "message": str(value)}
    dumped = _model_dump(value)
    return dumped if dumped is not None else _short(value)


def _fields_of(value: Any) -> dict[str, Any]:
    """A dataclass's fields, read from its __dict__ where it has one: Pipecat's StartFrame
    warns on each read of its deprecated fields through getattr."""
    stored = getattr(value, "__dict__", None)
    if isinstance(stored, dict):
        return {f.name: stored.get(f.name) for f in dataclasses.fields(value)}
    return {f.name: getattr(value, f.name, None) for f in dataclasses.fields(value)}


def _model_dump(value: Any) -> dict[str, Any] | None:
    """A pydantic model's JSON dump (pydantic is Pipecat's, not flowbus's: duck-typed)."""
    dump = getattr(type(value), "model_dump", None)
    if not callable(dump):
        return None
    try:
        dumped = dump(value, mode="json")
    except Exception:
        return None
    return dumped if isinstance(dumped, dict) else None


def _short(value: Any) -> dict[str, Any]:
    cls = type(value)
    short: dict[str, Any] = {"type": f"{cls.__module__}.{cls.__qualname__}"}
    for attribute in ("name", "id"):
        try:  # a property may raise (BaseObject.task_manager does)
            found = getattr(value, attribute, None)
        except Exception:
            continue
        if isinstance(found, str | int) and not isinstance(found, bool):
            short[attribute] = found
    return short
