"""`OpenAILLM`: a `flows.LLM` on OpenAI's Chat Completions API, or any server that speaks it
(``base_url`` of the client: vLLM, Ollama, a gateway).

The `openai` package is optional (``pip install 'flowbus[openai]'``; Pipecat brings it too):
this module imports it, so `flows` does not import this module; use
``from flows.openai_llm import OpenAILLM``.

``FlowManager.messages`` is in the API's form already (a function call is the assistant's
``tool_calls`` message, then the ``tool`` message naming its id), and the node's functions are
its tools, so they are sent as they are. `stream` gives the reply as the API writes it, so
`FlowManager` speaks its first sentence while the rest is written (with a TTS that speaks a
stream: `PipelineSpeech`, `SimulatedTTS`); `generate` gives it whole.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import anyio
from openai import AsyncOpenAI

from .speech import FunctionCall, LLMResponse


class OpenAILLM:
    """Asks `model` through `client` (an ``openai.AsyncOpenAI``; one made from the
    environment's ``OPENAI_API_KEY`` and ``OPENAI_BASE_URL`` if none). `params` go into every
    request as they are (``temperature=0.2``, ``max_completion_tokens=200``...). `timeout`
    bounds each reply, the client's retries included, in seconds: a caller waits for it, so
    it is short by default (the client's own is ten minutes a try). Without
    `developer_role` (a server that has none, as Ollama, Mistral, Together), a ``developer``
    message is sent as the user's, as Pipecat sends it to such servers."""

    def __init__(
        self,
        model: str,
        client: AsyncOpenAI | None = None,
        *,
        timeout: float = 30.0,
        developer_role: bool = True,
        **params: Any,
    ) -> None:
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a finite number of seconds > 0, not {timeout!r}")
        self.model, self.timeout, self.params = model, timeout, params
        self.developer_role = developer_role
        self.client = client if client is not None else AsyncOpenAI()

    async def generate(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
    ) -> LLMResponse:
        """The complete reply to `messages`, with `tools` offered (none sent if there are
        none: the API refuses an empty list). A function call whose arguments are not a JSON
        object is a `ValueError` that names the function; no reply within `timeout`, a
        `TimeoutError`; the API's errors are the client's (``openai.APIError``)."""
        with self._within(anyio.current_time() + self.timeout):
            completion = await self._chat().completions.create(**self._request(messages, tools))
        message = completion.choices[0].message
        calls = [
            FunctionCall(call.function.name, _arguments(call.function), id=call.id)
            for call in message.tool_calls or ()
            if call.type == "function"
        ]
        return LLMResponse(text=message.content or "", function_calls=calls)

    async def stream(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
    ) -> AsyncIterator[LLMResponse]:
        """The reply, as `generate` gives it, in parts as the API writes it: each piece of its
        text as it comes, then its function calls (whose arguments come in pieces too), in
        one part. `timeout` bounds the whole reply; the response is closed if it is cut
        short (an interruption)."""
        deadline = anyio.current_time() + self.timeout
        request = self._request(messages, tools) | {"stream": True}
        with self._within(deadline):
            chunks = await self._chat().completions.create(**request)
        calls: dict[int, _Call] = {}
        async with chunks:
            while True:
                with self._within(deadline):
                    chunk = await anext(chunks, None)
                if chunk is None:
                    break
                for choice in chunk.choices:  # (one, as no `n` is asked for)
                    if choice.delta.content:
                        yield LLMResponse(text=choice.delta.content)
                    for piece in choice.delta.tool_calls or ():
                        calls.setdefault(_call_index(piece, calls), _Call()).add(piece)
        if calls:
            made = [c.function_call() for _, c in sorted(calls.items()) if c.type == "function"]
            yield LLMResponse(function_calls=made)

    def _request(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        if not self.developer_role:
            messages = [
                {**m, "role": "user"} if m.get("role") == "developer" else m for m in messages
            ]
        request = {**self.params, "model": self.model, "messages": list(messages)}
        if tools:
            request["tools"] = list(tools)
        return request

    def _chat(self) -> Any:
        return self.client.chat  # (its `create` overloads do not type a built request)

    @contextmanager
    def _within(self, deadline: float) -> Iterator[None]:
        try:
            with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                yield
        except TimeoutError:
            raise TimeoutError(f"{self.model} gave no reply in {self.timeout} s") from None


def _call_index(piece: Any, calls: dict[int, _Call]) -> int:
    """Which call a streamed piece of a function call belongs to: its `index`; from a server
    that gives none, a new call for a piece with an id, else the last call."""
    if piece.index is not None:
        return int(piece.index)
    return len(calls) if piece.id or not calls else len(calls) - 1


class _Call:
    """A function call whose pieces come in a stream: its id, name and type in the first,
    its arguments in pieces."""

    def __init__(self) -> None:
        self.id = self.name = self.arguments = ""
        self.type = "function"

    def add(self, piece: Any) -> None:
        self.id = piece.id or self.id
        self.type = piece.type or self.type
        if piece.function is not None:
            self.name = piece.function.name or self.name
            self.arguments += piece.function.arguments or ""

    def function_call(self) -> FunctionCall:
        return FunctionCall(self.name, _arguments(self), id=self.id)


def _arguments(function: Any) -> dict[str, Any]:
    try:
        arguments = json.loads(function.arguments or "{}")
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise ValueError(
            f"the LLM called {function.name!r} with arguments that are not a JSON object: "
            f"{function.arguments!r}"
        )
    return arguments
