"""The actions service across worker kills and lost leases: what the next owner replays must
not undo what the state machine already did, and a stale owner's commands do not reach the
bot."""

from __future__ import annotations

from typing import Any

import pytest

from bus import Bus, Settings
from flows import COMMANDS
from flows.protocol import ActionsCompleted, NodeEntered, SessionStarted
from tests.conftest import make_settings
from tests.flows.test_actions import APP, note, timeline
from tests.flows.test_events import ready
from tests.support import WorkerProcesses, raw, wait_for
from workers.server import LocalServer

pytestmark = pytest.mark.anyio


async def test_a_batch_replayed_after_a_kill_does_not_abandon_the_node_entered_after_it(
    server: LocalServer, workers: WorkerProcesses
) -> None:
    """With ``ack_mode`` 'batch' the next owner replays the whole read batch: the bot's
    ``session.started`` (handled, not yet acknowledged) comes again after the state machine
    took the ``node.entered`` that followed it, and must not abandon that node entry (the bot
    would wait for its pre-actions until its timeout)."""
    settings = make_settings(server.url, ack_mode="batch")
    async with Bus.connect(settings) as bus:
        # Both are in the stream before a worker reads it: one read batch.
        await bus.publish("call-1", SessionStarted(flow="f"))
        pre: list[dict[str, Any]] = [note("slow", ms=2000)]
        await bus.publish("call-1", NodeEntered(node="a", gen=1, pre_actions=pre))
        first = workers.start(APP, settings)

        async def started() -> bool:
            return "action.started:slow" in await timeline(bus, "call-1")

        await wait_for(started, what="the pre-action to start")
        workers.kill(first)  # the batch is handled up to the action, none of it acknowledged
        workers.start(APP, settings)
        await ready(bus, "actions")
        got: list[Any] = []
        async with bus.inbox("call-1", COMMANDS) as inbox:

            async def completed() -> bool:
                got.extend(m.payload for m in await inbox.read(wait=0.2))
                return any(isinstance(p, ActionsCompleted) for p in got)

            await wait_for(completed, limit=20, what="the pre-actions to complete")
    assert got == [ActionsCompleted(node="a", gen=1, phase="pre")]


async def test_a_stale_owner_finishing_an_action_does_not_tell_the_bot(
    bus: Bus, settings: Settings, workers: WorkerProcesses
) -> None:
    """A worker whose event loop was held (a blocking call in an ``async def`` action) past
    its lease's TTL: the next owner runs the action again, it succeeds, and the bot is told so;
    the stale owner's action then fails, and its report must not reach the bot too (it is
    fenced, as its state writes are)."""
    stale = workers.start(APP, settings)
    await ready(bus, "actions")
    lease = bus.keys.lease(bus.keys.partition("call-1"), "actions")
    pre: list[dict[str, Any]] = [{"type": "stall_once", "lease": lease}]
    await bus.publish("call-1", NodeEntered(node="a", gen=1, pre_actions=pre))
    stalled = f"{settings.prefix}:test:stalled:call-1/1/pre/0"
    await wait_for(lambda: raw(bus).exists(stalled), what="the action to hold its worker")
    workers.start(APP, settings)  # takes the partitions once their leases lapse
    got: list[Any] = []
    async with bus.inbox("call-1", COMMANDS) as inbox:

        async def both_done() -> bool:
            got.extend(m.payload for m in await inbox.read(wait=0.2))
            told = any(isinstance(p, ActionsCompleted) for p in got)
            return told and "partition_lost" in workers.log(stale)

        await wait_for(both_done, what="the new owner's reply and the stale owner's stop")
        got.extend(m.payload for m in await inbox.read(wait=0.2))
    assert got == [ActionsCompleted(node="a", gen=1, phase="pre")]
