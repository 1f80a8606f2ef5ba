"""The benchmark's table for a person, and its results as JSON."""

from __future__ import annotations

import msgspec

from .baseline import BaselineResult
from .latency import LatencyResult
from .machine import Machine
from .soak import SoakResult
from .takeover import TakeoverResult
from .throughput import ThroughputResult

#: flowbus throughput as a share of the baseline's, at least.
TARGET_RATIO = 0.5
#: Publish-to-handler p99 (ms), under; judged from the times the publishers' schedule gave the
#: events, the stricter measure (see `bench.latency`).
TARGET_P99_MS = 5.0
#: Takeover gap, in lease TTLs, under.
TARGET_GAP_TTLS = 2.0


class Verdict(msgspec.Struct, frozen=True):
    """One target: the value measured, the target and whether it was met."""

    measured: float
    target: str
    met: bool


class Results(msgspec.Struct, kw_only=True):
    """Everything one ``python -m bench`` run measured (written to ``bench/results.json``)."""

    started: str
    seconds: float
    machine: Machine
    load_at_end: float
    probe_ms_at_end: float = 0.0
    baseline: list[BaselineResult] | None = None
    #: The contract's floor (`bench.floor_consumer`), measured as the baseline is.
    floor: list[BaselineResult] | None = None
    throughput: list[ThroughputResult] | None = None
    #: The same with the workers' `ack_mode` 'batch' (benchmark 2b).
    throughput_batch: list[ThroughputResult] | None = None
    latency: LatencyResult | None = None
    latency_sweep: list[LatencyResult] | None = None
    takeover: TakeoverResult | None = None
    soak: SoakResult | None = None
    verdicts: dict[str, Verdict] = msgspec.field(default_factory=dict)


def best_baseline(r: Results) -> BaselineResult | None:
    return max(r.baseline, key=lambda b: b.events_per_second) if r.baseline else None


def best_floor(r: Results) -> BaselineResult | None:
    return max(r.floor, key=lambda b: b.events_per_second) if r.floor else None


def best_throughput(r: Results, *, batch: bool = False) -> ThroughputResult | None:
    runs = r.throughput_batch if batch else r.throughput
    return max(runs, key=lambda t: t.events_per_second) if runs else None


def judge(r: Results) -> None:
    """Fill in `r.verdicts` from what was measured."""
    base = best_baseline(r)
    for name, flow in [
        ("throughput_ratio", best_throughput(r)),
        ("throughput_ratio_batch", best_throughput(r, batch=True)),
    ]:
        if base and flow:
            ratio = flow.events_per_second / base.events_per_second
            r.verdicts[name] = Verdict(
                round(ratio, 4), f">= {TARGET_RATIO:.0%} of baseline", ratio >= TARGET_RATIO
            )
    if r.latency:
        p99 = r.latency.due_p99_ms
        r.verdicts["latency_p99_ms"] = Verdict(p99, f"< {TARGET_P99_MS:g} ms", p99 < TARGET_P99_MS)
    if r.takeover:
        limit = TARGET_GAP_TTLS * r.takeover.lease_ttl_s
        gap = r.takeover.max_gap_s
        r.verdicts["takeover_max_gap_s"] = Verdict(
            gap,
            f"< {limit:g} s (2 lease TTLs)",
            gap < limit and r.takeover.clean,
        )


def render(r: Results) -> str:
    """The results as a table with the machine on top."""
    m = r.machine
    lines = [
        f"flowbus benchmark  {r.started}  ({r.seconds:.0f} s)",
        f"machine: {m.nproc} CPUs ({m.cpu_model}), Python {m.python}, "
        f"{m.server} {m.server_version} (private server started by the benchmark), "
        f"load average {m.load_at_start} at start, {r.load_at_end} at end",
        f"CPU probe (machine.cpu_probe_ms, lower is faster): {m.probe_ms_at_start:g} ms at start, "
        f"{r.probe_ms_at_end:g} ms at end",
        "",
        f"{'benchmark':<54} {'result':<52} {'target':<22} verdict",
        "-" * 140,
    ]
    base, floor, flow = best_baseline(r), best_floor(r), best_throughput(r)
    if base and r.baseline:
        runs = _runs(r.baseline)
        lines.append(
            _row(
                f"1 baseline: plain redis-py, {base.processes} processes",
                f"{base.events_per_second:,.0f} events/s (runs: {runs}; best shown)",
                "",
                "",
            )
        )
    if floor and r.floor:
        runs = _runs(r.floor)
        share = ""
        if base:
            share = f" = {floor.events_per_second / base.events_per_second:.1%} of baseline"
        lines.append(
            _row(
                f"1b contract floor: least Python in order, {floor.processes} processes",
                f"{floor.events_per_second:,.0f} events/s{share}",
                "",
                "",
            )
        )
        lines.append(_row("", f"(runs: {runs}; best shown)", "", ""))
    if flow and r.throughput:
        per = flow.events // flow.sessions
        name = f"2 flowbus: {flow.workers} workers, {flow.sessions:,} x {per} events"
        lines.append(_flow_row(name, flow, r.verdicts.get("throughput_ratio")))
        lines.append(
            _row(
                "",
                f"(runs: {_runs(r.throughput)}; best shown; workers ready, timed from their "
                f"thaw; other processes kept {flow.other_cores_busy:.2f} cores busy)",
                "",
                "",
            )
        )
        if floor:
            of_floor = flow.events_per_second / floor.events_per_second
            lines.append(_row("", f"= {of_floor:.1%} of the contract's floor", "", ""))
    batched = best_throughput(r, batch=True)
    if batched and r.throughput_batch:
        name = "2b flowbus, ack_mode batch (a batch's acks together)"
        lines.append(_flow_row(name, batched, r.verdicts.get("throughput_ratio_batch")))
        note = f"(runs: {_runs(r.throughput_batch)}; best shown; not the contract's ack order)"
        lines.append(_row("", note, "", ""))
    if r.latency:
        lt, v = r.latency, r.verdicts["latency_p99_ms"]
        lines.append(
            _row(
                f"3 latency: {lt.achieved_rate:,.0f} events/s over {lt.sessions:,} sessions, "
                f"{lt.seconds:.0f} s",
                f"p50 {lt.p50_ms:.2f}  p90 {lt.p90_ms:.2f}  p99 {lt.p99_ms:.2f}  "
                f"max {lt.max_ms:.1f} ms",
                "",
                "",
            )
        )
        lines.append(
            _row(
                "",
                f"from the schedule: p50 {lt.due_p50_ms:.2f}  p99 {lt.due_p99_ms:.2f}  "
                f"max {lt.due_max_ms:.1f} ms",
                v.target,
                _met(v, "latency_p99_ms"),
            )
        )
    if r.latency:
        lines.extend(
            _row(
                "",
                f"at {lt.achieved_rate:,.0f}/s: p50 {lt.p50_ms:.2f}  p99 {lt.p99_ms:.2f} ms "
                f"({lt.due_p99_ms:.2f} from the schedule); "
                f"cores busy: {lt.cores_busy:.2f} ours + {lt.other_cores_busy:.2f} others "
                f"of {m.nproc}",
                "",
                "",
            )
            for lt in [r.latency, *(r.latency_sweep or [])]
        )
    if r.takeover:
        to, v = r.takeover, r.verdicts["takeover_max_gap_s"]
        gaps = ", ".join(f"{run.max_gap_s:.2f}" for run in to.runs)
        clean = all(run.lost_or_out_of_order == 0 for run in to.runs)
        stray = sum(run.unexpected_duplicates for run in to.runs)
        lines.append(
            _row(
                f"4 takeover: kill -9 of 1 of {to.workers} workers, lease TTL {to.lease_ttl_s:g} s",
                f"max gap {to.max_gap_s:.2f} s (runs: {gaps})",
                v.target,
                _met(v, "takeover_max_gap_s"),
            )
        )
        dups = sum(run.duplicates for run in to.runs)
        lines.append(
            _row(
                "",
                f"order kept, nothing lost: {'yes' if clean else 'NO'}; duplicates {dups}"
                + (f" ({stray} not of an event in flight at the kill)" if stray else ""),
                "",
                "",
            )
        )
    if r.soak and r.soak.samples:
        sk, mb = r.soak, 1024 * 1024
        first, last = sk.samples[0], sk.samples[-1]
        rss = ", ".join(
            f"{a / 1024:.1f} -> {b / 1024:.1f}"
            for a, b in zip(first.worker_rss_kb, last.worker_rss_kb, strict=True)
        )
        lines.append(
            _row(
                f"5 soak: {sk.seconds:.0f} s of 20-event calls at {sk.rate:,.0f} events/s",
                f"{sk.calls:,} calls, {sk.events:,} events, every one retired",
                "",
                "",
            )
        )
        lines.append(
            _row(
                "",
                f"from {first.at_s:.0f} s to {last.at_s:.0f} s: worker RSS MB {rss}; server "
                f"used_memory {first.server_used_bytes / mb:.1f} -> "
                f"{last.server_used_bytes / mb:.1f} MB",
                "",
                "",
            )
        )
    if base and flow:
        lines += [
            "",
            "CPU per event (µs): "
            f"baseline server {base.server_cpu_us:g} + consumers {base.client_cpu_us:g}; "
            + (
                f"floor server {floor.server_cpu_us:g} + consumers {floor.client_cpu_us:g}; "
                if floor
                else ""
            )
            + f"flowbus server {flow.server_cpu_us:g} + workers {flow.client_cpu_us:g}",
        ]
    if base and flow:
        lines.append(
            "The baseline gets as many processes as flowbus has workers (2), each consuming half "
            "of the streams; it keeps no per-session order."
        )
    if floor:
        lines.append(
            "The contract's floor keeps flowbus's order (each event acknowledged by a fenced step "
            "before the next) and does nothing else (bench/floor_consumer.py)."
        )
    return "\n".join(lines)


def _runs(results: list[BaselineResult] | list[ThroughputResult]) -> str:
    return ", ".join(f"{run.events_per_second:,.0f}" for run in results)


def _flow_row(name: str, best: ThroughputResult, v: Verdict | None) -> str:
    share = f" = {v.measured:.1%} of baseline" if v else ""
    result = f"{best.events_per_second:,.0f} events/s{share}"
    return _row(name, result, v.target if v else "", _met(v, "throughput_ratio"))


def _row(name: str, result: str, target: str, verdict: str) -> str:
    return f"{name:<54} {result:<52} {target:<22} {verdict}".rstrip()


def _met(v: Verdict | None, name: str) -> str:
    if v is None:
        return ""
    if v.met:
        return "met"
    if name == "throughput_ratio":
        return f"MISSED ({TARGET_RATIO / max(v.measured, 1e-9):.1f}x short)"
    if name == "latency_p99_ms":
        return f"MISSED ({v.measured / TARGET_P99_MS:.1f}x over)"
    return "MISSED"
