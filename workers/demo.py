"""``flowbus demo``: simulated calls through a Pipecat-Flows-style flow, shown live, then checked.

It starts the embedded Valkey (unless a Redis URL is given), two worker processes of the sample
``actions`` service and one of the sample ``crm`` event handlers (`workers.sample`), waits until
they have split the partitions, and runs `--calls` simulated bots (`workers.bots`) in this
process while a live view shows where the calls are. When every call is over and both services
have handled every event, it checks each call's order from its session stream and the services'
journal (`workers.verify`), drains the workers with SIGTERM, prints the summary, and stops the
server (unless `--keep`).

Every wait has a deadline; a stall is an error that names what did not happen.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec

from bus import Bus, ConfigError, Keys, Settings

from . import demo_report as report
from .bots import Board, run_calls
from .fleet import Fleet, FleetError
from .journal import Record, read_journal
from .live import LiveView
from .observe import dead_letter_count, server_identity
from .runtime import first_error, run
from .server import LocalServer, ServerError
from .verify import CallCheck, check_call, latencies_ms

SettingsFactory = Callable[..., Settings]
ROOT = Path(__file__).resolve().parent.parent

#: How long the workers get to split the partitions, on top of two lease TTLs.
SPLIT_SECONDS = 30.0
#: How long the calls may take, at least; more calls get more time.
CALLS_SECONDS = 60.0
#: The simulated TTS speaks this long per character; calls start this far apart.
SECONDS_PER_CHAR = 0.008
STAGGER_SECONDS = 0.1

SERVICES = (("actions", "workers.sample:actions", 2), ("crm", "workers.sample:crm", 1))
#: The commands the demo prints name its partition count only when it is not this one.
DEFAULT_PARTITIONS = Settings().partitions


class DemoError(RuntimeError):
    """The demo could not run to its verdict (a stall, a worker that died); says what."""


@dataclass
class _Options:
    calls: int
    keep: bool
    json: bool
    barge_in_every: int


def run_demo(args: argparse.Namespace, settings_factory: SettingsFactory) -> int:
    """Run the demo for the parsed ``flowbus demo`` arguments; return the exit status: 0 only
    if every call completed, in order, with no dead letter."""
    started = time.monotonic()
    options = _Options(args.calls, args.keep, args.json, args.barge_in_every)
    if options.calls < 1:
        raise ConfigError("--calls must be at least 1")
    url = args.redis_url or os.environ.get("FLOWBUS_REDIS_URL")
    if url and options.keep:
        raise ConfigError(
            "--keep leaves the embedded server running; with --redis-url (or FLOWBUS_REDIS_URL) "
            "the demo uses that server, whose data stays anyway"
        )
    work = Path(tempfile.mkdtemp(prefix="flowbus-demo-"))
    server: LocalServer | None = None
    fleets: list[Fleet] = []
    settings: Settings | None = None
    prefix = args.prefix or os.environ.get("FLOWBUS_PREFIX")
    prefix = prefix or ("flowbus" if not url else f"demo-{secrets.token_hex(4)}")
    ok, failed, served = False, False, False
    # Stop signals: the first raises where the demo is (while the calls run on the event loop,
    # stops them: `_until_stopped`), and the `finally` below stops what it started. Not
    # asyncio's Ctrl-C (one cancellation of the main task), which Python 3.11's `wait_for`, the
    # Redis client's, swallows when what it waits for completes meanwhile: the demo ran on.
    # SIGHUP (the terminal closed) would end it at once, its directory left.
    stops = _Stops()  # (restored in the `finally` right below)
    try:
        if not url:
            server = LocalServer("valkey", directory=work / "server", outlive=args.keep)
            (work / "server").mkdir()
            server.start()
            served = True  # from here on, its exit is a death (before, `start` says why)
            _say(f"started the embedded server: {server.binary.name} on {server.url}")
        overrides = {"redis_url": server.url if server else url, "prefix": prefix}
        settings = settings_factory(argparse.Namespace(**{**vars(args), **overrides}))
        fleets = [
            Fleet(settings, target, group, work / "logs", cwd=ROOT, log_level="warning")
            for group, target, _ in SERVICES
        ]
        summary = run(_run, stops, settings, options, fleets, server, started)
        ok, failed = summary.ok, not summary.ok
        _print_summary(summary, options, settings)
    except Exception as exc:
        # The embedded server's death is the cause of whatever failed after it (a refused
        # connection, a worker that lost it): say so, with its log, not the consequence.
        died = _server_death(server) if served else None
        if died is None and not isinstance(exc, (DemoError, FleetError, ServerError)):
            raise
        failed = True
        print(f"flowbus demo: {died or exc}", file=sys.stderr)
    finally:
        stops.hold()  # a second Ctrl-C (or any stop signal) lets this cleanup finish
        for fleet in fleets:
            fleet.kill_all()  # only after an error or an interrupt is anything still running
        process = server.process if server is not None else None
        kept = options.keep and process is not None and process.poll() is None
        if server is not None and process is not None:
            if kept:
                _print_kept(server, options, prefix, settings)
            else:
                if options.keep and not failed:  # gone: the terminal's Ctrl-C reached it too
                    print(
                        "flowbus demo: the embedded server stopped too; nothing is kept",
                        file=sys.stderr,
                    )
                server.stop()
        if failed and any(work.iterdir()):
            print(f"flowbus demo: worker and server logs are kept in {work}", file=sys.stderr)
        elif not kept:
            shutil.rmtree(work, ignore_errors=True)
        stops.restore()
    if stops.received:  # during the cleanup of a run that ended otherwise: it ends so
        raise Terminated(stops.received[0])
    return 0 if ok else 1


#: How long a server whose client lost it gets to be seen exited: its sockets close a moment
#: before its parent can reap it.
SERVER_EXIT_SECONDS = 1.0


def _server_death(server: LocalServer | None) -> str | None:
    """What to say if the embedded server has exited under the demo; None while it runs."""
    process = server.process if server is not None else None
    if server is None or process is None:
        return None
    try:
        code = process.wait(SERVER_EXIT_SECONDS)
    except subprocess.TimeoutExpired:
        return None
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    return (
        f"the embedded server (pid {process.pid}) died ({how}); its log "
        f"({server.directory / 'server.log'}) ends with:\n{server.log_tail()}"
    )


#: Signals that stop the demo, everything it started stopped first.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
T = TypeVar("T")


class Terminated(KeyboardInterrupt):
    """A signal of `STOP_SIGNALS` (everything started is stopped); exit status 128 + its
    number (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.status = 128 + signum


class _Stops:
    """The demo's handling of `STOP_SIGNALS`, each noted in `received`: the first raises
    `Terminated` where the demo is, or, while `wake` is set (the calls run on the event loop),
    calls it instead (`_until_stopped`); from then on, and while the demo cleans up, they are
    only noted. Raised again, one stopped the cleanup half way (the workers, the server or the
    directory left), or, inside the event loop's callbacks as it closed its connections, was
    logged with a traceback ("Fatal error on transport")."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.wake: Callable[[], object] | None = None
        self._previous = {sig: signal.signal(sig, self._raise) for sig in STOP_SIGNALS}

    def _raise(self, signum: int, frame: object) -> None:
        self.hold()
        self.received.append(signum)
        if self.wake is not None:
            self.wake()
            return
        raise Terminated(signum)

    def _note(self, signum: int, frame: object) -> None:
        self.received.append(signum)

    def hold(self) -> None:
        """Note stop signals from now on, not raise them."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._note)

    def restore(self) -> None:
        """The handlers from before the demo, back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


async def _run(
    stops: _Stops,
    settings: Settings,
    options: _Options,
    fleets: list[Fleet],
    server: LocalServer | None,
    started: float,
) -> report.Summary:
    # A stop signal's `Terminated` raised inside one of the loop's own callbacks (a socket's),
    # before `_until_stopped` took over, reaches the code waiting on it all the same; the
    # loop's log of it is noise.
    asyncio.get_running_loop().set_exception_handler(_quiet_about_stops)
    try:
        return await _until_stopped(
            stops, partial(_run_and_check, settings, options, fleets, server, started)
        )
    except BaseExceptionGroup as group:  # a task group's error: show the error itself
        raise first_error(group) from None


async def _until_stopped(stops: _Stops, run: Callable[[], Awaitable[T]]) -> T:
    """`run()`, which a stop signal ends with `Terminated`. While it runs the signal is not
    raised where the demo is: raised in a weakref callback or a destructor, as the garbage
    collector runs them, an exception is only printed ("Exception ignored in"), and the demo
    ran on to its end. It wakes the loop instead, which cancels `run` (at its next step, and
    again at every later one, so no `wait_for` swallows it); then `Terminated` is raised here,
    once `run` has unwound. (Not in a task: asyncio lets a `KeyboardInterrupt` raised in one
    out of the loop at once.)"""
    stopped = anyio.Event()
    stops.wake = partial(asyncio.get_running_loop().call_soon_threadsafe, stopped.set)
    try:
        async with anyio.create_task_group() as tg:

            async def on_stop() -> None:
                await stopped.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(on_stop)
            if stops.received:  # one came before the loop ran
                stopped.set()
            result = await run()
            tg.cancel_scope.cancel()
    finally:
        stops.wake = None
    if stopped.is_set():
        raise Terminated(stops.received[0])
    return result


def _quiet_about_stops(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    if not isinstance(context.get("exception"), Terminated):
        loop.default_exception_handler(context)


async def _run_and_check(
    settings: Settings,
    options: _Options,
    fleets: list[Fleet],
    server: LocalServer | None,
    started: float,
) -> report.Summary:
    async with Bus.connect(settings, attempts=5) as bus:
        identity = await server_identity(bus.redis)
        if server is None:
            await _claim_prefix(bus)
        for fleet, (group, target, count) in zip(fleets, SERVICES, strict=True):
            fleet.start(count, id_prefix=group)
            _say(f"started {count} worker process{'es' * (count > 1)} of {target}")
        within = SPLIT_SECONDS + 2 * settings.lease_ttl_seconds
        for fleet in fleets:
            owners = await fleet.wait_split(bus, within=within)
            shares = ", ".join(f"{w} holds {len(ps)}" for w, ps in sorted(owners.items()))
            _say(f"{fleet.group}: partitions split: {shares}")

        # On a server of its own the calls are call-01...; elsewhere a run id keeps them apart
        # from an earlier run's (an ended session takes no new event).
        run = "" if server else f"{secrets.token_hex(4)}-"
        width = max(2, len(str(options.calls)))
        sessions = [f"call-{run}{i:0{width}d}" for i in range(1, options.calls + 1)]
        board = Board(dict.fromkeys(sessions, "waiting"))
        view = LiveView(bus, board)
        _say(f"running {len(sessions)} call{'s' * (len(sessions) != 1)} through the sample flow")
        calls_started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(view.run)
            tg.start_soon(_watch_workers, fleets)
            limit = CALLS_SECONDS + len(sessions) * STAGGER_SECONDS
            with anyio.move_on_after(limit) as scope:
                await run_calls(
                    bus,
                    sessions,
                    board=board,
                    stagger=STAGGER_SECONDS,
                    seconds_per_char=SECONDS_PER_CHAR,
                    barge_in_every=options.barge_in_every,
                )
                await _wait_settled(bus, sessions)
            tg.cancel_scope.cancel()
        calls_seconds = time.monotonic() - calls_started
        final = await view.final()
        if scope.cancelled_caught:
            raise DemoError(f"the calls were not over within {limit:.0f}s: {final.by_node}")

        subscriptions = {
            s.name: frozenset(s.subscribes)
            for s in await bus.services(fresh=True)
            if s.subscribes and s.name in {f.group for f in fleets} - {"actions"}
        }
        handler_services = {f.group for f in fleets} - {"actions"}
        if subscriptions.keys() != handler_services:  # else their check would be skipped
            missing = sorted(handler_services - subscriptions.keys())
            raise DemoError(f"the service registry lists no subscriptions of {missing}")
        checks: list[CallCheck] = []
        journals: dict[str, list[Record]] = {}
        latencies: list[float] = []
        for session in sessions:
            stream = await bus.history(session)
            journals[session] = await read_journal(bus.redis, settings.prefix, session)
            checks.append(check_call(session, stream, journals[session], subscriptions))
            latencies += latencies_ms(stream, journals[session])
        dead = await dead_letter_count(bus, sessions)
        exits: dict[str, int] = {}
        for fleet in fleets:
            exits |= await fleet.stop(within=settings.drain_timeout_seconds + 5)
        _say("workers drained and stopped: " + _exit_text(exits))

    in_order = sum(1 for c in checks if c.ok and c.session not in board.failures)
    completed = sum(1 for c in checks if c.ended)
    events = sum(c.events for c in checks)
    handled: dict[str, int] = defaultdict(int)
    for c in checks:
        for service, n in c.handled.items():
            handled[service] += n
    keys = Keys(settings.prefix, settings.partitions)
    cli = f"redis-cli -p {server.port}" if server else f"redis-cli -u {settings.redacted_url}"
    where = f" --redis-url {shlex.quote(settings.redacted_url)}"
    if settings.cluster:  # redis-cli follows the cluster's redirections with -c
        cli, where = f"{cli} -c", f"{where} --cluster"
    if settings.prefix != "flowbus":
        where += f" --prefix {settings.prefix}"
    if settings.partitions != DEFAULT_PARTITIONS:  # the deployment's: another is refused
        where += f" --partitions {settings.partitions}"
    return report.Summary(
        ok=(
            in_order == completed == len(sessions)
            and dead == 0
            and all(code == 0 for code in exits.values())
        ),
        server=report.ServerInfo(
            identity.name,
            identity.version,
            settings.redacted_url,
            embedded=server is not None,
            kept=server is not None and options.keep,
            pid=identity.pid if server else None,
            directory=str(server.directory) if server else None,
        ),
        prefix=settings.prefix,
        calls=len(sessions),
        calls_completed=completed,
        calls_in_order=in_order,
        events=events,
        actions_run=sum(c.actions for c in checks),
        replies_cut=sum(c.replies_cut for c in checks),
        handled=dict(handled),
        latency_ms=report.latency_summary(latencies),
        dead_letters=dead,
        workers=_shares(fleets, journals, exits),
        problems=report.problems_of(checks, board.failures),
        calls_seconds=round(calls_seconds, 3),
        events_per_second=round(events / calls_seconds, 1),
        wall_seconds=round(time.monotonic() - started, 3),
        inspect=report.inspect_commands(cli, where, keys, sessions[0]),
    )


async def _watch_workers(fleets: list[Fleet]) -> None:
    while True:
        for fleet in fleets:
            fleet.check_alive()
        await anyio.sleep(0.2)


async def _wait_settled(bus: Bus, sessions: list[str]) -> None:
    """Until every group has read and acknowledged every event of every call."""
    while True:
        pipe = bus.redis.pipeline(transaction=False)
        for session in sessions:
            pipe.xinfo_groups(bus.keys.session(session))
            pipe.xrevrange(bus.keys.session(session), count=1)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        if all(
            _settled(groups, last) for groups, last in zip(replies[::2], replies[1::2], strict=True)
        ):
            return
        await anyio.sleep(0.05)


def _settled(groups: Any, last: Any) -> bool:
    if not isinstance(groups, list) or not isinstance(last, list) or not last:
        return False
    last_id = last[0][0]
    return bool(groups) and all(
        g["pending"] == 0 and g["last-delivered-id"] == last_id for g in groups
    )


def _shares(
    fleets: list[Fleet], journals: dict[str, list[Record]], exits: dict[str, int]
) -> list[report.WorkerShare]:
    records: dict[int, int] = defaultdict(int)
    calls: dict[int, set[str]] = defaultdict(set)
    for session, journal in journals.items():
        for record in journal:
            records[record.pid] += 1
            calls[record.pid].add(session)
    return [
        report.WorkerShare(
            w.worker_id,
            fleet.group,
            w.pid,
            records[w.pid],
            len(calls[w.pid]),
            exits.get(w.worker_id),
        )
        for fleet in fleets
        for w in fleet.workers
    ]


def _say(text: str) -> None:
    print(f"flowbus demo: {text}", file=sys.stderr, flush=True)


async def _claim_prefix(bus: Bus) -> None:
    """On a server given, refuse a prefix that a deployment other than a demo uses (the demo
    registers its services there, and prints a command that deletes every key under it); mark
    it as a demo's (``demo`` in its deployment hash), for the demo to run there again."""
    key, prefix = bus.keys.deployment(), bus.keys.prefix
    if await bus.redis.hlen(bus.keys.services()) and not await bus.redis.hexists(key, "demo"):
        raise DemoError(
            f"prefix {prefix!r} on that server is a deployment's (it has services registered) "
            "and not an earlier demo's: the demo would run its own services there and tell you "
            "to delete every key under it; give --prefix a name of the demo's own, or leave "
            "it out (and FLOWBUS_PREFIX unset) for a fresh one"
        )
    await bus.redis.hset(key, "demo", "1")


def _exit_text(exits: dict[str, int]) -> str:
    return ", ".join(f"{w} exited {code}" for w, code in sorted(exits.items()))


def _print_summary(summary: report.Summary, options: _Options, settings: Settings) -> None:
    if options.json:
        sys.stdout.write(msgspec.json.encode(summary).decode() + "\n")
    else:
        print(report.render(summary))
        if summary.server.embedded and not options.keep:
            print("  (the embedded server stops now; run with --keep to keep it for these)")
        elif not summary.server.embedded:
            cli = f"redis-cli -u {summary.server.url}"
            pattern = shlex.quote(f"{summary.prefix}:*")
            if settings.cluster:  # a scan reads one node; a DEL of keys of many slots fails
                print(
                    "Remove the demo's keys (on every primary node of the cluster):\n"
                    f"  {cli} --scan --pattern {pattern} | xargs -n 1 {cli} -c DEL"
                )
            else:
                print(
                    f"Remove the demo's keys:\n  {cli} --scan --pattern {pattern} | xargs {cli} DEL"
                )
    sys.stdout.flush()


def _print_kept(
    server: LocalServer, options: _Options, prefix: str, settings: Settings | None
) -> None:
    assert server.process is not None
    env = f"FLOWBUS_REDIS_URL={server.url}"
    if prefix != "flowbus":
        env += f" FLOWBUS_PREFIX={prefix}"
    if settings is not None and settings.partitions != DEFAULT_PARTITIONS:
        env += f" FLOWBUS_PARTITIONS={settings.partitions}"
    text = (
        f"The embedded server keeps running (pid {server.process.pid}, files in "
        f"{server.directory}):\n"
        f"  connect: redis-cli -p {server.port}     (URL {server.url})\n"
        f"  inspect: {env} flowbus inspect sessions\n"
        f"  stop:    kill {server.process.pid}"
    )
    print(text, file=sys.stderr if options.json else sys.stdout, flush=True)
