"""Pipecat Flows actions, run by a worker service with the reference's timing.

::

    actions = ActionService()          # the consumer group "actions"

    @actions.action("notify_slack")
    async def notify(action, flow_manager):
        node = flow_manager.current_node
        await slack.post(action["channel"], f"{flow_manager.session_id} reached {node}")

``flowbus worker myapp:actions`` runs it. For each session the service keeps a small state
machine, saved in Redis after every step: the node entry being worked on, the phase (pre, then
post once the LLM's reply was complete *and* spoken), the next action, and what it waits for.
A wait (a phrase being spoken, a bot-side action) ends the handling of the current event; the
bot's confirmation — the next event of the session — resumes it. No session's stream is held
and no other session waits, and a worker killed between two actions is replaced by one that
resumes at the next action.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import msgspec
import structlog

from bus import Delivery, FencedError, Lifespan, Payload, Service

from .calling import invoke_action
from .errors import FlowTransitionError
from .protocol import (
    FLOW_EVENTS,
    Action,
    ActionDone,
    ActionsCompleted,
    EndConversation,
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
from .state import SharedState

log = structlog.get_logger("flowbus.actions")

ActionHandler = Callable[..., Any]
F = TypeVar("F", bound=ActionHandler)
BUILTINS = frozenset({"tts_say", "end_conversation", "function"})
#: Actions after which the next one may start at once: speech is queued in order by the bot.
_SPEECH = frozenset({"tts_say", "end_conversation"})

Phase = Literal["pre", "post_wait", "post", "done", "failed", "ended", "abandoned"]


class _Run(msgspec.Struct):
    """The actions of one node entry, and how far they got."""

    node: str
    gen: int
    pre: list[Action]
    post: list[Action]
    corr: str = ""
    phase: Phase = "pre"
    index: int = 0
    waiting: str = ""
    llm_done: bool = False
    tts_done: bool = False
    #: When the bot stops waiting for the pre-actions (ms since epoch; 0: never).
    deadline: int = 0
    #: The node before this one (None: the first), `current_node` while pre-actions run.
    previous: str | None = None
    #: The seq of the ``node.entered`` it is for: a later one replaces it, even from a bot
    #: that started over (its `gen` counts from 1 again); the same one again is a replay.
    seq: int = 0

    @property
    def entry(self) -> int:
        """What names this node entry in the keys of its commands and replies (dedupe, corr,
        a custom action's `action_key`): its seq (its gen, for a run saved before seqs)."""
        return self.seq or self.gen


def _newer(run: _Run | None, entered: NodeEntered, seq: int) -> bool:
    """Whether `entered` (at `seq`) comes after the node entry of `run` (if any)."""
    if run is None:
        return True
    return run.seq < seq if run.seq else run.gen < entered.gen  # a run saved before `seq`


class _State(msgspec.Struct):
    run: _Run | None = None
    #: A node entered while `run`'s post-actions ran: it starts once they are done (as in
    #: Pipecat, where a transition's frames follow those of the post-actions before it).
    next: _Run | None = None
    #: The node the bot entered last (its pre-actions were done): `current_node` while the
    #: next node's pre-actions run. (A node whose pre-actions failed or timed out is not.)
    entered: str | None = None
    #: The seq of the last event applied to this state (0: none, or a state saved before
    #: it was kept): one at or below it is a replay (a redelivery, or with ``ack_mode``
    #: 'batch' the rest of a read batch the next owner reads again), which resumes the run
    #: but changes nothing, so that a replayed ``session.started`` does not abandon the node
    #: entered after it, nor an old node's ``llm.completed`` count for a restarted bot's.
    seq: int = 0


_decode_state = msgspec.json.Decoder(_State).decode


class WorkerFlowManager:
    """What a worker-side action handler receives as `flow_manager`.

    `current_node` is the node entered before while pre-actions run (None for the first), and
    the node itself in its post-actions, as in Pipecat Flows.

    `state` is the session's shared flow state (the bot's `flow_manager.state`): read when the
    action starts, written back when it returns. `send` writes a command to the bot.
    """

    def __init__(self, delivery: Delivery, node: str | None, state: SharedState, key: str) -> None:
        self._delivery = delivery
        self.session_id = delivery.session
        self.current_node = node
        self.state = state
        #: Unique per (session, node entry, phase, position): an idempotency key for the
        #: action's side effects, should a crash make it run again.
        self.action_key = f"{delivery.session}/{key}"
        self._sent = 0

    async def set_node_from_config(self, node: Any) -> None:
        """Not in a worker: the bot owns the flow. Raises `FlowTransitionError` saying so (a
        Pipecat ``function`` action that sets a node has its handler given as a callable in
        the bot's config, where it runs in the bot)."""
        raise FlowTransitionError(
            f"a worker's action cannot set the node of session {self.session_id!r}, the bot "
            "owns the flow: give a handler that sets a node as a callable in the bot's node "
            "config (it then runs in the bot)"
        )

    async def send(self, command: Payload) -> bool:
        """Write `command` to the bot's inbox (once, even if this action runs again): the n-th
        send of a run is written once per action key."""
        self._sent += 1
        return await self._delivery.send(command, dedupe=f"{self.action_key}/send/{self._sent}")


class ActionService:
    """A worker service that runs the pre- and post-actions of every session's nodes.

    `lifespan` holds what the actions use while a worker runs (`bus.Service.lifespan`)."""

    def __init__(
        self,
        name: str = "actions",
        *,
        lifespan: Lifespan | None = None,
    ) -> None:
        self.name = name
        self.lifespan = lifespan
        self._actions: dict[str, ActionHandler] = {}
        self._functions: dict[str, ActionHandler] = {}

    def register_action(self, action_type: str, handler: ActionHandler) -> None:
        """Run `handler(action, flow_manager)` (or the legacy `handler(action)`), `def` or
        `async def`, for actions of `action_type`; replaces an earlier registration, and a
        built-in action too, as in Pipecat Flows (it then runs as a custom action: in the
        worker, with nothing waiting after it)."""
        if not callable(handler):
            raise ValueError(f"the handler of action {action_type!r} is not callable")
        self._actions[action_type] = handler

    def action(self, action_type: str) -> Callable[[F], F]:
        """Decorator form of `register_action`."""

        def register(handler: F) -> F:
            self.register_action(action_type, handler)
            return handler

        return register

    def register_function(self, name: str, handler: ActionHandler) -> None:
        """The handler a ``{"type": "function", "handler": name}`` action runs."""
        if not callable(handler):
            raise ValueError(f"the function handler {name!r} is not callable")
        self._functions[name] = handler

    def function(self, name: str) -> Callable[[F], F]:
        """Decorator form of `register_function`."""

        def register(handler: F) -> F:
            self.register_function(name, handler)
            return handler

        return register

    def as_service(self) -> Service:
        return Service(
            self.name,
            self._handle,
            FLOW_EVENTS,
            subscribes=frozenset(FLOW_EVENTS.types),
            lifespan=self.lifespan,
        )

    def problem(self, actions: list[Action]) -> tuple[str, str] | None:
        """The first action that cannot run, as (type, reason); checked before any runs."""
        for action in actions:
            kind = str(action.get("type", ""))
            if "bot_handler" in action or kind in self._actions:
                continue
            if kind == "tts_say" and not str(action.get("text", "")).strip():
                return kind, "tts_say needs a non-empty 'text'"
            if kind == "function":
                name = action.get("handler")
                if not name:
                    return kind, "a function action needs a 'handler'"
                if name not in self._functions:
                    return (
                        kind,
                        f"no function handler {name!r} is registered in service {self.name!r}",
                    )
            elif kind not in BUILTINS:
                known = ", ".join(sorted(BUILTINS | self._actions.keys()))
                return kind, f"action type {kind!r} is not registered (known: {known})"
        return None

    # -- the state machine ------------------------------------------------------------------
    async def _handle(self, delivery: Delivery) -> None:
        payload = delivery.payload
        if isinstance(payload, NodeEntered) and payload.service not in ("", self.name):
            return  # another actions service's node entry
        raw = await delivery.load_state()
        state = _decode_state(raw) if raw else _State()
        run = state.run
        latest = state.next or run  # the last node entry seen
        replay = delivery.seq <= state.seq  # applied already: the run only goes on
        if not replay:
            state.seq = delivery.seq
        match None if replay else delivery.payload:
            case NodeEntered() as entered if _newer(latest, entered, delivery.seq):
                deadline = delivery.ts + entered.wait_ms if entered.wait_ms else 0
                new = _Run(
                    entered.node,
                    entered.gen,
                    entered.pre_actions,
                    entered.post_actions,
                    delivery.extra.get("corr", ""),
                    deadline=deadline,
                    previous=state.entered,
                    seq=delivery.seq,
                )
                problem = self.problem(new.pre + new.post)
                if problem is not None:  # it fails at once; the run before goes on
                    await self._fail(delivery, new, *problem)
                elif run is not None and run.phase == "post":  # they run to their end first
                    state.next = new
                else:
                    if run is not None and run.phase not in ("done", "failed", "ended"):
                        log.info("actions_abandoned", node=run.node, gen=run.gen, phase=run.phase)
                    state.run = run = new
                    state.next = None
            case LLMCompleted(gen=gen) | TTSFinished(gen=gen):
                for of_gen in (r for r in (run, state.next) if r is not None and r.gen == gen):
                    if isinstance(delivery.payload, LLMCompleted):
                        of_gen.llm_done = True
                    else:
                        of_gen.tts_done = True
            case TTSSpoken(corr=corr) if run is not None and corr and run.waiting == corr:
                run.waiting = ""
            case ActionDone(corr=corr, error=error) if run is not None and run.waiting == corr:
                run.waiting = ""
                if error:  # the action is the one its corr names (entry/phase/index)
                    _, of_phase, at = corr.rsplit("/", 2)
                    actions = run.pre if of_phase == "pre" else run.post
                    await self._fail(delivery, run, str(actions[int(at)]["type"]), error)
            case WaitTimedOut(gen=gen) if latest is not None and latest.gen == gen:
                if latest is state.next:  # the bot gave up on it before it started
                    state.next = None
                else:
                    latest.phase = "abandoned"
            case SessionStarted():
                # A bot that started over on its session: it is in no node yet (its first
                # node's pre-actions see current_node None), and what its predecessor was doing
                # or waiting for will not be confirmed (nor its next node entered).
                state.entered = None
                if run is not None and run.phase not in ("failed", "ended"):
                    why = "bot restarted"
                    log.info("actions_abandoned", node=run.node, gen=run.gen, reason=why)
                    run.phase, run.waiting, state.next = "abandoned", "", None
            case SessionEnded() if run is not None:
                run.phase = "ended"
                state.next = None
            case (
                NodeEntered()
                | LLMCompleted()
                | TTSFinished()
                | TTSSpoken()
                | ActionDone()
                | WaitTimedOut()
                | SessionEnded()
                | None
            ):
                pass  # a replay, or an event of an earlier node
        await self._save(delivery, state)
        if run is not None:
            with structlog.contextvars.bound_contextvars(node=run.node, gen=run.gen):
                await self._advance(delivery, state, run)

    async def _save(self, delivery: Delivery, state: _State) -> None:
        await delivery.save_state(msgspec.json.encode(state))

    async def _advance(self, delivery: Delivery, state: _State, run: _Run) -> None:
        """Run actions until the list ends, fails, or must wait for the bot."""
        offset: float | None = None  # the server's clock less this host's monotonic one, in ms

        async def server_now() -> float:
            """The server's clock (ms): read once per delivery, then carried on locally."""
            nonlocal offset
            if offset is None:
                offset = await delivery.server_ms() - time.monotonic() * 1000
            return time.monotonic() * 1000 + offset

        while not run.waiting:
            # The deadline is on the server's clock (the entry's `ts`), not this host's.
            if run.phase == "pre" and run.deadline and await server_now() > run.deadline:
                log.warning("actions_abandoned", reason="the bot stopped waiting", at=run.index)
                run.phase = "abandoned"
            elif run.phase in ("pre", "post"):
                actions = run.pre if run.phase == "pre" else run.post
                if run.index < len(actions):
                    await self._run_action(delivery, run, actions)
                else:
                    if actions or (run.phase == "pre" and run.corr):  # the bot waits for it
                        completed = ActionsCompleted(node=run.node, gen=run.gen, phase=run.phase)
                        await self._tell(delivery, run, completed, f"{run.entry}/{run.phase}/done")
                    if run.phase == "pre":
                        state.entered = run.node
                    run.phase, run.index = ("post_wait", 0) if run.phase == "pre" else ("done", 0)
            elif run.phase == "post_wait" and run.llm_done and run.tts_done:
                run.phase = "post"
            elif state.next is not None and run.phase in ("done", "failed", "abandoned"):
                state.run, state.next = state.next, None  # the node entered meanwhile
                run = state.run
                log.info("actions_resumed", node=run.node, gen=run.gen)
            else:
                return
            await self._save(delivery, state)

    async def _run_action(self, delivery: Delivery, run: _Run, actions: list[Action]) -> None:
        i = run.index
        action = actions[i]
        kind = str(action["type"])
        key = f"{run.entry}/{run.phase}/{i}"
        following = str(actions[i + 1]["type"]) if i + 1 < len(actions) else None
        with structlog.contextvars.bound_contextvars(action=kind, index=i, phase=run.phase):
            if "bot_handler" in action:
                run_it = RunAction(corr=key, key=str(action["bot_handler"]), action=action)
                await delivery.send(run_it, dedupe=key)
                # The list ends with an end_conversation, whoever handles it (as in Pipecat).
                run.index = len(actions) if kind == "end_conversation" else i + 1
                run.waiting = key
            elif kind == "tts_say" and kind not in self._actions:
                say = Say(
                    text=str(action["text"]),
                    corr=key,
                    append_to_context=bool(action.get("append_text_to_context", True)),
                )
                await delivery.send(say, dedupe=key)
                run.index = i + 1
                if following not in _SPEECH or following in self._actions:  # what follows starts
                    # once the phrase was spoken (a built-in replaced is a custom action)
                    run.waiting = key
            elif kind == "end_conversation" and kind not in self._actions:
                end = EndConversation(
                    text=str(action.get("text", "")),
                    corr=key,
                    append_to_context=bool(action.get("append_text_to_context", True)),
                )
                await delivery.send(end, dedupe=key)
                phase: Literal["pre", "post"] = "pre" if run.phase == "pre" else "post"
                ended = ActionsCompleted(node=run.node, gen=run.gen, phase=phase, ended=True)
                await self._tell(delivery, run, ended, f"{key}/ended")
                run.phase = "ended"  # later actions never run
                log.info("conversation_ended_by_action")
            else:
                handler = self._actions.get(kind) or self._functions[action["handler"]]
                state = SharedState()
                await state.load(delivery.read_session_state)
                node = run.previous if run.phase == "pre" else run.node  # as in Pipecat
                manager = WorkerFlowManager(delivery, node, state, key)
                # Its effects may be outside flowbus, unfenced: a worker that stalled since
                # this handling started (a pause, a frozen VM) must not start it once its
                # partition may be another's, which may have run it already.
                await delivery.ensure_owned()
                try:
                    await invoke_action(handler, dict(action), manager)
                except FencedError:  # its send, from a stale owner: not the action's failure
                    raise
                except Exception as exc:
                    await self._fail(delivery, run, kind, f"{type(exc).__name__}: {exc}")
                    return
                finally:
                    await state.flush(delivery.write_session_state)
                # The list ends with an end_conversation, whoever handles it (as in Pipecat).
                run.index = len(actions) if kind == "end_conversation" else i + 1
                log.debug("action_ran")

    async def _fail(self, delivery: Delivery, run: _Run, kind: str, error: str) -> None:
        """Skip the rest of the list and tell the bot at once."""
        log.error("action_failed", action=kind, error=error, phase=run.phase)
        phase: Literal["pre", "post"] = "pre" if run.phase == "pre" else "post"
        failed = ActionsCompleted(
            node=run.node, gen=run.gen, phase=phase, error=error, action_type=kind
        )
        run.phase = "failed"
        await self._tell(delivery, run, failed, f"{run.entry}/{phase}/failed")

    async def _tell(self, delivery: Delivery, run: _Run, reply: ActionsCompleted, key: str) -> None:
        extra = {"corr": run.corr} if run.corr and reply.phase == "pre" else None
        await delivery.send(reply, dedupe=key, extra=extra)
