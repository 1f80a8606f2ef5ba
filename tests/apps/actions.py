"""A test actions service. Every action appends to the session's timeline
``<prefix>:test:timeline:<session>`` (``action.started:<label>``, ``action.finished:<label>``),
which the test bot's LLM and TTS write to as well. An action's effect — the "finished" mark —
happens once per action key, so a re-run after a crash shows as a second start only.
"""

from __future__ import annotations

import os
import time
from typing import Any

import anyio
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from bus import Settings
from flows import ActionService, WorkerFlowManager

SETTINGS = Settings.from_env()
redis = Redis.from_url(SETTINGS.url)
app = ActionService()


def timeline(session: str) -> str:
    return f"{SETTINGS.prefix}:test:timeline:{session}"


async def mark(manager: WorkerFlowManager, what: str) -> None:
    await redis.rpush(timeline(manager.session_id), what)


#: The effect of an action and its mark, atomically, once per action key.
ONCE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then redis.call('RPUSH', KEYS[2], ARGV[2]) end
"""


async def effect(manager: WorkerFlowManager, what: str) -> None:
    guard = f"{SETTINGS.prefix}:test:effect:{manager.action_key}"
    await redis.eval(ONCE, 2, guard, timeline(manager.session_id), os.getpid(), what)


@app.action("note")
async def note(action: dict[str, Any], flow_manager: WorkerFlowManager) -> None:
    label = action.get("label", "")
    await mark(flow_manager, f"action.started:{label}")
    await redis.rpush(
        f"{SETTINGS.prefix}:test:starts", f"{flow_manager.session_id}|{label}|{os.getpid()}"
    )
    await anyio.sleep(action.get("ms", 0) / 1000)
    flow_manager.state[f"ran_{label}"] = str(flow_manager.current_node)  # None: the first
    await effect(flow_manager, f"action.finished:{label}")


@app.action("boom")
def boom(action: dict[str, Any], flow_manager: WorkerFlowManager) -> None:
    raise RuntimeError(action.get("message", "boom"))


@app.action("legacy")
def legacy(action: dict[str, Any]) -> None:  # the deprecated one-argument form, a plain def
    SyncRedis.from_url(SETTINGS.url).rpush(
        f"{SETTINGS.prefix}:test:legacy", action.get("label", "")
    )


@app.function("lookup")
async def lookup(action: dict[str, Any], flow_manager: WorkerFlowManager) -> None:
    await mark(flow_manager, "function.started:lookup")
    await effect(flow_manager, "function.finished:lookup")


@app.function("explode")
async def explode(action: dict[str, Any], flow_manager: WorkerFlowManager) -> None:
    raise ValueError("lookup failed")


@app.action("stall_once")
async def stall_once(action: dict[str, Any], flow_manager: WorkerFlowManager) -> None:
    """On its first run, hold this worker's event loop (as a blocking call in an ``async
    def`` does) until another worker owns the session's partition, then fail; run again (by
    that worker), succeed."""
    guard = f"{SETTINGS.prefix}:test:stalled:{flow_manager.action_key}"
    if not await redis.set(guard, os.getpid(), nx=True):
        return
    sync = SyncRedis.from_url(SETTINGS.url)
    lease = action["lease"]
    mine = sync.get(lease)
    while sync.get(lease) in (mine, None):  # the loop is held: no renewal, no cancellation
        time.sleep(0.02)  # noqa: ASYNC251 (the point: a blocking call holds the loop)
    raise TimeoutError("the CRM did not answer")
