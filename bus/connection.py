"""Redis clients for a deployment, and the translation of Redis's errors into the bus's."""

from __future__ import annotations

import ast
import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import anyio
import msgspec
import structlog
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ClusterError,
    InvalidResponse,
    MovedError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisClusterUnreachableError,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import scripts
from .errors import (
    CommandRefusedError,
    ConfigError,
    ConnectionFailedError,
    NotPermittedError,
    ServerUnreachableError,
)
from .settings import Settings

log = structlog.get_logger("flowbus.bus")

#: Errors after which a command may succeed on a fresh connection (server restarting, network).
LOST = (RedisConnectionError, RedisTimeoutError, OSError)


class ReplicasBehindError(Exception):
    """Fewer replicas than `Settings.min_replicas` confirmed a write within its timeout."""


#: Errors after which a command may succeed if sent again a little later: a lost connection,
#: a cluster whose slots move or whose primary is being replaced (``CLUSTERDOWN``,
#: ``TRYAGAIN``, or redis-py's cluster client giving up after 16 redirections in about half a
#: second: ``TTL exhausted``, seen mid-migration; a slot no node serves in its map, or no node
#: reached by its refresh, neither of them a `RedisError`), or replicas that have not caught up.
TRANSIENT = (
    *LOST,
    ClusterError,
    TryAgainError,
    SlotNotCoveredError,
    RedisClusterUnreachableError,
    ReplicasBehindError,
)


#: How long a bus call retries a lost connection before `ConnectionFailedError`.
RETRY_SECONDS = 15.0

#: Connections of one client; callers beyond it wait for a free one rather than fail.
POOL_SIZE = 32


def _identity() -> dict[str, Any]:
    """Connection options naming the client once per process. Without them a recent redis-py
    (8.1 here) reads its own version from the package metadata for every new connection, about
    2 ms each: while a pool grew under a worker's first burst of handlers, events waited tens
    of ms."""
    try:
        from redis.driver_info import DriverInfo
    except ImportError:  # an older redis-py reads it once, at import
        return {}
    return {"driver_info": DriverInfo()}


#: Options every connection of the bus is made with (see `_identity`).
CONNECTION_OPTIONS: dict[str, Any] = _identity()


def make_client(
    settings: Settings, *, block_seconds: float | None = None, max_connections: int = POOL_SIZE
) -> Redis:
    """A client for `settings.url` with a pool of up to `max_connections` (callers beyond it
    wait); a blocking reader (`block_seconds`) gets a single connection whose socket timeout is
    above its block time. A command that finds its pooled connection closed (the server
    restarted since it was last used) is sent again once on a new one: redis-py retries
    nothing by default. With `settings.cluster`, a cluster client (see `_Cluster`), whose
    pools per node are unbounded."""
    timeout = 5.0 if block_seconds is None else block_seconds + 5.0
    if settings.cluster:
        _check_options(ConnectionPool.from_url, settings)
        return _cluster_client(settings, timeout)
    pool = _check_options(
        BlockingConnectionPool.from_url,
        settings,
        max_connections=max_connections if block_seconds is None else 1,
        timeout=None,
        socket_timeout=timeout,
        socket_connect_timeout=5.0,
        retry=Retry(NoBackoff(), 1),
    )
    _reset_aware(pool)
    return Redis.from_pool(pool)  # closed with the client


def _check_options(from_url: Callable[..., Any], settings: Settings, **options: Any) -> Any:
    """The pool `from_url` makes for `settings.url`, after making one of its connections
    (unconnected), so that an option that cannot work (a TLS option without ``rediss://``, an
    unknown ``ssl_cert_reqs``) is a `ConfigError` now rather than redis-py's own error at the
    first command."""
    try:
        pool = from_url(settings.url, **options, **CONNECTION_OPTIONS)
        pool.connection_class(**pool.connection_kwargs)
    except (ValueError, TypeError, RedisError) as exc:
        raise ConfigError(f"invalid Redis URL {settings.redacted_url!r}: {exc}") from None
    return pool


class SlotRoutes:
    """Which node serves a slot of `cluster`: where a ``MOVED`` reply said it went, else the
    cluster client's map (whose own refresh lags behind the replies we read ourselves)."""

    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = cluster
        self._moved: dict[int, tuple[str, int]] = {}  # slot -> node, from MOVED replies

    def node(self, slot: int) -> tuple[str, int] | None:
        """The node's address (None: none serves it, as for a moment in a failover)."""
        if slot in self._moved:
            return self._moved[slot]
        try:
            node = self._cluster.nodes_manager.get_node_from_slot(slot)
        except (SlotNotCoveredError, KeyError):
            return None
        return None if node is None else (str(node.host), int(node.port))

    def moved(self, error: MovedError) -> None:
        self._moved[error.slot_id] = (str(error.host), int(error.port))

    def lost(self, address: tuple[str, int]) -> None:
        """`address` could not be reached: trust the client's map for its slots again."""
        self._moved = {slot: a for slot, a in self._moved.items() if a != address}


def node_settings(settings: Settings, host: str, port: int) -> Settings:
    """Settings reaching one node of a cluster alone: its address in the URL, credentials and
    scheme kept."""
    url = urlsplit(settings.url)
    userinfo = url.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return msgspec.structs.replace(
        settings, url=urlunsplit(url._replace(netloc=netloc)), cluster=False
    )


def dedicated_pool(settings: Settings) -> ConnectionPool:
    """A pool to make connections of one's own from (`make_connection`) for `batch`, which
    bounds their waits itself: no socket timeout."""
    pool = ConnectionPool.from_url(
        settings.url, socket_timeout=None, socket_connect_timeout=5.0, **CONNECTION_OPTIONS
    )
    _reset_aware(pool)
    return pool


def _reset_aware(pool: ConnectionPool) -> None:
    """Make `pool`'s connections `_ResetAware` (one class per kind: TCP, TLS, Unix socket)."""
    base = pool.connection_class
    if base not in _RESET_AWARE:
        _RESET_AWARE[base] = type(f"ResetAware{base.__name__}", (_ResetAware, base), {})
    pool.connection_class = _RESET_AWARE[base]


_RESET_AWARE: dict[type, type] = {}


class _ResetAware(AbstractConnection):
    """A connection whose write after the server reset it fails as a lost connection (see
    `_reset_is_lost`), which redis-py and `call` retry. On uvloop that write raises a
    `RuntimeError` where asyncio's own loop raises an `OSError`: a hint reader reconnecting to
    a server being killed (the kernel had accepted the connection) died of it."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:  # not `with _reset_is_lost()`: a generator's context manager costs 4 calls a write
            await super().send_packed_command(command, check_health)
        except (AttributeError, RuntimeError) as exc:
            _raise_lost_if_reset(exc)
            raise


class _Cluster(RedisCluster):
    """redis-py's cluster client, which learns the cluster's slots before its first command,
    whoever sends it: a client that has not yet (redis-py 8.1) picks a node for each command
    without knowing the slots, and a handler's first commands, sent by many coroutines at
    once, were seen to run twice (redis/redis-py#3935 reports the same start-up race)."""

    _ready = False

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if not self._ready:
            await self.initialize()  # once; concurrent callers wait for the first
            self._ready = True
        with _reset_is_lost():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        if transaction or shard_hint:
            return super().pipeline(transaction, shard_hint)
        return _ClusterPipeline(self)  # type: ignore[abstract]  # as redis-py makes its own


class _ClusterPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        with _reset_is_lost():
            return await super().execute(raise_on_error, allow_redirections)


@contextmanager
def _reset_is_lost() -> Iterator[None]:
    """A write on a connection closed under it fails with ``'NoneType' object has no attribute
    'writelines'`` (closed by redis-py itself: its cluster client does so while it re-reads the
    slots after a failover) or, on uvloop, ``unable to perform operation on
    <TCPTransport closed=True>; the handler is closed``: a lost connection, for the caller to
    retry. (The cluster client makes its connections itself, so it maps them per command.)"""
    try:
        yield
    except (AttributeError, RuntimeError) as exc:
        _raise_lost_if_reset(exc)
        raise


def _raise_lost_if_reset(exc: AttributeError | RuntimeError) -> None:
    """Raise the lost connection that `exc` stands for (see `_reset_is_lost`), if it does."""
    if isinstance(exc, AttributeError) or "handler is closed" in str(exc):
        raise RedisConnectionError(f"connection closed under a command: {exc}") from exc


def _cluster_client(settings: Settings, timeout: float) -> Redis:
    """A client of a cluster: it learns the slots' nodes from the node `settings.url` names
    and routes each command by its key (every key of a session or partition shares a slot).
    Its pools are per node, unbounded: the cluster client cannot make callers wait."""
    try:
        client = _Cluster.from_url(
            settings.url,
            socket_timeout=timeout,
            socket_connect_timeout=5.0,
            **CONNECTION_OPTIONS,
        )
    except (ValueError, RedisClusterException) as exc:
        raise ConfigError(f"invalid Redis URL {settings.redacted_url!r}: {exc}") from None
    # It answers every command `Redis` does that the bus sends, routed by key.
    return cast(Redis, client)


@asynccontextmanager
async def connect(
    settings: Settings, *, attempts: int = 1, block_seconds: float | None = None
) -> AsyncIterator[Redis]:
    """Open a client, check the server answers, load the scripts; close it on exit.

    Retries `attempts` times with exponential backoff, then raises `ConnectionFailedError`
    (unreachable, wrong password, an ACL user lacking a permission).
    """
    client = make_client(settings, block_seconds=block_seconds)
    try:
        await ensure_ready(client, settings, attempts=attempts)
        yield client
    finally:
        await close(client)


async def close(client: Redis) -> None:
    """Close `client`'s connections, in a cancelled scope too (a bot's call cancelled as its
    caller hung up), where an await would otherwise end at once and leave them open for the
    garbage collector; for up to 2 s."""
    with anyio.move_on_after(2, shield=True):
        await client.aclose()


async def ensure_ready(client: Redis, settings: Settings, *, attempts: int = 1) -> None:
    url = settings.redacted_url
    for attempt in range(1, attempts + 1):
        try:
            await client.ping()
            await scripts.load_all(client)
            await _warn_if_evicting(client, url)
            return
        except AuthenticationError as exc:  # each a `ConnectionError` too: before `TRANSIENT`
            if "HELLO must be called with the client already authenticated" in str(exc):
                raise ConnectionFailedError(
                    "the server wants a password: give it in the URL "
                    "(redis://user:password@host:port/db)",
                    url=url,
                ) from None
            raise ConnectionFailedError(f"authentication failed: {exc}", url=url) from None
        except AuthorizationError as exc:
            raise NotPermittedError(str(exc), url=url) from None
        except RedisClusterUnreachableError as exc:  # not a `RedisError`: no node answered
            if attempt == attempts:
                raise ServerUnreachableError(
                    f"cannot reach the server after {attempts} attempt(s): {exc}", url=url
                ) from None
            await _before_retry(url, attempt)
        except RedisClusterException as exc:  # a node answered, but is no cluster's, or
            cause = _cluster_cause(exc)  # refused our credentials or its slot map
            if isinstance(cause, AuthenticationError):
                raise ConnectionFailedError(f"authentication failed: {cause}", url=url) from None
            if isinstance(cause, NoPermissionError | AuthorizationError) or str(cause).startswith(
                ("NOPERM", "NOAUTH")
            ):
                reason = _reason(cause) if isinstance(cause, ResponseError) else str(cause)
                raise NotPermittedError(
                    f"{reason} (a cluster's client reads its slot map with CLUSTER SLOTS: "
                    "grant +cluster|slots)",
                    url=url,
                ) from None
            raise ConnectionFailedError(
                f"the server is not a cluster's node ({exc}); leave out --cluster "
                "(FLOWBUS_CLUSTER) for a single server",
                url=url,
            ) from None
        except TRANSIENT as exc:  # a cluster still forming (CLUSTERDOWN) too
            if attempt == attempts:
                raise ServerUnreachableError(
                    f"cannot reach the server after {attempts} attempt(s): {exc}", url=url
                ) from None
            await _before_retry(url, attempt)
        except ResponseError as exc:  # redis-py takes NOPERM off the message it classes
            if isinstance(exc, NoPermissionError) or str(exc).startswith(("NOPERM", "NOAUTH")):
                raise NotPermittedError(_reason(exc), url=url) from None
            raise ConnectionFailedError(f"the server refused us: {exc}", url=url) from None
        except InvalidResponse as exc:  # something answered that speaks no Redis protocol
            raise ConnectionFailedError(
                f"what answered is not a Redis server ({exc}); is the port right?", url=url
            ) from None


def _cluster_cause(exc: BaseException) -> BaseException:
    """What the cluster client's `exc` stands for: redis-py wraps the error of the node it
    asked (a wrong password, a NOPERM for ``CLUSTER SLOTS``) in exceptions of its own."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if not isinstance(error, RedisClusterException):
            return error
        error = error.__cause__ or error.__context__
    return exc


async def _before_retry(url: str, attempt: int) -> None:
    delay = min(0.2 * 2**attempt, 5.0) * random.uniform(0.5, 1.0)
    log.warning("connect_retried", url=url, attempt=attempt, delay=round(delay, 2))
    await anyio.sleep(delay)


async def _warn_if_evicting(client: Redis, url: str) -> None:
    """Warn if the server may delete keys when it runs out of memory: under an ``allkeys-*``
    policy a session's events not yet handled, under a ``volatile-*`` one the keys the bus
    gave a lifetime (leases: a takeover too early; ended sessions). A user that may not run
    ``INFO`` cannot ask; that is not an error."""
    try:
        memory = await client.info("memory")
    except ResponseError:
        return
    policy = memory.get("maxmemory_policy", "noeviction")
    if policy != "noeviction":
        log.warning(
            "eviction_policy_unsafe",
            url=url,
            policy=policy,
            hint="set maxmemory-policy noeviction: then a full server refuses writes, and "
            "publishes fail with OOM, rather than deleting the bus's keys",
        )


#: A batch on a connection of its own (`batch`) whose replies have not all come after this
#: long fails as a lost connection would.
BATCH_TIMEOUT_SECONDS = 10.0


async def batch(
    connection: AbstractConnection,
    commands: list[tuple[scripts.Arg, ...]],
    *,
    longer_by: float = 0.0,
) -> list[Any]:
    """`commands` in one write on `connection` (see `scripts.call_on`), their replies or errors
    in order. A lost connection, or no reply within `BATCH_TIMEOUT_SECONDS` (plus `longer_by`,
    for a ``WAIT`` among them), is every command's error; the connection is dropped, and
    connects again on its next use."""
    try:
        # asyncio's timeout: half the cost of anyio.fail_after
        async with asyncio.timeout(BATCH_TIMEOUT_SECONDS + longer_by):
            return await scripts.call_on(connection, commands)
    except LOST as exc:  # a timeout too (an OSError): the replies are lost
        await connection.disconnect(nowait=True)
        return [exc] * len(commands)


async def call(
    what: str,
    operation: Callable[[], Awaitable[Any]],
    settings: Settings,
    session: str | None = None,
    *,
    expected: tuple[str, ...] = (),
) -> Any:
    """Run `operation` (`what` names it in errors), again after a connection failure, for up to
    `RETRY_SECONDS`, then `ConnectionFailedError`. A server's refusal is a
    `CommandRefusedError`, unless it starts with one of `expected`: that `ResponseError` is
    the caller's to translate."""
    deadline = time.monotonic() + RETRY_SECONDS
    for attempt in itertools.count(1):
        try:
            return await operation()
        except TRANSIENT as exc:  # before `ResponseError`: a cluster's TRYAGAIN is one
            if time.monotonic() > deadline:
                raise ConnectionFailedError(
                    f"{what} failed after {attempt} attempts: {exc}", url=settings.redacted_url
                ) from None
            await anyio.sleep(min(0.05 * 2**attempt, 1.0))
        except ResponseError as exc:
            if str(exc).startswith(expected):
                raise
            passing = MIGRATING in str(exc).lower() or str(exc).startswith(UNBLOCKED)
            if passing and time.monotonic() <= deadline:
                await anyio.sleep(min(0.05 * 2**attempt, 1.0))  # as a TRYAGAIN
                continue
            raise CommandRefusedError(what, _reason(exc), session=session) from None
    raise AssertionError("unreachable")


def refused(
    what: str, exc: ResponseError, settings: Settings, *, needs: str = ""
) -> CommandRefusedError | NotPermittedError:
    """The bus's error for the server's refusal `exc` of `what`, outside `call`: a missing
    permission is a `NotPermittedError` (saying what the user `needs`), any other refusal a
    `CommandRefusedError`."""
    if isinstance(exc, NoPermissionError) or str(exc).startswith(("NOPERM", "NOAUTH")):
        needed = f"; an ACL user needs {needs}" if needs else ""
        return NotPermittedError(f"{_reason(exc)} ({what}{needed})", url=settings.redacted_url)
    return CommandRefusedError(what, _reason(exc))


#: A cluster node's refusal of a script that reached for a key of its slot that was migrated
#: already (the key is not among those the script declares, so no ``ASK`` reply comes): the
#: slot is being migrated, and the call goes through once that is done. The script stopped at
#: that key; every script of the bus can be sent again (a publish's retry is known as one).
#: (Redis says "Script attempted to access …", Valkey "Attempted to access …".)
MIGRATING = "attempted to access a non local key in a cluster node"
#: A blocking read's answer when its node stopped being a primary (a failover): ``UNBLOCKED
#: force unblock from blocking operation, instance state changed (master -> replica?)``. Read
#: again, it goes to the new primary (the old one redirects).
UNBLOCKED = "UNBLOCKED"


#: The server's error codes that redis-py takes off the message when it picks a class for them.
_CODES: dict[type[ResponseError], str] = {
    OutOfMemoryError: "OOM",
    ReadOnlyError: "READONLY",
    NoPermissionError: "NOPERM",
}


def _reason(exc: ResponseError) -> str:
    """The server's error message as it sent it, code first (out of a pipeline's wrapping:
    ``Command # 1 (…) of pipeline caused error: ("…",)``)."""
    message = str(exc)
    _, wrapped, args = message.rpartition(" of pipeline caused error: ")
    if wrapped:  # the repr of the error's arguments
        with suppress(ValueError, SyntaxError, TypeError, IndexError):
            message = str(ast.literal_eval(args)[0])
    code = _CODES.get(type(exc))
    return f"{code} {message}" if code else message


def backoff(attempt: int, base: float = 0.05, cap: float = 5.0) -> float:
    """Exponential backoff with full jitter (half to all of the step)."""
    return float(min(cap, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0))
