"""Instructions per event in the consumers' processes and in the server, counted by callgrind.

Seconds move with the machine's fast and slow spells (the same run has taken twice as long in
one as in another); the instructions a process executes hardly do (two counts of the same run
differ by a few per cent). ``python -m bench.instructions`` runs each consumer alone under
valgrind's callgrind — the baseline's, the contract floor's, and ``flowbus worker
bench.noop:service`` — first on a backlog of SESSIONS x LOW events, then on one of SESSIONS x
HIGH, and reports the difference of the two counts per added event: what one more event of a
session costs, with start, stop and per-session work left out. The server runs under callgrind
too, counted only while a consumer runs (``callgrind_control``), so its share of each event
is counted the same way. It needs valgrind on the PATH, and takes several minutes.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import anyio
import msgspec
import structlog
from anyio.streams.buffered import BufferedByteReceiveStream

from bus import Bus, ServiceInfo
from workers import logs
from workers.observe import live_session_count
from workers.runtime import run
from workers.server import LocalServer

from . import baseline, noop
from .workload import (
    ROOT,
    BenchError,
    fill_plain,
    fresh_settings,
    output_for,
    publish_all,
    session_ids,
    wait_until,
)

RESULTS = Path(__file__).resolve().parent / "instructions.json"
CONSUMERS = ("plain", "floor", "flowbus")
log = structlog.get_logger("flowbus.bench")


class Count(msgspec.Struct, frozen=True):
    """Instructions per added event of one consumer and of the server meanwhile, and the two
    counts each comes from."""

    consumer: str
    sessions: int
    low: int
    high: int
    instructions_low: int
    instructions_high: int
    per_event: int
    server_low: int
    server_high: int
    server_per_event: int

    @property
    def total_per_event(self) -> int:
        return self.per_event + self.server_per_event


class ServerCounter:
    """Counts the instructions of a server running under callgrind with its instrumentation
    off, between `start()` and `stop()` (``callgrind_control``)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def _control(self, *options: str) -> str:
        command = ["callgrind_control", *options, str(self.pid)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(command)} failed: {done.stderr or done.stdout}")
        return done.stdout

    def start(self) -> None:
        self._control("--zero")
        self._control("--instr=on")

    def stop(self) -> int:
        """The instructions since `start()`; instrumentation off again."""
        counted = totals(self._control("-e"))
        self._control("--instr=off")
        return counted


def totals(status: str) -> int:
    """The instructions of every thread in ``callgrind_control -e``'s output."""
    rows = re.findall(r"^\s*Th\s+\d+\s+([\d,]+)\s*$", status, re.M)
    if not rows:
        raise BenchError(f"callgrind_control counted nothing: {status[-500:]!r}")
    return sum(int(row.replace(",", "")) for row in rows)


def collected(valgrind_log: str) -> int:
    """The instruction count in callgrind's log (``==PID== Collected : N``)."""
    found = re.search(r"Collected : ([\d,]+)", valgrind_log)
    if found is None:
        raise BenchError(f"callgrind counted nothing; its log ends: {valgrind_log[-500:]!r}")
    return int(found.group(1).replace(",", ""))


async def count(
    url: str, server: ServerCounter, consumer: str, sessions: int, events: int
) -> tuple[int, int]:
    """The instructions `consumer`'s process executed, start to exit, under callgrind, while
    it consumed a backlog of `sessions` x `events` of its own; and the server's meanwhile."""
    settings = fresh_settings(url, consumer, lease_ttl_seconds=60)
    names = session_ids(sessions)
    async with Bus.connect(settings) as bus:
        if consumer == "flowbus":
            await bus.register_service(ServiceInfo(noop.GROUP))
            await publish_all(bus, names, events, lambda: noop.Noop(sent_ns=1))
            argv = ["workers", "worker", "bench.noop:service", "--redis-url", url]
            argv += ["--prefix", settings.prefix, "--lease-ttl", "60"]
        else:
            module = baseline.CONSUMERS[consumer]
            await fill_plain(bus.redis, bus.keys, names, events, noop.Noop(sent_ns=1), module.GROUP)
            await module.prepare(bus.redis, bus.keys)
            argv = [module.__name__, url, settings.prefix, str(sessions), "0", "1"]
        with tempfile.TemporaryDirectory() as tmp:
            valgrind_log = Path(tmp) / "valgrind.log"
            command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
            command += [f"--log-file={valgrind_log}", sys.executable, "-m", *argv]
            async with await anyio.open_process(command, cwd=ROOT, stderr=subprocess.DEVNULL) as p:
                assert p.stdin is not None and p.stdout is not None
                with anyio.fail_after(1800):
                    if consumer == "flowbus":

                        async def drained() -> bool:
                            if p.returncode is not None:
                                raise BenchError(f"the worker exited with {p.returncode}")
                            return await live_session_count(bus) == 0

                        server.start()  # each poll (64 SCARDs) counts too: rarely, then
                        await wait_until(drained, within=1800, what="the worker", every=2)
                        p.send_signal(signal.SIGTERM)
                        await p.wait()
                    else:
                        out = BufferedByteReceiveStream(p.stdout)
                        await out.receive_until(b"\n", 1 << 16)  # ready
                        server.start()
                        await p.stdin.send(b"go\n")
                        await out.receive_until(b"\n", 1 << 16)  # {"events": n}
                        await p.stdin.send(b"\n")
                        await p.wait()
                    served = server.stop()
            return collected(valgrind_log.read_text()), served


async def measure(
    url: str, server: ServerCounter, consumers: list[str], sessions: int, low: int, high: int
) -> list[Count]:
    counts = []
    for consumer in consumers:
        at: dict[int, tuple[int, int]] = {}
        for events in (low, high):
            log.info("counting", consumer=consumer, sessions=sessions, events=events)
            at[events] = await count(url, server, consumer, sessions, events)
        added = sessions * (high - low)
        (own_low, server_low), (own_high, server_high) = at[low], at[high]
        counts.append(
            Count(
                consumer,
                sessions,
                low,
                high,
                own_low,
                own_high,
                (own_high - own_low) // added,
                server_low,
                server_high,
                (server_high - server_low) // added,
            )
        )
        log.info("counted", **msgspec.structs.asdict(counts[-1]))
    return counts


def render(counts: list[Count]) -> str:
    """The table: instructions per event of each consumer's process, of the server meanwhile,
    and of both, against the baseline's."""
    plain = next((c for c in counts if c.consumer == "plain"), None)
    lines = ["consumer     consumer     server      total   x baseline (consumer, total)"]
    for c in counts:
        ratios = "-"
        if plain:
            ratios = f"{c.per_event / plain.per_event:.2f}, "
            ratios += f"{c.total_per_event / plain.total_per_event:.2f}"
        row = f"{c.per_event:>8,} {c.server_per_event:>10,} {c.total_per_event:>10,}"
        lines.append(f"{c.consumer:<10} {row}   {ratios}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.instructions",
        description="Instructions per event of the baseline's, the floor's and flowbus's "
        "consumer processes and of the server meanwhile, counted by valgrind's callgrind "
        "(steady whatever the machine's spell; several minutes).",
    )
    p.add_argument("--only", choices=CONSUMERS, action="append", help="count only this one")
    p.add_argument("--sessions", type=int, default=1000, help="sessions (default 1000)")
    p.add_argument("--low", type=int, default=20, help="events per session of the first run")
    p.add_argument("--high", type=int, default=60, help="events per session of the second")
    p.add_argument(
        "--output",
        type=Path,
        help="JSON (default bench/instructions.json; with --only, "
        "bench/instructions-<consumers>.json, so that a partial run leaves the full one be)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not 1 <= args.low < args.high or args.sessions < 1:
        parser().error("need 1 <= --low < --high and --sessions >= 1")
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        print(f"bench.instructions: not on the PATH: {', '.join(missing)}", file=sys.stderr)
        return 1
    logs.configure("info", "auto")
    wrapper = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
    wrapper += ["--callgrind-out-file=/dev/null", "--log-file=/dev/null"]
    try:
        with LocalServer("redis", wrapper=wrapper) as server:
            assert server.process is not None
            counts = run(
                measure,
                server.url,
                ServerCounter(server.process.pid),
                args.only or list(CONSUMERS),
                args.sessions,
                args.low,
                args.high,
            )
    except BenchError as exc:
        print(f"bench.instructions: {exc}", file=sys.stderr)
        return 1
    print(render(counts))
    args.output = args.output or output_for(RESULTS, args.only)
    args.output.write_bytes(msgspec.json.format(msgspec.json.encode(counts)) + b"\n")
    print(f"\nresults written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
