"""Publishes that race each other and the registry, and sessions that retire before a service
came to them."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest
from anyio import wait_all_tasks_blocked
from redis.exceptions import ConnectionError as RedisConnectionError

from bus import Bus, ServiceInfo, Settings, scripts
from bus.ownership import Leases
from tests.apps.recorder import Tick
from tests.support import Stepper, raw

pytestmark = pytest.mark.anyio


async def test_a_third_publish_waits_for_the_second_after_the_first_handed_it_the_lock(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """p1 hands the session's lock to p2, then drops it from `_publishing` (p2 no longer counts
    as waiting): p3 makes a new lock and runs beside p2. p2's reply is lost; p3 appends; p2's
    retry is no longer the session's last publish, so it appends a second time."""
    plain = Bus(bus.redis, bus.settings)  # script calls through scripts.PUBLISH, patched here
    real = scripts.PUBLISH
    release1, retrying2, go2, go3, entered3, done3 = (anyio.Event() for _ in range(6))
    tries2: list[Any] = []

    async def publish(redis: Any, keys: Any, args: Any) -> Any:
        n = msgspec.json.decode(args[3])["n"]
        if n == 1:
            await release1.wait()
        if n == 2:
            if not tries2:  # it ran, its reply was lost
                tries2.append(await real(redis, keys, args))
                raise RedisConnectionError("Connection reset by peer")
            retrying2.set()
            await go2.wait()
        if n == 3:
            entered3.set()
            await go3.wait()
        return await real(redis, keys, args)

    await plain.publish("call-1", Tick(n=0))
    monkeypatch.setattr(scripts, "PUBLISH", publish)

    async def third() -> None:
        await plain.publish("call-1", Tick(n=3))
        done3.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(plain.publish, "call-1", Tick(n=1))
        await wait_all_tasks_blocked()
        tg.start_soon(plain.publish, "call-1", Tick(n=2))  # waits for p1
        await wait_all_tasks_blocked()
        release1.set()
        await retrying2.wait()  # p2 holds the session: its first try ran, its retry is next
        tg.start_soon(third)
        await wait_all_tasks_blocked()
        if entered3.is_set():  # p3 did not wait for p2
            go3.set()
            await done3.wait()
        go2.set()
        go3.set()
    entries = await plain.history("call-1")
    assert [(e.seq, msgspec.json.decode(e.data)["n"]) for e in entries] == [
        (1, 0),
        (2, 1),
        (3, 2),
        (4, 3),
    ]


async def test_a_session_started_after_a_service_registered_gets_its_group(
    bus: Bus, settings: Settings
) -> None:
    """The README: 'a new session gets the groups of every registered service with its first
    event, so a service that is down still holds the session until it has caught up'. A Bus
    trusts the registry it read for 5 s (SERVICES_TTL): a session started meanwhile gets no
    group of a service registered since, and retires without it."""
    await bus.publish("earlier", Tick(n=1))  # the bot's Bus read the registry: no service
    async with Bus.connect(settings) as worker:  # a crm worker starts, registers, goes down
        await worker.register_service(ServiceInfo("crm"))
    await bus.publish("call-1", Tick(n=1), final=True)  # a new call, later
    groups = await raw(bus).xinfo_groups(bus.keys.session("call-1"))
    assert [g["name"] for g in groups] == [b"crm"]
    assert await raw(bus).ttl(bus.keys.session("call-1")) == -1  # crm has not read it


async def test_a_publish_makes_the_group_of_a_service_registered_since_the_session_began(
    bus: Bus, settings: Settings
) -> None:
    """A session that started while no service was registered used to retire at its final
    publish, and the worker that publish's hint woke made its group on the expiring stream:
    its entries could expire unhandled. The publish makes the group now, so the session
    waits for that service."""
    await bus.publish("call-1", Tick(n=1))  # no service yet: no group
    await bus.register_service(ServiceInfo("g"))  # a worker of g starts
    p = bus.keys.partition("call-1")
    leases = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    [token] = (await leases.acquire([p])).values()
    await bus.publish("call-1", Tick(n=2), final=True)
    stream = bus.keys.session("call-1")
    assert [g["name"] for g in await raw(bus).xinfo_groups(stream)] == [b"g"]
    async with Stepper.open(bus, settings) as step:
        reply = await step("call-1", token, "p")  # the woken worker's first step
    assert reply[0] == b"entries" and len(reply[3:]) == 2
    assert await raw(bus).pttl(stream) == -1  # live until g handled it


async def test_a_worker_woken_for_a_session_retired_without_its_group_leaves_it_alone(
    bus: Bus, settings: Settings
) -> None:
    """As above, but the bot does not know the service yet at the final publish (a registry
    read up to SERVICES_TTL ago): the session retires with no group, and the worker that
    publish's hint wakes leaves it, as one that retired before the service came to it."""
    await bus.publish("call-1", Tick(n=1))  # the bot read the registry: no service
    async with Bus.connect(settings) as worker:
        await worker.register_service(ServiceInfo("g"))  # a worker of g starts
    p = bus.keys.partition("call-1")
    leases = Leases(bus.redis, bus.keys, "g", "worker-a", ttl_ms=60_000)
    [token] = (await leases.acquire([p])).values()
    await bus.publish("call-1", Tick(n=2), final=True)  # retires at once; its hint wakes g
    stream = bus.keys.session("call-1")
    assert await raw(bus).pttl(stream) > 0  # retired: no group had anything to do
    async with Stepper.open(bus, settings) as step:
        assert await step("call-1", token, "p") == [b"gone"]  # the woken worker's first step
    assert await raw(bus).xinfo_groups(stream) == []  # no group made on the expiring stream
