"""The bot's `FlowManager`: one per call, moving the conversation through nodes.

It keeps Pipecat Flows' shape (`initialize`, `set_node_from_config`, `state`, `current_node`,
`register_action`, transitions from function handlers returning ``(result, next_node)``), but
the node's actions run in the ``actions`` worker service. The manager publishes what happens
(``node.entered``, ``llm.completed``, ``tts.finished``...), speaks what the service asks, and
waits — always for a bounded time — for the pre-actions to finish before the LLM runs.

::

    async with FlowManager.open(bus, "call-42", llm=my_llm, tts=my_tts) as flow:
        await flow.initialize(greeting_node)
        await flow.ended.wait()
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any, Literal

import anyio
import structlog
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectSendStream

from bus import Bus, Message, Payload, SessionEndedError

from .bot import BotSession, unwrapped
from .bot_actions import BotActions
from .calling import invoke_action, is_seconds
from .config import (
    ContextStrategy,
    FlowConfig,
    NodeConfig,
    checked_node,
    context_strategy_of,
    summary_prompt_of,
)
from .context import LLMContext
from .errors import (
    ActionError,
    FlowInitializationError,
    FlowTransitionError,
)
from .function_calls import Calls, NodeLike, call_function, interruptible
from .functions import Handler, parse_function, unique_functions
from .protocol import (
    ActionDone,
    ActionsCompleted,
    EndConversation,
    HandlerOutcome,
    LLMCompleted,
    NodeEntered,
    RunAction,
    Say,
    SessionEnded,
    SessionStarted,
    TTSFinished,
    TTSSpoken,
    WaitTimedOut,
)
from .speech import CURRENT_NODE, LLM, TTS, FunctionCall, LLMResponse, Spoken, heard, streams
from .state import SharedState

log = structlog.get_logger("flowbus.flow")

#: LLM turns in a row that one `respond` makes while function calls stay in the node.
MAX_TURNS = 8


class FlowManager:
    """The flow of one session, seen from its bot process. Open it with `FlowManager.open`.

    `actions_timeout` bounds every wait for the actions service (when it passes the bot
    publishes ``wait.timed_out`` and `set_node_from_config` raises `ActionError`; `initialize`
    raises `FlowInitializationError`, with it as ``__cause__``) and every bot-side
    action; `function_timeout` bounds every node function's handler (past it, the LLM gets an
    error result). A plain `def` handler runs in a thread, which cannot be stopped: it counts
    as timed out once it returns. Nothing waits for ever: each is a finite number of seconds
    above 0, else `ValueError`.

    A reply's function calls run together (`run_in_parallel`, as Pipecat's LLM services by
    default), or one after another.
    """

    def __init__(
        self,
        bot: BotSession,
        tg: TaskGroup,
        *,
        llm: LLM,
        tts: TTS,
        flow: FlowConfig | None = None,
        actions_service: str = "actions",
        actions_timeout: float = 10.0,
        function_timeout: float = 30.0,
        context_strategy: Any = ContextStrategy.APPEND,
        global_functions: Sequence[Any] = (),
        run_in_parallel: bool = True,
    ) -> None:
        for option, seconds in (
            ("actions_timeout", actions_timeout),
            ("function_timeout", function_timeout),
        ):
            if not is_seconds(seconds):
                # (an infinite one failed the first node entry; 0 or less, every wait at once)
                raise ValueError(f"{option} is a number of seconds above 0, not {seconds!r}")
        self.bot, self.llm, self.tts, self.flow = bot, llm, tts, flow
        #: Functions offered in every node, before its own (as Pipecat's `global_functions`),
        #: in any of the forms a node's `functions` take; the flow's first.
        own = flow.global_functions if flow else []
        given = [parse_function("global_functions", f, {}) for f in global_functions]
        self.global_functions = unique_functions(  # (Pipecat's idiom gives the flow's again)
            "global_functions", [*own, *(f for f in given if f not in own)]
        )
        self.actions_service, self.actions_timeout = actions_service, actions_timeout
        self.function_timeout = function_timeout
        self.run_in_parallel = run_in_parallel
        #: The LLM context; `context_strategy` is for the nodes that set none (any of
        #: Pipecat's forms, as a node's `context_strategy`).
        self._context = LLMContext(
            context_strategy_of(context_strategy), summary_prompt_of(context_strategy)
        )
        self.session_id = bot.session
        self.state = SharedState()
        self.current_node: str | None = None
        #: Post-action failures the actions service reported: (node, action type, error).
        self.action_errors: list[tuple[str, str, str]] = []
        self.ended = anyio.Event()
        self._ending = False  # no node entry and no LLM turn from here on
        self._ended_by_pre_action = False  # the end_conversation was a node's pre-action
        self._end_sent = False  # session.ended is published, or being published
        self._tg = tg
        self._node: NodeConfig | None = None
        self._gen = 0  # node entries begun
        self._entered_gen = 0  # the gen of the node entered last (`current_node`)
        self._entering = 0  # the gen of a node entry under way (0: none)
        self._initialized = False
        self._initialize_returned = anyio.Event()  # (a `respond` meanwhile waits for it)
        self._started = False  # session.started published
        self._bot_actions = BotActions()
        self._pre_wait: anyio.CancelScope | None = None
        #: What `interrupt` cancels: LLM replies being generated (`_generating`), and the
        #: handlers of functions that are ``cancel_on_interruption`` (`_cancellable`).
        self._generating: set[anyio.CancelScope] = set()
        self._cancellable: set[anyio.CancelScope] = set()
        self._interrupts = 0  # interruptions so far: `interrupt` calls, speech cut short

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        bus: Bus,
        session: str,
        *,
        llm: LLM,
        tts: TTS,
        traceparent: str | None = None,
        **options: Any,
    ) -> AsyncIterator[FlowManager]:
        """Start the session's inbox reader and command loop; stop them on exit.

        With `traceparent` (W3C trace context), every event of the session carries it.
        """
        opened = BotSession.open(bus, session, traceparent=traceparent)
        with unwrapped():
            async with opened as bot, anyio.create_task_group() as tg:
                manager = cls(bot, tg, llm=llm, tts=tts, **options)
                tg.start_soon(manager._serve_commands)
                try:
                    yield manager
                finally:
                    tg.cancel_scope.cancel()

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The LLM context, in OpenAI's chat form (`LLMContext.messages`)."""
        return self._context.messages

    @property
    def role_message(self) -> str | None:
        """The role message given before the context: the last node's that set one."""
        return self._context.role_message

    # -- Pipecat Flows' API -----------------------------------------------------------------
    def register_action(self, action_type: str, handler: Handler) -> None:
        """Run actions of `action_type` in this bot process (at their place in the list)."""
        self._bot_actions.register(action_type, handler)

    async def initialize(self, initial_node: NodeLike | None = None) -> None:
        """Start the session and enter `initial_node` (or the flow's initial node). As in
        Pipecat, a second call only warns, a call that failed may be made again, and any error
        comes as `FlowInitializationError` ("Failed to initialize flow: ..."), the error that
        caused it as its ``__cause__``."""
        if self._initialized:
            log.warning("flow_already_initialized", session=self.session_id)
            return
        self._initialized = True
        self._initialize_returned = anyio.Event()  # (set already if an earlier call failed)
        try:
            if not self._started:
                flow = self.flow.initial_node if self.flow else ""
                await self.bot.publish(SessionStarted(flow=flow))
                self._started = True
            if initial_node is None and self.flow is not None:
                initial_node = self.flow.nodes[self.flow.initial_node]
            if initial_node is not None:
                await self.set_node_from_config(initial_node)
        except Exception as exc:
            self._initialized = False
            raise FlowInitializationError(f"Failed to initialize flow: {exc}") from exc
        except BaseException:
            self._initialized = False
            raise
        finally:
            self._initialize_returned.set()

    async def set_node_from_config(self, node: NodeLike) -> None:
        """Enter `node`: publish it, wait for its pre-actions, then (by default) respond.

        Raises `FlowTransitionError` before `initialize`, `InvalidNodeError` for a bad config
        (a function's `transition_to` that is not a node of the manager's flow included),
        `ActionError` if a pre-action failed, is unknown, or did not finish in time.
        """
        if not self._initialized:
            raise FlowTransitionError("set a node only after initialize()")
        if self._ending:
            raise FlowTransitionError(f"the session {self.session_id!r} has ended")
        config = self._check(node)
        self._gen += 1
        gen = self._entering = self._gen
        try:
            outcome = await self._enter(config, gen)
        except Exception:  # not entered: its actions failed, or the bot does not wait for them
            self._bot_actions.drop(gen)
            raise
        finally:
            if self._entering == gen:
                self._entering = 0
        if config.respond_immediately and outcome == "done":
            await self.respond()

    def _check(self, node: NodeLike) -> NodeConfig:
        return checked_node(node, self.flow, self.global_functions)

    async def _enter(self, config: NodeConfig, gen: int) -> Literal["done", "ended", "superseded"]:
        """Enter `config` as node entry `gen`: publish it, wait for its pre-actions; whether
        it was entered ("done"), or not: "ended" (by an ``end_conversation``), "superseded"
        (a newer entry began)."""
        if self._pre_wait is not None:  # an older node's pre-actions are moot now
            self._pre_wait.cancel()
        await self.state.load(self._read_state)
        config = config.with_state(self.state)
        entered = NodeEntered(
            node=config.name,
            gen=gen,
            respond_immediately=config.respond_immediately,
            wait_ms=max(1, int(self.actions_timeout * 1000)),  # 0 is no limit
            service=self.actions_service,
            pre_actions=self._bot_actions.wire(config.pre_actions, gen, "pre"),
            post_actions=self._bot_actions.wire(config.post_actions, gen, "post"),
        )
        await self.state.flush(self._write_state)
        with structlog.contextvars.bound_contextvars(session=self.session_id, node=config.name):
            log.info("node_entered", gen=gen)
            outcome: Literal["done", "ended", "superseded"] = "done"
            if self._gen != gen:  # a newer node was entered while the state was read
                outcome = "superseded"
            elif entered.pre_actions or entered.post_actions:  # all checked before any runs
                outcome = await self._run_pre_actions(entered)
            elif not await self._publish(entered):
                outcome = "ended"
            if self._ending:  # an end_conversation came meanwhile
                if self._ended_by_pre_action and self._entering == gen:
                    # One of this node's pre-actions: as in Pipecat, it is the current node.
                    self.current_node, self._node, self._entered_gen = config.name, config, gen
                else:
                    log.info("node_not_entered", gen=gen, reason="the session ended")
                return "ended"
            await self.state.load(self._read_state)  # what the pre-actions wrote
            if outcome == "superseded" or self._gen != gen:
                log.info("node_superseded", gen=gen, by=self._gen)
                return "superseded"
        self.current_node, self._node, self._entered_gen = config.name, config, gen
        if entered.pre_actions or entered.post_actions:
            # The actions service ran this entry's pre-actions, so it is done with every
            # earlier one: their actions that did not run never will. (An entry without
            # actions is not waited for: the post-actions before it may still be running.)
            self._bot_actions.drop_before(gen)
        self._context.enter(config, await self._context.summary(config, self.llm, self.session_id))
        return outcome

    async def respond(self, user_text: str | None = None) -> None:
        """One LLM turn in the current node: the reply is published, spoken, and its function
        calls run. As in Pipecat, a transition happens after all of them, to the last node
        requested; a call that stays in the node gives the LLM its result and another turn
        (unless its handler returned ``(result, NO_RESPONSE)``), up to `MAX_TURNS` in a row.
        With an LLM that streams and a TTS that speaks a stream, the reply is spoken as it is
        written. `interrupt` ends it while the LLM generates. Called while `initialize` enters
        the first node (the caller spoke during its welcome), it waits for `initialize` to
        return, and the words are answered in that node."""
        if self._initialized and self._node is None:
            await self._initialize_returned.wait()
        node = self._require_node()
        gen = self._entered_gen  # (a newer node may be being entered: this is still the node)
        if user_text is not None:
            self.messages.append({"role": "user", "content": user_text})
        for turn in range(MAX_TURNS):
            # Ended, or a newer node entered (for a turn after function calls: or started to).
            if self._ending or self._entered_gen != gen or (turn and self._entering):
                return
            next_node, again = await self._turn(node, gen)
            if (
                next_node is not None
                and self._entered_gen == gen
                and not (self._ending or self._entering)
            ):
                await self.set_node_from_config(next_node)
                return
            if not again:
                return
        log.warning("llm_turns_limited", session=self.session_id, node=node.name, turns=MAX_TURNS)

    def interrupt(self) -> None:
        """The caller spoke up: a reply the LLM is still generating is dropped, and the
        `respond` waiting for it returns with nothing published, as Pipecat cancels the LLM's
        response on an interruption (of a streamed reply, what the caller heard stays in the
        context, and its speech ends with the text written). The user's words stay too. A reply
        being spoken is the TTS's to cut (`PipelineSpeech` is, by the pipeline's
        interruption): it reports what was heard. A function call running with
        ``cancel_on_interruption`` is cancelled, as in Pipecat: the LLM gets "CANCELLED" as
        its result, and it transitions nowhere; so is such a call of the same reply not begun
        yet, run one after another (`run_in_parallel` False: it would have been running).
        Speech the TTS reports cut short cancels such calls too, without this call."""
        for scope in self._generating:
            scope.cancel()
        self._cancel_calls()

    def _cancel_calls(self) -> None:
        """The caller spoke up: cancel the ``cancel_on_interruption`` calls running, and
        those of the same reply not begun yet."""
        self._interrupts += 1
        for scope in self._cancellable:
            scope.cancel()

    async def _turn(self, node: NodeConfig, gen: int) -> tuple[NodeLike | None, bool]:
        """Ask the LLM, publish and speak its reply, run its function calls (from the moment
        the reply is complete, while it is spoken, as Pipecat does); the node they ask for
        (the last one), and whether the LLM is to see their results. Their results go into
        the context after what was heard of the reply, and their node is entered once the
        reply was spoken."""
        calls = Calls(self._interrupts)
        asked = CURRENT_NODE.set(node.name)
        try:
            with unwrapped():  # (an error of the LLM's, the TTS's or a call's as itself)
                async with anyio.create_task_group() as calling:

                    def start_calls(reply: LLMResponse) -> None:
                        if reply.function_calls:
                            calling.start_soon(self._run_calls, node, reply, calls)

                    reply = await self._reply(node, gen, start_calls)
        finally:
            CURRENT_NODE.reset(asked)
        self.messages.extend(calls.messages)
        if reply is None:
            return None, False
        return calls.next_node, calls.again and calls.next_node is None

    async def _reply(self, node: NodeConfig, gen: int, complete: _OnReply) -> LLMResponse | None:
        """The LLM's reply, published and spoken (streamed, if the LLM and the TTS can), given
        to `complete` once it is; None if it was dropped, or the session ended."""
        tools = [f.schema() for f in node.functions]
        answer = self._stream_reply if streams(self.llm, self.tts) else self._generate_reply
        reply, (interrupted, heard_text) = await answer(node, gen, tools, complete)
        if reply is None:
            return None
        finished = TTSFinished(node=node.name, gen=gen, interrupted=interrupted, heard=heard_text)
        return reply if await self._publish(finished) else None

    async def _run_calls(self, node: NodeConfig, reply: LLMResponse, calls: Calls) -> None:
        """Run the reply's function calls, together or one after another (`run_in_parallel`),
        noting what they give in `calls`: their messages in the order of the calls, the node
        asked for by the last to finish that asks for one (as in Pipecat). They see what
        actions wrote meanwhile, and share what they write."""
        given: list[list[dict[str, Any]]] = [[] for _ in reply.function_calls]

        async def run(call: FunctionCall, messages: list[dict[str, Any]]) -> None:
            after_interrupt = self._interrupts != calls.interrupts
            asks, responds = await call_function(
                self,
                node,
                call,
                messages,
                cancellable=self._cancellable,
                checked=self._check,
                after_interrupt=after_interrupt,
            )
            calls.next_node, calls.again = asks or calls.next_node, calls.again or responds

        await self.state.load(self._read_state)
        if self.run_in_parallel:
            async with anyio.create_task_group() as together:
                for call, messages in zip(reply.function_calls, given, strict=True):
                    together.start_soon(run, call, messages)
        else:
            for call, messages in zip(reply.function_calls, given, strict=True):
                await run(call, messages)
        calls.messages.extend(message for messages in given for message in messages)
        await self.state.flush(self._write_state)

    async def _generate_reply(
        self, node: NodeConfig, gen: int, tools: list[dict[str, Any]], complete: _OnReply
    ) -> tuple[LLMResponse | None, tuple[bool, str | None]]:
        """The LLM's whole reply, published (then given to `complete`), then spoken: the reply
        (None if it was dropped, or not published), and whether its speech was interrupted
        and what was heard."""
        reply = None
        with interruptible(self._generating):
            reply = await self.llm.generate(self._context.for_llm(), tools)
        if reply is None:
            self._log_dropped(node)
            return None, (False, None)
        if not await self._publish(_completed(node, gen, reply)):
            return None, (False, None)
        complete(reply)
        # Nothing to say is nothing heard: known without asking the TTS.
        return reply, (await self._say(reply.text) if reply.text else (False, ""))

    async def _stream_reply(
        self, node: NodeConfig, gen: int, tools: list[dict[str, Any]], complete: _OnReply
    ) -> tuple[LLMResponse | None, tuple[bool, str | None]]:
        """The LLM's reply, spoken as it is written (its first sentence while the LLM writes
        the rest), published once complete (then given to `complete`), as `_generate_reply`
        returns it once spoken. What was heard goes into the context, an interrupted reply's
        too (as Pipecat keeps what was spoken of a reply whose generation an interruption
        cancelled). An error of the LLM's is raised once what it wrote was spoken."""
        reply: LLMResponse | None = None
        failure: Exception | None = None
        spoken = Spoken("")
        sending, texts = anyio.create_memory_object_stream[str](math.inf)  # (never blocks)

        async def speak() -> None:
            nonlocal spoken
            with texts:
                spoken = await self.tts.speak_stream(texts)  # type: ignore[attr-defined]
            if spoken.interrupted:
                self._cancel_calls()

        with unwrapped():  # (an error of the TTS's or the LLM's as itself)
            async with anyio.create_task_group() as speaking:
                speaking.start_soon(speak)
                with sending:
                    try:
                        reply = await self._written(tools, sending)
                    except Exception as exc:  # (what it wrote is still spoken)
                        failure = exc
                if reply is not None:
                    if await self._publish(_completed(node, gen, reply)):
                        complete(reply)
                    else:
                        reply = None
                elif failure is None:
                    self._log_dropped(node)
        self._context.keep_heard(spoken.text)
        if failure is not None:
            raise failure
        return reply, (spoken.interrupted, spoken.text)

    async def _written(
        self, tools: list[dict[str, Any]], texts: MemoryObjectSendStream[str]
    ) -> LLMResponse | None:
        """The LLM's reply, streamed, its text sent on to `texts` as it comes; None if
        `interrupt` cut it short."""
        text: list[str] = []
        calls: list[FunctionCall] = []
        with interruptible(self._generating) as generating:
            # (cut short, an async generator is closed where it waits: its response too)
            async for part in self.llm.stream(self._context.for_llm(), tools):  # type: ignore[attr-defined]
                if part.text:
                    text.append(part.text)
                    with suppress(anyio.BrokenResourceError):  # (its speech was cut)
                        texts.send_nowait(part.text)
                calls.extend(part.function_calls)
        if generating.cancel_called:
            return None
        return LLMResponse(text="".join(text), function_calls=calls)

    def _log_dropped(self, node: NodeConfig) -> None:
        why = "the session ended" if self._ending else "interrupt"
        log.info("llm_reply_dropped", session=self.session_id, node=node.name, why=why)

    async def end(self, reason: str = "ended") -> None:
        """End the session: publish ``session.ended``, the stream's last event. A node entry
        waiting for its pre-actions returns at once, the node not entered, and a `respond`
        waiting for the LLM at once, its reply dropped (as `interrupt`). A cancellation
        waits for the publish (its retries are bounded); one that failed may be made again."""
        self._ending = True
        if self._pre_wait is not None:  # a node entry waiting for its pre-actions is moot now
            self._pre_wait.cancel()
        self.interrupt()  # a reply being generated, too: it would not be published
        self._bot_actions.clear()  # no action runs after the end
        if self._end_sent:
            return
        self._end_sent = True
        try:
            with anyio.CancelScope(shield=True):
                await self.state.flush(self._write_state)
                await self.bot.publish(SessionEnded(reason=reason), final=True)
        except BaseException:
            self._end_sent = False
            raise
        log.info("session_ended", session=self.session_id, reason=reason)
        self.ended.set()  # last: whoever waits for it may close the session at once

    # -- internals --------------------------------------------------------------------------
    async def _publish(self, payload: Payload) -> bool:
        """Publish `payload`, unless the session is ending (an ``end_conversation`` came,
        maybe while this was on its way): then False."""
        if self._ending:
            return False
        try:
            await self.bot.publish(payload)
        except SessionEndedError:
            if self._ending:
                return False
            raise
        return True

    def _require_node(self) -> NodeConfig:
        if self._node is None:
            raise FlowTransitionError("no current node: call initialize() with a node first")
        return self._node

    async def _read_state(self) -> dict[str, bytes]:
        return await self.bot.bus.read_state(self.session_id)

    async def _write_state(self, fields: Mapping[str, str | bytes]) -> None:
        await self.bot.bus.write_state(self.session_id, fields)

    async def _run_pre_actions(
        self, entered: NodeEntered
    ) -> Literal["done", "ended", "superseded"]:
        """Publish the node entry and wait until the actions service checked its actions and
        ran its pre-actions: "done", "ended" (by an ``end_conversation``), or "superseded" (a
        newer node was entered meanwhile)."""
        services = {s.name for s in await self.bot.bus.services(fresh=True)}
        if self._gen != entered.gen:  # a newer node was entered meanwhile
            return "superseded"
        if self.actions_service not in services:
            await self.bot.publish(entered)
            raise ActionError(
                f"node {entered.node!r} has actions but no {self.actions_service!r} "
                "service is running"
            )

        def completed(replies: list[Message]) -> bool:
            return any(isinstance(r.payload, ActionsCompleted) for r in replies)

        try:
            with anyio.CancelScope() as self._pre_wait:
                replies = await self.bot.request(
                    entered, done_when=completed, wait=self.actions_timeout
                )
        except SessionEndedError:
            if self._ending:  # an end_conversation came first
                return "ended"
            raise
        if self._pre_wait.cancel_called:
            return "superseded"
        if not replies:
            await self._publish(
                WaitTimedOut(
                    node=entered.node,
                    gen=entered.gen,
                    wait="pre_actions",
                    seconds=self.actions_timeout,
                )
            )
            what = "the pre-actions" if entered.pre_actions else "the check of the actions"
            raise ActionError(
                f"{what} of node {entered.node!r} did not finish within {self.actions_timeout}s"
            )
        result = replies[0].payload
        assert isinstance(result, ActionsCompleted)
        if result.error:
            raise ActionError(
                f"action {result.action_type!r} of node {entered.node!r} failed: {result.error}"
            )
        return "ended" if result.ended else "done"

    async def _serve_commands(self) -> None:
        async with anyio.create_task_group() as actions:
            async for message in self.bot.commands:
                await self._serve(message, actions)

    async def _serve(self, message: Message, actions: TaskGroup) -> None:
        match message.payload:
            case Say(text=text, append_to_context=append, corr=corr):
                if self._ending:  # the call is over: nothing more is said, nor confirmed
                    log.info("say_dropped", session=self.session_id, reason="the session ended")
                    return
                interrupted, heard_text = await self._say(text, append)
                if corr:
                    await self._publish(
                        TTSSpoken(corr=corr, interrupted=interrupted, heard=heard_text)
                    )
            case EndConversation(text=text, append_to_context=append, corr=corr):
                self._ending = True  # no transition or LLM turn may follow it
                self._ended_by_pre_action = "/pre/" in corr  # (its key: entry/phase/index)
                if self._pre_wait is not None:  # nor a node entered meanwhile
                    self._pre_wait.cancel()
                if text:
                    await self._say(text, append)
                await self.end("end_conversation")
            case RunAction(corr=corr, key=key, action=action):
                if self._ending:  # the call is over: its actions are not run, nor confirmed
                    log.info("action_dropped", session=self.session_id, reason="the session ended")
                    return
                # In a task of its own: the action may set a node whose actions need this loop.
                actions.start_soon(self._run_bot_action, corr, key, action)
            case ActionsCompleted(error=error, action_type=kind, node=node, phase="post") if error:
                self.action_errors.append((node, kind, error))
                log.error(
                    "action_failed", session=self.session_id, node=node, action=kind, error=error
                )
            case ActionsCompleted() | HandlerOutcome():
                # A post-phase report, or a reply that came after its wait ended (a pre-phase
                # failure then was the caller's `ActionError` already).
                pass

    async def _say(self, text: str, append: bool = True) -> tuple[bool, str | None]:
        """Speak `text`: whether it was interrupted, and what the caller heard of it if the TTS
        said (a `Spoken`; None if it returned a bool, which says only whether it was cut short).
        With `append`, what was heard goes into the LLM's context (as in Pipecat, whose context
        keeps what was spoken of an interrupted reply; for a bool, the whole text). Speech cut
        short is the caller speaking up: it cancels ``cancel_on_interruption`` calls."""
        said = await self.tts.speak(text)
        spoken = heard(text, said)
        if spoken.interrupted:
            self._cancel_calls()
        if append:
            self._context.keep_heard(spoken.text)
        return spoken.interrupted, said.text if isinstance(said, Spoken) else None

    async def _run_bot_action(self, corr: str, key: str, action: dict[str, Any]) -> None:
        handler = self._bot_actions.take(key)
        error = ""
        try:
            if handler is None:
                raise ActionError(f"no bot-side handler for action {action.get('type')!r}")
            await self.state.load(self._read_state)  # as a worker's action sees it
            with anyio.move_on_after(self.actions_timeout) as scope:
                await invoke_action(handler, action, self)
            if scope.cancel_called:  # (a plain handler's thread returns late, not cancelled)
                error = f"timed out after {self.actions_timeout}s"
            await self.state.flush(self._write_state)  # for the actions after it
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        if error:
            log.error(
                "action_failed", session=self.session_id, action=action.get("type"), error=error
            )
        await self._publish(ActionDone(corr=corr, error=error))


_OnReply = Callable[[LLMResponse], None]


def _completed(node: NodeConfig, gen: int, reply: LLMResponse) -> LLMCompleted:
    calls = [c.name for c in reply.function_calls]
    return LLMCompleted(node=node.name, gen=gen, text=reply.text, function_calls=calls)
