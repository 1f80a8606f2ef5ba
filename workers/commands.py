"""What ``flowbus simulate``, ``inspect``, ``end`` and ``dead`` do, given a connected bus and
their parsed arguments: each prints what it found on stdout, says what went wrong on stderr in
one line, and returns the exit status (`UsageError`, a mistake on the command line: 2).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import msgspec
import structlog

from bus import Bus, ConnectionFailedError, InvalidSessionIdError, check_session_id
from bus.connection import call

if TYPE_CHECKING:
    from .inspection import SessionDetail

log = structlog.get_logger("flowbus.cli")
T = TypeVar("T")


class UsageError(Exception):
    """A command line that cannot run as given; the message says what to change."""


async def simulate(bus: Bus, args: argparse.Namespace) -> int:
    from . import bots

    if args.calls < 0 or not args.rate >= 1e-300 or args.calls_at_once < 1 or not args.wait >= 0:
        raise UsageError(  # (a rate of 1e-320 calls a second is a wait of for ever)
            "--calls must be 0 or more, --rate at least 1e-300, --concurrency at least 1, "
            "--wait 0 or more"
        )
    try:
        done = await bots.simulate(
            bus,
            calls=args.calls,
            rate=args.rate,
            concurrency=args.calls_at_once,
            wait=args.wait,
            barge_in_every=args.barge_in_every,
        )
    except bots.ServicesMissingError as exc:
        print(f"flowbus: {exc}", file=sys.stderr)
        return 1
    cut = f", {done.cut} cut short (their sessions ended)" if done.cut else ""
    print(f"{done.ended} calls ended, {done.failed} failed{cut}", file=sys.stderr)
    if done.cut and done.signal is not None:
        return 128 + done.signal  # stopped hard
    return 1 if done.failed else 0


def _print_json(value: object) -> None:
    sys.stdout.write(msgspec.json.encode(value).decode() + "\n")


async def inspect(bus: Bus, args: argparse.Namespace) -> int:
    from . import inspection as i
    from . import views

    read = partial(_again, bus, f"inspect {args.what}")
    now = await read(i.server_ms, bus)
    result: object
    more = ""  # what was left out, said on stderr
    if args.what == "sessions":
        if args.limit < 1:
            raise UsageError(f"--limit must be at least 1, not {args.limit}")
        rows, total = await read(i.sessions, bus, ended=not args.live, limit=args.limit)
        result, text = rows, views.render_sessions(rows, now)
        if total > len(rows):
            more = f"{total - len(rows)} more sessions not shown (--limit N shows more)"
        elif not rows:  # the wrong server or prefix, often
            more = f"none {_where(bus)}"
    elif args.what == "session":
        try:
            check_session_id(args.session)
        except InvalidSessionIdError as exc:
            raise UsageError(str(exc)) from None
        result = detail = await read(i.session_detail, bus, args.session, inbox=args.inbox)
        unknown = not detail.events and not detail.meta
        if unknown and not args.follow:
            print(
                f"flowbus: no session {args.session!r} {_where(bus)} ({NO_SESSION_HINT})",
                file=sys.stderr,
            )
            return 1
        if unknown:  # a call about to start is followed from its first event
            more = f"no session {args.session!r} yet {_where(bus)}: waiting for it"
        text = "" if unknown else views.render_session(detail, now)
    elif args.what == "groups":
        result = groups = await read(i.groups, bus)
        text = views.render_groups(groups)
        if not groups:
            more = f"none {_where(bus)}"
    elif args.what == "owners":
        if args.group and args.group not in {s.name for s in await bus.services(fresh=True)}:
            print(
                f"flowbus: no service {args.group!r} (flowbus inspect groups lists them)",
                file=sys.stderr,
            )
            return 1
        result = owners = await read(i.owners, bus, args.group)
        text = views.render_owners(owners, bus.settings.partitions)
    else:
        result = members = await read(i.members, bus)
        text = views.render_members(members)
    if args.json:
        _print_json(result)
    elif text:
        print(text)
    if more:
        print(f"flowbus: {more}", file=sys.stderr)
    if args.what == "session" and args.follow:
        await _follow(bus, detail, args)
    return 0


async def _follow(bus: Bus, detail: SessionDetail, args: argparse.Namespace) -> None:
    from . import inspection as i
    from . import views

    started = int(detail.meta.get("started", 0))
    if not args.json:
        if detail.events or detail.meta:  # a line between it and the table above
            print()
        print(f"following {detail.session} (Ctrl-C stops):")
    sys.stdout.flush()  # what is there, before waiting for more

    def on_services() -> None:
        print(
            f"flowbus: {detail.session} ended; its inbox is followed until every service is "
            "done with it (Ctrl-C stops)",
            file=sys.stderr,
        )

    async for stream, row in i.follow(bus, detail, inbox=args.inbox, on_services=on_services):
        started = started or row.ts  # a session that had not started: from its first event
        if args.json:
            _print_json({"stream": stream, "entry": row})
        else:
            print(views.render_followed(stream, row, started))
        sys.stdout.flush()  # a pipe (| grep) sees each event when it comes
    if not args.json:
        print(f"session {detail.session} ended")


async def end(bus: Bus, args: argparse.Namespace) -> int:
    if bool(args.sessions) == (args.idle_for is not None):
        both = ", not both" if args.sessions else ""
        raise UsageError(f"end: name sessions or give --idle-for SECONDS{both}")
    if args.idle_for is not None and not 0 <= args.idle_for < float("inf"):
        raise UsageError(f"--idle-for must be 0 or more seconds, not {args.idle_for}")
    if args.every is not None:
        if args.idle_for is None:
            raise UsageError("--every repeats --idle-for, not the ending of named sessions")
        if args.dry_run:
            raise UsageError("--every ends sessions; a --dry-run would say the same each time")
        if not 0 < args.every < float("inf"):
            raise UsageError(f"--every must be above 0 seconds, not {args.every}")
        return await end_every(bus, args)
    for session in args.sessions:
        try:
            check_session_id(session)
        except InvalidSessionIdError as exc:
            raise UsageError(str(exc)) from None
    if args.idle_for is not None:
        targets = await _idle(bus, args.idle_for)
    else:
        targets = [(s, "") for s in dict.fromkeys(args.sessions)]
    return await _end_each(bus, targets, args)


async def _idle(bus: Bus, seconds: float) -> list[tuple[str, str]]:
    """(session, how long it was idle, said) of every live session idle for `seconds`; read
    again after a lost connection (`call`)."""
    from .inspection import idle_sessions
    from .views import duration

    # At most 2**62 ms: a finite number of seconds can overflow once made milliseconds.
    found = await _again(
        bus, "finding idle sessions", idle_sessions, bus, int(min(seconds * 1000, 2**62))
    )
    return [(s, f" (idle {duration(ms)})") for s, ms in found]


async def end_every(bus: Bus, args: argparse.Namespace) -> int:
    """``end --idle-for S --every E``: end the idle sessions, then again every E seconds,
    until SIGTERM or SIGINT. A round the server does not answer (for ``call``'s retries) is
    logged and tried again at the next."""
    print(
        f"flowbus: ending every session idle for {args.idle_for:g} s, every {args.every:g} s "
        "(Ctrl-C stops)",
        file=sys.stderr,
    )
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:

            async def stop() -> None:
                async for _ in signals:
                    tg.cancel_scope.cancel()

            tg.start_soon(stop)
            while True:
                try:
                    await _end_each(bus, await _idle(bus, args.idle_for), args)
                except ConnectionFailedError as exc:
                    log.warning("end_round_failed", error=str(exc), next_in_seconds=args.every)
                sys.stdout.flush()  # each round's lines as they come, through a pipe too
                await anyio.sleep(args.every)
    return 0


async def _end_each(bus: Bus, targets: list[tuple[str, str]], args: argparse.Namespace) -> int:
    """End (or with ``--dry-run``, say what would end of) each of `targets` (session, said
    after it), printing a line for each: 1 if one was unknown, else 0. A round of ``--every``
    that found none says nothing."""
    from .inspection import end_states

    outcomes: dict[str, int] = {}
    states: list[str] = []
    if args.dry_run:
        sessions = [s for s, _ in targets]
        states = await _again(bus, "reading the sessions", end_states, bus, sessions)
    for i, (session, idle) in enumerate(targets):
        if args.dry_run and states[i] == "live":
            print(f"{session}: would end{idle}")
            continue
        # A dry run says of an ended or unknown session what the run would.
        outcome = states[i] if args.dry_run else await bus.end_session(session, reason=args.reason)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome == "unknown":
            print(
                f"flowbus: no session {session!r} {_where(bus)} ({NO_SESSION_HINT})",
                file=sys.stderr,
            )
        else:
            print(f"{session}: {END_OUTCOMES[outcome]}{idle}")
    if not targets and args.every is None:
        print("no session idle that long" if args.idle_for is not None else "no session")
    elif not args.dry_run and (ended := outcomes.get("retired", 0) + outcomes.get("ending", 0)):
        print(f"{ended} ended ({outcomes.get('retired', 0)} retired at once)", file=sys.stderr)
    return 1 if outcomes.get("unknown") else 0


def _where(bus: Bus) -> str:
    """Where a command looked, said with what it did not find there."""
    return f"on {bus.settings.redacted_url} under the prefix {bus.settings.prefix!r}"


#: Why a session named on the command line may not be there, and where to look.
NO_SESSION_HINT = "never started, or its keys expired; flowbus inspect sessions lists them"

#: What `Bus.end_session`'s outcomes mean, for `flowbus end`.
END_OUTCOMES = {
    "retired": "ended and retired (every service had handled it; its keys expire)",
    "ending": "ended; it retires once every service has handled it",
    "ended": "had ended before (nothing changed)",
}


def _again(
    bus: Bus, what: str, reader: Callable[..., Awaitable[T]], *more: Any, **named: Any
) -> Awaitable[T]:
    """`reader(*more, **named)`, a command's reads, read again after a lost connection or a
    failover, as the bus's own calls are (`call`): an operator looks most when the server has
    trouble."""
    return call(what, partial(reader, *more, **named), bus.settings)


async def dead(bus: Bus, args: argparse.Namespace) -> int:
    from . import deadletters as d
    from . import views

    read = partial(_again, bus, f"dead {args.action}")

    if getattr(args, "session", None) is not None:  # "" too: it would match no letter
        try:
            check_session_id(args.session)
        except InvalidSessionIdError as exc:
            raise UsageError(str(exc)) from None

    async def find(ref: str) -> d.DeadLetter:
        try:
            return await read(d.find, bus, ref)
        except d.BadReferenceError as exc:
            raise UsageError(str(exc)) from None

    if args.action == "list":
        limit = args.limit if args.limit is not None else None if args.json else 200
        if limit is not None and limit < 1:
            raise UsageError(f"--limit must be at least 1, not {limit}")
        letters = await read(d.list_dead, bus, group=args.group, session=args.session)
        letters.sort(key=lambda x: (*map(int, x.id.split("-")), x.partition))  # oldest first
        shown = letters[:limit]
        _print_json(shown) if args.json else print(views.render_dead_letters(shown))
        if len(letters) > len(shown):
            more = len(letters) - len(shown)
            print(f"flowbus: {more} more dead letters (--limit N shows more)", file=sys.stderr)
        return 0
    if args.action == "show":
        letter = await find(args.ref)
        _print_json(letter) if args.json else print(views.render_dead_letter(letter))
        return 0
    if bool(args.refs) == args.all:
        both = ", not both" if args.all else ""
        raise UsageError(f"dead {args.action}: name dead letters (P/ID ...) or give --all{both}")
    if args.refs and (args.group or args.session):
        raise UsageError("--group and --session go with --all")
    if args.all:
        letters = await read(d.list_dead, bus, group=args.group, session=args.session)
    else:
        found = [await find(ref) for ref in args.refs]
        letters = list({letter.ref: letter for letter in found}.values())  # each once
    letters.sort(key=lambda x: (x.session, x.seq))  # a session's replays keep their order
    act = d.replay if args.action == "replay" else d.drop
    failures = 0
    held: set[tuple[str, str]] = set()  # (session, group) whose earlier letter was not replayed
    for letter in letters:
        if (letter.session, letter.group) in held:
            failures += 1
            print(
                f"flowbus: {letter.ref}: not replayed, to keep session {letter.session}'s order "
                f"for {letter.group}: an earlier dead letter of it was not; replay this one by "
                "name once that one is dealt with",
                file=sys.stderr,
            )
            continue
        try:
            print(await act(bus, letter))
        except d.DeadLetterError as exc:
            failures += 1
            print(f"flowbus: {exc}", file=sys.stderr)
            if args.action == "replay":
                held.add((letter.session, letter.group))
    if not letters:
        print("no dead letters")
    return 1 if failures else 0
