"""Events of Pipecat's utility processors, observers and extensions.

Audio goes over the wire as base64 of the raw 16-bit PCM bytes Pipecat passes; durations and
latencies are seconds.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from .base import (
    AUDIO_BUFFER,
    FUNCTION_CALL_OBSERVER,
    IVR_NAVIGATOR,
    LLM_FULL_RESPONSE_AGGREGATOR,
    RTVI,
    SERVICE_METRICS_OBSERVER,
    SERVICE_SWITCHER,
    SPEAKING_OBSERVER,
    STARTUP_TIMING_OBSERVER,
    TRANSCRIPT_PROCESSOR,
    TURN_TRACKING_OBSERVER,
    USER_BOT_LATENCY_OBSERVER,
    VOICEMAIL_DETECTOR,
    Event,
    EventSpec,
    Info,
    spec,
)

# ServiceSwitcher, TranscriptProcessor and LLMFullResponseAggregator.


class OnServiceSwitched(Event, tag="on_service_switched"):
    """A ServiceSwitcher made another service the active one."""

    service: str  # the service's name, e.g. "DeepgramSTTService#0"


class OnTranscriptUpdate(Event, tag="on_transcript_update"):
    """A TranscriptProcessor added messages to the conversation transcript."""

    # Pipecat passed a TranscriptionUpdateFrame; this carries its `messages`, each
    # {"role": "user" | "assistant", "content": ..., "user_id": ..., "timestamp": ...}.
    # TranscriptProcessor is gone from Pipecat 1.14; the shape is that of 0.0.x.
    messages: list[Info] = msgspec.field(default_factory=list)


class OnCompletion(Event, tag="on_completion"):
    """An LLMFullResponseAggregator collected a whole LLM response, or an interrupted one."""

    completion: str  # the response's text
    completed: bool  # False when an interruption cut the response short


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


# The observers below pass Pipecat's pydantic records; the payloads carry them as JSON (their
# model_dump(mode="json")), timestamps as Unix seconds.


class OnServiceLatency(Event, tag="on_service_latency"):
    """A ServiceMetricsObserver measured how long a service made the user wait."""

    # Its ServiceLatencyRecord: {"kind": "ttfb" | "ttfa" | "ttfat", "processor", "model",
    # "timestamp", "seconds", "ttfb_secs", "leading_silence_secs", "thinking_time_secs"}.
    record: Info = msgspec.field(default_factory=dict)


class OnServiceUsage(Event, tag="on_service_usage"):
    """A ServiceMetricsObserver recorded what a service consumed (tokens, characters, audio)."""

    # Its ServiceUsageRecord: {"kind": "stt" | "llm" | "tts", "processor", "model",
    # "timestamp", "audio_seconds", "characters", "prompt_tokens", "completion_tokens",
    # "total_tokens", ...}; only the fields of its kind of service are set, the rest null.
    record: Info = msgspec.field(default_factory=dict)


class OnSpeechEvent(Event, tag="on_speech_event"):
    """A SpeakingObserver saw someone start or stop speaking, or an interruption."""

    # Its SpeechEvent: {"kind": "user_speech_started" | "user_turn_stopped" |
    # "bot_speech_started" | "interruption" | ..., "timestamp", "started_at"}.
    event: Info = msgspec.field(default_factory=dict)


class OnFunctionCallEvent(Event, tag="on_function_call_event"):
    """A FunctionCallObserver saw a function call start, run, or settle."""

    # Its FunctionCallEvent: {"kind": "function_call_started" | "function_call_completed" |
    # ..., "function_name", "tool_call_id", "timestamp", "group_id", "blocking", "arguments",
    # "started_at", "in_progress_at", "result", "error"}.
    event: Info = msgspec.field(default_factory=dict)


class OnStartupTimingReport(Event, tag="on_startup_timing_report"):
    """A StartupTimingObserver timed the pipeline's startup, processor by processor (once)."""

    # Its StartupTimingReport: {"start_time", "total_duration_secs", "setup_phase_secs",
    # "start_phase_secs", "processor_timings": [{"processor_name", "start_offset_secs",
    # "duration_secs", ...}...], "warmup"}.
    report: Info = msgspec.field(default_factory=dict)


class OnTransportTimingReport(Event, tag="on_transport_timing_report"):
    """A StartupTimingObserver timed the bot's and the first client's connecting (once)."""

    # Its TransportTimingReport: {"start_time", "bot_connected_secs", "client_connected_secs"}.
    report: Info = msgspec.field(default_factory=dict)


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
    spec(OnCompletion, {LLM_FULL_RESPONSE_AGGREGATOR}),  # beyond the reference
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
    # Beyond the reference too: the observers an app adds for metrics, speaking, function
    # calls and startup timing.
    spec(OnServiceLatency, {SERVICE_METRICS_OBSERVER}),
    spec(OnServiceUsage, {SERVICE_METRICS_OBSERVER}),
    spec(OnSpeechEvent, {SPEAKING_OBSERVER}),
    spec(OnFunctionCallEvent, {FUNCTION_CALL_OBSERVER}),
    spec(OnStartupTimingReport, {STARTUP_TIMING_OBSERVER}),
    spec(OnTransportTimingReport, {STARTUP_TIMING_OBSERVER}),
    spec(OnConversationDetected, {VOICEMAIL_DETECTOR, IVR_NAVIGATOR}),
    spec(OnVoicemailDetected, {VOICEMAIL_DETECTOR}),
    spec(OnIvrStatusChanged, {IVR_NAVIGATOR}),
)
