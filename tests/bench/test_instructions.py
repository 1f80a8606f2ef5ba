"""The instruction counter's reading of callgrind and its arguments (no valgrind needed)."""

from __future__ import annotations

import pytest

from bench.instructions import Count, collected, main, render
from bench.workload import BenchError


def test_the_count_is_read_from_callgrinds_log() -> None:
    log = "==41== Events    : Ir\n==41== Collected : 2,585,007,667\n==41==\n"
    assert collected(log) == 2_585_007_667
    with pytest.raises(BenchError, match="counted nothing"):
        collected("==41== valgrind: failed to start tool 'callgrind'\n")


def test_each_consumer_is_shown_against_the_baseline() -> None:
    counts = [Count("plain", 10, 1, 2, 5, 25, 2), Count("flowbus", 10, 1, 2, 5, 55, 5)]
    assert render(counts).splitlines()[1:] == [
        "plain                           2         1.00",
        "flowbus                         5         2.50",
    ]


def test_the_second_run_must_have_more_events_than_the_first() -> None:
    with pytest.raises(SystemExit):
        main(["--low", "20", "--high", "20"])
