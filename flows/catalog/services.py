"""Service events: connections (shared with transports), STT, TTS and LLM services."""

from __future__ import annotations

import msgspec

from .base import (
    DAILY,
    GENESYS,
    HEYGEN,
    LIVEKIT,
    LLM,
    MOQ,
    OPENCLAW,
    RTVI_CLIENT,
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

    # Services, LiveKit, HeyGen and MOQ pass nothing; Daily and Tavus pass the call's join
    # data; the WebSocket client transport (and the RTVI client, one of them) passes its
    # websocket, described here.
    data: Info = msgspec.field(default_factory=dict)


class OnDisconnected(Event, tag="on_disconnected"):
    """The emitter lost or closed its connection."""

    # The WebSocket client transport (and the RTVI client) passes its websocket; the others
    # pass nothing.
    data: Info = msgspec.field(default_factory=dict)


class OnConnectionError(Event, tag="on_connection_error"):
    """A service failed to connect, or its connection failed."""

    error: str
    # OpenClaw's gateway client says whether the failure will recur (the others pass no more).
    permanent: bool = False


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
    """Deepgram Flux updated the turn's interim transcript, or Genesys sent an AudioHook update."""

    # Pipecat passes Genesys's update message (a dict) where Flux passes the transcript: a
    # handler's argument is the one or the other, as in Pipecat.
    transcript: str | Info


class OnSpeakersResult(Event, tag="on_speakers_result"):
    """Speechmatics sent speaker diarization results (its SpeakersResult message)."""

    message: Info = msgspec.field(default_factory=dict)


# Turn detection of Cartesia's turns STT (Ink-2) and Gradium's STT. Cartesia passes the
# transcript so far (possibly empty) to all but on_turn_resume; Gradium passes nothing.


class OnTurnStart(Event, tag="on_turn_start"):
    """The STT provider's turn detection heard the user start a turn (Cartesia, Gradium)."""

    transcript: str = ""


class OnTurnUpdate(Event, tag="on_turn_update"):
    """Cartesia updated the transcript of the current turn."""

    transcript: str


class OnTurnEagerEnd(Event, tag="on_turn_eager_end"):
    """Cartesia predicts the turn is ending; on_turn_resume may withdraw the prediction."""

    transcript: str


class OnTurnResume(Event, tag="on_turn_resume"):
    """Cartesia: the user kept speaking after an eager end of turn."""


class OnTurnEnd(Event, tag="on_turn_end"):
    """The STT provider's turn detection ended the user's turn (Cartesia, Gradium)."""

    transcript: str = ""  # Cartesia's final transcript (empty for a silent turn); Gradium none


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


class OnFunctionCallsCancelled(Event, tag="on_function_calls_cancelled"):
    """Function calls in flight were cancelled (an interruption, a timeout, or on request)."""

    # As for on_function_calls_started: each a FunctionCallFromLLM without its context.
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


class OnConversationItemDeleted(Event, tag="on_conversation_item_deleted"):
    """Grok's realtime LLM confirmed that it deleted a conversation item."""

    item_id: str


class OnConversationItemTruncated(Event, tag="on_conversation_item_truncated"):
    """Grok's realtime LLM confirmed that it truncated a conversation item's audio."""

    item_id: str
    content_index: int | None = None
    audio_end_ms: int | None = None  # where the audio was cut, in milliseconds


class OnDtmfReceived(Event, tag="on_dtmf_received"):
    """Grok's realtime LLM received a DTMF key press on its SIP call."""

    button: str  # Pipecat's KeypadEntry, a str enum: "0"-"9", "#" or "*"


class OnMcpEvent(Event, tag="on_mcp_event"):
    """Grok's realtime LLM reported a step of an MCP tool listing or call."""

    # Pipecat passes the server event's type, e.g. "response.mcp_call.completed" (named
    # event_type here: `type` is the wire tag), then the whole event as JSON.
    event_type: str
    event: Info = msgspec.field(default_factory=dict)


class OnSessionStarted(Event, tag="on_session_started"):
    """OpenAI's live LLM service started its session: the session as the API resolved it."""

    session: Info = msgspec.field(default_factory=dict)


class OnDelegationCreated(Event, tag="on_delegation_created"):
    """OpenAI's live LLM delegated work (to the client or to a Responses run)."""

    # Its DelegationMetadata: {"id": ..., "type": "delegation", "target": "client" |
    # "responses", "response_id": ...}.
    delegation: Info = msgspec.field(default_factory=dict)


SPECS: tuple[EventSpec, ...] = (
    # Not in the reference but registered in 1.14: Daily, Tavus and HeyGen emit on_connected;
    # MOQ, the RTVI client and OpenClaw's gateway client all three; WebSocket LLM services emit
    # on_connection_error.
    spec(
        OnConnected,
        {STT, TTS, LIVEKIT, WEBSOCKET_CLIENT, DAILY, TAVUS, HEYGEN, MOQ, RTVI_CLIENT, OPENCLAW},
    ),
    spec(OnDisconnected, {STT, TTS, LIVEKIT, WEBSOCKET_CLIENT, MOQ, RTVI_CLIENT, OPENCLAW}),
    spec(OnConnectionError, {STT, TTS, LLM, OPENCLAW}),
    spec(OnSpeechStarted, {STT}),
    spec(OnSpeechStopped, {STT}),
    spec(OnUtteranceEnd, {STT}),
    spec(OnStartOfTurn, {STT}),
    spec(OnTurnResumed, {STT}),
    spec(OnEndOfTurn, {STT}),
    spec(OnEagerEndOfTurn, {STT}),
    spec(OnUpdate, {STT, GENESYS}),
    spec(OnSpeakersResult, {STT}),
    spec(OnTtsRequest, {TTS}),
    spec(OnFunctionCallsStarted, {LLM}),
    spec(OnCompletionTimeout, {LLM}),
    spec(OnConversationItemCreated, {LLM}),
    spec(OnConversationItemUpdated, {LLM}),
    # Not in the reference but registered in 1.14: Cartesia's and Gradium's turn events, every
    # LLM service's on_function_calls_cancelled, Grok's and OpenAI Live's own.
    spec(OnTurnStart, {STT}),
    spec(OnTurnUpdate, {STT}),
    spec(OnTurnEagerEnd, {STT}),
    spec(OnTurnResume, {STT}),
    spec(OnTurnEnd, {STT}),
    spec(OnFunctionCallsCancelled, {LLM}),
    spec(OnConversationItemDeleted, {LLM}),
    spec(OnConversationItemTruncated, {LLM}),
    spec(OnDtmfReceived, {LLM}),
    spec(OnMcpEvent, {LLM}),
    spec(OnSessionStarted, {LLM}),
    spec(OnDelegationCreated, {LLM}),
)
