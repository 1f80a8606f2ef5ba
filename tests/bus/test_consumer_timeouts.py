"""Handlers that overrun their time, and partitions that close while the wake-up connection
comes back: what the next handling and the worker see."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from bus import Bus, Codec, Consumer, Delivery, Service, ServiceInfo
from bus.steps import StepBatcher
from tests.apps.recorder import Tick
from tests.conftest import make_settings
from tests.support import raw, running, wait_for
from workers.server import LocalServer

pytestmark = pytest.mark.anyio


async def test_batch_mode_a_handler_that_finishes_past_its_timeout_does_not_fail_the_next(
    server: LocalServer,
) -> None:
    """ack_mode 'batch': seq 1's handler finishes shielded work past its timeout and returns
    normally. The timeout's cancellation of the run must not hit seq 2's handler, which did
    nothing wrong: with max_deliveries 1 it was dead-lettered as 'timed out' unhandled."""
    settings = make_settings(
        server.url, ack_mode="batch", handler_timeout_seconds=0.1, max_deliveries=1
    )
    seen: list[tuple[int, str]] = []

    async def handle(d: Delivery) -> None:
        if d.seq == 1:
            with anyio.CancelScope(shield=True):  # e.g. a write it must finish
                await anyio.sleep(0.5)
            seen.append((d.seq, "done"))
            return
        try:
            await anyio.lowlevel.checkpoint()
        except anyio.get_cancelled_exc_class():
            seen.append((d.seq, "cancelled"))
            raise
        seen.append((d.seq, "done"))

    async with Bus.connect(settings) as bus:
        await bus.register_service(ServiceInfo("svc"))
        for n in (1, 2):
            await bus.publish("call-1", Tick(n=n))  # one read takes both
        p = bus.keys.partition("call-1")
        async with running(bus, Service("svc", handle, Codec([Tick]))):

            async def settled() -> bool:
                [group] = await raw(bus).xinfo_groups(bus.keys.session("call-1"))
                return bool(group["pending"] == 0 and group["lag"] == 0)

            await wait_for(settled, limit=10, what="both entries settled")
        dead = await raw(bus).xrange(bus.keys.dead(p))
    assert seen == [(1, "done"), (2, "done")]
    assert dead == []


async def test_a_resubscription_while_a_fenced_partition_closes_does_not_end_the_worker(
    server: LocalServer,
) -> None:
    """A run is fenced (its lease taken by another: a server that lost its data, a stall);
    the partition closes, waiting for its other runs, before the next renewal marks it lost.
    A hint reconnect meanwhile (as after that same server trouble) confirms the partition's
    subscription, and its rescan was started in the partition's task group, already closed:
    RuntimeError, the whole worker ended."""
    from bus.ownership import Leases

    settings = make_settings(server.url, lease_ttl_seconds=30.0)  # renewals 6 s apart
    async with Bus.connect(settings) as bus:
        p = bus.keys.partition("call-1")
        other = next(f"call-{i}" for i in range(2, 10_000) if bus.keys.partition(f"call-{i}") == p)
        elsewhere = next(
            f"call-{i}" for i in range(2, 10_000) if bus.keys.partition(f"call-{i}") != p
        )
        holding, release = anyio.Event(), anyio.Event()
        seen: list[str] = []

        async def handle(d: Delivery) -> None:
            seen.append(d.session)
            if d.session == other:  # finishing a write it must not leave half done
                holding.set()
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await release.wait()
            elif d.session == "call-1":  # meanwhile another worker takes the partition
                await raw(bus).delete(bus.keys.lease(p, "svc"))
                thief = Leases(bus.redis, bus.keys, "svc", "thief", ttl_ms=60_000)
                assert await thief.acquire([p])

        consumer = Consumer(bus, Service("svc", handle, Codec([Tick])))
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                await tg.start(consumer.run)
                part = consumer._parts[p]
                await bus.publish(other, Tick(n=1))
                await holding.wait()
                await bus.publish("call-1", Tick(n=1))  # its ack is refused: FENCED
                await wait_for(lambda: part.runs._closing, what="the partition closing")
                assert not part.lost  # not yet known lost: no renewal since
                await raw(bus).execute_command("CLIENT", "KILL", "TYPE", "pubsub")
                await bus.publish(elsewhere, Tick(n=1))
                await wait_for(lambda: elsewhere in seen, what="the worker going on")
                release.set()
                await wait_for(lambda: part.done.is_set(), what="the partition closed")
                consumer.stop()
        assert consumer.stats.partitions_lost == 1


async def test_each_mode_events_read_along_a_handler_that_overran_count_one_delivery(
    server: LocalServer,
) -> None:
    """ack_mode 'each': seq 1 overruns its timeout and still returns (it finished shielded
    work). Seq 2 and 3, read along but never started, must come with `deliveries` 1: they were
    read again from the pending list (deliveries 2), a step closer to their dead letter."""
    settings = make_settings(server.url, handler_timeout_seconds=0.1)
    seen: list[tuple[int, int]] = []

    async def handle(d: Delivery) -> None:
        if d.seq == 1:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.5)
        seen.append((d.seq, d.deliveries))

    async with Bus.connect(settings) as bus:
        await bus.register_service(ServiceInfo("svc"))
        for n in (1, 2, 3):
            await bus.publish("call-1", Tick(n=n))  # one read takes all three
        async with running(bus, Service("svc", handle, Codec([Tick]))):
            await wait_for(lambda: len(seen) == 3, limit=10, what="three handlings")
    assert seen == [(1, 1), (2, 1), (3, 1)]


async def test_a_handler_that_swallows_its_timeout_counts_as_handled_and_the_next_runs(
    server: LocalServer,
) -> None:
    settings = make_settings(server.url, handler_timeout_seconds=0.1)
    seen: list[tuple[int, int]] = []

    async def handle(d: Delivery) -> None:
        if d.seq == 1:
            try:
                await anyio.sleep(5)
            except anyio.get_cancelled_exc_class():
                seen.append((d.seq, d.deliveries))
                return  # swallowed: it returns as if done
        await anyio.lowlevel.checkpoint()  # the next handling awaits as usual
        seen.append((d.seq, d.deliveries))

    async with Bus.connect(settings) as bus:
        await bus.register_service(ServiceInfo("svc"))
        for n in (1, 2, 3):
            await bus.publish("call-1", Tick(n=n))
        async with running(bus, Service("svc", handle, Codec([Tick]))) as consumer:
            await wait_for(lambda: len(seen) == 3, limit=10, what="three handlings")
    assert seen == [(1, 1), (2, 1), (3, 1)]
    assert consumer.stats.handled == 3 and consumer.stats.dead_lettered == 0


async def test_a_drain_cut_short_while_an_ack_is_retried_still_acknowledges_it(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server fails the ack step for a while: the step is retried with backoff. A drain
    that runs out of time then cuts the retry short, and the run's last step must still
    write the ack, or the next owner handles the event again."""
    settings = make_settings(server.url, drain_timeout_seconds=0.2)
    failing = True
    real_ack, real_submit = StepBatcher.ack, StepBatcher.submit

    def refused(future: Any) -> Any:
        future.set_exception(RedisConnectionError("the server went away"))
        return future

    def ack(self: StepBatcher, *args: Any) -> Any:
        if failing:
            return refused(asyncio.get_running_loop().create_future())
        return real_ack(self, *args)

    def submit(self: StepBatcher, step: Any) -> Any:
        if failing and step.acks:
            return refused(asyncio.get_running_loop().create_future())
        return real_submit(self, step)

    monkeypatch.setattr(StepBatcher, "ack", ack)
    monkeypatch.setattr(StepBatcher, "submit", submit)
    seen: list[int] = []

    async def handle(d: Delivery) -> None:
        seen.append(d.seq)

    async with Bus.connect(settings) as bus:
        await bus.register_service(ServiceInfo("svc"))
        for n in (1, 2):
            await bus.publish("call-1", Tick(n=n))
        with capture_logs() as logs:
            async with running(bus, Service("svc", handle, Codec([Tick]))) as consumer:

                def retrying(attempts: int) -> bool:
                    return any(e.get("attempt", 0) >= attempts for e in logs)

                await wait_for(lambda: retrying(6), limit=10, what="the ack's sixth retry")
                failing = False  # the server is back; the retry waits out its backoff
                consumer.stop()  # ...and the drain runs out of time first
        stream = bus.keys.session("call-1")
        second = (await raw(bus).xrange(stream))[1][0]
        pending = await raw(bus).xpending_range(stream, "svc", "-", "+", 10)
    assert seen == [1]
    # seq 1 acknowledged; seq 2, read along, given back unhandled (no delivery counted)
    assert [(p["message_id"], p["times_delivered"]) for p in pending] == [(second, 0)]
