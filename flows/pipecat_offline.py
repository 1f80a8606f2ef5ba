"""Stand-ins that let a Pipecat pipeline speak offline, at the pace of real speech, as
`ScriptedLLM` and `SimulatedTTS` stand in for a flow's LLM and TTS: for tests, demos and
benchmarks of a bot with no provider and no sound device.

`SilentTTS` is a Pipecat TTS service that "synthesizes" each word as silence, with its word
timestamp; `SilentOutput` an output transport that plays audio to no device, taking as long
as the audio lasts. Between them, the pipeline does what it does with real ones: the TTS
service makes its sentences of an LLM's text, the transport pushes ``BotStartedSpeakingFrame``,
the words as they are played (``TTSTextFrame``), then ``BotStoppedSpeakingFrame``.

Pipecat is optional: this module imports it, so `flows` does not import this module; use
``from flows.pipecat_offline import SilentOutput, SilentTTS``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from pipecat.frames.frames import Frame, OutputAudioRawFrame, StartFrame, TTSAudioRawFrame
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams

#: The sample rate of the silence, Hz.
SAMPLE_RATE = 16000


class SilentTTS(TTSService):
    """Speaks each word as `seconds_per_word` of silence, with its word timestamp."""

    def __init__(self, seconds_per_word: float) -> None:
        super().__init__(
            push_text_frames=False,  # the words come with timestamps, as they are played
            push_stop_frames=True,
            stop_frame_timeout_s=0.5,
            sample_rate=SAMPLE_RATE,
            settings=TTSSettings(model=None, voice=None, language=None),
        )
        self.seconds_per_word = seconds_per_word

    def can_generate_metrics(self) -> bool:
        return False

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        for i, word in enumerate(text.split()):
            silence = b"\x00\x00" * int(SAMPLE_RATE * self.seconds_per_word)
            yield TTSAudioRawFrame(silence, SAMPLE_RATE, 1, context_id=context_id)
            await self.add_word_timestamps([(word, i * self.seconds_per_word)], context_id)


class SilentOutput(BaseOutputTransport):
    """Plays audio to no device, taking as long as the audio lasts."""

    def __init__(self, params: TransportParams | None = None) -> None:
        super().__init__(
            params or TransportParams(audio_out_enabled=True, audio_out_sample_rate=SAMPLE_RATE)
        )

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        await asyncio.sleep(len(frame.audio) / (frame.sample_rate * 2 * frame.num_channels))
        return True
