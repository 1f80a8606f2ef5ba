"""What the bot and the worker services say to each other.

Events the bot publishes on the session stream, in the order they happen, and commands and
replies the services write to the bot's inbox. Actions travel as plain JSON objects, as in a
Pipecat Flows node config (``{"type": "tts_say", "text": "..."}``).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from bus import Codec, Payload

Action = dict[str, Any]
Phase = Literal["pre", "post"]


# -- events: bot -> session stream -------------------------------------------------------------
class SessionStarted(Payload, tag="session.started"):
    """The bot started the session's flow."""

    flow: str = ""


class NodeEntered(Payload, tag="node.entered"):
    """The bot entered node `node`; `gen` counts node entries in the session (1, 2, ...).

    Bot-side callables appear as ``{"type": ..., "bot_handler": key}``: the bot runs them when
    the actions service asks (`RunAction`), in their place in the list.
    """

    node: str
    gen: int
    pre_actions: list[Action] = msgspec.field(default_factory=list)
    post_actions: list[Action] = msgspec.field(default_factory=list)
    respond_immediately: bool = True
    #: How long the bot waits for the pre-actions (0: no limit); later ones are abandoned.
    wait_ms: int = 0
    #: The actions service that runs them (the bot's `actions_service`; "": any).
    service: str = ""


class LLMCompleted(Payload, tag="llm.completed"):
    """The LLM's reply in node `gen` is complete (its text, and any function calls)."""

    node: str
    gen: int
    text: str = ""
    function_calls: list[str] = msgspec.field(default_factory=list)


class TTSFinished(Payload, tag="tts.finished"):
    """The bot stopped speaking the LLM's reply in node `gen` (or had nothing to say).

    `heard`: what the caller heard of the reply, as the TTS reported it (a `Spoken`): all of
    it, or its start up to an interruption ("" if cut before its first word, or if there was
    nothing to say). None if the TTS said only whether it was interrupted (a bool), and in an
    event of a bot from before the field.
    """

    node: str
    gen: int
    interrupted: bool = False
    heard: str | None = None


class TTSSpoken(Payload, tag="tts.spoken"):
    """The bot spoke (or was interrupted speaking) the `Say` with `corr`.

    `heard`: what the caller heard of its text, as the TTS reported it (a `Spoken`), as in
    `TTSFinished`; None if the TTS said only whether it was interrupted (a bool), and in an
    event of a bot from before the field.
    """

    corr: str
    interrupted: bool = False
    heard: str | None = None


class ActionDone(Payload, tag="action.done"):
    """A bot-side action (`RunAction` `corr`) finished; `error` if it raised."""

    corr: str
    error: str = ""


class WaitTimedOut(Payload, tag="wait.timed_out"):
    """The bot stopped waiting for `wait` (e.g. ``pre_actions``) of node `gen`."""

    node: str
    gen: int
    wait: str
    seconds: float


class SessionEnded(Payload, tag="session.ended"):
    """The session is over; the last event of its stream."""

    reason: str = ""


# -- commands and replies: services -> bot inbox ----------------------------------------------
class Say(Payload, tag="say"):
    """Speak `text`; confirm with `TTSSpoken` when `corr` is set."""

    text: str
    append_to_context: bool = True
    corr: str = ""


class EndConversation(Payload, tag="end"):
    """Speak `text` (if any; into the LLM's context too, with `append_to_context`), then end
    the session."""

    text: str = ""
    corr: str = ""
    append_to_context: bool = True


class RunAction(Payload, tag="action.run"):
    """Run the bot-side action `key` of node `gen`; confirm with `ActionDone`."""

    corr: str
    key: str
    action: Action = msgspec.field(default_factory=dict)


class ActionsCompleted(Payload, tag="actions.completed"):
    """The `phase` actions of node `gen` are done; or failed at `action_type` with `error`; or
    `ended` by an ``end_conversation`` action (the rest of the list does not run)."""

    node: str
    gen: int
    phase: Phase
    error: str = ""
    action_type: str = ""
    ended: bool = False


class HandlerOutcome(Payload, tag="handlers.finished"):
    """One service's reply to a sync event: its handlers ran; `errors` lists those that failed."""

    corr: str
    service: str
    errors: list[str] = msgspec.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


FLOW_EVENTS = Codec(
    [
        SessionStarted,
        NodeEntered,
        LLMCompleted,
        TTSSpoken,
        TTSFinished,
        ActionDone,
        WaitTimedOut,
        SessionEnded,
    ]
)
COMMANDS = Codec([Say, EndConversation, RunAction, ActionsCompleted, HandlerOutcome])
