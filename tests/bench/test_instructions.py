"""The instruction counter's reading of callgrind and its arguments (no valgrind needed)."""

from __future__ import annotations

import pytest

from bench.instructions import Count, collected, main, render, totals
from bench.workload import BenchError


def test_the_count_is_read_from_callgrinds_log() -> None:
    log = "==41== Events    : Ir\n==41== Collected : 2,585,007,667\n==41==\n"
    assert collected(log) == 2_585_007_667
    with pytest.raises(BenchError, match="counted nothing"):
        collected("==41== valgrind: failed to start tool 'callgrind'\n")


def test_the_servers_count_sums_its_threads() -> None:
    status = "PID 7: redis-server\n\n  Totals:     Ir \n   Th 1  340,872 \n   Th 3  1,000 \n\n"
    assert totals(status) == 341_872
    with pytest.raises(BenchError, match="counted nothing"):
        totals("PID 7: redis-server\n  No information available.\n")


def test_each_consumer_is_shown_with_the_server_against_the_baseline() -> None:
    counts = [
        Count("plain", 10, 1, 2, 5, 25, 2, 0, 20, 2),
        Count("flowbus", 10, 1, 2, 5, 55, 5, 0, 30, 3),
    ]
    assert counts[1].total_per_event == 8
    assert render(counts).splitlines()[1:] == [
        "plain             2          2          4   1.00, 1.00",
        "flowbus           5          3          8   2.50, 2.00",
    ]


def test_the_second_run_must_have_more_events_than_the_first() -> None:
    with pytest.raises(SystemExit):
        main(["--low", "20", "--high", "20"])
