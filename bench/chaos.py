"""``python -m bench.chaos`` (``make chaos``): the ordering contract under every disruption at
once, for as long as asked.

Worker processes of the probe service (each handling pauses a random time up to
`--max-delay-ms`, by default `HANDLER_MAX_DELAY_MS`, then is written to Redis before it is
acknowledged) run against a private server with an AOF, with a lease TTL of 2 s, while a
publisher keeps calls going at a steady rate: rolling sessions of `EVENTS_PER_CALL` events,
the last one final, each replaced by a new call as it ends. Every few seconds (a seeded random
pause) one disruption, every kind once in each round of them, in a random order:

- ``kill``: SIGKILL a worker (a crash), and start another;
- ``term``: SIGTERM a worker (it drains), and start another;
- ``freeze``: SIGSTOP a worker for a lease and a half, then SIGCONT (it wakes up fenced);
- ``scale``: start one more worker, or stop one gracefully, between 2 and workers + 2;
- ``bot``: a call's bot goes away mid-call, as a crashed bot process does: its events stop,
  its session is not ended; the sweeper of compose.yaml, ``flowbus end --idle-for S --every 1``
  (S `ABANDONED_AFTER_S`, longer than a live call is ever idle), runs throughout and must end
  it;
- ``server``: SIGKILL the server and start it again (only its AOF survives);
- ``rewrite``: the server rewrites its AOF (``BGREWRITEAOF``), as it does by itself each time
  the file doubled: a later restart reads the rewritten file, then what came after.

With ``--cluster`` the server is a local cluster of three primaries, the first with a replica,
and the server's disruptions are one: ``failover``, the replica of the first shard takes over
from its primary (``CLUSTER FAILOVER``, which loses no write), the next time the other way.

When the time is up the calls still going are ended; every session must then be done (every
group acknowledged all of it, so that it retires; an abandoned one once the sweeper ended it).
The check reads every handling: each call's events (those published) all handled, in `seq`
order by the time their handling started; a repeat is allowed only right after the handling it
repeats (an event in flight at a disruption), or with ``--ack-mode batch`` as a replay, in
order, of the events of a read batch. A worker, or the sweeper, that exits without being told
to fails the run, as does a sweeper that does not stop cleanly on SIGTERM.
(`bench.flows_chaos` puts the demo's calls through the same disruptions.)
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar, get_args

import anyio
import msgspec
import structlog

from bus import Bus, CommandRefusedError
from bus.connection import call
from bus.settings import AckMode
from workers import logs
from workers.fleet import Fleet, FleetError, WorkerProcess, settings_env
from workers.observe import dead_letter_count, live_session_count
from workers.orphans import ending_with_parent
from workers.probe import GROUP, Handling, ProbeTick, handled_key, read_handlings
from workers.runtime import first_error
from workers.server import LocalCluster, LocalServer
from workers.verify import in_order

from .workload import ROOT, BenchError, add_server_option, fresh_settings, wait_until

log = structlog.get_logger("flowbus.bench")

RESULTS = Path(__file__).resolve().parent / "chaos.json"
WORKER_DISRUPTIONS = ("kill", "term", "freeze", "scale")
#: The disruptions of one server, and of a cluster.
DISRUPTIONS = (*WORKER_DISRUPTIONS, "bot", "server", "rewrite")
CLUSTER_DISRUPTIONS = (*WORKER_DISRUPTIONS, "bot", "failover")
#: The sweeper ends a session idle this long (s): a call abandoned by a ``bot`` disruption.
#: A live call is never idle that long: a server restart or a failover holds a publish up for
#: a few seconds, a takeover a flows call for two lease TTLs, and a flows call has 30 s in all.
ABANDONED_AFTER_S = 30.0
EVENTS_PER_CALL = 20
LEASE_TTL_SECONDS = 2.0
#: A handler takes a random time up to this (ms), as one that calls a service would (by
#: default: `--max-delay-ms`).
HANDLER_MAX_DELAY_MS = 20
#: Sessions listed in a failed check, at most.
LISTED = 10


class Disruption(msgspec.Struct, frozen=True):
    """One disruption: when (seconds into the run), what, to whom."""

    at_s: float
    kind: str
    detail: str


class ChaosCheck(msgspec.Struct, frozen=True):
    """What the handlings show against what was published."""

    sessions: int
    handlings: int
    #: Handlings of an event handled before (in flight at a disruption, or with
    #: ``ack_mode="batch"`` handled but not yet acknowledged, handled again by the next owner).
    repeats: int
    #: Sessions with an event never handled.
    incomplete: list[str]
    #: Sessions with an event handled before an earlier one, or one handled again out of turn.
    out_of_order: list[str]

    @property
    def ok(self) -> bool:
        return not (self.incomplete or self.out_of_order)


class ChaosResult(msgspec.Struct, frozen=True):
    """A chaos run: its load, its disruptions and the check."""

    server: str
    ack_mode: AckMode
    seed: int
    seconds: float
    rate: float
    workers: int
    events: int
    calls: int
    disruptions: list[Disruption]
    check: ChaosCheck
    dead_letters: int
    #: From the last publish until every group acknowledged every session to its end.
    settle_s: float
    #: A handling took a random time up to this (ms).
    max_delay_ms: int = HANDLER_MAX_DELAY_MS

    @property
    def ok(self) -> bool:
        return self.check.ok and self.dead_letters == 0


def check(
    handlings: Iterable[Handling], published: Mapping[str, int], *, window: int = 1
) -> ChaosCheck:
    """Each session of `published` (session -> events) handled seq 1..N, in order of the
    handlings' start: each handling is of the event after the one handled before it (the
    session's next, or the next of a replay), or goes back to replay from an event no further
    back than it and than the last `window` events handled (`ack_mode="each"`: 1, the event in
    flight at a disruption; "batch": a read batch)."""
    handlings = list(handlings)
    started: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for h in handlings:
        started[h.session].append((h.handled_ns, h.seq))
    repeats = 0
    incomplete, out_of_order = [], []
    for session, n in published.items():
        seqs = [seq for _, seq in sorted(started.get(session, []))]
        repeats += len(seqs) - len(set(seqs))
        if set(seqs) != set(range(1, n + 1)):
            incomplete.append(session)
        elif not in_order(seqs, window):
            out_of_order.append(session)
    return ChaosCheck(
        len(published), len(handlings), repeats, incomplete[:LISTED], out_of_order[:LISTED]
    )


class Chaos:
    """The disruptions of one run, on the workers of `fleets` (a worker's disruption picks
    one of them) and `server` (which `bus` is connected to), logged as they happen."""

    def __init__(
        self,
        bus: Bus,
        fleets: Sequence[Fleet],
        server: LocalServer | LocalCluster,
        workers: int,
        rng: random.Random,
        *,
        abandon: Callable[[random.Random], str],
        abandoned_after: float = ABANDONED_AFTER_S,
    ) -> None:
        """`abandon(rng)` stops a call going without ending its session (a ``bot``
        disruption) and says which; the sweeper ends a session idle `abandoned_after` s."""
        self.bus, self.fleets, self.server, self.rng = bus, fleets, server, rng
        self.abandon, self.abandoned_after = abandon, abandoned_after
        self.low, self.high = 2, workers + 2  # of each fleet
        self.frozen: set[int] = set()  # pids
        self.done: list[Disruption] = []
        self.rounds = 0
        self._started = anyio.current_time()

    async def around(
        self,
        load: Callable[[Callable[[float], bool]], Awaitable[float]],
        *,
        seconds: float,
        min_rounds: int,
        kinds: Sequence[str],
        every: tuple[float, float],
    ) -> tuple[float, float]:
        """Disrupt (see `go_on`) while `load(going_on)` runs, which goes on while `going_on`
        of the seconds since it started: for `seconds` and at least `min_rounds` rounds; then
        wait until every session is done. The sweeper runs throughout. Returns the seconds
        `load` said it went on, and those from its end until every session was done. Raises
        `FleetError` if a worker or the sweeper exits unasked, `BenchError` if the sessions
        are not done within 120 s (saying where their groups stand) or the sweeper does not
        stop cleanly."""
        with Sweeper.running(self.bus, self.fleets[0].log_dir, self.abandoned_after) as sweeper:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.go_on, kinds, every)
                took = await load(lambda elapsed: elapsed < seconds or self.rounds < min_rounds)
                tg.cancel_scope.cancel()
            for fleet in self.fleets:  # a disruption cut short leaves none frozen
                for w in fleet.workers:
                    if w.alive and w.pid in self.frozen:
                        os.kill(w.pid, signal.SIGCONT)
            ended = anyio.current_time()

            async def done() -> bool:
                for fleet in self.fleets:
                    fleet.check_alive()
                sweeper.check_alive()
                return await live_session_count(self.bus) == 0

            try:
                await wait_until(done, within=120, what="every session to be done")
            except BenchError as exc:
                raise BenchError(f"{exc}; {await stuck(self.bus)}") from None
            settled = anyio.current_time() - ended
            await sweeper.stop()
        return took, settled

    async def go_on(self, kinds: Sequence[str], every: tuple[float, float]) -> None:
        """Disrupt until cancelled, every `every` (lowest, highest) seconds: every kind once in
        each round, in a random order."""
        while True:
            for kind in self.rng.sample(kinds, len(kinds)):
                await anyio.sleep(self.rng.uniform(*every))
                await self.one(kind)
            self.rounds += 1

    def _fleet(self) -> Fleet:
        return self.fleets[0] if len(self.fleets) == 1 else self.rng.choice(self.fleets)

    def _pick(self, fleet: Fleet) -> WorkerProcess:
        return self.rng.choice([w for w in fleet.alive if w.pid not in self.frozen])

    def _start(self, fleet: Fleet) -> WorkerProcess:
        return fleet.start(1, id_prefix="chaos")[0]

    def _name(self, fleet: Fleet, worker: WorkerProcess) -> str:
        return worker.worker_id if len(self.fleets) == 1 else f"{fleet.group} {worker.worker_id}"

    def _note(self, kind: str, detail: str) -> None:
        at = round(anyio.current_time() - self._started, 1)
        self.done.append(Disruption(at, kind, detail))
        log.info("chaos_disruption", at_s=at, kind=kind, detail=detail)

    async def one(self, kind: str) -> None:
        if kind == "failover":
            assert isinstance(self.server, LocalCluster)
            await anyio.to_thread.run_sync(_fail_over, self.server)
            self._note(kind, "the first shard's replica took over")
        elif kind == "server":
            assert isinstance(self.server, LocalServer)
            self.server.kill()
            await anyio.to_thread.run_sync(self.server.start)  # the publisher meanwhile retries
            self._note(kind, "killed and started again")
        elif kind == "rewrite":
            try:
                await call("BGREWRITEAOF", self.bus.redis.bgrewriteaof, self.bus.settings)
                self._note(kind, "the AOF rewritten")
            except CommandRefusedError as exc:  # the server's own rewrite, as the file grew
                if "already in progress" not in exc.reason:
                    raise
                self._note(kind, "the AOF being rewritten already")
        elif kind == "bot":
            self._note(kind, self.abandon(self.rng))
        elif kind in WORKER_DISRUPTIONS:
            await self._disrupt_worker(kind, self._fleet())
        else:
            raise ValueError(f"no disruption {kind!r}")

    async def _disrupt_worker(self, kind: str, fleet: Fleet) -> None:
        if kind == "kill":
            victim = self._pick(fleet)
            fleet.kill(victim)
            new = self._start(fleet)
            self._note(kind, f"{self._name(fleet, victim)} killed, {new.worker_id} started")
        elif kind == "term":
            victim = self._pick(fleet)
            await self._stop(fleet, victim)
            new = self._start(fleet)
            self._note(kind, f"{self._name(fleet, victim)} stopped, {new.worker_id} started")
        elif kind == "scale":
            live = len(fleet.alive)
            if live < self.high and (live == self.low or self.rng.random() < 0.5):
                new = self._start(fleet)
                self._note(kind, f"{self._name(fleet, new)} started ({live + 1} workers)")
            else:
                victim = self._pick(fleet)
                await self._stop(fleet, victim)
                self._note(kind, f"{self._name(fleet, victim)} stopped ({live - 1} workers)")
        else:  # freeze
            victim = self._pick(fleet)
            self.frozen.add(victim.pid)
            os.kill(victim.pid, signal.SIGSTOP)
            self._note(kind, f"{self._name(fleet, victim)} frozen")
            await anyio.sleep(LEASE_TTL_SECONDS * 1.5)  # the time it stays frozen
            os.kill(victim.pid, signal.SIGCONT)
            self.frozen.discard(victim.pid)

    async def _stop(self, fleet: Fleet, worker: WorkerProcess) -> None:
        """A graceful stop that does not end in a clean exit is a fault of the run."""
        status = await fleet.terminate(worker, within=60)  # its drain is bounded at 30 s
        if status != 0:
            raise BenchError(
                f"{self._name(fleet, worker)} did not stop cleanly on SIGTERM (exit status "
                f"{status}); its log ends with:\n{worker.log_tail()}"
            )


#: The reason the sweeper gives, in an abandoned session's meta (``end_reason``).
SWEPT = "its bot went away (the chaos run's sweeper)"


@dataclass(eq=False)
class Sweeper(WorkerProcess):
    """``flowbus end --idle-for S --every 1``, as compose.yaml runs it: it ends the sessions
    of calls whose bots went away."""

    @classmethod
    @contextmanager
    def running(cls, bus: Bus, log_dir: Path, idle: float) -> Iterator[Sweeper]:
        """The sweeper of `bus`'s deployment, ending sessions idle `idle` s, its output in
        `log_dir`; killed on the way out if it still runs."""
        log_path = log_dir / "sweeper.log"
        command = ["end", "--idle-for", str(idle), "--every", "1", "--reason", SWEPT]
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                [sys.executable, "-m", "workers", *command, "--log-format", "json"],
                cwd=ROOT,
                env={**os.environ, **settings_env(bus.settings)},
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=ending_with_parent(),
            )
        try:
            yield cls("sweeper", log_path, popen)
        finally:
            if popen.poll() is None:
                popen.kill()
                popen.wait()

    def check_alive(self) -> None:
        """Raise `FleetError` if it exited."""
        if (code := self.popen.poll()) is not None:
            raise FleetError(f"the sweeper exited with status {code}; {self._tail()}")

    async def stop(self) -> None:
        """SIGTERM, after which it must exit with status 0 within 10 s (`BenchError`)."""
        self.check_alive()
        self.popen.send_signal(signal.SIGTERM)
        try:
            code = await anyio.to_thread.run_sync(partial(self.popen.wait, 10))
        except subprocess.TimeoutExpired:
            code = None
        if code != 0:
            raise BenchError(f"the sweeper did not stop cleanly ({code}); {self._tail()}")

    def _tail(self) -> str:
        return f"its log ({self.log_path}) ends with:\n{self.log_tail()}"


def plan(
    server: LocalServer | LocalCluster, kinds: Iterable[str] | None, seed: int | None
) -> tuple[list[str], int]:
    """The disruptions of a run on `server`: `kinds` (default: every kind it can have) and
    the seed of their order and pace (default: a new one). `ValueError` for a kind `server`
    cannot have."""
    cluster = isinstance(server, LocalCluster)
    chosen = list((CLUSTER_DISRUPTIONS if cluster else DISRUPTIONS) if kinds is None else kinds)
    if wrong := wrong_kinds(chosen, cluster=cluster):
        raise ValueError(wrong)
    return chosen, random.randrange(2**32) if seed is None else seed


def wrong_kinds(kinds: Iterable[str], *, cluster: bool) -> str:
    """What is wrong with `kinds` for a cluster (or one server); '' if nothing."""
    allowed = CLUSTER_DISRUPTIONS if cluster else DISRUPTIONS
    if wrong := sorted(set(kinds) - set(allowed)):
        where = "a cluster (only of one server)" if cluster else "one server (only of a cluster)"
        return f"{', '.join(wrong)}: not a disruption of {where}"
    return ""


def _fail_over(cluster: LocalCluster) -> None:
    """The replica of the first shard takes over from its primary, which becomes its replica
    (`LocalCluster` gives the first shard a replica)."""
    import redis  # the sync client, to steer the cluster

    clients: list[Any] = [redis.Redis(port=node.port) for node in cluster.nodes]  # untyped
    try:
        [replica] = [c for c in clients if c.info("replication")["role"] == "slave"]
        deadline = time.monotonic() + 60
        while (info := replica.info("replication"))["role"] != "master":
            if time.monotonic() > deadline:
                raise BenchError("the replica did not take over within 60s")
            # A manual failover the primary does not answer within 5 s is given up: asked
            # again, once the replica is in sync (it may still be after the last failover).
            if info.get("master_link_status") == "up" and not info.get("master_sync_in_progress"):
                replica.execute_command("CLUSTER", "FAILOVER")
                asked = time.monotonic()
                while replica.info("replication")["role"] != "master":
                    if time.monotonic() - asked > 6:
                        break
                    time.sleep(0.05)
            else:
                time.sleep(0.05)
    finally:
        for c in clients:
            c.close()


async def run(
    server: LocalServer | LocalCluster,
    *,
    seconds: float,
    rate: float = 200.0,
    calls: int = 100,
    workers: int = 4,
    seed: int | None = None,
    kinds: Iterable[str] | None = None,
    every: tuple[float, float] = (2.0, 6.0),
    min_rounds: int = 0,
    ack_mode: AckMode = "each",
    max_delay_ms: int = HANDLER_MAX_DELAY_MS,
    abandoned_after: float = ABANDONED_AFTER_S,
) -> ChaosResult:
    """Run `calls` calls at a time, `rate` events/s in all, for `seconds` and at least
    `min_rounds` rounds of disruptions, with a disruption of `kinds` (default: every kind for
    `server`, a server or a cluster) every `every` (lowest, highest) seconds; see the module
    docstring. Raises `FleetError` if a worker (or the sweeper) exits unasked, `BenchError` if
    the sessions do not retire, `ValueError` for a kind `server` cannot have. The sweeper ends a
    session idle `abandoned_after` seconds (an abandoned call's; shorter only in tests with no
    other disruption, which keeps no live call idle that long)."""
    cluster = isinstance(server, LocalCluster)
    kinds, seed = plan(server, kinds, seed)
    settings = fresh_settings(
        server.url,
        "chaos",
        cluster=cluster,
        lease_ttl_seconds=LEASE_TTL_SECONDS,
        retention_seconds=5.0,
        ack_mode=ack_mode,
    )
    going = Calls(calls)
    async with Bus.connect(settings) as bus:
        with tempfile.TemporaryDirectory(prefix="flowbus-chaos-") as log_dir:
            fleet = Fleet(
                settings,
                "workers.probe:service",
                GROUP,
                Path(log_dir),
                cwd=ROOT,
                extra_env={"PROBE_MAX_DELAY_MS": str(max_delay_ms)},
            )
            try:
                fleet.start(workers, id_prefix="chaos")
                await fleet.wait_split(bus, within=30)
                chaos = Chaos(
                    bus,
                    [fleet],
                    server,
                    workers,
                    random.Random(seed),
                    abandon=going.abandon,
                    abandoned_after=abandoned_after,
                )
                took, settle = await chaos.around(
                    partial(_publish, bus, fleet, going, rate=rate),
                    seconds=seconds,
                    min_rounds=min_rounds,
                    kinds=kinds,
                    every=every,
                )
                await fleet.stop(within=30)
            finally:
                fleet.kill_all()
        window = settings.read_batch if ack_mode == "batch" else 1
        name = (
            f"{server.nodes[0].name} cluster" if isinstance(server, LocalCluster) else server.name
        )
        result = ChaosResult(
            name,
            ack_mode,
            seed,
            round(took, 1),
            rate,
            workers,
            sum(going.published.values()),
            len(going.published),
            chaos.done,
            check(await read_handlings(bus.redis, settings.prefix), going.published, window=window),
            await dead_letter_count(bus),
            round(settle, 2),
            max_delay_ms,
        )
        await bus.redis.delete(handled_key(settings.prefix))
    return result


async def stuck(bus: Bus, listed: int = 3) -> str:
    """How many sessions are not done, and where each group of the first `listed` stands."""
    pipe = bus.redis.pipeline(transaction=False)
    for p in range(bus.settings.partitions):
        pipe.smembers(bus.keys.live(p))
    live = sorted(s.decode() for members in await pipe.execute() for s in members)
    described = []
    for session in live[:listed]:
        stream = bus.keys.session(session)
        last: Any = await bus.redis.xrevrange(stream, count=1)
        groups = ", ".join(
            f"{g['name'].decode()}: delivered up to {g['last-delivered-id'].decode()}, "
            f"pending {g['pending']}, lag {g['lag']}"
            for g in await bus.redis.xinfo_groups(stream)
        )
        described.append(
            f"{session} (last entry {last[0][0].decode() if last else 'none'}; {groups})"
        )
    plural = "" if len(live) == 1 else "s"
    return f"{len(live)} session{plural} not done, e.g. " + "; ".join(described)


@dataclass
class Calls:
    """The calls going, one in each of `slots`, and the events published to each session."""

    slots: int
    going: list[str] = field(init=False)
    published: dict[str, int] = field(default_factory=dict)
    started: int = field(init=False)

    def __post_init__(self) -> None:
        self.going = [f"call-{i}" for i in range(self.slots)]
        self.started = self.slots

    def replace(self, slot: int) -> None:
        """A new call in `slot`."""
        self.going[slot] = f"call-{self.started}"
        self.started += 1

    def abandon(self, rng: random.Random) -> str:
        """A ``bot`` disruption: a call going is replaced without its session ended."""
        slot = rng.randrange(self.slots)
        gone = self.going[slot]
        self.replace(slot)
        return f"{gone}'s bot went away after {self.published.get(gone, 0)} events"


async def _publish(
    bus: Bus, fleet: Fleet, calls: Calls, going_on: Callable[[float], bool], rate: float
) -> float:
    """Keep `calls` going at `rate` events/s while `going_on` (seconds since the start), then
    end them; their `published` is filled as it goes. Logs progress every 10 s. Returns the
    seconds it went on."""
    events = 0
    started = next_report = anyio.current_time()
    while going_on((now := anyio.current_time()) - started):
        slot = events % calls.slots
        session = calls.going[slot]  # (a `bot` disruption may replace it during the publish)
        seq = calls.published.get(session, 0) + 1
        final = seq == EVENTS_PER_CALL
        await bus.publish(session, ProbeTick(sent_ns=time.time_ns()), final=final)
        calls.published[session] = seq
        if final and calls.going[slot] == session:
            calls.replace(slot)
        events += 1
        if now >= next_report:
            next_report += 10
            fleet.check_alive()
            key = handled_key(bus.settings.prefix)
            handled = await call("chaos progress", partial(bus.redis.llen, key), bus.settings)
            log.info(
                "chaos_progress",
                at_s=round(now - started),
                published=events,
                handled=handled,
                workers=len(fleet.alive),
            )
        delay = started + events / rate - anyio.current_time()
        if delay > 0:
            await anyio.sleep(delay)
    for session in calls.going:  # end the calls still going
        if session in calls.published:
            await bus.publish(session, ProbeTick(sent_ns=time.time_ns()), final=True)
            calls.published[session] += 1
    return now - started


def render(result: ChaosResult) -> str:
    """The run in a few lines, for a person."""
    kinds = Counter(d.kind for d in result.disruptions)
    c = result.check
    lines = [
        f"chaos on {result.server} (ack_mode {result.ack_mode}), seed {result.seed}: "
        f"{result.seconds:g} s of "
        f"{EVENTS_PER_CALL}-event calls at {result.rate:,.0f} events/s, {result.workers} workers "
        f"to start with, handlings of up to {result.max_delay_ms} ms",
        f"  published     {result.events:,} events in {result.calls:,} calls",
        f"  disruptions   {len(result.disruptions)} ("
        + (", ".join(f"{n} {k}" for k, n in kinds.items()) or "none")
        + ")",
        f"  handled       {c.handlings:,} handlings, {c.repeats} of them repeats after a "
        "disruption",
        f"  settled       every session done {result.settle_s:g} s after the last publish",
        f"  dead letters  {result.dead_letters}",
        f"  incomplete    {len(c.incomplete)} {' '.join(c.incomplete)}".rstrip(),
        f"  out of order  {len(c.out_of_order)} {' '.join(c.out_of_order)}".rstrip(),
        "verdict: " + ("OK" if result.ok else "FAILED"),
    ]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description="The ordering contract under disruptions: worker processes of a probe "
        "service are killed, stopped, frozen, added and removed, bots go away mid-call, and "
        "the server rewrites its AOF and is killed and started again, while calls go on; then "
        "every call's events must have been handled, in order, and every session be done (an "
        "abandoned one ended by the sweeper).",
    )
    p.add_argument(
        "--seconds", type=float, default=120.0, help="how long the calls go on (default 120)"
    )
    p.add_argument(
        "--rate", type=float, default=200.0, help="events/s over all the calls (default 200)"
    )
    p.add_argument("--calls", type=int, default=100, help="calls going at once (default 100)")
    p.add_argument(
        "--workers",
        type=int,
        default=4,
        help="worker processes to start with (default 4; scaling keeps 2 to workers + 2)",
    )
    add_run_options(p, RESULTS)
    return p


def add_run_options(p: argparse.ArgumentParser, results: Path) -> None:
    """The options of a chaos run beside its load: the disruptions, their pace, the server,
    the ack mode, the seed, where the result goes (by default `results`)."""
    p.add_argument(
        "--disruption",
        choices=sorted({*DISRUPTIONS, *CLUSTER_DISRUPTIONS}),
        action="append",
        dest="kinds",
        help="only this kind of disruption (repeatable; default all of the server's: with "
        "--cluster, failover, bot and the workers')",
    )
    p.add_argument(
        "--every",
        type=float,
        nargs=2,
        default=[2.0, 6.0],
        metavar=("LOW", "HIGH"),
        help="seconds between disruptions, drawn between these (default 2 6)",
    )
    add_server_option(p)
    p.add_argument(
        "--cluster",
        action="store_true",
        help="run on a local cluster of three primaries, the first with a replica (its "
        "disruptions: failover instead of server and rewrite)",
    )
    p.add_argument(
        "--ack-mode",
        choices=get_args(AckMode),
        default="each",
        help="the workers' ack mode (default each, the contract's; with batch an event may be "
        "handled again after a later one of its read batch)",
    )
    p.add_argument(
        "--max-delay-ms",
        type=int,
        default=HANDLER_MAX_DELAY_MS,
        help="each handling takes a random time up to this, as one that calls a service "
        f"would: more of them under way at a disruption (default {HANDLER_MAX_DELAY_MS})",
    )
    p.add_argument(
        "--seed", type=int, help="the random choices' seed (default: a new one, printed)"
    )
    p.add_argument(
        "--output",
        type=Path,
        default=results,
        help=f"where the JSON result goes (default bench/{results.name})",
    )


class _Result(Protocol):
    @property
    def ok(self) -> bool: ...


R = TypeVar("R", bound=_Result)


def run_main(
    args: argparse.Namespace,
    run: Callable[..., Awaitable[R]],
    render: Callable[[R], str],
    what: str,
    quiet: Iterable[str] = (),
) -> None:
    """What a chaos run's `main` does once its own options were checked: check those of
    `add_run_options`, start the server, ``run(server, kinds=, every=, seed=, ack_mode=,
    max_delay_ms=)``,
    write the result and show it (`what` names the run in an error); exit 1 unless it is OK."""
    if not 0 < args.every[0] <= args.every[1]:
        sys.exit("--every LOW HIGH must be above 0, LOW at most HIGH")
    if args.max_delay_ms < 0:
        sys.exit("--max-delay-ms must be at least 0")
    if wrong := wrong_kinds(args.kinds or (), cluster=args.cluster):
        sys.exit(f"--disruption {wrong}")
    logs.configure("info", quiet=frozenset(quiet))
    server: LocalServer | LocalCluster = (
        LocalCluster(kind=args.server, replicas=1)
        if args.cluster
        else LocalServer(args.server, appendonly=True)
    )
    options = {"kinds": args.kinds, "every": tuple(args.every), "seed": args.seed}
    more = {"ack_mode": args.ack_mode, "max_delay_ms": args.max_delay_ms}
    with server:
        try:
            result = anyio.run(partial(run, server, **options, **more))
        except (BenchError, FleetError, BaseExceptionGroup) as exc:
            error = first_error(exc)  # a worker's exit, a disruption's: out of a task group
            if not isinstance(error, BenchError | FleetError):
                raise
            sys.exit(f"{what} failed: {error}")
    args.output.write_bytes(msgspec.json.format(msgspec.json.encode(result)) + b"\n")
    print(render(result))
    if not result.ok:
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.seconds <= 0 or args.rate <= 0 or args.calls < 1 or args.workers < 2:
        sys.exit("--seconds and --rate must be above 0, --calls at least 1, --workers at least 2")
    load = {"seconds": args.seconds, "rate": args.rate, "calls": args.calls}
    run_main(args, partial(run, **load, workers=args.workers), render, "chaos run")


if __name__ == "__main__":
    main()
