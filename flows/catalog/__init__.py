"""The typed catalog of Pipecat's events: one payload type and one `EventSpec` per event name.

A payload's fields, after `emitter`, are the arguments Pipecat passes a handler after the
emitting object, described as JSON (`Info` for Pipecat's objects). Where several emitters
share a name they share its payload; what only some pass has a default. `CATALOG` holds
every spec by name, `lookup` finds one, `payload_types` feeds a `bus.Codec`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from . import daily, pipeline, services, transports, turns, utilities
from .base import (
    ASSISTANT_AGGREGATOR,
    AUDIO_BUFFER,
    DAILY,
    ERROR_OBSERVER,
    FASTAPI_WEBSOCKET,
    FRAME_PROCESSOR,
    FUNCTION_CALL_OBSERVER,
    GENESYS,
    HEYGEN,
    IVR_NAVIGATOR,
    KINDS,
    LEMONSLICE,
    LIVEKIT,
    LLM,
    LLM_FULL_RESPONSE_AGGREGATOR,
    MOQ,
    OPENCLAW,
    PIPELINE_TASK,
    RTVI,
    RTVI_CLIENT,
    SERVICE_METRICS_OBSERVER,
    SERVICE_SWITCHER,
    SMALL_WEBRTC,
    SPEAKING_OBSERVER,
    STARTUP_TIMING_OBSERVER,
    STT,
    TAVUS,
    TRANSCRIPT_PROCESSOR,
    TTS,
    TURN_TRACKING_OBSERVER,
    USER_AGGREGATOR,
    USER_BOT_LATENCY_OBSERVER,
    USER_TURN_PROCESSOR,
    VOICEMAIL_DETECTOR,
    VONAGE,
    WAKE_PHRASE_STRATEGY,
    WEBSOCKET_CLIENT,
    WEBSOCKET_SERVER,
    Emitter,
    Event,
    EventSpec,
    Info,
)


def build_catalog(specs: Iterable[EventSpec]) -> dict[str, EventSpec]:
    """Index `specs` by name; raise `ValueError` if two share a name."""
    catalog: dict[str, EventSpec] = {}
    for spec in specs:
        if spec.name in catalog:
            raise ValueError(
                f"two catalog specs share the event name {spec.name!r}: "
                f"{catalog[spec.name].payload.__name__} and {spec.payload.__name__}"
            )
        catalog[spec.name] = spec
    return catalog


#: Every event of the catalog, by name.
CATALOG: dict[str, EventSpec] = build_catalog(
    (
        *pipeline.SPECS,
        *turns.SPECS,
        *services.SPECS,
        *transports.SPECS,
        *daily.SPECS,
        *utilities.SPECS,
    )
)


def lookup(name: str) -> EventSpec:
    """The spec of event `name`; raise `KeyError` naming the closest known events."""
    try:
        return CATALOG[name]
    except KeyError:
        close = difflib.get_close_matches(name, CATALOG, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"no event {name!r} in the catalog{hint}") from None


def payload_types() -> list[type[Event]]:
    """The payload type of every catalog event, e.g. for ``bus.Codec(payload_types())``."""
    return [spec.payload for spec in CATALOG.values()]


__all__ = [
    "ASSISTANT_AGGREGATOR",
    "AUDIO_BUFFER",
    "CATALOG",
    "DAILY",
    "ERROR_OBSERVER",
    "FASTAPI_WEBSOCKET",
    "FRAME_PROCESSOR",
    "FUNCTION_CALL_OBSERVER",
    "GENESYS",
    "HEYGEN",
    "IVR_NAVIGATOR",
    "KINDS",
    "LEMONSLICE",
    "LIVEKIT",
    "LLM",
    "LLM_FULL_RESPONSE_AGGREGATOR",
    "MOQ",
    "OPENCLAW",
    "PIPELINE_TASK",
    "RTVI",
    "RTVI_CLIENT",
    "SERVICE_METRICS_OBSERVER",
    "SERVICE_SWITCHER",
    "SMALL_WEBRTC",
    "SPEAKING_OBSERVER",
    "STARTUP_TIMING_OBSERVER",
    "STT",
    "TAVUS",
    "TRANSCRIPT_PROCESSOR",
    "TTS",
    "TURN_TRACKING_OBSERVER",
    "USER_AGGREGATOR",
    "USER_BOT_LATENCY_OBSERVER",
    "USER_TURN_PROCESSOR",
    "VOICEMAIL_DETECTOR",
    "VONAGE",
    "WAKE_PHRASE_STRATEGY",
    "WEBSOCKET_CLIENT",
    "WEBSOCKET_SERVER",
    "Emitter",
    "Event",
    "EventSpec",
    "Info",
    "build_catalog",
    "lookup",
    "payload_types",
]
