from __future__ import annotations

from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest

from bus import Codec, DecodeError, encode, type_name
from flows.catalog import (
    CATALOG,
    KINDS,
    Emitter,
    Event,
    EventSpec,
    build_catalog,
    lookup,
    payload_types,
)
from flows.catalog.pipeline import OnError
from flows.catalog.services import OnUpdate

# The kinds that are no frame processor in Pipecat 1.14 (BaseObjects: the pipeline task, the
# observers, a turn start strategy, a serializer).
NOT_PROCESSORS = {
    "pipeline_task",
    "observer.turn_tracking",
    "observer.user_bot_latency",
    "observer.service_metrics",
    "observer.speaking",
    "observer.function_call",
    "observer.startup_timing",
    "observer.error",
    "strategy.wake_phrase",
    "serializer.genesys",
    "openclaw.gateway_client",
}

# Pipecat's event reference (PIPECAT.md, "The event reference"), one name per event.
REFERENCE = """
on_pipeline_started on_pipeline_finished on_pipeline_error on_frame_reached_upstream
on_frame_reached_downstream on_idle_timeout
on_error on_before_process_frame on_after_process_frame on_before_push_frame on_after_push_frame
on_user_turn_started on_user_turn_stopped on_user_turn_stop_timeout on_user_turn_idle
on_user_mute_started on_user_mute_stopped on_assistant_turn_started on_assistant_turn_stopped
on_assistant_thought
on_connected on_disconnected on_connection_error on_speech_started on_utterance_end
on_start_of_turn on_turn_resumed on_end_of_turn on_eager_end_of_turn on_update
on_speakers_result on_speech_stopped
on_tts_request
on_function_calls_started on_completion_timeout on_conversation_item_created
on_conversation_item_updated
on_joined on_left on_call_state_updated on_client_connected on_client_disconnected
on_first_participant_joined on_participant_joined on_participant_left on_participant_updated
on_active_speaker_changed on_app_message on_transcription_message on_recording_started
on_recording_stopped on_recording_error on_dialin_connected on_dialin_ready on_dialin_stopped
on_dialin_error on_dialin_warning on_dialout_answered on_dialout_connected on_dialout_stopped
on_dialout_error on_dialout_warning on_before_leave
on_participant_connected on_participant_disconnected on_audio_track_subscribed
on_audio_track_unsubscribed on_video_track_subscribed on_video_track_unsubscribed
on_data_received on_before_disconnect
on_session_timeout on_websocket_ready
on_service_switched on_transcript_update on_audio_data on_track_audio_data
on_user_turn_audio_data on_bot_turn_audio_data on_bot_started on_client_ready on_client_message
on_turn_started on_turn_ended on_latency_measured on_conversation_detected
on_voicemail_detected on_ivr_status_changed
""".split()

# Registered by Pipecat 1.14 (its source) but missing from that reference.
BEYOND_REFERENCE = """
on_pipeline_timeout on_heartbeat_timeout on_setup_timeout
on_dtmf_event on_transcription_stopped on_transcription_error
on_network_connection_status_updated
on_user_turn_audio on_bot_turn_audio on_ui_message
on_latency_breakdown on_first_bot_speech_latency
on_usable_changed
on_user_turn_inference_triggered on_user_turn_message_added on_user_backchannel
on_assistant_backchannel on_summary_applied on_wake_phrase_detected on_wake_phrase_timeout
on_turn_start on_turn_update on_turn_eager_end on_turn_resume on_turn_end
on_function_calls_cancelled on_conversation_item_deleted on_conversation_item_truncated
on_dtmf_received on_mcp_event on_session_started on_delegation_created
on_completion on_service_latency on_service_usage on_speech_event on_function_call_event
on_startup_timing_report on_transport_timing_report
on_avatar_connected on_avatar_disconnected on_track_subscribed on_bot_ready
on_open on_close on_pause on_dtmf on_ping
""".split()

# Those whose emitter waits for the handlers: Daily's and LiveKit's last moment in the room,
# and the frame processor events, which Pipecat 1.14 registers with sync=True.
SYNC = {
    "on_before_leave",
    "on_before_disconnect",
    "on_error",
    "on_before_process_frame",
    "on_after_process_frame",
    "on_before_push_frame",
    "on_after_push_frame",
}

# Where the sync-ness of an event depends on its emitter's kind, Pipecat 1.14's: the kinds it is
# sync for, of those that emit it. Vonage registers three of its events with sync=True, which
# the other transports do not; the on_error of transports, of the ErrorObserver and of
# Genesys's serializer is not sync, where a frame processor's is.
NOT_SYNC_ON_ERROR = {
    "transport.daily",
    "transport.vonage",
    "transport.moq",
    "observer.error",
    "serializer.genesys",
}
SYNC_BY_KIND = {
    "on_client_connected": {"transport.vonage"},
    "on_first_participant_joined": {"transport.vonage"},
    "on_participant_joined": {"transport.vonage"},
    "on_error": KINDS - NOT_PROCESSORS - NOT_SYNC_ON_ERROR,
}

# Emitters each shared event must list (PIPECAT.md), beyond which the source adds some.
SHARED = {
    "on_connected": {
        "stt",
        "tts",
        "transport.livekit",
        "transport.websocket_client",
        "transport.moq",
        "transport.rtvi_client",
        "openclaw.gateway_client",
    },
    "on_disconnected": {"transport.moq", "transport.rtvi_client", "openclaw.gateway_client"},
    "on_connection_error": {"stt", "tts", "llm", "openclaw.gateway_client"},
    "on_client_connected": {
        "transport.daily",
        "transport.websocket_server",
        "transport.fastapi_websocket",
        "transport.small_webrtc",
        "transport.heygen",
        "transport.tavus",
        "transport.vonage",
        "transport.lemonslice",
        "transport.moq",
    },
    "on_client_disconnected": {"transport.vonage", "transport.lemonslice", "transport.moq"},
    "on_joined": {"transport.daily", "transport.vonage"},
    "on_left": {"transport.daily", "transport.vonage"},
    "on_participant_joined": {"transport.daily", "transport.vonage"},
    "on_participant_left": {"transport.daily", "transport.livekit", "transport.vonage"},
    "on_error": KINDS - NOT_PROCESSORS | {"observer.error", "serializer.genesys"},
    "on_speech_started": {"stt"},
    "on_conversation_detected": {"extension.voicemail_detector", "extension.ivr_navigator"},
    "on_app_message": {"transport.daily", "transport.small_webrtc"},
    "on_first_participant_joined": {"transport.daily", "transport.livekit", "transport.vonage"},
    "on_call_state_updated": {"transport.daily", "transport.livekit"},
    "on_session_timeout": {"transport.websocket_server", "transport.fastapi_websocket"},
    "on_dtmf_event": {"transport.daily", "transport.livekit"},
    "on_user_turn_started": {"user_aggregator", "user_turn_processor"},
    "on_user_turn_stopped": {"user_aggregator", "user_turn_processor"},
    "on_user_turn_inference_triggered": {"user_aggregator", "user_turn_processor"},
    "on_turn_start": {"stt"},
    "on_usable_changed": KINDS - NOT_PROCESSORS,
}

CODEC = Codec(payload_types())


def sample(t: mi.Type, default: Any = msgspec.NODEFAULT) -> Any:
    """A representative value of type `t`, different from `default`."""
    match t:
        case mi.StrType():
            return "sample"
        case mi.BoolType():
            return default is not True
        case mi.IntType():
            return 16000
        case mi.FloatType():
            return 0.75
        case mi.LiteralType():
            return next(v for v in t.values if v != default)
        case mi.DictType():
            return {"id": "p-1", "nested": {"n": [1, 2.5, None, True]}}
        case mi.ListType():
            return [sample(t.item_type), sample(t.item_type)]
        case mi.AnyType():
            return {"hello": ["world", 1]}
        case mi.UnionType():
            return sample(next(u for u in t.types if not isinstance(u, mi.NoneType)))
        case mi.StructType() if t.cls is Emitter:
            return Emitter("stt", "DeepgramSTTService#0")
    raise AssertionError(f"no sample for {t!r}: a catalog field needs a JSON-able type")


def fields(payload: type[Event]) -> list[mi.Field]:
    info = mi.type_info(payload)
    assert isinstance(info, mi.StructType)
    return list(info.fields)


def full(spec: EventSpec) -> Event:
    """The spec's payload with every field set to a non-default value."""
    values = {}
    for f in fields(spec.payload):
        has_factory = f.default_factory is not msgspec.NODEFAULT
        default = f.default_factory() if has_factory else f.default
        value = sample(f.type, default)
        assert value != default, f"{spec.name}.{f.name}: the sample equals the default"
        values[f.name] = value
    return spec.payload(**values)


def test_every_reference_event_is_in_the_catalog_and_nothing_else() -> None:
    assert len(REFERENCE) == len(set(REFERENCE)) == 88
    assert len(BEYOND_REFERENCE) == len(set(BEYOND_REFERENCE)) == 48
    assert not set(REFERENCE) & set(BEYOND_REFERENCE)
    assert sorted(CATALOG) == sorted(REFERENCE + BEYOND_REFERENCE)
    assert len(payload_types()) == len(set(payload_types())) == len(CATALOG)


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_each_payload_round_trips_with_every_field_set(name: str) -> None:
    spec = CATALOG[name]
    event = full(spec)
    data = encode(event)
    assert msgspec.json.decode(data)["type"] == name
    decoded = CODEC.decode(name, data)
    assert type(decoded) is spec.payload
    assert decoded == event


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_each_spec_names_its_payload_and_documents_it(name: str) -> None:
    spec = CATALOG[name]
    assert spec.name == name == type_name(spec.payload)
    assert issubclass(spec.payload, Event)
    assert fields(spec.payload)[0].name == "emitter"
    doc = spec.payload.__doc__ or ""
    assert doc.strip() and "\n" not in doc.strip(), f"{name}: needs a one-line docstring"
    assert spec.emitters, f"{name}: no emitter"


def test_events_whose_data_is_optional_can_be_emitted_with_only_the_emitter() -> None:
    emitter = Emitter("transport.daily")
    for name in [
        "on_client_connected",
        "on_user_turn_stopped",
        "on_pipeline_started",
        "on_left",
        "on_turn_start",  # Gradium passes no transcript
        "on_turn_end",
    ]:
        payload = CATALOG[name].payload(emitter=emitter)
        assert CODEC.decode(name, encode(payload)) == payload


def test_handler_arguments_follow_pipecats_order() -> None:
    assert lookup("on_participant_left").args == ("participant", "reason")
    assert lookup("on_app_message").args == ("message", "sender")
    assert lookup("on_audio_data").args == ("audio", "sample_rate", "num_channels")
    assert lookup("on_track_audio_data").args == (
        "user_audio",
        "bot_audio",
        "sample_rate",
        "num_channels",
    )
    assert lookup("on_turn_ended").args == ("turn_number", "duration", "was_interrupted")
    assert lookup("on_tts_request").args == ("context_id", "text")
    assert lookup("on_user_turn_stopped").args == ("strategy", "message")
    assert lookup("on_dialout_answered").args == ("data",)
    assert lookup("on_before_leave").args == ()
    # (the events beyond the reference, as Pipecat 1.14 calls their handlers)
    assert lookup("on_pipeline_timeout").args == ("frame",)
    assert lookup("on_heartbeat_timeout").args == lookup("on_setup_timeout").args == ()
    assert lookup("on_dtmf_event").args == ("data",)
    assert lookup("on_transcription_stopped").args == ("stopped_by", "stopped_by_error")
    assert lookup("on_transcription_error").args == ("message",)
    assert lookup("on_network_connection_status_updated").args == ("status",)
    assert lookup("on_user_turn_audio").args == lookup("on_bot_turn_audio").args == ("data",)
    assert lookup("on_ui_message").args == ("message",)
    assert lookup("on_latency_breakdown").args == ("breakdown",)
    assert lookup("on_first_bot_speech_latency").args == ("latency",)
    assert lookup("on_usable_changed").args == ("is_usable",)
    assert lookup("on_user_turn_inference_triggered").args == ("strategy",)
    for name in ["on_user_turn_message_added", "on_user_backchannel", "on_assistant_backchannel"]:
        assert lookup(name).args == ("message",)
    assert lookup("on_summary_applied").args == ("summarizer", "event")
    assert lookup("on_wake_phrase_detected").args == ("phrase",)
    assert lookup("on_wake_phrase_timeout").args == lookup("on_turn_resume").args == ()
    for name in ["on_turn_start", "on_turn_update", "on_turn_eager_end", "on_turn_end"]:
        assert lookup(name).args == ("transcript",)
    assert lookup("on_function_calls_cancelled").args == ("function_calls",)
    assert lookup("on_conversation_item_deleted").args == ("item_id",)
    assert lookup("on_conversation_item_truncated").args == (
        "item_id",
        "content_index",
        "audio_end_ms",
    )
    assert lookup("on_dtmf_received").args == ("button",)
    assert lookup("on_mcp_event").args == ("event_type", "event")
    assert lookup("on_session_started").args == ("session",)
    assert lookup("on_delegation_created").args == ("delegation",)
    assert lookup("on_completion").args == ("completion", "completed")
    assert lookup("on_service_latency").args == lookup("on_service_usage").args == ("record",)
    assert lookup("on_speech_event").args == lookup("on_function_call_event").args == ("event",)
    assert lookup("on_startup_timing_report").args == ("report",)
    assert lookup("on_transport_timing_report").args == ("report",)
    # (emitters the reference leaves out: their own events, and those they share with others)
    assert lookup("on_avatar_connected").args == ("participant",)
    assert lookup("on_avatar_disconnected").args == ("participant", "reason")
    assert lookup("on_track_subscribed").args == ("track",)
    assert lookup("on_bot_ready").args == ()
    for name in ["on_open", "on_close", "on_pause", "on_dtmf", "on_ping"]:
        assert lookup(name).args == ("message",)
    assert lookup("on_error").args == ("error", "exception")  # MOQ passes both
    assert lookup("on_joined").args == lookup("on_left").args == ("data",)  # Daily's on_left: none
    assert lookup("on_participant_joined").args == ("participant",)


def test_a_decoded_event_is_validated() -> None:
    data = b'{"type":"on_latency_measured","emitter":{"kind":"x"},"latency":"slow"}'
    with pytest.raises(DecodeError, match="Expected `float`, got `str`"):
        CODEC.decode("on_latency_measured", data)


def test_sync_flags_are_exactly_the_expected_ones() -> None:
    assert {name for name, spec in CATALOG.items() if spec.sync} == SYNC


@pytest.mark.parametrize(("name", "sync_kinds"), sorted(SYNC_BY_KIND.items()))
def test_a_per_kind_sync_event_is_sync_from_exactly_those_kinds(
    name: str, sync_kinds: set[str]
) -> None:
    spec = lookup(name)
    assert {kind for kind in spec.emitters if spec.sync_for(kind)} == sync_kinds


def test_other_events_are_sync_from_every_emitter_or_none() -> None:
    for name, spec in CATALOG.items():
        if name not in SYNC_BY_KIND:
            assert {spec.sync_for(kind) for kind in spec.emitters} == {spec.sync}, name


def test_per_kind_sync_rules_name_only_kinds_that_emit_the_event() -> None:
    for name, spec in CATALOG.items():
        assert spec.async_for <= spec.emitters and spec.sync_kinds <= spec.emitters, name


def test_every_emitter_kind_is_known() -> None:
    unknown = {name: spec.emitters - KINDS for name, spec in CATALOG.items()}
    assert {name: kinds for name, kinds in unknown.items() if kinds} == {}


@pytest.mark.parametrize(("name", "emitters"), sorted(SHARED.items()))
def test_a_shared_event_lists_every_emitter(name: str, emitters: set[str]) -> None:
    assert emitters <= lookup(name).emitters


def test_frame_processor_events_come_from_every_kind_that_may_be_a_processor() -> None:
    for name in ["on_before_process_frame", "on_after_push_frame", "on_usable_changed"]:
        assert lookup(name).emitters == KINDS - NOT_PROCESSORS
    # ... and on_error from the ErrorObserver and Genesys's serializer too: their own.
    assert lookup("on_error").emitters == KINDS - NOT_PROCESSORS | {
        "observer.error",
        "serializer.genesys",
    }


def test_lookup_of_an_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(KeyError, match="on_client_connected"):
        lookup("on_client_conected")
    with pytest.raises(KeyError) as caught:
        lookup("nothing_like_it")
    assert "nothing_like_it" in str(caught.value) and "did you mean" not in str(caught.value)


def test_building_a_catalog_refuses_two_specs_of_one_name() -> None:
    spec = lookup("on_left")
    with pytest.raises(ValueError, match="on_left"):
        build_catalog([spec, EventSpec("on_left", lookup("on_joined").payload, frozenset())])


def test_the_new_emitter_kinds_are_known_and_alone_emit_their_own_events() -> None:
    assert {
        "observer.error",
        "transport.vonage",
        "transport.lemonslice",
        "transport.moq",
        "transport.rtvi_client",
        "serializer.genesys",
    } <= KINDS
    for name in ["on_avatar_connected", "on_avatar_disconnected"]:
        assert lookup(name).emitters == {"transport.lemonslice"}
    assert lookup("on_track_subscribed").emitters == {"transport.moq"}
    assert lookup("on_bot_ready").emitters == {"transport.rtvi_client"}
    for name in ["on_open", "on_close", "on_pause", "on_dtmf", "on_ping"]:
        assert lookup(name).emitters == {"serializer.genesys"}


def test_dailys_on_error_message_is_carried_as_the_shape_of_an_error_frame() -> None:
    """Daily calls ``on_error(transport, message)`` with a string; a frame processor passes an
    ErrorFrame, described as a dict. Handlers read ``error["error"]`` either way."""
    daily = Emitter("transport.daily")
    event = OnError(emitter=daily, error="full")  # type: ignore[arg-type]  # as Daily passes it
    codec = Codec(payload_types())
    assert codec.decode("on_error", encode(event)) == OnError(
        emitter=daily, error={"error": "full"}
    )


@pytest.mark.parametrize("kind", ["transport.vonage", "transport.moq"])
def test_a_transports_on_error_message_is_carried_as_dailys_is(kind: str) -> None:
    """Vonage calls ``on_error(transport, description)``, MOQ ``on_error(transport, message,
    exception)``: a string first, as Daily's."""
    emitter = Emitter(kind)
    args: list[Any] = ["gone"]  # as they pass it
    if kind == "transport.moq":
        args.append(ConnectionResetError("reset by peer"))
    event = OnError(emitter, *args)
    exception = {"type": "ConnectionResetError", "message": "reset by peer"} if args[1:] else {}
    assert CODEC.decode("on_error", encode(event)) == OnError(
        emitter=emitter, error={"error": "gone"}, exception=exception
    )


def test_an_error_observers_event_gets_its_message_as_error() -> None:
    """ErrorObserver calls ``on_error(observer, event)`` with its ErrorEvent, as JSON."""
    emitter = Emitter("observer.error", "ErrorObserver#0")
    event = {
        "message": "401 Unauthorized",
        "category": "authentication",
        "exception_type": "HTTPError",
        "processor": "DeepgramSTTService#0",
        "processor_usable": False,
        "timestamp": 1765000000.5,
    }
    decoded = CODEC.decode("on_error", encode(OnError(emitter, event)))
    assert isinstance(decoded, OnError)
    assert decoded.error == {**event, "error": "401 Unauthorized"}
    assert not lookup("on_error").sync_for("observer.error")


def test_a_genesys_error_message_gets_its_message_as_error() -> None:
    """Genesys's serializer calls ``on_error(serializer, message)`` with the AudioHook error."""
    emitter = Emitter("serializer.genesys")
    message = {"type": "error", "seq": 4, "parameters": {"code": 429, "message": "Too many"}}
    decoded = CODEC.decode("on_error", encode(OnError(emitter, message)))
    assert isinstance(decoded, OnError)
    assert decoded.error == {**message, "error": "Too many"}


def test_on_update_carries_fluxs_transcript_or_genesyss_update_message() -> None:
    """Deepgram Flux calls ``on_update(stt, transcript)``, Genesys's serializer
    ``on_update(serializer, message)``: one event name, its one argument either."""
    assert lookup("on_update").emitters == {"stt", "serializer.genesys"}
    message = {"type": "update", "seq": 7, "parameters": {"inputVariables": {"lang": "en"}}}
    updates: list[tuple[str, str | dict[str, Any]]] = [
        ("stt", "I would like"),
        ("serializer.genesys", message),
    ]
    for kind, update in updates:
        event = OnUpdate(emitter=Emitter(kind), transcript=update)
        decoded = CODEC.decode("on_update", encode(event))
        assert isinstance(decoded, OnUpdate) and decoded.transcript == update


def test_openclaws_gateway_client_says_whether_its_connection_error_will_recur() -> None:
    """OpenClaw's client calls ``on_connection_error(client, error, force_treat_as_permanent)``;
    the services pass the error alone (a handler of theirs with one argument still fits)."""
    assert lookup("on_connection_error").args == ("error", "permanent")
    client = Emitter("openclaw.gateway_client")
    event = lookup("on_connection_error").payload(client, "refused", True)  # type: ignore[call-arg]
    assert CODEC.decode("on_connection_error", encode(event)) == event
    assert not lookup("on_connection_error").sync_for("openclaw.gateway_client")
    for name in ["on_connected", "on_disconnected"]:
        assert lookup(name).emitted_by("openclaw.gateway_client") and lookup(name).args == ("data",)


def test_an_error_with_its_own_error_key_or_no_message_is_carried_unchanged() -> None:
    emitter = Emitter("stt")
    frame = {"error": "boom", "fatal": False, "processor": "stt#0", "message": "other"}
    assert OnError(emitter, frame).error == frame
    assert OnError(emitter, {"code": 1}).error == {"code": 1}
