"""`PipelineSpeech`: a `flows.TTS` that speaks through a running Pipecat pipeline.

Pipecat is optional: this module imports it, so `flows` does not import this module; use
``from flows.pipecat_speech import PipelineSpeech``.

Place it at the end of the pipeline, after ``transport.output()``. `speak(text)` queues a
``TTSSpeakFrame(text)`` into the pipeline, and a frame of its own after it, then follows the
downstream frames the output transport pushes as the audio is played: ``BotStartedSpeakingFrame``,
the words as spoken (``TTSTextFrame``), then its own frame, which the TTS service and the
transport keep behind the text's audio, and ``BotStoppedSpeakingFrame`` (spoken to the end);
or an ``InterruptionFrame`` (cut short). It returns `Spoken(words heard, interrupted)`.

`speak_stream(texts)` speaks a reply as the LLM writes it, as Pipecat speaks an LLM's: the
texts go in as an LLM response (``LLMFullResponseStartFrame``, an ``LLMTextFrame`` each,
``LLMFullResponseEndFrame``), the TTS service speaks each sentence as soon as it is complete,
and the reply was spoken once its end frame came out of the transport after its audio and the
bot stopped speaking. An interruption ends either at once.

Once the pipeline ends (``EndFrame``, or ``CancelFrame``: the caller hung up), a `speak`
waiting returns what was heard, and a later one nothing, at once: no wait for a bot that will
not speak.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterable
from typing import Any, Protocol

import anyio
import structlog
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    CancelFrame,
    DataFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSSpeakFrame,
    TTSTextFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from .speech import Spoken

log = structlog.get_logger("flowbus.pipecat_speech")


class Worker(Protocol):
    """What PipelineSpeech queues its texts into: a Pipecat ``PipelineWorker`` (or task)."""

    async def queue_frame(self, frame: Frame) -> Any: ...


class _Said(DataFrame):
    """Follows a `speak`'s text into the pipeline: the TTS service and the output transport
    keep it behind the text's audio, so it comes out once that was played."""


class _Turn:
    """What was seen of the text being spoken."""

    def __init__(self) -> None:
        self.started = False  # the bot started speaking it
        self.speaking = False
        #: Its text is all through the transport: the frame that followed it (`end_id`: a
        #: `_Said`, or a streamed reply's end) came out of the transport.
        self.said = False
        self.end_id: int | None = None
        self.words: list[str] = []
        self.interrupted = False
        self.done = anyio.Event()

    def heard(self) -> str:
        return "".join(self.words).strip()


class PipelineSpeech(FrameProcessor):
    """Speaks with the pipeline it ends: its TTS service, then its output transport.

    `worker` runs the pipeline: each text goes in with its ``queue_frame``. It may be set
    later, as the attribute, before the first `speak`. One text is spoken at a time. `timeout`
    bounds each `speak`: after it, what was heard so far is returned as interrupted.
    """

    def __init__(
        self, worker: Worker | None = None, *, timeout: float = 60.0, **kwargs: Any
    ) -> None:
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a finite number of seconds > 0, not {timeout!r}")
        super().__init__(**kwargs)
        self.worker = worker  # (not `queue_frame`: that is FrameProcessor's own input queue)
        self.timeout = timeout
        self._turn_lock = anyio.Lock()
        self._turn: _Turn | None = None
        self._ended = False  # the pipeline ended: nothing more is spoken

    async def speak(self, text: str) -> Spoken:
        worker = self._worker()
        async with self._turn_lock:
            if self._ended:
                return Spoken("", interrupted=True)
            turn = self._turn = _Turn()
            try:
                said = _Said()
                turn.end_id = said.id
                await worker.queue_frame(TTSSpeakFrame(text))
                await worker.queue_frame(said)
                with anyio.move_on_after(self.timeout):
                    await turn.done.wait()
            finally:
                self._turn = None
            return self._spoken(turn, text)

    async def speak_stream(self, texts: AsyncIterable[str]) -> Spoken:
        """Speak the `texts` of one reply as they come; `timeout` bounds the wait after the
        last. An interruption ends it at once: the texts after it are not spoken."""
        worker = self._worker()
        async with self._turn_lock:
            if self._ended:
                return Spoken("", interrupted=True)
            turn = self._turn = _Turn()
            text: list[str] = []
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_cancel_when_set, turn.done, tg.cancel_scope)
                    await self._feed(worker, texts, turn, text)
                    with anyio.move_on_after(self.timeout):
                        await turn.done.wait()
                    tg.cancel_scope.cancel()
            finally:
                self._turn = None
            return self._spoken(turn, "".join(text))

    async def _feed(
        self, worker: Worker, texts: AsyncIterable[str], turn: _Turn, fed: list[str]
    ) -> None:
        """Queue `texts` as one LLM response, noting them in `fed`; nothing for no text."""
        async for text in texts:
            if not fed:
                await worker.queue_frame(LLMFullResponseStartFrame())
            fed.append(text)
            await worker.queue_frame(LLMTextFrame(text))
        if not fed:
            turn.done.set()  # nothing to say: nothing heard
            return
        end = LLMFullResponseEndFrame()
        turn.end_id = end.id
        await worker.queue_frame(end)

    def _worker(self) -> Worker:
        if self.worker is None:
            raise RuntimeError("PipelineSpeech has no worker to queue its text into: set .worker")
        return self.worker

    def _spoken(self, turn: _Turn, text: str) -> Spoken:
        if not turn.done.is_set():
            log.warning(
                "speech.timeout",
                text=text,
                timeout=self.timeout,
                started=turn.started,
                heard=turn.heard(),
                why="the bot did not stop speaking, nor was it interrupted, in time",
            )
            return Spoken(turn.heard(), interrupted=True)
        return Spoken(turn.heard(), interrupted=turn.interrupted)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        turn = self._turn
        if turn is not None and direction == FrameDirection.DOWNSTREAM and not turn.done.is_set():
            if isinstance(frame, BotStartedSpeakingFrame):
                turn.started = turn.speaking = True
            elif isinstance(frame, TTSTextFrame):
                space = "" if frame.includes_inter_frame_spaces else " "
                turn.words.append(space + frame.text)
            elif isinstance(frame, BotStoppedSpeakingFrame):
                turn.speaking = False
                if turn.said:  # (it was speaking: the end came out before)
                    turn.done.set()
            elif isinstance(frame, _Said | LLMFullResponseEndFrame) and frame.id == turn.end_id:
                turn.said = True
                if not turn.speaking:  # (stopped already; or the TTS made no sound of it)
                    turn.done.set()
            elif isinstance(frame, InterruptionFrame | EndFrame | CancelFrame):
                turn.interrupted = True
                turn.done.set()
        if isinstance(frame, EndFrame | CancelFrame) and direction == FrameDirection.DOWNSTREAM:
            self._ended = True
        await self.push_frame(frame, direction)


async def _cancel_when_set(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
