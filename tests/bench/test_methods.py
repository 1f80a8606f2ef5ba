"""The benchmarks' judgements: the takeover verdict needs order, completeness and only the
repeats a kill allows; latency is judged from the schedule's times."""

from __future__ import annotations

import itertools
import time
from itertools import pairwise
from typing import Any

import anyio
import msgspec
import pytest

from bench.latency import LatencyResult, paced_publish
from bench.machine import Machine
from bench.report import Results, judge, render
from bench.takeover import TakeoverResult, TakeoverRun, unexpected_repeats
from bus import Bus
from tests.support import raw
from workers.probe import Handling, ProbeTick

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


def latency_result(p99_ms: float, due_p99_ms: float) -> LatencyResult:
    return LatencyResult(
        2, 1000, 10_000, 1000, 1000, 10, 0.5, 0.8, p99_ms, 9, 0.6, due_p99_ms, 9, 1, 0, 300
    )


def test_the_latency_target_is_judged_from_the_schedule_and_both_measures_are_shown() -> None:
    r = Results(started="x", seconds=1, machine=MACHINE, load_at_end=0)
    r.latency = latency_result(p99_ms=1.5, due_p99_ms=6.5)
    judge(r)
    assert not r.verdicts["latency_p99_ms"].met
    table = render(r)
    assert "p99 1.50" in table and "from the schedule: p50 0.60  p99 6.50" in table
    r.latency = latency_result(p99_ms=1.5, due_p99_ms=2.5)
    judge(r)
    assert r.verdicts["latency_p99_ms"].met


def test_a_handling_counts_its_latency_from_its_due_time_if_it_went_out_late() -> None:
    late = Handling("s", 1, 1, 1, sent_ns=5_000_000, handled_ns=6_000_000, due_ns=2_000_000)
    assert (late.latency_us, late.due_latency_us) == (1000, 4000)
    unscheduled = Handling("s", 1, 1, 1, sent_ns=5_000_000, handled_ns=6_000_000)
    early = Handling("s", 1, 1, 1, sent_ns=5_000_000, handled_ns=6_000_000, due_ns=5_500_000)
    assert unscheduled.due_latency_us == early.due_latency_us == 1000  # from the publish


@pytest.mark.anyio
async def test_a_held_up_publisher_stamps_its_late_events_with_their_due_times(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish, calls = bus.publish, itertools.count(1)
    released: list[int] = []  # when the hold ended, on the clock the ticks are stamped by

    async def held_first(session: str, payload: Any, **kwargs: Any) -> Any:
        if next(calls) == 1:  # the first publish is held up
            await anyio.sleep(0.05)
            released.append(time.time_ns())
        return await publish(session, payload, **kwargs)

    monkeypatch.setattr(bus, "publish", held_first)
    await paced_publish(bus, ["a", "b"], rate=1000, seconds=0.004, publishers=1)
    ticks = []
    for session in ["a", "b"]:
        for _, fields in await raw(bus).xrange(bus.keys.session(session)):
            ticks.append(msgspec.json.decode(fields[b"data"], type=ProbeTick))
    ticks.sort(key=lambda t: t.due_ns)
    assert len(ticks) == 4
    # each due 1 ms after the one before, on the schedule's clock, however late it went out
    assert [b.due_ns - a.due_ns for a, b in pairwise(ticks)] == [1_000_000] * 3
    # Each later one was due while the first was held up, and went out after the hold.
    [end] = released
    assert all(t.due_ns < end <= t.sent_ns for t in ticks[1:]), (end, ticks)
