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
  reply the LLM wrote (its ``llm.completed``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from bus import Entry

from .journal import ActionRecord, EventRecord, Record

SPEECH = frozenset({"tts_say", "end_conversation"})


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

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True, slots=True)
class _Step:
    """Where an action happened, as a range of stream seqs: it started after `first` and
    ended no later than the entry following `last`."""

    kind: str
    first: int
    last: int


def check_call(
    session: str,
    stream: Sequence[Entry],
    journal: Iterable[Record],
    subscriptions: Mapping[str, frozenset[str]],
    *,
    over: bool = True,
) -> CallCheck:
    """Check one call (see the module docstring). `subscriptions` maps each handler service
    to the events it subscribes to; `over` says the call should have ended."""
    records = list(journal)
    problems: list[str] = []
    seqs = [e.seq for e in stream]
    if seqs != list(range(1, len(seqs) + 1)):
        problems.append(f"the stream's seqs are not 1..{len(seqs)} in order")
    ended = bool(stream) and stream[-1].type == "session.ended"
    if over and not ended:
        problems.append("the stream does not end with session.ended")
    actions = [r for r in records if isinstance(r, ActionRecord)]
    problems += _check_actions(stream, actions, ended)
    cut, heard_problems = _check_heard(stream)
    problems += heard_problems
    handled: dict[str, int] = {}
    for service, events in sorted(subscriptions.items()):
        seen = [r.seq for r in records if isinstance(r, EventRecord) and r.service == service]
        handled[service] = len(seen)
        expected = [e.seq for e in stream if e.type in events]
        if seen != expected:
            problems.append(
                f"{service} saw seqs {seen}, expected {expected} (its events, in order)"
            )
    return CallCheck(session, len(stream), ended, len(actions), handled, problems, cut)


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


def _check_actions(stream: Sequence[Entry], records: list[ActionRecord], ended: bool) -> list[str]:
    problems: list[str] = []
    data = [msgspec.json.decode(e.data) for e in stream]
    by_type: dict[str, list[tuple[int, Any]]] = {}
    for entry, payload in zip(stream, data, strict=True):
        by_type.setdefault(entry.type, []).append((entry.seq, payload))
    confirmed = {
        p["corr"]: seq for t in ("tts.spoken", "action.done") for seq, p in by_type.get(t, [])
    }
    end_seq = stream[-1].seq if ended else None
    counts = Counter(r.key for r in records)
    problems += [f"action {k} ran {n} times" for k, n in counts.items() if n > 1]
    recorded = {r.key: r for r in records}
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
                step = _locate(key, kind, action, recorded, confirmed, end_seq)
                expected_keys.add(key)
                if step is None:
                    problems.append(f"{where} did not run")
                    break
                if step.first < entered_seq:
                    problems.append(f"{where} ran before its node was entered")
                if phase == "pre" and llm is not None and step.last >= llm:
                    problems.append(f"{where} was still running when the LLM replied")
                if phase == "post" and llm is not None and tts is not None:
                    if step.first < max(llm, tts):
                        problems.append(f"{where} ran before the reply was complete and spoken")
                if steps and not _follows(steps[-1], step):
                    problems.append(f"{where} ran before the action before it had finished")
                steps.append(step)
                if kind == "end_conversation":
                    break
    problems += [
        f"action {k} ran where it should not have" for k in recorded.keys() - expected_keys
    ]
    return problems


def _locate(
    key: str,
    kind: str,
    action: Mapping[str, Any],
    recorded: Mapping[str, ActionRecord],
    confirmed: Mapping[str, int],
    end_seq: int | None,
) -> _Step | None:
    if kind == "end_conversation":
        return None if end_seq is None else _Step(kind, end_seq, end_seq)
    if kind == "tts_say" or "bot_handler" in action:
        seq = confirmed.get(key)
        # The bot confirms after speaking (or running) it: it started before that entry.
        return None if seq is None else _Step(kind, seq - 1, seq)
    record = recorded.get(key)
    return None if record is None else _Step(kind, record.first, record.last)


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
