"""Transport events shared by several transports, and those of LiveKit and the WebSocket
transports. Daily's own are in `daily`; on_connected and on_disconnected in `services`.

Pipecat passes each transport's own client object: a Daily, HeyGen or Tavus participant (a
dict), a websocket, a SmallWebRTC connection, a LiveKit participant id. The payloads carry
them as `Info`; LiveKit's ids become ``{"id": participant_id}``, as Pipecat itself does for
LiveKit's on_client_connected.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .base import (
    DAILY,
    FASTAPI_WEBSOCKET,
    HEYGEN,
    LIVEKIT,
    SMALL_WEBRTC,
    TAVUS,
    WEBSOCKET_SERVER,
    Event,
    EventSpec,
    Info,
    spec,
)

# Shared by several transports.


class OnClientConnected(Event, tag="on_client_connected"):
    """A client (a participant, a websocket, a WebRTC peer) connected to the transport."""

    client: Info = msgspec.field(default_factory=dict)


class OnClientDisconnected(Event, tag="on_client_disconnected"):
    """A client disconnected from the transport."""

    client: Info = msgspec.field(default_factory=dict)


class OnFirstParticipantJoined(Event, tag="on_first_participant_joined"):
    """The first participant other than the bot joined the room."""

    participant: Info = msgspec.field(default_factory=dict)


class OnParticipantLeft(Event, tag="on_participant_left"):
    """A participant left the room; `reason` is e.g. "leftCall", "hidden", "disconnected"."""

    participant: Info = msgspec.field(default_factory=dict)
    reason: str = ""


class OnActiveSpeakerChanged(Event, tag="on_active_speaker_changed"):
    """The room's active (loudest) speaker changed."""

    participant: Info = msgspec.field(default_factory=dict)


class OnAppMessage(Event, tag="on_app_message"):
    """An application message arrived from a client (Daily, LiveKit, SmallWebRTC)."""

    message: Any  # any JSON value the client sent
    sender: str | None = None  # the sender's id; LiveKit may not know it


class OnDtmfEvent(Event, tag="on_dtmf_event"):
    """A caller pressed a key on their phone (a DTMF tone on a dial-in or SIP call)."""

    # The transport's dict, e.g. {"tone": "5", ...}: Daily's as daily-python gives it, LiveKit's
    # {"tone": ..., "digit": ..., "code": ..., "participant_id": ...}.
    data: Info = msgspec.field(default_factory=dict)


class OnCallStateUpdated(Event, tag="on_call_state_updated"):
    """The call state changed (e.g. "joining", "joined", "left")."""

    state: str


# LiveKit.


class OnParticipantConnected(Event, tag="on_participant_connected"):
    """A participant connected to the LiveKit room."""

    participant_id: str


class OnParticipantDisconnected(Event, tag="on_participant_disconnected"):
    """A participant disconnected from the LiveKit room."""

    participant_id: str


class OnAudioTrackSubscribed(Event, tag="on_audio_track_subscribed"):
    """The bot subscribed to a participant's audio track."""

    participant_id: str


class OnAudioTrackUnsubscribed(Event, tag="on_audio_track_unsubscribed"):
    """The bot unsubscribed from a participant's audio track."""

    participant_id: str


class OnVideoTrackSubscribed(Event, tag="on_video_track_subscribed"):
    """The bot subscribed to a participant's video track."""

    participant_id: str


class OnVideoTrackUnsubscribed(Event, tag="on_video_track_unsubscribed"):
    """The bot unsubscribed from a participant's video track."""

    participant_id: str


class OnDataReceived(Event, tag="on_data_received"):
    """Raw data arrived on the LiveKit data channel (JSON objects also fire on_app_message)."""

    data: str  # the bytes, base64-encoded
    participant_id: str | None = None


class OnBeforeDisconnect(Event, tag="on_before_disconnect"):
    """The bot is about to leave the LiveKit room; sync: it waits for the handlers."""


# WebSocket server and FastAPI WebSocket.


class OnSessionTimeout(Event, tag="on_session_timeout"):
    """A client's session outlived the transport's session timeout."""

    websocket: Info = msgspec.field(default_factory=dict)


class OnWebsocketReady(Event, tag="on_websocket_ready"):
    """The WebSocket server is ready to accept connections."""


SPECS: tuple[EventSpec, ...] = (
    # LiveKit also emits on_client_connected/disconnected, on_participant_left,
    # on_active_speaker_changed and on_app_message in 1.14; the reference omits it there.
    spec(
        OnClientConnected,
        {DAILY, LIVEKIT, WEBSOCKET_SERVER, FASTAPI_WEBSOCKET, SMALL_WEBRTC, HEYGEN, TAVUS},
    ),
    spec(
        OnClientDisconnected,
        {DAILY, LIVEKIT, WEBSOCKET_SERVER, FASTAPI_WEBSOCKET, SMALL_WEBRTC, HEYGEN, TAVUS},
    ),
    spec(OnFirstParticipantJoined, {DAILY, LIVEKIT}),
    spec(OnParticipantLeft, {DAILY, LIVEKIT}),
    spec(OnActiveSpeakerChanged, {DAILY, LIVEKIT}),
    spec(OnAppMessage, {DAILY, LIVEKIT, SMALL_WEBRTC}),
    spec(OnCallStateUpdated, {DAILY, LIVEKIT}),
    spec(OnDtmfEvent, {DAILY, LIVEKIT}),  # registered in 1.14, not in the reference
    spec(OnParticipantConnected, {LIVEKIT}),
    spec(OnParticipantDisconnected, {LIVEKIT}),
    spec(OnAudioTrackSubscribed, {LIVEKIT}),
    spec(OnAudioTrackUnsubscribed, {LIVEKIT}),
    spec(OnVideoTrackSubscribed, {LIVEKIT}),
    spec(OnVideoTrackUnsubscribed, {LIVEKIT}),
    spec(OnDataReceived, {LIVEKIT}),
    spec(OnBeforeDisconnect, {LIVEKIT}, sync=True),
    spec(OnSessionTimeout, {WEBSOCKET_SERVER, FASTAPI_WEBSOCKET}),
    spec(OnWebsocketReady, {WEBSOCKET_SERVER}),
)
