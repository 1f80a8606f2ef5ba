"""The chaos run: its check, and a short run of every disruption on a server of its own."""

from __future__ import annotations

import random
from types import SimpleNamespace
from unittest.mock import Mock

import pytest
from redis.exceptions import ResponseError

from bench import chaos
from bus import Bus, ServiceInfo, Settings
from bus.settings import AckMode
from tests.apps.recorder import Tick
from tests.conftest import KIND
from workers.probe import Handling
from workers.server import LocalCluster, LocalServer


def handling(session: str, seq: int, started_ns: int) -> Handling:
    return Handling(session, seq, pid=1, deliveries=1, sent_ns=0, handled_ns=started_ns)


def test_the_check_orders_handlings_by_their_start_and_allows_a_repeat_only_right_after() -> None:
    recorded = [  # in the order written: a frozen worker's record of seq 2 comes last
        handling("a", 1, 10),
        handling("a", 2, 30),
        handling("a", 3, 40),
        handling("a", 2, 20),
        handling("b", 1, 10),
        handling("b", 2, 20),
        handling("b", 1, 30),  # repeated after a later one
        handling("c", 1, 10),  # its seq 2 never handled
    ]
    result = chaos.check(recorded, {"a": 3, "b": 2, "c": 2})
    assert (result.handlings, result.repeats) == (8, 2)
    assert (result.incomplete, result.out_of_order) == (["c"], ["b"])
    assert not result.ok
    assert chaos.check(recorded[:4], {"a": 3}).ok


def test_with_batched_acks_a_replay_may_go_back_over_the_read_batch_and_no_further() -> None:
    def replayed(seqs: list[int], window: int) -> chaos.ChaosCheck:
        records = [handling("a", seq, at) for at, seq in enumerate(seqs)]
        return chaos.check(records, {"a": max(seqs)}, window=window)

    assert replayed([1, 2, 3, 4, 2, 3, 4, 5], window=3).ok
    assert not replayed([1, 2, 3, 4, 2, 3, 4, 5], window=1).ok
    assert not replayed([1, 2, 3, 4, 1, 2, 3, 4, 5], window=3).ok  # further back than a batch
    assert not replayed([1, 2, 3, 4, 2, 4, 3, 5], window=3).ok  # a replay out of order


@pytest.mark.parametrize(
    "argv",
    [["--seconds", "0"], ["--workers", "1"], ["--calls", "0"], ["--every", "3", "2"]],
)
def test_bad_options_are_refused_before_anything_starts(argv: list[str]) -> None:
    with pytest.raises(SystemExit, match="must be"):
        chaos.main(argv)


@pytest.mark.anyio
@pytest.mark.parametrize("ack_mode", ["each", "batch"])
async def test_a_short_run_of_every_disruption_loses_nothing_and_keeps_every_call_in_order(
    ack_mode: AckMode,
) -> None:
    with LocalServer(KIND, appendonly=True) as server:
        result = await chaos.run(
            server,
            seconds=5,
            min_rounds=1,
            rate=100,
            calls=20,
            seed=37,  # the AOF rewritten right before the server is killed
            kinds=BUT_BOTS,
            every=(0.5, 1),
            ack_mode=ack_mode,
        )
    assert {d.kind for d in result.disruptions} == set(BUT_BOTS), result.disruptions
    assert result.events >= 500 and result.check.handlings >= result.events
    assert result.ok, chaos.render(result)


#: Every disruption but a bot's, whose session the sweeper ends after `ABANDONED_AFTER_S`
#: (in a short run, a bot's disruptions run alone: see the next test).
BUT_BOTS = [k for k in chaos.DISRUPTIONS if k != "bot"]


@pytest.mark.anyio
async def test_calls_whose_bots_went_away_are_ended_by_the_sweeper_and_the_others_go_on() -> None:
    """With no other disruption no live call is idle for long, and the sweeper can end the
    abandoned ones after 3 s idle; without it, the run would fail their sessions not done."""
    with LocalServer(KIND) as server:
        result = await chaos.run(
            server,
            seconds=3,
            rate=100,
            calls=20,
            seed=1,
            kinds=["bot"],
            every=(0.5, 1),
            abandoned_after=3,
        )
    assert len(result.disruptions) >= 3, result.disruptions
    assert all("'s bot went away after" in d.detail for d in result.disruptions)
    assert result.ok, chaos.render(result)


@pytest.mark.anyio
async def test_a_run_whose_sessions_are_not_done_says_where_their_groups_stand(bus: Bus) -> None:
    await bus.register_service(ServiceInfo("svc"))
    published = await bus.publish("call-1", Tick(n=1), final=True)
    assert await chaos.stuck(bus) == (
        f"1 session not done, e.g. call-1 (last entry {published.entry_id}; "
        "svc: delivered up to 0-0, pending 0, lag 1)"
    )


@pytest.mark.anyio
async def test_a_short_run_on_a_cluster_fails_over_and_keeps_every_call_in_order() -> None:
    with LocalCluster(kind=KIND, replicas=1) as cluster:
        result = await chaos.run(
            cluster,
            seconds=5,
            min_rounds=1,
            rate=100,
            calls=20,
            seed=3,
            kinds=[k for k in chaos.CLUSTER_DISRUPTIONS if k != "bot"],
            every=(0.5, 1),
        )
    kinds = [d.kind for d in result.disruptions]
    assert set(kinds) == set(chaos.CLUSTER_DISRUPTIONS) - {"bot"}, kinds
    assert result.server.endswith("cluster") and result.ok, chaos.render(result)


def test_a_disruption_of_the_other_kind_of_server_is_refused_before_anything_starts() -> None:
    with pytest.raises(SystemExit, match="failover: not a disruption of one server"):
        chaos.main(["--disruption", "failover"])
    with pytest.raises(SystemExit, match="rewrite: not a disruption of a cluster"):
        chaos.main(["--cluster", "--disruption", "rewrite"])


@pytest.mark.anyio
async def test_a_rewrite_asked_for_while_the_server_rewrites_by_itself_is_noted_not_fatal() -> None:
    async def rewriting() -> None:
        raise ResponseError("Background append only file rewriting already in progress")

    bus = SimpleNamespace(redis=SimpleNamespace(bgrewriteaof=rewriting), settings=Settings())
    disruptions = chaos.Chaos(bus, [Mock()], Mock(), 4, random.Random(0), abandon=Mock())  # type: ignore[arg-type]  # a stand-in bus
    await disruptions.one("rewrite")
    assert [d.detail for d in disruptions.done] == ["the AOF being rewritten already"]
