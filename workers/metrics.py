"""Prometheus metrics of one worker process (``flowbus worker --metrics-port N``).

Per event (measured around the service's handler): ``flowbus_events_handled_total`` by
service, type and outcome (``ok`` or ``error``), ``flowbus_handler_seconds`` (a histogram by
service and type) and ``flowbus_publish_to_handler_seconds`` (from the entry's ``ts`` to the
handler's start). From the consumer, refreshed every few seconds: ``flowbus_retries_total``,
``flowbus_dead_letters_total``, ``flowbus_events_skipped_total``,
``flowbus_partitions_lost_total``, ``flowbus_owned_partitions``, and ``flowbus_lag_events``
(events of the owned partitions' live sessions that this service has not acknowledged yet).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anyio
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bus import Bus, Consumer, Delivery, Stats

#: Handler durations: from a cache hit to a slow CRM call.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: How often the consumer's counters, partitions and lag are read.
REFRESH_SECONDS = 2.0


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
        # A replayed dead letter carries its original event's ts: no delay to measure.
        if delivery.deliveries == 1 and "replay_of" not in delivery.extra:
            self.delay.labels(self.service).observe(max(0.0, started - delivery.ts / 1000))

    def serve(self, port: int, host: str = "0.0.0.0") -> Any:
        """Serve ``/metrics`` on `port` in a daemon thread; returns the HTTP server (call
        ``shutdown()`` to stop it). Raises `OSError` if the port cannot be bound."""
        server, _thread = start_http_server(port, host, registry=self.registry)
        return server

    async def follow(self, consumer: Consumer, bus: Bus) -> None:
        """Refresh the consumer's figures every `REFRESH_SECONDS` until cancelled."""
        while True:
            partitions = consumer.partitions
            try:
                lag = await lag_of(bus, consumer.service.name, partitions)
            except Exception:  # a metric is not worth a crash; the next round tries again
                lag = self.snapshot.lag
            self.snapshot.update(consumer.stats, len(partitions), lag)
            await anyio.sleep(REFRESH_SECONDS)


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
    for groups in replies:
        for g in groups if isinstance(groups, list) else ():
            if g["name"].decode() == group:
                total += int(g.get("lag") or 0) + int(g["pending"])
    return total


class _Snapshot(Collector):
    """The consumer's figures as of the last refresh, read by the HTTP thread."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.stats = Stats()
        self.partitions = 0
        self.lag = 0
        self.updated = time.time()

    def update(self, stats: Stats, partitions: int, lag: int) -> None:
        # A copy, so the HTTP thread never reads a half-updated set of counters.
        self.stats = Stats(**{f: getattr(stats, f) for f in stats.__dataclass_fields__})
        self.partitions, self.lag, self.updated = partitions, lag, time.time()

    def collect(self) -> Iterator[Metric]:
        s, labels = self.stats, [self.service]
        for name, value, text in (
            ("flowbus_retries", s.retries, "Failed handlings retried."),
            ("flowbus_dead_letters", s.dead_lettered, "Events dead-lettered (or paused on)."),
            ("flowbus_events_skipped", s.skipped, "Events of types the service ignores."),
            ("flowbus_partitions_lost", s.partitions_lost, "Partitions lost to a lapsed lease."),
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
