"""The benchmarks' probe records every handling: at once, or held until a flush."""

from __future__ import annotations

import pytest

from bus import Bus, Delivery, Payload, Settings
from tests.support import left_for_the_collector
from workers import probe

pytestmark = pytest.mark.anyio


def delivery(seq: int, payload: Payload | None = None) -> Delivery:
    payload = payload or probe.ProbeTick(sent_ns=1_000 * seq)
    return Delivery("call-1", probe.GROUP, f"{seq}-0", "probe.tick", seq, 0, payload, 1)


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    monkeypatch.setenv("FLOWBUS_REDIS_URL", settings.url)
    monkeypatch.setenv("FLOWBUS_PREFIX", settings.prefix)


async def seqs(bus: Bus) -> list[int]:
    return [h.seq for h in await probe.read_handlings(bus.redis, bus.settings.prefix)]


async def test_the_plain_probe_records_each_handling_before_it_returns(bus: Bus) -> None:
    record = probe.Recorder()
    async with record.opened():
        for seq in (1, 2):
            await record(delivery(seq))
            assert await seqs(bus) == list(range(1, seq + 1))
        await record(delivery(3, probe.ProbeFlush()))  # nothing held, nothing written
    assert await seqs(bus) == [1, 2]


async def test_the_probe_holds_its_connections_in_its_lifespan_and_closes_them(
    bus: Bus,
) -> None:
    """Its services' lifespan: a worker that stops leaves nothing for the garbage collector;
    a handling outside it says so."""
    assert probe.service.lifespan is not None and probe.holding.lifespan is not None
    record = probe.Recorder()
    with left_for_the_collector() as left:
        async with record.opened():
            await record(delivery(1))
    assert left == [] and await seqs(bus) == [1]
    with pytest.raises(RuntimeError, match="within its lifespan"):
        await record(delivery(2))


async def test_the_holding_probe_writes_its_records_at_a_flush(bus: Bus) -> None:
    record = probe.Recorder(hold=True)
    async with record.opened():
        for seq in (1, 2, 3):
            await record(delivery(seq))
        assert await seqs(bus) == []
        await record(delivery(4, probe.ProbeFlush()))
        handlings = await probe.read_handlings(bus.redis, bus.settings.prefix)
        assert [(h.seq, h.sent_ns, h.deliveries) for h in handlings] == [
            (1, 1_000, 1),
            (2, 2_000, 1),
            (3, 3_000, 1),
        ]
        await record(delivery(5))
        await record(delivery(6, probe.ProbeFlush()))
    assert await seqs(bus) == [1, 2, 3, 5]


async def test_a_failed_flush_keeps_the_records_for_its_retry(bus: Bus) -> None:
    record = probe.Recorder(hold=True)
    async with record.opened():
        await record(delivery(1))
        await bus.redis.set(probe.handled_key(bus.settings.prefix), "not a list")
        with pytest.raises(Exception, match="WRONGTYPE"):
            await record(delivery(2, probe.ProbeFlush()))
        await bus.redis.delete(probe.handled_key(bus.settings.prefix))
        await record(delivery(3, probe.ProbeFlush()))
    assert await seqs(bus) == [1]
