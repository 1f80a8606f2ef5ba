"""forward_events: a real Pipecat 1.14 pipeline's events, run offline, reach an EventService."""

from __future__ import annotations

import base64
import enum
import json
import warnings
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import anyio
import pytest
from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    Frame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    OutputAudioRawFrame,
    StartFrame,
    TextFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.observers.turn_tracking_observer import TurnTrackingObserver
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.processors.audio.audio_buffer_processor import AudioBufferProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.turns.user_start import VADUserTurnStartStrategy
from pipecat.turns.user_stop import SpeechTimeoutUserTurnStopStrategy
from pipecat.turns.user_turn_strategies import UserTurnStrategies
from pipecat.utils import deprecation
from pipecat.workers.runner import WorkerRunner
from pydantic import BaseModel
from structlog.testing import capture_logs

from bus import Bus, Settings
from flows import CATALOG, BotSession, Events, forward_events, stop_forwarding
from flows.bridge import MAX_DEPTH, convert_args, describe, kind_of
from tests.flows.test_events import ready, records, start
from tests.support import WorkerProcesses, raw, wait_for

pytestmark = pytest.mark.anyio


class Relay(FrameProcessor):
    """Passes every frame on; notes each one it processed, and what `check` said then."""

    def __init__(self, check: Any = None) -> None:
        super().__init__()
        self.check = check
        self.processed: list[tuple[str, Any]] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        seen = await self.check() if self.check else None
        self.processed.append((type(frame).__name__, seen))
        await self.push_frame(frame, direction)


def worker(*processors: FrameProcessor) -> PipelineWorker:
    # No idle timeout: a pipeline waiting on a gated service is not idle.
    return PipelineWorker(Pipeline(list(processors)), cancel_on_idle_timeout=False)


async def run(pipeline: PipelineWorker, *frames: Frame) -> None:
    """Run `pipeline` until `frames` (the last an EndFrame) went through it."""
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(pipeline)
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.run)
        for frame in frames:
            await pipeline.queue_frame(frame)


# Unit: kinds, the events chosen, conversions (no server).

#: For the tests that forward events no one emits: forward_events only keeps its `events`.
NOT_EMITTING = Events(cast(BotSession, None))


def test_the_kind_comes_from_the_pipecat_class_the_most_specific_first() -> None:
    assert kind_of(worker()) == "pipeline_task"
    assert kind_of(TurnTrackingObserver()) == "observer.turn_tracking"
    assert kind_of(AudioBufferProcessor()) == "audio_buffer"  # a FrameProcessor too
    assert kind_of(Relay()) == "frame_processor"


def test_an_object_of_no_known_class_needs_a_kind_and_an_unknown_kind_is_refused() -> None:
    class Custom:
        name = "custom"

    class DailyTransport:  # named as Pipecat's, not of it
        name = "daily"

    events = NOT_EMITTING
    with pytest.raises(TypeError, match=r"Custom.*kind="):
        forward_events(Custom(), events)
    with pytest.raises(TypeError, match=r"DailyTransport.*kind="):
        kind_of(DailyTransport())
    with pytest.raises(ValueError, match=r"'transport\.dialy' is no emitter kind"):
        forward_events(Relay(), events, kind="transport.dialy")


def test_the_catalog_events_an_object_registers_are_forwarded_but_the_per_frame_ones() -> None:
    events = NOT_EMITTING
    pipeline = worker()
    # not on_activated, on_bus_message... that PipelineWorker registers beyond the catalog
    assert forward_events(pipeline, events) == sorted(
        n for n, s in CATALOG.items() if s.emitted_by("pipeline_task")
    )
    assert forward_events(Relay(), events) == ["on_error", "on_usable_changed"]
    assert forward_events(Relay(), events, only=["on_after_push_frame"]) == ["on_after_push_frame"]
    assert forward_events(Relay(), events, exclude=["on_error"]) == [
        "on_after_process_frame",
        "on_after_push_frame",
        "on_before_process_frame",
        "on_before_push_frame",
        "on_usable_changed",
    ]
    with pytest.raises(ValueError, match="emits no catalog event on_client_connected"):
        forward_events(Relay(), events, only=["on_client_connected"])
    with pytest.raises(ValueError, match="takes `only` or `exclude`, not both"):
        forward_events(Relay(), events, only=["on_error"], exclude=["on_usable_changed"])

    class Daily:  # a transport of Daily's kind that registers one of its events
        def __init__(self) -> None:
            self._event_handlers: dict[str, list[Any]] = {"on_client_connected": []}

        def add_event_handler(self, event: str, handler: Any) -> None:
            self._event_handlers[event].append(handler)

    assert forward_events(Daily(), events, kind="transport.daily") == ["on_client_connected"]
    handler = pipeline._event_handlers["on_pipeline_started"].handlers[-1]  # after Pipecat's own
    assert handler.__qualname__ == "forward_on_pipeline_started"


def test_an_event_forwarded_already_is_refused_not_published_twice() -> None:
    relay = Relay()
    assert forward_events(relay, NOT_EMITTING) == ["on_error", "on_usable_changed"]
    with pytest.raises(ValueError, match="on_error, on_usable_changed forwarded already"):
        forward_events(relay, NOT_EMITTING)
    # ... but others of its events may be added later
    assert forward_events(relay, NOT_EMITTING, only=["on_after_push_frame"]) == [
        "on_after_push_frame"
    ]
    assert len(relay._event_handlers["on_error"].handlers) == 1


async def test_an_objects_events_stopped_then_forwarded_again_go_only_to_the_next_session(
    bus: Bus,
) -> None:
    """An object kept for the next call: its events stop going to the first session, and
    may then be forwarded to the next one; its other handlers stay."""
    relay, own = Relay(), []

    async def on_error(processor: Any, error: Any) -> None:
        own.append(error.error)

    relay.add_event_handler("on_error", on_error)

    async with BotSession.open(bus, "call-1") as first, BotSession.open(bus, "call-2") as second:
        forward_events(relay, Events(first))
        assert stop_forwarding(relay, only=["on_error"]) == ["on_error"]
        with pytest.raises(ValueError, match="on_error not forwarded; forwarded: on_usable"):
            stop_forwarding(relay, only=["on_error"])
        assert stop_forwarding(relay) == ["on_usable_changed"]
        assert stop_forwarding(relay) == []
        forward_events(relay, Events(second), only=["on_error"])
        await relay._call_event_handler("on_error", ErrorFrame("lost"))  # (sync: handled now)
    assert own == ["lost"]
    assert await bus.history("call-1") == []
    [entry] = await bus.history("call-2")
    assert entry.type == "on_error"
    assert json.loads(entry.data)["emitter"] == {"kind": "frame_processor", "name": relay.name}


class Color(enum.Enum):
    RED = "red"


class Model(BaseModel):
    when: float
    tags: tuple[str, ...]


@dataclass
class Turn:
    turn_number: int
    audio: bytes


def test_describing_a_start_frame_does_not_read_its_deprecated_fields() -> None:
    # StartFrame warns on a read of its deprecated fields, under Pipecat's "always" filter and
    # once per reading line, which Pipecat's own tests forget (as here) before asserting.
    deprecation._warned_sites.clear()
    with warnings.catch_warnings(record=True) as caught:
        assert describe(StartFrame())["name"].startswith("StartFrame#")
    assert [str(w.message) for w in caught] == []


def test_live_arguments_are_described_as_json() -> None:
    text = TextFrame("hello")
    described = describe(text)
    assert (described["name"], described["id"], described["text"]) == (text.name, text.id, "hello")
    audio = describe(OutputAudioRawFrame(b"\x01\x02", 16000, 1))
    assert base64.b64decode(audio["audio"]) == b"\x01\x02" and audio["sample_rate"] == 16000
    relay = Relay()
    odd = {
        "color": Color.RED,
        "model": Model(when=1.5, tags=("a",)),
        "turn": Turn(3, b"\x00"),
        "error": ValueError("bad"),
        "thing": object(),
        "processor": relay,
        1: {2},
    }
    assert describe(odd) == {
        "color": "red",
        "model": {"when": 1.5, "tags": ["a"]},
        "turn": {"turn_number": 3, "audio": "AA=="},
        "error": {"type": "ValueError", "message": "bad"},
        "thing": {"type": "builtins.object"},
        "processor": {
            "type": f"{__name__}.Relay",
            "name": relay.name,
            "id": relay.id,
        },
        "1": [2],
    }
    json.dumps(describe(odd))

    class Unready:
        id = True  # not an id

        @property
        def name(self) -> str:
            raise RuntimeError("not set up yet")  # as BaseObject.task_manager before setup

    assert describe(Unready()) == {"type": f"{__name__}.{Unready.__qualname__}"}

    class Unserializable:  # a pydantic model whose dump fails
        def model_dump(self, mode: str) -> dict[str, Any]:
            raise ValueError("cannot serialize")

    assert describe(Unserializable()) == {"type": f"{__name__}.{Unserializable.__qualname__}"}
    loop: dict[str, Any] = {}
    loop["again"] = loop  # a cycle is described down to MAX_DEPTH, then by its type
    assert json.dumps(describe(loop)).count("again") == MAX_DEPTH


def test_arguments_fit_their_fields_bytes_as_base64_objects_by_name() -> None:
    assert convert_args(CATALOG["on_audio_data"], (b"\x00\x01", 16000, 1), {}) == (
        ["AAE=", 16000, 1],
        {},
    )
    relay = Relay()
    assert convert_args(CATALOG["on_service_switched"], (relay,), {}) == ([relay.name], {})
    assert convert_args(CATALOG["on_service_switched"], (), {"service": relay}) == (
        [],
        {"service": relay.name},
    )
    assert convert_args(CATALOG["on_ivr_status_changed"], (Color.RED,), {}) == (["red"], {})
    # A list of Info fields: each item described (Pipecat's FunctionCallFromLLM, say)
    calls = [Turn(1, b"\x00")]
    assert convert_args(CATALOG["on_function_calls_started"], (calls,), {}) == (
        [[{"turn_number": 1, "audio": "AA=="}]],
        {},
    )
    # Daily's on_error passes a message, which the payload carries as {"error": message}
    assert convert_args(CATALOG["on_error"], ("boom",), {}) == (["boom"], {})
    assert convert_args(CATALOG["on_usable_changed"], (), {"is_usable": True}) == (
        [],
        {"is_usable": True},
    )
    # A None where the field takes none is its default: no strategy decided the turn
    message = {"content": "bye"}
    assert convert_args(CATALOG["on_user_turn_stopped"], (None, message), {}) == (["", message], {})
    # ... or the empty dict of an Info's default: no message
    assert convert_args(CATALOG["on_user_turn_stopped"], (None, None), {}) == (["", {}], {})


# Real: a Pipecat pipeline run offline against the test server and a worker process.


async def test_a_pipelines_events_reach_the_service_in_order_with_their_payloads(
    bus: Bus, settings: Settings, workers: WorkerProcesses
) -> None:
    start(workers, settings, "crm", "on_pipeline_started,on_pipeline_finished,on_error")
    await ready(bus, "crm")
    relay = Relay()
    pipeline = worker(relay)
    end = EndFrame()
    async with BotSession.open(bus, "call-1") as bot:
        events = Events(bot)
        forward_events(pipeline, events, name="task")
        forward_events(relay, events)
        await run(pipeline, TextFrame("hi"), end)
        await wait_for(lambda: _count(bus, "crm", 2), what="the pipeline's two events")
    got = await records(bus, "crm")
    assert [(r["seq"], r["event"], r["kind"]) for r in got] == [
        (1, "on_pipeline_started", "pipeline_task"),
        (2, "on_pipeline_finished", "pipeline_task"),
    ]
    started, finished = got[0]["args"][0], got[1]["args"][0]
    assert started["name"].startswith("StartFrame#") and isinstance(started["id"], int)
    assert (finished["name"], finished["id"]) == (end.name, end.id)
    assert [e.type for e in await bus.history("call-1")] == [r["event"] for r in got]


async def test_a_sync_event_holds_the_pipeline_until_the_services_handler_finished(
    bus: Bus, settings: Settings, workers: WorkerProcesses
) -> None:
    start(workers, settings, "audit", "on_before_process_frame", mode="gated")
    await ready(bus, "audit")

    async def handled() -> int:
        return len(await records(bus, "audit"))

    relay = Relay(check=handled)
    pipeline = worker(relay)
    async with BotSession.open(bus, "call-1") as bot:
        forward_events(relay, Events(bot, sync_timeout=60), only=["on_before_process_frame"])
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, pipeline, EndFrame())

            async def published() -> bool:
                return len(await bus.history("call-1")) == 1

            await wait_for(published, what="the StartFrame's on_before_process_frame")
            assert relay.processed == []  # Pipecat waits in the handler, the service at the gate
            for _ in ("StartFrame", "EndFrame"):
                await raw(bus).rpush(f"{settings.prefix}:test:gate", "go")
    # Each frame was processed only once the service had recorded its event.
    assert relay.processed == [("StartFrame", 1), ("EndFrame", 2)]
    got = await records(bus, "audit")
    assert [r["args"][0]["name"].split("#")[0] for r in got] == ["StartFrame", "EndFrame"]


TURN_EVENTS = (
    "on_user_turn_started",
    "on_user_turn_stopped",
    "on_assistant_turn_started",
    "on_assistant_turn_stopped",
)


async def test_the_context_aggregators_turn_events_reach_the_service_with_their_messages(
    bus: Bus, settings: Settings, workers: WorkerProcesses
) -> None:
    start(workers, settings, "crm", ",".join(TURN_EVENTS))
    await ready(bus, "crm")
    # The user's turn starts on VAD and stops once VAD stopped and a transcript came (the
    # speech timeout short, and no STT latency announced, so no STT wait): no model to load.
    on_vad = VADUserTurnStartStrategy()
    on_timeout = SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=0.05)
    strategies = UserTurnStrategies(start=[on_vad], stop=[on_timeout])
    pair = LLMContextAggregatorPair(
        LLMContext(), user_params=LLMUserAggregatorParams(user_turn_strategies=strategies)
    )
    user, assistant = pair.user(), pair.assistant()
    pipeline = worker(user, assistant)
    said = "I'd like to book a table for Friday"
    async with BotSession.open(bus, "call-1") as bot:
        events = Events(bot)
        assert {"on_user_turn_started", "on_user_turn_stopped"} <= set(forward_events(user, events))
        assert "on_assistant_turn_stopped" in forward_events(assistant, events)

        async def published(name: str) -> bool:
            return name in [e.type for e in await bus.history("call-1")]

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(pipeline)
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.run)
            # As a call's transport and STT push them: VAD hears the user, then the
            # transcript comes and VAD hears silence.
            await pipeline.queue_frame(VADUserStartedSpeakingFrame(start_secs=0.2))
            await wait_for(lambda: published("on_user_turn_started"), what="the turn's start")
            await pipeline.queue_frames(
                [
                    TranscriptionFrame(said, "caller-7", "2026-01-01T10:00:00Z", finalized=True),
                    VADUserStoppedSpeakingFrame(stop_secs=0.2),
                ]
            )
            await wait_for(lambda: published("on_user_turn_stopped"), what="the turn's end")
            # As the LLM answers the context frame the user's turn pushed.
            await pipeline.queue_frames(
                [
                    LLMFullResponseStartFrame(),
                    LLMTextFrame("Sure, "),
                    LLMTextFrame("for how many?"),
                    LLMFullResponseEndFrame(),
                    EndFrame(),
                ]
            )
        await wait_for(lambda: _count(bus, "crm", 4), what="the four turn events handled")
    got = await records(bus, "crm")
    assert [(r["event"], r["kind"]) for r in got] == [
        ("on_user_turn_started", "user_aggregator"),
        ("on_user_turn_stopped", "user_aggregator"),
        ("on_assistant_turn_started", "assistant_aggregator"),
        ("on_assistant_turn_stopped", "assistant_aggregator"),
    ]
    assert [r["seq"] for r in got] == sorted(r["seq"] for r in got)
    started, stopped, assistant_started, assistant_stopped = (r["args"] for r in got)
    # The deciding strategies, by their Pipecat names.
    assert started == [on_vad.name] and on_vad.name.startswith("VADUserTurnStartStrategy#")
    strategy, message = stopped
    assert strategy == on_timeout.name
    assert strategy.startswith("SpeechTimeoutUserTurnStopStrategy#")
    # UserTurnStoppedMessage: the transcript, when the turn started. Pipecat 1.14 builds it
    # without the TranscriptionFrame's user_id (llm_response_universal.py:1563), so it is None.
    assert message == {"content": said, "timestamp": message["timestamp"], "user_id": None}
    datetime.fromisoformat(message["timestamp"])
    assert assistant_started == []
    # AssistantTurnStoppedMessage: the LLM's text frames joined, not interrupted.
    [answer] = assistant_stopped
    assert answer == {
        "content": "Sure, for how many?",
        "interrupted": False,
        "timestamp": answer["timestamp"],
    }
    assert datetime.fromisoformat(answer["timestamp"]) >= datetime.fromisoformat(
        message["timestamp"]
    )
    # What the services got is what the aggregators wrote to the LLM context.
    assert user.context.get_messages() == [
        {"role": "user", "content": said},
        {"role": "assistant", "content": "Sure, for how many?"},
    ]


async def test_a_user_turn_the_call_ends_stops_with_no_strategy_and_its_transcript(
    bus: Bus, settings: Settings, workers: WorkerProcesses
) -> None:
    start(workers, settings, "crm", "on_user_turn_started,on_user_turn_stopped")
    await ready(bus, "crm")
    strategies = UserTurnStrategies(
        start=[VADUserTurnStartStrategy()], stop=[SpeechTimeoutUserTurnStopStrategy()]
    )
    user = LLMContextAggregatorPair(
        LLMContext(), user_params=LLMUserAggregatorParams(user_turn_strategies=strategies)
    ).user()
    pipeline = worker(user)
    said = "and one more thing"
    async with BotSession.open(bus, "call-1") as bot:
        forward_events(user, Events(bot), only=["on_user_turn_started", "on_user_turn_stopped"])

        async def published() -> bool:
            return len(await bus.history("call-1")) == 1

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(pipeline)
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.run)
            await pipeline.queue_frame(VADUserStartedSpeakingFrame(start_secs=0.2))
            await wait_for(published, what="the turn's start")
            # The call ends while the user still speaks: no stop strategy decides the turn,
            # Pipecat ends it at the EndFrame with its strategy None.
            transcript = TranscriptionFrame(said, "caller-7", "2026-01-01T10:00:00Z")
            await pipeline.queue_frames([transcript, EndFrame()])
        await wait_for(lambda: _count(bus, "crm", 2), what="the turn's two events handled")
    got = await records(bus, "crm")
    assert [r["event"] for r in got] == ["on_user_turn_started", "on_user_turn_stopped"]
    strategy, message = got[1]["args"]
    assert strategy == ""  # the catalog's "empty when none decided"
    assert (message["content"], message["user_id"]) == (said, None)


async def test_an_event_that_cannot_be_emitted_is_logged_and_pipecat_goes_on(bus: Bus) -> None:
    relay = Relay()
    async with BotSession.open(bus, "call-1") as bot:
        forward_events(relay, Events(bot))
        with capture_logs() as logs:
            # As Pipecat calls a sync event's handlers (FrameProcessor.push_error does), with
            # an argument more than on_error takes.
            await relay._call_event_handler("on_error", StartFrame(), {}, "one too many")
    [entry] = [e for e in logs if e["event"] == "event_not_forwarded"]
    assert entry["event_name"] == "on_error" and entry["session"] == "call-1"
    assert entry["kind"] == "frame_processor" and "takes 2 arguments" in entry["error"]
    assert await bus.history("call-1") == []


async def _count(bus: Bus, service: str, n: int) -> bool:
    return len(await records(bus, service)) >= n
