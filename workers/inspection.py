"""``flowbus inspect``: read-only views of a deployment, as data (``--json`` prints it as it is;
`views` shows it as text).

- `sessions`: live and ended sessions, each with its current node, last seq and how far
  behind each service is;
- `session_detail`: one session's events, decoded, with each group's progress on each event,
  its pending entries, its paused entry and dead letters; `follow`: its new entries as they
  come, until it ends;
- `groups`: each service with its workers, owned partitions, lag, pending and paused sessions;
- `owners`: who holds each partition's lease, per group;
- `members`: the workers of each group and when their heartbeat lapses.

Everything is read in pipelines, one round trip per kind of key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from functools import partial
from typing import Any

import msgspec

from bus import Bus, Entry
from bus.connection import call

from .deadletters import DeadLetter, count_dead, list_dead
from .observe import lease_owners

#: How far back from a session's end its current node is looked for.
NODE_LOOKBACK = 200
#: Entries read from a stream per command: a huge session read in one would hold the server
#: up (about a second per million entries), every worker's commands waiting behind it.
PAGE = 1000
#: How long `follow` blocks in one read for a new entry (then it looks whether the session
#: ended).
FOLLOW_BLOCK_MS = 1000


class SessionRow(msgspec.Struct, frozen=True):
    """One session: `status` is live, ended (retired: every group is done) or paused."""

    session: str
    partition: int
    status: str
    node: str
    last_seq: int
    started_ms: int
    ended_ms: int
    #: Events each group has not acknowledged yet (read or not).
    behind: dict[str, int]


class EventRow(msgspec.Struct, frozen=True):
    """One entry of a stream, decoded; `progress` says per group: ``done`` (acknowledged),
    ``pending`` (read by a worker: being handled or retried, or next in its batch) or
    ``waiting`` (not read yet, or read ahead and given back)."""

    id: str
    seq: int
    ts: int
    type: str
    data: Any
    extra: dict[str, str]
    progress: dict[str, str] = {}


class PendingRow(msgspec.Struct, frozen=True):
    id: str
    consumer: str
    idle_ms: int
    deliveries: int


class GroupProgress(msgspec.Struct, frozen=True):
    """A consumer group on one session stream."""

    name: str
    last_delivered_id: str
    last_delivered_seq: int
    entries_read: int | None
    lag: int | None
    pending: list[PendingRow]
    paused_entry: str | None


class SessionDetail(msgspec.Struct, frozen=True):
    session: str
    partition: int
    stream: str
    meta: dict[str, str]
    events: list[EventRow]
    groups: list[GroupProgress]
    inbox: list[EventRow]
    dead_letters: list[DeadLetter]


class GroupRow(msgspec.Struct, frozen=True):
    """A service (consumer group) across the deployment."""

    name: str
    subscribes: list[str] | None
    workers: int
    partitions_owned: int
    #: Live sessions that have the service's group (those that started after it registered).
    live_sessions: int
    lag: int
    pending: int
    paused: int
    dead_letters: int


class OwnerRow(msgspec.Struct, frozen=True):
    group: str
    partition: int
    worker: str
    epoch: int
    ttl_ms: int


class MemberRow(msgspec.Struct, frozen=True):
    group: str
    worker: str
    expires_in_ms: int
    partitions: int


# -- reading ---------------------------------------------------------------------------------
def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n or 0)


def _decode_data(data: bytes) -> Any:
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data.decode(errors="replace")


#: The type shown of an entry that is not a valid event; its fields are its data, as they are.
MALFORMED = "(malformed)"


def _rows(raw: Iterable[Any], max_data: int) -> list[EventRow]:
    rows = []
    for raw_id, fields in raw:
        entry_id = _text(raw_id)
        try:
            entry = Entry.parse(entry_id, fields, max_data=max_data)
        except Exception as exc:  # shown as it is: an operator looks at exactly these
            shown = {_text(k): _text(v) for k, v in fields.items()}
            rows.append(EventRow(entry_id, 0, 0, MALFORMED, shown, {"error": str(exc)}))
            continue
        rows.append(
            EventRow(
                entry.id,
                entry.seq,
                entry.ts,
                entry.type,
                _decode_data(entry.data),
                dict(entry.extra),
            )
        )
    return rows


async def _all_sessions(bus: Bus) -> list[tuple[str, int, bool]]:
    """(session, partition, live) of every session the partition indexes know, but for ended
    ones whose keys have expired (the index is pruned only when another session retires)."""
    now = await server_ms(bus)
    pipe = bus.redis.pipeline(transaction=False)
    for p in range(bus.settings.partitions):
        pipe.smembers(bus.keys.live(p))
        pipe.zrangebyscore(bus.keys.ended(p), f"({now}", "+inf")
    replies: list[Any] = await pipe.execute()
    found: dict[str, tuple[str, int, bool]] = {}
    for p in range(bus.settings.partitions):
        for s in replies[2 * p + 1]:
            found[_text(s)] = (_text(s), p, False)
        for s in replies[2 * p]:
            found[_text(s)] = (_text(s), p, True)
    return list(found.values())


async def _read_stream(bus: Bus, stream: str, after: str = "-") -> list[Any]:
    """Every entry of `stream` after the id `after` (``-``: all of it), a page per command."""
    entries: list[Any] = []
    start = after if after == "-" else f"({after}"
    while True:
        page: Any = await bus.redis.xrange(stream, min=start, max="+", count=PAGE)
        entries += page
        if len(page) < PAGE:
            return entries
        start = f"({_text(page[-1][0])}"


async def counted_lag(bus: Bus, streams: Sequence[str], infos: Sequence[Any]) -> list[Any]:
    """Each stream's XINFO GROUPS reply (an error: no groups), with each group's ``lag`` 0
    where it read up to the stream's last entry, and counted where the server gives none.
    The server's own figure is not trusted for either: entries deleted by hand (or a group's
    id set) leave it unknown, and taken for 0 it would show the group caught up; Redis 7.0
    keeps a stale read counter after a restart from a rewritten AOF and on a replica, and
    shows a lag for good for a group that read everything."""
    groups = [info if isinstance(info, list) else [] for info in infos]
    unsure = [i for i, gs in enumerate(groups) if any(g.get("lag") != 0 for g in gs)]
    pipe = bus.redis.pipeline(transaction=False)
    for i in unsure:
        pipe.xrevrange(streams[i], count=1)
    lasts: list[Any] = await pipe.execute() if unsure else []
    for i, last in zip(unsure, lasts, strict=True):
        last_id = _id_key(_text(last[0][0])) if last else (0, 0)
        for g in groups[i]:
            if _id_key(_text(g["last-delivered-id"])) >= last_id:
                g["lag"] = 0
            elif g.get("lag") is None:  # the entries after its position: not delivered yet
                g["lag"] = len(await _read_stream(bus, streams[i], _text(g["last-delivered-id"])))
    return groups


async def _paused(bus: Bus, groups: Sequence[str]) -> dict[str, dict[str, str]]:
    """group -> {session: paused entry id}."""
    pipe = bus.redis.pipeline(transaction=False)
    for g in groups:
        for p in range(bus.settings.partitions):
            pipe.hgetall(bus.keys.paused(p, g))
    replies: list[Any] = await pipe.execute()
    result: dict[str, dict[str, str]] = {g: {} for g in groups}
    for i, g in enumerate(groups):
        for reply in replies[i * bus.settings.partitions : (i + 1) * bus.settings.partitions]:
            result[g].update({_text(k): _text(v) for k, v in reply.items()})
    return result


async def _group_names(bus: Bus) -> list[str]:
    return [s.name for s in await bus.services(fresh=True)]


async def sessions(
    bus: Bus, *, ended: bool = True, limit: int = 50
) -> tuple[list[SessionRow], int]:
    """The `limit` most recently started sessions (live first, then ended if `ended`), and how
    many there are in all."""
    found = [s for s in await _all_sessions(bus) if ended or s[2]]
    pipe = bus.redis.pipeline(transaction=False)
    for session, _, _ in found:
        pipe.hmget(bus.keys.meta(session), "seq", "started", "ended")
    metas: list[Any] = await pipe.execute()
    rows = sorted(
        zip(found, metas, strict=True), key=lambda r: (not r[0][2], -int(r[1][1] or 0), r[0][0])
    )[:limit]
    pipe = bus.redis.pipeline(transaction=False)
    for (session, _, _), _meta in rows:
        pipe.xinfo_groups(bus.keys.session(session))
        pipe.xrevrange(bus.keys.session(session), count=NODE_LOOKBACK)
    replies: list[Any] = await pipe.execute(raise_on_error=False)
    streams = [bus.keys.session(session) for (session, _, _), _meta in rows]
    infos = await counted_lag(bus, streams, replies[::2])
    paused = await _paused(bus, await _group_names(bus))
    result = []
    for i, ((session, p, live), meta) in enumerate(rows):
        groups, recent = infos[i], replies[2 * i + 1]
        behind = {_text(g["name"]): int(g["lag"]) + int(g["pending"]) for g in groups}
        status = "live" if live else "ended"
        if live and meta[2]:  # ended by its bot; some group has yet to handle all of it
            status = "ending"
        if any(session in by_session for by_session in paused.values()):
            status = "paused"
        result.append(
            SessionRow(
                session,
                p,
                status,
                _current_node(recent if isinstance(recent, list) else []),
                int(meta[0] or 0),
                int(meta[1] or 0),
                int(meta[2] or 0),
                behind,
            )
        )
    return result, len(found)


async def idle_sessions(bus: Bus, idle_ms: int) -> list[tuple[str, int]]:
    """(session, ms since its last event) of every live session that has not ended and whose
    last event is at least `idle_ms` old, the longest idle first."""
    now = await server_ms(bus)
    live = [s for s, _, is_live in await _all_sessions(bus) if is_live]
    pipe = bus.redis.pipeline(transaction=False)
    for session in live:
        pipe.hmget(bus.keys.meta(session), "publish_entry", "started", "ended")
    found = []
    for session, (entry, started, ended) in zip(live, await pipe.execute(), strict=True):
        last = int(_text(entry).partition("-")[0]) if entry else int(started or 0)
        if not ended and last and now - last >= idle_ms:
            found.append((session, now - last))
    return sorted(found, key=lambda s: (-s[1], s[0]))


async def end_states(bus: Bus, sessions: Sequence[str]) -> list[str]:
    """For each of `sessions`, what `Bus.end_session` would find: ``"ended"`` (it had ended),
    ``"unknown"`` (no such session) or ``"live"``; for ``flowbus end --dry-run``."""
    pipe = bus.redis.pipeline(transaction=False)
    for session in sessions:
        pipe.exists(bus.keys.meta(session))
        pipe.hexists(bus.keys.meta(session), "ended")
    replies: list[Any] = await pipe.execute()
    return [
        "ended" if ended else "live" if exists else "unknown"
        for exists, ended in zip(replies[::2], replies[1::2], strict=True)
    ]


def _current_node(recent: list[Any]) -> str:
    for _id, fields in recent:
        if fields.get(b"type") == b"node.entered":
            data = _decode_data(fields.get(b"data", b"{}"))
            return str(data.get("node", "?")) if isinstance(data, dict) else "?"
    return "-"


async def session_detail(bus: Bus, session: str, *, inbox: bool = False) -> SessionDetail:
    """Everything about one session (see `SessionDetail`)."""
    keys, p = bus.keys, bus.keys.partition(session)
    stream = keys.session(session)
    pipe = bus.redis.pipeline(transaction=False)
    pipe.hgetall(keys.meta(session))
    pipe.xinfo_groups(stream)
    meta_raw, groups_raw = await pipe.execute(raise_on_error=False)
    max_data = 1 << 62
    events = _rows(await _read_stream(bus, stream), max_data)
    [groups_info] = await counted_lag(bus, [stream], [groups_raw])
    pipe = bus.redis.pipeline(transaction=False)
    for g in groups_info:  # every pending entry, however many
        name, count = _text(g["name"]), max(1, int(g["pending"]))
        pipe.xpending_range(stream, name, min="-", max="+", count=count)
        pipe.hget(keys.paused(p, name), session)
    extra: list[Any] = await pipe.execute()
    seq_of = {e.id: e.seq for e in events}
    progress: list[GroupProgress] = []
    for i, g in enumerate(groups_info):
        pending = [
            PendingRow(
                _text(x["message_id"]),
                _text(x["consumer"]),
                int(x["time_since_delivered"]),
                int(x["times_delivered"]),
            )
            for x in extra[2 * i]
        ]
        last = _text(g["last-delivered-id"])
        paused_entry = extra[2 * i + 1]
        progress.append(
            GroupProgress(
                _text(g["name"]),
                last,
                seq_of.get(last, 0),
                g.get("entries-read"),
                g["lag"],
                pending,
                None if paused_entry is None else _text(paused_entry),
            )
        )
    dead = await list_dead(bus, session=session)
    events = [_with_progress(e, progress, dead) for e in events]
    return SessionDetail(
        session,
        p,
        stream,
        {_text(k): _text(v) for k, v in (meta_raw or {}).items()}
        if isinstance(meta_raw, dict)
        else {},
        events,
        progress,
        _rows(await _read_stream(bus, keys.inbox(session)), max_data) if inbox else [],
        dead,
    )


async def follow(
    bus: Bus,
    detail: SessionDetail,
    *,
    inbox: bool = False,
    block_ms: int = FOLLOW_BLOCK_MS,
    on_services: Callable[[], None] = lambda: None,
) -> AsyncIterator[tuple[str, EventRow]]:
    """The session's entries after those of `detail` (and, with `inbox`, its inbox's after
    those of `detail`), as ``("session" | "inbox", row)`` when they come, until the session has
    ended (with `inbox`: and every service is done with it, since a handler of its last events
    may still write to the inbox: `on_services` is called once if it waited a read's block
    for them in vain) and the streams are read to their end. Waiting is a blocking read, not
    polling."""
    keys, session = bus.keys, detail.session
    live = keys.live(keys.partition(session))

    async def read(operation: Callable[[], Awaitable[Any]]) -> Any:
        # Through a server restarting, or a blocking read a cluster failover cut short.
        return await call("following the session", operation, bus.settings, session)

    after: dict[Any, Any] = {
        keys.session(session): detail.events[-1].id if detail.events else "0-0"
    }
    if inbox:
        after[keys.inbox(session)] = detail.inbox[-1].id if detail.inbox else "0-0"
    told = False
    while True:
        # The final publish marks the meta in the script that appends its entry (as `flowbus
        # end` does): once marked, the session's stream takes no more, so the read after it
        # need not block. Its inbox takes no more once the session retired: every group done.
        ended = done = bool(await read(partial(bus.redis.hexists, keys.meta(session), "ended")))
        if ended and inbox:
            done = not await read(partial(bus.redis.sismember, live, session))
        block = None if done else block_ms
        reply: Any = await read(partial(bus.redis.xread, after, count=PAGE, block=block))
        if not reply and done:
            return
        if not reply and ended and not told:
            told = True
            on_services()
        for raw_stream, entries in reply or []:
            stream = _text(raw_stream)
            after[stream] = _text(entries[-1][0])
            name = "session" if stream == keys.session(session) else "inbox"
            for row in _rows(entries, 1 << 62):
                yield name, row


def _with_progress(
    event: EventRow, groups: list[GroupProgress], dead: list[DeadLetter]
) -> EventRow:
    marks = {}
    letters = {(d.group, d.entry) for d in dead}
    for g in groups:
        # An entry read ahead but given back (a drain, a pause) is pending with 0 deliveries.
        delivered = {x.id: x.deliveries for x in g.pending}
        if (g.name, event.id) in letters:  # handled by no one: a dead letter
            marks[g.name] = "dead"
        elif delivered.get(event.id):
            marks[g.name] = "pending"
        elif event.id not in delivered and _id_key(event.id) <= _id_key(g.last_delivered_id):
            marks[g.name] = "done"
        else:
            marks[g.name] = "waiting"
    return msgspec.structs.replace(event, progress=marks)


async def groups(bus: Bus) -> list[GroupRow]:
    """Every registered service, with its figures over the whole deployment."""
    services = await bus.services(fresh=True)
    names = [s.name for s in services]
    live = [(s, p) for s, p, is_live in await _all_sessions(bus) if is_live]
    pipe = bus.redis.pipeline(transaction=False)
    for session, _ in live:
        pipe.xinfo_groups(bus.keys.session(session))
    replies: list[Any] = await pipe.execute(raise_on_error=False)
    infos = await counted_lag(bus, [bus.keys.session(s) for s, _ in live], replies)
    lag = dict.fromkeys(names, 0)
    pending = dict.fromkeys(names, 0)
    following = dict.fromkeys(names, 0)  # live sessions with the service's group
    for info in infos:
        for g in info:
            name = _text(g["name"])
            if name in lag:
                following[name] += 1
                lag[name] += int(g["lag"])
                pending[name] += int(g["pending"])
    paused = await _paused(bus, names)
    dead = await count_dead(bus)
    now_ms = await server_ms(bus)
    rows = []
    for s in services:
        owners = await lease_owners(bus, s.name)
        workers = await _members(bus, s.name, now_ms)
        rows.append(
            GroupRow(
                s.name,
                s.subscribes,
                len(workers),
                sum(len(ps) for ps in owners.values()),
                following[s.name],
                lag[s.name],
                pending[s.name],
                len(paused[s.name]),
                dead.get(s.name, 0),
            )
        )
    return rows


async def server_ms(bus: Bus) -> int:
    seconds, micros = await bus.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def _members(bus: Bus, group: str, now_ms: int) -> list[tuple[str, int]]:
    raw: Any = await bus.redis.zrange(bus.keys.members(group), 0, -1, withscores=True)
    return [(_text(m), int(score) - now_ms) for m, score in raw if int(score) > now_ms]


async def owners(bus: Bus, group: str | None = None) -> list[OwnerRow]:
    """The lease of every partition of every group (or of `group`)."""
    names = [group] if group else await _group_names(bus)
    pipe = bus.redis.pipeline(transaction=False)
    for g in names:
        for p in range(bus.settings.partitions):
            pipe.get(bus.keys.lease(p, g))
            pipe.pttl(bus.keys.lease(p, g))
    replies: list[Any] = await pipe.execute()
    rows = []
    i = 0
    for g in names:
        for p in range(bus.settings.partitions):
            token, ttl = replies[i], replies[i + 1]
            i += 2
            if token:
                epoch, _, worker = _text(token).partition(":")
                rows.append(OwnerRow(g, p, worker, int(epoch), int(ttl)))
    return rows


async def members(bus: Bus) -> list[MemberRow]:
    """The live workers of every group, with how many partitions each holds."""
    now_ms = await server_ms(bus)
    rows = []
    for g in await _group_names(bus):
        held = await lease_owners(bus, g)
        for worker, expires in await _members(bus, g, now_ms):
            rows.append(MemberRow(g, worker, expires, len(held.get(worker, []))))
    return rows
