"""The actions service run in the test process (a `Consumer`), against a real server: its
commands to the bot, its answers, and bots that start over or end early."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from bus import Bus
from flows import (
    COMMANDS,
    ActionError,
    ActionService,
    FlowInitializationError,
    FlowManager,
    LLMResponse,
    ScriptedLLM,
    SimulatedTTS,
)
from flows.protocol import ActionsCompleted, LLMCompleted, NodeEntered, Say, TTSFinished
from tests.support import raw, running, wait_for

pytestmark = pytest.mark.anyio


def quiet(name: str, pre: list[dict[str, Any]]) -> dict[str, Any]:
    """A node with these pre-actions that does not ask the LLM at once."""
    return {"name": name, "task_messages": [], "pre_actions": pre, "respond_immediately": False}


async def test_a_custom_action_may_send_two_commands_to_the_bot(bus: Bus) -> None:
    """WorkerFlowManager.send: 'writes a command to the bot (once, even if this action runs
    again)'. Two different sends in one run of one action must both arrive."""
    service = ActionService()

    @service.action("greet_twice")
    async def greet_twice(action: dict[str, Any], flow_manager: Any) -> None:
        assert await flow_manager.send(Say(text="one"))
        assert await flow_manager.send(Say(text="two"))

    async with running(bus, service.as_service()):
        pre = [{"type": "greet_twice"}]
        await bus.publish("call-1", NodeEntered(node="a", gen=1, pre_actions=pre))
        got: list[Any] = []
        async with bus.inbox("call-1", COMMANDS) as inbox:

            async def completed() -> bool:
                got.extend(m.payload for m in await inbox.read(wait=0.2))
                return any(isinstance(p, ActionsCompleted) for p in got)

            await wait_for(completed, what="the pre-actions to complete")
    assert [p.text for p in got if isinstance(p, Say)] == ["one", "two"]
    assert got[-1] == ActionsCompleted(node="a", gen=1, phase="pre", error="")


async def test_a_bot_that_starts_over_does_not_replay_the_commands_of_the_one_before(
    bus: Bus,
) -> None:
    """A bot process that starts over on its session is not told again what its predecessor
    was told (commands keyed by a gen the new bot counts from 1 again)."""
    service = ActionService()

    @service.action("note")
    async def note(action: dict[str, Any], flow_manager: Any) -> None:
        pass

    async with running(bus, service.as_service()):
        first = SimulatedTTS(0)
        async with FlowManager.open(bus, "call-1", llm=ScriptedLLM({}), tts=first) as fm:
            await fm.initialize(
                quiet("a", [{"type": "tts_say", "text": "Hello from the first bot"}])
            )
        assert first.spoken == ["Hello from the first bot"]
        second = SimulatedTTS(0)
        async with FlowManager.open(bus, "call-1", llm=ScriptedLLM({}), tts=second) as fm:
            await fm.initialize(
                quiet("b", [{"type": "tts_say", "text": "Hello from the second bot"}])
            )
    assert second.spoken == ["Hello from the second bot"]


async def test_a_failing_bot_side_end_conversation_is_named_in_the_error(bus: Bus) -> None:
    """A bot-side end_conversation (registered in the bot, as Pipecat allows) that raises: the
    ActionError must name it, not the action after it in the list."""
    service = ActionService()

    @service.action("note")
    async def note(action: dict[str, Any], flow_manager: Any) -> None:
        pass

    async def hang_up(action: dict[str, Any], flow_manager: Any) -> None:
        raise RuntimeError("the line is busy")

    async with running(bus, service.as_service()):
        async with FlowManager.open(
            bus, "call-1", llm=ScriptedLLM({}), tts=SimulatedTTS(0), actions_timeout=10
        ) as fm:
            fm.register_action("end_conversation", hang_up)
            pre = [{"type": "end_conversation"}, {"type": "note"}]
            with pytest.raises(FlowInitializationError) as raised:
                await fm.initialize({"name": "a", "task_messages": [], "pre_actions": pre})
    cause = raised.value.__cause__
    assert isinstance(cause, ActionError)
    assert "'end_conversation'" in str(cause) and "'note'" not in str(cause), str(cause)


async def test_a_workers_own_end_conversation_after_tts_say_waits_for_the_phrase(
    bus: Bus,
) -> None:
    """A built-in replaced by the worker's own action is a custom action: as in Pipecat, it
    starts only once the ``tts_say`` before it was spoken (the built-in would be queued
    behind the phrase by the bot's TTS instead)."""
    service = ActionService()
    order: list[str] = []

    async def observe(kind: str, text: str) -> None:
        order.append(f"{kind}:{text}")

    @service.action("end_conversation")
    async def hang_up(action: dict[str, Any], flow_manager: Any) -> None:
        order.append("hang_up")

    tts = SimulatedTTS(0.01, observer=observe)  # a phrase of half a second
    async with running(bus, service.as_service()):
        async with FlowManager.open(
            bus, "call-1", llm=ScriptedLLM({}), tts=tts, actions_timeout=10
        ) as fm:
            pre = [
                {"type": "tts_say", "text": "One moment, please hold on."},
                {"type": "end_conversation"},
            ]
            await fm.initialize(quiet("a", pre))
    assert order == [
        "tts.started:One moment, please hold on.",
        "tts.finished:One moment, please hold on.",
        "hang_up",
    ]


async def test_post_actions_wait_for_the_reply_and_its_speech_both(bus: Bus) -> None:
    """They run once the node's reply is complete and spoken, whichever is reported last (a
    flowbus bot reports the reply first; a bot of another make may not)."""
    service = ActionService()
    ran: list[str] = []

    @service.action("note")
    async def note(action: dict[str, Any], flow_manager: Any) -> None:
        ran.append(action["label"])

    async def all_handled() -> bool:
        [group] = await raw(bus).xinfo_groups(bus.keys.session("call-1"))
        return bool(group["pending"] == 0 and group["lag"] == 0)

    post = [{"type": "note", "label": "after"}]
    async with running(bus, service.as_service()):
        await bus.publish("call-1", NodeEntered(node="a", gen=1, post_actions=post))
        await bus.publish("call-1", TTSFinished(node="a", gen=1))
        await wait_for(all_handled, what="the speech's end handled")
        assert ran == []  # the reply is not complete yet
        await bus.publish("call-1", LLMCompleted(node="a", gen=1))
        await wait_for(lambda: ran == ["after"], what="the post-action")


async def test_pre_actions_run_on_a_worker_whose_clock_is_an_hour_ahead(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bot's wait for them ends on the server's clock (its node entry's `ts` plus
    `actions_timeout`): a worker host whose clock ran ahead by more than that took every
    pre-action for one the bot had stopped waiting for, and abandoned it."""
    service = ActionService()
    ran: list[int] = []

    @service.action("note")
    async def note(action: dict[str, Any], flow_manager: Any) -> None:
        ran.append(action["n"])

    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # this process's clock only
    async with running(bus, service.as_service()):
        async with FlowManager.open(
            bus, "call-1", llm=ScriptedLLM({}), tts=SimulatedTTS(0), actions_timeout=3
        ) as fm:
            pre = [{"type": "note", "n": 1}, {"type": "note", "n": 2}]
            node = {"name": "a", "task_messages": [], "pre_actions": pre}
            await fm.initialize(node | {"respond_immediately": False})
            assert fm.current_node == "a" and fm.action_errors == []
    assert ran == [1, 2]


async def test_a_second_action_service_does_not_answer_for_the_one_the_bot_names(
    bus: Bus,
) -> None:
    """FlowManager(actions_service=...) names its service; another ActionService deployed
    beside it (for other flows) must not fail or run this bot's actions."""
    mine, other = ActionService("actions"), ActionService("billing-actions")
    ran: list[str] = []

    @mine.action("note")
    async def note(action: dict[str, Any], flow_manager: Any) -> None:
        await anyio.sleep(0.3)  # the work the action does: the other service is faster
        ran.append("note")

    async with running(bus, mine.as_service()), running(bus, other.as_service()):
        async with FlowManager.open(
            bus, "call-1", llm=ScriptedLLM({}), tts=SimulatedTTS(0), actions_timeout=10
        ) as fm:
            pre = [{"type": "note"}]
            # Any error (whatever its cause) fails the test: the node is entered, no error.
            await fm.initialize(
                {
                    "name": "a",
                    "task_messages": [],
                    "pre_actions": pre,
                    "respond_immediately": False,
                }
            )
            assert fm.current_node == "a" and fm.action_errors == []
    assert ran == ["note"]


async def test_current_node_in_pre_actions_is_the_bots_after_a_failed_node_entry(
    bus: Bus,
) -> None:
    """Node b's pre-action fails: the bot stays in a (ActionError). Entering c, its
    pre-actions must see current_node 'a', as the bot does (and as Pipecat does)."""
    service = ActionService()
    seen: list[Any] = []

    @service.action("boom")
    async def boom(action: dict[str, Any], flow_manager: Any) -> None:
        raise RuntimeError("boom")

    @service.action("where")
    async def where(action: dict[str, Any], flow_manager: Any) -> None:
        seen.append(flow_manager.current_node)

    def n(name: str, pre: list[dict[str, Any]]) -> dict[str, Any]:
        return {"name": name, "task_messages": [], "pre_actions": pre, "respond_immediately": False}

    async with running(bus, service.as_service()):
        async with FlowManager.open(
            bus, "call-1", llm=ScriptedLLM({}), tts=SimulatedTTS(0), actions_timeout=10
        ) as fm:
            await fm.initialize(n("a", [{"type": "where"}]))
            with pytest.raises(ActionError):
                await fm.set_node_from_config(n("b", [{"type": "boom"}]))
            assert fm.current_node == "a"
            await fm.set_node_from_config(n("c", [{"type": "where"}]))
    assert seen == [None, "a"]


async def test_a_say_that_comes_after_the_bot_ended_the_session_does_not_crash_the_bot(
    bus: Bus,
) -> None:
    """The worker sends a post-action's say (waited for) just as the bot ends the call (the
    caller hung up): the worker had not read session.ended yet. The bot must not fail with
    SessionEndedError publishing tts.spoken into its ended session."""
    tts = SimulatedTTS(0)
    async with FlowManager.open(bus, "call-1", llm=ScriptedLLM({}), tts=tts) as fm:
        await fm.initialize({"name": "a", "task_messages": [], "respond_immediately": False})
        await fm.end("the caller hung up")
        await bus.send("call-1", Say(text="late", corr="2/post/0"))
        # A command after it: once handled, the command loop got past the say.
        marker = ActionsCompleted(node="x", gen=9, phase="post", error="marker", action_type="m")
        await bus.send("call-1", marker)
        await wait_for(lambda: _has_error(fm), what="the bot to handle both commands")
    assert "late" not in tts.spoken
    assert [e.type for e in await bus.history("call-1")][-1] == "session.ended"


async def _has_error(fm: FlowManager) -> bool:
    return bool(fm.action_errors)


async def test_a_bot_that_starts_over_while_a_post_action_waited_for_its_phrase_goes_on(
    bus: Bus,
) -> None:
    """The bot dies while speaking a post-action's tts_say (the worker waits for tts.spoken);
    a new bot starts over on the session: its node's pre-actions must run."""
    service = ActionService()

    @service.action("note")
    async def note(action: dict[str, Any], flow_manager: Any) -> None:
        pass

    speaking = anyio.Event()

    async def observe(kind: str, text: str) -> None:
        if (kind, text) == ("tts.started", "bye now"):
            speaking.set()

    async with running(bus, service.as_service()):
        first = SimulatedTTS(1.0, observer=observe)  # a second per character: still speaking
        llm = ScriptedLLM({"a": [LLMResponse(text="")]})
        async with FlowManager.open(bus, "call-1", llm=llm, tts=first, actions_timeout=5) as fm:
            post = [{"type": "tts_say", "text": "bye now"}]
            await fm.initialize({"name": "a", "task_messages": [], "post_actions": post})
            await speaking.wait()  # and then the bot process dies
        second = SimulatedTTS(0)
        async with FlowManager.open(
            bus, "call-1", llm=ScriptedLLM({}), tts=second, actions_timeout=5
        ) as fm:
            pre = [{"type": "note"}]
            await fm.initialize(
                {"name": "b", "task_messages": [], "pre_actions": pre, "respond_immediately": False}
            )
            assert fm.current_node == "b"


async def test_a_pre_action_failure_after_the_bot_stopped_waiting_is_not_a_post_action_error(
    bus: Bus,
) -> None:
    """`action_errors` lists post-action failures. A pre-action that fails after the bot gave
    up on it (the bot already raised `ActionError` for the timeout) must not appear there as
    one: its reply came late, as a late sync-event outcome, which the bot drops."""
    service = ActionService()
    started, gate = anyio.Event(), anyio.Event()

    @service.action("slow")
    async def slow(action: dict[str, Any], flow_manager: Any) -> None:
        started.set()
        await gate.wait()
        raise RuntimeError("late failure")

    async with running(bus, service.as_service()):
        async with FlowManager.open(
            bus, "call-1", llm=ScriptedLLM({}), tts=SimulatedTTS(0), actions_timeout=0.5
        ) as fm:
            pre = [{"type": "slow"}]
            with pytest.raises(FlowInitializationError, match="did not finish within"):
                await fm.initialize(
                    {
                        "name": "a",
                        "task_messages": [],
                        "pre_actions": pre,
                        "respond_immediately": False,
                    }
                )
            gate.set()

            async def failure_sent() -> bool:
                entries = await raw(bus).xrange(bus.keys.inbox("call-1"))
                return any(b"late failure" in fields[b"data"] for _, fields in entries)

            await wait_for(failure_sent, what="the late pre-phase failure in the inbox")
            marker = ActionsCompleted(
                node="x", gen=9, phase="post", error="marker", action_type="m"
            )
            await bus.send("call-1", marker)  # once handled, the late reply was too
            await wait_for(lambda: _has_error(fm), what="the bot to handle both")
            assert fm.action_errors == [("x", "m", "marker")]


async def test_an_end_while_a_node_waits_for_its_pre_actions_leaves_it_at_once(
    bus: Bus,
) -> None:
    """The caller hangs up (the bot calls `end()`) while node b's pre-action phrase is being
    spoken. The phrase is never confirmed, so the pre-actions never finish: the node entry
    must return, b not entered, not wait out `actions_timeout` and raise `ActionError`."""
    service = ActionService()

    @service.action("lookup")
    async def lookup(action: dict[str, Any], flow_manager: Any) -> None:
        pass

    speaking = anyio.Event()

    async def observe(kind: str, text: str) -> None:
        if kind == "tts.started":
            speaking.set()

    async with running(bus, service.as_service()):
        tts = SimulatedTTS(0.02, observer=observe)
        async with FlowManager.open(
            bus, "call-1", llm=ScriptedLLM({}), tts=tts, actions_timeout=3
        ) as fm:
            await fm.initialize(quiet("a", []))
            pre = [{"type": "tts_say", "text": "Please hold on."}, {"type": "lookup"}]
            async with anyio.create_task_group() as tg:
                tg.start_soon(fm.set_node_from_config, quiet("b", pre))
                await speaking.wait()
                await fm.end("the caller hung up")
            assert fm.current_node == "a"
    assert [e.type for e in await bus.history("call-1")][-1] == "session.ended"


async def test_a_bot_that_starts_over_is_in_no_node_for_its_first_pre_actions(
    bus: Bus,
) -> None:
    """A new bot on the session (the one before died): while its first node's pre-actions
    run, its `current_node` is None, so theirs must be too, not the old bot's last node."""
    service = ActionService()
    seen: list[Any] = []

    @service.action("where")
    async def where(action: dict[str, Any], flow_manager: Any) -> None:
        seen.append(flow_manager.current_node)

    async with running(bus, service.as_service()):
        for name in ("a", "b"):  # one bot, then the next
            async with FlowManager.open(
                bus, "call-1", llm=ScriptedLLM({}), tts=SimulatedTTS(0), actions_timeout=10
            ) as fm:
                await fm.initialize(quiet(name, [{"type": "where"}]))
    assert seen == [None, None]


async def test_a_worker_that_stalls_before_a_custom_action_past_its_lease_starts_it_not(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker frozen in a node entry's handling, after it saved its progress and before its
    next custom action, until the partition's lease was another's (whose worker then ran the
    action): thawed, it does not start the action, whose effects no fence would refuse. (Seen
    in CI's flows chaos: a function action ran again after the LLM replied.)"""
    ran: list[str] = []
    service = ActionService()

    @service.action("first")
    async def first(action: dict[str, Any], flow_manager: Any) -> None:
        ran.append("first")

    @service.action("second")
    async def second(action: dict[str, Any], flow_manager: Any) -> None:
        ran.append("second")

    read_state = bus.read_state

    async def read_then_stall(session: str) -> dict[str, bytes]:
        if ran:  # the shared state read for the second action: here it stalls
            p = bus.keys.partition(session)
            await bus.redis.set(bus.keys.lease(p, service.name), "999:another-worker")
            consumer._parts[p].vouched_until = time.monotonic() - 0.001  # renewed a TTL ago
        return await read_state(session)

    monkeypatch.setattr(bus, "read_state", read_then_stall)
    async with running(bus, service.as_service()) as consumer:
        pre = [{"type": "first"}, {"type": "second"}]
        await bus.publish("call-1", NodeEntered(node="a", gen=1, pre_actions=pre))
        await wait_for(lambda: consumer.stats.partitions_lost == 1, what="the partition lost")
    assert ran == ["first"]


async def test_a_worker_function_action_that_sets_a_node_is_told_where_it_can(bus: Bus) -> None:
    """A Pipecat `function` action that sets a node, registered in the worker: it cannot (the
    bot owns the flow), and the error must say so and where such a handler runs, not be an
    `AttributeError` of the worker's flow manager."""
    service = ActionService()

    @service.function("go_on")
    async def go_on(action: dict[str, Any], flow_manager: Any) -> None:
        await flow_manager.set_node_from_config({"name": "b", "task_messages": []})

    async with running(bus, service.as_service()):
        async with FlowManager.open(
            bus, "call-1", llm=ScriptedLLM({}), tts=SimulatedTTS(0), actions_timeout=10
        ) as fm:
            pre = [{"type": "function", "handler": "go_on"}]
            with pytest.raises(FlowInitializationError) as raised:
                await fm.initialize(quiet("a", pre))
    cause = raised.value.__cause__
    assert isinstance(cause, ActionError)
    assert "FlowTransitionError" in str(cause), str(cause)
    assert "callable in the bot's node config" in str(cause), str(cause)
