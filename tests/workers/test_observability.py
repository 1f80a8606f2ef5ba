"""A worker's metrics and logs: Prometheus figures that match what it did, and the trace context
of every event bound in the log lines of its handling."""

from __future__ import annotations

import itertools
import json
import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from bus import Bus, Codec, Delivery, Service, Settings, Stats
from tests.conftest import make_settings
from tests.support import WorkerProcesses, raw, running, wait_for
from tests.workers.apps import Step, broken_key
from workers import metrics as metrics_module
from workers.bots import new_traceparent
from workers.metrics import REFRESH_SECONDS, Metrics
from workers.runtime import instrument
from workers.server import free_port

pytestmark = pytest.mark.anyio
APP = "tests.workers.apps:steps"


def scrape(port: int) -> dict[str, float]:
    """Every sample on the worker's /metrics page, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        text = page.read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([^#\s]\S*) (\S+)", line)
        if match:
            samples[match[1]] = float(match[2])
    return samples


async def test_a_worker_exports_what_it_handled_retried_dead_lettered_and_owns(
    bus: Bus, settings: Settings, workers: WorkerProcesses
) -> None:
    settings = make_settings(settings.url, prefix=settings.prefix, max_deliveries=2)
    port = free_port()
    env = {"FLOWBUS_METRICS_PORT": str(port), "FLOWBUS_LOG_LEVEL": "debug"}
    workers.start(APP, settings, env)
    await start_done(bus)
    await raw(bus).set(broken_key(settings.prefix, "steps"), 1)
    trace = new_traceparent()
    for n in (1, 2, 3):
        await bus.publish("call-1", Step(n=n, fail=n == 2), extra={"traceparent": trace})

    labels = 'service="steps"'
    dead = f"flowbus_dead_letters_total{{{labels}}}"
    handled = 'flowbus_events_handled_total{{outcome="{}",service="steps",type="step"}}'

    async def exported() -> bool:  # a refresh after step 3 (handled after the dead letter)
        samples = await anyio.to_thread.run_sync(scrape, port)
        return (
            samples.get(dead) == 1
            and samples.get(handled.format("ok")) == 2
            and samples.get(f"flowbus_owned_partitions{{{labels}}}") == 64
        )

    await wait_for(exported, what="the refreshed figures")
    samples = await anyio.to_thread.run_sync(scrape, port)
    assert samples[handled.format("ok")] == 2
    assert samples[handled.format("error")] == 2  # step 2, delivered twice
    assert samples[f"flowbus_retries_total{{{labels}}}"] == 1
    assert samples['flowbus_handler_seconds_count{service="steps",type="step"}'] == 4
    assert samples[f"flowbus_publish_to_handler_seconds_count{{{labels}}}"] == 3  # first tries
    assert samples[f"flowbus_lag_events{{{labels}}}"] == 0
    assert samples[f"flowbus_step_failures_total{{{labels}}}"] == 0

    log = workers.terminate(workers.procs[-1])
    lines = [json.loads(x) for x in log.splitlines() if x.startswith("{")]
    handlings = [x for x in lines if x["event"] == "event_handled"]
    assert [(x["seq"], x["outcome"]) for x in handlings] == [
        (1, "ok"),
        (2, "error"),
        (2, "error"),
        (3, "ok"),
    ]
    assert all(
        (x["session"], x["type"], x["group"], x["traceparent"])
        == ("call-1", "step", "steps", trace)
        for x in handlings
    )
    assert any(x["event"] == "metrics_served" and x["port"] == port for x in lines)


async def test_a_handling_cut_short_at_its_timeout_is_measured_as_an_error(
    settings: Settings,
) -> None:
    settings = make_settings(settings.url, handler_timeout_seconds=0.05, max_deliveries=1)
    done: list[int] = []

    async def handle(d: Delivery) -> None:
        assert isinstance(d.payload, Step)
        if d.payload.fail:
            await anyio.sleep_forever()  # until the consumer cancels it at its timeout
        done.append(d.seq)

    metrics = Metrics("svc")
    async with Bus.connect(settings) as bus:
        async with running(bus, instrument(Service("svc", handle, Codec([Step])), metrics)):
            await bus.publish("call-1", Step(n=1, fail=True))
            await bus.publish("call-1", Step(n=2))
            await wait_for(lambda: done == [2], what="the step after the one timed out")

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"service": "svc", **labels})

    assert sample("flowbus_events_handled_total", type="step", outcome="error") == 1
    assert sample("flowbus_events_handled_total", type="step", outcome="ok") == 1
    assert sample("flowbus_handler_seconds_count", type="step") == 2
    assert sample("flowbus_publish_to_handler_seconds_count") == 2


async def test_an_entry_resumed_after_its_pause_is_measured_from_its_publish_once(
    settings: Settings,
) -> None:
    """`Bus.resume` retries an entry with a fresh delivery count; it was measured at its first
    delivery, and is not again (it was, with the whole pause as its delay)."""
    settings = make_settings(settings.url, max_deliveries=1, dead_letter_policy="pause")
    seen: list[tuple[int, int, bool]] = []
    failing = [True]

    async def handle(d: Delivery) -> None:
        seen.append((d.seq, d.deliveries, d.resumed))
        if failing[0]:
            raise RuntimeError("down")

    metrics = Metrics("svc")
    async with Bus.connect(settings) as bus:
        paused = bus.keys.paused(bus.keys.partition("call-1"), "svc")
        async with running(bus, instrument(Service("svc", handle, Codec([Step])), metrics)):
            await bus.publish("call-1", Step(n=1))

            async def pausing() -> bool:
                return bool(await raw(bus).hexists(paused, "call-1"))

            await wait_for(pausing, what="the session to pause")
            failing[0] = False
            assert await bus.resume("call-1", "svc") is not None
            await bus.publish("call-1", Step(n=2))
            await wait_for(lambda: len(seen) == 3, what="the resumed entry and the next")

    assert seen == [(1, 1, False), (1, 1, True), (2, 1, False)]
    delays = metrics.registry.get_sample_value(
        "flowbus_publish_to_handler_seconds_count", {"service": "svc"}
    )
    assert delays == 2  # one per event


async def start_done(bus: Bus) -> None:
    async def owned() -> bool:
        return all([await raw(bus).get(bus.keys.lease(p, "steps")) for p in range(64)])

    await wait_for(owned, what="the worker to own every partition")


def fetch(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as page:
            return page.status, page.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_healthz_says_whether_the_loop_refreshes_and_the_leases_are_renewed() -> None:
    metrics = Metrics("svc")
    server = metrics.serve(0, "127.0.0.1")
    port = server.server_address[1]
    renewed_ago: list[float | None] = [None]
    try:
        status, body = fetch(port, "/healthz")
        assert status == 503 and json.loads(body)["healthy"] is False  # not started yet
        metrics.snapshot.lease_ttl = 1.5  # short: read live, not from the 2 s refresh
        metrics.snapshot.renewed_ago = lambda: renewed_ago[0]
        renewed_ago[0] = 0.5
        metrics.snapshot.update(Stats(), 3, 0)
        status, body = fetch(port, "/healthz")
        health = json.loads(body)
        assert status == 200 and health["healthy"] is True and health["partitions"] == 3
        assert health["seconds_since_lease_renewal"] == 0.5
        renewed_ago[0] = 1.6  # the server out of reach for longer than the TTL
        assert fetch(port, "/healthz")[0] == 503
        renewed_ago[0] = 0.0
        metrics.snapshot.updated = time.monotonic() - 3 * REFRESH_SECONDS  # the loop stuck
        assert fetch(port, "/healthz")[0] == 503
        assert fetch(port, "/")[0] == 404
        assert fetch(port, "/metrics")[0] == 200
        head = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", method="HEAD")
        with urllib.request.urlopen(head, timeout=5) as page:  # it was 501
            assert page.status == 200 and page.read() == b""
    finally:
        server.stop()


async def test_a_lag_that_cannot_be_read_is_said_once_and_the_gauge_keeps_its_value(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics, rounds = Metrics("svc"), []

    async def unreadable(*args: Any) -> int:
        rounds.append(1)
        if len(rounds) == 1:
            return 7
        raise RuntimeError("the server said no")

    monkeypatch.setattr(metrics_module, "lag_of", unreadable)
    monkeypatch.setattr(metrics_module, "REFRESH_SECONDS", 0.01)
    async with running(bus, Service("svc", _nothing, Codec([Step]))) as consumer:
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(metrics.follow, consumer, bus)
                await wait_for(lambda: len(rounds) > 5, what="several failed rounds")
                tg.cancel_scope.cancel()
    assert [e["event"] for e in logs if e["event"] == "lag_read_failed"] == ["lag_read_failed"]
    assert metrics.snapshot.lag == 7


async def _nothing(d: Delivery) -> None:
    pass


def test_the_metrics_server_closes_a_connection_that_sends_no_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection that never sends its request (a half-open one whose client went away, a
    port scan) would hold one of the server's threads for good."""
    monkeypatch.setattr(metrics_module, "REQUEST_TIMEOUT_SECONDS", 0.2)
    server = Metrics("svc").serve(0, "127.0.0.1")
    try:
        port = server.server_address[1]
        with socket.create_connection(("127.0.0.1", port), timeout=30) as idle:
            assert idle.recv(1) == b""  # closed by the server (a timeout here: still open)
        assert fetch(port, "/metrics")[0] == 200
    finally:
        server.stop()


def test_a_stopped_metrics_server_closes_its_port() -> None:
    """Not only its loop: a connection to the port is refused, not left in its backlog."""
    server = Metrics("svc").serve(0, "127.0.0.1")
    port = server.server_address[1]
    assert fetch(port, "/metrics")[0] == 200
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


async def test_a_request_its_client_cut_short_is_a_log_line_not_a_traceback(
    capfd: pytest.CaptureFixture[str],
) -> None:
    server = Metrics("svc").serve(0, "127.0.0.1")

    def accepted() -> bool:  # a thread of the server's reads the request
        return any("process_request_thread" in t.name for t in threading.enumerate())

    try:
        with capture_logs() as logs:
            with socket.create_connection(("127.0.0.1", server.server_address[1])) as client:
                client.sendall(b"GET /metrics HTTP/1.0\r\n")  # the headers never end
                await wait_for(accepted, what="the server to read the request")
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # closed with a reset: the server's read of the headers fails
            await wait_for(lambda: any(x["event"] == "metrics_request_failed" for x in logs))
    finally:
        server.stop()
    [line] = [x for x in logs if x["event"] == "metrics_request_failed"]
    assert line["error"].startswith("ConnectionResetError")
    assert "Traceback" not in capfd.readouterr().err  # socketserver's, amid the JSON lines


async def test_a_worker_on_metrics_port_0_says_which_port_it_took_and_is_healthy(
    bus: Bus, settings: Settings, workers: WorkerProcesses
) -> None:
    proc = workers.start(APP, settings, {"FLOWBUS_METRICS_PORT": "0"})
    await start_done(bus)
    port = 0

    def served() -> bool:
        nonlocal port
        for line in workers.log(proc).splitlines():
            if '"metrics_served"' in line:
                port = json.loads(line)["port"]
        return port != 0

    await wait_for(served, what="the metrics_served line")

    async def healthy() -> bool:
        status, body = await anyio.to_thread.run_sync(fetch, port, "/healthz")
        return status == 200 and json.loads(body)["partitions"] == 64

    await wait_for(healthy, what="a healthy worker owning every partition")
    # And it stays so, across refreshes of 2 s with a lease TTL of 1 s: healthy at every look
    # until two refreshes were seen (the time since the last one went down twice).
    looks: list[float] = []

    async def healthy_across_two_refreshes() -> bool:
        status, body = await anyio.to_thread.run_sync(fetch, port, "/healthz")
        health = json.loads(body)
        assert status == 200 and health["partitions"] == 64, health
        looks.append(health["seconds_since_refresh"])
        return sum(b < a for a, b in itertools.pairwise(looks)) >= 2

    await wait_for(healthy_across_two_refreshes, what="two refreshes, healthy throughout")
