"""``python -m bench``: run the benchmarks on a private server, print a table, write JSON."""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import structlog
from redis.asyncio import Redis

from bus.settings import AckMode
from workers import logs
from workers.fleet import FleetError
from workers.runtime import first_error, run
from workers.server import LocalServer

from . import baseline, latency, soak, takeover, throughput
from .machine import cpu_probe_ms, describe
from .report import Results, judge, render
from .throughput import ThroughputResult
from .workload import BenchError, add_server_option, output_for

RESULTS = Path(__file__).resolve().parent / "results.json"
SECTIONS = ("baseline", "floor", "throughput", "batch", "latency", "takeover")
#: Seconds of the soak when it is asked for with ``--only soak`` alone.
SOAK_SECONDS = 300.0
log = structlog.get_logger("flowbus.bench")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="flowbus benchmarks: baseline, the contract's floor, throughput, throughput "
        "with batched acks, latency, takeover after kill -9; on request a soak (memory over a "
        "long run).",
    )
    add_server_option(p)
    p.add_argument(
        "--only",
        choices=[*SECTIONS, "soak"],
        action="append",
        help="run only this benchmark (repeatable); 'soak' is never run unless asked for",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=3,
        help="runs of the baseline, the floor and flowbus throughput with each ack mode (taken "
        "in turns) and of the takeover (default 3)",
    )
    p.add_argument(
        "--events",
        type=int,
        default=20,
        metavar="N",
        help="events per session of the baseline, the floor and both flowbus throughputs, over "
        "1,000 sessions (default 20; more share each session's start and end among more events)",
    )
    p.add_argument(
        "--latency-seconds",
        type=float,
        default=10.0,
        help="how long benchmark 3 publishes at 1,000 events/s (default 10)",
    )
    p.add_argument(
        "--sweep",
        type=float,
        nargs="*",
        default=[250.0, 500.0],
        metavar="RATE",
        help="also measure latency at these rates (events/s), for context: as long as "
        "benchmark 3, over as many sessions as events a second (each one event a second)",
    )
    p.add_argument(
        "--soak",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="also run the soak (memory over rolling calls at 1,000 events/s) this long "
        f"(with --only soak alone: {SOAK_SECONDS:g} s)",
    )
    p.add_argument(
        "--output",
        type=Path,
        help="where the JSON results go (default bench/results.json; with --only, "
        "bench/results-<benchmarks>.json, so that a partial run leaves the full one be)",
    )
    return p


async def run_all(url: str, args: argparse.Namespace, started: float) -> Results:
    only = set(args.only or SECTIONS)
    soak_seconds = args.soak or (SOAK_SECONDS if "soak" in only else 0.0)
    redis = Redis.from_url(url)
    try:
        machine = await describe(redis)
        results = Results(
            started=datetime.now(UTC).isoformat(timespec="seconds"),
            seconds=0.0,
            machine=machine,
            load_at_end=0.0,
        )
        if "baseline" in only:
            results.baseline = []
        if "floor" in only:
            results.floor = []
        if "throughput" in only:
            results.throughput = []
        if "batch" in only:
            results.throughput_batch = []
        for _ in range(args.runs):  # in turns, so that a slow spell of the machine hits all
            for name, consumer, runs in [
                ("baseline", "plain", results.baseline),
                ("floor", "floor", results.floor),
            ]:
                if runs is not None:
                    runs.append(await baseline.run(url, consumer=consumer, events=args.events))
                    log.info(f"{name}_measured", events_per_second=runs[-1].events_per_second)
                    await redis.flushall()
            modes: list[tuple[AckMode, list[ThroughputResult] | None]] = [
                ("each", results.throughput),
                ("batch", results.throughput_batch),
            ]
            for ack_mode, flows in modes:
                if flows is not None:
                    flows.append(await throughput.run(url, events=args.events, ack_mode=ack_mode))
                    log.info(
                        "throughput_measured",
                        ack_mode=ack_mode,
                        events_per_second=flows[-1].events_per_second,
                    )
                    await redis.flushall()
        if "latency" in only:
            results.latency = await latency.run(url, seconds=args.latency_seconds)
            log.info("latency_measured", p99_ms=results.latency.p99_ms)
            await redis.flushall()
            results.latency_sweep = []
            for rate in args.sweep:
                # The same shape as benchmark 3: each session one event a second, as many
                # rounds (with 1,000 sessions, 250/s for 5 s is one event per session, each
                # both its first and its final one: a session's start and retirement apiece).
                sweep = latency.run(
                    url, rate=rate, sessions=max(1, round(rate)), seconds=args.latency_seconds
                )
                results.latency_sweep.append(await sweep)
                log.info("latency_measured", rate=rate, p99_ms=results.latency_sweep[-1].p99_ms)
                await redis.flushall()
        if "takeover" in only:
            results.takeover = await takeover.run(url, repeats=args.runs)
            await redis.flushall()
        if soak_seconds > 0:
            results.soak = await soak.run(url, seconds=soak_seconds)
            await redis.flushall()
    finally:
        await redis.aclose()
    results.seconds = round(time.monotonic() - started, 1)
    results.load_at_end = round(os.getloadavg()[0], 2)
    results.probe_ms_at_end = cpu_probe_ms()
    judge(results)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.events < 1 or args.runs < 1:
        parser().error("--events and --runs must be at least 1")
    logs.configure("info", "auto")
    started = time.monotonic()
    try:
        with LocalServer(args.server) as server:
            log.info("server_started", binary=str(server.binary), url=server.url)
            results = run(run_all, server.url, args, started)
    except (BenchError, FleetError, BaseExceptionGroup) as exc:
        error = first_error(exc)
        if not isinstance(error, BenchError | FleetError):
            raise
        print(f"bench: {error}", file=sys.stderr)
        return 1
    print(render(results))
    args.output = args.output or output_for(RESULTS, args.only)
    args.output.write_bytes(msgspec.json.format(msgspec.json.encode(results)) + b"\n")
    print(f"\nresults written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
