"""What every catalog event has: the emitter it comes from, a payload, a spec."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from bus import Payload, type_name


class Emitter(msgspec.Struct, frozen=True):
    """The object that emitted an event, as the bot describes it: its `kind` (one of `KINDS`,
    or a service's own for custom events) and its `name` (e.g. ``DailyTransport#0``)."""

    kind: str
    name: str = ""


class Event(Payload):
    """Base of every catalog event payload.

    The fields after `emitter`, in declaration order, are the positional arguments a handler
    receives after the emitter, as in Pipecat: ``handler(emitter, *fields)``.
    """

    emitter: Emitter


#: JSON-able description of a Pipecat object (a participant, a client, a frame...).
Info = dict[str, Any]


@dataclass(frozen=True, slots=True)
class EventSpec:
    """One event of the catalog: its wire name, payload type, who emits it, whether it is sync."""

    name: str
    payload: type[Event]
    emitters: frozenset[str]
    sync: bool = False
    #: Emitter kinds whose event of this name is not sync although the event is (Daily's own
    #: ``on_error``, where every frame processor's is).
    async_for: frozenset[str] = frozenset()
    #: Emitter kinds whose event of this name is sync although the event is not (Vonage's
    #: ``on_client_connected``, where the other transports' is not).
    sync_kinds: frozenset[str] = frozenset()

    def sync_for(self, kind: str) -> bool:
        """Whether this event from an emitter of `kind` is sync: the bot waits for its
        handlers."""
        return kind in self.sync_kinds or (self.sync and kind not in self.async_for)

    def emitted_by(self, kind: str) -> bool:
        """Whether an emitter of `kind` may emit this event (any kind, for custom events
        declared without `emitters`)."""
        return not self.emitters or kind in self.emitters

    @property
    def args(self) -> tuple[str, ...]:
        """The handler's positional arguments after the emitter."""
        return tuple(f for f in self.payload.__struct_fields__ if f != "emitter")


def spec(
    payload: type[Event],
    emitters: Iterable[str],
    *,
    sync: bool = False,
    async_for: Iterable[str] = (),
    sync_kinds: Iterable[str] = (),
) -> EventSpec:
    """The spec of `payload`'s event, named by its wire type (the payload's tag)."""
    return EventSpec(
        type_name(payload),
        payload,
        frozenset(emitters),
        sync,
        frozenset(async_for),
        frozenset(sync_kinds),
    )


# Emitter kinds, from Pipecat's event reference.
PIPELINE_TASK = "pipeline_task"
FRAME_PROCESSOR = "frame_processor"
USER_AGGREGATOR = "user_aggregator"
ASSISTANT_AGGREGATOR = "assistant_aggregator"
STT = "stt"
TTS = "tts"
LLM = "llm"
DAILY = "transport.daily"
LIVEKIT = "transport.livekit"
WEBSOCKET_SERVER = "transport.websocket_server"
FASTAPI_WEBSOCKET = "transport.fastapi_websocket"
WEBSOCKET_CLIENT = "transport.websocket_client"
SMALL_WEBRTC = "transport.small_webrtc"
HEYGEN = "transport.heygen"
TAVUS = "transport.tavus"
SERVICE_SWITCHER = "service_switcher"
TRANSCRIPT_PROCESSOR = "transcript_processor"
AUDIO_BUFFER = "audio_buffer"
RTVI = "rtvi"
TURN_TRACKING_OBSERVER = "observer.turn_tracking"
USER_BOT_LATENCY_OBSERVER = "observer.user_bot_latency"
VOICEMAIL_DETECTOR = "extension.voicemail_detector"
IVR_NAVIGATOR = "extension.ivr_navigator"
# Emitter kinds of events that Pipecat 1.14 registers beyond its reference.
USER_TURN_PROCESSOR = "user_turn_processor"
WAKE_PHRASE_STRATEGY = "strategy.wake_phrase"
LLM_FULL_RESPONSE_AGGREGATOR = "llm_full_response_aggregator"
SERVICE_METRICS_OBSERVER = "observer.service_metrics"
SPEAKING_OBSERVER = "observer.speaking"
FUNCTION_CALL_OBSERVER = "observer.function_call"
STARTUP_TIMING_OBSERVER = "observer.startup_timing"
# ... and of emitters the reference leaves out, whose own events and some of the reference's
# Pipecat 1.14 registers.
ERROR_OBSERVER = "observer.error"
VONAGE = "transport.vonage"
LEMONSLICE = "transport.lemonslice"
MOQ = "transport.moq"
RTVI_CLIENT = "transport.rtvi_client"
GENESYS = "serializer.genesys"
OPENCLAW = "openclaw.gateway_client"

KINDS = frozenset(
    {
        PIPELINE_TASK,
        FRAME_PROCESSOR,
        USER_AGGREGATOR,
        ASSISTANT_AGGREGATOR,
        STT,
        TTS,
        LLM,
        DAILY,
        LIVEKIT,
        WEBSOCKET_SERVER,
        FASTAPI_WEBSOCKET,
        WEBSOCKET_CLIENT,
        SMALL_WEBRTC,
        HEYGEN,
        TAVUS,
        SERVICE_SWITCHER,
        TRANSCRIPT_PROCESSOR,
        AUDIO_BUFFER,
        RTVI,
        TURN_TRACKING_OBSERVER,
        USER_BOT_LATENCY_OBSERVER,
        VOICEMAIL_DETECTOR,
        IVR_NAVIGATOR,
        USER_TURN_PROCESSOR,
        WAKE_PHRASE_STRATEGY,
        LLM_FULL_RESPONSE_AGGREGATOR,
        SERVICE_METRICS_OBSERVER,
        SPEAKING_OBSERVER,
        FUNCTION_CALL_OBSERVER,
        STARTUP_TIMING_OBSERVER,
        ERROR_OBSERVER,
        VONAGE,
        LEMONSLICE,
        MOQ,
        RTVI_CLIENT,
        GENESYS,
        OPENCLAW,
    }
)

#: The kinds that are no frame processor in Pipecat, so emit none of every processor's events:
#: the pipeline task, the observers, a turn strategy, a serializer, OpenClaw's gateway client.
NOT_PROCESSORS = frozenset(
    {
        PIPELINE_TASK,
        TURN_TRACKING_OBSERVER,
        USER_BOT_LATENCY_OBSERVER,
        SERVICE_METRICS_OBSERVER,
        SPEAKING_OBSERVER,
        FUNCTION_CALL_OBSERVER,
        STARTUP_TIMING_OBSERVER,
        ERROR_OBSERVER,
        WAKE_PHRASE_STRATEGY,
        GENESYS,
        OPENCLAW,
    }
)
#: The kinds that may be a frame processor (services, aggregators, a transport's input and
#: output, extensions...).
PROCESSORS = KINDS - NOT_PROCESSORS
