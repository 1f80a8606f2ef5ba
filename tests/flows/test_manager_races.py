"""The bot's `FlowManager` when things happen at once: an end while a turn or a node entry is
on its way, two node entries, the caller speaking during a node's pre-actions, the shared state
written while it is read; and Pipecat 1.14's function forms in detail."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, TypedDict

import anyio
import msgspec
import pytest

from bus import Bus
from flows import (
    ActionError,
    EndConversation,
    FlowInitializationError,
    FlowManager,
    FunctionCall,
    LLMResponse,
    ScriptedLLM,
    SharedState,
    SimulatedTTS,
)
from flows.config import parse_node
from tests.flows.test_actions import actions, before, call, node, note, say, timeline  # noqa: F401
from tests.support import wait_for

pytestmark = pytest.mark.anyio


async def test_an_end_conversation_during_a_second_llm_turn_ends_the_call_quietly(
    actions: Bus,  # noqa: F811
) -> None:
    """A function that stays gives the LLM a second turn; meanwhile the node's post-action
    ends the call. The turn's reply is not published into the ended session."""

    async def stay(args: dict[str, Any]) -> Any:
        return {"ok": True}

    script = {"a": [LLMResponse(function_calls=[FunctionCall("stay")]), LLMResponse(text="Sure")]}
    async with call(actions, "call-1", script) as fm:
        assert isinstance(fm.llm, ScriptedLLM)
        llm, generate = fm.llm, fm.llm.generate

        async def slow(messages: Any, tools: Any) -> Any:
            if len(llm.calls) == 1:  # the second turn: the LLM takes a while
                await fm.ended.wait()
            return await generate(messages, tools)

        llm.generate = slow  # type: ignore[method-assign]
        end = {"type": "end_conversation"}
        await fm.initialize(node("a", post=[end], functions=[{"name": "stay", "handler": stay}]))
    assert fm.ended.is_set()
    assert [e.type for e in await actions.history("call-1")][-1] == "session.ended"


async def test_an_end_while_a_node_is_being_entered_leaves_the_node_unentered(bus: Bus) -> None:
    async with FlowManager.open(bus, "call-1", llm=ScriptedLLM({}), tts=SimulatedTTS(0)) as fm:
        await fm.initialize(node("a", respond_immediately=False))
        read, reading = fm._read_state, anyio.Event()

        async def slow_read() -> Any:
            reading.set()
            await fm.ended.wait()  # the end comes while the state is read
            return await read()

        fm._read_state = slow_read  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:
            tg.start_soon(fm.set_node_from_config, node("b", respond_immediately=False))
            await reading.wait()
            await bus.send("call-1", EndConversation(text=""))
    assert fm.current_node == "a"
    assert [e.type for e in await bus.history("call-1")][-1] == "session.ended"


async def test_a_node_entry_overtaken_while_it_reads_the_state_publishes_nothing(
    bus: Bus,
) -> None:
    """Of two node entries at once, one that the later one overtook while it read the shared
    state stops there: its ``node.entered`` is never published (the actions service would run
    the pre-actions of a node the bot is not in)."""
    async with FlowManager.open(bus, "call-1", llm=ScriptedLLM({}), tts=SimulatedTTS(0)) as fm:
        await fm.initialize(node("a", respond_immediately=False))
        read, reading, overtaken = fm._read_state, anyio.Event(), anyio.Event()

        async def slow_read() -> Any:
            if not reading.is_set():  # the first entry's read answers after the second entry
                reading.set()
                await overtaken.wait()
            return await read()

        fm._read_state = slow_read  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:
            tg.start_soon(fm.set_node_from_config, node("b", respond_immediately=False))
            await reading.wait()
            await fm.set_node_from_config(node("c", respond_immediately=False))
            overtaken.set()
    assert fm.current_node == "c"
    history = await bus.history("call-1")
    entered = [msgspec.json.decode(e.data)["node"] for e in history if e.type == "node.entered"]
    assert entered == ["a", "c"]


async def test_a_function_that_enters_a_node_itself_ends_the_turns_of_the_node_it_left(
    bus: Bus,
) -> None:
    """A handler that enters a node itself (as Pipecat's dynamic flows did before handlers
    returned their next node) and returns no node: the LLM gets no further turn in the node
    the bot left."""

    async def move(args: dict[str, Any], flow_manager: FlowManager) -> Any:
        await flow_manager.set_node_from_config(node("b", respond_immediately=False))
        return {"moved": True}

    turns = [LLMResponse(function_calls=[FunctionCall("move")]), LLMResponse(text="Still in a")]
    llm = ScriptedLLM({"a": turns})
    async with FlowManager.open(bus, "call-1", llm=llm, tts=SimulatedTTS(0)) as fm:
        await fm.initialize(node("a", functions=[{"name": "move", "handler": move}]))
    assert fm.current_node == "b"
    history = await bus.history("call-1")
    assert [msgspec.json.decode(e.data)["node"] for e in history if e.type == "llm.completed"] == [
        "a"
    ]


async def test_an_end_conversation_replaced_in_the_bot_still_ends_the_list(
    actions: Bus,  # noqa: F811
) -> None:
    ran: list[str] = []

    async def hang_up(action: dict[str, Any], flow_manager: Any) -> None:
        ran.append("hung up")

    async with call(actions, "call-1", {"a": [LLMResponse(text="hi")]}) as fm:
        fm.register_action("end_conversation", hang_up)
        await fm.initialize(node("a", pre=[{"type": "end_conversation"}, note("AFTER")]))
    assert ran == ["hung up"]
    assert "action.started:AFTER" not in await timeline(actions, "call-1")


async def test_a_plain_function_past_its_timeout_gives_the_llm_an_error(bus: Bus) -> None:
    """Its thread cannot be stopped: it counts as timed out once it returns."""

    def slow(args: dict[str, Any]) -> Any:
        time.sleep(0.6)  # blocking work
        return {"late": True}

    script = {"a": [LLMResponse(function_calls=[FunctionCall("slow")]), LLMResponse(text="ok")]}
    async with FlowManager.open(
        bus, "call-1", llm=ScriptedLLM(script), tts=SimulatedTTS(0), function_timeout=0.2
    ) as fm:
        await fm.initialize(node("a", functions=[{"name": "slow", "handler": slow}]))
    results = [json.loads(m["content"]) for m in fm.messages if m["role"] == "tool"]
    assert results == [{"status": "error", "error": "timed out after 0.2s"}]


async def test_a_reply_during_a_nodes_pre_actions_belongs_to_the_node_before(
    actions: Bus,  # noqa: F811
) -> None:
    """The caller speaks while node b's pre-actions run: that turn is node a's, so it does not
    start b's post-actions before b's own reply."""
    phrase = "Please hold on while I look this up for you."
    script = {"a": [LLMResponse(text="old node reply")], "b": [LLMResponse(text="b reply")]}
    async with call(actions, "call-1", script, tts=SimulatedTTS(0.02)) as fm:
        await fm.initialize(node("a", respond_immediately=False))
        async with anyio.create_task_group() as tg:
            b = node("b", pre=[say(phrase), note("PRE")], post=[note("POST")])
            tg.start_soon(fm.set_node_from_config, b)

            async def speaking() -> bool:
                return f"tts.started:{phrase}" in await timeline(actions, "call-1")

            await wait_for(speaking, what="b's pre-action to speak")
            await fm.respond("hello?")

        async def post_ran() -> bool:
            return "action.finished:POST" in await timeline(actions, "call-1")

        await wait_for(post_ran, what="b's post-action")
    events = await timeline(actions, "call-1")
    assert before(events, "tts.finished:b reply", "action.started:POST"), events


async def test_of_two_node_entries_at_once_the_later_one_wins(actions: Bus) -> None:  # noqa: F811
    async with call(actions, "call-1", {}, wait=3) as fm:
        await fm.initialize(node("a", respond_immediately=False))
        services, asked, later_done = actions.services, anyio.Event(), anyio.Event()

        async def slow_services(*args: Any, **kwargs: Any) -> Any:
            if not asked.is_set():  # the first entry's look-up answers after the second entry
                asked.set()
                await later_done.wait()
            return await services(*args, **kwargs)

        actions.services = slow_services  # type: ignore[method-assign]
        errors: list[BaseException] = []

        async def enter(n: dict[str, Any], done: anyio.Event | None = None) -> None:
            try:
                await fm.set_node_from_config(n)
            except Exception as exc:
                errors.append(exc)
            finally:
                if done is not None:
                    done.set()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(enter, node("x", pre=[note("X")], respond_immediately=False))
                await asked.wait()
                y = node("y", pre=[note("Y")], respond_immediately=False)
                tg.start_soon(enter, y, later_done)
    assert fm.current_node == "y" and errors == []


class Address(TypedDict):
    street: str
    city: str


def test_a_direct_functions_description_stops_at_its_first_section() -> None:
    async def f(flow_manager: Any, to: Address) -> Any:
        """Only a description.

        Returns:
            something
        """

    [fn] = parse_node({"task_messages": [], "functions": [f]}).functions
    assert fn.description == "Only a description."
    assert fn.properties["to"] == {
        "type": "object",
        "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
        "required": ["city", "street"],
    }


async def test_a_change_made_while_the_state_is_read_is_kept() -> None:
    stored: dict[str, bytes] = {}
    state, reading, changed = SharedState(), anyio.Event(), anyio.Event()

    async def read() -> dict[str, bytes]:
        reading.set()
        await changed.wait()  # the read's round trip
        return dict(stored)

    async def write(fields: Any) -> None:
        stored.update(fields)

    async with anyio.create_task_group() as tg:
        tg.start_soon(state.load, read)  # one task of the bot reads the state
        await reading.wait()
        state["paid"] = True  # and meanwhile another sets a key
        changed.set()
    await state.flush(write)
    assert stored == {"flow.paid": b"true"}


async def test_a_functions_own_timeout_is_its_handlers_limit(bus: Bus) -> None:
    @dataclass
    class FlowsFunctionSchema:  # Pipecat 1.14's fields
        name: str
        description: str
        properties: dict[str, Any]
        required: list[str]
        handler: Any
        cancel_on_interruption: bool = False
        timeout_secs: float | None = None

    async def lookup(args: dict[str, Any]) -> Any:
        await anyio.sleep(0.5)  # a slow lookup
        return {"found": True}, None

    schema = FlowsFunctionSchema("lookup", "", {}, [], lookup, timeout_secs=5)
    script = {"a": [LLMResponse(function_calls=[FunctionCall("lookup")]), LLMResponse(text="ok")]}
    async with FlowManager.open(
        bus, "call-1", llm=ScriptedLLM(script), tts=SimulatedTTS(0), function_timeout=0.2
    ) as fm:
        await fm.initialize(node("a", functions=[schema]))
    assert [json.loads(m["content"]) for m in fm.messages if m["role"] == "tool"] == [
        {"found": True}
    ]


async def test_a_failed_node_entry_does_not_stop_later_transitions(bus: Bus) -> None:
    """Node c's entry fails (no actions service): the call stays in a, whose function to b
    still moves it there."""
    b = node("b", respond_immediately=False)

    async def go(args: dict[str, Any]) -> Any:
        return {"ok": True}, b

    script = {"a": [LLMResponse(function_calls=[FunctionCall("go")])]}
    async with FlowManager.open(
        bus, "call-1", llm=ScriptedLLM(script), tts=SimulatedTTS(0), actions_timeout=1
    ) as fm:
        functions = [{"name": "go", "handler": go}]
        await fm.initialize(node("a", respond_immediately=False, functions=functions))
        with pytest.raises(ActionError, match="no 'actions' service is running"):
            await fm.set_node_from_config(node("c", pre=[note("C")]))
        await fm.respond("take me to b")
        assert fm.current_node == "b"


async def test_a_key_set_and_flushed_while_the_state_is_read_stays() -> None:
    stored: dict[str, bytes] = {"flow.gone": b"1"}
    state, reading, flushed = SharedState(), anyio.Event(), anyio.Event()
    await state.load(lambda: _copy(stored))

    async def read() -> dict[str, bytes]:
        snapshot = dict(stored)  # the read's reply is made now ...
        reading.set()
        await flushed.wait()  # ... and comes after the flush below
        return snapshot

    async def write(fields: Any) -> None:
        stored.update(fields)

    async with anyio.create_task_group() as tg:
        tg.start_soon(state.load, read)
        await reading.wait()
        state["paid"] = True
        del state["gone"]
        await state.flush(write)
        flushed.set()
    assert dict(state) == {"paid": True}


async def _copy(stored: dict[str, bytes]) -> dict[str, bytes]:
    return dict(stored)


@pytest.mark.parametrize("streamed", [True, False])
async def test_an_interrupt_drops_the_reply_being_generated_and_keeps_the_users_words(
    bus: Bus, streamed: bool
) -> None:
    asked = anyio.Event()

    class Gated(ScriptedLLM):
        async def generate(self, messages: Any, tools: Any) -> LLMResponse:
            if not asked.is_set():  # the first reply never comes: the caller speaks up
                asked.set()
                await anyio.sleep_forever()
            return await super().generate(messages, tools)

    llm = Gated({"a": [LLMResponse(text="Friday it is.")]})
    if not streamed:
        llm.stream = None  # type: ignore[assignment,method-assign]  # whole replies
    async with FlowManager.open(bus, "call-1", llm=llm, tts=SimulatedTTS(0)) as fm:
        await fm.initialize(node("a", respond_immediately=False))
        fm.interrupt()  # nothing being generated: nothing to drop, nothing left to drop later
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(fm.respond, "Book a table")
                await asked.wait()
                fm.interrupt()  # the respond returns: the task group exits
        assert "llm.completed" not in [e.type for e in await bus.history("call-1")]
        await fm.respond("for Friday")
    completed = [e for e in await bus.history("call-1") if e.type == "llm.completed"]
    assert [msgspec.json.decode(e.data)["text"] for e in completed] == ["Friday it is."]
    assert [(m["role"], m["content"]) for m in fm.messages if m["role"] != "system"] == [
        ("user", "Book a table"),
        ("user", "for Friday"),
        ("assistant", "Friday it is."),
    ]


@pytest.mark.parametrize("after_a_failure", [False, True])
async def test_words_said_while_the_first_node_is_entered_are_answered_in_it(
    actions: Bus,  # noqa: F811
    after_a_failure: bool,
) -> None:
    """The caller speaks during the first node's pre-actions (its welcome): no node is
    entered yet, so the respond waits for the entry, then answers in that node. After an
    initialize that failed (an action the service does not know), it waits for the next one,
    not for the failed one's return."""
    holding, release = anyio.Event(), anyio.Event()

    async def hold(action: dict[str, Any]) -> None:
        holding.set()
        await release.wait()

    llm = ScriptedLLM({"a": [LLMResponse(text="Sure, which size?")]})
    async with FlowManager.open(actions, "call-1", llm=llm, tts=SimulatedTTS(0)) as fm:
        fm.register_action("hold", hold)
        if after_a_failure:
            with pytest.raises(FlowInitializationError):
                await fm.initialize(node("a", pre=[{"type": "unknown"}]))
        first = node("a", pre=[{"type": "hold"}], respond_immediately=False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(fm.initialize, first)
            await holding.wait()
            tg.start_soon(fm.respond, "A pizza, please")
            await anyio.wait_all_tasks_blocked()  # the respond is waiting, not failed
            release.set()
    assert llm.calls == ["a"]
    assert [(m["role"], m["content"]) for m in fm.messages if m["role"] != "system"] == [
        ("user", "A pizza, please"),
        ("assistant", "Sure, which size?"),
    ]


async def test_an_interrupt_cancels_a_function_call_that_is_cancel_on_interruption(
    bus: Bus,
) -> None:
    """As Pipecat: its handler is cancelled, the LLM gets "CANCELLED", no transition, no LLM
    turn for it. A function without the option runs to its end."""
    running, finish = anyio.Event(), anyio.Event()

    async def lookup(args: dict[str, Any]) -> Any:
        running.set()
        await anyio.sleep_forever()

    async def book(args: dict[str, Any]) -> Any:
        running.set()
        await finish.wait()
        return {"booked": True}, node("b", respond_immediately=False)

    functions = [
        {"name": "lookup", "handler": lookup, "cancel_on_interruption": True},
        {"name": "book", "handler": book},
    ]
    calls = [LLMResponse(function_calls=[FunctionCall("lookup", id="c1")])]
    calls.append(LLMResponse(function_calls=[FunctionCall("book", id="c2")]))
    llm = ScriptedLLM({"a": calls})
    async with FlowManager.open(bus, "call-1", llm=llm, tts=SimulatedTTS(0)) as fm:
        await fm.initialize(node("a", functions=functions, respond_immediately=False))
        with anyio.fail_after(10):
            for first_call in (True, False):
                running = anyio.Event()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(fm.respond, "Hello")
                    await running.wait()
                    fm.interrupt()
                    if not first_call:  # book is not cancelled: it finishes, and transitions
                        finish.set()
    assert llm.calls == ["a", "a"]  # no turn for the cancelled call's result
    tool = [(m["tool_call_id"], m["content"]) for m in fm.messages if m["role"] == "tool"]
    assert tool == [("c1", "CANCELLED"), ("c2", '{"booked": true}')]
    assert fm.current_node == "b"


async def test_an_end_while_the_llm_generates_returns_the_respond_at_once(bus: Bus) -> None:
    """The caller hung up: the reply would not be published, so it is not waited for (a
    Pipecat pipeline's shutdown waits for the turn's handler)."""
    asked = anyio.Event()

    class Never(ScriptedLLM):
        async def generate(self, messages: Any, tools: Any) -> LLMResponse:
            asked.set()
            await anyio.sleep_forever()
            raise AssertionError

    async with FlowManager.open(bus, "call-1", llm=Never({}), tts=SimulatedTTS(0)) as fm:
        await fm.initialize(node("a", respond_immediately=False))
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(fm.respond, "Hello?")
                await asked.wait()
                await fm.end("the caller hung up")
    assert [e.type for e in await bus.history("call-1")][-2:] == ["node.entered", "session.ended"]


async def test_an_interrupt_cancels_the_replys_later_calls_that_are_cancel_on_interruption(
    bus: Bus,
) -> None:
    """Run one after another (`run_in_parallel=False`), a cancellable call not begun when the
    caller spoke up is cancelled too, as it would have been running together with the others:
    not run, "CANCELLED" for the LLM. One without the option runs, and the LLM gets its turn."""
    ran: list[str] = []
    running, finish = anyio.Event(), anyio.Event()

    async def book(args: dict[str, Any]) -> Any:
        ran.append("book")
        running.set()
        await finish.wait()
        return {"booked": True}

    async def lookup(args: dict[str, Any]) -> Any:
        ran.append("lookup")

    async def remember(args: dict[str, Any]) -> Any:
        ran.append("remember")

    functions = [
        {"name": "book", "handler": book},
        {"name": "lookup", "handler": lookup, "cancel_on_interruption": True},
        {"name": "remember", "handler": remember},
    ]
    made = [FunctionCall(name, id=f"c{i}") for i, name in enumerate(["book", "lookup", "remember"])]
    llm = ScriptedLLM({"a": [LLMResponse(function_calls=made), LLMResponse(text="Booked.")]})
    tts = SimulatedTTS(0)
    async with FlowManager.open(bus, "call-1", llm=llm, tts=tts, run_in_parallel=False) as fm:
        await fm.initialize(node("a", functions=functions, respond_immediately=False))
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(fm.respond, "Book it")
                await running.wait()
                fm.interrupt()
                finish.set()
    assert ran == ["book", "remember"]
    tool = [(m["tool_call_id"], m["content"]) for m in fm.messages if m["role"] == "tool"]
    assert tool == [
        ("c0", '{"booked": true}'),
        ("c1", "CANCELLED"),
        ("c2", '{"status": "acknowledged"}'),
    ]
    assert fm.messages[-1] == {"role": "assistant", "content": "Booked."}


async def test_a_replys_calls_run_together_and_the_last_to_finish_chooses_the_node(
    bus: Bus,
) -> None:
    """As Pipecat runs them (`run_in_parallel`, its default): the first call waits for the
    second to finish, which only calls run together allow. Their results go into the context
    in the order of the calls; the node entered is the last finisher's request."""
    second_done = anyio.Event()

    async def first(args: dict[str, Any]) -> Any:
        await second_done.wait()
        return {"first": True}, node("by_first", respond_immediately=False)

    async def second(args: dict[str, Any]) -> Any:
        second_done.set()
        return {"second": True}, node("by_second", respond_immediately=False)

    functions = [{"name": "first", "handler": first}, {"name": "second", "handler": second}]
    made = [FunctionCall("first", id="c1"), FunctionCall("second", id="c2")]
    llm = ScriptedLLM({"a": [LLMResponse(function_calls=made)]})
    async with FlowManager.open(bus, "call-1", llm=llm, tts=SimulatedTTS(0)) as fm:
        await fm.initialize(node("a", functions=functions, respond_immediately=False))
        with anyio.fail_after(10):
            await fm.respond("Do both")
    tool = [(m["tool_call_id"], m["content"]) for m in fm.messages if m["role"] == "tool"]
    assert tool == [("c1", '{"first": true}'), ("c2", '{"second": true}')]
    assert fm.current_node == "by_first"


@pytest.mark.parametrize(("by", "streamed"), [("flow", True), ("tts", True), ("tts", False)])
async def test_the_caller_speaking_up_while_a_reply_is_spoken_cancels_its_cancellable_calls(
    bus: Bus, by: str, streamed: bool
) -> None:
    """By `interrupt`, or by the pipeline's own interruption, which the TTS reports (a bot
    that never calls `interrupt`): a ``cancel_on_interruption`` call of the reply is
    cancelled, as in Pipecat, run while the reply is spoken or not begun yet. One without the
    option runs to its end, and the LLM gets its turn."""
    finish = anyio.Event()

    async def lookup(args: dict[str, Any]) -> Any:
        await anyio.sleep_forever()

    async def book(args: dict[str, Any]) -> Any:
        await finish.wait()
        return {"booked": True}

    async def caller_speaks_up(kind: str, text: str) -> None:
        if text != "One moment.":
            return
        if kind == "tts.started" and by == "flow":
            fm.interrupt()
        elif kind == "tts.started":
            tts.interrupt()
        else:  # its speech is over
            finish.set()

    functions = [
        {"name": "lookup", "handler": lookup, "cancel_on_interruption": True},
        {"name": "book", "handler": book},
    ]
    made = [FunctionCall("lookup", id="c1"), FunctionCall("book", id="c2")]
    replies = [LLMResponse(text="One moment.", function_calls=made), LLMResponse(text="Booked.")]
    llm = ScriptedLLM({"a": replies})
    if not streamed:
        llm.stream = None  # type: ignore[assignment,method-assign]  # whole replies
    tts = SimulatedTTS(0.01, observer=caller_speaks_up)
    async with FlowManager.open(bus, "call-1", llm=llm, tts=tts) as fm:
        await fm.initialize(node("a", functions=functions, respond_immediately=False))
        with anyio.fail_after(10):
            await fm.respond("Where is it?")
    tool = [(m["tool_call_id"], m["content"]) for m in fm.messages if m["role"] == "tool"]
    assert tool == [("c1", "CANCELLED"), ("c2", '{"booked": true}')]
    finished = [e for e in await bus.history("call-1") if e.type == "tts.finished"]
    interrupted = [msgspec.json.decode(e.data)["interrupted"] for e in finished]
    assert interrupted == [by == "tts", False]
    assert fm.messages[-1] == {"role": "assistant", "content": "Booked."}
