"""`answer_user_turns`: the user's turns in a running Pipecat pipeline answered by a
`FlowManager`.

Pipecat is optional: this module imports it, so `flows` does not import this module; use
``from flows.pipecat_turns import answer_user_turns``.

The user context aggregator decides when the user's turn starts and stops (its turn
strategies: VAD, a speech timeout, a turn model) and aggregates the transcript. Each stop
gives the transcript to `FlowManager.respond`; each start calls `FlowManager.interrupt`, so a
reply still being generated is dropped, as Pipecat's LLM service drops it. The reply is
spoken by the flow's TTS (`PipelineSpeech`, which the aggregator's interruption cuts short).
"""

from __future__ import annotations

from typing import Any

import anyio
import structlog
from pipecat.processors.aggregators.llm_response_universal import (
    LLMUserAggregator,
    UserTurnStoppedMessage,
)

from .manager import FlowManager

log = structlog.get_logger("flowbus.pipecat_turns")


def answer_user_turns(aggregator: LLMUserAggregator, flow: FlowManager) -> None:
    """Answer each user turn `aggregator` ends with ``flow.respond(transcript)``.

    One turn is answered at a time. Turns that end while one is answered are answered
    together next, their transcripts joined, unless the user is speaking again by then: a
    reply is not begun while a turn is under way, and that turn's end answers them all. An
    empty transcript, or none (Pipecat's realtime mode), is not answered. A `respond` that
    fails is logged (``user_turn_not_answered``) and the next turn is answered as usual.
    """
    turns = _Turns(flow)
    aggregator.add_event_handler("on_user_turn_started", turns.started)
    aggregator.add_event_handler("on_user_turn_stopped", turns.stopped)


class _Turns:
    def __init__(self, flow: FlowManager) -> None:
        self.flow = flow
        self.speaking = False  # a user turn is under way
        self.unanswered: list[str] = []
        self.answering = anyio.Lock()

    async def started(self, _aggregator: Any, _strategy: Any) -> None:
        self.speaking = True
        self.flow.interrupt()

    async def stopped(
        self, _aggregator: Any, _strategy: Any, message: UserTurnStoppedMessage
    ) -> None:
        self.speaking = False
        if message.content and message.content.strip():
            self.unanswered.append(message.content.strip())
        async with self.answering:
            if self.speaking or not self.unanswered:  # a later turn's end answers them
                return
            text = " ".join(self.unanswered)
            self.unanswered.clear()
            try:
                await self.flow.respond(text)
            except Exception as error:
                log.error(
                    "user_turn_not_answered",
                    session=self.flow.session_id,
                    text=text,
                    error=f"{type(error).__name__}: {error}",
                    exc_info=True,
                )
