"""The worker process's own settings, and its metrics."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import msgspec
import pytest
import uvloop

from bus import ConfigError, Delivery
from tests.apps.recorder import Tick
from workers.metrics import Metrics
from workers.runtime import GC_THRESHOLD, run


def test_a_worker_freezes_its_start_up_heap_and_collects_young_garbage_less_often() -> None:
    check = (
        "import gc; from workers.runtime import tune_gc; tune_gc(); "
        "print(gc.get_threshold()[0], gc.get_freeze_count() > 1000)"
    )  # in a process of its own: the test process's collector stays as it is
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(GC_THRESHOLD), "True"]


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


@pytest.mark.parametrize(
    ("chosen", "expected"), [(None, uvloop.Loop), ("uvloop", uvloop.Loop), ("asyncio", None)]
)
def test_a_worker_runs_on_uvloop_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch, chosen: str | None, expected: type | None
) -> None:
    if chosen is None:
        monkeypatch.delenv("FLOWBUS_EVENT_LOOP", raising=False)
    else:
        monkeypatch.setenv("FLOWBUS_EVENT_LOOP", chosen)
    loop = run(_loop_type)
    if expected is None:
        assert not issubclass(loop, uvloop.Loop)
        assert issubclass(loop, asyncio.BaseEventLoop)
    else:
        assert issubclass(loop, expected)


def test_an_unknown_event_loop_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWBUS_EVENT_LOOP", "trio")
    with pytest.raises(ConfigError, match="uvloop, asyncio"):
        run(_loop_type)


def test_a_replayed_dead_letter_adds_no_publish_to_handler_delay() -> None:
    metrics = Metrics("svc")
    replay = Delivery("call-1", "svc", "9-0", "tick", 1, 0, Tick(n=1), 1, {"replay_of": "1-0"})

    def delays() -> float:
        sample = "flowbus_publish_to_handler_seconds_count"
        return metrics.registry.get_sample_value(sample, {"service": "svc"}) or 0.0

    metrics.observe(replay, time.time(), 0.001, "ok")  # its ts is a day-old event's
    assert delays() == 0
    metrics.observe(msgspec.structs.replace(replay, extra={}), time.time(), 0.001, "ok")
    assert delays() == 1
