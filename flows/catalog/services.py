"""Service events: connections (shared with transports), STT, TTS and LLM services."""

from __future__ import annotations

import msgspec

from .base import (
    DAILY,
    HEYGEN,
    LIVEKIT,
    LLM,
    STT,
    TAVUS,
    TTS,
    WEBSOCKET_CLIENT,
    Event,
    EventSpec,
    Info,
    spec,
)

# Connections: WebSocket services and transports.


class OnConnected(Event, tag="on_connected"):
    """The emitter connected: a service to its provider, a transport to its room or server."""

    # Services, LiveKit and HeyGen pass nothing; Daily and Tavus pass the call's join data;
    # the WebSocket client transport passes its websocket, described here.
    data: Info = msgspec.field(default_factory=dict)


class OnDisconnected(Event, tag="on_disconnected"):
    """The emitter lost or closed its connection."""

    # The WebSocket client transport passes its websocket; the others pass nothing.
    data: Info = msgspec.field(default_factory=dict)


class OnConnectionError(Event, tag="on_connection_error"):
    """A service failed to connect, or its connection failed."""

    error: str


# STT services.


class OnSpeechStarted(Event, tag="on_speech_started"):
    """The STT provider's own voice activity detection heard the user start speaking."""

    # Sarvam passes nothing. Deepgram's STT no longer emits it in 1.14 (older versions passed
    # the SDK's response as keyword arguments, which do not map to handler arguments).


class OnSpeechStopped(Event, tag="on_speech_stopped"):
    """The STT provider's voice activity detection heard the user stop speaking (Sarvam)."""


class OnUtteranceEnd(Event, tag="on_utterance_end"):
    """The STT provider ended an utterance (Sarvam: a transcript arrived)."""

    # As on_speech_started: Deepgram's STT no longer emits it in 1.14.


class OnStartOfTurn(Event, tag="on_start_of_turn"):
    """Deepgram Flux detected the start of a user turn."""

    transcript: str = ""  # often empty this early


class OnTurnResumed(Event, tag="on_turn_resumed"):
    """Deepgram Flux: the user kept speaking after an eager end of turn."""


class OnEndOfTurn(Event, tag="on_end_of_turn"):
    """The user's turn ended, with its final transcript (Deepgram Flux, AssemblyAI)."""

    transcript: str


class OnEagerEndOfTurn(Event, tag="on_eager_end_of_turn"):
    """Deepgram Flux predicts the turn is ending, with the predicted transcript."""

    transcript: str


class OnUpdate(Event, tag="on_update"):
    """Deepgram Flux updated the interim transcript of the current turn."""

    transcript: str


class OnSpeakersResult(Event, tag="on_speakers_result"):
    """Speechmatics sent speaker diarization results (its SpeakersResult message)."""

    message: Info = msgspec.field(default_factory=dict)


# TTS services.


class OnTtsRequest(Event, tag="on_tts_request"):
    """A TTS service is about to synthesize text for an audio context."""

    context_id: str
    text: str


# LLM services.


class OnFunctionCallsStarted(Event, tag="on_function_calls_started"):
    """The LLM asked for function calls, which are about to run."""

    # Each call is Pipecat's FunctionCallFromLLM without its LLM context:
    # {"function_name": ..., "tool_call_id": ..., "arguments": {...}}.
    function_calls: list[Info] = msgspec.field(default_factory=list)


class OnCompletionTimeout(Event, tag="on_completion_timeout"):
    """An LLM completion request timed out."""


class OnConversationItemCreated(Event, tag="on_conversation_item_created"):
    """A realtime LLM created a conversation item (a message, a function call...)."""

    item_id: str
    item: Info = msgspec.field(default_factory=dict)  # the provider's item, as JSON


class OnConversationItemUpdated(Event, tag="on_conversation_item_updated"):
    """A realtime LLM updated a conversation item; `item` is None when only its id is known."""

    item_id: str
    item: Info | None = None


SPECS: tuple[EventSpec, ...] = (
    # Not in the reference but registered in 1.14: Daily, Tavus and HeyGen emit on_connected;
    # WebSocket LLM services emit on_connection_error.
    spec(OnConnected, {STT, TTS, LIVEKIT, WEBSOCKET_CLIENT, DAILY, TAVUS, HEYGEN}),
    spec(OnDisconnected, {STT, TTS, LIVEKIT, WEBSOCKET_CLIENT}),
    spec(OnConnectionError, {STT, TTS, LLM}),
    spec(OnSpeechStarted, {STT}),
    spec(OnSpeechStopped, {STT}),
    spec(OnUtteranceEnd, {STT}),
    spec(OnStartOfTurn, {STT}),
    spec(OnTurnResumed, {STT}),
    spec(OnEndOfTurn, {STT}),
    spec(OnEagerEndOfTurn, {STT}),
    spec(OnUpdate, {STT}),
    spec(OnSpeakersResult, {STT}),
    spec(OnTtsRequest, {TTS}),
    spec(OnFunctionCallsStarted, {LLM}),
    spec(OnCompletionTimeout, {LLM}),
    spec(OnConversationItemCreated, {LLM}),
    spec(OnConversationItemUpdated, {LLM}),
)
