"""Read-only looks at a deployment: lease owners, dead letters, live sessions, the server.

Each reads every partition in one pipeline, so it is cheap enough to poll a few times a second.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from bus import Bus


async def lease_owners(bus: Bus, group: str) -> dict[str, list[int]]:
    """Worker id -> the partitions whose lease it holds for `group` (from the lease keys)."""
    pipe = bus.redis.pipeline(transaction=False)
    for p in range(bus.settings.partitions):
        pipe.get(bus.keys.lease(p, group))
    owners: dict[str, list[int]] = {}
    for p, token in enumerate(await pipe.execute()):
        if token:
            owners.setdefault(token.decode().split(":", 1)[1], []).append(p)
    return owners


async def dead_letter_count(bus: Bus, sessions: Collection[str] | None = None) -> int:
    """Entries in the dead-letter streams of all partitions; with `sessions`, those of these
    sessions only (the demo's calls, on a server that other calls may use too)."""
    pipe = bus.redis.pipeline(transaction=False)
    if sessions is None:
        for p in range(bus.settings.partitions):
            pipe.xlen(bus.keys.dead(p))
        return sum(await pipe.execute())
    wanted = {s.encode() for s in sessions}
    for p in sorted({bus.keys.partition(s) for s in sessions}):
        pipe.xrange(bus.keys.dead(p))
    replies: list[Any] = await pipe.execute()
    return sum(fields.get(b"session") in wanted for entries in replies for _, fields in entries)


async def live_session_count(bus: Bus) -> int:
    """Sessions some group may still have work in (an ended session leaves the live index once
    every group acknowledged all of it)."""
    pipe = bus.redis.pipeline(transaction=False)
    for p in range(bus.settings.partitions):
        pipe.scard(bus.keys.live(p))
    return sum(await pipe.execute())


@dataclass(frozen=True, slots=True)
class ServerIdentity:
    """What the server says it is (``INFO server``)."""

    name: str
    version: str
    pid: int

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


async def server_identity(redis: Redis) -> ServerIdentity:
    """Name and version of the server: Valkey reports ``valkey_version`` beside the
    Redis-compatible ``redis_version``."""
    info = await redis.info("server")
    if "valkey_version" in info:
        return ServerIdentity("valkey", str(info["valkey_version"]), int(info["process_id"]))
    return ServerIdentity(
        str(info.get("server_name", "redis")), str(info["redis_version"]), int(info["process_id"])
    )
