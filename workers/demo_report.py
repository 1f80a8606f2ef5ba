"""The demo's summary: what ran, whether every call was in order, how fast; as text or JSON."""

from __future__ import annotations

import shlex

import msgspec

from bus import Keys

# The benchmarks import the probe's order check from here.
from .probe import OrderCheck, check_order, percentiles
from .verify import CallCheck

__all__ = ["OrderCheck", "ServerInfo", "Summary", "WorkerShare", "check_order", "render"]

#: Calls listed with their problems in a failed summary, at most.
LISTED = 5


class ServerInfo(msgspec.Struct, frozen=True):
    """The server the demo ran on; `pid` and `directory` only for the embedded one."""

    name: str
    version: str
    url: str
    embedded: bool
    kept: bool = False
    pid: int | None = None
    directory: str | None = None


class WorkerShare(msgspec.Struct, frozen=True):
    """One worker process: its service, what it handled (from the journal), how it exited."""

    worker_id: str
    service: str
    pid: int
    records: int
    calls: int
    exit_status: int | None = None


class Summary(msgspec.Struct, frozen=True, kw_only=True):
    """The demo's result, printed as text or (``--json``) as one JSON object."""

    ok: bool
    server: ServerInfo
    prefix: str
    calls: int
    calls_completed: int
    calls_in_order: int
    #: Entries on the calls' session streams.
    events: int
    #: Custom and function actions run (journal records).
    actions_run: int
    #: Events each handler service handled (journal records).
    handled: dict[str, int]
    #: Replies whose speech was cut short: the caller spoke over the bot (a barge-in).
    replies_cut: int
    #: Publish-to-handler latency of the handler services' events: p50, p99, max (ms).
    latency_ms: dict[str, float]
    dead_letters: int
    workers: list[WorkerShare]
    #: Calls that failed in the bot or the check, with what went wrong (a few).
    problems: dict[str, list[str]]
    #: From the first call's start until every call was over.
    calls_seconds: float
    events_per_second: float
    wall_seconds: float
    inspect: list[str]


def latency_summary(values: list[float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in percentiles(values, (50, 99, 100)).items()}


def problems_of(checks: list[CallCheck], failures: dict[str, str]) -> dict[str, list[str]]:
    problems = {c.session: list(c.problems) for c in checks if c.problems}
    for session, reason in failures.items():
        problems.setdefault(session, []).insert(0, f"the bot failed: {reason}")
    return dict(sorted(problems.items())[:LISTED])


def inspect_commands(cli: str, where: str, keys: Keys, session: str) -> list[str]:
    """Commands that show one call: flowbus's own view (`where` holds its server options),
    then the raw keys with redis-cli."""
    p = keys.partition(session)
    stream = shlex.quote(keys.session(session))
    return [
        f"flowbus inspect session {session}{where}",
        f"{cli} XRANGE {stream} - +",
        f"{cli} XINFO GROUPS {stream}",
        f"{cli} XRANGE {shlex.quote(keys.inbox(session))} - +",
        f"{cli} HGETALL {shlex.quote(keys.state(session))}",
        f"{cli} XRANGE {shlex.quote(keys.dead(p))} - +",
        f"{cli} LRANGE {shlex.quote(f'{keys.prefix}:demo:journal:{session}')} 0 -1",
    ]


def render(summary: Summary) -> str:
    """The summary as a few aligned lines for a person."""
    s = summary
    where = "embedded" if s.server.embedded else "external"
    lat = s.latency_ms
    in_order = (
        f"OK: all {_calls(s.calls)} (actions around LLM and TTS, handlers in seq order)"
        if s.calls_in_order == s.calls
        else f"FAILED: {s.calls - s.calls_in_order} of {_calls(s.calls)}"
    )
    lines = [
        f"flowbus demo: {_calls(s.calls)} on {s.server.name} {s.server.version} ({where}) at "
        f"{s.server.url}, prefix {s.prefix}",
        "",
        _row("calls completed", f"{s.calls_completed} of {s.calls}"),
        _row("events", f"{s.events:,} on the calls' streams ({s.events_per_second:,.0f}/s)"),
        _row("actions run", f"{s.actions_run:,} custom and function actions"),
        _row(
            "events handled",
            ", ".join(f"{n:,} by {service}" for service, n in sorted(s.handled.items())) or "-",
        ),
        _row("per-call order", in_order),
        _row(
            "replies cut",
            f"{s.replies_cut:,} by a caller speaking over the bot (what was heard kept, "
            "post-actions after)",
        ),
    ]
    for i, w in enumerate(s.workers):
        exit_note = "" if w.exit_status in (0, None) else f", exited with {w.exit_status}"
        text = (
            f"{w.worker_id} ({w.service}, pid {w.pid}): {w.records:,} records, "
            f"{_calls(w.calls)}{exit_note}"
        )
        lines.append(_row("worker processes" if i == 0 else "", text))
    lines += [
        _row(
            "publish -> handler",
            f"p50 {lat.get('p50', 0):.1f} ms   p99 {lat.get('p99', 0):.1f} ms   "
            f"max {lat.get('max', 0):.1f} ms   ({', '.join(sorted(s.handled))} events)",
        ),
        _row("dead letters", str(s.dead_letters)),
        _row("wall time", f"{s.wall_seconds:.1f} s (calls {s.calls_seconds:.1f} s)"),
        _row("verdict", "OK" if s.ok else "FAILED"),
    ]
    for session, problems in s.problems.items():
        lines.append(_row("problem", f"{session}: {'; '.join(problems)}"))
    lines += ["", "Look at one call:", *(f"  {c}" for c in s.inspect)]
    return "\n".join(lines)


def _row(label: str, text: str) -> str:
    return f"  {label:<20}{text}"


def _calls(n: int) -> str:
    return f"{n} call{'s' * (n != 1)}"
