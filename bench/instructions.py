"""Instructions per event in the consumers' processes, counted by valgrind's callgrind.

Seconds move with the machine's fast and slow spells (the same run has taken twice as long in
one as in another); the instructions a process executes hardly do (two counts of the same run
differ by a few per cent). ``python -m bench.instructions`` runs each consumer alone under
callgrind — the baseline's, the contract floor's, and ``flowbus worker bench.noop:service`` —
first on a backlog of SESSIONS x LOW events, then on one of SESSIONS x HIGH, and reports the
difference of the two counts per added event: what one more event of a session costs the
consumer's process, with its start, its stop and its per-session work left out. The server
runs outside valgrind. It needs ``valgrind`` on the PATH, and takes a few minutes.
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
    publish_all,
    session_ids,
    wait_until,
)

RESULTS = Path(__file__).resolve().parent / "instructions.json"
CONSUMERS = ("plain", "floor", "flowbus")
log = structlog.get_logger("flowbus.bench")


class Count(msgspec.Struct, frozen=True):
    """Instructions per added event of one consumer, and the two counts it comes from."""

    consumer: str
    sessions: int
    low: int
    high: int
    instructions_low: int
    instructions_high: int
    per_event: int


def collected(valgrind_log: str) -> int:
    """The instruction count in callgrind's log (``==PID== Collected : N``)."""
    found = re.search(r"Collected : ([\d,]+)", valgrind_log)
    if found is None:
        raise BenchError(f"callgrind counted nothing; its log ends: {valgrind_log[-500:]!r}")
    return int(found.group(1).replace(",", ""))


async def count(url: str, consumer: str, sessions: int, events: int) -> int:
    """The instructions `consumer`'s process executed, start to exit, under callgrind, while
    it consumed a backlog of `sessions` x `events` of its own."""
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
                with anyio.fail_after(900):
                    if consumer == "flowbus":

                        async def drained() -> bool:
                            if p.returncode is not None:
                                raise BenchError(f"the worker exited with {p.returncode}")
                            return await live_session_count(bus) == 0

                        await wait_until(drained, within=900, what="the worker", every=0.5)
                        p.send_signal(signal.SIGTERM)
                    else:
                        out = BufferedByteReceiveStream(p.stdout)
                        await out.receive_until(b"\n", 1 << 16)  # ready
                        await p.stdin.send(b"go\n")
                        await out.receive_until(b"\n", 1 << 16)  # {"events": n}
                        await p.stdin.send(b"\n")
                    await p.wait()
            return collected(valgrind_log.read_text())


async def measure(
    url: str, consumers: list[str], sessions: int, low: int, high: int
) -> list[Count]:
    counts = []
    for consumer in consumers:
        at: dict[int, int] = {}
        for events in (low, high):
            log.info("counting", consumer=consumer, sessions=sessions, events=events)
            at[events] = await count(url, consumer, sessions, events)
        per_event = (at[high] - at[low]) // (sessions * (high - low))
        counts.append(Count(consumer, sessions, low, high, at[low], at[high], per_event))
        log.info("counted", consumer=consumer, instructions_per_event=per_event)
    return counts


def render(counts: list[Count]) -> str:
    plain = next((c.per_event for c in counts if c.consumer == "plain"), None)
    lines = ["consumer   instructions per event   x baseline"]
    for c in counts:
        ratio = f"{c.per_event / plain:.2f}" if plain else "-"
        lines.append(f"{c.consumer:<10} {c.per_event:>22,}   {ratio:>10}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.instructions",
        description="Instructions per event of the baseline's, the floor's and flowbus's "
        "consumer processes, counted by valgrind's callgrind (steady whatever the machine's "
        "spell; a few minutes).",
    )
    p.add_argument("--only", choices=CONSUMERS, action="append", help="count only this one")
    p.add_argument("--sessions", type=int, default=1000, help="sessions (default 1000)")
    p.add_argument("--low", type=int, default=20, help="events per session of the first run")
    p.add_argument("--high", type=int, default=60, help="events per session of the second")
    p.add_argument("--output", type=Path, default=RESULTS, help=f"JSON (default {RESULTS})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not 1 <= args.low < args.high or args.sessions < 1:
        parser().error("need 1 <= --low < --high and --sessions >= 1")
    if shutil.which("valgrind") is None:
        print("bench.instructions: valgrind is not on the PATH", file=sys.stderr)
        return 1
    logs.configure("info", "auto")
    try:
        with LocalServer("redis") as server:
            counts = run(
                measure,
                server.url,
                args.only or list(CONSUMERS),
                args.sessions,
                args.low,
                args.high,
            )
    except BenchError as exc:
        print(f"bench.instructions: {exc}", file=sys.stderr)
        return 1
    print(render(counts))
    args.output.write_bytes(msgspec.json.format(msgspec.json.encode(counts)) + b"\n")
    print(f"\nresults written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
