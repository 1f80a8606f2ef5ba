"""Events of Pipecat's utility processors, observers and extensions.

Audio goes over the wire as base64 of the raw 16-bit PCM bytes Pipecat passes; durations and
latencies are seconds.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from .base import (
    AUDIO_BUFFER,
    IVR_NAVIGATOR,
    RTVI,
    SERVICE_SWITCHER,
    TRANSCRIPT_PROCESSOR,
    TURN_TRACKING_OBSERVER,
    USER_BOT_LATENCY_OBSERVER,
    VOICEMAIL_DETECTOR,
    Event,
    EventSpec,
    Info,
    spec,
)

# ServiceSwitcher and TranscriptProcessor.


class OnServiceSwitched(Event, tag="on_service_switched"):
    """A ServiceSwitcher made another service the active one."""

    service: str  # the service's name, e.g. "DeepgramSTTService#0"


class OnTranscriptUpdate(Event, tag="on_transcript_update"):
    """A TranscriptProcessor added messages to the conversation transcript."""

    # Pipecat passed a TranscriptionUpdateFrame; this carries its `messages`, each
    # {"role": "user" | "assistant", "content": ..., "user_id": ..., "timestamp": ...}.
    # TranscriptProcessor is gone from Pipecat 1.14; the shape is that of 0.0.x.
    messages: list[Info] = msgspec.field(default_factory=list)


# AudioBufferProcessor.


class OnAudioData(Event, tag="on_audio_data"):
    """The audio buffer is full (or recording stopped): the user's and bot's audio, merged."""

    audio: str
    sample_rate: int
    num_channels: int


class OnTrackAudioData(Event, tag="on_track_audio_data"):
    """The audio buffer is full (or recording stopped): the user's and bot's tracks apart."""

    user_audio: str
    bot_audio: str
    sample_rate: int
    num_channels: int


class OnUserTurnAudioData(Event, tag="on_user_turn_audio_data"):
    """The user stopped speaking: the audio of what they said (deprecated in Pipecat 1.8)."""

    audio: str
    sample_rate: int
    num_channels: int = 1


class OnBotTurnAudioData(Event, tag="on_bot_turn_audio_data"):
    """The bot stopped speaking: the audio of what it said (deprecated in Pipecat 1.8)."""

    audio: str
    sample_rate: int
    num_channels: int = 1


class OnUserTurnAudio(Event, tag="on_user_turn_audio"):
    """A turn ended: everything the user said during it (with turn tracking on)."""

    # Pipecat passes a TurnAudioData; this carries its fields: {"turn_number": int, "audio":
    # base64 of the PCM bytes, "sample_rate": int, "num_channels": int}.
    data: Info = msgspec.field(default_factory=dict)


class OnBotTurnAudio(Event, tag="on_bot_turn_audio"):
    """A turn ended: everything the bot said during it (with turn tracking on)."""

    # As on_user_turn_audio: TurnAudioData's fields, the audio as base64.
    data: Info = msgspec.field(default_factory=dict)


# RTVIProcessor.


class OnBotStarted(Event, tag="on_bot_started"):
    """The RTVI processor started with the pipeline."""


class OnClientReady(Event, tag="on_client_ready"):
    """The RTVI client said it is ready."""


class OnClientMessage(Event, tag="on_client_message"):
    """The RTVI client sent a custom message."""

    # RTVI's ClientMessage: {"msg_id": ..., "type": ..., "data": ...}.
    message: Info = msgspec.field(default_factory=dict)


class OnUiMessage(Event, tag="on_ui_message"):
    """The RTVI client sent a UI message: an event, a snapshot, or a job group to cancel."""

    # RTVI's message as JSON: {"label": "rtvi-ai", "type": "ui-event" | "ui-snapshot" |
    # "ui-cancel-job-group", "id": ..., "data": {...}} (data: {"event", "payload"}, {"tree"},
    # or {"job_id", "reason"}).
    message: Info = msgspec.field(default_factory=dict)


# Observers.


class OnTurnStarted(Event, tag="on_turn_started"):
    """A conversation turn started (TurnTrackingObserver counts from 1)."""

    turn_number: int


class OnTurnEnded(Event, tag="on_turn_ended"):
    """A conversation turn ended after `duration` seconds, interrupted or not."""

    turn_number: int
    duration: float
    was_interrupted: bool


class OnLatencyMeasured(Event, tag="on_latency_measured"):
    """Seconds from the user's stopping to speak to the bot's starting to speak."""

    latency: float


class OnFirstBotSpeechLatency(Event, tag="on_first_bot_speech_latency"):
    """Seconds from the client's connecting to the bot's first speech (once per call)."""

    latency: float


class OnLatencyBreakdown(Event, tag="on_latency_breakdown"):
    """What the time before the bot spoke went on (with metrics enabled), turn by turn."""

    # Pipecat's LatencyBreakdown as JSON: {"ttfb": [...], "contributions": [{"key", "label",
    # "owner", "owner_kind", "start_time", "duration_secs"}...], "measured_from":
    # "user_silence" | "client_connected" | None, "total_secs", "text_aggregation",
    # "user_turn_start_time", "user_turn_secs", "function_calls": [...]}; times in seconds.
    breakdown: Info = msgspec.field(default_factory=dict)


# Extensions.


class OnConversationDetected(Event, tag="on_conversation_detected"):
    """A person, not a voicemail or an IVR system, answered the call."""

    # IVRNavigator passes the conversation so far (LLM context messages); VoicemailDetector
    # passes nothing.
    conversation_history: list[Info] = msgspec.field(default_factory=list)


class OnVoicemailDetected(Event, tag="on_voicemail_detected"):
    """The call went to voicemail and the greeting has gone quiet: leave the message now."""


class OnIvrStatusChanged(Event, tag="on_ivr_status_changed"):
    """IVRNavigator detected an IVR system, finished navigating it, or got stuck."""

    # Pipecat's IVRStatus values; 1.14 never emits "wait".
    status: Literal["detected", "completed", "stuck", "wait"]


SPECS: tuple[EventSpec, ...] = (
    spec(OnServiceSwitched, {SERVICE_SWITCHER}),
    spec(OnTranscriptUpdate, {TRANSCRIPT_PROCESSOR}),
    spec(OnAudioData, {AUDIO_BUFFER}),
    spec(OnTrackAudioData, {AUDIO_BUFFER}),
    spec(OnUserTurnAudioData, {AUDIO_BUFFER}),
    spec(OnBotTurnAudioData, {AUDIO_BUFFER}),
    # Not in the reference but registered in 1.14: the turn audio events that replace the two
    # above, on_ui_message, and the latency observer's last two.
    spec(OnUserTurnAudio, {AUDIO_BUFFER}),
    spec(OnBotTurnAudio, {AUDIO_BUFFER}),
    spec(OnBotStarted, {RTVI}),
    spec(OnClientReady, {RTVI}),
    spec(OnClientMessage, {RTVI}),
    spec(OnUiMessage, {RTVI}),
    spec(OnTurnStarted, {TURN_TRACKING_OBSERVER}),
    spec(OnTurnEnded, {TURN_TRACKING_OBSERVER}),
    spec(OnLatencyMeasured, {USER_BOT_LATENCY_OBSERVER}),
    spec(OnFirstBotSpeechLatency, {USER_BOT_LATENCY_OBSERVER}),
    spec(OnLatencyBreakdown, {USER_BOT_LATENCY_OBSERVER}),
    spec(OnConversationDetected, {VOICEMAIL_DETECTOR, IVR_NAVIGATOR}),
    spec(OnVoicemailDetected, {VOICEMAIL_DETECTOR}),
    spec(OnIvrStatusChanged, {IVR_NAVIGATOR}),
)
