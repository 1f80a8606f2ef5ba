"""OpenAILLM: the real `openai` client, its HTTP answered here as OpenAI's Chat Completions
API answers (no account and no network in the tests), checked as that API checks a request."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing
from typing import Any

import anyio
import httpx2
import pytest
from openai import AsyncOpenAI

from bus import Bus
from flows import FlowManager, FunctionCall, LLMResponse, SimulatedTTS
from flows.openai_llm import OpenAILLM
from tests.flows.test_actions import node
from tests.support import ROOT, wait_for

pytestmark = pytest.mark.anyio

Model = Callable[[dict[str, Any]], dict[str, Any]]  # a request's body -> the reply's message


def served_by(model: Model, asked: list[dict[str, Any]] | None = None) -> AsyncOpenAI:
    """A client whose requests `model` answers (streamed, as the API streams, if asked);
    each request's body goes into `asked`."""

    async def answer(request: httpx2.Request) -> httpx2.Response:
        assert request.url.path == "/v1/chat/completions"
        body = json.loads(request.content)
        check_context(body["messages"])
        (asked if asked is not None else []).append(body)
        reply = {"role": "assistant", "content": None} | model(body)
        if body.get("stream"):
            return httpx2.Response(200, text=streamed(reply), headers=SSE)
        choice = {"index": 0, "finish_reason": "stop", "message": reply}
        completion = {"id": "c-1", "object": "chat.completion", "created": 0, "model": "m"}
        return httpx2.Response(200, json=completion | {"choices": [choice]})

    transport = httpx2.MockTransport(answer)
    http = httpx2.AsyncClient(transport=transport)
    return AsyncOpenAI(api_key="sk-test", base_url="http://llm.test/v1", http_client=http)


SSE = {"content-type": "text/event-stream"}


def streamed(reply: dict[str, Any], *, indexed: bool = True) -> str:
    """`reply` as the API streams it: server-sent chunks, its text a word each, each function
    call's id and name first, then its arguments in two pieces (each piece with the call's
    `index`, unless not `indexed`, as some servers send them); a last chunk with no choice
    (the usage), then ``[DONE]``."""
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    deltas += [{"content": word} for word in re.findall(r"\S+\s*", reply["content"] or "")]
    for i, call in enumerate(reply.get("tool_calls") or ()):
        named = {"name": call["function"]["name"], "arguments": ""}
        index = {"index": i} if indexed else {}
        first = {"id": call["id"], "type": "function", "function": named}
        deltas.append({"tool_calls": [index | first]})
        arguments = call["function"]["arguments"]
        for piece in (arguments[:3], arguments[3:]):
            deltas.append({"tool_calls": [index | {"function": {"arguments": piece}}]})
    chunk = {"id": "c-1", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    events = [chunk | {"choices": [{"index": 0, "delta": d}]} for d in deltas]
    events.append(
        chunk
        | {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    )
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def check_context(messages: Sequence[Mapping[str, Any]]) -> None:
    """What the API refuses: a tool message that answers no call of the assistant message
    before it, a call left unanswered, a tool result that is not a string."""
    unanswered: set[str] = set()
    for message in messages:
        if message["role"] == "tool":
            assert message["tool_call_id"] in unanswered, f"answers no call: {message}"
            assert isinstance(message["content"], str)
            unanswered.remove(message["tool_call_id"])
            continue
        assert not unanswered, f"calls {unanswered} unanswered before {message}"
        if message["role"] == "assistant" and message.get("tool_calls"):
            unanswered = {call["id"] for call in message["tool_calls"]}
    assert not unanswered, f"calls {unanswered} unanswered"


def says(text: str) -> Model:
    return lambda body: {"content": text}


def calls(*calls: tuple[str, str, str]) -> Model:
    """A reply that calls functions: (id, name, arguments as sent)."""
    made = [
        {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in calls
    ]
    return lambda body: {"tool_calls": made}


TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


async def test_a_text_reply_with_no_tools_offered_sends_none_and_the_params() -> None:
    asked: list[dict[str, Any]] = []
    llm = OpenAILLM("gpt-test", served_by(says("Hello!"), asked), temperature=0.2)
    messages = [{"role": "system", "content": "Greet."}, {"role": "user", "content": "Hi"}]
    assert await llm.generate(messages, []) == LLMResponse(text="Hello!")
    assert asked == [{"model": "gpt-test", "messages": messages, "temperature": 0.2}]


async def test_function_calls_come_with_their_ids_and_arguments() -> None:
    asked: list[dict[str, Any]] = []
    model = calls(("call_1", "lookup", '{"order": "A1"}'), ("call_2", "lookup", ""))
    reply = await OpenAILLM("gpt-test", served_by(model, asked)).generate([], [TOOL])
    assert asked[0]["tools"] == [TOOL]
    assert reply == LLMResponse(
        function_calls=[
            FunctionCall("lookup", {"order": "A1"}, id="call_1"),
            FunctionCall("lookup", {}, id="call_2"),
        ]
    )


async def test_a_streamed_reply_comes_in_its_pieces_then_its_calls_whole() -> None:
    asked: list[dict[str, Any]] = []

    def model(body: dict[str, Any]) -> dict[str, Any]:
        made = calls(("call_1", "lookup", '{"order": "A1"}'), ("call_2", "lookup", ""))(body)
        return made | {"content": "Let me look. One moment."}

    llm = OpenAILLM("gpt-test", served_by(model, asked), temperature=0.2)
    parts = [part async for part in llm.stream([{"role": "user", "content": "Hi"}], [TOOL])]
    assert asked[0]["stream"] is True and asked[0]["temperature"] == 0.2
    assert [p.text for p in parts] == ["Let ", "me ", "look. ", "One ", "moment.", ""]
    assert parts[-1].function_calls == [
        FunctionCall("lookup", {"order": "A1"}, id="call_1"),
        FunctionCall("lookup", {}, id="call_2"),
    ]
    assert sum(bool(p.function_calls) for p in parts) == 1


async def test_streamed_calls_without_an_index_are_told_apart_by_their_ids() -> None:
    """As some servers that speak the API stream them: no `index` in a call's pieces."""
    made = calls(("call_1", "lookup", '{"order": "A1"}'), ("call_2", "lookup", "{}"))({})
    body = streamed({"content": None} | made, indexed=False)

    async def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, text=body, headers=SSE)

    http = httpx2.AsyncClient(transport=httpx2.MockTransport(answer))
    client = AsyncOpenAI(api_key="sk-test", base_url="http://llm.test/v1", http_client=http)
    [part] = [p async for p in OpenAILLM("m", client).stream([], [TOOL])]
    assert part.function_calls == [
        FunctionCall("lookup", {"order": "A1"}, id="call_1"),
        FunctionCall("lookup", {}, id="call_2"),
    ]


async def test_a_streamed_calls_arguments_that_are_no_json_object_are_an_error() -> None:
    llm = OpenAILLM("gpt-test", served_by(calls(("call_1", "lookup", '{"order": '))))
    with pytest.raises(ValueError, match="'lookup' with arguments that are not a JSON object"):
        [part async for part in llm.stream([], [TOOL])]


def stalling(first: str, closed: anyio.Event) -> AsyncOpenAI:
    """A client whose streamed reply sends `first` and then nothing more; `closed` is set
    when the client closes the response."""

    class Body(httpx2.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield streamed({"content": first}).split("data: [DONE]")[0].encode()
            await anyio.sleep_forever()

        async def aclose(self) -> None:
            closed.set()

    async def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers=SSE, stream=Body())

    http = httpx2.AsyncClient(transport=httpx2.MockTransport(answer))
    return AsyncOpenAI(api_key="sk-test", base_url="http://llm.test/v1", http_client=http)


async def test_a_stream_that_stalls_is_an_error_at_the_timeout_naming_the_model() -> None:
    closed = anyio.Event()
    llm = OpenAILLM("gpt-test", stalling("Hello", closed), timeout=0.2)
    parts = llm.stream([], [])
    assert (await anext(parts)).text == "Hello"  # what came in time came
    with pytest.raises(TimeoutError, match=r"gpt-test gave no reply in 0\.2 s"):
        await anext(parts)
    assert closed.is_set()


async def test_a_stream_cut_short_closes_its_response() -> None:
    """As `FlowManager` cuts it when the caller speaks up: the response is not left open."""
    closed = anyio.Event()
    parts = OpenAILLM("gpt-test", stalling("Hello", closed)).stream([], [])
    async with aclosing(parts):  # type: ignore[type-var]  # (an async generator's)
        async for part in parts:
            if part.text:
                break
    with anyio.fail_after(10):
        await closed.wait()


async def test_an_interrupt_closes_the_response_of_the_reply_being_streamed(bus: Bus) -> None:
    closed = anyio.Event()
    llm = OpenAILLM("gpt-test", stalling("Hello. So, ", closed))  # "Hello." complete
    tts = SimulatedTTS(0)
    async with FlowManager.open(bus, "call-1", llm=llm, tts=tts) as fm:
        await fm.initialize(node("a", respond_immediately=False))
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(fm.respond, "Hi")
                await wait_for(lambda: tts.spoken == ["Hello."], what="the first sentence")
                fm.interrupt()
            await closed.wait()
    assert fm.messages[-1] == {"role": "assistant", "content": "Hello. So,"}  # all written


@pytest.mark.parametrize("developer_role", [True, False])
async def test_a_developer_message_goes_as_the_users_to_a_server_without_the_role(
    developer_role: bool,
) -> None:
    asked: list[dict[str, Any]] = []
    client = served_by(says("Noted."), asked)
    summary = {"role": "developer", "content": "Here's a summary of the conversation: ..."}
    messages = [{"role": "system", "content": "Help."}, summary]
    await OpenAILLM("m", client, developer_role=developer_role).generate(messages, [])
    sent = [m["role"] for m in asked[0]["messages"]]
    assert sent == ["system", "developer" if developer_role else "user"]
    assert messages[1] is summary and summary["role"] == "developer"  # not changed


@pytest.mark.parametrize("arguments", ['{"order": ', '["A1"]'])
async def test_arguments_that_are_no_json_object_are_an_error_naming_the_function(
    arguments: str,
) -> None:
    llm = OpenAILLM("gpt-test", served_by(calls(("call_1", "lookup", arguments))))
    with pytest.raises(ValueError, match="'lookup' with arguments that are not a JSON object"):
        await llm.generate([], [TOOL])


async def test_no_reply_within_the_timeout_is_an_error_naming_the_model() -> None:
    async def never(request: httpx2.Request) -> httpx2.Response:
        await anyio.sleep_forever()
        raise AssertionError

    http = httpx2.AsyncClient(transport=httpx2.MockTransport(never))
    client = AsyncOpenAI(api_key="sk-test", base_url="http://llm.test/v1", http_client=http)
    with pytest.raises(TimeoutError, match=r"gpt-test gave no reply in 0\.05 s"):
        await OpenAILLM("gpt-test", client, timeout=0.05).generate([], [])


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan")])
def test_the_timeout_must_be_finite_and_positive(timeout: float) -> None:
    with pytest.raises(ValueError, match="finite number of seconds > 0"):
        OpenAILLM("gpt-test", served_by(says("")), timeout=timeout)


def test_flows_imports_without_openai_and_does_not_import_openai_llm() -> None:
    code = (
        "import sys; sys.modules['openai'] = None; import flows; "
        "assert 'flows.openai_llm' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.parametrize("streamed", [True, False])
async def test_a_flow_calls_a_function_and_answers_with_its_result_through_the_api(
    bus: Bus, streamed: bool
) -> None:
    """The context FlowManager sends after a function call is one the API takes (checked as
    it checks it), and the LLM is given the result under the call's id; with the reply
    streamed, or whole (a TTS that cannot speak a stream)."""

    def model(body: dict[str, Any]) -> dict[str, Any]:
        last = body["messages"][-1]
        if last["role"] != "tool":
            return calls(("call_9", "lookup", '{"order": "A1"}'))(body)
        assert last["tool_call_id"] == "call_9"
        return {"content": f"It arrives in {json.loads(last['content'])['eta']}."}

    async def lookup(args: dict[str, Any]) -> dict[str, Any]:
        return {"eta": "5 min", "order": args["order"]}

    asked: list[dict[str, Any]] = []
    llm = OpenAILLM("gpt-test", served_by(model, asked))
    functions = [{"name": "lookup", "handler": lookup, "description": "An order's arrival"}]
    tts = SimulatedTTS(0)
    if not streamed:
        tts.speak_stream = None  # type: ignore[assignment,method-assign]
    async with FlowManager.open(bus, "call-1", llm=llm, tts=tts) as fm:
        await fm.initialize(node("track", functions=functions))
    assert [m.get("content") for m in fm.messages][-1] == "It arrives in 5 min."
    assert [b.get("stream", False) for b in asked] == [streamed, streamed]
    assert [t["function"]["name"] for t in asked[0]["tools"]] == ["lookup"]
    assert len(asked) == 2
