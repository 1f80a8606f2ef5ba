"""Helpers shared by the tests: worker processes, waiting for conditions, order checks, steps."""

from __future__ import annotations

import gc
import inspect
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from bus import Bus, Consumer, Service, Settings
from bus.scripts import Arg
from bus.steps import Step, StepBatcher, reader
from workers.fleet import settings_env as settings_env  # the workers' own, for the tests
from workers.observe import lease_owners as lease_owners  # re-exported for the tests

ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def running(bus: Bus, service: Service) -> AsyncIterator[Consumer]:
    """A consumer of `service` running in this process until the block ends (then stopped)."""
    consumer = Consumer(bus, service)
    async with anyio.create_task_group() as tg:
        await tg.start(consumer.run)
        yield consumer
        consumer.stop()


@contextmanager
def left_for_the_collector() -> Iterator[list[str]]:
    """What the block left open for the garbage collector to close (its `ResourceWarning`s:
    "unclosed Connection", "unclosed file", a cluster client's "Unclosed ClusterNode object"),
    filled in once the block ends."""
    gc.collect()  # (the garbage of what ran before)
    left: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield left
        gc.collect()
    left += [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def raw(bus: Bus) -> Any:
    """The bus's Redis client, for reading replies in tests (redis-py types each reply as a
    union of every shape it could take)."""
    return bus.redis


LOG_TAIL_LINES = 40


class WorkerProcesses:
    """Worker processes of the tests; whatever is still running at the end is killed.

    Each process logs to a file of its own: a pipe nobody reads would fill up and block the
    worker's event loop on its next log line."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self._dir = tempfile.TemporaryDirectory(prefix="flowbus-workers-")
        self._logs: dict[int, Path] = {}

    def start(
        self,
        target: str,
        settings: Settings,
        env: Mapping[str, str] | None = None,
        *,
        cwd: Path = ROOT,
    ) -> subprocess.Popen[bytes]:
        """Start a worker of `target` in `cwd`, the first place its modules are looked for."""
        full_env = {**os.environ, **settings_env(settings), **(env or {})}
        log = Path(self._dir.name) / f"worker-{len(self.procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "workers", "worker", target, "--log-format", "json"],
                cwd=cwd,
                env=full_env,
                stdout=subprocess.DEVNULL,
                stderr=out,
            )
        self.procs.append(proc)
        self._logs[proc.pid] = log
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return self._logs[proc.pid].read_text()

    def terminate(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> str:
        """SIGTERM (graceful drain); return the process's log."""
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)
        return self.log(proc)

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        proc.kill()
        proc.wait()

    def stop_all(self) -> None:
        """Kill what still runs; print each log's tail (pytest shows it if the test failed)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.pid in self._logs:
                tail = self.log(proc).splitlines()[-LOG_TAIL_LINES:]
                print(f"--- worker {proc.pid} (exit {proc.returncode}), last lines of its log:")
                print("\n".join(tail))
        self._dir.cleanup()


async def wait_for(
    condition: Callable[[], Awaitable[bool] | bool], limit: float = 30, what: str = "condition"
) -> None:
    """Check `condition` (sync or async) until it holds; fail the test after `limit` seconds."""
    deadline = time.monotonic() + limit
    while True:
        result = condition()
        if await result if inspect.isawaitable(result) else result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit}s waiting for {what}")
        await anyio.sleep(0.02)


@dataclass(frozen=True)
class Handled:
    session: str
    seq: int
    pid: int
    deliveries: int


async def handled(bus: Bus, group: str) -> list[Handled]:
    """The recorder's handlings in the order they were recorded, each once (see its token)."""
    out = []
    items = await raw(bus).lrange(f"{bus.settings.prefix}:test:handled:{group}", 0, -1)
    for item in dict.fromkeys(items):
        session, seq, pid, deliveries, _token = item.decode().split("|")
        out.append(Handled(session, int(seq), int(pid), int(deliveries)))
    return out


def by_session(records: list[Handled]) -> dict[str, list[Handled]]:
    result: dict[str, list[Handled]] = {}
    for r in records:
        result.setdefault(r.session, []).append(r)
    return result


def assert_in_order(records: list[Handled], expected: Mapping[str, int]) -> dict[str, int]:
    """Every session handled seq 1..N in order; a seq repeats only right after itself (a
    redelivery). Returns session -> number of duplicate handlings."""
    sessions = by_session(records)
    assert sessions.keys() == expected.keys(), "sessions handled differ from sessions published"
    duplicates = {}
    for session, recs in sessions.items():
        seqs = [r.seq for r in recs]
        assert all(a <= b for a, b in itertools.pairwise(seqs)), (session, seqs)
        assert sorted(set(seqs)) == list(range(1, expected[session] + 1)), (session, seqs)
        duplicates[session] = len(seqs) - len(set(seqs))
    return duplicates


def assert_replayed_in_order(
    records: list[Handled], expected: Mapping[str, int], window: int
) -> dict[str, int]:
    """As `assert_in_order`, but where a session moved to another worker the new owner may go
    back up to `window` events, replaying what the previous one handled and had not yet
    acknowledged (``ack_mode`` 'batch'). Returns session -> number of duplicate handlings."""
    sessions = by_session(records)
    assert sessions.keys() == expected.keys(), "sessions handled differ from sessions published"
    duplicates = {}
    for session, recs in sessions.items():
        seqs = [r.seq for r in recs]
        assert sorted(set(seqs)) == list(range(1, expected[session] + 1)), (session, seqs)
        for a, b in itertools.pairwise(recs):
            if b.seq != a.seq + 1:
                assert a.pid != b.pid and a.seq - window < b.seq <= a.seq, (session, seqs)
                assert b.deliveries >= 2, (session, seqs)
        duplicates[session] = len(seqs) - len(set(seqs))
    return duplicates


class Stepper:
    """Steps of group ``g`` sent the way a consumer sends them: through a `StepBatcher`, with
    the session's read (`Step.reader`). Use ``async with Stepper.open(bus, settings) as s``."""

    def __init__(self, bus: Bus, batcher: StepBatcher) -> None:
        self.bus, self.batcher = bus, batcher

    @classmethod
    @asynccontextmanager
    async def open(cls, bus: Bus, settings: Settings) -> AsyncIterator[Stepper]:
        retention_ms = int(settings.retention_seconds * 1000)  # (not 1 s: a TTL read may be late)
        batcher = StepBatcher(settings, group="g", retention_ms=retention_ms)
        async with anyio.create_task_group() as tg:
            tg.start_soon(batcher.run)
            yield cls(bus, batcher)
            tg.cancel_scope.cancel()

    def make(
        self,
        session: str,
        token: str,
        read: str,
        acks: Sequence[bytes] = (),
        give: Sequence[bytes] = (),
        verdict: Sequence[Arg] = (),
    ) -> Step:
        keys = self.bus.keys
        p = keys.partition(session)
        stream, lease = keys.session(session), keys.lease(p, "g")
        fenced_read = reader(keys, p, "g", token, 32)(stream)
        return Step(stream, lease, token, acks, read, give, verdict, fenced_read)

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """One step (the arguments of `make`); its reply."""
        return await self.batcher.submit(self.make(*args, **kwargs))


class Proxy:
    """A TCP proxy to a server, whose links can be made to go silent: their bytes are dropped
    both ways while the connections stay open, as on a link a NAT forgot (links made later
    work). `start()` gives the server's URL through it; run `serve()` in a task."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._said: list[bytearray] = []  # per link, what its client sent first
        self._silent: set[int] = set()  # ids of the silenced links' records
        self._listener: Any = None

    async def start(self) -> str:
        self._listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        return f"redis://127.0.0.1:{self._listener.extra(anyio.abc.SocketAttribute.local_port)}/0"

    async def serve(self) -> None:
        async with self._listener:  # (closed once cancelled)
            await self._listener.serve(self._link)

    def silence(self, command: bytes) -> None:
        """Drop all that goes through the links on which `command` was sent so far."""
        self._silent |= {id(said) for said in self._said if command in said}

    async def _link(self, client: Any) -> None:
        said = bytearray()
        self._said.append(said)
        async with client, await anyio.connect_tcp("127.0.0.1", self.port) as server:

            async def pump(source: Any, sink: Any, record: bool) -> None:
                async for data in source:
                    if record and len(said) < 4096:
                        said.extend(data)
                    if id(said) not in self._silent:
                        await sink.send(data)

            async with anyio.create_task_group() as tg:
                tg.start_soon(pump, client, server, True)
                await pump(server, client, False)
                tg.cancel_scope.cancel()
