"""``python -m bench.flows_chaos`` (``make chaos``, after the bus's): the flows layer under
every disruption at once — the demo's calls go on while the workers of its services are
killed, stopped, frozen, added and removed, bots go away mid-call, and the server rewrites its
AOF and is killed and started again (or, on a cluster, fails over).

Simulated bots (`workers.bots`, in this process) run calls through the sample flow, a new one
started `--rate` times a second, at most `--concurrency` at once; worker processes of its two
services (`workers.sample`: ``actions``, which runs the flow's pre- and post-actions, and
``crm``, event handlers, one of them a sync event the bot waits for; each action and handler
takes a random time up to `--max-delay-ms`, 20 by default, as one that calls a service would)
run against a private server with an AOF and a lease TTL of 2 s. The disruptions are those
of `bench.chaos`, on a worker of either service; a ``bot`` disruption cancels a call going
(its bot stops where it is, its session not ended, as when a bot process crashes), which the
sweeper (``flowbus end --idle-for 30 --every 1``) must then end. When the time is up the calls
going run to their end; every session must then be done, and every call not abandoned pass
the demo's check
(`workers.verify.check_call`) with the repeats the contract allows after a crash: every
action ran in its place (its first run to finish finished there; any run again started
there), the bot spoke each phrase once, each handler service saw its events in order (by when
each handling started), a repeat only right after the handling it repeats. A call that fails
(a step failed, or it was not over within `CALL_SECONDS`), a dead letter, or a worker that
exits unasked fails the run.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

import anyio
import msgspec
import structlog

from bus import Bus
from bus.settings import AckMode
from workers import sample
from workers.bots import Board, CallFailedError, barges_in, run_call
from workers.fleet import Fleet
from workers.journal import read_journal
from workers.observe import dead_letter_count
from workers.server import LocalCluster, LocalServer
from workers.verify import check_call

from .chaos import (
    ABANDONED_AFTER_S,
    HANDLER_MAX_DELAY_MS,
    LEASE_TTL_SECONDS,
    LISTED,
    Chaos,
    Disruption,
    add_run_options,
    plan,
    run_main,
)
from .workload import ROOT, fresh_settings

log = structlog.get_logger("flowbus.bench")

RESULTS = Path(__file__).resolve().parent / "flows_chaos.json"
#: How long a call may take (about a second when nothing goes wrong): a takeover takes up to
#: two lease TTLs, a server restart a few seconds, and a call may meet several.
CALL_SECONDS = 30.0
#: The simulated TTS speaks this long per character.
SECONDS_PER_CHAR = 0.004
#: The bots' loggers, which log every node entered and call ended: warnings only.
QUIET = ("flowbus.flow", "flowbus.bot", "flowbus.bots", "flowbus.events", "flowbus.bus")
#: Every this-many-th call's caller speaks over the bot (see `workers.bots`).
BARGE_IN_EVERY = 4


class CallsCheck(msgspec.Struct, frozen=True):
    """What the calls' streams and the services' journal show."""

    calls: int
    events: int
    actions_run: int
    handlings: int
    #: Runs of an action, handlings of an event, after their first (after a disruption).
    repeats: int
    #: Calls whose bot went away (a ``bot`` disruption): not checked, but their sessions must
    #: be done, the sweeper having ended them.
    abandoned: int
    #: Calls that did not reach their end: session -> why (at most `LISTED`).
    failed: dict[str, str]
    failed_count: int
    #: Calls whose check found a problem: session -> the problems (at most `LISTED`).
    problems: dict[str, list[str]]
    problem_count: int

    @property
    def ok(self) -> bool:
        return not (self.failed_count or self.problem_count)


class FlowsChaosResult(msgspec.Struct, frozen=True):
    """A flows chaos run: its load, its disruptions and the check of its calls."""

    server: str
    ack_mode: AckMode
    seed: int
    seconds: float
    rate: float
    concurrency: int
    workers: int
    disruptions: list[Disruption]
    check: CallsCheck
    dead_letters: int
    #: From the end of the last call until every group acknowledged every session.
    settle_s: float
    #: An action or handling took a random time up to this (ms).
    max_delay_ms: int = HANDLER_MAX_DELAY_MS

    @property
    def ok(self) -> bool:
        return self.check.ok and self.dead_letters == 0


async def run(
    server: LocalServer | LocalCluster,
    *,
    seconds: float,
    rate: float = 4.0,
    concurrency: int = 20,
    workers: int = 2,
    seed: int | None = None,
    kinds: list[str] | None = None,
    every: tuple[float, float] = (2.0, 6.0),
    min_rounds: int = 0,
    ack_mode: AckMode = "each",
    max_delay_ms: int = HANDLER_MAX_DELAY_MS,
    abandoned_after: float = ABANDONED_AFTER_S,
) -> FlowsChaosResult:
    """Start `rate` calls a second, at most `concurrency` at once, for `seconds` and at least
    `min_rounds` rounds of disruptions of `kinds` (default: every kind for `server`) every
    `every` (lowest, highest) seconds, `workers` processes of each service to start with; see
    the module docstring. Raises `FleetError` if a worker (or the sweeper) exits unasked,
    `BenchError` if the sessions do not retire, `ValueError` for a kind `server` cannot have.
    The sweeper ends a session idle `abandoned_after` seconds (an abandoned call's; shorter only
    in tests with no other disruption, which keeps no live call idle that long)."""
    cluster = isinstance(server, LocalCluster)
    kinds, seed = plan(server, kinds, seed)
    # Kept an hour: the check reads every call's stream and journal once all are done.
    settings = fresh_settings(
        server.url,
        "flows-chaos",
        cluster=cluster,
        lease_ttl_seconds=LEASE_TTL_SECONDS,
        retention_seconds=3600.0,
        ack_mode=ack_mode,
    )
    board = Board()
    going: dict[str, anyio.CancelScope] = {}  # the calls going (for a `bot` disruption)
    async with Bus.connect(settings) as bus:
        with tempfile.TemporaryDirectory(prefix="flowbus-flows-chaos-") as log_dir:
            fleets = [
                Fleet(
                    settings,
                    target,
                    group,
                    Path(log_dir),
                    cwd=ROOT,
                    extra_env={"SAMPLE_MAX_DELAY_MS": str(max_delay_ms)},
                    log_level="warning",
                )
                for group, target in (
                    ("actions", "workers.sample:actions"),
                    ("crm", "workers.sample:crm"),
                )
            ]
            try:
                for fleet in fleets:
                    fleet.start(workers, id_prefix="chaos")
                for fleet in fleets:
                    await fleet.wait_split(bus, within=30)
                abandon = partial(_abandon, board, going)
                chaos = Chaos(
                    bus,
                    fleets,
                    server,
                    workers,
                    random.Random(seed),
                    abandon=abandon,
                    abandoned_after=abandoned_after,
                )
                took, settle = await chaos.around(
                    partial(_calls, bus, board, going, fleets, rate=rate, concurrency=concurrency),
                    seconds=seconds,
                    min_rounds=min_rounds,
                    kinds=kinds,
                    every=every,
                )
                for fleet in fleets:
                    await fleet.stop(within=30)
            finally:
                for fleet in fleets:
                    fleet.kill_all()
        name = (
            f"{server.nodes[0].name} cluster" if isinstance(server, LocalCluster) else server.name
        )
        return FlowsChaosResult(
            name,
            ack_mode,
            seed,
            round(took, 1),
            rate,
            concurrency,
            workers,
            chaos.done,
            await check_calls(bus, board, settings.read_batch if ack_mode == "batch" else 1),
            await dead_letter_count(bus),
            round(settle, 2),
            max_delay_ms,
        )


def _abandon(board: Board, going: dict[str, anyio.CancelScope], rng: random.Random) -> str:
    """A ``bot`` disruption: a call going stops where it is, its session not ended."""
    if not going:
        return "no call going"
    session = rng.choice(sorted(going))
    going.pop(session).cancel()
    return f"{session}'s bot went away ({board.calls[session]})"


async def _calls(
    bus: Bus,
    board: Board,
    going: dict[str, anyio.CancelScope],
    fleets: list[Fleet],
    going_on: Callable[[float], bool],
    rate: float,
    concurrency: int,
) -> float:
    """Start `rate` calls a second, at most `concurrency` at once, while `going_on` (seconds
    since the start); then let those going end. `board` keeps every call's state ("abandoned":
    its bot went away), `going` the cancel scope of each call going. Logs progress every 10 s.
    Returns the seconds calls were started."""
    slots = anyio.Semaphore(concurrency)

    async def one(n: int, session: str) -> None:
        going[session] = scope = anyio.CancelScope()
        try:
            with scope:
                await run_call(
                    bus,
                    session,
                    board=board,
                    seconds_per_char=SECONDS_PER_CHAR,
                    wait=CALL_SECONDS,
                    barge_in=barges_in(n, BARGE_IN_EVERY),
                )
            if scope.cancel_called:
                board.calls[session] = "abandoned"
        except CallFailedError:  # on the board, with its reason; its session ends here
            with anyio.move_on_after(CALL_SECONDS, shield=True):
                await bus.end_session(session, reason="the call failed")
        finally:
            going.pop(session, None)
            slots.release()

    started = next_report = anyio.current_time()
    n = 0
    async with anyio.create_task_group() as tg:
        while going_on((now := anyio.current_time()) - started):
            if now >= next_report:
                next_report += 10
                for fleet in fleets:
                    fleet.check_alive()
                log.info(
                    "chaos_progress",
                    at_s=round(now - started),
                    calls=n,
                    ended=board.count("ended"),
                    failed=board.count("failed"),
                    abandoned=board.count("abandoned"),
                    workers={f.group: len(f.alive) for f in fleets},
                )
            await slots.acquire()
            n += 1
            tg.start_soon(one, n, f"call-{n:05d}")
            delay = started + n / rate - anyio.current_time()
            if delay > 0:
                await anyio.sleep(delay)
        took = anyio.current_time() - started
    return took


async def check_calls(bus: Bus, board: Board, window: int) -> CallsCheck:
    """Check every call of `board` (see the module docstring), a handler's replay of up to
    `window` events allowed."""
    subscriptions = {sample.crm.name: sample.crm.subscribes}
    problems: dict[str, list[str]] = {}
    events = actions = handlings = repeats = 0
    abandoned = [session for session, state in board.calls.items() if state == "abandoned"]
    for session in sorted(board.calls.keys() - set(abandoned)):
        stream = await bus.history(session)
        journal = await read_journal(bus.redis, bus.settings.prefix, session)
        checked = check_call(
            session, stream, journal, subscriptions, at_least_once=True, window=window
        )
        events += checked.events
        actions += checked.actions
        handlings += sum(checked.handled.values())
        repeats += checked.repeats
        if checked.problems and session not in board.failures:
            problems[session] = checked.problems
    return CallsCheck(
        len(board.calls),
        events,
        actions,
        handlings,
        repeats,
        len(abandoned),
        dict(sorted(board.failures.items())[:LISTED]),
        len(board.failures),
        dict(sorted(problems.items())[:LISTED]),
        len(problems),
    )


def render(result: FlowsChaosResult) -> str:
    """The run in a few lines, for a person."""
    kinds = Counter(d.kind for d in result.disruptions)
    c = result.check
    lines = [
        f"flows chaos on {result.server} (ack_mode {result.ack_mode}), seed {result.seed}: "
        f"{result.seconds:g} s of calls "
        f"through the sample flow, {result.rate:g} a second (at most {result.concurrency} at "
        f"once), {result.workers} workers of each service to start with, actions and handlings "
        f"of up to {result.max_delay_ms} ms",
        f"  calls         {c.calls:,}: {c.events:,} events, {c.actions_run:,} actions run, "
        f"{c.handlings:,} handlings (of those not abandoned)",
        f"  abandoned     {c.abandoned} (their bots went away; the sweeper ended them)",
        f"  disruptions   {len(result.disruptions)} ("
        + (", ".join(f"{n} {k}" for k, n in kinds.items()) or "none")
        + ")",
        f"  repeats       {c.repeats} (an action run, an event handled, again after a disruption)",
        f"  settled       every session done {result.settle_s:g} s after the last call ended",
        f"  dead letters  {result.dead_letters}",
        f"  failed calls  {c.failed_count}",
        *(f"    {session}: {why}" for session, why in c.failed.items()),
        f"  out of place  {c.problem_count}",
        *(f"    {session}: {'; '.join(found)}" for session, found in c.problems.items()),
        "verdict: " + ("OK" if result.ok else "FAILED"),
    ]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.flows_chaos",
        description="The flows layer under disruptions: simulated calls go through the demo's "
        "flow while the workers of its services (actions, crm) are killed, stopped, frozen, "
        "added and removed, bots go away mid-call, and the server rewrites its AOF and is "
        "killed and started again; then every call must have ended (an abandoned one by the "
        "sweeper), every action have run in its place and every handler have seen its events "
        "in order.",
    )
    p.add_argument(
        "--seconds", type=float, default=120.0, help="how long calls are started (default 120)"
    )
    p.add_argument("--rate", type=float, default=4.0, help="calls started a second (default 4)")
    p.add_argument(
        "--concurrency", type=int, default=20, help="calls going at once, at most (default 20)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="worker processes of each service to start with (default 2; scaling keeps 2 to "
        "workers + 2)",
    )
    add_run_options(p, RESULTS)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.seconds <= 0 or args.rate <= 0 or args.concurrency < 1 or args.workers < 2:
        sys.exit(
            "--seconds and --rate must be above 0, --concurrency at least 1, --workers at least 2"
        )
    load = {"seconds": args.seconds, "rate": args.rate, "concurrency": args.concurrency}
    start = partial(run, **load, workers=args.workers)
    run_main(args, start, render, "flows chaos run", quiet=QUIET)


if __name__ == "__main__":
    main()
