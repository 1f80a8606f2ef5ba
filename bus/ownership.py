"""Which worker owns which partition of a group: membership, balanced assignment, leases.

Workers heartbeat into a sorted set; every worker computes the same assignment from the same
member list; a partition changes hands only through its lease (a key with a TTL holding
``<epoch>:<worker>``), so at most one worker handles it at a time and a stale owner's writes
are refused by the scripts that check the lease.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import anyio
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, ResponseError, SlotNotCoveredError

from . import scripts
from .connection import TRANSIENT
from .keys import Keys


def assign(members: Sequence[str], partitions: int) -> dict[str, set[int]]:
    """Spread `partitions` over `members` so that loads differ by at most one, and a member
    joining or leaving moves few partitions (rendezvous hashing with exact quotas).
    Deterministic: every worker computes the same answer from the same member set.
    """
    result: dict[str, set[int]] = {m: set() for m in members}
    if not members:
        return result
    base, extra = divmod(partitions, len(members))
    by_hash = sorted(members, key=lambda m: (_score(m, -1), m))
    quota = {m: base + (i < extra) for i, m in enumerate(by_hash)}
    for p in range(partitions):
        ranked = sorted(members, key=lambda m: (_score(m, p), m), reverse=True)
        owner = next(m for m in ranked if len(result[m]) < quota[m])
        result[owner].add(p)
    return result


def _score(member: str, partition: int) -> int:
    return zlib.crc32(f"{member}/{partition}".encode())


class Renewal(NamedTuple):
    """What a renewal found: the partitions whose lease is no longer ours, and those whose
    renewal got no answer (a lost connection; in a cluster, their node out of reach), with
    the error."""

    lost: set[int]
    unanswered: dict[int, Exception]


class Leases:
    """Heartbeats and partition leases of one worker in one group. Acquiring and renewing
    leases go to each node of a cluster separately, so a node out of reach holds up only the
    leases it serves; each call may be given a time limit (`within`)."""

    def __init__(self, redis: Redis, keys: Keys, group: str, worker: str, ttl_ms: int) -> None:
        self.redis, self.keys, self.group, self.worker, self.ttl_ms = (
            redis,
            keys,
            group,
            worker,
            ttl_ms,
        )

    async def heartbeat(self, *, leave: bool = False) -> list[str]:
        """Renew (or end) our membership; return the live members, sorted."""
        reply = await scripts.HEARTBEAT(
            self.redis, [self.keys.members(self.group)], [self.worker, self.ttl_ms, int(leave)]
        )
        return sorted(m.decode() for m in reply)

    async def acquire(
        self, partitions: Iterable[int], *, within: float | None = None
    ) -> dict[int, str]:
        """Try to take each partition's lease; return the tokens of those we got. A lease
        whose call failed (its node out of reach, a refusal) is skipped, unless every call
        failed: then the first error is raised."""
        wanted = list(partitions)
        calls: list[scripts.Call] = [
            (
                scripts.ACQUIRE,
                [self.keys.lease(p, self.group), self.keys.epoch(p, self.group)],
                [self.worker, self.ttl_ms],
            )
            for p in wanted
        ]
        replies = await self._per_node(calls, within)
        if replies and all(isinstance(r, Exception) for r in replies):
            raise replies[0]
        return {p: r.decode() for p, r in zip(wanted, replies, strict=True) if isinstance(r, bytes)}

    async def renew(self, tokens: dict[int, str], *, within: float | None = None) -> Renewal:
        """Extend our leases; say which we no longer hold, and which got no answer (or a
        refusal: one of a slot being migrated, say, fails that lease's renewal alone)."""
        calls: list[scripts.Call] = [
            (
                scripts.RENEW,
                [self.keys.lease(p, self.group), self.keys.fence(p, self.group, token)],
                [token, self.ttl_ms, self.group],
            )
            for p, token in tokens.items()
        ]
        replies = await self._per_node(calls, within)
        renewal = Renewal(set(), {})
        for p, reply in zip(tokens, replies, strict=True):
            if isinstance(reply, Exception):
                renewal.unanswered[p] = reply
            elif not reply:
                renewal.lost.add(p)
        return renewal

    async def release(self, partition: int, token: str) -> None:
        keys = [
            self.keys.lease(partition, self.group),
            self.keys.fence(partition, self.group, token),
        ]
        await scripts.RELEASE(self.redis, keys, [token])

    async def _per_node(self, calls: list[scripts.Call], within: float | None) -> list[Any]:
        """Each call's reply, or the error that kept it from one: a pipeline per node (one on a
        single server), all at once, each cut off after `within` seconds."""
        by_node: dict[object, list[int]] = {}
        for i, (_, keys, _) in enumerate(calls):
            by_node.setdefault(self._node(keys[0]), []).append(i)
        replies: list[Any] = [None] * len(calls)

        async def on_node(indexes: list[int]) -> None:
            limit = contextlib.nullcontext() if within is None else anyio.fail_after(within)
            try:
                with limit:
                    got = await scripts.call_many(self.redis, [calls[i] for i in indexes])
            except (*TRANSIENT, ResponseError, TimeoutError) as exc:  # NOPERM loading scripts
                got = [exc] * len(indexes)
            for i, reply in zip(indexes, got, strict=True):
                replies[i] = reply

        async with anyio.create_task_group() as tg:
            for indexes in by_node.values():
                tg.start_soon(on_node, indexes)
        return replies

    def _node(self, key: str) -> object:
        """The node serving `key` in a cluster (None: a single server, or not known now)."""
        if not isinstance(self.redis, RedisCluster):
            return None
        with contextlib.suppress(SlotNotCoveredError, RedisClusterException, KeyError):
            node = self.redis.nodes_manager.get_node_from_slot(key_slot(key.encode()))
            return None if node is None else node.name
        return None
