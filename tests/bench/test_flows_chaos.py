"""The flows chaos run: a short run of every disruption, on a server and on a cluster of its
own (the check of each call is `workers.verify`'s, tested in tests/workers/test_verify.py)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from bench import chaos, flows_chaos
from bus.settings import AckMode
from tests.bench.test_chaos import BUT_BOTS
from tests.conftest import KIND
from workers import logs
from workers.fleet import FleetError
from workers.server import LocalCluster, LocalServer


@pytest.mark.parametrize(
    "argv",
    [["--seconds", "0"], ["--workers", "1"], ["--concurrency", "0"], ["--every", "3", "2"]],
)
def test_bad_options_are_refused_before_anything_starts(argv: list[str]) -> None:
    with pytest.raises(SystemExit, match="must be"):
        flows_chaos.main(argv)


@pytest.mark.parametrize("module", [chaos, flows_chaos], ids=["bus", "flows"])
def test_a_worker_that_exits_unasked_ends_either_run_saying_so(
    module: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing(*args: object, **kwargs: object) -> None:
        async with anyio.create_task_group() as tg:  # as the run's, which wraps what it raises
            tg.start_soon(anyio.sleep_forever)
            raise FleetError("worker chaos-1 (pid 7) exited with status 1; its log ends with: …")

    monkeypatch.setattr(module, "run", failing)
    monkeypatch.setattr(logs, "configure", lambda *args, **kwargs: None)
    with pytest.raises(SystemExit, match=r"run failed: worker chaos-1 \(pid 7\) exited"):
        module.main(["--seconds", "1"])


def test_a_disruption_of_the_other_kind_of_server_is_refused_before_anything_starts() -> None:
    with pytest.raises(SystemExit, match="failover: not a disruption of one server"):
        flows_chaos.main(["--disruption", "failover"])


@pytest.mark.anyio
@pytest.mark.parametrize("ack_mode", ["each", "batch"])
async def test_a_short_run_of_every_disruption_ends_every_call_with_its_actions_in_place(
    ack_mode: AckMode,
) -> None:
    with LocalServer(KIND, appendonly=True) as server:
        result = await flows_chaos.run(
            server,
            seconds=5,
            min_rounds=1,
            rate=4,
            concurrency=20,
            seed=5,
            kinds=BUT_BOTS,
            every=(0.5, 1),
            ack_mode=ack_mode,
        )
    assert {d.kind for d in result.disruptions} == set(BUT_BOTS), result.disruptions
    assert result.check.calls >= 20 and result.check.actions_run >= 5 * result.check.calls
    assert {d.detail.split()[0] for d in result.disruptions if d.kind == "kill"} <= {
        "actions",
        "crm",
    }
    assert result.ok, flows_chaos.render(result)


@pytest.mark.anyio
async def test_a_short_run_on_a_cluster_fails_over_and_ends_every_call_in_order() -> None:
    with LocalCluster(kind=KIND, replicas=1) as cluster:
        result = await flows_chaos.run(
            cluster,
            seconds=5,
            min_rounds=1,
            rate=4,
            concurrency=20,
            seed=5,
            kinds=[k for k in chaos.CLUSTER_DISRUPTIONS if k != "bot"],
            every=(0.5, 1),
        )
    kinds = [d.kind for d in result.disruptions]
    assert set(kinds) == set(chaos.CLUSTER_DISRUPTIONS) - {"bot"}, kinds
    assert result.server.endswith("cluster") and result.ok, flows_chaos.render(result)


@pytest.mark.anyio
async def test_calls_whose_bots_went_away_are_ended_by_the_sweeper_and_the_others_check() -> None:
    """A call cancelled mid-way (its bot gone, its session not ended) is left to the sweeper,
    which ends it after 3 s idle (no other disruption keeps a live call idle that long); the
    calls that went on pass the check."""
    with LocalServer(KIND) as server:
        result = await flows_chaos.run(
            server,
            seconds=4,
            rate=4,
            concurrency=20,
            seed=1,
            kinds=["bot"],
            every=(0.5, 1),
            abandoned_after=3,
        )
    assert len(result.disruptions) >= 3, result.disruptions
    assert result.check.abandoned >= 3 and result.check.calls > result.check.abandoned
    assert result.ok, flows_chaos.render(result)
