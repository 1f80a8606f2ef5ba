"""The sample app the demo runs: an airline's ``actions`` service and its ``crm`` handlers.

Two services, each run by ``flowbus worker`` in as many processes as you like::

    flowbus worker workers.sample:actions     # the flow's custom and function actions
    flowbus worker workers.sample:crm         # event handlers, Pipecat style

The bots (`workers.bots`) drive calls through the flow in `workers.bots.sample_flow`: its nodes
name the actions below (``load_customer`` before the LLM, ``log_turn`` after it, the function
``lookup_order``), and the bots emit the events the handlers below subscribe to.
Everything each one does is also written to the demo's journal (`workers.journal`), from which
the demo checks the order of every call; an app of your own leaves those lines out. With
``SAMPLE_MAX_DELAY_MS`` in its environment, each action and handler takes a random time up to
that, as one that calls a service would (the flows chaos run: more of them in flight at a
disruption).
"""

from __future__ import annotations

import os
import random
from typing import Any

import anyio
import structlog

from flows import ActionService, EmitterRef, EventService, WorkerFlowManager
from workers.journal import Journal  # the demo's bookkeeping

log = structlog.get_logger("sample")
journal = Journal()

# The consumer group "actions", which the bots' FlowManager expects; the journal's connection
# is held while a worker runs (`lifespan`), as an app's own database pool would be.
actions = ActionService(lifespan=journal.open)
crm = EventService("crm", lifespan=journal.open)

CUSTOMERS = {"+15550100": {"name": "Ada", "tier": "gold"}}
ORDERS = {"A1234": {"status": "shipped", "eta": "tomorrow"}}
MAX_DELAY_SECONDS = float(os.environ.get("SAMPLE_MAX_DELAY_MS", "0")) / 1000


async def _work() -> None:
    """A call to another service, as a real action or handler makes (see the docstring)."""
    if MAX_DELAY_SECONDS:
        await anyio.sleep(random.uniform(0, MAX_DELAY_SECONDS))


# -- actions: they run in the worker, at their place in the node's list -------------------------
@actions.action("load_customer")
async def load_customer(action: dict[str, Any], flow_manager: WorkerFlowManager) -> None:
    """A pre-action: the customer is in the flow state before the LLM runs."""
    async with journal.action(flow_manager, action):
        await _work()
        caller = flow_manager.state.get("caller", "")
        flow_manager.state["customer"] = CUSTOMERS.get(caller, {"name": "there", "tier": "new"})


@actions.action("log_turn")
async def log_turn(action: dict[str, Any], flow_manager: WorkerFlowManager) -> None:
    """A post-action: runs once the node's reply was complete and spoken."""
    async with journal.action(flow_manager, action):
        await _work()
        turns = flow_manager.state.get("turns", 0) + 1
        flow_manager.state["turns"] = turns
        log.info("turn_logged", node=flow_manager.current_node, turns=turns)


@actions.function("lookup_order")
async def lookup_order(action: dict[str, Any], flow_manager: WorkerFlowManager) -> None:
    """The handler of ``{"type": "function", "handler": "lookup_order"}``."""
    async with journal.action(flow_manager, action):
        await _work()
        order = flow_manager.state.get("order_id", "")
        flow_manager.state["order"] = ORDERS.get(order, {"status": "unknown"})


# -- event handlers: the first argument stands for the emitter, as in Pipecat -------------------
@crm.event_handler("on_client_connected")
async def client_connected(transport: EmitterRef, client: dict[str, Any]) -> None:
    await journal.event(transport, "on_client_connected", crm.name)
    await _work()
    log.info("caller_connected", caller=client.get("id"))


@crm.event_handler("on_user_turn_stopped")
async def user_turn_stopped(aggregator: EmitterRef, strategy: str, message: dict[str, Any]) -> None:
    await journal.event(aggregator, "on_user_turn_stopped", crm.name)
    await _work()
    log.info("caller_said", text=message.get("content"))


@crm.event_handler("on_before_leave")  # sync: the bot waits until this has run
async def before_leave(transport: EmitterRef) -> None:
    await journal.event(transport, "on_before_leave", crm.name)
    await _work()
    log.info("call_summary_saved")
