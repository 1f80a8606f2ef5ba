"""Publishes and inbox writes of one `Bus`, sent together on a connection of their own.

redis-py's client spends about 600 Python calls on a command (its retry loop, observability
hooks, a command packer in Python, and a task per write for the socket timeout): on the CI
machine about 200 µs of CPU per publish, more than the round trip itself. `Publisher` writes
the script calls of every caller waiting at that moment in one write, packed by hiredis, and
reads their replies in order.

There is no standing task: the first caller starts a batch, callers that arrive meanwhile
wait, and when a batch is done the first of them is handed the turn to start the next (so no
caller keeps sending for others). A batch goes out in a task of its own, so every caller of it
gets its reply even if the one that started it is cancelled, and that one returns at once (a
caller's time limit holds with a server that does not answer). A lost connection is the error
of every call of the batch, for `connection.call` to retry (a publish or inbox write sent
again never appends twice).
With `Settings.min_replicas`, a ``WAIT`` follows each batch on the same connection, so it
covers every write of the batch; if too few replicas confirmed them, each call fails with
`ReplicasBehindError`, and `connection.call` sends it again.

In a cluster, `ClusterPublisher` keeps a `Publisher` per primary and sends each call to the
node of its keys' slot, so the ``WAIT`` after a node's batch counts that node's replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import anyio
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, MovedError, NoScriptError, TryAgainError

from . import scripts
from .connection import (
    LOST,
    ReplicasBehindError,
    SlotRoutes,
    batch,
    dedicated_pool,
    node_settings,
)
from .settings import Settings

#: What a waiting caller's future is given when it is its turn to send.
_TURN = object()


@dataclass(slots=True, eq=False)
class _Call:
    command: tuple[scripts.Arg, ...]
    future: asyncio.Future[Any]


class Publisher:
    """Sends script calls in shared batches on a connection of its own (connected on first
    use, and again after a failure). `aclose()` when done."""

    def __init__(self, settings: Settings) -> None:
        self._pool = dedicated_pool(settings)
        self._connection = self._pool.make_connection()  # type: ignore[no-untyped-call]  # untyped in redis-py
        self._waiting: list[_Call] = []
        self._sending = False
        self._flushes: set[asyncio.Task[None]] = set()  # batches in flight
        self._replicas = settings.min_replicas
        self._wait = ("WAIT", self._replicas, int(settings.replica_timeout_seconds * 1000))

    async def call(self, script: scripts.Script, keys: list[str], args: list[scripts.Arg]) -> Any:
        """`script`'s reply; its error reply, or a lost connection, is raised. Cancelled, it
        returns at once; its call may still reach the server, with the batch it went in."""
        loop = asyncio.get_running_loop()
        mine = _Call(scripts.evalsha((script, keys, args)), loop.create_future())
        self._waiting.append(mine)
        if self._sending:
            reply = await self._reply(mine)
            if reply is not _TURN:
                return reply
            mine.future = loop.create_future()  # for its reply, in the batch it sends
        self._sending = True
        batch = [c for c in self._waiting if not c.future.done()]  # the rest were cancelled
        self._waiting = []
        flush = loop.create_task(self._flush(batch))  # not cut short with its sender
        self._flushes.add(flush)
        flush.add_done_callback(self._flushes.discard)
        return await self._reply(mine)

    async def _reply(self, call: _Call) -> Any:
        """What `call`'s future is given: its reply, or the turn to send (`_TURN`)."""
        try:
            return await call.future
        except BaseException:
            if _turn_given(call):  # to a caller that is gone: pass it on
                self._waiting.remove(call)
                self._give_turn()
            raise

    async def _flush(self, batch: list[_Call]) -> None:
        """Send `batch`, hand the turn on, and give each call its reply (a caller that was
        cancelled meanwhile has none to take)."""
        try:
            replies = await self._exchange([c.command for c in batch])
        except Exception as exc:  # a bug, not a lost connection: fail them all
            replies = [exc] * len(batch)
        finally:
            self._give_turn()
        for c, reply in zip(batch, replies, strict=True):
            if not c.future.done():
                if isinstance(reply, BaseException):
                    c.future.set_exception(reply)
                else:
                    c.future.set_result(reply)

    def _give_turn(self) -> None:
        """Hand the turn to send to the first caller still waiting, if any."""
        self._waiting = [c for c in self._waiting if not c.future.done()]
        self._sending = bool(self._waiting)
        if self._waiting:
            self._waiting[0].future.set_result(_TURN)

    async def _exchange(self, commands: list[tuple[scripts.Arg, ...]]) -> list[Any]:
        """Every command's reply or error, in order. Calls the server ran without their script
        (after a restart) are sent again once the scripts are back: they did not run."""
        replies = await self._send(commands)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            again = await self._send([commands[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _send(self, commands: list[tuple[scripts.Arg, ...]]) -> list[Any]:
        """`batch`, then the ``WAIT`` for replicas if there is one to wait for."""
        if not self._replicas:
            return await batch(self._connection, commands)
        *replies, confirmed = await batch(
            self._connection, [*commands, self._wait], longer_by=self._wait[2] / 1000
        )
        if isinstance(confirmed, BaseException):
            error = confirmed
        elif confirmed < self._replicas:
            error = ReplicasBehindError(
                f"{confirmed} of {self._replicas} replicas confirmed the write within "
                f"{self._wait[2]} ms"
            )
        else:
            return replies
        return [r if isinstance(r, BaseException) else error for r in replies]

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._connection.disconnect()


def _turn_given(call: _Call) -> bool:
    """Whether `call`'s caller was handed the turn to send."""
    future = call.future
    if not future.done() or future.cancelled() or future.exception() is not None:
        return False
    return future.result() is _TURN


class ClusterPublisher:
    """A `Publisher` per primary of `cluster`, each call sent to the node of its first key's
    slot (all of a call's keys share it): the node a ``MOVED`` reply named, else the node the
    cluster client's slot map names. A ``MOVED`` reply is followed at once (the script did not
    run); an ``ASK`` reply (the slot is being migrated) is a `TryAgainError` and a node that
    cannot be reached a lost connection, for `connection.call` to retry after a pause — the
    second after a command of the cluster client's own on the slot, so that it reads the slot
    map again if a failover changed it. `aclose()` when done."""

    #: ``MOVED`` replies followed in one call before it fails as a transient error.
    REDIRECTS = 5

    def __init__(self, settings: Settings, cluster: RedisCluster) -> None:
        self._settings, self._cluster = settings, cluster
        self._nodes: dict[tuple[str, int], Publisher] = {}
        self._routes = SlotRoutes(cluster)

    async def call(self, script: scripts.Script, keys: list[str], args: list[scripts.Arg]) -> Any:
        """As `Publisher.call`, on the node serving `keys`."""
        slot = key_slot(keys[0].encode())
        for _ in range(self.REDIRECTS):
            address = self._routes.node(slot)
            if address is None:
                raise ClusterDownError(f"no node serves the slot of {keys[0]}")
            try:
                return await self._publisher(address).call(script, keys, args)
            except MovedError as exc:
                self._routes.moved(exc)
            except AskError:
                raise TryAgainError(f"the slot of {keys[0]} is being migrated") from None
            except LOST:
                self._routes.lost(address)
                with anyio.move_on_after(2), contextlib.suppress(Exception):
                    await self._cluster.exists(keys[0])  # it reads the slot map again if need be
                raise
        raise TryAgainError(f"{self.REDIRECTS} MOVED replies in a row for {keys[0]}")

    def _publisher(self, address: tuple[str, int]) -> Publisher:
        publisher = self._nodes.get(address)
        if publisher is None:
            publisher = self._nodes[address] = Publisher(node_settings(self._settings, *address))
        return publisher

    async def aclose(self) -> None:
        for publisher in self._nodes.values():
            await publisher.aclose()
