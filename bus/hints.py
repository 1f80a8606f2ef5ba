"""Wake-up hints: a worker's subscriptions to the wake channels of the partitions it owns.

The publish script sends a session's id on its partition's sharded channel (``SPUBLISH``)
when some group may be idle on the session. `Hints` keeps one subscription per server — per
primary node in a cluster, each to the channels of its slots — equal to the partitions the
consumer wants, and tells the consumer of every hint and every confirmed subscription. After a
reconnect every channel is subscribed again, and each confirmation lets the consumer rescan
that partition, so no hint is missed for good. In a cluster, every subscription starts over
when one loses its node or sees a slot move away, when a step is told a slot moved, or when
the cluster client's slot map puts a partition on another node (after a failover, a
subscription left on the old primary would hear nothing more).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import anyio
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import AskError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from .connection import TRANSIENT, backoff, make_client, node_settings, refused
from .keys import Keys
from .settings import Settings

#: How long one read of a subscription waits before it is issued again.
HINT_READ_SECONDS = 10.0
#: How often a worker on a cluster compares the slot map with its subscriptions.
LAYOUT_CHECK_SECONDS = 1.0
#: The longest pause of a worker on a cluster before it subscribes anew (the pauses grow while
#: its rounds of subscriptions end quickly, and start short again after one that held longer).
RESUBSCRIBE_PAUSE_CAP = 1.0

Part = TypeVar("Part")
Node = tuple[str, int] | None  # a cluster node's address; None: the one server


class Hints(Generic[Part]):
    """Follows the wake channels of `wanted()` (partition number -> the consumer's partition
    object): `on_hint(part, session)` for each hint, `on_subscribed(part, confirmed)` when a
    channel's subscription is confirmed by the server (True) or found already in place after a
    change of `wanted()` (False). Call `changed()` whenever `wanted()` may have changed. `run`
    raises `NotPermittedError` (an ACL user without the wake channels) or `CommandRefusedError`
    if the server refuses a subscription."""

    def __init__(
        self,
        settings: Settings,
        keys: Keys,
        *,
        wanted: Callable[[], Mapping[int, Part]],
        on_hint: Callable[[Part, str], None],
        on_subscribed: Callable[[Part, bool], None],
        cluster: RedisCluster | None = None,
        log: Any = None,
    ) -> None:
        self.settings, self.keys, self.cluster = settings, keys, cluster
        self._wanted, self._on_hint, self._on_subscribed = wanted, on_hint, on_subscribed
        self._changes: set[anyio.Event] = set()  # one per subscriber waiting for a change
        self._topology: anyio.CancelScope | None = None  # the followers of a cluster's nodes
        self._log = log or structlog.get_logger("flowbus.hints")

    def changed(self) -> None:
        for event in self._changes:
            event.set()

    async def run(self) -> None:
        if self.cluster is None:
            await self._follow(None, None)
            return
        failures = 0
        while True:
            # The nodes followed are those of the slot map watched, read at once: read apart,
            # the map could change in between (a failover), leaving the new primary's channels
            # to no follower while the map watched stayed as it was, and their partitions,
            # which wait for a subscription before they look for work, waiting for good.
            layout = self._layout()
            nodes = sorted({node for node in layout if node is not None})
            began = anyio.current_time()
            async with anyio.create_task_group() as tg:
                self._topology = tg.cancel_scope
                for node in nodes:
                    tg.start_soon(self._follow, node, tg.cancel_scope)
                tg.start_soon(self._watch_layout, layout, tg.cancel_scope)
            # A follower lost its node, a slot moved away from it, or the slot map changed (a
            # failover leaves a subscription on the old primary that hears nothing more). The
            # cluster client reads the map again by itself when its commands are redirected
            # or lose their node (the worker's heartbeats and renewals touch every slot;
            # reading it from here too raced with them): start over on it after a pause, a
            # short one again once a round held for longer than the longest pause.
            held = anyio.current_time() - began > RESUBSCRIBE_PAUSE_CAP
            failures = 1 if held else failures + 1
            await anyio.sleep(backoff(failures, cap=RESUBSCRIBE_PAUSE_CAP))

    async def _watch_layout(self, layout: list[Node], topology: anyio.CancelScope) -> None:
        """Start over once the cluster client's slot map puts some partition's channel on
        another node than in `layout`: it learns of a failover from the redirections of the
        worker's own heartbeats and renewals, while a subscription on the old primary just
        hears nothing. (A channel on no known node yet is followed once the map says where.)"""
        while True:
            await anyio.sleep(LAYOUT_CHECK_SECONDS)
            if self._layout() != layout:
                topology.cancel()
                return

    def _layout(self) -> list[Node]:
        return [self._node_of(self.keys.wake(p).encode()) for p in range(self.settings.partitions)]

    def topology_changed(self) -> None:
        """Some slot is served by another node now: in a cluster, subscribe anew."""
        if self._topology is not None:
            self._topology.cancel()

    def _node_of(self, channel: bytes) -> Node:
        if self.cluster is None:
            return None
        node = self.cluster.nodes_manager.get_node_from_slot(key_slot(channel))
        return (str(node.host), int(node.port)) if node is not None else None

    async def _follow(self, node: Node, topology: anyio.CancelScope | None) -> None:
        """Subscribe on `node` and hand over its hints; reconnect after a failure (in a
        cluster, cancel `topology` instead, so every follower starts over)."""
        failures = 0
        while True:
            client = make_client(self._settings_for(node), block_seconds=HINT_READ_SECONDS)
            pubsub = client.pubsub()
            channels: dict[bytes, Part] = {}
            subscribed = anyio.Event()
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._subscribe, pubsub, channels, node, subscribed)
                    await subscribed.wait()  # the connection is made by the first subscribe
                    connection = pubsub.connection
                    assert connection is not None
                    pinged = False
                    while True:
                        # Read off the connection itself: `PubSub.get_message` costs a hint
                        # three times as many Python calls. A connection that fails raises;
                        # the subscriptions start over on a new one.
                        reply = await connection.read_response(
                            timeout=HINT_READ_SECONDS, push_request=True
                        )
                        if reply is None:  # quiet: is the link still there (a NAT forgets)?
                            if pinged:
                                raise RedisConnectionError(
                                    f"no answer to a PING within {HINT_READ_SECONDS}s"
                                )
                            await connection.send_command("PING")
                            pinged = True
                            continue
                        failures, pinged = 0, False
                        if reply != b"PONG" and reply != [b"pong", b""]:
                            await self._take(reply, pubsub, channels, topology)
            except* (*TRANSIENT, AskError) as group:  # from the reader or the subscriber task;
                failures += 1  # an ASK or MOVED reply: the node no longer serves a wanted slot
                self._log.warning("hints_interrupted", error=str(group.exceptions[0]), node=node)
            except* ResponseError as group:  # a refused SSUBSCRIBE: an ACL user without the
                refusal = group.exceptions[0]  # channels, a server without sharded pub/sub
                assert isinstance(refusal, ResponseError)
                what = f"subscribing to the wake-up channels ({self.keys.wake(0)} and the like)"
                needs = f"the prefix's channels, &{self.settings.prefix}:*"
                raise refused(what, refusal, self.settings, needs=needs) from None
            finally:
                with anyio.CancelScope(shield=True):
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # untyped before redis-py 8
                    await client.aclose()
            if topology is not None:
                topology.cancel()
                return
            await anyio.sleep(backoff(failures))

    async def _subscribe(
        self, pubsub: Any, channels: dict[bytes, Part], node: Node, subscribed: anyio.Event
    ) -> None:
        """Keep the subscriptions on `node` equal to the wanted channels it serves."""
        while True:
            change = anyio.Event()
            self._changes.add(change)
            try:
                want = {
                    channel: part
                    for p, part in self._wanted().items()
                    if self._node_of(channel := self.keys.wake(p).encode()) == node
                }
                new = [c for c in want if c not in channels]
                gone = [c for c in channels if c not in want]
                for channel, part in want.items():
                    if channel in channels and channels[channel] is not part:
                        self._on_subscribed(part, False)  # it never lapsed: no hint was missed
                channels.clear()
                channels.update(want)
                # A cluster takes one slot per command: a channel at a time.
                for some in [new] if self.cluster is None else [[c] for c in new]:
                    if some:
                        await pubsub.ssubscribe(*some)
                        subscribed.set()
                for some in [gone] if self.cluster is None else [[c] for c in gone]:
                    if some:
                        await pubsub.sunsubscribe(*some)
                await change.wait()
            finally:
                self._changes.discard(change)

    async def _take(
        self,
        reply: Any,
        pubsub: Any,
        channels: dict[bytes, Part],
        topology: anyio.CancelScope | None,
    ) -> None:
        """Act on one message of the subscription (``[kind, channel, data]``)."""
        if isinstance(reply, list) and reply[0] == b"smessage":  # a hint, nearly every message
            part = channels.get(reply[1])
            if part is not None:
                self._on_hint(part, reply[2].decode())
            return
        message = await pubsub.handle_message(reply)  # its record of the subscriptions
        part = None if message is None else channels.get(message["channel"])
        if message is None or part is None:
            return
        if message["type"] == "smessage":
            self._on_hint(part, message["data"].decode())
        elif message["type"] == "ssubscribe":
            self._on_subscribed(part, True)
        elif message["type"] == "sunsubscribe" and topology is not None:
            topology.cancel()  # the server dropped a channel we want: its slot moved

    def _settings_for(self, node: Node) -> Settings:
        """Settings reaching `node` alone."""
        return self.settings if node is None else node_settings(self.settings, *node)
