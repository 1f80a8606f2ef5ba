"""The benchmarks' probe records every handling: at once, or held and appended in bulk."""

from __future__ import annotations

import pytest

from bus import Bus, Delivery, Settings
from tests.support import wait_for
from workers import probe

pytestmark = pytest.mark.anyio


def delivery(seq: int) -> Delivery:
    tick = probe.ProbeTick(sent_ns=1_000 * seq)
    return Delivery("call-1", probe.GROUP, f"{seq}-0", "probe.tick", seq, 0, tick, 1)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    monkeypatch.setenv("FLOWBUS_REDIS_URL", settings.url)
    monkeypatch.setenv("FLOWBUS_PREFIX", settings.prefix)


@pytest.mark.usefixtures("env")
async def test_the_plain_probe_records_each_handling_before_it_returns(bus: Bus) -> None:
    record = probe.Recorder()
    for seq in (1, 2):
        await record(delivery(seq))
        handlings = await probe.read_handlings(bus.redis, bus.settings.prefix)
        assert [h.seq for h in handlings] == list(range(1, seq + 1))


@pytest.mark.usefixtures("env")
async def test_the_buffered_probe_appends_its_records_together_later(bus: Bus) -> None:
    record = probe.Recorder(flush_seconds=0.2)
    for seq in (1, 2, 3):
        await record(delivery(seq))
    assert await probe.read_handlings(bus.redis, bus.settings.prefix) == []  # held, no write

    async def written() -> bool:
        return len(await probe.read_handlings(bus.redis, bus.settings.prefix)) == 3

    await wait_for(written, limit=5, what="the held records")
    handlings = await probe.read_handlings(bus.redis, bus.settings.prefix)
    assert [(h.seq, h.sent_ns, h.deliveries) for h in handlings] == [
        (1, 1_000, 1),
        (2, 2_000, 1),
        (3, 3_000, 1),
    ]
    await record(delivery(4))  # the next record starts the next batch
    await wait_for(lambda: record._flusher is not None and record._flusher.done(), limit=5)
    assert [h.seq for h in await probe.read_handlings(bus.redis, bus.settings.prefix)][-1] == 4
