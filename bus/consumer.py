"""The consumer runtime: one service (one consumer group) in one worker process.

The worker joins the group's membership, takes the leases of the partitions the balanced
assignment gives it, and handles the sessions of those partitions: every session one event at a
time, in stream order, many sessions at once. A session reads up to `read_batch` entries per
step and acknowledges each before its next one starts (with `ack_mode` 'batch': all of them
with the step after the last); every step (acknowledge, settle a failure, give back, read) is
fenced by the partition's lease and batched with the other sessions' steps (see `steps`).

A new owner's first steps in a session return the entries the previous owner left pending, so
inherited work is replayed in id order before anything new. A failing handler is retried with
backoff at the head of its session; after `max_deliveries` the entry is dead-lettered and the
session goes on (or pauses, by policy). Stopping drains: in-flight handlers finish, their acks
are written, leases are released so the next owner starts at once.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from contextvars import ContextVar
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from .client import Bus, ServiceInfo
from .connection import TRANSIENT, backoff
from .envelope import DecodeError, Delivery, Entry
from .errors import FencedError, LifespanError
from .hints import Hints
from .keys import Keys, check_worker_id
from .ownership import Leases, assign
from .runs import ACK, Overran, Partition, Run, Settle, original_fields
from .service import Service, Stats, vars_of
from .slots import Slots
from .steps import StepBatcher, reader

log = structlog.get_logger("flowbus.consumer")


#: Step batchers ("lanes") per worker, each with its own connection and a share of the
#: partitions: while one lane's batch is at the server, the sessions whose replies came on the
#: other run. One worker process alone did about a third more events per second with two than
#: with one (CHANGELOG).
STEP_LANES = 2


def _log_context(*names: str) -> tuple[ContextVar[Any], ...]:
    """The context variables structlog's `bind_contextvars` sets for `names`, for setting them
    once per event without its bookkeeping (a fifth of the cost)."""
    tokens = structlog.contextvars.bind_contextvars(**dict.fromkeys(names))
    structlog.contextvars.reset_contextvars(**tokens)
    return tuple(token.var for token in tokens.values())


_SESSION, _GROUP, _TYPE, _SEQ, _TRACE = _log_context(
    "session", "group", "type", "seq", "traceparent"
)


class Consumer:
    """Runs `service` in this process until `stop()`; see the module docstring."""

    def __init__(self, bus: Bus, service: Service, *, worker_id: str | None = None) -> None:
        self.bus, self.service, self.settings = bus, service, bus.settings
        self.keys: Keys = bus.keys
        self.worker_id = check_worker_id(
            f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
            if worker_id is None
            else worker_id
        )
        self.stats = Stats()
        ttl_ms = int(self.settings.lease_ttl_seconds * 1000)
        self._leases = Leases(bus.redis, self.keys, service.name, self.worker_id, ttl_ms)
        retention_ms = int(self.settings.retention_seconds * 1000)
        cluster = bus.redis if isinstance(bus.redis, RedisCluster) else None
        self._slots = Slots(self.settings.concurrency)
        self._running: dict[Run, float] = {}  # sessions in a handler -> its deadline
        self._parts: dict[int, Partition] = {}
        self._stop = anyio.Event()
        self._renewed_at = 0.0  # `time.monotonic()` of the last renewal (or of the start)
        #: How long a heartbeat, or a node's renewals, may take (a round stays well within a
        #: lease TTL even when a cluster node does not answer).
        self._within = self.settings.lease_ttl_seconds / 2
        self._acquiring = False  # an `_acquire` runs
        self._tg: TaskGroup | None = None
        self.log = log.bind(group=service.name, worker=self.worker_id)
        self._hints = Hints(
            self.settings,
            self.keys,
            wanted=self._hinted_partitions,
            on_hint=self._take_hint,
            on_subscribed=self._take_subscription,
            cluster=cluster,
            log=self.log,
        )
        self._lanes = [
            StepBatcher(
                self.settings,
                group=service.name,
                retention_ms=retention_ms,
                cluster=cluster,
                on_moved=self._hints.topology_changed,
            )
            for _ in range(STEP_LANES)
        ]
        subscribes = sorted(service.subscribes) if service.subscribes else None
        self._info = ServiceInfo(service.name, subscribes)

    @property
    def partitions(self) -> list[int]:
        """The partitions this worker holds right now."""
        return sorted(p for p, part in self._parts.items() if not part.lost)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def renewed_ago(self) -> float | None:
        """Seconds since this worker last renewed its leases, some of them at least (or,
        holding none, heartbeat; or started); None before `run()`. Past the lease TTL its
        partitions may be another's. (Safe to read from another thread: a metrics
        server's.)"""
        return None if self._tg is None else time.monotonic() - self._renewed_at

    def stop(self) -> None:
        """Begin a graceful stop: from now on no handling starts (each partition's drain
        begins at once, not when `run()` next looks); `run()` returns once drained."""
        self._stop.set()
        for part in self._parts.values():
            self._begin_drain(part)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Join the group and handle events until `stop()`; then drain and leave. All of it
        within the service's `lifespan`."""
        async with contextlib.AsyncExitStack() as stack:
            if self.service.lifespan is not None:
                try:
                    await stack.enter_async_context(self.service.lifespan())
                except Exception as exc:
                    raise LifespanError(self.service.name) from exc
            await self._run(task_status)

    async def _run(self, task_status: TaskStatus[None]) -> None:
        await self.bus.check_partitions(record=True)
        await self.bus.register_service(self._info)
        tick = self.settings.lease_ttl_seconds / 5
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for lane in self._lanes:
                tg.start_soon(lane.run)
            tg.start_soon(self._hints.run)
            tg.start_soon(self._watch_handlers)
            self._renewed_at = time.monotonic()
            wanting = await self._rebalance(wait=True)
            self.log.info(
                "worker_started", partitions=len(self._parts), ack_mode=self.settings.ack_mode
            )
            task_status.started()
            while not self._stop.is_set():
                with anyio.move_on_after(min(tick, 0.2) if wanting else tick):
                    await self._stop.wait()
                if not self._stop.is_set():
                    wanting = await self._rebalance()
            await self._drain_all()
            tg.cancel_scope.cancel()
        self.log.info("worker_stopped", **vars_of(self.stats))

    # -- ownership --------------------------------------------------------------------------
    async def _rebalance(self, *, wait: bool = False) -> bool:
        """Heartbeat and renew (`_renew`), hand back what is no longer ours, take what is
        (`_acquire`: in the background unless `wait`, so that a cluster node out of reach,
        whose partitions we should own, does not delay the next renewal). True while some
        partition we should own is not ours."""
        members = await self._renew()
        if members is None:
            return False
        desired = assign(members, self.settings.partitions).get(self.worker_id, set())
        for p, part in self._parts.items():
            if p not in desired and not part.draining:
                self.log.info("partition_handed_over", partition=p)
                self._begin_drain(part)
        missing = desired - self._parts.keys()
        if missing and not self._acquiring:
            self._acquiring = True
            if wait:
                await self._acquire(sorted(missing), len(members))
            else:
                assert self._tg is not None
                self._tg.start_soon(self._acquire, sorted(missing), len(members))
        return bool(desired - self._parts.keys())

    async def _acquire(self, partitions: list[int], members: int) -> None:
        """Take the leases of `partitions` that are free, and start handling those. A stop
        meanwhile waits for the reply (at most `_within`), and the leases are given back:
        cut short, the server would hold them for nobody until their TTL ran out."""
        try:
            asked = time.monotonic()
            with anyio.CancelScope(shield=True):
                tokens = await self._leases.acquire(partitions, within=self._within)
        except (*TRANSIENT, ResponseError, TimeoutError) as exc:
            self.log.warning("acquire_failed", error=str(exc) or type(exc).__name__)
            return
        finally:
            self._acquiring = False
        assert self._tg is not None
        if self._stop.is_set():  # taken as the drain began: the next owner may have them
            with anyio.move_on_after(2, shield=True):
                for p, token in tokens.items():
                    with contextlib.suppress(*TRANSIENT, ResponseError):
                        await self._leases.release(p, token)
            return
        group, count = self.service.name, self.settings.read_batch
        for p, token in tokens.items():
            lease, read = self.keys.lease(p, group), reader(self.keys, p, group, token, count)
            self._parts[p] = part = Partition(p, token, self._quietest_lane(), lease, read)
            part.vouched_until = asked + self.settings.lease_ttl_seconds
            self._tg.start_soon(self._run_partition, part)
        if tokens:
            self.log.info("partitions_acquired", partitions=sorted(tokens), members=members)

    async def _renew(self) -> list[str] | None:
        """Heartbeat (and register the service again if the server lost it) and renew the
        leases held, at once, each within half a lease TTL; the group's members, or None if
        the heartbeat failed. A lease whose renewal got no answer is let go once it was last
        renewed a TTL ago (others may own it by then): in a cluster, a node out of reach holds
        up only the partitions it serves."""
        held = {p: part.token for p, part in self._parts.items() if not part.lost}
        members: list[str] | None = None

        async def membership() -> None:
            nonlocal members
            try:
                with anyio.fail_after(self._within):
                    found = await self._leases.heartbeat()
                    if await self.bus.register_service(self._info, replace=False, retry=False):
                        self.log.warning("service_registered_again")  # the server lost its data
                        await self.bus.check_partitions(record=True)  # so is it recorded again
                members = found
            except (*TRANSIENT, ResponseError, TimeoutError) as exc:
                self.log.warning("heartbeat_failed", error=str(exc) or type(exc).__name__)

        asked = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(membership)
            renewal = await self._leases.renew(held, within=self._within)
        if renewal.unanswered:
            error = next(iter(renewal.unanswered.values()))
            self.log.warning(
                "renewal_failed",
                partitions=sorted(renewal.unanswered),
                error=str(error) or type(error).__name__,
            )
        # Alive for `renewed_ago` (the health check) while some lease was renewed: on a
        # cluster, a node out of reach holds up its own partitions, not the worker.
        if len(renewal.unanswered) < len(held) if held else members is not None:
            self._renewed_at = time.monotonic()
        for p, token in held.items():  # unless it was handed back meanwhile (its drain ended,
            mine = self._parts.get(p)  # its lease freed)
            if mine is None or mine.token != token:
                continue
            if p in renewal.lost:
                self._lose(mine, "lease_lost")
            elif p not in renewal.unanswered:
                mine.vouch(asked + self.settings.lease_ttl_seconds)
            elif time.monotonic() >= mine.vouched_until:
                self._lose(mine, "lease_expired")
        return members

    def _quietest_lane(self) -> StepBatcher:
        """The step lane with the fewest of our partitions, for one we just took."""
        parts = self._parts.values()
        return min(self._lanes, key=lambda lane: sum(part.steps is lane for part in parts))

    def _lose(self, part: Partition, reason: str) -> None:
        if not part.lost:
            part.lost = True
            self.stats.partitions_lost += 1
            self.log.warning("partition_lost", partition=part.number, reason=reason)
            part.scope.cancel()

    def _begin_drain(self, part: Partition) -> None:
        part.draining = True
        part.drain.set()
        part.subscribed.set()  # a draining partition waits for no subscription
        self._notify_hint_follower()

    async def _drain_all(self) -> None:
        """Drain every partition; its leases are renewed meanwhile, so that no other worker
        takes one while a handler in it still runs."""
        for part in list(self._parts.values()):
            self._begin_drain(part)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._renew_while_draining)
            for part in list(self._parts.values()):
                await part.done.wait()
            tg.cancel_scope.cancel()
        with anyio.move_on_after(2, shield=True):
            try:
                await self._leases.heartbeat(leave=True)
            except (*TRANSIENT, ResponseError) as exc:
                self.log.warning("leave_failed", error=str(exc))

    async def _settle_closed(self, runs: list[Run]) -> None:
        """After a drain ran out of time: acknowledge what the cut-short runs handled, and give
        back what they read but never started, so that the next owner neither repeats the one
        nor counts a second delivery of the other. The entry whose handler was cut short
        stays pending."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            for run in runs:
                first = run.done + 1 if run.started == run.done else run.done
                unstarted = [e[0] for e in run.entries[first:] if e[0] not in run.give]
                run.give += unstarted
                if run.acks or run.give:
                    try:
                        await run.call("")
                    except FencedError:
                        return  # the partition is another's now: its settling is theirs

    async def _renew_while_draining(self) -> None:
        while True:
            await anyio.sleep(self.settings.lease_ttl_seconds / 5)
            await self._renew()

    async def _run_partition(self, part: Partition) -> None:
        try:
            with part.scope:
                try:
                    async with anyio.create_task_group() as tg:
                        part.tg = tg
                        self._notify_hint_follower()
                        await part.subscribed.wait()  # hints from here on reach us; the scan
                        if not part.draining:  # covers what was published before
                            await self._rescan(part)
                        await part.drain.wait()
                        timeout = self.settings.drain_timeout_seconds
                        part.scope.deadline = anyio.current_time() + timeout
                        await part.runs.join()
                finally:
                    part.tg = None  # closed: no rescan or run starts in it any more
                    closed = await part.runs.close()
            if part.runs.error is not None:
                raise part.runs.error
            if part.scope.cancelled_caught and not part.lost:
                self.log.warning("drain_timed_out", partition=part.number, left=len(closed))
                await self._settle_closed(closed)
        except* FencedError:
            self._lose(part, "fenced")
        finally:
            del self._parts[part.number]
            self._notify_hint_follower()
            if not part.lost:
                with anyio.move_on_after(2, shield=True):
                    try:
                        await self._leases.release(part.number, part.token)
                    except (*TRANSIENT, ResponseError):
                        pass  # the lease lapses by itself after its TTL
            part.done.set()

    # -- finding work -----------------------------------------------------------------------
    async def _rescan(self, part: Partition) -> None:
        """Schedule every live session of the partition (on takeover, or after hints may have
        been missed)."""
        for attempt in range(1, 1_000_000):
            try:
                async for session in self.bus.redis.sscan_iter(
                    self.keys.live(part.number), count=1000
                ):
                    self._schedule(part, session.decode())
                return
            except (*TRANSIENT, ResponseError) as exc:  # a cluster's redirection among them
                self.log.warning("rescan_failed", partition=part.number, error=str(exc))
                if part.draining:  # a stop waits for no scan
                    return
                await anyio.sleep(backoff(attempt))

    def _notify_hint_follower(self) -> None:
        self._hints.changed()

    def _hinted_partitions(self) -> dict[int, Partition]:
        return {p: part for p, part in self._parts.items() if not part.draining and not part.lost}

    def _take_hint(self, part: Partition, session: str) -> None:
        if not (part.lost or part.draining):
            self._schedule(part, session)

    def _take_subscription(self, part: Partition, confirmed: bool) -> None:
        """The partition's hints reach us; after a reconnect (a confirmed subscription of a
        partition subscribed before, whose first scan may still run) hints may have been
        missed, so it is scanned again."""
        if part.lost or part.draining:
            return
        if confirmed and part.subscribed.is_set():
            self._spawn_rescan(part)
        part.subscribed.set()

    def _spawn_rescan(self, part: Partition) -> None:
        if part.tg is not None and not part.draining:
            part.tg.start_soon(self._rescan, part)

    def _schedule(self, part: Partition, session: str) -> None:
        if part.draining or part.tg is None:
            return
        if session in part.sessions:
            part.sessions[session] = True
            return
        part.sessions[session] = True
        run = Run(self, part, session)
        part.runs.spawn(run, self._run_session(run))

    # -- one session ------------------------------------------------------------------------
    async def _run_session(self, run: Run) -> None:
        """Handle the session until it has nothing new (see `_follow`); a handler out of time
        (see `_watch_handlers`) counts as failed, and the session goes on. A run that is
        closed (`Run.close`) ends."""
        _SESSION.set(run.session)  # in the logs, as bind_contextvars would
        _GROUP.set(self.service.name)
        try:
            while not run.closing:
                with contextlib.suppress(Overran), anyio.CancelScope() as run.scope:
                    if run.timed_out:  # the last handling ran out of time: settle it first
                        run.timed_out = False
                        raw_id, raw_fields = run.entries[run.done]
                        error = f"handler timed out after {self.settings.handler_timeout_seconds}s"
                        run.then(
                            await self._failed(raw_id.decode(), raw_fields, run.deliveries, error)
                        )
                    elif run.overran:  # the last handler returned late: handled all the same
                        run.overran = False
                        self.stats.handled += 1
                        self.log.warning("handler_overran", session=run.session)
                        run.acks.append(run.entries[run.done][0])
                        run.give += [e[0] for e in run.entries[run.done + 1 :]]
                    await self._follow(run)
                    break
                # Cut short: a timeout (or a handler that returned past it: `Overran`), or closed.
                run.read = "p"  # a step cut short may have read entries: the pending list has them
        finally:
            hinted = run.part.sessions.pop(run.session, False)
        if hinted and not run.closing:  # work came as it ended (a resume's hint, say)
            self._schedule(run.part, run.session)

    async def _follow(self, run: Run) -> None:
        """Read up to `read_batch` entries per step, handle them one by one, each acknowledged
        before the next one starts (with `ack_mode` 'batch': all of them by the step after the
        last), until a read finds nothing new (or a batch that was not full is done and no
        hint came since it was read). Anything irregular (a retry, a dead letter, a drain)
        gives the rest of the batch back and goes on from the pending list, which then holds
        the truth."""
        part, session = run.part, run.session
        ack_each = self.settings.ack_mode == "each"
        while True:
            if part.draining:  # settle what was handled, read nothing more
                await run.call("")
                return
            # After a read that was not full, what is published later comes with a hint (the
            # first entry after our last read finds the group idle): unless one came, the '>'
            # step (settle, retire if done) reads nothing, which would only find nothing.
            reads = run.read != ">" or part.sessions[session]
            if reads:
                part.sessions[session] = False
            reply = await run.call(run.read, reads=reads)
            if reply[0] != b"entries":
                if reply[0] in (b"idle", b"read") and not part.draining:  # nothing was read
                    # Read on if new work was hinted meanwhile; and after a read that could
                    # not retire the session ('p', '+') found nothing, once, for the step that
                    # retires a session that is done.
                    if part.sessions[session] or run.read != ">":
                        run.read = ">"
                        continue
                if run.give:  # read along, not to be handled now (the session is paused)
                    await run.call("")
                return
            run.entries, run.deliveries, run.done = reply[3:], int(reply[2]), 0
            run.resumed = reply[1] == 2
            run.started = -1
            full = len(run.entries) == self.settings.read_batch  # more are likely waiting
            run.read = "p" if reply[1] else "+" if full else ">"
            for raw_id, raw_fields in run.entries:
                if part.draining:
                    run.give += [e[0] for e in run.entries[run.done :]]
                    break
                entry_id = raw_id.decode()
                settle = await self._handle(run, entry_id, raw_fields, run.deliveries)
                if settle is not ACK:
                    run.then(settle)
                    break
                run.done, run.deliveries, run.resumed = run.done + 1, 1, False
                if run.done == len(run.entries) or not ack_each:  # acknowledged with the next
                    run.acks.append(raw_id)  # step: the last of a batch, or any by `ack_mode`
                    continue
                try:  # the next handling starts once this is acked, by the short step
                    await part.steps.ack(part.lease, part.token, run.stream, raw_id)
                except (ResponseError, *TRANSIENT):  # `call` retries it, or raises FencedError
                    run.acks.append(raw_id)
                    await run.call("")
                except anyio.get_cancelled_exc_class():  # cut short: the run's last step acks it
                    run.acks.append(raw_id)
                    raise

    async def _handle(
        self, run: Run, entry_id: str, raw_fields: list[bytes], deliveries: int
    ) -> Settle | None:
        """Run the handler for one entry; say how to settle it (None: retry it, after the
        backoff this waited)."""
        service = self.service
        try:
            entry = Entry.from_flat(entry_id, raw_fields, max_data=self.settings.max_payload_bytes)
            if service.subscribes is not None and entry.type not in service.subscribes:
                self.stats.skipped += 1
                return ACK
            payload = service.codec.decode(entry.type, entry.data)
        except DecodeError as exc:
            self.stats.dead_lettered += 1
            self.log.error("entry_rejected", session=run.session, entry=entry_id, reason=exc.reason)
            return Settle("skip", (deliveries, exc.reason, *original_fields(raw_fields)))
        delivery = Delivery(
            run.session,
            service.name,
            entry_id,
            entry.type,
            entry.seq,
            entry.ts,
            payload,
            deliveries,
            entry.extra,
            run.context,
            resumed=run.resumed,
        )
        _TYPE.set(entry.type)  # in the logs next to the session, with its trace if it has one
        _SEQ.set(entry.seq)
        trace = entry.extra.get("traceparent", ...)  # `...`: left out of the logs
        if trace is not run.trace:
            run.trace = trace
            _TRACE.set(trace)
        while True:
            if not self._slots.take():
                await self._slots.acquire()
            now = time.monotonic()
            if now < run.part.vouched_until:
                break
            # Past its lease's TTL since the last renewal (the process stalled, the server is
            # out of reach): the lease may be another's, so nothing starts until it is renewed.
            self._slots.release()
            await run.part.vouched()
        try:
            deadline = now + self.settings.handler_timeout_seconds
            self._running[run] = delivery.deadline = deadline
            run.started = run.done
            await service.routes.get(entry.type, service.handle)(delivery)
            error = ""
            if run.scope is not None and run.scope.cancel_called and not run.closing:
                # It returned past its time (a shielded write, a swallowed cancellation), its
                # work done; but the run's scope is cancelled, and would cut what comes next.
                run.overran = True
                raise Overran
        except anyio.get_cancelled_exc_class():
            run.timed_out = run.scope is not None and run.scope.cancel_called and not run.closing
            raise
        except (Overran, FencedError):  # a write of the handler's refused: the partition,
            raise  # and this event, are another worker's now; not a failure to retry
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            del self._running[run]
            self._slots.release()
        if error:
            return await self._failed(entry_id, raw_fields, deliveries, error)
        self.stats.handled += 1
        return ACK

    async def _failed(
        self, entry_id: str, raw_fields: list[bytes], deliveries: int, error: str
    ) -> Settle | None:
        """A handler failed: dead-letter the entry if it had its deliveries, else wait the
        backoff and say retry (None)."""
        settings = self.settings
        if deliveries >= settings.max_deliveries:
            self.stats.dead_lettered += 1
            policy = settings.dead_letter_policy
            self.log.error("event_dead_lettered", error=error, deliveries=deliveries, policy=policy)
            return Settle(policy, (deliveries, error, *original_fields(raw_fields)))
        self.stats.retries += 1
        delay = backoff(
            deliveries, settings.retry_backoff_seconds, settings.retry_backoff_max_seconds
        )
        self.log.warning(
            "handler_failed", error=error, deliveries=deliveries, retry_in=round(delay, 3)
        )
        await anyio.sleep(delay)
        return None  # the next step reads this entry again, as the pending head

    async def _watch_handlers(self) -> None:
        """Cancel handlers past `handler_timeout_seconds` (checked every tenth of it, within
        10 ms..1 s): cheaper than a timer per event, and as good for a timeout of seconds."""
        tick = min(1.0, max(0.01, self.settings.handler_timeout_seconds / 10))
        while True:
            await anyio.sleep(tick)
            now = time.monotonic()
            for run, deadline in list(self._running.items()):
                if deadline <= now and run.scope is not None:
                    run.scope.cancel()
