"""The ``flowbus`` command line: ``worker``, ``demo``, ``simulate``, ``inspect``, ``dead``,
``end`` (what the last four do is in `commands`).

Every command reads the deployment from ``FLOWBUS_*`` environment variables, which its options
override. Errors a person can fix are one line on stderr and a non-zero status, never a
traceback: 2 for a usage or configuration mistake, 1 for a failure (the server unreachable or
refusing us, a demo that found a problem, a dead letter that cannot be replayed).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from redis.exceptions import NoPermissionError, RedisError

from bus import (
    Bus,
    BusError,
    CommandRefusedError,
    ConfigError,
    ConnectionFailedError,
    LifespanError,
    NotPermittedError,
    ServerUnreachableError,
    Settings,
    check_worker_id,
)
from bus.settings import VARIABLES

from . import commands, logs
from .commands import UsageError

EPILOG_WORKER = """\
examples:
  flowbus worker workers.sample:actions --redis-url redis://127.0.0.1:6379/0
  FLOWBUS_REDIS_URL=rediss://user:secret@redis:6380/0 flowbus worker myapp:crm --metrics-port 9100

MODULE:ATTR names a flowbus Service, an ActionService or EventService, or a function returning
one; the current directory is importable. Run as many replicas as you like: they share the
service's consumer group and split its partitions. SIGTERM drains and exits; a second one
stops at once. It runs on uvloop (FLOWBUS_EVENT_LOOP=asyncio for asyncio's own loop). Every
setting also has a FLOWBUS_* variable (the README's Operations lists them), e.g.
FLOWBUS_MIN_REPLICAS=1: its inbox writes return once a replica holds them.
"""

EPILOG_DEMO = """\
examples:
  flowbus demo                         # embedded server, 20 calls, a live view, a summary
  flowbus demo --calls 100 --keep      # then look around: flowbus inspect sessions
  flowbus demo --redis-url redis://127.0.0.1:6379/0 --json
"""

EPILOG_SIMULATE = """\
examples:
  flowbus simulate --calls 50 --rate 5      # against FLOWBUS_REDIS_URL
  flowbus simulate --calls 0                # until stopped (as compose.yaml's bots do)

The calls go through the sample flow, so the deployment must run workers.sample:actions and
workers.sample:crm.
"""

EPILOG_INSPECT = """\
examples:
  flowbus inspect sessions                  # live and ended sessions, current node, last seq
  flowbus inspect session call-42 --inbox   # one call's events and each group's progress
  flowbus inspect groups                    # services: workers, partitions, lag, pending
  flowbus inspect owners --group actions    # who holds each partition's lease
  flowbus inspect workers --json            # live workers, as JSON
"""

EPILOG_DEAD = """\
examples:
  flowbus dead list --group crm
  flowbus dead show 17/1767225600000-0
  flowbus dead replay 17/1767225600000-0    # handled again, in order, by its group
  flowbus dead drop --all --session call-42

A replay is handled after the session's current position: a session paused on the dead
letter (--dead-letter pause) is resumed in place; otherwise the event is republished to its
session for that group only. An ended session takes no new event: drop its dead letters.
Letters are replayed in each session's order; when one cannot be, the session's later ones
are left for you (status 1) rather than handled before it.
"""

EPILOG_END = """\
examples:
  flowbus end call-42                       # its bot crashed without ending it
  flowbus end --idle-for 3600 --dry-run     # which live sessions had no event for an hour
  flowbus end --idle-for 3600               # end them
  flowbus end --idle-for 3600 --every 60    # and so every minute, until stopped (a service)

A session ends when its bot publishes its last event (final); one whose bot went away first
stays live, its keys kept for good. An ended session takes no new event, and its keys expire
FLOWBUS_RETENTION_SECONDS after every service handled all of it: nothing unhandled is lost.
"""

WORKER_SETTINGS = (
    "cluster",
    "prefix",
    "partitions",
    "lease_ttl_seconds",
    "max_deliveries",
    "dead_letter_policy",
    "concurrency",
    "read_batch",
    "ack_mode",
)
#: Setting -> (option, environment variable), for messages about a bad value.
OPTIONS = {
    "url": "--redis-url or FLOWBUS_REDIS_URL",
    "cluster": "--cluster or FLOWBUS_CLUSTER",
    "prefix": "--prefix or FLOWBUS_PREFIX",
    "partitions": "--partitions or FLOWBUS_PARTITIONS",
    "lease_ttl_seconds": "--lease-ttl or FLOWBUS_LEASE_TTL_SECONDS",
    "max_deliveries": "--max-deliveries or FLOWBUS_MAX_DELIVERIES",
    "dead_letter_policy": "--dead-letter or FLOWBUS_DEAD_LETTER_POLICY",
    "concurrency": "--concurrency or FLOWBUS_CONCURRENCY",
    "read_batch": "--read-batch or FLOWBUS_READ_BATCH",
    "ack_mode": "--ack-mode or FLOWBUS_ACK_MODE",
}


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "console", "json")
#: What the command line reads from the environment besides the `Settings` fields.
ENVIRONMENT = (
    "FLOWBUS_METRICS_PORT",
    "FLOWBUS_CONNECT_ATTEMPTS",
    "FLOWBUS_LOG_LEVEL",
    "FLOWBUS_LOG_FORMAT",
    "FLOWBUS_EVENT_LOOP",
)


def _hint(error: BaseException) -> str:
    """What to check, said after `error` by every command: where no server answered."""
    if isinstance(error, ServerUnreachableError):
        return "; is the server running, and --redis-url (or FLOWBUS_REDIS_URL) right?"
    return ""


def _barge_in_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--barge-in-every",
        type=_at_least_zero,
        default=4,
        metavar="N",
        help="every N-th caller speaks over the bot's answer, cutting it short (default 4; "
        "0: none)",
    )


def _at_least_zero(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number is needed, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"0 or more is needed, not {value}")
    return value


def _connection_options(
    parser: argparse.ArgumentParser,
    *,
    log_level: str = "warning",
    prefix_help: str = "key prefix (default flowbus)",
) -> None:
    g = parser.add_argument_group("deployment (defaults from FLOWBUS_* environment variables)")
    g.add_argument("--redis-url", help="server URL; redis://, rediss:// (TLS) or unix://")
    g.add_argument("--prefix", help=prefix_help)
    g.add_argument("--partitions", type=int, help="partitions per deployment (default 64)")
    g.add_argument(
        "--cluster",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the server is a Redis (or Valkey) Cluster; --redis-url names any node (also "
        "FLOWBUS_CLUSTER=1; --no-cluster overrides that)",
    )
    g.add_argument(
        "--log-level",
        default=(os.environ.get("FLOWBUS_LOG_LEVEL") or log_level).lower(),
        type=str.lower,
        choices=LOG_LEVELS,
        help=f"also FLOWBUS_LOG_LEVEL (default {log_level})",
    )
    g.add_argument(
        "--log-format",
        default=os.environ.get("FLOWBUS_LOG_FORMAT") or "auto",
        choices=LOG_FORMATS,
        help="auto: readable on a terminal, JSON lines otherwise; also FLOWBUS_LOG_FORMAT",
    )


def _service_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("service (defaults from FLOWBUS_* environment variables)")
    g.add_argument(
        "--lease-ttl",
        type=float,
        dest="lease_ttl_seconds",
        metavar="SECONDS",
        help="partition lease lifetime (default 5)",
    )
    g.add_argument(
        "--max-deliveries", type=int, help="deliveries before dead-lettering (default 5)"
    )
    g.add_argument(
        "--dead-letter",
        choices=["skip", "pause"],
        dest="dead_letter_policy",
        help="after the last failed delivery: skip the event or pause the session",
    )
    g.add_argument("--concurrency", type=int, help="handlers at once in this process (default 256)")
    g.add_argument(
        "--read-batch",
        type=int,
        dest="read_batch",
        metavar="N",
        help="entries of a session read per step, still handled one at a time (default 32)",
    )
    g.add_argument(
        "--ack-mode",
        choices=["each", "batch"],
        dest="ack_mode",
        help="each (default): an event is acknowledged before its session's next is handled; "
        "batch: a read batch's events are acknowledged together, for about half again the "
        "events per second, and a crash can repeat up to --read-batch of a session's events",
    )


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    """The deployment's settings: the environment, overridden by the options given."""
    values: dict[str, Any] = {n: getattr(args, n, None) for n in WORKER_SETTINGS}
    values |= overrides
    try:
        return Settings.from_env(None, url=args.redis_url, **values)
    except ConfigError as exc:
        field = re.search(r"\$\.(\w+)|^FLOWBUS_(\w+)[=:]|^(\w+) must", str(exc))
        name = field and (field[1] or (field[2] or "").lower() or field[3])
        if name in OPTIONS:
            raise ConfigError(f"{exc} (set by {OPTIONS[name]})") from None
        raise


def _env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, not {value!r}") from None


def _worker_id(text: str) -> str:
    try:
        return check_worker_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _subparser(
    sub: Any, name: str, help: str, description: str, epilog: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="flowbus",
        description="Pipecat Flows actions and Pipecat event handlers as ordered, horizontally "
        "scaled services on Redis Streams.",
        epilog="examples:\n  flowbus demo\n  flowbus worker myapp:actions\n"
        "  flowbus inspect sessions\n\nflowbus COMMAND --help shows each command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    worker = _subparser(
        sub,
        "worker",
        "run a service (a consumer group) in this process",
        "Run the service named by MODULE:ATTR until SIGTERM, then drain.",
        EPILOG_WORKER,
    )
    worker.add_argument("target", metavar="MODULE:ATTR", help="the service to run")
    worker.add_argument(
        "--worker-id",
        type=_worker_id,
        help="name in the group's membership, unique among its workers: no whitespace, control "
        "characters or braces (default host-pid-random)",
    )
    worker.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics (/metrics) and health (/healthz) on PORT (0: any free "
        "one, logged); also FLOWBUS_METRICS_PORT",
    )
    worker.add_argument(
        "--metrics-host", default="0.0.0.0", help="address to serve metrics on (default 0.0.0.0)"
    )
    worker.add_argument(
        "--connect-attempts",
        type=int,
        metavar="N",
        help="tries of the first connection, with backoff, before giving up (default 8); "
        "also FLOWBUS_CONNECT_ATTEMPTS",
    )
    _connection_options(worker, log_level="info")
    _service_options(worker)

    demo = _subparser(
        sub,
        "demo",
        "run the whole system on one machine and show it",
        "Start the embedded server (unless --redis-url), two workers of the sample actions "
        "service and one of its crm event handlers, drive simulated calls through the sample "
        "flow (every fourth caller speaks over the bot) with a live view, then check every "
        "call's order and print a summary.",
        EPILOG_DEMO,
    )
    demo.add_argument("--calls", type=int, default=20, help="simulated calls (default 20)")
    demo.add_argument(
        "--keep",
        action="store_true",
        help="leave the embedded server running, and say how to connect",
    )
    demo.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    _barge_in_option(demo)
    _connection_options(
        demo,
        prefix_help="key prefix (default flowbus on the embedded server, a fresh "
        "demo-<random> one, printed, on a server given by --redis-url)",
    )

    simulate = _subparser(
        sub,
        "simulate",
        "drive simulated calls through the sample flow",
        "Run simulated bots (a FlowManager with a scripted LLM and a simulated TTS, emitting "
        "Pipecat events; every fourth caller speaks over the bot) against a deployment running "
        "workers.sample.",
        EPILOG_SIMULATE,
    )
    simulate.add_argument(
        "--calls", type=int, default=10, help="calls in all; 0: until stopped (default 10)"
    )
    simulate.add_argument(
        "--rate", type=float, default=2.0, help="calls started per second (default 2)"
    )
    simulate.add_argument(
        "--concurrency",
        type=int,
        default=20,
        dest="calls_at_once",  # not the worker setting of that name
        metavar="N",
        help="calls at once, at most (default 20)",
    )
    simulate.add_argument(
        "--wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the sample services' workers (default 60)",
    )
    _barge_in_option(simulate)
    _connection_options(simulate, log_level="info")

    inspect = _subparser(
        sub,
        "inspect",
        "show sessions, groups, partition owners and workers",
        "Read-only views of a deployment.",
        EPILOG_INSPECT,
    )
    what = inspect.add_subparsers(dest="what", required=True, metavar="WHAT")
    for name, help, epilog in (
        ("sessions", "live and ended sessions", "example:\n  flowbus inspect sessions --live"),
        ("session", "one session's events, decoded, with each group's progress",
         "examples:\n  flowbus inspect session call-42 --inbox\n"
         "  flowbus inspect session call-42 --follow   # then each new event, until it ends"),
        ("groups", "services: workers, partitions, lag, pending, paused, dead letters",
         "example:\n  flowbus inspect groups --json"),
        ("owners", "the owner of every partition's lease, per group",
         "example:\n  flowbus inspect owners --group actions"),
        ("workers", "live workers of every group", "example:\n  flowbus inspect workers"),
    ):  # fmt: skip
        p = _subparser(what, name, help, help[0].upper() + help[1:] + ".", epilog)
        if name == "sessions":
            p.add_argument("--live", action="store_true", help="only sessions still live")
            p.add_argument(
                "--limit",
                type=int,
                default=50,
                help="at most this many, live ones first, then the latest started; stderr says "
                "how many more there are (default 50)",
            )
        if name == "session":
            p.add_argument(
                "session", metavar="SESSION", help="the session id, as inspect sessions shows it"
            )
            p.add_argument("--inbox", action="store_true", help="also show the bot's inbox")
            p.add_argument(
                "-f",
                "--follow",
                action="store_true",
                help="then print each new event (and inbox entry, with --inbox) as it comes, "
                "until the session ends (with --inbox, until every service is done with it, "
                "which may write to the inbox meanwhile; Ctrl-C stops sooner); a session not "
                "started yet is waited for; with --json, one JSON object a line: "
                '{"stream": "session" or "inbox", "entry": {...}}',
            )
        if name == "owners":
            p.add_argument("--group", help="only this group")
        p.add_argument("--json", action="store_true", help="print JSON")
        _connection_options(p)

    end = _subparser(
        sub,
        "end",
        "end sessions whose bots went away without ending them",
        "Mark sessions ended without an event, so that their keys expire once every service "
        "handled them.",
        EPILOG_END,
    )
    end.add_argument("sessions", nargs="*", metavar="SESSION", help="the sessions to end")
    end.add_argument(
        "--idle-for",
        type=float,
        metavar="SECONDS",
        help="every live session whose last event is at least this old",
    )
    end.add_argument(
        "--every",
        type=float,
        metavar="SECONDS",
        help="with --idle-for: end the idle sessions every this many seconds, until SIGTERM or "
        "SIGINT (exit 0); a round the server does not answer is logged and tried again",
    )
    end.add_argument("--dry-run", action="store_true", help="say what would end; end nothing")
    end.add_argument(
        "--reason",
        default="ended by an operator",
        help="kept in the session's meta as end_reason (default: ended by an operator)",
    )
    _connection_options(end)

    dead = _subparser(
        sub, "dead", "list, show, replay or drop dead letters", "Dead letters.", EPILOG_DEAD
    )
    action = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help, epilog in (
        ("list", "list dead letters", "example:\n  flowbus dead list --session call-42"),
        ("show", "show one dead letter in full",
         "example:\n  flowbus dead show 17/1767225600000-0"),
        ("replay", "hand dead letters back to their group, in order",
         "examples:\n  flowbus dead replay 17/1767225600000-0\n"
         "  flowbus dead replay --all --group crm"),
        ("drop", "remove dead letters (a paused session goes on without the event)",
         "example:\n  flowbus dead drop 17/1767225600000-0"),
    ):  # fmt: skip
        p = _subparser(action, name, help, help[0].upper() + help[1:] + ".", epilog)
        if name == "show":
            p.add_argument("ref", metavar="DEAD_LETTER", help="P/ID, as dead list shows it")
        if name in ("replay", "drop"):
            p.add_argument(
                "refs", nargs="*", metavar="DEAD_LETTER", help="P/ID, as dead list shows it"
            )
            p.add_argument("--all", action="store_true", help="every dead letter (that matches)")
        if name in ("list", "replay", "drop"):
            p.add_argument("--group", help="only dead letters of this group")
            p.add_argument("--session", help="only dead letters of this session")
        if name in ("list", "show"):
            p.add_argument("--json", action="store_true", help="print JSON")
        if name == "list":
            p.add_argument(
                "--limit",
                type=int,
                help="at most this many, oldest first (default 200; with --json, all)",
            )
        _connection_options(p)
    return top


def _unknown_variables(env: Mapping[str, str]) -> list[str]:
    """A line for each ``FLOWBUS_*`` variable in `env` that nothing reads (a misspelt one
    would be ignored without a word), with the name it may have meant."""
    known = {*VARIABLES.values(), *ENVIRONMENT, "FLOWBUS_TEST_SERVER"}
    lines = []
    for name in sorted(n for n in env if n.startswith("FLOWBUS_") and n not in known):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        meant = f" (did you mean {close[0]}?)" if close else ""
        lines.append(f"flowbus: {name} is not a flowbus variable, and is ignored{meant}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    for line in _unknown_variables(os.environ):
        print(line, file=sys.stderr)
    args = parser().parse_args(argv)
    try:
        if args.log_level not in LOG_LEVELS:
            raise ConfigError(f"FLOWBUS_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")
        if args.log_format not in LOG_FORMATS:
            raise ConfigError(f"FLOWBUS_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}")
        logs.configure(args.log_level, args.log_format)
        if args.command == "worker":
            return _worker(args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args, _settings)
        command: Callable[[Bus, argparse.Namespace], Any] = {
            "simulate": commands.simulate,
            "inspect": commands.inspect,
            "dead": commands.dead,
            "end": commands.end,
        }[args.command]
        settings = _settings(args)
        from .runtime import run

        return run(_with_bus, settings, command, args)
    except UsageError as exc:
        print(f"flowbus: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"flowbus: {exc}", file=sys.stderr)
        return 2
    except NoPermissionError as exc:
        return _not_permitted(str(exc).rpartition("caused error: ")[2].strip("()\"',"))
    except (BusError, RedisError) as exc:  # ConnectionFailedError among them
        if isinstance(exc, CommandRefusedError) and exc.reason.startswith("NOPERM"):
            return _not_permitted(exc.reason)
        if isinstance(exc, NotPermittedError):
            return _not_permitted(exc.reason)
        print(f"flowbus: {exc}{_hint(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        return getattr(exc, "status", 130)
    except BrokenPipeError:  # the reader went away (| head): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _not_permitted(reason: str) -> int:
    print(
        f"flowbus: not permitted: {reason} (an ACL user needs the commands the README's "
        "'Operations' lists, on the prefix's keys and channels)",
        file=sys.stderr,
    )
    return 1


async def _with_bus(
    settings: Settings, command: Callable[[Bus, argparse.Namespace], Any], args: argparse.Namespace
) -> int:
    async with Bus.connect(settings, attempts=3) as bus:
        result: int = await command(bus, args)
        return result


def _worker(args: argparse.Namespace) -> int:
    from .app import AppLoadError, load_service, where
    from .runtime import first_error, run, serve, tune_gc

    settings = _settings(args)
    port = (
        args.metrics_port
        if args.metrics_port is not None
        else _env_int("FLOWBUS_METRICS_PORT", None)
    )
    if port is not None and not 0 <= port <= 65_535:
        raise ConfigError(f"--metrics-port (or FLOWBUS_METRICS_PORT) must be 0..65535, not {port}")
    attempts = args.connect_attempts
    if attempts is None:
        attempts = _env_int("FLOWBUS_CONNECT_ATTEMPTS", 8)
    if attempts is None or attempts < 1:
        raise ConfigError(
            f"--connect-attempts (or FLOWBUS_CONNECT_ATTEMPTS) must be at least 1, not {attempts}"
        )
    try:
        service = load_service(args.target)
    except AppLoadError as exc:
        print(f"flowbus: {exc}", file=sys.stderr)
        return 2
    tune_gc()
    try:
        return run(
            lambda: serve(
                settings,
                service,
                worker_id=args.worker_id,
                connect_attempts=attempts,
                metrics_port=port,
                metrics_host=args.metrics_host,
            )
        )
    except (ConnectionFailedError, LifespanError, OSError, BaseExceptionGroup) as exc:
        error = first_error(exc)  # the consumer's own task group wraps what it raises
        if isinstance(error, ConnectionFailedError) and not isinstance(error, NotPermittedError):
            print(f"flowbus: {error}{_hint(error)}", file=sys.stderr)
        elif isinstance(error, LifespanError) and error.__cause__ is not None:
            print(f"flowbus: {error}: {where(error.__cause__)}", file=sys.stderr)
        elif isinstance(exc, OSError):  # binding the metrics port, before anything runs
            address = f"{args.metrics_host}:{port}"
            print(f"flowbus: cannot serve metrics on {address}: {error}", file=sys.stderr)
        else:
            raise error from None  # for `main` to say what it is
        return 1
