"""Pipeline task and frame processor events.

Pipecat hands these handlers live frames; the payloads carry a frame as an `Info`
description (e.g. ``{"name": "StartFrame#0", "id": 12}``), empty when the bot sends none.
"""

from __future__ import annotations

import msgspec

from .base import (
    DAILY,
    ERROR_OBSERVER,
    GENESYS,
    LLM,
    MOQ,
    PIPELINE_TASK,
    PROCESSORS,
    VONAGE,
    Event,
    EventSpec,
    Info,
    spec,
)

# Pipeline task: `PipelineTask` (a `PipelineWorker` in 1.14).


class OnPipelineStarted(Event, tag="on_pipeline_started"):
    """The pipeline task started: its StartFrame reached the end of the pipeline."""

    frame: Info = msgspec.field(default_factory=dict)


class OnPipelineFinished(Event, tag="on_pipeline_finished"):
    """The pipeline task finished, with the EndFrame, StopFrame or CancelFrame that ended it."""

    frame: Info = msgspec.field(default_factory=dict)


class OnPipelineError(Event, tag="on_pipeline_error"):
    """An ErrorFrame reached the pipeline task (described like `OnError.error`)."""

    frame: Info = msgspec.field(default_factory=dict)


class OnFrameReachedUpstream(Event, tag="on_frame_reached_upstream"):
    """A frame of a watched type reached the start of the pipeline, going upstream."""

    frame: Info = msgspec.field(default_factory=dict)


class OnFrameReachedDownstream(Event, tag="on_frame_reached_downstream"):
    """A frame of a watched type reached the end of the pipeline, going downstream."""

    frame: Info = msgspec.field(default_factory=dict)


class OnIdleTimeout(Event, tag="on_idle_timeout"):
    """No activity frame went through the pipeline within the idle timeout."""

    # Not in the reference for LLMs, but xAI's realtime LLM registers this name too and passes
    # the id of the conversation item its server-side idle check-in starts.
    item_id: str = ""


class OnPipelineTimeout(Event, tag="on_pipeline_timeout"):
    """The StartFrame, or a CancelFrame, did not reach the end of the pipeline in time."""

    # The frame that was waited for, described as for on_pipeline_started. It is followed by
    # on_pipeline_finished after a CancelFrame; after a StartFrame the pipeline stops.
    frame: Info = msgspec.field(default_factory=dict)


class OnHeartbeatTimeout(Event, tag="on_heartbeat_timeout"):
    """No heartbeat frame came back through the pipeline within the monitoring period."""


class OnSetupTimeout(Event, tag="on_setup_timeout"):
    """Setting the pipeline task or its processors up took too long; the pipeline stops."""


# Every frame processor (`FrameProcessor` registers these five with sync=True in 1.14, and
# on_usable_changed without).


class OnError(Event, tag="on_error"):
    """A frame processor pushed an error, or a transport or an ErrorObserver reported one."""

    # A frame processor passes its ErrorFrame, described as {"error": message, "fatal": bool,
    # "processor": name, "category": ...}. Daily, Vonage and MOQ pass a message string,
    # carried as {"error": message}. An ErrorObserver passes its ErrorEvent, as JSON
    # ({"message", "category", "exception_type", "processor", "processor_usable",
    # "timestamp"}), and Genesys's serializer the AudioHook error message ({"type": "error",
    # "parameters": {"code", "message"}, ...}); both get an "error" key, their message. So a
    # handler reads error["error"] whoever emitted it.
    error: Info = msgspec.field(default_factory=dict)
    # MOQ passes the exception behind its message too, carried as {"type": its class name,
    # "message": str(exception)}.
    exception: Info = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.error, str):  # emitted as Daily, Vonage and MOQ do: the message
            self.error = {"error": self.error}
        elif "error" not in self.error:
            message = _message_of(self.error)
            if message is not None:
                self.error = {**self.error, "error": message}
        if isinstance(self.exception, BaseException):  # emitted as MOQ does
            self.exception = {"type": type(self.exception).__name__, "message": str(self.exception)}


def _message_of(error: Info) -> str | None:
    """The message of an ErrorObserver's ErrorEvent or a Genesys AudioHook error, if `error`
    is one."""
    message = error.get("message")
    if isinstance(message, str):
        return message
    parameters = error.get("parameters")
    if isinstance(parameters, dict) and isinstance(parameters.get("message"), str):
        return str(parameters["message"])
    return None


class OnBeforeProcessFrame(Event, tag="on_before_process_frame"):
    """A frame processor is about to process a frame."""

    frame: Info = msgspec.field(default_factory=dict)


class OnAfterProcessFrame(Event, tag="on_after_process_frame"):
    """A frame processor finished processing a frame."""

    frame: Info = msgspec.field(default_factory=dict)


class OnBeforePushFrame(Event, tag="on_before_push_frame"):
    """A frame processor is about to push a frame to its neighbour."""

    frame: Info = msgspec.field(default_factory=dict)


class OnAfterPushFrame(Event, tag="on_after_push_frame"):
    """A frame processor pushed a frame to its neighbour."""

    frame: Info = msgspec.field(default_factory=dict)


class OnUsableChanged(Event, tag="on_usable_changed"):
    """A frame processor became unusable (e.g. its API key was refused) or usable again."""

    # A ServiceSwitcher emits it too, when whether any of its services is usable changes.
    is_usable: bool


# Every processor's events, from the kinds that may be one (`PROCESSORS`); on_error from the
# ErrorObserver and Genesys's serializer too. Sync as in Pipecat, where a processor waits for
# these handlers before going on; but the on_error of the Daily, Vonage and MOQ transports, of
# the ErrorObserver and of Genesys's serializer is not sync there, nor here. on_usable_changed
# (beyond the reference) is not sync in Pipecat either.
SPECS: tuple[EventSpec, ...] = (
    spec(OnPipelineStarted, {PIPELINE_TASK}),
    spec(OnPipelineFinished, {PIPELINE_TASK}),
    spec(OnPipelineError, {PIPELINE_TASK}),
    spec(OnFrameReachedUpstream, {PIPELINE_TASK}),
    spec(OnFrameReachedDownstream, {PIPELINE_TASK}),
    spec(OnIdleTimeout, {PIPELINE_TASK, LLM}),
    # Not in the reference but registered by the pipeline task in 1.14.
    spec(OnPipelineTimeout, {PIPELINE_TASK}),
    spec(OnHeartbeatTimeout, {PIPELINE_TASK}),
    spec(OnSetupTimeout, {PIPELINE_TASK}),
    spec(
        OnError,
        PROCESSORS | {ERROR_OBSERVER, GENESYS},
        sync=True,
        async_for={DAILY, VONAGE, MOQ, ERROR_OBSERVER, GENESYS},
    ),
    spec(OnBeforeProcessFrame, PROCESSORS, sync=True),
    spec(OnAfterProcessFrame, PROCESSORS, sync=True),
    spec(OnBeforePushFrame, PROCESSORS, sync=True),
    spec(OnAfterPushFrame, PROCESSORS, sync=True),
    spec(OnUsableChanged, PROCESSORS),
)
