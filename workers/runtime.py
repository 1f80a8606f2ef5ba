"""Running one service in this process until a signal, then draining.

Around the service's handler the runtime adds what every deployment wants: replays of dead
letters (`workers.replay`), the event's W3C ``traceparent`` bound in the logs next to the
session, type and seq the consumer binds, and, with a metrics port, Prometheus metrics
(`workers.metrics`). A worker process also sets its garbage collector for the job (`tune_gc`)
and runs on uvloop when it is installed (`run`).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, TypeVarTuple, Unpack

import anyio
import structlog

from bus import Bus, ConfigError, Consumer, Delivery, Handler, Service, Settings

from .metrics import PATHS, Metrics
from .replay import accept_replays

log = structlog.get_logger("flowbus.worker")
T = TypeVar("T")
Args = TypeVarTuple("Args")

#: The event loops `run` knows (``FLOWBUS_EVENT_LOOP``).
EVENT_LOOPS = ("uvloop", "asyncio")

#: A worker process collects young garbage every this many allocations (Python's default is
#: 700). Handling allocates a few objects per event, nearly all short-lived; collecting them
#: every 700 allocations, and promoting the survivors, cost about a fifth of a worker's CPU
#: per event in benchmark 2.
GC_THRESHOLD = 50_000


def event_loop() -> str:
    """The event loop `run` uses: ``FLOWBUS_EVENT_LOOP`` if set, else uvloop when installed
    (a dependency on Linux and macOS), else asyncio's own."""
    chosen = os.environ.get("FLOWBUS_EVENT_LOOP", "")
    if chosen and chosen not in EVENT_LOOPS:
        raise ConfigError(f"FLOWBUS_EVENT_LOOP must be one of {', '.join(EVENT_LOOPS)}")
    if not chosen:
        chosen = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return chosen


def run(func: Callable[[Unpack[Args]], Awaitable[T]], *args: *Args) -> T:
    """`anyio.run` on the `event_loop()`. uvloop's loop costs a worker about a tenth less CPU
    per event than asyncio's (benchmark 2, README)."""
    return anyio.run(func, *args, backend_options={"use_uvloop": event_loop() == "uvloop"})


def tune_gc() -> None:
    """Make this process's garbage collection fit a worker: the start-up heap (modules, the
    app) is frozen, so no collection scans it again, and young garbage is collected every
    `GC_THRESHOLD` allocations. Call once, after loading the app."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


def instrument(service: Service, metrics: Metrics | None = None) -> Service:
    """`service` with its handling logged (``event_handled`` at debug level) and measured into
    `metrics`; `service` itself when neither is wanted (timing nobody reads is not taken). A
    handling cut short at ``handler_timeout_seconds`` counts as an error. The log context of a
    handling (session, group, type, seq, traceparent) is the consumer's."""
    if metrics is None and not log.is_enabled_for(logging.DEBUG):
        return service

    def measured(handle: Handler) -> Handler:
        async def handle_measured(delivery: Delivery) -> None:
            started, clock = time.time(), time.perf_counter()
            try:
                await handle(delivery)
            except Exception:
                _handled(delivery, metrics, started, time.perf_counter() - clock, "error")
                raise
            except anyio.get_cancelled_exc_class():
                # Cut short at its timeout, which the consumer counts as a failure (not a
                # drain or a lost partition, which leave the entry for the next owner).
                if time.monotonic() >= delivery.deadline:
                    _handled(delivery, metrics, started, time.perf_counter() - clock, "error")
                raise
            _handled(delivery, metrics, started, time.perf_counter() - clock, "ok")

        return handle_measured

    routes = {name: measured(handle) for name, handle in service.routes.items()}
    return dataclasses.replace(service, handle=measured(service.handle), routes=routes)


def _handled(
    delivery: Delivery, metrics: Metrics | None, started: float, seconds: float, outcome: str
) -> None:
    if metrics is not None:
        metrics.observe(delivery, started, seconds, outcome)
    log.debug("event_handled", outcome=outcome, seconds=round(seconds, 6))


async def serve(
    settings: Settings,
    service: Service,
    *,
    worker_id: str | None = None,
    connect_attempts: int = 8,
    metrics_port: int | None = None,
    metrics_host: str = "0.0.0.0",
) -> int:
    """Connect (retrying with backoff), run `service` until SIGTERM or SIGINT, then drain;
    the exit status: 0 once drained.

    A second signal stops at once (status 128 + its number, as a shell reports a process it
    killed); entries in flight stay pending for the next owner. With `metrics_port`, metrics
    are served on it from the start. Raises `ConnectionFailedError` when the server cannot be
    reached, `OSError` when the metrics port cannot be bound.
    """
    hard_stop: list[int] = []
    metrics = Metrics(service.name) if metrics_port is not None else None
    http = (
        metrics.serve(metrics_port, metrics_host) if metrics and metrics_port is not None else None
    )
    running: list[Consumer] = []  # the consumer, once connected
    try:
        async with anyio.create_task_group() as tg:
            # From the start: a signal while connecting stops at once (as PID 1 in a
            # container, a process without a handler would not even hear SIGTERM).
            tg.start_soon(_on_signals, running, tg.cancel_scope, hard_stop)
            async with Bus.connect(settings, attempts=connect_attempts) as bus:
                consumer = Consumer(
                    bus, accept_replays(instrument(service, metrics)), worker_id=worker_id
                )
                running.append(consumer)
                if metrics is not None:
                    tg.start_soon(metrics.follow, consumer, bus)
                    assert http is not None
                    port = http.server_address[1]
                    log.info("metrics_served", port=port, host=metrics_host, paths=PATHS)
                await consumer.run()
            tg.cancel_scope.cancel()
    finally:
        if http is not None:
            http.stop()
    return 128 + hard_stop[0] if hard_stop else 0


#: How long a worker stopped hard (a second signal), or past its drain timeout, waits for its
#: cancelled handlers before it exits without them.
HARD_STOP_SECONDS = 3.0


async def _on_signals(
    running: list[Consumer], scope: anyio.CancelScope, hard_stop: list[int]
) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if not running:  # still connecting: nothing to drain
                log.info("worker_stopped_connecting", signal=signal.Signals(signum).name)
                hard_stop.append(signum)
                scope.cancel()
                return
            consumer = running[0]
            if consumer.stopping:
                log.warning("worker_stopped_hard", signal=signal.Signals(signum).name)
                hard_stop.append(signum)
                scope.cancel()
                _exit_later(HARD_STOP_SECONDS, 128 + signum)
                return
            log.info("worker_draining", signal=signal.Signals(signum).name)
            consumer.stop()
            # The drain cancels what still runs after its timeout, but a handler stuck in a
            # thread cannot be cancelled: then the process exits without it.
            _exit_later(consumer.settings.drain_timeout_seconds + HARD_STOP_SECONDS, 128 + signum)


def _exit_later(seconds: float, status: int) -> None:
    """Exit with `status` after `seconds` unless the process has ended by then (for handlers
    stuck in threads, which no cancellation stops); what it held lapses with its TTL."""

    def exit_now() -> None:
        log.warning("worker_exited_without_its_handlers", status=status)
        os._exit(status)

    timer = threading.Timer(seconds, exit_now)
    timer.daemon = True
    timer.start()


def first_error(exc: BaseException) -> BaseException:
    """The first error inside task groups' exception groups (`exc` itself if it is none), for
    a command to report what went wrong rather than the groups around it."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
