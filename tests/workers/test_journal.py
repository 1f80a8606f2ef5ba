"""The demo's journal writes through a server restart, as the bus does: a write that failed
would fail the action it records."""

from __future__ import annotations

from unittest.mock import Mock

import anyio
import pytest

from bus import Settings, make_client
from flows import EmitterRef
from tests.conftest import KIND
from workers.fleet import settings_env
from workers.journal import EventRecord, Journal, read_journal
from workers.server import LocalServer


@pytest.mark.anyio
async def test_a_journal_write_waits_out_a_server_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    with LocalServer(KIND, appendonly=True) as server:
        settings = Settings.from_env({}, url=server.url, prefix="journal")
        for name, value in settings_env(settings).items():
            monkeypatch.setenv(name, value)
        async with Journal().open() as journal:

            async def handled(seq: int) -> None:
                emitter = EmitterRef(
                    "transport.daily", "DailyTransport#0", "call-1", seq, 1, Mock()
                )
                await journal.event(emitter, "on_client_connected", "crm")

            await handled(1)  # connected
            server.kill()
            async with anyio.create_task_group() as tg:
                tg.start_soon(handled, 2)
                await anyio.wait_all_tasks_blocked()  # its write found the server gone
                server.start()
        async with make_client(settings) as client:
            records = await read_journal(client, "journal", "call-1")
    assert [r.seq for r in records if isinstance(r, EventRecord)] == [1, 2]
