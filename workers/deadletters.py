"""``flowbus dead``: list, show, replay and drop dead letters.

A dead letter is an entry of a partition's stream ``<prefix>:{P}:dead``: ``session``,
``group``, ``entry``, ``deliveries``, ``error``, ``policy`` and the original entry's fields. It
is named ``P/ID`` (partition and dead-letter entry id), e.g. ``17/1767225600000-0``.

Replaying hands the event back to the group that dead-lettered it, to be handled in order
after the session's current position:

- the session is **paused** on it (policy ``pause``): `Bus.resume` retries the entry in place,
  with a fresh delivery count; the session's later events wait behind it as before;
- otherwise (policy ``skip``: the session went on): the event is republished to its session as
  a `workers.replay.Replay` for that group only (the session's next seq); other groups
  acknowledge it unseen. A session that has ended takes no new event: its dead letters can
  be dropped, not replayed (run services with ``--dead-letter pause`` to keep that possible).

A letter whose session paused on it and was resumed since is not replayed: its entry was
retried in place, or dropped, then. (`Bus.resume` removes the letter a pause noted; one from
before flowbus noted them stays listed.)

Either way the dead letter is removed in the same step as the resume or the publish, so a
replay cut short (Ctrl-C, a lost connection) and run again hands the event back once. Dropping
removes it; for a paused session it also acknowledges the entry unhandled
(``Bus.resume(drop=True)``) so the session goes on. A connection lost meanwhile is tried
again (`bus.connection.call`): each of these acts once, however often it is sent.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from functools import partial
from typing import Any

import msgspec

from bus import Bus, BusError, DeadLetterGoneError, PayloadTooLargeError, SessionEndedError
from bus.connection import call

from .replay import REPLAY, Replay

#: Fields of a dead letter that are not the original entry's (see bus.consumer).
DEAD_FIELDS = ("session", "group", "entry", "deliveries", "error", "policy")
#: The original entry's optional envelope fields a replay carries on.
ENVELOPE_FIELDS = ("v", "traceparent", "reply_to", "corr")


#: The type of a dead letter that holds no event: its entry was deleted from the stream before
#: it was handled (the consumer dead-letters it with that reason), so nothing can be replayed.
NO_EVENT = "?"

#: A stream entry id, whole (a bare millisecond time would name every entry of it).
_ENTRY_ID = re.compile(r"^\d+-\d+$")


class DeadLetterError(BusError):
    """A dead letter that cannot be found, or cannot be replayed; the message says why."""


class BadReferenceError(DeadLetterError):
    """A dead letter's name that cannot name one: malformed, out of range, or ambiguous."""


class DeadLetter(msgspec.Struct, frozen=True):
    """One dead letter: `entry` is the session stream's entry that was dead-lettered. For a
    dead-lettered replay, `type`, `seq`, `ts`, `data` and `extra` are those of the event inside
    it, and `replay_of` names that event's own entry."""

    ref: str
    partition: int
    id: str
    session: str
    group: str
    entry: str
    deliveries: int
    error: str
    policy: str
    type: str
    seq: int
    ts: int
    data: Any
    extra: dict[str, str]
    paused: bool = False
    replay_of: str = ""


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def parse(partition: int, entry_id: str, raw: Mapping[bytes, bytes], paused: bool) -> DeadLetter:
    """A dead letter from its raw stream fields."""
    fields = {_text(k): _text(v) for k, v in raw.items()}
    original = {k.removeprefix("orig."): v for k, v in fields.items() if k not in DEAD_FIELDS}
    try:
        data: Any = msgspec.json.decode(original.get("data", ""))
    except msgspec.DecodeError:
        data = original.get("data", "")
    kind, seq, ts = original.get("type", NO_EVENT), original.get("seq"), original.get("ts")
    extra = {k: v for k, v in original.items() if k not in ("type", "seq", "ts", "data")}
    replay_of = ""
    if kind == REPLAY and isinstance(data, dict):
        replay_of = str(data.get("entry", ""))
        kind, seq, ts = str(data.get("event")), str(data.get("seq")), str(data.get("ts"))
        extra = {str(k): str(v) for k, v in (data.get("extra") or {}).items()}
        data = data.get("data")
    return DeadLetter(
        f"{partition}/{entry_id}",
        partition,
        entry_id,
        fields.get("session", ""),
        fields.get("group", ""),
        fields.get("entry", ""),
        _int(fields.get("deliveries")),
        fields.get("error", ""),
        fields.get("policy", ""),
        kind,
        _int(seq),
        _int(ts),
        data,
        extra,
        paused,
        replay_of,
    )


async def list_dead(
    bus: Bus, *, group: str | None = None, session: str | None = None, page: int = 2000
) -> list[DeadLetter]:
    """Every dead letter (of `group`, of `session`), by partition then age, read `page` of
    each partition's at a time."""
    partitions = [bus.keys.partition(session)] if session else list(range(bus.settings.partitions))
    letters = []
    async for p, entries in _pages(bus, partitions, page):
        for raw_id, fields in entries:
            letter = parse(p, _text(raw_id), fields, paused=False)
            if (group is None or letter.group == group) and (
                session is None or letter.session == session
            ):
                letters.append(letter)
    letters.sort(key=lambda d: d.partition)  # stable: each partition's by age
    return await _with_paused(bus, letters)


async def count_dead(bus: Bus, *, page: int = 2000) -> dict[str, int]:
    """Dead letters per group, read as `list_dead` reads them: only their group is looked at
    (0.4 s for 64,000 letters, against 2 s for `list_dead`)."""
    counts: dict[str, int] = {}
    async for _, entries in _pages(bus, list(range(bus.settings.partitions)), page):
        for _, fields in entries:
            group = _text(fields.get(b"group", b""))
            counts[group] = counts.get(group, 0) + 1
    return counts


async def _pages(
    bus: Bus, partitions: list[int], page: int
) -> AsyncIterator[tuple[int, list[Any]]]:
    """The dead letters of `partitions`, a page of each at a time, oldest first (one read of
    them all would hold the server up while it sends a pile of them)."""
    after = dict.fromkeys(partitions, "-")
    while after:
        pipe = bus.redis.pipeline(transaction=False)
        for p, start in after.items():
            pipe.xrange(bus.keys.dead(p), start, "+", count=page)
        replies: list[Any] = await pipe.execute()
        for (p, _), entries in zip(list(after.items()), replies, strict=True):
            yield p, entries
            if len(entries) < page:
                del after[p]
            else:
                after[p] = "(" + _text(entries[-1][0])


async def _with_paused(bus: Bus, letters: list[DeadLetter]) -> list[DeadLetter]:
    if not letters:
        return letters
    pipe = bus.redis.pipeline(transaction=False)
    for d in letters:
        pipe.hget(bus.keys.paused(d.partition, d.group), d.session)
    paused: list[Any] = await pipe.execute()
    return [
        msgspec.structs.replace(d, paused=p is not None and _text(p) == d.entry)
        for d, p in zip(letters, paused, strict=True)
    ]


async def find(bus: Bus, ref: str) -> DeadLetter:
    """The dead letter named `ref` (``P/ID``, or just ``ID``: every partition is searched, and
    an id found in more than one is refused). Raises `DeadLetterError` if there is none."""
    partition, _, entry_id = ref.rpartition("/")
    if (partition and not partition.isdigit()) or not _ENTRY_ID.match(entry_id):
        raise BadReferenceError(
            f"{ref!r} is not a dead letter's name (P/ID, e.g. 17/1767225600000-0)"
        )
    if partition and int(partition) >= bus.settings.partitions:
        raise BadReferenceError(f"{ref}: there are only {bus.settings.partitions} partitions")
    partitions = [int(partition)] if partition else list(range(bus.settings.partitions))
    pipe = bus.redis.pipeline(transaction=False)
    for p in partitions:
        pipe.xrange(bus.keys.dead(p), entry_id, entry_id)
    replies: list[Any] = await pipe.execute()
    found = [
        parse(p, _text(raw_id), fields, paused=False)
        for p, entries in zip(partitions, replies, strict=True)
        for raw_id, fields in entries
    ]
    if not found:
        raise DeadLetterError(f"no dead letter {ref} (flowbus dead list shows them)")
    if len(found) > 1:
        names = ", ".join(letter.ref for letter in found)
        raise BadReferenceError(f"{ref} names {len(found)} dead letters ({names}): give P/ID")
    [letter] = await _with_paused(bus, found)
    return letter


async def replay(bus: Bus, letter: DeadLetter) -> str:
    """Hand `letter`'s event back to its group (see the module docstring); say what was done.
    Raises `DeadLetterError` when its session can take no new event, or when its session
    paused on it and was resumed since (`Bus.resume`): its entry was retried in place, or
    dropped, then, and a replay would hand it over a second time."""
    if letter.paused:
        if await bus.resume(letter.session, letter.group, dead_letter=letter.id) is None:
            raise _resumed_already(letter)
        return (
            f"{letter.ref}: session {letter.session} resumed for {letter.group}: entry "
            f"{letter.entry} (seq {letter.seq}) is retried in place"
        )
    if letter.policy == "pause":  # the session paused on it, and no longer does
        raise _resumed_already(letter)
    if letter.type == NO_EVENT:
        raise DeadLetterError(
            f"{letter.ref}: holds no event to replay ({letter.error}); drop it "
            f"(flowbus dead drop {letter.ref})"
        )
    exists = partial(bus.redis.exists, bus.keys.meta(letter.session))
    if not await call("dead replay", exists, bus.settings, letter.session):
        raise DeadLetterError(
            f"{letter.ref}: session {letter.session} no longer exists (its keys expired); "
            "drop the dead letter instead"
        )
    original = {k: v for k, v in letter.extra.items() if k in ENVELOPE_FIELDS}
    payload = Replay(
        group=letter.group,
        entry=letter.replay_of or letter.entry,
        seq=letter.seq,
        event=letter.type,
        ts=letter.ts,
        data=msgspec.Raw(msgspec.json.encode(letter.data)),
        extra=original,
        dead_letter=letter.ref,
    )
    trace = {"traceparent": original["traceparent"]} if "traceparent" in original else None
    try:
        published = await bus.publish(letter.session, payload, extra=trace, dead_letter=letter.id)
    except SessionEndedError:
        raise DeadLetterError(
            f"{letter.ref}: session {letter.session} has ended and takes no new event, so its "
            "dead letter cannot be handled after it in order; drop it (flowbus dead drop "
            f"{letter.ref}). With --dead-letter pause a session waits for its dead letters."
        ) from None
    except PayloadTooLargeError as exc:  # its event with the replay's wrapping
        raise DeadLetterError(
            f"{letter.ref}: cannot be replayed, {exc}; drop it (flowbus dead drop {letter.ref})"
        ) from None
    except DeadLetterGoneError:  # another replay or drop took it first
        raise DeadLetterError(
            f"{letter.ref}: replayed or dropped meanwhile; nothing was published"
        ) from None
    return (
        f"{letter.ref}: seq {letter.seq} {letter.type} of session {letter.session} replayed "
        f"for {letter.group} as seq {published.seq}"
    )


def _resumed_already(letter: DeadLetter) -> DeadLetterError:
    return DeadLetterError(
        f"{letter.ref}: session {letter.session} is no longer paused on it for {letter.group}: "
        f"it was resumed already (entry {letter.entry} retried in place, or dropped), so it is "
        f"not handed over again; flowbus dead drop {letter.ref} removes the dead letter"
    )


async def drop(bus: Bus, letter: DeadLetter) -> str:
    """Remove `letter`; a session paused on it goes on without it. Says what was done."""
    if letter.paused:  # the letter removed with the resume
        resumed = await bus.resume(letter.session, letter.group, drop=True, dead_letter=letter.id)
        if resumed is not None:
            return (
                f"{letter.ref}: dropped; session {letter.session} goes on for {letter.group} "
                f"without entry {letter.entry}"
            )
    await _remove(bus, letter)
    return f"{letter.ref}: dropped"


async def _remove(bus: Bus, letter: DeadLetter) -> None:
    remove = partial(bus.redis.xdel, bus.keys.dead(letter.partition), letter.id)
    await call("dead drop", remove, bus.settings, letter.session)  # once, however often sent
