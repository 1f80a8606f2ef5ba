"""Simulated bots: calls through the sample flow, as a Pipecat bot process would drive them.

Each call is one `FlowManager` (a scripted LLM, a simulated TTS) and one `Events` emitter on its
own session, with a W3C traceparent of its own. A call goes::

    on_client_connected ─► greeting ─(caller asks)─► order ─(caller is done)─► goodbye ─► ended
                             pre:  tts_say, load_customer       post: log_turn, leave_room
                             post: log_turn                     (bot side: on_before_leave,
                  pre: function lookup_order, post: log_turn     sync), end_conversation

In every `BARGE_IN_EVERY`-th call (by default) the caller speaks over the bot's answer in
``order``, as callers do: its speech is cut halfway through its first sentence, the flow is
told (`FlowManager.interrupt`), and what the caller heard of it is what the context and
``tts.finished`` keep; the caller's next turn goes on from there.

``flowbus demo`` runs them beside its workers; ``flowbus simulate`` runs them alone, against
any deployment running `workers.sample`.
"""

from __future__ import annotations

import secrets
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from bus import Bus
from flows import (
    Emitter,
    Events,
    FlowManager,
    FunctionCall,
    LLMResponse,
    ScriptedLLM,
    SimulatedTTS,
)

log = structlog.get_logger("flowbus.bots")
DAILY = Emitter("transport.daily", "DailyTransport#0")
USER = Emitter("user_aggregator", "LLMUserAggregator#0")
CALLER = "+15550100"
#: The services the sample flow needs (`workers.sample`).
SERVICES = ("actions", "crm")
#: Nodes in the order a call visits them (for the live view).
NODES = ("greeting", "order", "goodbye")
#: Every this-many-th call's caller speaks over the bot's `ANSWER` (a barge-in), by default.
BARGE_IN_EVERY = 4
#: The bot's answer in ``order``.
ANSWER = "Order A1234 has shipped and arrives tomorrow. Anything else?"


def new_traceparent() -> str:
    """A fresh W3C trace context (version 00, sampled): one trace per call."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def _node(name: str, task: str, **more: Any) -> dict[str, Any]:
    return {"name": name, "task_messages": [{"role": "system", "content": task}], **more}


def sample_flow() -> dict[str, dict[str, Any]]:
    """The sample flow's nodes, as a Pipecat Flows user writes them. Its functions move to the
    next node (function transitions); its actions use every built-in type and custom ones."""

    def to(target: str) -> Callable[..., Awaitable[tuple[dict[str, Any], dict[str, Any]]]]:
        async def transition(
            args: dict[str, Any], flow_manager: FlowManager
        ) -> tuple[dict[str, Any], dict[str, Any]]:
            if "order" in args:
                flow_manager.state["order_id"] = args["order"]
            return {"status": "ok"}, nodes[target]

        return transition

    nodes: dict[str, dict[str, Any]] = {
        "greeting": _node(
            "greeting",
            "Greet the caller by name and ask how you can help.",
            pre_actions=[
                {"type": "tts_say", "text": "Welcome to Acme Air."},
                {"type": "load_customer"},
            ],
            post_actions=[{"type": "log_turn"}],
            functions=[{"name": "check_order", "handler": to("order")}],
        ),
        "order": _node(
            "order",
            "Tell the caller where the order is.",
            pre_actions=[{"type": "function", "handler": "lookup_order"}],
            post_actions=[{"type": "log_turn"}],
            functions=[{"name": "finish", "handler": to("goodbye")}],
        ),
        "goodbye": _node(
            "goodbye",
            "Thank the caller.",
            post_actions=[
                {"type": "log_turn"},
                {"type": "leave_room"},  # registered in the bot: runs there, in its place
                {"type": "end_conversation", "text": "Goodbye!"},
            ],
        ),
    }
    return nodes


def sample_script() -> dict[str, list[LLMResponse]]:
    """What the scripted LLM answers in each node, turn by turn."""
    return {
        "greeting": [
            LLMResponse(text="Hello Ada, how can I help you today?"),
            LLMResponse(
                text="Let me look that up.",
                function_calls=[FunctionCall("check_order", {"order": "A1234"})],
            ),
        ],
        "order": [
            LLMResponse(text=ANSWER),
            LLMResponse(function_calls=[FunctionCall("finish")]),
        ],
        "goodbye": [LLMResponse(text="Thank you for flying with Acme Air.")],
    }


def barges_in(n: int, every: int) -> bool:
    """Whether the `n`-th call (from 1) has a barge-in, one in `every` (0: none)."""
    return every > 0 and n % every == 0


class CallFailedError(RuntimeError):
    """A simulated call did not reach its end; the message says where it stopped."""


@dataclass
class Board:
    """Where each call is, for the live view: session -> "waiting" (to start), "connecting",
    a node of `NODES`, "ended" or "failed"."""

    calls: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def count(self, state: str) -> int:
        return sum(1 for s in self.calls.values() if s == state)


async def run_call(
    bus: Bus,
    session: str,
    *,
    board: Board | None = None,
    seconds_per_char: float = 0.004,
    wait: float = 20.0,
    barge_in: bool = False,
) -> None:
    """One call through the sample flow, from connect to the end of the session; with
    `barge_in`, the caller speaks over the bot's `ANSWER`.

    Raises `CallFailedError` if a step fails or the call is not over within `wait` seconds."""
    board = board if board is not None else Board()
    board.calls[session] = "connecting"
    nodes = sample_flow()

    async def caller_hears(kind: str, text: str) -> None:
        if barge_in and kind == "tts.started" and text and ANSWER.startswith(text):
            callers.start_soon(speak_up, len(text) / 2 * seconds_per_char)

    async def speak_up(after: float) -> None:
        await anyio.sleep(after)  # (the caller's timing: halfway through the sentence)
        # The user's turn starts: the bot's audio is cut, as the pipeline's interruption cuts
        # it, and the flow told. (Its event is published after, lest a slow publish let the
        # sentence end first.)
        tts.interrupt()
        flow.interrupt()
        await events.emit(USER, "on_user_turn_started", "VADUserTurnStartStrategy#0")

    tts = SimulatedTTS(seconds_per_char, observer=caller_hears)
    opened = FlowManager.open(
        bus,
        session,
        llm=ScriptedLLM(sample_script()),
        tts=tts,
        traceparent=new_traceparent(),
        actions_timeout=wait,
    )
    try:
        async with opened as flow, anyio.create_task_group() as callers:
            events = Events(flow.bot, sync_timeout=wait)

            async def leave_room(action: dict[str, Any], flow_manager: FlowManager) -> None:
                outcome = await events.emit(DAILY, "on_before_leave")  # sync: waits for crm
                if outcome is not None and not outcome.ok:
                    raise CallFailedError(f"on_before_leave handlers: {outcome}")

            flow.register_action("leave_room", leave_room)
            flow.state["caller"] = CALLER

            def at(step: str) -> None:
                board.calls[session] = flow.current_node or step

            with anyio.fail_after(wait):
                await events.emit(DAILY, "on_client_connected", {"id": CALLER})
                await flow.initialize(nodes["greeting"])
                at("greeting")
                for text in ("Where is my order?", "No, that's all."):
                    message = {"content": text, "user_id": CALLER}
                    await events.emit(USER, "on_user_turn_stopped", "TurnAnalyzer", message)
                    await flow.respond(text)
                    at("order")
                await flow.ended.wait()
    except Exception as exc:
        reason = describe(exc)
        board.calls[session] = "failed"
        board.failures[session] = reason
        raise CallFailedError(f"call {session} failed: {reason}") from exc
    board.calls[session] = "ended"


def describe(exc: BaseException) -> str:
    """``Type: message`` of the error itself, out of any task-group wrapping."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, TimeoutError):
        return "the call did not end in time"
    return f"{type(exc).__name__}: {exc}"


class ServicesMissingError(RuntimeError):
    """The services the sample flow needs are not running; the message names them."""


async def wait_for_services(bus: Bus, names: tuple[str, ...], *, within: float) -> None:
    """Wait until each service in `names` has a live worker (checked at least once);
    `ServicesMissingError` after `within` seconds."""
    deadline = anyio.current_time() + within
    while True:
        seconds, micros = await bus.redis.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        missing = [
            n for n in names if not await bus.redis.zcount(bus.keys.members(n), now_ms, "+inf")
        ]
        if not missing:
            return
        if anyio.current_time() >= deadline:
            break
        await anyio.sleep(0.1)
    targets = " and ".join(f"flowbus worker workers.sample:{n}" for n in missing)
    raise ServicesMissingError(
        f"no worker of {', '.join(missing)} is running after {within:g}s; start one ({targets})"
    )


async def run_calls(
    bus: Bus,
    sessions: list[str],
    *,
    board: Board,
    stagger: float = 0.05,
    seconds_per_char: float = 0.004,
    barge_in_every: int = BARGE_IN_EVERY,
) -> None:
    """Run the calls concurrently, each starting `stagger` seconds after the one before
    (every `barge_in_every`-th with a barge-in; 0: none). A failed call is recorded on the
    board; the others go on."""

    async def one(n: int, session: str) -> None:
        await anyio.sleep((n - 1) * stagger)
        try:
            await run_call(
                bus,
                session,
                board=board,
                seconds_per_char=seconds_per_char,
                barge_in=barges_in(n, barge_in_every),
            )
        except CallFailedError:
            pass  # on the board, with its reason

    async with anyio.create_task_group() as tg:
        for n, session in enumerate(sessions, start=1):
            tg.start_soon(one, n, session)


@dataclass
class Simulated:
    """What `simulate` did: calls ended, failed, and cut short by a second stop signal (their
    sessions were ended, so that they retire)."""

    ended: int = 0
    failed: int = 0
    cut: int = 0
    #: The stop signal that came, if one did.
    signal: int | None = None


async def simulate(
    bus: Bus,
    *,
    calls: int,
    rate: float,
    concurrency: int,
    wait: float = 60.0,
    barge_in_every: int = BARGE_IN_EVERY,
) -> Simulated:
    """Once the sample services run, start a call every 1/`rate` seconds, at most
    `concurrency` at once, `calls` in all (0: until stopped), every `barge_in_every`-th with a
    barge-in (0: none); log each call's end. SIGTERM or
    SIGINT stops starting calls and lets those running end; a second one cuts them short and
    ends their sessions. Raises `ServicesMissingError` if the services do not run within
    `wait` seconds."""
    log.info("waiting_for_services", services=SERVICES)
    await wait_for_services(bus, SERVICES, within=wait)
    run = secrets.token_hex(3)
    slots = anyio.Semaphore(concurrency)
    board = Board()
    done = Simulated()
    running: set[str] = set()

    async def one(n: int, session: str) -> None:
        running.add(session)
        try:
            await run_call(bus, session, board=board, barge_in=barges_in(n, barge_in_every))
            done.ended += 1
            log.info("call_ended", session=session)
        except CallFailedError as exc:
            done.failed += 1
            log.error("call_failed", session=session, error=str(exc))
        finally:
            board.calls.pop(session, None)
            board.failures.pop(session, None)
            slots.release()
        running.discard(session)  # not when it was cut short

    async def on_signals(starting: anyio.CancelScope, calls_scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if done.signal is None:
                    done.signal = signum
                    log.info("simulate_stopping", signal=name, calls_running=len(running))
                    starting.cancel()
                else:
                    log.warning("simulate_stopped_hard", signal=name, calls_cut=len(running))
                    calls_scope.cancel()
                    return

    async with anyio.create_task_group() as watch:
        async with anyio.create_task_group() as calls_tg:
            starting = anyio.CancelScope()
            watch.start_soon(on_signals, starting, calls_tg.cancel_scope)
            with starting:
                n = 0
                while calls == 0 or n < calls:
                    await slots.acquire()  # backpressure: no more than `concurrency` at once
                    n += 1
                    calls_tg.start_soon(one, n, f"sim-{run}-{n:05d}")
                    if n != calls:
                        await anyio.sleep(1 / rate)
        watch.cancel_scope.cancel()
    done.cut = len(running)
    if running:  # cut short: end their sessions, so that they retire
        with anyio.move_on_after(10, shield=True):
            for session in sorted(running):
                await bus.end_session(session, reason="the simulator was stopped")
    return done
