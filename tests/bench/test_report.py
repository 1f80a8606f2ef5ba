"""The benchmark's verdicts and table, from results made by hand (no server needed)."""

from __future__ import annotations

import pytest

from bench import floor_consumer
from bench.__main__ import RESULTS, main, parser
from bench.baseline import BaselineResult
from bench.machine import Machine, cpu_probe_ms
from bench.report import Results, judge, render
from bench.soak import SoakResult, SoakSample
from bench.throughput import ThroughputResult
from bench.workload import output_for

MACHINE = Machine(2, "AMD EPYC", "3.11.7", "redis", "7.0.15", 0.5, probe_ms_at_start=48.5)


def results() -> Results:
    return Results(started="2026-11-27T21:00:00+00:00", seconds=1.0, machine=MACHINE, load_at_end=0)


def test_the_throughput_verdict_compares_the_best_runs() -> None:
    r = results()
    r.baseline = [BaselineResult(2, 1000, 20_000, 0.1, 200_000, 1, 4, 0)]
    r.throughput = [
        ThroughputResult(2, 1000, 20_000, 1.0, 0.2, 100_000, 7, 18, 0),
        ThroughputResult(2, 1000, 20_000, 1.0, 0.4, 50_000, 7, 18, 0),
    ]
    judge(r)
    assert r.verdicts["throughput_ratio"].measured == 0.5 and r.verdicts["throughput_ratio"].met
    assert "100,000 events/s = 50.0% of baseline" in render(r)


def test_the_floor_is_shown_against_the_baseline_and_flowbus_against_the_floor() -> None:
    r = results()
    r.baseline = [BaselineResult(2, 1000, 20_000, 0.1, 200_000, 1, 4, 0)]
    r.floor = [BaselineResult(2, 1000, 20_000, 0.2, 120_000, 2, 5, 0, floor_consumer.NOTE)]
    r.throughput = [ThroughputResult(2, 1000, 20_000, 1.0, 0.2, 90_000, 4, 10, 0)]
    judge(r)
    table = render(r)
    assert "120,000 events/s = 60.0% of baseline" in table
    assert "= 75.0% of the contract's floor" in table
    assert "floor server 2 + consumers 5; flowbus server 4 + workers 10" in table
    assert r.verdicts["throughput_ratio"].measured == 0.45  # the target is still the baseline's


def test_batched_acks_get_a_row_and_a_verdict_of_their_own_beside_the_contracts() -> None:
    r = results()
    r.baseline = [BaselineResult(2, 1000, 20_000, 0.1, 200_000, 1, 4, 0)]
    r.throughput = [ThroughputResult(2, 1000, 20_000, 1.0, 0.2, 80_000, 4, 10, 0)]
    r.throughput_batch = [
        ThroughputResult(2, 1000, 20_000, 1.0, 0.2, 110_000, 3, 7, 0, "batch"),
        ThroughputResult(2, 1000, 20_000, 1.0, 0.2, 120_000, 3, 7, 0, "batch"),
    ]
    judge(r)
    assert not r.verdicts["throughput_ratio"].met  # the contract's acks: 40 %
    assert r.verdicts["throughput_ratio_batch"].measured == 0.6
    table = render(r)
    assert "80,000 events/s = 40.0% of baseline" in table
    assert "120,000 events/s = 60.0% of baseline" in table
    assert "(runs: 110,000, 120,000; best shown; not the contract's ack order)" in table


def test_a_soak_shows_its_calls_and_memory_from_the_first_sample_to_the_last() -> None:
    samples = [
        SoakSample(15.0, 15_000, 1_000, 1_000, [40_960, 39_936], 7 * 1024 * 1024),
        SoakSample(30.0, 30_000, 2_000, 1_000, [41_984, 39_936], 8 * 1024 * 1024),
    ]
    soak = SoakResult(2, 1000.0, 40.0, 40_000, 2_000, samples)
    r = results()
    r.soak = soak
    table = render(r)
    assert "5 soak: 40 s of 20-event calls at 1,000 events/s" in table
    assert "2,000 calls, 40,000 events, every one retired" in table
    assert "worker RSS MB 40.0 -> 41.0, 39.0 -> 39.0; server used_memory 7.0 -> 8.0 MB" in table
    assert soak.rss_growth_kb == [1_024, 0]
    assert "baseline" not in table  # nothing said of benchmarks that did not run


def test_the_table_shows_how_fast_the_cpus_were_at_start_and_at_end() -> None:
    r = results()
    r.probe_ms_at_end = cpu_probe_ms()
    assert r.probe_ms_at_end > 0
    assert f"48.5 ms at start, {r.probe_ms_at_end:g} ms at end" in render(r)


def test_the_soak_runs_only_when_asked_for() -> None:
    assert parser().parse_args([]).soak == 0.0
    assert parser().parse_args(["--only", "soak"]).only == ["soak"]
    assert parser().parse_args(["--soak", "60"]).soak == 60.0


def test_the_events_per_session_of_the_throughput_runs_can_be_chosen() -> None:
    assert parser().parse_args([]).events == 20
    assert parser().parse_args(["--events", "60"]).events == 60
    with pytest.raises(SystemExit):
        main(["--events", "0"])


def test_a_partial_run_writes_its_results_beside_the_full_runs() -> None:
    assert output_for(RESULTS, None) == RESULTS
    assert output_for(RESULTS, ["latency", "floor", "latency"]) == RESULTS.with_name(
        "results-floor-latency.json"
    )
