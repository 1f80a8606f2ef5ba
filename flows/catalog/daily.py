"""Daily transport events no other transport emits: leaving the call, participants,
transcription, the network connection, recording, dial-in and dial-out.

Daily hands handlers plain dicts (participants, join data, dial-in/out data), carried as
`Info` unchanged. Events Daily shares with other transports are in `transports`.
"""

from __future__ import annotations

import msgspec

from .base import AUDIO_BUFFER, DAILY, Event, EventSpec, Info, spec

# The call (on_joined and on_left, which Vonage emits too, are in `transports`).


class OnBeforeLeave(Event, tag="on_before_leave"):
    """The bot is about to leave the Daily room; sync: it waits for the handlers."""


# Participants (on_participant_joined, which Vonage emits too, is in `transports`).


class OnParticipantUpdated(Event, tag="on_participant_updated"):
    """A participant's state (name, tracks, permissions...) changed."""

    participant: Info = msgspec.field(default_factory=dict)


class OnTranscriptionMessage(Event, tag="on_transcription_message"):
    """Daily's transcription sent a message (text, participant id, timestamp...)."""

    message: Info = msgspec.field(default_factory=dict)


class OnTranscriptionStopped(Event, tag="on_transcription_stopped"):
    """Daily's transcription of the room stopped."""

    stopped_by: str  # the id of the participant who stopped it
    stopped_by_error: bool  # whether an error stopped it


class OnTranscriptionError(Event, tag="on_transcription_error"):
    """Daily's transcription of the room failed."""

    message: str


# The connection.


class OnNetworkConnectionStatusUpdated(Event, tag="on_network_connection_status_updated"):
    """A network connection the call needs was interrupted, or connected (again)."""

    # Daily's status, e.g. {"connection": "signalling" | "sendTransport" | "recvTransport",
    # "event": "connected" | "interrupted"}.
    status: Info = msgspec.field(default_factory=dict)


# Recording. AudioBufferProcessor emits on_recording_started/stopped too, with no arguments.


class OnRecordingStarted(Event, tag="on_recording_started"):
    """A recording started; Daily passes its status (recording id, stream id, type...)."""

    status: Info = msgspec.field(default_factory=dict)


class OnRecordingStopped(Event, tag="on_recording_stopped"):
    """A recording stopped; Daily passes the recording's stream id."""

    stream_id: str = ""


class OnRecordingError(Event, tag="on_recording_error"):
    """A Daily recording failed."""

    stream_id: str
    message: str


# Dial-in (a phone call into the room) and dial-out (the room calling a phone).


class OnDialinConnected(Event, tag="on_dialin_connected"):
    """A dial-in call connected to the room."""

    data: Info = msgspec.field(default_factory=dict)


class OnDialinReady(Event, tag="on_dialin_ready"):
    """The room's SIP endpoint is ready to receive a dial-in call."""

    sip_endpoint: str


class OnDialinStopped(Event, tag="on_dialin_stopped"):
    """A dial-in call ended."""

    data: Info = msgspec.field(default_factory=dict)


class OnDialinError(Event, tag="on_dialin_error"):
    """A dial-in call failed."""

    data: Info = msgspec.field(default_factory=dict)


class OnDialinWarning(Event, tag="on_dialin_warning"):
    """Daily warned about a dial-in call."""

    data: Info = msgspec.field(default_factory=dict)


class OnDialoutAnswered(Event, tag="on_dialout_answered"):
    """The callee answered a dial-out call."""

    data: Info = msgspec.field(default_factory=dict)


class OnDialoutConnected(Event, tag="on_dialout_connected"):
    """A dial-out call connected."""

    data: Info = msgspec.field(default_factory=dict)


class OnDialoutStopped(Event, tag="on_dialout_stopped"):
    """A dial-out call ended."""

    data: Info = msgspec.field(default_factory=dict)


class OnDialoutError(Event, tag="on_dialout_error"):
    """A dial-out call failed."""

    data: Info = msgspec.field(default_factory=dict)


class OnDialoutWarning(Event, tag="on_dialout_warning"):
    """Daily warned about a dial-out call."""

    data: Info = msgspec.field(default_factory=dict)


SPECS: tuple[EventSpec, ...] = (
    spec(OnBeforeLeave, {DAILY}, sync=True),
    spec(OnParticipantUpdated, {DAILY}),
    spec(OnTranscriptionMessage, {DAILY}),
    # Not in the reference but registered by Daily's transport in 1.14: these three.
    spec(OnTranscriptionStopped, {DAILY}),
    spec(OnTranscriptionError, {DAILY}),
    spec(OnNetworkConnectionStatusUpdated, {DAILY}),
    spec(OnRecordingStarted, {DAILY, AUDIO_BUFFER}),
    spec(OnRecordingStopped, {DAILY, AUDIO_BUFFER}),
    spec(OnRecordingError, {DAILY}),
    spec(OnDialinConnected, {DAILY}),
    spec(OnDialinReady, {DAILY}),
    spec(OnDialinStopped, {DAILY}),
    spec(OnDialinError, {DAILY}),
    spec(OnDialinWarning, {DAILY}),
    spec(OnDialoutAnswered, {DAILY}),
    spec(OnDialoutConnected, {DAILY}),
    spec(OnDialoutStopped, {DAILY}),
    spec(OnDialoutError, {DAILY}),
    spec(OnDialoutWarning, {DAILY}),
)
