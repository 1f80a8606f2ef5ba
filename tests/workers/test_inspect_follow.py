"""``flowbus inspect session SID --follow``: what is there, then each new event as it comes, until
the session ends."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from bus import Bus, Codec, Delivery, Service, Settings
from tests.support import ROOT, running, settings_env
from tests.workers.apps import Step

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def follow(settings: Settings, *args: str) -> AsyncIterator[Process]:
    env = {**os.environ, **settings_env(settings)}
    command = [sys.executable, "-m", "workers", "inspect", "session", *args, "--follow"]
    async with await anyio.open_process(command, cwd=ROOT, env=env) as process:
        try:
            yield process
        finally:
            if process.returncode is None:  # a failed test's: it would never end
                process.kill()


async def read_all(stream: Any) -> str:
    out = b""
    async for chunk in stream:
        out += chunk
    return out.decode()


async def next_line(lines: BufferedByteReceiveStream) -> Any:
    with anyio.fail_after(10):
        return json.loads(await lines.receive_until(b"\n", 1 << 20))


async def test_following_a_session_prints_each_new_event_and_inbox_entry_until_it_ends(
    bus: Bus, settings: Settings
) -> None:
    await bus.publish("call-1", Step(n=1))
    async with follow(settings, "call-1", "--inbox", "--json") as process:
        assert process.stdout is not None
        lines = BufferedByteReceiveStream(process.stdout)
        detail = await next_line(lines)  # what is there first, as without --follow
        assert [e["seq"] for e in detail["events"]] == [1] and detail["inbox"] == []

        await bus.publish("call-1", Step(n=2))
        followed = await next_line(lines)  # printed when it came: the session is still live
        assert followed["stream"] == "session"
        assert (followed["entry"]["seq"], followed["entry"]["data"]["n"]) == (2, 2)

        await bus.send("call-1", Step(n=20))
        followed = await next_line(lines)
        assert followed["stream"] == "inbox" and followed["entry"]["data"]["n"] == 20

        await bus.publish("call-1", Step(n=3), final=True)
        followed = await next_line(lines)
        assert (followed["stream"], followed["entry"]["seq"]) == ("session", 3)
        with anyio.fail_after(10):  # the session ended: so does the command
            assert await process.wait() == 0
        assert await read_all(process.stderr) == ""


async def test_following_an_ended_session_prints_it_and_ends_at_once(
    bus: Bus, settings: Settings
) -> None:
    await bus.publish("call-2", Step(n=1))
    await bus.publish("call-2", Step(n=2), final=True)
    async with follow(settings, "call-2") as process:
        assert process.stdout is not None
        with anyio.fail_after(10):
            assert await process.wait() == 0
        text = await read_all(process.stdout)
    assert "following call-2" in text and text.endswith("session call-2 ended\n"), text
    assert text.count("step") == 2  # the two events, in the table; none followed twice


async def test_following_a_session_not_started_yet_waits_for_its_first_event(
    bus: Bus, settings: Settings
) -> None:
    async with follow(settings, "call-3", "--json") as process:
        assert process.stdout is not None and process.stderr is not None
        lines = BufferedByteReceiveStream(process.stdout)
        assert (await next_line(lines))["events"] == []  # nothing yet, and no error
        await bus.publish("call-3", Step(n=1))
        followed = await next_line(lines)
        assert (followed["entry"]["seq"], followed["entry"]["data"]["n"]) == (1, 1)
        await bus.publish("call-3", Step(n=2), final=True)
        assert (await next_line(lines))["entry"]["seq"] == 2
        with anyio.fail_after(10):
            assert await process.wait() == 0
        assert "no session 'call-3' yet on " in await read_all(process.stderr)


async def test_following_the_inbox_waits_for_what_services_write_after_the_end(
    bus: Bus, settings: Settings
) -> None:
    """A handler of the session's last event writes to the inbox after the end: followed
    too, and the command ends once every service is done with the session. Waited for, it
    says so."""
    writing = anyio.Event()

    async def handle(delivery: Delivery) -> None:
        assert isinstance(delivery.payload, Step)
        if delivery.payload.n == 2:
            await writing.wait()
            await bus.send(delivery.session, Step(n=20))

    async with running(bus, Service("svc", handle, Codec([Step]))):
        await bus.publish("call-4", Step(n=1))
        async with follow(settings, "call-4", "--inbox", "--json") as process:
            assert process.stdout is not None
            lines = BufferedByteReceiveStream(process.stdout)
            await next_line(lines)  # what is there first
            await bus.publish("call-4", Step(n=2), final=True)
            followed = await next_line(lines)
            assert (followed["stream"], followed["entry"]["seq"]) == ("session", 2)
            assert process.stderr is not None
            with anyio.fail_after(10):
                note = await BufferedByteReceiveStream(process.stderr).receive_until(b"\n", 1000)
            assert note.decode() == (
                "flowbus: call-4 ended; its inbox is followed until every service is done with "
                "it (Ctrl-C stops)"
            )
            writing.set()
            followed = await next_line(lines)
            assert followed["stream"] == "inbox" and followed["entry"]["data"]["n"] == 20
            with anyio.fail_after(10):  # the service is done: so is the command
                assert await process.wait() == 0
