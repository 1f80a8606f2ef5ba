"""A whole bot as the README wires it: a Pipecat 1.14 pipeline (run offline: the caller's
turns pushed as VAD and STT would push them, a silent TTS service and output transport), the
flow answering its turns (`answer_user_turns`) with `OpenAILLM` (its HTTP answered in the
test), speaking through `PipelineSpeech`, its actions run by an actions worker process; the
flow's end ends the pipeline."""

from __future__ import annotations

import json
from typing import Any

import anyio
import msgspec
import pytest
from pipecat.frames.frames import EndFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.transports.base_transport import TransportParams
from pipecat.workers.runner import WorkerRunner

from bus import Bus
from flows import FlowManager
from flows.openai_llm import OpenAILLM
from flows.pipecat_speech import PipelineSpeech
from flows.pipecat_turns import answer_user_turns
from tests.flows.test_actions import actions as actions  # the fixture: an actions worker
from tests.flows.test_openai_llm import calls, served_by
from tests.flows.test_pipecat_speech import RATE, SilentOutput, SilentTTS
from tests.flows.test_pipecat_turns import params, say

pytestmark = pytest.mark.anyio


async def order_pizza(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    return {"ordered": args["size"]}, GOODBYE


GREET = {
    "name": "greet",
    "task_messages": [{"role": "system", "content": "Take the caller's pizza order."}],
    "pre_actions": [{"type": "tts_say", "text": "Welcome to Pizza Palace."}],
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


async def test_a_call_through_a_pipecat_pipeline_from_welcome_to_goodbye(actions: Bus) -> None:
    user = LLMContextAggregatorPair(LLMContext(), user_params=params()).user()
    speech = PipelineSpeech(timeout=20)
    output = SilentOutput(TransportParams(audio_out_enabled=True, audio_out_sample_rate=RATE))
    pipeline = Pipeline([user, SilentTTS(seconds_per_word=0.02), output, speech])
    worker = speech.worker = PipelineWorker(pipeline, cancel_on_idle_timeout=False)
    asked: list[dict[str, Any]] = []
    llm = OpenAILLM("gpt-test", served_by(model, asked))
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.run)  # returns once the pipeline ended
            async with FlowManager.open(actions, "call-1", llm=llm, tts=speech) as flow:
                answer_user_turns(user, flow)
                await flow.initialize(GREET)  # returns once the welcome was spoken
                await say(worker, "A large pizza, please")
                await flow.ended.wait()
            await worker.queue_frame(EndFrame())
    history = [(e.type, msgspec.json.decode(e.data)) for e in await actions.history("call-1")]
    heard = [(t, d["heard"]) for t, d in history if t in ("tts.spoken", "tts.finished")]
    assert heard == [
        ("tts.spoken", "Welcome to Pizza Palace."),
        ("tts.finished", ""),  # the turn that called order_pizza said nothing
        ("tts.finished", "Your large pizza is on its way."),
    ]
    assert flow.messages[-1] == {"role": "assistant", "content": "Goodbye!"}  # spoken, then ended
    entered = [d["node"] for t, d in history if t == "node.entered"]
    assert entered == ["greet", "goodbye"] and history[-1][0] == "session.ended"
    assert len(asked) == 2  # each request's context checked as the API checks it
