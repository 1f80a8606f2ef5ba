"""Actions with Pipecat Flows' timing: the bot (this test) and the actions service in separate
processes, on the real server. Order is read from one Redis list per session, appended to by the
bot's LLM and TTS and by the worker's actions, so "before" means causally before."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from structlog.testing import capture_logs

from bus import Bus, Codec, Consumer, Payload, Settings, encode
from flows import (
    COMMANDS,
    FLOW_EVENTS,
    NO_RESPONSE,
    ActionError,
    ActionsCompleted,
    ActionService,
    FlowInitializationError,
    FlowManager,
    FlowTransitionError,
    FunctionCall,
    LLMResponse,
    ScriptedLLM,
    SimulatedTTS,
    Spoken,
    load_flow,
)
from flows.protocol import NodeEntered, TTSFinished, TTSSpoken
from flows.speech import _words_within
from tests.flows.test_config import YAML_FLOW
from tests.flows.test_events import ready
from tests.support import WorkerProcesses, raw, wait_for

pytestmark = pytest.mark.anyio
APP = "tests.apps.actions:app"


def key(bus: Bus, session: str) -> str:
    return f"{bus.settings.prefix}:test:timeline:{session}"


async def timeline(bus: Bus, session: str) -> list[str]:
    return [x.decode() for x in await raw(bus).lrange(key(bus, session), 0, -1)]


def before(events: list[str], first: str, then: str) -> bool:
    return first in events and then in events and events.index(first) < events.index(then)


@asynccontextmanager
async def call(
    bus: Bus,
    session: str,
    script: Mapping[str, Sequence[LLMResponse]] | None = None,
    *,
    wait: float = 30,
    tts: SimulatedTTS | None = None,
) -> AsyncIterator[FlowManager]:
    async def observe(kind: str, detail: str) -> None:
        await raw(bus).rpush(key(bus, session), f"{kind}:{detail}")

    llm = ScriptedLLM(script or {}, observer=observe)
    tts = tts or SimulatedTTS(0.0005)
    tts.observer = observe
    async with FlowManager.open(bus, session, llm=llm, tts=tts, actions_timeout=wait) as fm:
        yield fm


async def handled_everything(bus: Bus, session: str, group: str = "actions") -> bool:
    """The group has read and acknowledged every event of the session so far."""
    groups = await raw(bus).xinfo_groups(bus.keys.session(session))
    return any(g["name"].decode() == group and g["pending"] == 0 and g["lag"] == 0 for g in groups)


def node(
    name: str,
    pre: Sequence[dict[str, Any]] = (),
    post: Sequence[dict[str, Any]] = (),
    **more: Any,
) -> dict[str, Any]:
    return {
        "name": name,
        "task_messages": [{"role": "system", "content": f"You are at {name}."}],
        "pre_actions": list(pre),
        "post_actions": list(post),
        **more,
    }


def note(label: str, **more: Any) -> dict[str, Any]:
    return {"type": "note", "label": label, **more}


def say(text: str) -> dict[str, Any]:
    return {"type": "tts_say", "text": text}


@pytest.fixture
async def actions(bus: Bus, settings: Settings, workers: WorkerProcesses) -> Bus:
    workers.start(APP, settings)
    await ready(bus, "actions")
    return bus


async def test_a_custom_action_after_tts_say_waits_for_the_phrase_and_the_llm_for_the_last(
    actions: Bus,
) -> None:
    bus = actions
    greet = node("greet", pre=[say("Hello there"), note("X"), say("How can I help?")])
    async with call(bus, "call-1", {"greet": [LLMResponse(text="I am listening")]}) as fm:
        await fm.initialize(greet)
        assert fm.current_node == "greet"
    events = await timeline(bus, "call-1")
    assert before(events, "tts.finished:Hello there", "action.started:X")
    assert before(events, "action.finished:X", "tts.started:How can I help?")
    assert before(events, "tts.finished:How can I help?", "llm.started:greet")


async def test_a_custom_post_action_runs_after_the_reply_was_complete_and_spoken(
    actions: Bus,
) -> None:
    bus = actions
    async with call(bus, "call-1", {"greet": [LLMResponse(text="A fairly long reply")]}) as fm:
        await fm.initialize(node("greet", post=[note("Y")]))
        await wait_for(lambda: _has(bus, "call-1", "action.finished:Y"), what="the post-action")
    events = await timeline(bus, "call-1")
    assert before(events, "llm.started:greet", "tts.started:A fairly long reply")
    assert before(events, "tts.finished:A fairly long reply", "action.started:Y")


async def _has(bus: Bus, session: str, entry: str) -> bool:
    return entry in await timeline(bus, session)


async def test_end_conversation_speaks_ends_the_session_and_skips_what_follows(
    actions: Bus,
) -> None:
    bus = actions
    goodbye = node(
        "bye", pre=[say("One moment"), {"type": "end_conversation", "text": "Bye"}, note("Z")]
    )
    async with call(bus, "call-1") as fm:
        await fm.initialize(goodbye)
        await fm.ended.wait()
    stream = bus.keys.session("call-1")
    await wait_for(lambda: _retired(bus, stream), what="every group to finish the session")
    events = await timeline(bus, "call-1")
    assert before(events, "tts.finished:One moment", "tts.finished:Bye")
    assert "action.started:Z" not in events and "llm.started:bye" not in events
    assert (await bus.history("call-1"))[-1].type == "session.ended"


@pytest.mark.parametrize("append", [True, False])
async def test_spoken_text_goes_into_the_context_unless_told_not_to(
    actions: Bus, append: bool
) -> None:
    bus = actions
    quiet = {"append_text_to_context": False}
    spoken = node(
        "bye",
        pre=[
            say("Hello"),
            {**say("Just a note"), **quiet},
            {"type": "end_conversation", "text": "Bye", **({} if append else quiet)},
        ],
    )
    async with call(bus, f"call-{append}") as fm:
        await fm.initialize(spoken)
        await fm.ended.wait()
        said = [m["content"] for m in fm.messages if m["role"] == "assistant"]
    assert said == (["Hello", "Bye"] if append else ["Hello"])


async def _retired(bus: Bus, stream: str) -> bool:
    return int(await raw(bus).ttl(stream)) > 0


async def test_without_respond_immediately_post_actions_wait_for_the_next_reply(
    actions: Bus,
) -> None:
    bus = actions
    quiet = node("quiet", pre=[note("P")], post=[note("Q")], respond_immediately=False)
    async with call(bus, "call-1", {"quiet": [LLMResponse(text="Sure thing")]}) as fm:
        await fm.initialize(quiet)
        await wait_for(lambda: handled_everything(bus, "call-1"), what="the node entry handled")
        events = await timeline(bus, "call-1")
        assert "action.finished:P" in events
        assert "llm.started:quiet" not in events and "action.started:Q" not in events
        await fm.respond("I would like to book a table")
        await wait_for(lambda: _has(bus, "call-1", "action.finished:Q"), what="the post-action")
    events = await timeline(bus, "call-1")
    assert before(events, "tts.finished:Sure thing", "action.started:Q")


async def test_a_function_action_runs_its_handler_in_order_with_the_others(actions: Bus) -> None:
    bus = actions
    pre = [note("X"), {"type": "function", "handler": "lookup"}, note("Y")]
    async with call(bus, "call-1") as fm:
        await fm.initialize(node("look", pre=pre, respond_immediately=False))
    events = await timeline(bus, "call-1")
    assert before(events, "action.finished:X", "function.started:lookup")
    assert before(events, "function.finished:lookup", "action.started:Y")
    # Written by the worker, read here; pre-actions see the node before (none: the first).
    assert fm.state == {"ran_X": "None", "ran_Y": "None"}


async def test_current_node_is_the_one_before_in_pre_actions_and_the_node_in_post_actions(
    actions: Bus,
) -> None:
    replies = {"a": [LLMResponse(text="Noted")], "b": [LLMResponse(text="Next")]}
    async with call(actions, "call-1", replies) as fm:
        await fm.initialize(node("a", pre=[note("A")], post=[note("P")]))
        await wait_for(lambda: handled_everything(actions, "call-1"), what="a's post-actions")
        await fm.set_node_from_config(node("b", pre=[note("B")]))
        assert fm.state == {"ran_A": "None", "ran_P": "a", "ran_B": "a"}


@pytest.mark.parametrize(
    ("pre", "post", "message"),
    [
        (
            [note("X"), {"type": "boom", "message": "CRM down"}, note("Y")],
            [],
            "action 'boom' of node 'n' failed: RuntimeError: CRM down",
        ),
        ([note("X")], [{"type": "nope"}], "action 'nope' of node 'n' failed: action type 'nope'"),
        ([], [{"type": "nope"}], "action 'nope' of node 'n' failed: action type 'nope'"),
        ([say("")], [], "tts_say needs a non-empty 'text'"),
        ([{"type": "function"}], [], "a function action needs a 'handler'"),
        ([{"type": "function", "handler": "missing"}], [], "no function handler 'missing'"),
        ([{"type": "function", "handler": "explode"}], [], "ValueError: lookup failed"),
    ],
    ids=[
        "custom-raises",
        "unknown-type-in-post",
        "unknown-type-in-post-alone",
        "empty-tts-say",
        "function-without-handler",
        "function-unknown",
        "function-raises",
    ],
)
async def test_a_broken_action_is_a_clear_error_at_once_and_the_next_call_is_unaffected(
    actions: Bus, pre: list[dict[str, Any]], post: list[dict[str, Any]], message: str
) -> None:
    bus = actions
    async with call(bus, "call-bad") as fm:
        with pytest.raises(FlowInitializationError, match=message.replace("(", r"\(")) as failed:
            await fm.initialize(node("n", pre=pre, post=post))
        assert isinstance(failed.value.__cause__, ActionError)
    await wait_for(lambda: handled_everything(bus, "call-bad"), what="the failure handled")
    events = await timeline(bus, "call-bad")
    assert "action.started:Y" not in events
    if post:  # checked before any pre-action ran
        assert "action.started:X" not in events
    async with call(bus, "call-next", {"ok": [LLMResponse(text="Fine")]}) as fm:
        await fm.initialize(node("ok", pre=[note("fine")]))
    assert "action.finished:fine" in await timeline(bus, "call-next")


@pytest.mark.parametrize(
    "option",
    [
        {"actions_timeout": float("inf")},  # failed the first node entry, unclearly
        {"actions_timeout": 0},
        {"actions_timeout": float("nan")},
        {"function_timeout": -1},  # every function call timed out at once
        {"function_timeout": "30"},
    ],
)
async def test_a_timeout_that_cannot_bound_a_wait_is_refused_at_once(
    bus: Bus, option: dict[str, Any]
) -> None:
    (name,) = option
    with pytest.raises(ValueError, match=f"^{name} is a number of seconds above 0"):
        async with FlowManager.open(
            bus, "call-1", llm=ScriptedLLM({}), tts=SimulatedTTS(0), **option
        ):
            pass


async def test_slow_pre_actions_end_the_wait_at_the_timeout_as_an_event(actions: Bus) -> None:
    bus = actions
    async with call(bus, "call-1", wait=0.3) as fm:
        with pytest.raises(FlowInitializationError, match=r"did not finish within 0\.3s") as failed:
            await fm.initialize(node("slow", pre=[note("S", ms=2000), note("after")]))
        assert isinstance(failed.value.__cause__, ActionError)
    await wait_for(lambda: handled_everything(bus, "call-1"), what="the timeout handled")
    assert [e.type for e in await bus.history("call-1")][-1] == "wait.timed_out"
    assert "action.started:after" not in await timeline(bus, "call-1")  # abandoned


@pytest.mark.parametrize("where", ["pre", "post"])
async def test_without_an_actions_service_a_node_with_actions_fails_at_once(
    bus: Bus, where: str
) -> None:
    async with call(bus, "call-1") as fm:
        with pytest.raises(
            FlowInitializationError, match="has actions but no 'actions' service is running"
        ) as failed:
            await fm.initialize(node("n", **{where: [say("hi")]}))
        assert isinstance(failed.value.__cause__, ActionError)


async def test_an_interrupted_tts_say_does_not_hang_the_flow(actions: Bus) -> None:
    bus = actions
    tts = SimulatedTTS(0.01)  # a phrase of 40 characters takes 0.4 s

    async def interrupt_when_speaking(kind: str, detail: str) -> None:
        await raw(bus).rpush(key(bus, "call-1"), f"{kind}:{detail}")
        if kind == "tts.started" and detail.startswith("A long"):
            tts.interrupt()

    async with call(bus, "call-1", tts=tts) as fm:
        tts.observer = interrupt_when_speaking
        await fm.initialize(
            node(
                "n",
                pre=[say("A long phrase the caller talks over"), note("X")],
                respond_immediately=False,
            )
        )
    events = await timeline(bus, "call-1")
    assert before(events, "tts.interrupted:A long phrase the caller talks over", "action.started:X")
    assert "assistant" not in [m["role"] for m in fm.messages]  # cut before its first word


class Overheard:
    """A TTS the caller talks over after the first `words` words of every phrase; one that does
    not `tell` says only that the phrase was cut short (as `TTS.speak` may)."""

    def __init__(self, words: int, *, tells: bool = True) -> None:
        self.words, self.tells = words, tells

    async def speak(self, text: str) -> Spoken | bool:
        heard = " ".join(text.split()[: self.words])
        return Spoken(heard, interrupted=True) if self.tells else False


@pytest.mark.parametrize(
    ("tells", "kept"), [(True, "Welcome to"), (False, "Welcome to Pizza Palace.")]
)
async def test_an_interrupted_tts_say_puts_what_was_heard_into_the_context(
    actions: Bus, tells: bool, kept: str
) -> None:
    """As Pipecat's assistant aggregator keeps what was spoken; from a TTS that does not say
    what was heard, the whole text."""
    tts = Overheard(2, tells=tells)
    async with FlowManager.open(actions, "call-1", llm=ScriptedLLM({}), tts=tts) as fm:
        entered = node("n", pre=[say("Welcome to Pizza Palace.")], respond_immediately=False)
        await fm.initialize(entered)
    assert [m["content"] for m in fm.messages if m["role"] == "assistant"] == [kept]


@pytest.mark.parametrize(("words", "kept"), [(3, ["Your pizza ships"]), (0, [])])
async def test_an_interrupted_reply_leaves_what_was_heard_of_it_in_the_context(
    bus: Bus, words: int, kept: list[str]
) -> None:
    llm = ScriptedLLM({"n": [LLMResponse(text="Your pizza ships on Monday.")]})
    async with FlowManager.open(bus, "call-1", llm=llm, tts=Overheard(words)) as fm:
        await fm.initialize(node("n"))
    assert [m["content"] for m in fm.messages if m["role"] == "assistant"] == kept
    [finished] = await published(bus, "call-1", "tts.finished")
    assert finished["interrupted"] is True
    assert finished["heard"] == "".join(kept)  # "": cut before its first word


async def published(bus: Bus, session: str, type_: str) -> list[dict[str, Any]]:
    """The data of the session's events of `type_`, as a service reading the stream gets it."""
    return [msgspec.json.decode(e.data) for e in await bus.history(session) if e.type == type_]


async def test_tts_finished_tells_what_was_heard_of_a_reply_the_caller_talked_over(
    bus: Bus,
) -> None:
    """A service reading the stream (a call recorder, say) learns what the caller heard: the
    words SimulatedTTS finished before it was interrupted, as went into the LLM's context."""
    reply = "Your pizza ships on Monday."
    speaking = anyio.Event()

    async def observe(kind: str, detail: str) -> None:
        if kind == "tts.started":
            speaking.set()

    tts = SimulatedTTS(0.05, observer=observe)  # the reply takes 1.35 s: cut well before its end
    llm = ScriptedLLM({"n": [LLMResponse(text=reply)]})
    async with FlowManager.open(bus, "call-1", llm=llm, tts=tts) as fm:
        async with anyio.create_task_group() as tg:
            tg.start_soon(fm.initialize, node("n"))
            await speaking.wait()
            await anyio.sleep(0.3)  # about 6 characters: "Your"
            assert tts.interrupt()
    [kept] = [m["content"] for m in fm.messages if m["role"] == "assistant"]
    assert kept and kept != reply and reply.startswith(kept)
    [finished] = await published(bus, "call-1", "tts.finished")
    assert finished["interrupted"] is True
    assert finished["heard"] == kept


class Finishes:
    """A TTS that says only that it spoke each phrase to the end (True), not what was heard."""

    async def speak(self, text: str) -> bool:
        return True


@pytest.mark.parametrize("says", [True, False], ids=["spoken", "true"])
async def test_tts_spoken_and_finished_tell_what_was_heard_only_if_the_tts_said(
    actions: Bus, says: bool
) -> None:
    """A `Spoken` to the end: the whole text was heard. True says no more than that it was not
    interrupted: `heard` is None, not the text (the caller may have heard none of it)."""
    welcome, reply = "Welcome to Pizza Palace.", "Your pizza ships on Monday."
    llm = ScriptedLLM({"n": [LLMResponse(text=reply)]})
    tts = SimulatedTTS(0) if says else Finishes()
    async with FlowManager.open(actions, "call-1", llm=llm, tts=tts) as fm:
        await fm.initialize(node("n", pre=[say(welcome)]))
    [spoken] = await published(actions, "call-1", "tts.spoken")
    [finished] = await published(actions, "call-1", "tts.finished")
    assert spoken["interrupted"] is finished["interrupted"] is False
    assert spoken["heard"] == (welcome if says else None)
    assert finished["heard"] == (reply if says else None)


async def test_a_reply_with_nothing_to_say_was_heard_as_nothing(bus: Bus) -> None:
    """Not asked to speak, the TTS said nothing: "" is known, whatever it returns."""
    async with FlowManager.open(bus, "call-1", llm=ScriptedLLM({}), tts=Finishes()) as fm:
        await fm.initialize(node("n"))  # ScriptedLLM's reply in a node it has no script for: ""
    [finished] = await published(bus, "call-1", "tts.finished")
    assert finished["heard"] == ""


@pytest.mark.parametrize(
    "old",
    [
        {"type": "tts.finished", "node": "n", "gen": 1, "interrupted": True},
        {"type": "tts.spoken", "corr": "1/pre/0", "interrupted": True},
    ],
)
def test_an_event_of_a_bot_from_before_heard_decodes_with_heard_none(old: dict[str, Any]) -> None:
    payload = FLOW_EVENTS.decode(old["type"], msgspec.json.encode(old))
    assert isinstance(payload, TTSFinished | TTSSpoken)
    assert payload.interrupted is True and payload.heard is None


def test_a_reader_from_before_heard_decodes_an_event_that_has_it() -> None:
    """msgspec ignores the field it does not know: a service not yet upgraded reads on."""

    class OldTTSFinished(Payload, tag="tts.finished"):
        node: str
        gen: int
        interrupted: bool = False

    new = TTSFinished(node="n", gen=1, interrupted=True, heard="Your pizza")
    old = Codec([OldTTSFinished]).decode("tts.finished", encode(new))
    assert old == OldTTSFinished(node="n", gen=1, interrupted=True)


@pytest.mark.parametrize(
    ("chars", "heard"),
    [
        (0, ""),
        (2, ""),
        (3, "One"),
        (4, "One"),
        (7, "One two"),
        (13, "One two three"),
        (99, "One two three"),
    ],
)
def test_the_simulated_tts_was_heard_to_the_last_word_it_finished(chars: int, heard: str) -> None:
    assert _words_within("One two three", chars) == heard


@pytest.mark.parametrize(
    ("chars", "heard"),
    [(12, "One two."), (13, "One two."), (15, "One two.\nThree"), (17, "One two.\nThree")],
)
def test_words_end_at_any_whitespace_not_only_a_space(chars: int, heard: str) -> None:
    """A reply of two lines cut in the second: the first line's last word was heard too."""
    assert _words_within("One two.\nThree\tfour", chars) == heard


async def test_bot_side_actions_run_in_the_bot_in_order_even_when_they_set_a_node(
    actions: Bus,
) -> None:
    """Pipecat Flows deadlocks when a function action sets a node with a waited action."""
    bus = actions
    ran: list[str] = []
    second = node(
        "second", pre=[say("Now in second"), note("after-say")], respond_immediately=False
    )

    async def jump(action: dict[str, Any], flow_manager: FlowManager) -> None:
        ran.append(f"jump from {flow_manager.current_node}")
        await flow_manager.set_node_from_config(second)

    def tag(action: dict[str, Any]) -> None:  # legacy one-argument form, plain def
        ran.append(f"tag {action['label']}")

    async with call(bus, "call-1") as fm:
        fm.register_action("tag", tag)
        first = node(
            "first",
            pre=[note("X"), {"type": "tag", "label": "t1"}, {"type": "function", "handler": jump}],
            respond_immediately=False,
        )
        await fm.initialize(first)
        await wait_for(lambda: fm.current_node == "second", what="the transition")
    events = await timeline(bus, "call-1")
    assert ran == ["tag t1", "jump from None"]  # current_node is the old one during pre-actions
    assert fm._bot_actions.due() == []  # each dropped once run: no growth over a long call
    assert before(events, "action.finished:X", "tts.started:Now in second")
    assert before(events, "tts.finished:Now in second", "action.started:after-say")


async def test_bot_side_actions_that_will_not_run_are_dropped_from_the_bot(actions: Bus) -> None:
    """Those of a node entry the actions service left for a newer one, of an entry that
    failed, and at the end: none stays in the bot's table for the rest of a long call."""
    ran: list[str] = []

    def tag(action: dict[str, Any]) -> None:
        ran.append(action["label"])

    async with call(actions, "call-1") as fm:
        fm.register_action("tag", tag)
        tagged = {"type": "tag", "label": "a"}
        await fm.initialize(node("a", post=[tagged], respond_immediately=False))
        # No reply in "a": its post-actions never run once "b" is entered.
        await fm.set_node_from_config(node("b", pre=[note("B")], respond_immediately=False))
        assert fm._bot_actions.due() == []
        broken = node("c", pre=[{"type": "unknown"}], post=[tagged], respond_immediately=False)
        with pytest.raises(ActionError, match="'unknown' is not registered"):
            await fm.set_node_from_config(broken)
        assert fm._bot_actions.due() == []
        await fm.set_node_from_config(node("d", post=[tagged], respond_immediately=False))
        assert fm._bot_actions.due() == ["4/post/0"]  # still due, at the next reply
        await fm.end()
        assert fm._bot_actions.due() == []
    assert ran == []


async def test_a_bot_side_post_action_still_due_after_the_next_node_was_entered_runs(
    actions: Bus,
) -> None:
    """The next node has no actions, so the bot does not wait for the service: it is
    entered while the post-actions of the node before still run."""
    ran: list[str] = []
    release = anyio.Event()

    async def hold(action: dict[str, Any], flow_manager: FlowManager) -> None:
        await release.wait()

    def tag(action: dict[str, Any], flow_manager: FlowManager) -> None:
        ran.append(f"{action['label']} in {flow_manager.current_node}")

    async def go(args: dict[str, Any], flow_manager: FlowManager) -> Any:
        return {"ok": True}, node("b", respond_immediately=False)

    script = {"a": [LLMResponse(text="Noted", function_calls=[FunctionCall("go")])]}
    post: list[dict[str, Any]] = [
        {"type": "function", "handler": hold},
        {"type": "tag", "label": "after-hold"},
    ]
    async with call(actions, "call-1", script) as fm:
        fm.register_action("tag", tag)
        await fm.initialize(node("a", post=post, functions=[{"name": "go", "handler": go}]))
        assert fm.current_node == "b"
        release.set()
        await wait_for(lambda: ran == ["after-hold in b"], what="the post-action of a")
        assert fm._bot_actions.due() == []


async def test_an_inline_handler_registers_its_type_on_first_sight_and_a_later_one_is_ignored(
    actions: Bus,
) -> None:
    ran: list[str] = []

    def greet(action: dict[str, Any]) -> None:
        ran.append(f"greet {action['who']}")

    def other(action: dict[str, Any]) -> None:
        ran.append(f"other {action['who']}")

    async with call(actions, "call-1") as fm:
        first = node("a", pre=[{"type": "greet", "handler": greet, "who": "a"}])
        await fm.initialize(first | {"respond_immediately": False})
        later: list[tuple[str, dict[str, Any]]] = [
            ("b", {"who": "b"}),
            ("c", {"handler": other, "who": "c"}),
        ]
        for name, action in later:
            entered = node(name, pre=[{"type": "greet", **action}], respond_immediately=False)
            await fm.set_node_from_config(entered)
    assert ran == ["greet a", "greet b", "greet c"]


async def test_an_inline_handler_of_a_built_in_is_ignored_as_in_pipecat(actions: Bus) -> None:
    ran: list[str] = []

    def mine(action: dict[str, Any]) -> None:
        ran.append(action["type"])

    async with call(actions, "call-1") as fm:
        await fm.initialize(
            node(
                "bye",
                pre=[
                    {**say("Hello"), "handler": mine},
                    {"type": "end_conversation", "text": "Bye", "handler": mine},
                ],
            )
        )
        with anyio.fail_after(10):
            await fm.ended.wait()
    events = await timeline(actions, "call-1")
    assert ran == [] and before(events, "tts.finished:Hello", "tts.finished:Bye")


async def test_a_function_call_sees_what_a_workers_post_action_wrote_and_shares_its_own(
    actions: Bus,
) -> None:
    seen: list[dict[str, Any]] = []

    async def lookup(args: dict[str, Any], flow_manager: FlowManager) -> Any:
        seen.append(dict(flow_manager.state))
        flow_manager.state["looked_up"] = True
        return {"ok": True}, None

    replies = {
        "a": [
            LLMResponse(text="Noted"),
            LLMResponse(function_calls=[FunctionCall("lookup")]),
            LLMResponse(text="Found it"),  # the LLM's turn after the result, as in Pipecat
        ]
    }
    async with call(actions, "call-1", replies) as fm:
        entered = node("a", post=[note("P")], functions=[{"name": "lookup", "handler": lookup}])
        await fm.initialize(entered)
        await wait_for(lambda: handled_everything(actions, "call-1"), what="the post-action")
        await fm.respond("and now?")
    assert seen == [{"ran_P": "a"}]
    assert (await actions.read_state("call-1"))["flow.looked_up"] == b"true"
    assert fm.messages[-1] == {"role": "assistant", "content": "Found it"}


async def test_a_function_with_only_transition_to_moves_the_flow_there(
    bus: Bus, tmp_path: Path
) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(YAML_FLOW)
    script = {
        "greet": [LLMResponse(function_calls=[FunctionCall("choose_pizza")])],
        "pizza": [LLMResponse(text="Which pizza?")],
    }
    llm, tts = ScriptedLLM(script), SimulatedTTS(0.0005)
    async with FlowManager.open(bus, "call-1", llm=llm, tts=tts, flow=load_flow(path)) as fm:
        await fm.initialize()
        assert fm.current_node == "pizza"
    assert llm.calls == ["greet", "pizza"]
    assert fm.messages[-1] == {"role": "assistant", "content": "Which pizza?"}


async def test_the_role_message_stays_until_a_node_sets_another_and_no_message_is_lost(
    bus: Bus,
) -> None:
    contexts: list[list[str]] = []

    class Recorder:
        async def generate(self, messages: Sequence[Mapping[str, Any]], tools: Any) -> Any:
            contexts.append([str(m["content"]) for m in messages if m["role"] != "assistant"])
            return LLMResponse()

    def at(name: str, **more: Any) -> dict[str, Any]:
        return {
            "name": name,
            "task_messages": [{"role": "system", "content": f"task {name}"}],
        } | more

    async with FlowManager.open(bus, "call-1", llm=Recorder(), tts=SimulatedTTS(0)) as fm:
        await fm.initialize(at("a", role_message="You are Ada."))
        await fm.set_node_from_config(at("b", role_message="You are Bob."))
        await fm.set_node_from_config(at("c", context_strategy="RESET"))
    assert contexts == [
        ["You are Ada.", "task a"],
        ["You are Bob.", "task a", "task b"],
        ["You are Bob.", "task c"],
    ]


async def test_a_bot_that_starts_over_on_its_session_gets_its_actions_run(
    actions: Bus,
) -> None:
    """Its node entries count from 1 again; they are new entries all the same."""
    for label in ("first", "second"):
        async with call(actions, "call-1") as fm:
            await fm.initialize(node("a", pre=[note(label)], respond_immediately=False))
    events = await timeline(actions, "call-1")
    assert before(events, "action.finished:first", "action.finished:second")


async def test_post_actions_of_a_node_left_by_a_function_call_run_to_their_end_first(
    actions: Bus,
) -> None:
    """The reply's function call moves the flow on while the post-actions wait for their
    phrase: they run to their end, then the next node's pre-actions (as Pipecat orders it)."""
    then = node("b", pre=[note("B")], respond_immediately=False)

    async def go(args: dict[str, Any], flow_manager: FlowManager) -> Any:
        return {"ok": True}, then

    script = {"a": [LLMResponse(text="Noted", function_calls=[FunctionCall("go")])]}
    post = [say("One moment please, I am checking that."), note("after-say")]
    async with call(actions, "call-1", script) as fm:
        await fm.initialize(node("a", post=post, functions=[{"name": "go", "handler": go}]))
        assert fm.current_node == "b"
    events = await timeline(actions, "call-1")
    assert before(
        events, "tts.finished:One moment please, I am checking that.", "action.started:after-say"
    )
    assert before(events, "action.finished:after-say", "action.started:B")


async def test_an_initialize_that_failed_may_be_made_again_and_a_second_one_only_warns(
    bus: Bus,
) -> None:
    async with call(bus, "call-1") as fm:
        with pytest.raises(
            FlowInitializationError, match="no 'actions' service is running"
        ) as failed:
            await fm.initialize(node("n", pre=[say("hi")]))
        assert isinstance(failed.value.__cause__, ActionError)
        await fm.initialize(node("plain", respond_immediately=False))
        assert fm.current_node == "plain"
        with capture_logs() as logs:
            await fm.initialize(node("other", respond_immediately=False))
        assert fm.current_node == "plain"
    assert [x["event"] for x in logs] == ["flow_already_initialized"]
    types = [e.type for e in await bus.history("call-1")]
    assert types.count("session.started") == 1


async def test_ended_is_set_only_once_session_ended_is_in_the_stream(bus: Bus) -> None:
    async with call(bus, "call-e") as fm:
        publish = fm.bot.publish

        async def slow_publish(*args: Any, **kwargs: Any) -> Any:
            await anyio.sleep(0.05)  # a slow server: the bot must not close the call meanwhile
            return await publish(*args, **kwargs)

        fm.bot.publish = slow_publish  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:
            tg.start_soon(fm.end)
            await fm.ended.wait()
            tg.cancel_scope.cancel()  # as a bot does: close the call the moment it ended
    assert [e.type for e in await bus.history("call-e")][-1:] == ["session.ended"]


async def test_register_action_replaces_a_built_in_as_in_pipecat(bus: Bus) -> None:
    """The replaced ``tts_say`` runs in the worker (even with an empty text, which the
    built-in refuses); the bot is sent no ``say``."""
    spoken: list[Any] = []
    service = ActionService()

    @service.action("tts_say")
    async def speak_elsewhere(action: dict[str, Any], flow_manager: Any) -> None:
        spoken.append(action["text"])

    @service.action("end_conversation")
    async def hang_up(action: dict[str, Any], flow_manager: Any) -> None:
        spoken.append("hung up")

    @service.action("note")
    async def never(action: dict[str, Any], flow_manager: Any) -> None:
        spoken.append("after the end")

    pre = [
        {"type": "tts_say", "text": ""},
        {"type": "tts_say", "text": "Hello"},
        {"type": "end_conversation"},
        {"type": "note"},  # the list ends with an end_conversation, whoever handles it
    ]
    assert service.problem(pre) is None
    consumer = Consumer(bus, service.as_service())
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        await bus.publish("call-1", NodeEntered(node="greeting", gen=1, pre_actions=pre))
        async with bus.inbox("call-1", COMMANDS) as inbox:
            [message] = await inbox.read(wait=10)
        consumer.stop()
    assert message.payload == ActionsCompleted(node="greeting", gen=1, phase="pre")
    assert spoken == ["", "Hello", "hung up"]


async def test_function_results_are_given_and_answered_as_pipecat_does(bus: Bus) -> None:
    """A function that stays in the node gets the LLM another turn, unless it returned
    NO_RESPONSE; ``(None, node)`` gives the LLM "acknowledged"; a handler that outlives
    `function_timeout` gives it an error, and the flow goes on."""

    async def stay(args: dict[str, Any]) -> Any:
        return {"eta": "5 min"}

    async def quiet(args: dict[str, Any]) -> Any:
        return {"noted": True}, NO_RESPONSE

    async def slow(args: dict[str, Any]) -> Any:
        await anyio.sleep_forever()

    async def go(args: dict[str, Any]) -> Any:
        return None, node("b", respond_immediately=False)

    script = {"a": [LLMResponse(function_calls=[FunctionCall(f)]) for f in ("stay", "quiet")]}
    script["a"] += [LLMResponse(function_calls=[FunctionCall(f)]) for f in ("slow", "go")]
    functions = [{"name": f.__name__, "handler": f} for f in (stay, quiet, slow, go)]
    llm = ScriptedLLM(script)
    async with FlowManager.open(
        bus, "call-1", llm=llm, tts=SimulatedTTS(0), function_timeout=0.2
    ) as fm:
        await fm.initialize(node("a", functions=functions))
        assert llm.calls == ["a", "a"]  # stay, then a turn that called quiet: no third
        await fm.respond("and?")
        assert llm.calls == ["a", "a", "a", "a"] and fm.current_node == "b"
    results = [json.loads(m["content"]) for m in fm.messages if m["role"] == "tool"]
    assert results == [
        {"eta": "5 min"},
        {"noted": True},
        {"status": "error", "error": "timed out after 0.2s"},
        {"status": "acknowledged"},
    ]


async def test_a_bot_side_action_that_never_returns_fails_after_the_actions_timeout(
    actions: Bus,
) -> None:
    async def hang(action: dict[str, Any], flow_manager: FlowManager) -> None:
        await anyio.sleep_forever()

    async with call(actions, "call-1", {"a": [LLMResponse(text="ok")]}, wait=1.5) as fm:
        fm.register_action("hang", hang)
        await fm.initialize(node("a", post=[{"type": "hang"}]))
        await wait_for(lambda: bool(fm.action_errors), what="the post-action to fail")
    assert fm.action_errors == [("a", "hang", "timed out after 1.5s")]


async def test_no_node_is_entered_after_an_end_conversation(actions: Bus) -> None:
    """The reply asks for node b while its node's post-action ends the conversation."""

    async def go(args: dict[str, Any]) -> Any:
        return {"ok": True}, node("b", pre=[note("b")])

    script = {"a": [LLMResponse(text="Transferring", function_calls=[FunctionCall("go")])]}
    async with call(actions, "call-1", script, wait=10) as fm:
        ended = {"type": "end_conversation", "text": "Bye"}
        await fm.initialize(node("a", post=[ended], functions=[{"name": "go", "handler": go}]))
        with anyio.fail_after(10):
            await fm.ended.wait()
        with pytest.raises(FlowTransitionError, match="has ended"):
            await fm.set_node_from_config(node("c"))
    assert fm.current_node == "a"
    assert "llm.started:b" not in await timeline(actions, "call-1")


async def test_a_node_whose_pre_action_ends_the_conversation_is_the_current_node(
    actions: Bus,
) -> None:
    """As in Pipecat: `current_node` is the node before while pre-actions run, the new one
    after, even when one of them ended the conversation."""
    async with call(actions, "call-1", wait=10) as fm:
        await fm.initialize(node("a", respond_immediately=False))
        await fm.set_node_from_config(node("bye", pre=[{"type": "end_conversation"}]))
        with anyio.fail_after(10):
            await fm.ended.wait()
    assert fm.current_node == "bye"


async def test_an_end_cut_short_by_a_cancellation_still_ends_the_session(bus: Bus) -> None:
    async with FlowManager.open(bus, "call-1", llm=ScriptedLLM({}), tts=SimulatedTTS(0)) as fm:
        await fm.initialize(node("a", respond_immediately=False))
        with anyio.move_on_after(0):
            await fm.end()
    assert fm.ended.is_set()
    assert [e.type for e in await bus.history("call-1")][-1] == "session.ended"


async def test_a_direct_function_is_called_with_its_arguments_and_strategies_default(
    bus: Bus,
) -> None:
    """``fn(flow_manager=..., **args)``, as Pipecat calls a direct function; and a manager's
    `context_strategy` is that of every node that sets none."""
    got: list[Any] = []

    async def check_order(flow_manager: FlowManager, order_id: str) -> Any:
        """Look an order up.

        Args:
            order_id: The order's number.
        """
        got.append((flow_manager.current_node, order_id))
        return {"found": True}, node("b", respond_immediately=False)

    script = {"a": [LLMResponse(function_calls=[FunctionCall("check_order", {"order_id": "7"})])]}
    async with FlowManager.open(
        bus, "call-1", llm=ScriptedLLM(script), tts=SimulatedTTS(0), context_strategy="reset"
    ) as fm:
        await fm.initialize(node("a", functions=[check_order]))
    assert got == [("a", "7")] and fm.current_node == "b"
    assert fm.messages == [{"role": "system", "content": "You are at b."}]  # reset by default
