"""PipelineSpeech: flowbus's TTS spoken through a real Pipecat 1.14 pipeline, run offline.

The pipeline is a TTS service that "synthesizes" silence with word timestamps, an output
transport that plays audio to no device (but at its pace, as a device would; both from
`flows.pipecat_offline`), then PipelineSpeech. The output transport emits
BotStarted/StoppedSpeakingFrame and the words (TTSTextFrame) as they are played, as with any
Pipecat TTS service and transport.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest
from pipecat.frames.frames import (
    BotStoppedSpeakingFrame,
    Frame,
    InterruptionFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner
from structlog.testing import capture_logs

from bus import Bus
from flows import FlowManager, LLMResponse, ScriptedLLM, Spoken
from flows.pipecat_offline import SilentOutput, SilentTTS
from flows.pipecat_speech import PipelineSpeech
from tests.flows.test_actions import actions as actions  # the fixture: an actions worker
from tests.flows.test_actions import node, say
from tests.support import ROOT, wait_for

pytestmark = pytest.mark.anyio


class Seen(FrameProcessor):
    """Notes the words and the bot-stopped frames going downstream to PipelineSpeech."""

    def __init__(self) -> None:
        super().__init__()
        self.words: list[str] = []
        self.stopped = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            if isinstance(frame, TTSTextFrame):
                self.words.append(frame.text)
            elif isinstance(frame, BotStoppedSpeakingFrame):
                self.stopped += 1
        await self.push_frame(frame, direction)


class MuteTTS(SilentTTS):
    """Makes no sound at all (a TTS that failed, or had nothing it could say)."""

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        return
        yield


@asynccontextmanager
async def playing(
    seconds_per_word: float = 0.05, tts: type[SilentTTS] = SilentTTS
) -> AsyncIterator[tuple[PipelineSpeech, Seen, PipelineWorker]]:
    """A running pipeline: SilentTTS, SilentOutput, Seen, PipelineSpeech (cancelled after)."""
    seen, speech = Seen(), PipelineSpeech(timeout=20)
    pipeline = Pipeline([tts(seconds_per_word), SilentOutput(), seen, speech])
    worker = PipelineWorker(pipeline, cancel_on_idle_timeout=False)
    speech.worker = worker  # set after construction: the worker needs the pipeline first
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.run)
        yield speech, seen, worker
        await worker.cancel()


async def test_speak_returns_the_words_played_once_the_bot_stopped_speaking() -> None:
    async with playing() as (speech, seen, _):
        spoken = await speech.speak("Hello there, welcome")
        assert seen.stopped == 1  # it returned only after the bot stopped speaking
        assert seen.words == ["Hello", "there,", "welcome"]
        assert spoken == Spoken("Hello there, welcome", interrupted=False)
        # and the next text is its own
        assert await speech.speak("Goodbye now") == Spoken("Goodbye now")


async def test_an_interruption_mid_phrase_returns_only_the_words_heard() -> None:
    text = "one two three four five six seven eight nine ten"
    async with playing(seconds_per_word=0.2) as (speech, seen, worker):
        async with anyio.create_task_group() as tg:
            result: list[Spoken] = []

            async def speak() -> None:
                result.append(await speech.speak(text))

            tg.start_soon(speak)
            await wait_for(lambda: bool(seen.words), what="the first word")
            await worker.queue_frame(InterruptionFrame())
        [spoken] = result
    assert spoken.interrupted is True
    assert spoken.text == " ".join(seen.words)
    assert spoken.text and spoken.text != text and text.startswith(spoken.text)


async def test_speak_gives_up_at_the_timeout_with_what_was_heard_and_says_why() -> None:
    class Nowhere:  # a pipeline that never plays anything
        async def queue_frame(self, frame: Frame) -> None:
            pass

    speech = PipelineSpeech(Nowhere(), timeout=0.05)
    with capture_logs() as logs:
        assert await speech.speak("Hello") == Spoken("", interrupted=True)
    [entry] = [e for e in logs if e["event"] == "speech.timeout"]
    assert entry["text"] == "Hello" and entry["started"] is False


async def test_a_streamed_reply_is_heard_from_its_first_sentence_while_the_rest_is_written() -> (
    None
):
    async with playing() as (speech, seen, _):

        async def written() -> AsyncIterator[str]:
            yield "Hello "
            yield "there. How"  # (the TTS takes a sentence as ended once the next begins)
            await wait_for(lambda: "there." in seen.words, what="the first sentence heard")
            yield " are "
            yield "you today?"

        with anyio.fail_after(20):
            spoken = await speech.speak_stream(written())
        assert spoken == Spoken("Hello there. How are you today?", interrupted=False)
        assert seen.words == ["Hello", "there.", "How", "are", "you", "today?"]
        assert await speech.speak_stream(written()) == spoken  # and the next reply is its own


async def test_an_interruption_ends_a_streamed_reply_without_waiting_for_the_rest() -> None:
    async with playing(seconds_per_word=0.2) as (speech, seen, worker):

        async def reply() -> AsyncIterator[str]:
            yield "one two three four five six seven eight. Nine"
            await wait_for(lambda: bool(seen.words), what="the first word")
            await worker.queue_frame(InterruptionFrame())  # the caller speaks up
            await anyio.sleep_forever()  # while the LLM still writes

        with anyio.fail_after(20):
            spoken = await speech.speak_stream(reply())
        assert spoken.interrupted is True
        assert spoken.text == " ".join(seen.words)
        assert spoken.text and "one two three four five six seven eight.".startswith(spoken.text)
        assert await speech.speak("Goodbye") == Spoken("Goodbye")  # and the next is its own


@pytest.mark.parametrize("streamed", [True, False])
async def test_a_text_the_tts_makes_no_sound_of_returns_once_it_came_through(
    streamed: bool,
) -> None:
    async with playing(tts=MuteTTS) as (speech, _, _):
        with capture_logs() as logs, anyio.fail_after(60):
            if streamed:
                spoken = await speech.speak_stream(pieces("Hello there."))
            else:
                spoken = await speech.speak("Hello there.")
            assert spoken == Spoken("")
    assert [e for e in logs if e["event"] == "speech.timeout"] == []  # (not its 20 s timeout)


async def test_a_streamed_reply_with_nothing_to_say_returns_at_once_nothing_queued() -> None:
    queued: list[Frame] = []

    class Nowhere:
        async def queue_frame(self, frame: Frame) -> None:
            queued.append(frame)

    with anyio.fail_after(10):
        assert await PipelineSpeech(Nowhere()).speak_stream(pieces()) == Spoken("")
    assert queued == []


async def test_a_streamed_reply_gives_up_at_the_timeout_after_its_last_text() -> None:
    class Nowhere:
        async def queue_frame(self, frame: Frame) -> None:
            pass

    speech = PipelineSpeech(Nowhere(), timeout=0.05)
    with capture_logs() as logs:
        assert await speech.speak_stream(pieces("Hel", "lo")) == Spoken("", interrupted=True)
    [entry] = [e for e in logs if e["event"] == "speech.timeout"]
    assert entry["text"] == "Hello" and entry["started"] is False


async def pieces(*texts: str) -> AsyncIterator[str]:
    for text in texts:
        yield text


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan")])
def test_the_timeout_must_be_finite_and_positive(timeout: float) -> None:
    with pytest.raises(ValueError, match="finite number of seconds > 0"):
        PipelineSpeech(timeout=timeout)


async def test_speaking_without_a_pipeline_to_queue_into_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="no worker"):
        await PipelineSpeech().speak("Hello")
    with pytest.raises(RuntimeError, match="no worker"):
        await PipelineSpeech().speak_stream(pieces("Hello"))


def test_flows_imports_without_pipecat_and_does_not_import_pipeline_speech() -> None:
    code = (
        "import sys; sys.modules['pipecat'] = None; import flows; "
        "assert 'flows.pipecat_speech' not in sys.modules; "
        "assert 'flows.pipecat_offline' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


async def published(bus: Bus, session: str, type_: str) -> list[dict[str, Any]]:
    return [msgspec.json.decode(e.data) for e in await bus.history(session) if e.type == type_]


async def test_a_flow_speaks_its_tts_say_and_reply_through_the_pipeline(actions: Bus) -> None:
    welcome, reply = "Welcome to Pizza Palace.", "Your pizza ships on Monday."
    llm = ScriptedLLM({"n": [LLMResponse(text=reply)]})
    async with playing() as (speech, seen, _):
        async with FlowManager.open(actions, "call-1", llm=llm, tts=speech) as fm:
            await fm.initialize(node("n", pre=[say(welcome)]))
        assert seen.stopped == 2
    [spoken] = await published(actions, "call-1", "tts.spoken")
    [finished] = await published(actions, "call-1", "tts.finished")
    assert spoken["interrupted"] is finished["interrupted"] is False
    assert spoken["heard"] == welcome
    assert finished["heard"] == reply
    assert [m["content"] for m in fm.messages if m["role"] == "assistant"][-1] == reply


async def test_the_pipeline_ending_ends_a_speak_at_once_and_any_later_one() -> None:
    """The caller hung up and the pipeline is cancelled mid-phrase: the speak returns what was
    heard, not at its timeout (20 s, which it would log); a speak after that returns at once,
    nothing heard."""
    text = "one two three four five six seven eight nine ten"
    async with playing(seconds_per_word=0.2) as (speech, seen, worker):
        result: list[Spoken] = []

        async def speak() -> None:
            result.append(await speech.speak(text))

        with capture_logs() as logs, anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(speak)
                await wait_for(lambda: bool(seen.words), what="the first word")
                await worker.cancel()
            assert await speech.speak("Are you there?") == Spoken("", interrupted=True)
    assert [e for e in logs if e["event"] == "speech.timeout"] == []
    [spoken] = result
    assert spoken.interrupted is True and text.startswith(spoken.text)
