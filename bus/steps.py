"""Batching of steps: every session's fenced acks and reads go out together.

Each session handles one event at a time, but hundreds of sessions step at once. `StepBatcher`
collects the steps made during one turn of the event loop and sends them together: one script
call per partition, each followed by the reads of its sessions that read on, all of them in
one write on the batcher's own connection (in a cluster, one write per node, to the node of
each partition's slot), so the cost per event is a share of a call and of a round trip. A
consumer runs a few batchers side by side (`consumer.STEP_LANES`), each for some of its
partitions, so that one batch is at the server while the sessions answered by another run.

A read is a plain ``XREADGROUP`` (`Step.reader`) that names the lease's fence stream besides the
session's: it fails if the lease is no longer ours, and it runs right after the script that
settled the session and said whether it may read (``lua/step.lua``). The two replies become
one, in the shapes the script used to return when it read itself: ``[b"entries", replayed,
deliveries, entry...]`` (`replayed`: 0 for new entries; 1 when the first is our pending head,
2 when that head is the entry `Bus.resume` retried last), ``[b"idle"]``, ``[b"paused"]``,
``[b"gone"]``. Entries read that are not to be handled now (the session turned out paused, or
its pending head comes first) are left in `Step.strays` for the caller to give back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskGroup
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, MovedError, ResponseError

from . import scripts
from .connection import LOST, SlotRoutes, batch, dedicated_pool
from .keys import Keys
from .settings import Settings


@dataclass(slots=True, eq=False)
class Step:
    """One session's step (see ``lua/step.lua`` for the fields); await `future` for its reply
    (a transient or response error is raised from it). A step with a `read` and a `reader`
    reads on (unless it pauses the session)."""

    stream: str
    lease: str
    token: str
    acks: Sequence[bytes] = ()
    read: str = ""
    give: Sequence[bytes] = ()
    verdict: Sequence[scripts.Arg] = ()
    reader: tuple[scripts.Arg, ...] = ()  # the session's XREADGROUP of new entries
    future: asyncio.Future[Any] | None = None  # set by `StepBatcher.submit`
    strays: Sequence[bytes] = ()  # read, not to be handled now

    def args(self) -> list[scripts.Arg]:
        if len(self.acks) == 1 and not (self.read or self.give or self.verdict):
            return ["a", self.acks[0]]  # the common step, in its short form
        return [
            self.read,
            len(self.acks),
            *self.acks,
            len(self.give),
            *self.give,
            len(self.verdict),
            *self.verdict,
        ]

    @property
    def reads(self) -> bool:
        pauses = bool(self.verdict) and self.verdict[0] == "pause"  # then it reads nothing
        return bool(self.read and self.reader) and not pauses

    def reply(self, result: Any, read: Any) -> Any:
        """This step's reply from its script's `result` and its `read`'s (see the module
        docstring); an error is returned, not raised."""
        entries = _entries(read)
        kind = None if isinstance(result, BaseException) else result[0]
        if kind == b"read":
            if isinstance(read, BaseException):
                return read
            return [b"entries", 0, 1, *entries] if entries else [b"idle"]
        if kind == b"head" and result[2] == 1:  # our only pending entry, then the new ones
            return [b"entries", 1 + result[4], result[1], result[3], *entries]
        self.strays = [e[0] for e in entries]
        if kind == b"head":
            return [b"entries", 1 + result[4], result[1], result[3]]
        return result


def reader(
    keys: Keys, partition: int, group: str, token: str, count: int
) -> Callable[[str], tuple[scripts.Arg, ...]]:
    """The reads of `group` in `partition`, fenced by its lease `token`: given a session's
    stream, the read of up to `count` of its new entries (a `Step.reader`)."""
    fence, consumer = keys.fence(partition, group, token), keys.consumer(partition)
    head = ("XREADGROUP", "GROUP", group, consumer, "COUNT", count, "STREAMS", fence)
    return lambda stream: (*head, stream, ">", ">")


def _entries(read: Any) -> list[Any]:
    """The entries an XREADGROUP reply holds (RESP3 gives a map of streams, RESP2 a list of
    pairs); at most one of its streams has any, the fence never does."""
    if not read or isinstance(read, BaseException):
        return []
    streams = read.values() if isinstance(read, dict) else (pair[1] for pair in read)
    return list(next(iter(streams)))


#: A step that only acknowledges one entry: the stream, the entry, the future of its reply.
_Ack = tuple[str, bytes, asyncio.Future[Any]]


def _result(call: Any, i: int) -> Any:
    """The reply of the `i`-th step of a script `call` (an error is returned, not raised)."""
    if isinstance(call, BaseException):
        return call
    if call == 0:  # every step of the call was an ack, done
        return 0
    result = call[i]
    if type(result) is list and result[0] == b"error":
        return ResponseError(result[1].decode(errors="replace"))
    return result


def _settle(future: asyncio.Future[Any], reply: Any) -> None:
    if future.done():  # its waiter was cancelled
        return
    if isinstance(reply, BaseException):
        future.set_exception(reply)
    else:
        future.set_result(reply)


class StepBatcher:
    """Sends the steps of group `group` in shared batches, one at a time, on a connection of
    its own (in a cluster, one per node, each partition's steps to the node of its slot, and
    `on_moved()` called when a slot moved); a retiring session's keys live `retention_ms`.
    Start `run()` in a task group first.

    A step's reply comes in an asyncio future of its own, the cheapest wait there is; a waiter
    that is cancelled cancels only its own future. (The bus runs on asyncio, as redis-py does.)
    """

    def __init__(
        self,
        settings: Settings,
        *,
        group: str,
        retention_ms: int,
        cluster: RedisCluster | None = None,
        on_moved: Callable[[], None] | None = None,
    ) -> None:
        self._pool = dedicated_pool(settings)
        # It connects on first use, and again after a failure.
        self._connection = self._pool.make_connection()  # type: ignore[no-untyped-call]  # untyped in redis-py
        self._nodes: dict[tuple[str, int], AbstractConnection] = {}  # in a cluster
        self._routes = SlotRoutes(cluster) if cluster is not None else None
        self._on_moved = on_moved
        self._group, self._retention_ms = group, retention_ms
        self._queue: list[Step] = []
        # Acknowledgements of one entry, the common step, by (lease, token): no `Step` each.
        self._acks: dict[tuple[str, str], list[_Ack]] = {}
        self._ready = asyncio.Event()  # cleared and reused: anyio's costs a microsecond a batch
        self._loop: asyncio.AbstractEventLoop | None = None
        # In a cluster each node's batch goes out on its own (`_on_node`): the steps for a
        # node whose last batch is still out wait here, so that a node slow to answer holds
        # up only its own sessions.
        self._held: dict[tuple[str, int], tuple[list[Step], dict[tuple[str, str], list[_Ack]]]] = {}
        self._nodes_tg: TaskGroup | None = None

    def submit(self, step: Step) -> asyncio.Future[Any]:
        """Queue `step` for the next batch; return the future of its reply."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        step.future = future = self._loop.create_future()
        if not (self._queue or self._acks):  # the first step of the next batch wakes the sender
            self._ready.set()
        self._queue.append(step)
        return future

    def ack(self, lease: str, token: str, stream: str, entry_id: bytes) -> asyncio.Future[Any]:
        """Queue a step that only acknowledges `entry_id` (the common step, in short: no `Step`
        of its own); return the future of its reply."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        future = self._loop.create_future()
        if not (self._queue or self._acks):  # as in `submit` (`set` is a Python call each time)
            self._ready.set()
        self._acks.setdefault((lease, token), []).append((stream, entry_id, future))
        return future

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as self._nodes_tg:
                if self._routes is None:
                    with contextlib.suppress(*LOST):  # now rather than at the first step
                        await self._connection.connect()
                while True:
                    await self._ready.wait()
                    self._ready.clear()
                    batch, self._queue = self._queue, []
                    acks, self._acks = self._acks, {}
                    await self._send(batch, acks)
                    if self._queue or self._acks:
                        # Steps came while that batch was out. Let the sessions it answered
                        # step first, so that both go in the next batch: sent at once, they
                        # would go on alternating in two half batches, twice the script calls
                        # per event.
                        await asyncio.sleep(0)
        finally:
            with anyio.CancelScope(shield=True):
                for connection in [self._connection, *self._nodes.values()]:
                    await connection.disconnect()

    async def _send(self, batch: list[Step], acks: dict[tuple[str, str], list[_Ack]]) -> None:
        by_lease: dict[tuple[str, str], list[Step]] = {key: [] for key in acks}
        for step in batch:
            assert step.future is not None
            if step.future.cancelled():  # its session's run was cut short and starts over:
                # settle what it says, but read nothing nobody would handle: neither new
                # entries nor a pending head (the script's read of it counts a delivery). A
                # step held for a busy node (`_send_by_node`) comes through here again.
                step.read = ""
            by_lease.setdefault((step.lease, step.token), []).append(step)
        if self._routes is not None:
            self._send_by_node(by_lease, acks)
            return
        calls = [self._call(key, steps, acks) for key, steps in by_lease.items()]
        try:
            replies = await self._exchange(self._connection, calls)
        except BaseException:
            _cancel(batch, acks)  # cancelled (or broken): these steps get no reply
            raise
        self._settle_all(by_lease, acks, replies)

    def _call(
        self, key: tuple[str, str], steps: list[Step], acks: dict[tuple[str, str], list[_Ack]]
    ) -> list[tuple[scripts.Arg, ...]]:
        """The script call of a lease's steps, then the reads of those that read on."""
        lease, token = key
        keys: list[str] = [lease]
        args: list[scripts.Arg] = [token, self._retention_ms, self._group]
        for stream, entry_id, _ in acks.get(key, []):
            keys.append(stream)
            args += ("a", entry_id)
        for step in steps:
            keys.append(step.stream)
            args += step.args()
        return [scripts.evalsha((scripts.STEP, keys, args)), *(s.reader for s in steps if s.reads)]

    def _settle_all(
        self,
        by_lease: dict[tuple[str, str], list[Step]],
        acks: dict[tuple[str, str], list[_Ack]],
        replies: list[list[Any]],
    ) -> None:
        """Give every step of `by_lease` (and every ack of `acks`) its reply."""
        for (key, steps), results in zip(by_lease.items(), replies, strict=True):
            call, reads = results[0], iter(results[1:])
            lease_acks = acks.get(key, [])
            if call == 0:  # every step of the call was an ack, done: the common reply
                for _, _, future in lease_acks:
                    if not future.done():
                        future.set_result(0)
            else:
                for i, (_, _, future) in enumerate(lease_acks):
                    _settle(future, _result(call, i))
            for i, step in enumerate(steps, len(lease_acks)):
                result = _result(call, i)
                assert step.future is not None
                _settle(step.future, step.reply(result, next(reads)) if step.reads else result)

    async def _exchange(
        self, connection: AbstractConnection, calls: list[list[tuple[scripts.Arg, ...]]]
    ) -> list[list[Any]]:
        """Every call's commands in one write on `connection`; their replies, call by call (a
        lost connection is every reply's error)."""
        results = await batch(connection, [command for commands in calls for command in commands])
        replies, at = [], 0
        for commands in calls:
            replies.append(results[at : at + len(commands)])
            at += len(commands)
        return replies

    def _send_by_node(
        self, by_lease: dict[tuple[str, str], list[Step]], acks: dict[tuple[str, str], list[_Ack]]
    ) -> None:
        """Send each node's share of a batch on its own (`_on_node`), unless that node's last
        share is still out: then it waits for that one's reply."""
        routes, tg = self._routes, self._nodes_tg
        assert routes is not None and tg is not None
        by_node: dict[tuple[str, int] | None, dict[tuple[str, str], list[Step]]] = {}
        for key, steps in by_lease.items():
            by_node.setdefault(routes.node(key_slot(key[0].encode())), {})[key] = steps
        for address, share in by_node.items():
            share_acks = {key: acks[key] for key in share if key in acks}
            if address is None:  # no node serves the slot now
                error = ClusterDownError(f"no node serves the slot of {next(iter(share))[0]}")
                replies = [[error] * (1 + sum(s.reads for s in steps)) for steps in share.values()]
                self._settle_all(share, share_acks, replies)
            elif address in self._held:
                held_steps, held_acks = self._held[address]
                held_steps += [step for steps in share.values() for step in steps]
                for key, lease_acks in share_acks.items():
                    held_acks.setdefault(key, []).extend(lease_acks)
            else:
                self._held[address] = ([], {})
                tg.start_soon(self._on_node, address, share, share_acks)

    async def _on_node(
        self,
        address: tuple[str, int],
        by_lease: dict[tuple[str, str], list[Step]],
        acks: dict[tuple[str, str], list[_Ack]],
    ) -> None:
        """Send the steps of `by_lease` to the node at `address`, and settle them; then the
        steps held for it meanwhile go in the next batch. After a ``MOVED`` reply (slots
        resharded, a failover) the slot's steps go where the reply said; the steps that got
        it are retried by their callers."""
        routes = self._routes
        assert routes is not None
        connection = self._nodes.get(address)
        if connection is None:
            kwargs = {**self._pool.connection_kwargs, "host": address[0], "port": address[1]}
            connection = self._nodes[address] = self._pool.connection_class(**kwargs)
        calls = [self._call(key, steps, acks) for key, steps in by_lease.items()]
        try:
            replies = await self._exchange(connection, calls)
        except BaseException:
            _cancel([step for steps in by_lease.values() for step in steps], acks)
            raise
        finally:
            held_steps, held_acks = self._held.pop(address)
            self._queue += held_steps
            for key, lease_acks in held_acks.items():
                self._acks.setdefault(key, []).extend(lease_acks)
            if held_steps or held_acks:
                self._ready.set()
        if isinstance(replies[0][0], LOST):
            routes.lost(address)
        moved = [reply[0] for reply in replies if isinstance(reply[0], MovedError)]
        for error in moved:  # this slot is served elsewhere now
            routes.moved(error)
        if moved and self._on_moved is not None:
            self._on_moved()
        self._settle_all(by_lease, acks, replies)


def _cancel(steps: list[Step], acks: dict[tuple[str, str], list[_Ack]]) -> None:
    """These steps get no reply (their batch was cancelled, or broke)."""
    for step in steps:
        assert step.future is not None
        step.future.cancel()
    for lease_acks in acks.values():
        for _, _, future in lease_acks:
            future.cancel()
