"""`PipelineSpeech`: a `flows.TTS` that speaks through a running Pipecat pipeline.

Pipecat is optional: this module imports it, so `flows` does not import this module; use
``from flows.pipecat_speech import PipelineSpeech``.

Place it at the end of the pipeline, after ``transport.output()``. `speak(text)` queues a
``TTSSpeakFrame(text)`` into the pipeline, then follows the downstream frames the output
transport pushes as the audio is played: ``BotStartedSpeakingFrame``, the words as spoken
(``TTSTextFrame``), then ``BotStoppedSpeakingFrame`` (spoken to the end) or an
``InterruptionFrame`` (cut short). It returns `Spoken(words heard, interrupted)`. Once the
pipeline ends (``EndFrame``, or ``CancelFrame``: the caller hung up), a `speak` waiting returns
what was heard, and a later one nothing, at once: no wait for a bot that will not speak.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import anyio
import structlog
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    TTSSpeakFrame,
    TTSTextFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from .speech import Spoken

log = structlog.get_logger("flowbus.pipecat_speech")


class Worker(Protocol):
    """What PipelineSpeech queues its texts into: a Pipecat ``PipelineWorker`` (or task)."""

    async def queue_frame(self, frame: Frame) -> Any: ...


class _Turn:
    """What was seen of the text being spoken."""

    def __init__(self) -> None:
        self.started = False
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
        if self.worker is None:
            raise RuntimeError("PipelineSpeech has no worker to queue its text into: set .worker")
        async with self._turn_lock:
            if self._ended:
                return Spoken("", interrupted=True)
            turn = self._turn = _Turn()
            try:
                await self.worker.queue_frame(TTSSpeakFrame(text))
                with anyio.move_on_after(self.timeout):
                    await turn.done.wait()
            finally:
                self._turn = None
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
                turn.started = True
            elif isinstance(frame, TTSTextFrame):
                space = "" if frame.includes_inter_frame_spaces else " "
                turn.words.append(space + frame.text)
            elif isinstance(frame, BotStoppedSpeakingFrame) and turn.started:
                turn.done.set()
            elif isinstance(frame, InterruptionFrame | EndFrame | CancelFrame):
                turn.interrupted = True
                turn.done.set()
        if isinstance(frame, EndFrame | CancelFrame) and direction == FrameDirection.DOWNSTREAM:
            self._ended = True
        await self.push_frame(frame, direction)
