"""Which worker owns which partition of a group: membership, balanced assignment, leases.

Workers heartbeat into a sorted set; every worker computes the same assignment from the same
member list; a partition changes hands only through its lease (a key with a TTL holding
``<epoch>:<worker>``), so at most one worker handles it at a time and a stale owner's writes
are refused by the scripts that check the lease.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence

from redis.asyncio import Redis

from . import scripts
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


class Leases:
    """Heartbeats and partition leases of one worker in one group."""

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

    async def acquire(self, partitions: Iterable[int]) -> dict[int, str]:
        """Try to take each partition's lease; return the tokens of those we got."""
        wanted = list(partitions)
        calls: list[scripts.Call] = [
            (
                scripts.ACQUIRE,
                [self.keys.lease(p, self.group), self.keys.epoch(p, self.group)],
                [self.worker, self.ttl_ms],
            )
            for p in wanted
        ]
        replies = _raise_errors(await scripts.call_many(self.redis, calls))
        return {p: r.decode() for p, r in zip(wanted, replies, strict=True) if isinstance(r, bytes)}

    async def renew(self, tokens: dict[int, str]) -> set[int]:
        """Extend our leases; return the partitions whose lease we no longer hold."""
        calls: list[scripts.Call] = [
            (
                scripts.RENEW,
                [self.keys.lease(p, self.group), self.keys.fence(p, self.group, token)],
                [token, self.ttl_ms, self.group],
            )
            for p, token in tokens.items()
        ]
        replies = _raise_errors(await scripts.call_many(self.redis, calls))
        return {p for p, ok in zip(tokens, replies, strict=True) if not ok}

    async def release(self, partition: int, token: str) -> None:
        keys = [
            self.keys.lease(partition, self.group),
            self.keys.fence(partition, self.group, token),
        ]
        await scripts.RELEASE(self.redis, keys, [token])


def _raise_errors(replies: list[object]) -> list[object]:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies
