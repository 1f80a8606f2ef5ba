"""flowbus.flows: the conversation domain.

Pipecat-Flows nodes and actions (`FlowManager` in the bot, `ActionService` in workers), event
handlers as services (`EventService`, `Events`, and `forward_events` for a Pipecat object's
events), the event catalog, the messages between bots and services, and the errors users see;
the LLM and TTS a `FlowManager` drives (`LLM`, `TTS`, their streaming forms) and stand-ins for
them (`ScriptedLLM`, `SimulatedTTS`).

Modules that import optional packages, so `flows` does not import them: `flows.openai_llm`
(an LLM on OpenAI's API), `flows.pipecat_speech` (a TTS spoken through a Pipecat pipeline),
`flows.pipecat_turns` (the caller's turns answered by the flow), `flows.pipecat_offline` (a
Pipecat pipeline that speaks offline).
"""

from .actions import ActionService, WorkerFlowManager
from .bot import BotSession
from .bridge import PER_FRAME_EVENTS, PIPECAT_KINDS, forward_events, stop_forwarding
from .catalog import CATALOG, Emitter, Event, EventSpec, Info
from .config import ContextStrategy, FlowConfig, NodeConfig, load_flow, parse_node
from .emitting import Events, SyncOutcome
from .errors import (
    ActionError,
    EventError,
    FlowError,
    FlowInitializationError,
    FlowTransitionError,
    InvalidFunctionError,
    InvalidHandlerError,
    InvalidNodeError,
    UnknownEventError,
)
from .function_calls import NO_RESPONSE
from .functions import TRANSITION_IN_YAML, Branch, FunctionConfig
from .handlers import EmitterRef, EventService, Retry, declare
from .manager import FlowManager
from .protocol import COMMANDS, FLOW_EVENTS, ActionsCompleted, EndConversation, HandlerOutcome, Say
from .speech import (
    CURRENT_NODE,
    LLM,
    TTS,
    FunctionCall,
    LLMResponse,
    ScriptedLLM,
    SimulatedTTS,
    Spoken,
    StreamingLLM,
    StreamingTTS,
)
from .state import SharedState

__all__ = [
    "CATALOG",
    "COMMANDS",
    "CURRENT_NODE",
    "FLOW_EVENTS",
    "LLM",
    "NO_RESPONSE",
    "PER_FRAME_EVENTS",
    "PIPECAT_KINDS",
    "TRANSITION_IN_YAML",
    "TTS",
    "ActionError",
    "ActionService",
    "ActionsCompleted",
    "BotSession",
    "Branch",
    "ContextStrategy",
    "Emitter",
    "EmitterRef",
    "EndConversation",
    "Event",
    "EventError",
    "EventService",
    "EventSpec",
    "Events",
    "FlowConfig",
    "FlowError",
    "FlowInitializationError",
    "FlowManager",
    "FlowTransitionError",
    "FunctionCall",
    "FunctionConfig",
    "HandlerOutcome",
    "Info",
    "InvalidFunctionError",
    "InvalidHandlerError",
    "InvalidNodeError",
    "LLMResponse",
    "NodeConfig",
    "Retry",
    "Say",
    "ScriptedLLM",
    "SharedState",
    "SimulatedTTS",
    "Spoken",
    "StreamingLLM",
    "StreamingTTS",
    "SyncOutcome",
    "UnknownEventError",
    "WorkerFlowManager",
    "declare",
    "forward_events",
    "load_flow",
    "parse_node",
    "stop_forwarding",
]
