"""`bench.first_words`'s Pipecat TTS: `PipelineSpeech` after a TTS service and an output
transport that speak silence at the pace of speech. A module apart, imported only when a run
reaches it: importing Pipecat prints its banner (``--help`` would show it)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from pipecat.frames.frames import BotStartedSpeakingFrame, Frame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from flows.pipecat_offline import SilentOutput, SilentTTS
from flows.pipecat_speech import PipelineSpeech


class FirstWord(FrameProcessor):
    """Notes when the output transport starts playing, in `heard` (if it is empty)."""

    def __init__(self, heard: list[float]) -> None:
        super().__init__()
        self.heard = heard

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, BotStartedSpeakingFrame) and not self.heard:
            self.heard.append(time.perf_counter())
        await self.push_frame(frame, direction)


@asynccontextmanager
async def pipeline_speech(
    seconds_per_word: float, heard: list[float]
) -> AsyncIterator[PipelineSpeech]:
    """A running pipeline's `PipelineSpeech`, which notes when it starts playing in `heard`."""
    speech = PipelineSpeech()
    pipeline = Pipeline([SilentTTS(seconds_per_word), SilentOutput(), FirstWord(heard), speech])
    worker = speech.worker = PipelineWorker(pipeline, cancel_on_idle_timeout=False)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.run)
        yield speech
        await worker.cancel()
