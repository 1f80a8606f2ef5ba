"""The benchmarks' judgements: the takeover verdict needs order, completeness and only the
repeats a kill allows."""

from __future__ import annotations

from bench.machine import Machine
from bench.report import Results, judge, render
from bench.takeover import TakeoverResult, TakeoverRun, unexpected_repeats
from workers.probe import Handling

VICTIM, OTHER, KILL = 10, 11, 100
MACHINE = Machine(2, "cpu", "3.11.7", "redis", "7.0.15", 0.5)


def h(session: str, seq: int, pid: int, at: int) -> Handling:
    return Handling(session, seq, pid, 1, 0, at)


def test_the_repeat_of_the_event_in_flight_at_the_kill_is_allowed() -> None:
    hs = [h("v", 1, VICTIM, 1), h("v", 2, VICTIM, 2), h("v", 2, OTHER, 150), h("v", 3, OTHER, 151)]
    assert unexpected_repeats(hs, {"v"}, VICTIM, KILL) == 0


def test_other_repeats_are_not() -> None:
    hs = [
        h("s", 1, OTHER, 1),
        h("s", 1, OTHER, 2),  # a session the victim never held
        h("v", 1, VICTIM, 1),
        h("v", 2, VICTIM, 2),
        h("v", 1, OTHER, 150),  # not the last one the victim started
        h("v", 2, OTHER, 151),
        h("v", 2, OTHER, 152),  # twice after the kill
    ]
    assert unexpected_repeats(hs, {"v"}, VICTIM, KILL) == 4


def test_a_run_that_lost_or_reordered_events_misses_the_target() -> None:
    r = Results(started="x", seconds=1, machine=MACHINE, load_at_end=0)
    r.takeover = TakeoverResult(3, 2.0, 400, 200, [TakeoverRun(21, 70, 2.1, 2.0, 3000, 0, 5)])
    judge(r)
    assert not r.verdicts["takeover_max_gap_s"].met
    r.takeover = TakeoverResult(3, 2.0, 400, 200, [TakeoverRun(21, 70, 2.1, 2.0, 3000, 3, 0, 2)])
    judge(r)
    assert not r.verdicts["takeover_max_gap_s"].met
    assert "(2 not of an event in flight at the kill)" in render(r)
    r.takeover = TakeoverResult(3, 2.0, 400, 200, [TakeoverRun(21, 70, 2.1, 2.0, 3000, 1, 0, 0)])
    judge(r)
    assert r.verdicts["takeover_max_gap_s"].met
