"""Turn events of the user and assistant context aggregators (`LLMUserAggregator`,
`LLMAssistantAggregator`), of `UserTurnProcessor` (the user aggregator's turn events without
a context) and of the wake phrase turn start strategy.

Pipecat passes the turn strategy object that decided a user turn; the payloads carry its
name (its class's and a number, as every Pipecat object's: ``VADUserTurnStartStrategy#0``).
Transcripts come as Pipecat's message dataclasses, carried as `Info` with the same keys.
"""

from __future__ import annotations

import msgspec

from .base import (
    ASSISTANT_AGGREGATOR,
    USER_AGGREGATOR,
    USER_TURN_PROCESSOR,
    WAKE_PHRASE_STRATEGY,
    Event,
    EventSpec,
    Info,
    spec,
)

# User aggregator.


class OnUserTurnStarted(Event, tag="on_user_turn_started"):
    """The user started a turn (a start strategy decided so)."""

    strategy: str = ""  # e.g. "VADUserTurnStartStrategy#0"


class OnUserTurnStopped(Event, tag="on_user_turn_stopped"):
    """The user ended a turn; `message` holds the turn's transcript."""

    strategy: str = ""  # e.g. "TurnAnalyzerUserTurnStopStrategy#0"; empty when none decided
    # Pipecat's UserTurnStoppedMessage: {"content": transcript, "timestamp": when the turn
    # started, "user_id": ...}. content is None in realtime mode, where the transcript is only
    # final once the assistant answers; user_id is None from 1.14's context aggregator, which
    # keeps only the transcription frames' text.
    message: Info = msgspec.field(default_factory=dict)


class OnUserTurnInferenceTriggered(Event, tag="on_user_turn_inference_triggered"):
    """A stop strategy found enough signal to start the LLM's inference for the user's turn."""

    # Usually with on_user_turn_stopped; alone when a later strategy waits for the LLM's verdict
    # before ending the turn, or (speculatively) before the turn has ended.
    strategy: str = ""  # e.g. "TurnAnalyzerUserTurnStopStrategy#0"


class OnUserTurnMessageAdded(Event, tag="on_user_turn_message_added"):
    """The user's turn was written to the LLM context (in realtime mode, when the bot answers)."""

    # Pipecat's UserTurnMessageAddedMessage: {"content": transcript, "timestamp": when the turn
    # started, "user_id": None from 1.14's aggregator}; content is always set, unlike
    # on_user_turn_stopped's.
    message: Info = msgspec.field(default_factory=dict)


class OnUserBackchannel(Event, tag="on_user_backchannel"):
    """The user acknowledged the bot ("mhm") without interrupting it; not in the context."""

    # Pipecat's UserBackchannelMessage: {"content": ..., "timestamp": ..., "user_id": ...}.
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


class OnAssistantBackchannel(Event, tag="on_assistant_backchannel"):
    """The assistant started saying a backchannel ("Mm-hmm.") while the user talks."""

    # Pipecat's AssistantBackchannelMessage: {"content": ..., "timestamp": ...}.
    message: Info = msgspec.field(default_factory=dict)


class OnSummaryApplied(Event, tag="on_summary_applied"):
    """The assistant aggregator's summarizer compressed the LLM context into a summary."""

    # The aggregator's own LLMContextSummarizer, by name (e.g. "LLMContextSummarizer#0"), and
    # its SummaryAppliedEvent: {"original_message_count", "new_message_count",
    # "summarized_message_count", "preserved_message_count"}, all ints.
    summarizer: str = ""
    event: Info = msgspec.field(default_factory=dict)


# The wake phrase start strategy (`WakePhraseUserTurnStartStrategy`): an app registers its
# handlers on the strategy itself.


class OnWakePhraseDetected(Event, tag="on_wake_phrase_detected"):
    """The user said a wake phrase: their turns may start now."""

    phrase: str  # the configured phrase that matched


class OnWakePhraseTimeout(Event, tag="on_wake_phrase_timeout"):
    """No activity since the wake phrase for the timeout: the wake phrase is needed again."""


# UserTurnProcessor passes on_user_turn_stopped its strategy alone (no message).
SPECS: tuple[EventSpec, ...] = (
    spec(OnUserTurnStarted, {USER_AGGREGATOR, USER_TURN_PROCESSOR}),
    spec(OnUserTurnStopped, {USER_AGGREGATOR, USER_TURN_PROCESSOR}),
    spec(OnUserTurnStopTimeout, {USER_AGGREGATOR, USER_TURN_PROCESSOR}),
    spec(OnUserTurnIdle, {USER_AGGREGATOR, USER_TURN_PROCESSOR}),
    spec(OnUserMuteStarted, {USER_AGGREGATOR}),
    spec(OnUserMuteStopped, {USER_AGGREGATOR}),
    spec(OnAssistantTurnStarted, {ASSISTANT_AGGREGATOR}),
    spec(OnAssistantTurnStopped, {ASSISTANT_AGGREGATOR}),
    spec(OnAssistantThought, {ASSISTANT_AGGREGATOR}),
    # Not in the reference but registered in 1.14: these seven. The turn controller and its
    # strategies register on_user_turn_inference_triggered with sync=True too, but they are
    # the aggregator's internals; the aggregator and UserTurnProcessor register it async.
    spec(OnUserTurnInferenceTriggered, {USER_AGGREGATOR, USER_TURN_PROCESSOR}),
    spec(OnUserTurnMessageAdded, {USER_AGGREGATOR}),
    spec(OnUserBackchannel, {USER_AGGREGATOR}),
    spec(OnAssistantBackchannel, {ASSISTANT_AGGREGATOR}),
    spec(OnSummaryApplied, {ASSISTANT_AGGREGATOR}),
    spec(OnWakePhraseDetected, {WAKE_PHRASE_STRATEGY}),
    spec(OnWakePhraseTimeout, {WAKE_PHRASE_STRATEGY}),
)
