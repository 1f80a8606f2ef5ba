"""Benchmark 1, the baseline: how fast plain redis-py consumes the same events; and beside it
the contract's floor, the least Python that keeps flowbus's ordering contract.

1,000 session streams (the bus's key names) of 20 events each are filled with plain XADDs and
given one consumer group; then 2 processes (as many as flowbus gets workers) each consume half
of the streams, and the time from "go" until both are done is measured. The baseline's consumer
(`bench.plain_consumer`) promises nothing about order or crashes: it is the ceiling. The
floor's (`bench.floor_consumer`) does what the contract makes every implementation do per
event and nothing else: what flowbus could reach at best.
"""

from __future__ import annotations

import sys
import time

import anyio
import msgspec
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from bus import Bus
from workers.observe import server_identity

from . import floor_consumer, plain_consumer
from .cpu import CpuMeter
from .noop import Noop
from .workload import (
    ROOT,
    BenchError,
    backlog,
    fill_plain,
    fresh_settings,
    server_us,
    session_ids,
)

#: The consumers `run` knows, by name: each module has a `GROUP`, a `NOTE` and a `prepare`.
CONSUMERS = {"plain": plain_consumer, "floor": floor_consumer}


class BaselineResult(msgspec.Struct, frozen=True):
    """Events per second of a consumer of `CONSUMERS`, and how it was measured."""

    processes: int
    sessions: int
    events: int
    seconds: float
    events_per_second: float
    #: CPU time per event (µs) of the server and of the consumer processes, while timed.
    server_cpu_us: float
    client_cpu_us: float
    #: CPU cores other processes of the machine kept busy meanwhile.
    other_cores_busy: float
    note: str = plain_consumer.NOTE


async def run(
    url: str, *, consumer: str = "plain", sessions: int = 1000, events: int = 20, processes: int = 2
) -> BaselineResult:
    """Fill, then time the processes of `consumer` (a name in `CONSUMERS`); raises
    `BenchError` if an event is left."""
    module = CONSUMERS[consumer]
    settings = fresh_settings(url, consumer)
    names = session_ids(sessions)
    async with Bus.connect(settings) as bus:
        server = await server_identity(bus.redis)
        await fill_plain(
            bus.redis, bus.keys, names, events, Noop(sent_ns=time.time_ns()), module.GROUP
        )
        await module.prepare(bus.redis, bus.keys)
        procs = [
            await anyio.open_process(
                [
                    sys.executable,
                    "-m",
                    module.__name__,
                    url,
                    settings.prefix,
                    str(sessions),
                    str(i),
                    str(processes),
                ],
                cwd=ROOT,
            )
            for i in range(processes)
        ]
        try:
            outputs = [BufferedByteReceiveStream(p.stdout) for p in procs if p.stdout]
            with anyio.fail_after(30):
                for out in outputs:
                    await _expect(out, b"ready")
            meter = CpuMeter(
                {"server": server.pid, **{f"c{i}": p.pid for i, p in enumerate(procs)}}
            )
            meter.start()
            # The server's clock, as benchmark 2's: from just before "go" to the last ack of
            # the consumer that finished last (each reads TIME right after it), not until
            # their reports came back through the pipes.
            started_us = await server_us(bus.redis)
            for p in procs:
                assert p.stdin is not None
                await p.stdin.send(b"go\n")
            with anyio.fail_after(120):
                results = [
                    msgspec.json.decode(await out.receive_until(b"\n", 1 << 16)) for out in outputs
                ]
            meter.stop()
            seconds = (max(r["done_us"] for r in results) - started_us) / 1e6
        except TimeoutError:
            raise BenchError(f"the {consumer} consumers did not finish in time") from None
        finally:
            await _close(procs)
        handled = sum(r["events"] for r in results)
        left = await backlog(bus.redis, [bus.keys.session(s) for s in names], module.GROUP)
        if handled != sessions * events or left.pending or left.lag:
            raise BenchError(f"{consumer} handled {handled} of {sessions * events} events ({left})")
    clients = [n for n in meter.used if n != "server"]
    return BaselineResult(
        processes,
        sessions,
        handled,
        round(seconds, 4),
        round(handled / seconds),
        meter.per_event_us(handled, ["server"]),
        meter.per_event_us(handled, clients),
        round(meter.other / seconds, 2),
        module.NOTE,
    )


async def _expect(out: BufferedByteReceiveStream, line: bytes) -> None:
    got = await out.receive_until(b"\n", 1 << 16)
    if got != line:
        raise BenchError(f"a consumer said {got!r}, not {line!r}")


async def _close(procs: list[Process]) -> None:
    for p in procs:
        if p.returncode is None:
            p.kill()
        with anyio.move_on_after(5, shield=True):
            await p.wait()
        await p.aclose()
