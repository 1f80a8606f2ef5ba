"""Redis clients for a deployment, and the translation of connection failures."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import AuthenticationError, AuthorizationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import scripts
from .errors import ConfigError, ConnectionFailedError
from .settings import Settings

log = structlog.get_logger("flowbus.bus")

#: Errors after which a command may succeed on a fresh connection (server restarting, network).
TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)


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
    above its block time."""
    timeout = 5.0 if block_seconds is None else block_seconds + 5.0
    try:
        pool = BlockingConnectionPool.from_url(
            settings.url,
            max_connections=max_connections if block_seconds is None else 1,
            timeout=None,
            socket_timeout=timeout,
            socket_connect_timeout=5.0,
            **CONNECTION_OPTIONS,
        )
        return Redis(connection_pool=pool)
    except ValueError as exc:
        raise ConfigError(f"invalid Redis URL {settings.redacted_url!r}: {exc}") from None


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
        await client.aclose()


async def ensure_ready(client: Redis, settings: Settings, *, attempts: int = 1) -> None:
    url = settings.redacted_url
    for attempt in range(1, attempts + 1):
        try:
            await client.ping()
            await scripts.load_all(client)
            return
        except AuthenticationError as exc:
            raise ConnectionFailedError(f"authentication failed: {exc}", url=url) from None
        except (AuthorizationError, ResponseError) as exc:
            if "NOPERM" in str(exc) or "NOAUTH" in str(exc) or isinstance(exc, AuthorizationError):
                raise ConnectionFailedError(f"not permitted: {exc}", url=url) from None
            raise
        except TRANSIENT as exc:
            if attempt == attempts:
                raise ConnectionFailedError(
                    f"cannot reach the server after {attempts} attempt(s): {exc}", url=url
                ) from None
            delay = min(0.2 * 2**attempt, 5.0) * random.uniform(0.5, 1.0)
            log.warning("connect_retried", url=url, attempt=attempt, delay=round(delay, 2))
            await anyio.sleep(delay)
