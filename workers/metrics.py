"""Prometheus metrics and health of one worker process (``flowbus worker --metrics-port N``:
``/metrics`` and ``/healthz`` on port N).

Per event (measured around the service's handler): ``flowbus_events_handled_total`` by
service, type and outcome (``ok`` or ``error``), ``flowbus_handler_seconds`` (a histogram by
service and type) and ``flowbus_publish_to_handler_seconds`` (from the entry's ``ts`` to the
start of its first delivery's handling: not of a retry, of a replayed dead letter, or of an
entry `Bus.resume` retried in place, which comes with a fresh delivery count but was measured
at its first delivery). From the consumer, refreshed every few seconds: ``flowbus_retries_total``,
``flowbus_dead_letters_total``, ``flowbus_events_skipped_total``,
``flowbus_partitions_lost_total``, ``flowbus_step_failures_total`` (acks and reads that
failed and were sent again: the server out of reach, or refusing them),
``flowbus_owned_partitions``, and ``flowbus_lag_events``
(events of the owned partitions' live sessions that this service has not acknowledged yet).

``/healthz`` answers 200 with a JSON body while the worker's event loop refreshes these figures
and its leases were renewed within the lease TTL, and 503 (with the same body) otherwise: a
worker whose loop is stuck or that cannot reach the server.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import msgspec
import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bus import Bus, Consumer, Delivery, Stats

from .inspection import counted_lag

log = structlog.get_logger("flowbus.metrics")

#: Handler durations: from a cache hit to a slow CRM call.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: What the HTTP server serves.
PATHS = ("/metrics", "/healthz")
#: How often the consumer's counters, partitions and lag are read.
REFRESH_SECONDS = 2.0
#: How long the HTTP server waits for a request on a connection: one that never sends it (a
#: client gone without closing, a port scan) would otherwise hold a thread for good.
REQUEST_TIMEOUT_SECONDS = 10.0


class Metrics:
    """The metrics of one service in one process, in a registry of their own."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        self.handled = Counter(
            "flowbus_events_handled",
            "Events handled, by service, event type and outcome (ok, error).",
            ["service", "type", "outcome"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "flowbus_handler_seconds",
            "Time spent in the service's handler per event.",
            ["service", "type"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.delay = Histogram(
            "flowbus_publish_to_handler_seconds",
            "From an event's publication (its ts) to the start of its handling.",
            ["service"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.snapshot = _Snapshot(service)
        self.registry.register(self.snapshot)

    def observe(self, delivery: Delivery, started: float, seconds: float, outcome: str) -> None:
        """Count one handling of `delivery` that started at `started` (epoch seconds)."""
        self.handled.labels(self.service, delivery.type, outcome).inc()
        self.seconds.labels(self.service, delivery.type).observe(seconds)
        # A replayed dead letter carries its original event's ts: no delay to measure. A
        # resumed entry's delay was measured at its first delivery, before its session paused.
        first = delivery.deliveries == 1 and not delivery.resumed
        if first and "replay_of" not in delivery.extra:
            self.delay.labels(self.service).observe(max(0.0, started - delivery.ts / 1000))

    def serve(self, port: int, host: str = "0.0.0.0") -> MetricsServer:
        """Serve ``/metrics`` and ``/healthz`` on `port` (0: any free one; the server's
        ``server_address`` says which) in a daemon thread; returns the HTTP server (call
        ``stop()`` to stop it). Raises `OSError` if the port cannot be bound."""
        metrics = self

        class Pages(BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT_SECONDS

            def do_GET(self) -> None:
                self._answer(body_too=True)

            def do_HEAD(self) -> None:  # a load balancer's health check, say
                self._answer(body_too=False)

            def _answer(self, *, body_too: bool) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    status, kind, body = 200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry)
                elif path == "/healthz":
                    health = metrics.snapshot.health()
                    status = 200 if health["healthy"] else 503
                    kind, body = "application/json", msgspec.json.encode(health) + b"\n"
                else:
                    status, kind, body = 404, "text/plain", b"not found: /metrics or /healthz\n"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if body_too:
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # no access log on stderr, where the worker's own log goes

        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][0]
        server_class = type("Server", (MetricsServer,), {"address_family": family})
        server: MetricsServer = server_class((host, port), Pages)
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        return server

    async def follow(self, consumer: Consumer, bus: Bus) -> None:
        """Refresh the consumer's figures every `REFRESH_SECONDS` until cancelled."""
        self.snapshot.lease_ttl = bus.settings.lease_ttl_seconds
        self.snapshot.renewed_ago = lambda: consumer.renewed_ago  # read live, not refreshed
        failing = False
        while True:
            partitions = consumer.partitions
            try:
                lag = await lag_of(bus, consumer.service.name, partitions)
                failing = False
            except Exception as exc:  # a metric is not worth a crash; the next round tries again
                if not failing:  # said once while it goes on failing: the gauge keeps its value
                    log.warning("lag_read_failed", error=f"{type(exc).__name__}: {exc}")
                failing, lag = True, self.snapshot.lag
            self.snapshot.update(consumer.stats, len(partitions), lag)
            await anyio.sleep(REFRESH_SECONDS)


class MetricsServer(ThreadingHTTPServer):
    """The HTTP server of a worker's metrics, serving in a thread of its own."""

    daemon_threads = True

    def stop(self) -> None:
        """Stop serving, and close the port (``shutdown()`` alone leaves it open)."""
        self.shutdown()
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A request that failed (most often its client went away): one log line, rather than
        # socketserver's traceback on stderr among the worker's JSON lines.
        exc = sys.exc_info()[1]
        error = f"{type(exc).__name__}: {exc}"
        log.warning("metrics_request_failed", client=str(client_address[0]), error=error)


async def lag_of(bus: Bus, group: str, partitions: list[int]) -> int:
    """Events of the live sessions of `partitions` that `group` has not acknowledged: those
    not yet read (lag) and those being handled or retried (pending)."""
    pipe = bus.redis.pipeline(transaction=False)
    for p in partitions:
        pipe.smembers(bus.keys.live(p))
    sessions = [s.decode() for members in await pipe.execute() for s in members]
    if not sessions:
        return 0
    pipe = bus.redis.pipeline(transaction=False)
    for session in sessions:
        pipe.xinfo_groups(bus.keys.session(session))
    total = 0
    replies: list[Any] = await pipe.execute(raise_on_error=False)
    streams = [bus.keys.session(session) for session in sessions]
    for groups in await counted_lag(bus, streams, replies):  # a lag the server cannot tell
        for g in groups:
            if g["name"].decode() == group:
                total += int(g["lag"]) + int(g["pending"])
    return total


class _Snapshot(Collector):
    """The consumer's figures as of the last refresh, read by the HTTP thread."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.stats = Stats()
        self.partitions = 0
        self.lag = 0
        self.lease_ttl = 0.0
        #: Seconds since the leases were last renewed (None: not yet), read when asked.
        self.renewed_ago: Callable[[], float | None] = lambda: None
        self.updated: float | None = None  # when the loop last refreshed these (monotonic)

    def update(self, stats: Stats, partitions: int, lag: int) -> None:
        # A copy, so the HTTP thread never reads a half-updated set of counters.
        self.stats = Stats(**{f: getattr(stats, f) for f in stats.__dataclass_fields__})
        self.partitions, self.lag, self.updated = partitions, lag, time.monotonic()

    def health(self) -> dict[str, Any]:
        """Whether the worker looks alive (see the module docstring), and why."""
        now = time.monotonic()
        refreshed = None if self.updated is None else round(now - self.updated, 3)
        renewed_ago = self.renewed_ago()
        renewed = None if renewed_ago is None else round(renewed_ago, 3)
        healthy = (
            refreshed is not None
            and refreshed < 3 * REFRESH_SECONDS
            and renewed is not None
            and renewed < self.lease_ttl
        )
        return {
            "healthy": healthy,
            "service": self.service,
            "partitions": self.partitions,
            "seconds_since_refresh": refreshed,
            "seconds_since_lease_renewal": renewed,
        }

    def collect(self) -> Iterator[Metric]:
        s, labels = self.stats, [self.service]
        for name, value, text in (
            ("flowbus_retries", s.retries, "Failed handlings retried."),
            ("flowbus_dead_letters", s.dead_lettered, "Events dead-lettered (or paused on)."),
            ("flowbus_events_skipped", s.skipped, "Events of types the service ignores."),
            ("flowbus_partitions_lost", s.partitions_lost, "Partitions lost to a lapsed lease."),
            ("flowbus_step_failures", s.step_failures, "Acks and reads that failed, sent again."),
        ):
            counter = CounterMetricFamily(name, text, labels=["service"])
            counter.add_metric(labels, value)
            yield counter
        for name, value, text in (
            ("flowbus_owned_partitions", self.partitions, "Partitions this process owns."),
            ("flowbus_lag_events", self.lag, "Unacknowledged events in owned live sessions."),
        ):
            gauge = GaugeMetricFamily(name, text, labels=["service"])
            gauge.add_metric(labels, value)
            yield gauge
