"""The LLM context of a call, as Pipecat's holds it, and how entering a node changes it
(`ContextStrategy`: append, reset, or reset with the LLM's summary of what came before)."""

from __future__ import annotations

from typing import Any

import anyio
import structlog

from .config import ContextStrategy, NodeConfig
from .speech import CURRENT_NODE, LLM

log = structlog.get_logger("flowbus.flow")

#: How long a RESET_WITH_SUMMARY waits for the LLM's summary (Pipecat's 5 s).
SUMMARY_SECONDS = 5.0


class LLMContext:
    """A call's LLM context, in OpenAI's chat form as Pipecat's context holds it (a function
    call is the assistant's ``tool_calls`` message, then the ``tool`` message with its result
    as JSON), and the role message given before it (`role_message` of the last node that set
    one). `strategy` and `summary_prompt` are for the nodes that set none."""

    def __init__(self, strategy: ContextStrategy, summary_prompt: str | None) -> None:
        self.strategy, self.summary_prompt = strategy, summary_prompt
        self.messages: list[dict[str, Any]] = []
        self.role_message: str | None = None

    async def summary(self, node: NodeConfig, llm: LLM, session: str) -> str | None:
        """For a node that resets the context with a summary, the LLM's summary of the context
        so far, asked for as Pipecat asks (its reply in `CURRENT_NODE` ``NODE/summary``, within
        `SUMMARY_SECONDS`); None otherwise, or if there is none (the context is kept then)."""
        strategy = node.context_strategy or self.strategy
        if strategy is not ContextStrategy.RESET_WITH_SUMMARY or not self.messages:
            return None
        prompt = node.summary_prompt if node.context_strategy else self.summary_prompt
        asked: list[dict[str, Any]] = [
            {"role": "system", "content": prompt},
            {"role": "developer", "content": f"Conversation history: {self.messages}"},
        ]
        summary: str | None = None
        token = CURRENT_NODE.set(f"{node.name}/summary")
        try:
            with anyio.move_on_after(SUMMARY_SECONDS):
                summary = (await llm.generate(asked, [])).text
        except Exception as exc:
            log.error("summary_failed", session=session, error=str(exc))
        finally:
            CURRENT_NODE.reset(token)
        if not summary:
            log.warning("summary_missing", session=session, node=node.name)
        return summary or None

    def enter(self, node: NodeConfig, summary: str | None = None) -> None:
        """The node's messages into the context (after a reset, alone, or after the summary
        of a RESET_WITH_SUMMARY, which keeps the context if it has none, as Pipecat does); its
        role message, if it has one, replaces the one before, which is kept across nodes as in
        Pipecat (an instruction of the LLM's, not a message of the context)."""
        strategy = node.context_strategy or self.strategy
        if strategy is ContextStrategy.RESET:
            self.messages = []
        elif strategy is ContextStrategy.RESET_WITH_SUMMARY and summary is not None:
            said = f"Here's a summary of the conversation:\n{summary}"
            self.messages = [{"role": "developer", "content": said}]
        if node.role_message:
            self.role_message = node.role_message
        self.messages.extend(node.role_messages)
        self.messages.extend(node.task_messages)

    def for_llm(self) -> list[dict[str, Any]]:
        """What the LLM is given: the role message first, then the context."""
        role = [{"role": "system", "content": self.role_message}] if self.role_message else []
        return [*role, *self.messages]

    def keep_heard(self, text: str) -> None:
        """What the caller heard the bot say goes into the LLM's context (if it heard any)."""
        if text:
            self.messages.append({"role": "assistant", "content": text})
