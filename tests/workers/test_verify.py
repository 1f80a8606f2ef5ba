"""The demo's per-call order check finds each kind of disorder (no server needed)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from bus import Entry
from workers.journal import ActionRecord, EventRecord, Record
from workers.verify import check_call

CRM = {"crm": frozenset({"on_client_connected"})}


def stream(*events: tuple[str, dict[str, Any]]) -> list[Entry]:
    return [
        Entry(f"{seq}-0", kind, seq, 1000 + seq, msgspec.json.encode({"type": kind, **data}))
        for seq, (kind, data) in enumerate(events, start=1)
    ]


def call(reply: str = "", **finished: Any) -> list[Entry]:
    """A call of one node: its reply's text, and the fields of its ``tts.finished``."""
    return stream(
        ("on_client_connected", {"emitter": {"kind": "transport.daily"}}),
        (
            "node.entered",
            {
                "node": "greeting",
                "gen": 1,
                "pre_actions": [{"type": "tts_say", "text": "Hi"}, {"type": "load_customer"}],
                "post_actions": [{"type": "log_turn"}, {"type": "end_conversation"}],
            },
        ),
        ("tts.spoken", {"corr": "2/pre/0"}),
        ("llm.completed", {"node": "greeting", "gen": 1, "text": reply}),
        ("tts.finished", {"node": "greeting", "gen": 1, **finished}),
        ("session.ended", {}),
    )


CALL = call()


def action(key: str, first: int, last: int, name: str = "x") -> ActionRecord:
    return ActionRecord("actions", key, name, first, last, 1)


def seen(seq: int) -> EventRecord:
    return EventRecord("crm", "on_client_connected", seq, 1, 0, 2)


IN_ORDER: list[Record] = [seen(1), action("2/pre/1", 3, 3), action("2/post/0", 5, 5)]


def test_a_call_in_order_has_no_problem() -> None:
    check = check_call("call-1", CALL, IN_ORDER, CRM)
    assert check.ok and check.ended and (check.events, check.actions) == (6, 2)
    assert check.handled == {"crm": 1}


@pytest.mark.parametrize(
    ("journal", "problem"),
    [
        (
            [seen(1), action("2/pre/1", 2, 2), action("2/post/0", 5, 5)],
            "greeting pre-action 1 (load_customer) ran before the action before it had finished",
        ),
        (
            [seen(1), action("2/pre/1", 3, 4), action("2/post/0", 5, 5)],
            "greeting pre-action 1 (load_customer) was still running when the LLM replied",
        ),
        (
            [seen(1), action("2/pre/1", 3, 3), action("2/post/0", 4, 5)],
            "greeting post-action 0 (log_turn) ran before the reply was complete and spoken",
        ),
        ([seen(1), action("2/pre/1", 3, 3)], "greeting post-action 0 (log_turn) did not run"),
        ([*IN_ORDER, action("2/pre/1", 3, 3)], "action 2/pre/1 ran 2 times"),
        ([*IN_ORDER, action("2/post/2", 6, 6)], "action 2/post/2 ran where it should not have"),
        (IN_ORDER[1:], "crm saw seqs [], expected [1]"),
        ([*IN_ORDER, seen(1)], "crm saw seqs [1, 1], expected [1]"),
    ],
    ids=[
        "custom-before-phrase",
        "pre-during-llm",
        "post-before-tts",
        "missing",
        "twice",
        "after-end",
        "event-missed",
        "event-twice",
    ],
)
def test_each_kind_of_disorder_is_found(journal: list[Record], problem: str) -> None:
    problems = check_call("call-1", CALL, journal, CRM).problems
    assert any(p.startswith(problem) for p in problems), problems


def test_a_call_that_did_not_end_or_lost_a_seq_is_found() -> None:
    assert "the stream does not end with session.ended" in (
        check_call("call-1", CALL[:-1], IN_ORDER, CRM).problems
    )
    gap = [CALL[0], *CALL[2:]]
    assert "the stream's seqs are not 1..5 in order" in check_call("c", gap, IN_ORDER, CRM).problems


@pytest.mark.parametrize(
    ("heard", "problem"),
    [
        ("Order A1234", None),
        ("", None),
        (None, None),  # a TTS that said only that it was cut short
        ("Anything else?", "seq 5: the caller heard 'Anything else?', not the start of the reply"),
    ],
)
def test_a_reply_cut_short_is_counted_and_what_was_heard_must_be_its_start(
    heard: str | None, problem: str | None
) -> None:
    cut = call("Order A1234 has shipped.  Anything else?", interrupted=True, heard=heard)
    check = check_call("call-1", cut, IN_ORDER, CRM)
    assert check.replies_cut == 1 and check_call("call-1", CALL, IN_ORDER, CRM).replies_cut == 0
    assert [p[: len(problem or "")] for p in check.problems] == ([problem] if problem else [])


# -- at least once: a call through crashes and takeovers (the flows chaos run) -----------------
CRM_TWO = {"crm": frozenset({"on_client_connected", "tts.spoken"})}  # seqs 1 and 3 of CALL


def at(seq: int, handled_us: int) -> EventRecord:
    return EventRecord("crm", "on_client_connected", seq, 1, handled_us, 2)


@pytest.mark.parametrize(
    "journal",
    [
        [*IN_ORDER, action("2/pre/1", 3, 3)],  # run again: killed before its state was saved
        [seen(1), action("2/pre/1", 3, 5), action("2/pre/1", 3, 3), action("2/post/0", 5, 5)],
        [seen(1), *IN_ORDER],  # handled again right after
    ],
    ids=["again", "frozen-run-ends-late", "event-again"],
)
def test_at_least_once_allows_a_repeat_in_its_place(journal: list[Record]) -> None:
    assert check_call("call-1", CALL, journal, CRM).problems
    check = check_call("call-1", CALL, journal, CRM, at_least_once=True)
    assert check.ok and check.repeats == 1, check.problems


@pytest.mark.parametrize(
    ("journal", "problem"),
    [
        (
            [*IN_ORDER, action("2/pre/1", 4, 4)],
            "greeting pre-action 1 (load_customer) ran again after the LLM replied",
        ),
        (
            [seen(1), action("2/pre/1", 3, 4), action("2/pre/1", 3, 5), action("2/post/0", 5, 5)],
            "greeting pre-action 1 (load_customer) was still running when the LLM replied",
        ),
        (
            [*IN_ORDER, action("2/post/0", 4, 5)],
            "greeting post-action 0 (log_turn) ran before the reply was complete and spoken",
        ),
        ([seen(1)], "greeting pre-action 1 (load_customer) did not run"),
    ],
    ids=["again-after-llm", "no-run-finished-in-place", "again-too-early", "missing"],
)
def test_at_least_once_finds_a_run_out_of_place(journal: list[Record], problem: str) -> None:
    problems = check_call("call-1", CALL, journal, CRM, at_least_once=True).problems
    assert any(p.startswith(problem) for p in problems), problems


@pytest.mark.parametrize(
    ("handlings", "ok"),
    [
        ([at(1, 10), at(3, 20)], True),
        ([at(3, 20), at(1, 10)], True),  # its record written late: ordered by start
        ([at(1, 10), at(3, 20), at(3, 30)], True),
        ([at(1, 10), at(1, 15), at(3, 20)], True),
        ([at(3, 10), at(1, 20)], False),  # started before the event before it
        ([at(1, 10), at(3, 20), at(1, 30)], False),  # again, but not right after
        ([at(1, 10)], False),  # one missed
    ],
)
def test_at_least_once_orders_handlings_by_their_start(
    handlings: list[EventRecord], ok: bool
) -> None:
    journal: list[Record] = [*handlings, action("2/pre/1", 3, 3), action("2/post/0", 5, 5)]
    check = check_call("call-1", CALL, journal, CRM_TWO, at_least_once=True)
    assert check.ok is ok, check.problems
    assert check.handled == {"crm": len(handlings)}


def test_a_window_allows_a_replay_of_that_many_events_in_order() -> None:
    replayed: list[Record] = [  # 1 and 3 handled, then again: a read batch's replay
        *(at(seq, us) for seq, us in ((1, 10), (3, 20), (1, 30), (3, 40))),
        action("2/pre/1", 3, 3),
        action("2/post/0", 5, 5),
    ]
    assert not check_call("c", CALL, replayed, CRM_TWO, at_least_once=True).ok
    check = check_call("c", CALL, replayed, CRM_TWO, at_least_once=True, window=2)
    assert check.ok and check.repeats == 2, check.problems


def test_a_phrase_the_bot_spoke_twice_is_found_in_either_mode() -> None:
    twice = [*CALL[:3], CALL[2], *CALL[3:]]
    for at_least_once in (False, True):
        problems = check_call("c", twice, IN_ORDER, CRM, at_least_once=at_least_once).problems
        assert "the bot confirmed 2/pre/0 2 times (spoke it, or ran it, again)" in problems
