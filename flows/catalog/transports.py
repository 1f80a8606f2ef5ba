"""Transport events shared by several transports, and those of LiveKit, the WebSocket
transports, LemonSlice, MOQ, the RTVI client and Genesys's AudioHook serializer. Daily's own
are in `daily`; on_connected and on_disconnected in `services`.

Pipecat passes each transport's own client object: a Daily, HeyGen, Tavus or LemonSlice
participant (a dict), a Vonage stream (a dict), a websocket, a SmallWebRTC connection, a
LiveKit participant id; MOQ passes none. The payloads carry them as `Info`; LiveKit's ids
become ``{"id": participant_id}``, as Pipecat itself does for LiveKit's on_client_connected.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .base import (
    DAILY,
    FASTAPI_WEBSOCKET,
    GENESYS,
    HEYGEN,
    LEMONSLICE,
    LIVEKIT,
    MOQ,
    RTVI_CLIENT,
    SMALL_WEBRTC,
    TAVUS,
    VONAGE,
    WEBSOCKET_SERVER,
    Event,
    EventSpec,
    Info,
    spec,
)

# Shared by several transports.


class OnJoined(Event, tag="on_joined"):
    """The bot joined the Daily room or the Vonage session."""

    # Daily's join result; Vonage's {"sessionId": ...}.
    data: Info = msgspec.field(default_factory=dict)


class OnLeft(Event, tag="on_left"):
    """The bot left the Daily room or the Vonage session."""

    # Vonage passes {"sessionId": ...}; Daily passes nothing.
    data: Info = msgspec.field(default_factory=dict)


class OnClientConnected(Event, tag="on_client_connected"):
    """A client (a participant, a websocket, a WebRTC peer) connected to the transport."""

    # Vonage's: {"subscriberId", "streamId", "connectionData"}, once the bot subscribed to the
    # client's stream. MOQ's: nothing (the peer announced its broadcast).

    client: Info = msgspec.field(default_factory=dict)


class OnClientDisconnected(Event, tag="on_client_disconnected"):
    """A client disconnected from the transport."""

    client: Info = msgspec.field(default_factory=dict)


class OnFirstParticipantJoined(Event, tag="on_first_participant_joined"):
    """The first participant other than the bot joined the room."""

    # Vonage's, as for on_participant_joined: the participant's first stream.
    participant: Info = msgspec.field(default_factory=dict)


class OnParticipantJoined(Event, tag="on_participant_joined"):
    """A participant joined the Daily room, or published a stream to the Vonage session."""

    # Vonage's: {"sessionId", "streamId", "connectionData"}.
    participant: Info = msgspec.field(default_factory=dict)


class OnParticipantLeft(Event, tag="on_participant_left"):
    """A participant left the room; `reason` is e.g. "leftCall", "hidden", "disconnected"."""

    participant: Info = msgspec.field(default_factory=dict)
    reason: str = ""  # Vonage passes none: its stream, as for on_participant_joined, alone


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


# LemonSlice: a Daily room with the bot, its LemonSlice avatar and the client.


class OnAvatarConnected(Event, tag="on_avatar_connected"):
    """The LemonSlice avatar joined the room."""

    participant: Info = msgspec.field(default_factory=dict)  # its Daily participant


class OnAvatarDisconnected(Event, tag="on_avatar_disconnected"):
    """The LemonSlice avatar left the room; `reason` as for on_participant_left."""

    participant: Info = msgspec.field(default_factory=dict)
    reason: str = ""


# MOQ (Media over QUIC).


class OnTrackSubscribed(Event, tag="on_track_subscribed"):
    """The MOQ transport subscribed to one of the peer's tracks."""

    # Its MOQTrack: {"broadcast_path": e.g. "pipecat/response", "name": e.g. "bot-audio",
    # "track_type": 1 (audio), 2 (video) or 3 (data)}.
    track: Info = msgspec.field(default_factory=dict)


# The RTVI client transport: a WebSocket client transport that talks to an RTVI bot.


class OnBotReady(Event, tag="on_bot_ready"):
    """The bot answered the RTVI client's client-ready with bot-ready."""


# Genesys's AudioHook serializer (in a FastAPI WebSocket transport): each passes the AudioHook
# message as it came, {"version", "type", "seq", "clientseq", "id", "parameters": {...}}.


class OnOpen(Event, tag="on_open"):
    """Genesys opened the AudioHook session: the call, its participant and input variables."""

    # Its parameters: {"conversationId", "participant": {"ani", "dnis", ...}, "media",
    # "customConfig", "inputVariables", ...}.
    message: Info = msgspec.field(default_factory=dict)


class OnClose(Event, tag="on_close"):
    """Genesys closed the AudioHook session (its parameters' "reason" says why)."""

    message: Info = msgspec.field(default_factory=dict)


class OnPause(Event, tag="on_pause"):
    """Genesys paused the audio (the call on hold, say); the bot sends resumed when ready."""

    message: Info = msgspec.field(default_factory=dict)


class OnDtmf(Event, tag="on_dtmf"):
    """The Genesys caller pressed a key (its parameters' "digit")."""

    message: Info = msgspec.field(default_factory=dict)


class OnPing(Event, tag="on_ping"):
    """Genesys pinged the AudioHook session (the serializer answers it with a pong)."""

    message: Info = msgspec.field(default_factory=dict)


#: The transports that tell of their clients' connecting and disconnecting (the reference's
#: seven, and Vonage, LemonSlice and MOQ).
CLIENT_TRANSPORTS = frozenset(
    {DAILY, LIVEKIT, WEBSOCKET_SERVER, FASTAPI_WEBSOCKET, SMALL_WEBRTC, HEYGEN, TAVUS}
    | {VONAGE, LEMONSLICE, MOQ}
)

SPECS: tuple[EventSpec, ...] = (
    # Vonage, LemonSlice and MOQ, which the reference leaves out, emit some of its events.
    spec(OnJoined, {DAILY, VONAGE}),
    spec(OnLeft, {DAILY, VONAGE}),
    # LiveKit also emits on_client_connected/disconnected, on_participant_left,
    # on_active_speaker_changed and on_app_message in 1.14; the reference omits it there.
    # Vonage registers on_client_connected, on_first_participant_joined and
    # on_participant_joined with sync=True: from it they are sync, as in Pipecat.
    spec(OnClientConnected, CLIENT_TRANSPORTS, sync_kinds={VONAGE}),
    spec(OnClientDisconnected, CLIENT_TRANSPORTS),
    spec(OnFirstParticipantJoined, {DAILY, LIVEKIT, VONAGE}, sync_kinds={VONAGE}),
    spec(OnParticipantJoined, {DAILY, VONAGE}, sync_kinds={VONAGE}),
    spec(OnParticipantLeft, {DAILY, LIVEKIT, VONAGE}),
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
    # Registered in 1.14, not in the reference: LemonSlice's, MOQ's, the RTVI client's and
    # Genesys's own events.
    spec(OnAvatarConnected, {LEMONSLICE}),
    spec(OnAvatarDisconnected, {LEMONSLICE}),
    spec(OnTrackSubscribed, {MOQ}),
    spec(OnBotReady, {RTVI_CLIENT}),
    spec(OnOpen, {GENESYS}),
    spec(OnClose, {GENESYS}),
    spec(OnPause, {GENESYS}),
    spec(OnDtmf, {GENESYS}),
    spec(OnPing, {GENESYS}),
)
