"""A whole bot as the README wires it: a Pipecat 1.14 pipeline (run offline: the caller's
turns pushed as VAD and STT would push them, a silent TTS service and output transport), the
flow answering its turns (`answer_user_turns`) with `OpenAILLM` (its HTTP answered in the
test), speaking through `PipelineSpeech`, its actions run by an actions worker process; the
flow's end ends the pipeline. And the README's `pipecat_call.py`, run as written."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, cast

import anyio
import msgspec
import pytest
from pipecat.frames.frames import EndFrame, Frame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_transport import BaseTransport
from pipecat.workers.runner import WorkerRunner

from bus import Bus
from flows import FlowManager
from flows.openai_llm import OpenAILLM
from flows.pipecat_offline import SilentOutput, SilentTTS
from flows.pipecat_speech import PipelineSpeech
from flows.pipecat_turns import answer_user_turns
from tests.flows.test_actions import actions as actions  # the fixture: an actions worker
from tests.flows.test_openai_llm import calls, says, served_by
from tests.flows.test_pipecat_speech import Seen
from tests.flows.test_pipecat_turns import params, say
from tests.support import wait_for
from tests.test_readme import readme_files

pytestmark = pytest.mark.anyio


async def order_pizza(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    return {"ordered": args["size"]}, GOODBYE


WELCOME = "Welcome to Pizza Palace, home of the finest pizza in town."
GREET = {
    "name": "greet",
    "task_messages": [{"role": "system", "content": "Take the caller's pizza order."}],
    "pre_actions": [{"type": "tts_say", "text": WELCOME}],
    "respond_immediately": False,  # the caller speaks first, after the welcome
    "functions": [{"name": "order_pizza", "handler": order_pizza, "description": "Order it"}],
}
GOODBYE = {
    "name": "goodbye",
    "task_messages": [{"role": "system", "content": "Confirm the order."}],
    "post_actions": [{"type": "end_conversation", "text": "Goodbye!"}],
}


def model(body: dict[str, Any]) -> dict[str, Any]:
    """The LLM: orders what the caller asked for, then confirms the result it was given."""
    last = body["messages"][-1]
    if last["role"] == "user":
        return calls(("call_1", "order_pizza", '{"size": "large"}'))(body)
    [result] = [m for m in body["messages"] if m["role"] == "tool"]
    return {"content": f"Your {json.loads(result['content'])['ordered']} pizza is on its way."}


Caller = Callable[[FlowManager, PipelineWorker, Seen], Awaitable[None]]


async def call(
    bus: Bus, caller: Caller, seconds_per_word: float = 0.02
) -> tuple[FlowManager, list[tuple[str, Any]]]:
    """Run a call until the flow ended it; `caller` initializes the flow and speaks. The flow,
    and the call's events (type, data)."""
    user = LLMContextAggregatorPair(LLMContext(), user_params=params()).user()
    speech, seen = PipelineSpeech(timeout=20), Seen()
    pipeline = Pipeline([user, SilentTTS(seconds_per_word), SilentOutput(), seen, speech])
    worker = speech.worker = PipelineWorker(pipeline, cancel_on_idle_timeout=False)
    asked: list[dict[str, Any]] = []
    llm = OpenAILLM("gpt-test", served_by(model, asked))
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.run)  # returns once the pipeline ended
            async with FlowManager.open(bus, "call-1", llm=llm, tts=speech) as flow:
                answer_user_turns(user, flow)
                await caller(flow, worker, seen)
                await flow.ended.wait()
            await worker.queue_frame(EndFrame())
    assert len(asked) == 2  # each request's context checked as the API checks it
    assert all(body["stream"] for body in asked)  # each reply spoken as it was written
    assert flow.messages[-1] == {"role": "assistant", "content": "Goodbye!"}  # spoken, then ended
    history = [(e.type, msgspec.json.decode(e.data)) for e in await bus.history("call-1")]
    entered = [d["node"] for t, d in history if t == "node.entered"]
    assert entered == ["greet", "goodbye"] and history[-1][0] == "session.ended"
    return flow, history


def heard(history: list[tuple[str, Any]]) -> list[tuple[str, str, bool]]:
    spoken = ("tts.spoken", "tts.finished")
    return [(t, d["heard"], d["interrupted"]) for t, d in history if t in spoken]


async def test_a_call_through_a_pipecat_pipeline_from_welcome_to_goodbye(actions: Bus) -> None:
    async def caller(flow: FlowManager, worker: PipelineWorker, seen: Seen) -> None:
        await flow.initialize(GREET)  # returns once the welcome was spoken
        await say(worker, "A large pizza, please")

    _, history = await call(actions, caller)
    assert heard(history) == [
        ("tts.spoken", WELCOME, False),
        ("tts.finished", "", False),  # the turn that called order_pizza said nothing
        ("tts.finished", "Your large pizza is on its way.", False),
    ]


async def test_a_caller_who_talks_over_the_welcome_cuts_it_and_is_answered(
    actions: Bus,
) -> None:
    """The interruption of a pre-action's tts_say: the flow goes on (Pipecat's own flows hang
    there, pipecat-flows#231), the context keeps what was heard of the welcome."""

    async def caller(flow: FlowManager, worker: PipelineWorker, seen: Seen) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(flow.initialize, GREET)
            await wait_for(lambda: bool(seen.words), what="the welcome's first word played")
            await say(worker, "A large pizza, please")

    flow, history = await call(actions, caller, seconds_per_word=0.2)
    [(_, cut, interrupted), *rest] = heard(history)
    assert interrupted and cut and WELCOME.startswith(cut) and cut != WELCOME
    assert rest == [
        ("tts.finished", "", False),
        ("tts.finished", "Your large pizza is on its way.", False),
    ]
    said = [(m["role"], m.get("content")) for m in flow.messages if m["role"] != "system"]
    assert said[:2] == [("assistant", cut), ("user", "A large pizza, please")]


# The README's pipecat_call.py, run as written.


class Through(FrameProcessor):
    """Passes every frame on (a stand-in transport input, and STT)."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)


class StandInTransport(BaseTransport):
    """No client: nothing comes in; the output plays silence at its pace."""

    def __init__(self) -> None:
        super().__init__()
        self._register_event_handler("on_client_disconnected")
        self._input = Through()
        self._output = SilentOutput()

    def input(self) -> FrameProcessor:
        return self._input

    def output(self) -> FrameProcessor:
        return self._output


RunCall = Callable[..., Coroutine[Any, Any, None]]


@pytest.fixture
def pipecat_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunCall:
    """The README's `run_call`, its OpenAILLM's requests answered by `says_hello`."""
    (tmp_path / "pipecat_call.py").write_text(readme_files()["pipecat_call.py"])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("flows.openai_llm.AsyncOpenAI", lambda: served_by(says(HELLO)))
    module = importlib.import_module("pipecat_call")
    monkeypatch.delitem(sys.modules, "pipecat_call")
    return cast(RunCall, module.run_call)


HELLO = "Hello! We are closed today."


async def test_the_readmes_call_runs_to_its_end_conversation(
    actions: Bus, pipecat_call: RunCall
) -> None:
    first = {
        "name": "closed",
        "task_messages": [{"role": "system", "content": "Say that we are closed."}],
        "post_actions": [{"type": "end_conversation", "text": "Goodbye!"}],
    }
    with anyio.fail_after(60):  # it returns: the flow ended, then the pipeline
        await pipecat_call(actions, "call-1", StandInTransport(), Through(), SilentTTS(0.02), first)
    history = [(e.type, msgspec.json.decode(e.data)) for e in await actions.history("call-1")]
    assert [d["heard"] for t, d in history if t == "tts.finished"] == [HELLO]
    assert history[-1][0] == "session.ended"


async def test_the_readmes_call_ends_when_the_caller_hangs_up(
    bus: Bus, pipecat_call: RunCall
) -> None:
    transport = StandInTransport()
    first = {"name": "listen", "task_messages": [], "respond_immediately": False}

    async def entered() -> bool:
        return "node.entered" in [e.type for e in await bus.history("call-1")]

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pipecat_call, bus, "call-1", transport, Through(), SilentTTS(0.02), first)
            await wait_for(entered, what="the call's first node")
            await transport._call_event_handler("on_client_disconnected", "client-1")
    [ended] = [e for e in await bus.history("call-1") if e.type == "session.ended"]
    assert msgspec.json.decode(ended.data)["reason"] == "the caller hung up"
