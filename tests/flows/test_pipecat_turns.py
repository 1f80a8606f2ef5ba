"""answer_user_turns: the user's turns in a real Pipecat 1.14 pipeline, run offline, answered
by a FlowManager whose reply is spoken through the same pipeline (PipelineSpeech)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest
from pipecat.frames.frames import (
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregator,
    LLMUserAggregatorParams,
    UserTurnStoppedMessage,
)
from pipecat.turns.user_start import VADUserTurnStartStrategy
from pipecat.turns.user_stop import SpeechTimeoutUserTurnStopStrategy
from pipecat.turns.user_turn_strategies import UserTurnStrategies
from pipecat.workers.runner import WorkerRunner
from structlog.testing import capture_logs

from bus import Bus
from flows import FlowManager, LLMResponse, ScriptedLLM
from flows.pipecat_offline import SilentOutput, SilentTTS
from flows.pipecat_speech import PipelineSpeech
from flows.pipecat_turns import answer_user_turns
from tests.flows.test_actions import node
from tests.flows.test_pipecat_speech import Seen
from tests.support import wait_for

pytestmark = pytest.mark.anyio


# Unit: which turns are answered, and when (the aggregator's events called as Pipecat does).


class Flow:
    """Notes what it was asked; each `respond` waits until `go` is set."""

    session_id = "call-1"

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.interrupts = 0
        self.go = anyio.Event()
        self.go.set()

    async def respond(self, text: str) -> None:
        self.asked.append(text)
        await self.go.wait()

    def interrupt(self) -> None:
        self.interrupts += 1


def params() -> LLMUserAggregatorParams:
    """The user's turn starts on VAD and stops once VAD stopped and its transcript came (no
    turn model to load)."""
    on_timeout = SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=0.05)
    strategies = UserTurnStrategies(start=[VADUserTurnStartStrategy()], stop=[on_timeout])
    return LLMUserAggregatorParams(user_turn_strategies=strategies)


def user_aggregator() -> LLMUserAggregator:
    return LLMUserAggregator(LLMContext(), params=params())


async def started(aggregator: LLMUserAggregator) -> None:
    await aggregator._call_event_handler("on_user_turn_started", None)


async def stopped(aggregator: LLMUserAggregator, text: str | None) -> None:
    message = UserTurnStoppedMessage(content=text, timestamp="2026-01-01T10:00:00Z")
    await aggregator._call_event_handler("on_user_turn_stopped", None, message)


@asynccontextmanager
async def answering() -> AsyncIterator[tuple[LLMUserAggregator, Flow]]:
    aggregator, flow = user_aggregator(), Flow()
    answer_user_turns(aggregator, flow)  # type: ignore[arg-type]
    yield aggregator, flow
    await wait_for(lambda: not aggregator._event_tasks, what="every handler's task done")


async def test_each_turn_start_interrupts_and_each_end_is_answered_with_its_transcript() -> None:
    async with answering() as (aggregator, flow):
        await started(aggregator)
        await stopped(aggregator, "  Book a table  ")
        await wait_for(lambda: flow.asked == ["Book a table"], what="the turn answered")
        await started(aggregator)
        await stopped(aggregator, "for Friday")
        await wait_for(lambda: len(flow.asked) == 2, what="the second turn answered")
    assert flow.asked == ["Book a table", "for Friday"] and flow.interrupts == 2


async def test_turns_that_end_while_one_is_answered_are_answered_together_next() -> None:
    async with answering() as (aggregator, flow):
        flow.go = anyio.Event()
        await started(aggregator)
        await stopped(aggregator, "Book a table")
        await wait_for(lambda: flow.asked == ["Book a table"], what="the first turn answered")
        for text in ("for Friday", "at eight"):
            await started(aggregator)
            await stopped(aggregator, text)
        flow.go.set()
        await wait_for(lambda: len(flow.asked) == 2, what="the later turns answered")
    assert flow.asked == ["Book a table", "for Friday at eight"]


async def test_no_reply_is_begun_while_the_user_speaks_again() -> None:
    async with answering() as (aggregator, flow):
        flow.go = anyio.Event()
        await started(aggregator)
        await stopped(aggregator, "Book a table")
        await wait_for(lambda: flow.asked == ["Book a table"], what="the first turn answered")
        await started(aggregator)
        await stopped(aggregator, "for Friday")
        await started(aggregator)  # the user speaks again before the first answer is done
        flow.go.set()
        await wait_for(lambda: not aggregator._event_tasks, what="the second turn's end handled")
        assert flow.asked == ["Book a table"]  # "for Friday" waits for this turn's end
        await stopped(aggregator, "at eight")
        await wait_for(lambda: len(flow.asked) == 2, what="the waiting turns answered")
    assert flow.asked == ["Book a table", "for Friday at eight"]


@pytest.mark.parametrize("text", ["", "   ", None])
async def test_a_turn_with_no_transcript_is_not_answered(text: str | None) -> None:
    async with answering() as (aggregator, flow):
        await started(aggregator)
        await stopped(aggregator, text)
    assert flow.asked == [] and flow.interrupts == 1


async def test_a_respond_that_fails_is_logged_and_the_next_turn_answered() -> None:
    async with answering() as (aggregator, flow):
        respond = flow.respond

        async def fails_once(text: str) -> None:
            flow.respond = respond  # type: ignore[method-assign]
            raise RuntimeError("the LLM is down")

        flow.respond = fails_once  # type: ignore[method-assign]
        with capture_logs() as logs:
            await started(aggregator)
            await stopped(aggregator, "Book a table")
            await wait_for(lambda: not aggregator._event_tasks, what="the turn's end handled")
        await started(aggregator)
        await stopped(aggregator, "for Friday")
        await wait_for(lambda: flow.asked == ["for Friday"], what="the next turn answered")
    [entry] = [e for e in logs if e["event"] == "user_turn_not_answered"]
    assert entry["text"] == "Book a table" and entry["error"] == "RuntimeError: the LLM is down"


# A real pipeline: aggregator -> TTS -> output transport -> PipelineSpeech.


@asynccontextmanager
async def voice_bot(
    bus: Bus, llm: Any, seconds_per_word: float = 0.02
) -> AsyncIterator[tuple[FlowManager, PipelineWorker, Seen]]:
    """A running pipeline whose user turns the flow answers through it (cancelled after)."""
    user = LLMContextAggregatorPair(LLMContext(), user_params=params()).user()
    speech, seen = PipelineSpeech(timeout=20), Seen()
    pipeline = Pipeline([user, SilentTTS(seconds_per_word), SilentOutput(), seen, speech])
    worker = speech.worker = PipelineWorker(pipeline, cancel_on_idle_timeout=False)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.run)
        async with FlowManager.open(bus, "call-1", llm=llm, tts=speech) as flow:
            answer_user_turns(user, flow)
            await flow.initialize(node("booking", respond_immediately=False))
            yield flow, worker, seen
        await worker.cancel()


async def say(worker: PipelineWorker, text: str) -> None:
    """The caller says `text`, as the transport's VAD and the STT report it."""
    await worker.queue_frames(
        [
            VADUserStartedSpeakingFrame(start_secs=0.2),
            TranscriptionFrame(text, "caller-7", "2026-01-01T10:00:00Z", finalized=True),
            VADUserStoppedSpeakingFrame(stop_secs=0.2),
        ]
    )


async def events(bus: Bus, type_: str) -> list[dict[str, Any]]:
    return [msgspec.json.decode(e.data) for e in await bus.history("call-1") if e.type == type_]


async def spoken(bus: Bus, replies: int = 1) -> bool:
    return len(await events(bus, "tts.finished")) == replies


async def test_a_user_turn_is_answered_and_the_reply_spoken_through_the_pipeline(
    bus: Bus,
) -> None:
    reply = "Sure, for how many?"
    llm = ScriptedLLM({"booking": [LLMResponse(text=reply)]})
    async with voice_bot(bus, llm) as (flow, worker, _):
        await say(worker, "I'd like to book a table")
        await wait_for(lambda: spoken(bus), what="the reply spoken")
    [completed] = await events(bus, "llm.completed")
    [finished] = await events(bus, "tts.finished")
    assert completed["text"] == reply
    assert finished["heard"] == reply and finished["interrupted"] is False
    assert [(m["role"], m["content"]) for m in flow.messages if m["role"] != "system"] == [
        ("user", "I'd like to book a table"),
        ("assistant", reply),
    ]


async def test_the_caller_speaking_while_the_llm_generates_drops_that_reply(bus: Bus) -> None:
    asked = anyio.Event()

    class Slow(ScriptedLLM):
        async def generate(self, messages: Any, tools: Any) -> LLMResponse:
            if not asked.is_set():  # the first reply is still being generated...
                asked.set()
                await anyio.sleep_forever()
            return await super().generate(messages, tools)

    llm = Slow({"booking": [LLMResponse(text="For Friday, sure.")]})
    async with voice_bot(bus, llm) as (flow, worker, _):
        await say(worker, "I'd like to book a table")
        await asked.wait()
        await say(worker, "for Friday")  # ...when the caller speaks up
        await wait_for(lambda: spoken(bus), what="the reply spoken")
    assert [e["text"] for e in await events(bus, "llm.completed")] == ["For Friday, sure."]
    assert [(m["role"], m["content"]) for m in flow.messages if m["role"] != "system"] == [
        ("user", "I'd like to book a table"),
        ("user", "for Friday"),
        ("assistant", "For Friday, sure."),
    ]


async def test_the_caller_speaking_while_the_reply_is_spoken_cuts_it_where_they_spoke(
    bus: Bus,
) -> None:
    reply = "We have tables at seven, at eight, and at nine, inside or on the terrace."
    llm = ScriptedLLM({"booking": [LLMResponse(text=reply), LLMResponse(text="Eight it is.")]})
    async with voice_bot(bus, llm, seconds_per_word=0.2) as (flow, worker, seen):
        await say(worker, "Any tables on Friday?")
        await wait_for(lambda: bool(seen.words), what="the reply's first word played")
        await say(worker, "eight, please")  # the aggregator's turn start interrupts the bot
        await wait_for(lambda: spoken(bus, 2), what="the second reply spoken")
    cut, finished = await events(bus, "tts.finished")
    assert cut["interrupted"] is True and finished["interrupted"] is False
    assert cut["heard"] and reply.startswith(cut["heard"]) and cut["heard"] != reply
    assert [(m["role"], m["content"]) for m in flow.messages if m["role"] != "system"] == [
        ("user", "Any tables on Friday?"),
        ("assistant", cut["heard"]),  # what the caller heard of it, as Pipecat keeps it
        ("user", "eight, please"),
        ("assistant", "Eight it is."),
    ]


async def test_the_caller_speaking_while_a_streamed_reply_is_heard_and_written_drops_it(
    bus: Bus,
) -> None:
    """The first sentence is played while the LLM still writes: the caller's turn stops the
    writing and the speech, nothing is published of that reply, the context keeps what was
    heard of it, and the next turn is answered."""
    writing = anyio.Event()

    class Writing(ScriptedLLM):
        async def stream(self, messages: Any, tools: Any) -> AsyncIterator[LLMResponse]:
            if writing.is_set():
                async for part in super().stream(messages, tools):
                    yield part
                return
            writing.set()
            yield LLMResponse(text="We have tables at seven, at eight, and at nine. Inside")
            await anyio.sleep_forever()  # ...still writing when the caller speaks up

    llm = Writing({"booking": [LLMResponse(text="Eight it is.")]})
    async with voice_bot(bus, llm, seconds_per_word=0.2) as (flow, worker, seen):
        await say(worker, "Any tables on Friday?")
        await wait_for(lambda: bool(seen.words), what="the first sentence's first word played")
        await say(worker, "eight, please")
        await wait_for(lambda: spoken(bus), what="the second reply spoken")
    [finished] = await events(bus, "tts.finished")
    assert [e["text"] for e in await events(bus, "llm.completed")] == ["Eight it is."]
    assert (finished["interrupted"], finished["heard"]) == (False, "Eight it is.")
    [cut] = [m["content"] for m in flow.messages if m["role"] == "assistant"][:-1]
    assert cut and "We have tables at seven, at eight, and at nine.".startswith(cut)
    assert [m["role"] for m in flow.messages if m["role"] != "system"] == [
        "user",
        "assistant",
        "user",
        "assistant",
    ]
