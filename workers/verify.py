"""The demo's per-call order check, from the session stream and the services' journal.

For every call it checks that:

- the stream holds seq 1..N without a gap and, once the call is over, ends with
  ``session.ended``;
- every action of every node entry ran, once, in list order, and where Pipecat Flows puts it:
  a pre-action after the node was entered and before the LLM's reply was complete, a
  post-action only after the reply was complete *and* spoken, an action after a ``tts_say``
  only once that phrase was spoken, nothing after an ``end_conversation``. Custom and
  ``function`` actions are placed by their journal records (the stream's last seq when they
  started and ended); ``tts_say`` by its ``tts.spoken`` confirmation, bot-side actions by their
  ``action.done``, ``end_conversation`` by ``session.ended``;
- each handler service saw exactly the events it subscribes to, each once, in seq order;
- what the caller heard of a reply cut short (``tts.finished`` ``heard``) is the start of the
  reply the LLM wrote (its ``llm.completed``);
- the bot spoke each ``tts_say`` and ran each bot-side action once.

With `at_least_once` (a call through crashes and takeovers) a custom action or a handling may
run again, as the contract allows: an action's every run must start in its place, and its
first run to finish must finish in its place; a handler service's handlings, ordered by when
they started, may repeat an event only right after its handling (with a `window` above 1, as
a replay, in order, of at most that many of its events: ``ack_mode="batch"``'s read batch).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from bus import Entry

from .journal import ActionRecord, EventRecord, Record

SPEECH = frozenset({"tts_say", "end_conversation"})
#: The bot's events confirming a ``tts_say`` spoken, a bot-side action run.
CONFIRMATIONS = ("tts.spoken", "action.done")


class CallCheck(msgspec.Struct, frozen=True):
    """The verdict on one call: `problems` is empty when everything was in order."""

    session: str
    events: int
    ended: bool
    actions: int
    handled: dict[str, int]
    problems: list[str]
    #: Replies whose speech was cut short (the caller spoke over the bot).
    replies_cut: int = 0
    #: Runs of an action, and handlings of an event, after its first (a problem unless
    #: `at_least_once`).
    repeats: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True, slots=True)
class _Step:
    """Where an action happened, as a range of stream seqs: it started after `first` and
    ended no later than the entry following `last`; a run of it again (after a crash)
    started after `latest`."""

    kind: str
    first: int
    last: int
    latest: int


def check_call(
    session: str,
    stream: Sequence[Entry],
    journal: Iterable[Record],
    subscriptions: Mapping[str, frozenset[str]],
    *,
    over: bool = True,
    at_least_once: bool = False,
    window: int = 1,
) -> CallCheck:
    """Check one call (see the module docstring). `subscriptions` maps each handler service
    to the events it subscribes to; `over` says the call should have ended; `at_least_once`
    allows repeats after a crash, replays of up to `window` events."""
    records = list(journal)
    problems: list[str] = []
    seqs = [e.seq for e in stream]
    if seqs != list(range(1, len(seqs) + 1)):
        problems.append(f"the stream's seqs are not 1..{len(seqs)} in order")
    ended = bool(stream) and stream[-1].type == "session.ended"
    if over and not ended:
        problems.append("the stream does not end with session.ended")
    actions = [r for r in records if isinstance(r, ActionRecord)]
    problems += _check_actions(stream, actions, ended, at_least_once=at_least_once)
    cut, heard_problems = _check_heard(stream)
    problems += heard_problems
    repeats = len(actions) - len({r.key for r in actions})
    handled: dict[str, int] = {}
    for service, events in sorted(subscriptions.items()):
        handlings = [r for r in records if isinstance(r, EventRecord) and r.service == service]
        if at_least_once:  # a handling's record may be written late (a frozen worker's)
            handlings.sort(key=lambda r: r.handled_us)
        seen = [r.seq for r in handlings]
        handled[service] = len(seen)
        expected = [e.seq for e in stream if e.type in events]
        repeats += len(seen) - len(set(seen))
        if at_least_once:
            place = {seq: n for n, seq in enumerate(expected, start=1)}
            ok = set(seen) == set(expected) and in_order((place[seq] for seq in seen), window)
        else:
            ok = seen == expected
        if not ok:
            problems.append(
                f"{service} saw seqs {seen}, expected {expected} (its events, in order)"
            )
    return CallCheck(session, len(stream), ended, len(actions), handled, problems, cut, repeats)


def in_order(seqs: Iterable[int], window: int = 1) -> bool:
    """Whether `seqs`, a session's handlings in the order they started, are 1, 2, ... with a
    repeat only as a replay: each handling is of the event after the one handled before it, or
    goes back to an event no further back than that one and than the last `window` events
    handled (1: the event in flight at a crash; a read batch with ``ack_mode="batch"``)."""
    top = previous = 0  # the latest event handled, the one handled last
    for seq in seqs:
        if seq != previous + 1 and not top - window < seq <= previous:
            return False
        top, previous = max(top, seq), seq
    return True


def _check_heard(stream: Sequence[Entry]) -> tuple[int, list[str]]:
    """The replies cut short, and the problems of what was heard of them."""
    cut, problems, written = 0, [], ""
    for entry in stream:
        if entry.type == "llm.completed":
            written = msgspec.json.decode(entry.data).get("text", "")
        elif entry.type == "tts.finished":
            finished = msgspec.json.decode(entry.data)
            heard = finished.get("heard")
            if not finished.get("interrupted"):
                continue
            cut += 1
            if heard is not None and not _words(written).startswith(_words(heard)):
                problems.append(
                    f"seq {entry.seq}: the caller heard {heard!r}, not the start of the reply "
                    f"{written!r}"
                )
    return cut, problems


def _words(text: str) -> str:
    return " ".join(text.split())


def _check_actions(
    stream: Sequence[Entry], records: list[ActionRecord], ended: bool, *, at_least_once: bool
) -> list[str]:
    problems: list[str] = []
    data = [msgspec.json.decode(e.data) for e in stream]
    by_type: dict[str, list[tuple[int, Any]]] = {}
    for entry, payload in zip(stream, data, strict=True):
        by_type.setdefault(entry.type, []).append((entry.seq, payload))
    confirmations = [(p["corr"], seq) for t in CONFIRMATIONS for seq, p in by_type.get(t, [])]
    confirmed = dict(confirmations)
    problems += [
        f"the bot confirmed {corr} {n} times (spoke it, or ran it, again)"
        for corr, n in Counter(corr for corr, _ in confirmations).items()
        if n > 1
    ]
    end_seq = stream[-1].seq if ended else None
    runs: dict[str, list[ActionRecord]] = defaultdict(list)
    for r in records:
        runs[r.key].append(r)
    if not at_least_once:
        problems += [f"action {k} ran {len(rs)} times" for k, rs in runs.items() if len(rs) > 1]
    expected_keys: set[str] = set()

    def first_of(kind: str, gen: int) -> int | None:
        return next((seq for seq, p in by_type.get(kind, []) if p["gen"] == gen), None)

    for entered_seq, entered in by_type.get("node.entered", []):
        gen, node = entered["gen"], entered["node"]
        llm, tts = first_of("llm.completed", gen), first_of("tts.finished", gen)
        for phase in ("pre", "post"):
            steps: list[_Step] = []
            for i, action in enumerate(entered[f"{phase}_actions"]):
                key, kind = f"{entered_seq}/{phase}/{i}", str(action.get("type"))
                where = f"{node} {phase}-action {i} ({kind})"
                if phase == "post" and (llm is None or tts is None):
                    break  # not due yet: a record of it is reported below
                step = _locate(key, kind, action, runs, confirmed, end_seq)
                expected_keys.add(key)
                if step is None:
                    problems.append(f"{where} did not run")
                    break
                if step.first < entered_seq:
                    problems.append(f"{where} ran before its node was entered")
                if phase == "pre" and llm is not None and step.last >= llm:
                    problems.append(f"{where} was still running when the LLM replied")
                if phase == "pre" and llm is not None and step.latest >= llm:
                    problems.append(f"{where} ran again after the LLM replied")
                if phase == "post" and llm is not None and tts is not None:
                    if step.first < max(llm, tts):
                        problems.append(f"{where} ran before the reply was complete and spoken")
                if steps and not _follows(steps[-1], step):
                    problems.append(f"{where} ran before the action before it had finished")
                steps.append(step)
                if kind == "end_conversation":
                    break
    problems += [f"action {k} ran where it should not have" for k in runs.keys() - expected_keys]
    return problems


def _locate(
    key: str,
    kind: str,
    action: Mapping[str, Any],
    runs: Mapping[str, list[ActionRecord]],
    confirmed: Mapping[str, int],
    end_seq: int | None,
) -> _Step | None:
    if kind == "end_conversation":
        return None if end_seq is None else _Step(kind, end_seq, end_seq, end_seq)
    if kind == "tts_say" or "bot_handler" in action:
        seq = confirmed.get(key)
        # The bot confirms after speaking (or running) it: it started before that entry.
        return None if seq is None else _Step(kind, seq - 1, seq, seq - 1)
    if not (records := runs.get(key)):
        return None
    # Its first run to finish is the one that counts; a run cut short by a crash, or frozen,
    # ends later (or never), so only its start is checked.
    starts = [r.first for r in records]
    return _Step(kind, min(starts), min(r.last for r in records), max(starts))


def _follows(before: _Step, step: _Step) -> bool:
    """Whether `step` started only once `before` was over. A phrase is only queued when the
    next action is speech too, so speech after speech needs no wait."""
    if before.kind in SPEECH and step.kind in SPEECH:
        return step.last >= before.last
    return step.first >= before.last


def latencies_ms(stream: Sequence[Entry], records: Iterable[Record]) -> list[float]:
    """Publish-to-handler latency of each event a handler saw on its first delivery: the
    handler's clock minus the entry's ``ts`` (ms, the server's clock, on this machine)."""
    ts = {e.seq: e.ts for e in stream}
    return [
        r.handled_us / 1000 - ts[r.seq]
        for r in records
        if isinstance(r, EventRecord) and r.deliveries == 1 and r.seq in ts
    ]
