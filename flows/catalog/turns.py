"""Turn events of the user and assistant context aggregators (`LLMUserAggregator`,
`LLMAssistantAggregator`).

Pipecat passes the turn strategy object that decided a user turn; the payloads carry its
class name. Transcripts come as Pipecat's message dataclasses, carried as `Info` with the
same keys.
"""

from __future__ import annotations

import msgspec

from .base import ASSISTANT_AGGREGATOR, USER_AGGREGATOR, Event, EventSpec, Info, spec

# User aggregator.


class OnUserTurnStarted(Event, tag="on_user_turn_started"):
    """The user started a turn (a start strategy decided so)."""

    strategy: str = ""  # e.g. "VADUserTurnStartStrategy"


class OnUserTurnStopped(Event, tag="on_user_turn_stopped"):
    """The user ended a turn; `message` holds the turn's transcript."""

    strategy: str = ""  # e.g. "TurnAnalyzerUserTurnStopStrategy"; empty when none decided
    # Pipecat's UserTurnStoppedMessage: {"content": transcript, "timestamp": when the turn
    # started, "user_id": ...}. content is None in realtime mode, where the transcript is only
    # final once the assistant answers.
    message: Info = msgspec.field(default_factory=dict)


class OnUserTurnStopTimeout(Event, tag="on_user_turn_stop_timeout"):
    """No user turn stop strategy ended the user's turn within the stop timeout."""


class OnUserTurnIdle(Event, tag="on_user_turn_idle"):
    """The user has been idle (not speaking) for the configured idle timeout."""


class OnUserMuteStarted(Event, tag="on_user_mute_started"):
    """A mute strategy started muting the user's input."""


class OnUserMuteStopped(Event, tag="on_user_mute_stopped"):
    """The user's input is no longer muted."""


# Assistant aggregator.


class OnAssistantTurnStarted(Event, tag="on_assistant_turn_started"):
    """The assistant (the LLM's response) started a turn."""


class OnAssistantTurnStopped(Event, tag="on_assistant_turn_stopped"):
    """The assistant ended a turn; `message` holds what it said."""

    # Pipecat's AssistantTurnStoppedMessage: {"content": transcript, "interrupted": bool,
    # "timestamp": when the turn started}.
    message: Info = msgspec.field(default_factory=dict)


class OnAssistantThought(Event, tag="on_assistant_thought"):
    """An assistant thought (the LLM's reasoning) is available."""

    # Pipecat's AssistantThoughtMessage: {"content": the thought, "timestamp": ...}.
    message: Info = msgspec.field(default_factory=dict)


SPECS: tuple[EventSpec, ...] = (
    spec(OnUserTurnStarted, {USER_AGGREGATOR}),
    spec(OnUserTurnStopped, {USER_AGGREGATOR}),
    spec(OnUserTurnStopTimeout, {USER_AGGREGATOR}),
    spec(OnUserTurnIdle, {USER_AGGREGATOR}),
    spec(OnUserMuteStarted, {USER_AGGREGATOR}),
    spec(OnUserMuteStopped, {USER_AGGREGATOR}),
    spec(OnAssistantTurnStarted, {ASSISTANT_AGGREGATOR}),
    spec(OnAssistantTurnStopped, {ASSISTANT_AGGREGATOR}),
    spec(OnAssistantThought, {ASSISTANT_AGGREGATOR}),
)
