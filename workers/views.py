"""How ``flowbus inspect`` and ``flowbus dead`` show what they read (`inspection`,
`deadletters`): tables, a line per followed entry, a dead letter whole."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from .deadletters import DeadLetter
from .inspection import (
    MALFORMED,
    EventRow,
    GroupRow,
    MemberRow,
    OwnerRow,
    SessionDetail,
    SessionRow,
)


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Rows aligned under `header`, two spaces apart."""
    cells = [list(map(str, header)), *([str(c) for c in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def render_followed(stream: str, e: EventRow, started_ms: int, *, width: int = 70) -> str:
    """One followed entry as a line: seq, ms since the session started, type, data."""
    since = "-" if e.type == MALFORMED else e.ts - started_ms if started_ms else e.ts
    kind = f"inbox:{e.type}" if stream == "inbox" else e.type
    return f"{e.seq:>5}  {since:>8}  {kind:<24}  {_event_data(e, width)}"


def render_sessions(rows: list[SessionRow], now_ms: int) -> str:
    if not rows:
        return "no sessions"
    return table(
        ["SESSION", "P", "STATUS", "NODE", "LAST SEQ", "STARTED", "BEHIND (per group)"],
        (
            [
                r.session,
                r.partition,
                r.status,
                r.node,
                r.last_seq,
                _ago(now_ms, r.started_ms),
                " ".join(f"{g}={n}" for g, n in sorted(r.behind.items())) or "-",
            ]
            for r in rows
        ),
    )


#: The meta's memory of the last publishes, for their retries: nothing to show.
_RETRIES = frozenset({"publish_id", "publish_reply", "replay_id", "replay_reply"})


def render_session(d: SessionDetail, now_ms: int, *, width: int = 70) -> str:
    started = int(d.meta.get("started", 0))
    lines = [
        f"session {d.session}  partition {d.partition}  stream {d.stream}",
        "  " + "  ".join(f"{k}={v}" for k, v in sorted(d.meta.items()) if k not in _RETRIES),
        "",
    ]
    traces = sorted({e.extra["traceparent"] for e in d.events if "traceparent" in e.extra})
    if traces:
        lines[-1:-1] = [
            f"  traceparent {', '.join(traces[:3])}" + (" …" if len(traces) > 3 else "")
        ]
    names = [g.name for g in d.groups]
    marks = {"done": "✓", "pending": "…", "waiting": "·", "dead": "✗"}
    lines.append(
        table(
            ["SEQ", "+MS", "TYPE", *names, "DATA"],
            (
                [
                    e.seq,
                    "-" if e.type == MALFORMED else e.ts - started if started else e.ts,
                    e.type,
                    *(marks.get(e.progress.get(n, ""), " ") for n in names),
                    _event_data(e, width),
                ]
                for e in d.events
            ),
        )
        if d.events
        else "  (no events: the session never started, or its keys expired)"
    )
    lines += [
        "",
        "groups (✓ acknowledged, … delivered and not acknowledged, · not delivered, "
        "✗ dead-lettered):",
    ]
    seqs = {e.id: e.seq for e in d.events}
    for g in d.groups:
        read = f"seq {g.last_delivered_seq}"
        if not g.last_delivered_seq and g.last_delivered_id != "0-0":  # deleted by hand
            read = f"entry {g.last_delivered_id} (no longer in the stream)"
        state = f"read up to {read}, lag {g.lag}, pending {len(g.pending)}"
        if g.paused_entry:
            at = seqs.get(g.paused_entry, "?")
            state += f", PAUSED at seq {at} (flowbus dead list --session {d.session})"
        lines.append(f"  {g.name}: {state}")
        for x in g.pending:
            lines.append(
                f"    pending {x.id} (consumer {x.consumer}, delivered {x.deliveries}x, "
                f"idle {x.idle_ms} ms)"
            )
    if d.inbox:
        lines += ["", "inbox:"]
        lines.append(
            table(
                ["SEQ", "TYPE", "DATA"], ([e.seq, e.type, _short(e.data, width)] for e in d.inbox)
            )
        )
    if d.dead_letters:
        lines += ["", "dead letters:"]
        lines += [f"  {x.ref}  {x.group}  seq {x.seq} {x.type}: {x.error}" for x in d.dead_letters]
    if now_ms and started:
        lines += ["", f"started {_ago(now_ms, started)}"]
    return "\n".join(lines)


def render_groups(rows: list[GroupRow]) -> str:
    if not rows:
        return "no services registered"
    return table(
        ["SERVICE", "WORKERS", "PARTITIONS", "LIVE SESSIONS", "LAG", "PENDING", "PAUSED", "DEAD"],
        (
            [
                r.name,
                r.workers,
                r.partitions_owned,
                r.live_sessions,
                r.lag,
                r.pending,
                r.paused,
                r.dead_letters,
            ]
            for r in rows
        ),
    )


def render_owners(rows: list[OwnerRow], partitions: int) -> str:
    by_group: dict[str, list[OwnerRow]] = {}
    for r in rows:
        by_group.setdefault(r.group, []).append(r)
    if not by_group:
        return "no partition is owned (no worker running?)"
    lines = []
    for g, owned in by_group.items():
        lines.append(f"{g}: {len(owned)} of {partitions} partitions owned")
        lines.append(
            table(
                ["  PARTITION", "WORKER", "EPOCH", "TTL MS"],
                ([f"  {r.partition}", r.worker, r.epoch, r.ttl_ms] for r in owned),
            )
        )
    return "\n".join(lines)


def render_members(rows: list[MemberRow]) -> str:
    if not rows:
        return "no live workers"
    return table(
        ["SERVICE", "WORKER", "PARTITIONS", "HEARTBEAT LAPSES IN"],
        ([r.group, r.worker, r.partitions, f"{r.expires_in_ms} ms"] for r in rows),
    )


def _event_data(e: EventRow, width: int) -> str:
    """An event's data, short; a malformed entry's error, then its fields as they are."""
    if e.type == MALFORMED:
        fields = msgspec.json.encode(e.data).decode()
        return _short(f"{e.extra.get('error', '')}: {fields}", width * 2)
    return _short(e.data, width)


def _short(value: Any, width: int) -> str:
    if isinstance(value, dict):  # the type has a column of its own
        value = {k: v for k, v in value.items() if k != "type"}
    text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    return text if len(text) <= width else text[: width - 1] + "…"


def _ago(now_ms: int, then_ms: int) -> str:
    if not then_ms or not now_ms:
        return "-"
    return f"{duration(now_ms - then_ms)} ago"


def duration(ms: int) -> str:
    """`ms` for a person: 42s, 17m, 5h."""
    seconds = max(0, ms) / 1000
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def render_dead_letters(letters: list[DeadLetter]) -> str:
    if not letters:
        return "no dead letters"
    return table(
        ["DEAD LETTER", "SESSION", "GROUP", "SEQ", "TYPE", "TRIES", "STATE", "ERROR"],
        (
            [
                d.ref,
                d.session,
                d.group,
                d.seq,
                d.type + (" (replayed)" if d.replay_of else ""),
                d.deliveries,
                "paused" if d.paused else d.policy,
                d.error if len(d.error) <= 60 else d.error[:59] + "…",
            ]
            for d in letters
        ),
    )


def render_dead_letter(d: DeadLetter) -> str:
    data = msgspec.json.format(msgspec.json.encode(d.data), indent=2).decode()
    lines = [
        f"dead letter {d.ref}",
        f"  session     {d.session} (partition {d.partition})",
        f"  group       {d.group}",
        f"  event       seq {d.seq} {d.type}, entry {d.entry}"
        + (f" (a replay of entry {d.replay_of})" if d.replay_of else ""),
        f"  deliveries  {d.deliveries}",
        f"  policy      {d.policy}" + (" (the session is paused on it)" if d.paused else ""),
        f"  error       {d.error}",
        *(f"  {k:<11} {v}" for k, v in sorted(d.extra.items())),
        "  data",
        *(f"    {line}" for line in data.splitlines()),
    ]
    return "\n".join(lines)
