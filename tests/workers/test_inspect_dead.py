"""``flowbus inspect`` and ``flowbus dead`` against a server with known content: what they print
is what is there, and a dead letter replayed is handled again, in order."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from functools import partial
from typing import Any

import anyio
import msgspec
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from bus import Bus, ServiceInfo, Settings, connection, encode, scripts
from tests.conftest import KIND, make_settings
from tests.support import ROOT, WorkerProcesses, raw, settings_env, wait_for
from tests.workers.apps import Step, broken_key, records_key
from workers import commands, deadletters, inspection
from workers.cli import parser
from workers.deadletters import DeadLetterError, count_dead, list_dead, parse, replay
from workers.inspection import end_states
from workers.metrics import lag_of
from workers.replay import REPLAY, Replay
from workers.server import LocalServer

pytestmark = pytest.mark.anyio
APP = "tests.workers.apps:steps"


async def flowbus(settings: Settings, *args: str, check: bool = True) -> tuple[int, str, str]:
    env = {**os.environ, **settings_env(settings)}
    with anyio.fail_after(60):
        done = await anyio.run_process(
            [sys.executable, "-m", "workers", *args], cwd=ROOT, env=env, check=False
        )
    out, err = done.stdout.decode(), done.stderr.decode()
    if check:
        assert done.returncode == 0, err
    assert "Traceback" not in err, err
    return done.returncode, out, err


async def as_json(settings: Settings, *args: str) -> Any:
    return json.loads((await flowbus(settings, *args, "--json"))[1])


async def records(bus: Bus, group: str = "steps") -> list[tuple[str, int, int, str]]:
    """(session, seq, n, type) of every step the group handled, in order."""
    items = await raw(bus).lrange(records_key(bus.settings.prefix, group), 0, -1)
    out = []
    for item in items:
        session, seq, n, _deliveries, type_ = item.decode().split("|")
        out.append((session, int(seq), int(n), type_))
    return out


async def start(
    bus: Bus, settings: Settings, workers: WorkerProcesses, group: str = "steps"
) -> None:
    workers.start(APP, settings, {"STEPS_GROUP": group})

    async def owned() -> bool:
        tokens = [await raw(bus).get(bus.keys.lease(p, group)) for p in range(64)]
        return all(tokens)

    await wait_for(owned, what=f"{group} to own every partition")


async def publish_steps(bus: Bus, session: str, failing: int, *, last_final: bool = False) -> None:
    for n in (1, 2, 3):
        await bus.publish(session, Step(n=n, fail=n == failing), final=last_final and n == 3)


async def dead_count(bus: Bus) -> int:
    return sum([int(await raw(bus).xlen(bus.keys.dead(p))) for p in range(64)])


def replay_of_step_2(extra: dict[str, str]) -> Replay:
    """A replay, for group ``steps``, of seq 2 of a session (its entry 1-0)."""
    data = msgspec.Raw(b'{"type":"step","n":2}')
    return Replay(group="steps", entry="1-0", seq=2, event="step", ts=5, data=data, extra=extra)


def test_a_dead_letter_is_read_back_into_its_event_whatever_it_held() -> None:
    """What `dead list`, `show` and `replay` read: the event inside a dead-lettered replay,
    with the entry it replays (a second replay hands back that one); an original field named
    as one of the letter's own, kept as ``orig.<name>``, under its name; data that is not
    JSON, as it is."""

    def stored(**fields: str | bytes) -> dict[bytes, bytes]:
        return {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}

    own = {"session": "call-1", "group": "steps", "entry": "9-0", "deliveries": "3"}
    own |= {"error": "RuntimeError: again", "policy": "skip"}
    inner = replay_of_step_2({"traceparent": "00-ab"})
    letter = parse(3, "8-0", stored(**own, type=REPLAY, seq="4", ts="6", data=encode(inner)), False)
    assert (letter.type, letter.seq, letter.ts) == ("step", 2, 5)
    assert letter.data == {"type": "step", "n": 2}
    assert letter.extra == {"traceparent": "00-ab"} and letter.replay_of == "1-0"
    odd = stored(**own, type="step", seq="2", ts="5", data="{not json", **{"orig.error": "x"})
    letter = parse(3, "8-1", odd, False)
    assert letter.error == "RuntimeError: again" and letter.extra == {"error": "x"}
    assert letter.data == "{not json" and letter.replay_of == ""


async def test_a_replay_hands_back_the_first_entry_with_its_envelope_and_trace(bus: Bus) -> None:
    """Replaying a dead-lettered replay hands back the entry the first one replayed, with the
    original envelope fields (not every field the entry had) and its trace; a session paused on
    one letter shows that one paused, not its other letters; a letter found paused and resumed
    since is dropped all the same."""
    await bus.publish("call-1", Step(n=1))  # the session exists
    p, trace = bus.keys.partition("call-1"), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b71-01"
    own = {"session": "call-1", "group": "steps", "deliveries": 3, "error": "E", "policy": "skip"}
    inner = replay_of_step_2({"traceparent": trace, "x-tenant": "a"})
    replayed = {"type": REPLAY, "seq": 9, "ts": 6, "data": encode(inner)}
    await raw(bus).xadd(bus.keys.dead(p), {**own, "entry": "3-0", **replayed}, id="7-0")
    await raw(bus).xadd(bus.keys.dead(p), {**own, "entry": "4-0", **replayed}, id="8-0")
    await raw(bus).hset(bus.keys.paused(p, "steps"), "call-1", "4-0")
    assert [d.paused for d in await list_dead(bus)] == [False, True]

    await replay(bus, await deadletters.find(bus, f"{p}/7-0"))
    entry = (await bus.history("call-1"))[-1]
    again = msgspec.json.decode(entry.data, type=Replay)
    assert (again.entry, again.event, again.seq) == ("1-0", "step", 2)
    assert again.extra == {"traceparent": trace} and entry.extra == {"traceparent": trace}

    paused = await deadletters.find(bus, f"{p}/8-0")
    await raw(bus).hdel(bus.keys.paused(p, "steps"), "call-1")  # resumed meanwhile
    assert await deadletters.drop(bus, paused) == f"{p}/8-0: dropped"
    assert await raw(bus).xlen(bus.keys.dead(p)) == 0


async def test_a_skipped_dead_letter_is_listed_shown_and_replayed_after_the_session_went_on(
    bus: Bus, settings: Settings, workers: WorkerProcesses
) -> None:
    settings = make_settings(settings.url, prefix=settings.prefix, max_deliveries=2)
    await start(bus, settings, workers, "steps")
    await start(bus, settings, workers, "audit")  # another service on the same sessions
    await raw(bus).set(broken_key(settings.prefix, "steps"), 1)
    await publish_steps(bus, "call-7", failing=2)
    await wait_for(lambda: _is(records(bus), 2), what="steps 1 and 3")
    await wait_for(lambda: _is(records(bus, "audit"), 3), what="audit to handle all three")
    await wait_for(lambda: _equal(dead_count(bus), 1), what="the dead letter")

    [letter] = await as_json(settings, "dead", "list")
    assert {k: letter[k] for k in ("session", "group", "seq", "type", "deliveries", "policy")} == {
        "session": "call-7",
        "group": "steps",
        "seq": 2,
        "type": "step",
        "deliveries": 2,
        "policy": "skip",
    }
    assert letter["error"] == "RuntimeError: step 2 is broken" and letter["paused"] is False
    assert letter["data"] == {"type": "step", "n": 2, "fail": True}
    ref = letter["ref"]
    _, text, _ = await flowbus(settings, "dead", "list")
    assert ref in text and "RuntimeError: step 2 is broken" in text
    _, text, _ = await flowbus(settings, "dead", "show", ref)
    assert "seq 2 step" in text and '"n": 2' in text and "deliveries  2" in text
    assert await as_json(settings, "dead", "list", "--group", "audit") == []

    detail = await as_json(settings, "inspect", "session", "call-7")
    assert [(e["seq"], e["type"], e["data"]["n"]) for e in detail["events"]] == [
        (1, "step", 1),
        (2, "step", 2),
        (3, "step", 3),
    ]
    assert {g["name"]: g["last_delivered_seq"] for g in detail["groups"]} == {
        "audit": 3,
        "steps": 3,
    }
    assert [e["progress"] for e in detail["events"]] == [
        {"audit": "done", "steps": "done"},
        {"audit": "done", "steps": "dead"},  # handled by no one
        {"audit": "done", "steps": "done"},
    ]
    assert [d["ref"] for d in detail["dead_letters"]] == [ref]
    _, text, _ = await flowbus(settings, "inspect", "session", "call-7")
    assert "steps: read up to seq 3, lag 0, pending 0" in text and ref in text
    assert "publish_entry=" in text and "publish_reply" not in text  # its retries' memory
    assert re.search(r"\n2 +\d+ +step +✓ +✗ ", text), text

    await raw(bus).delete(broken_key(settings.prefix, "steps"))
    _, text, _ = await flowbus(settings, "dead", "replay", ref)
    assert f"{ref}: seq 2 step of session call-7 replayed for steps as seq 4" in text
    await wait_for(lambda: _is(records(bus), 3), what="the replay handled")
    assert await records(bus) == [
        ("call-7", 1, 1, "step"),
        ("call-7", 3, 3, "step"),
        ("call-7", 2, 2, "step"),  # the original event, handled after the session's position
    ]
    assert await as_json(settings, "dead", "list") == []
    history = await bus.history("call-7")
    assert [e.type for e in history] == ["step", "step", "step", "flowbus.replay"]
    await wait_for(lambda: _settled(bus, "call-7", 4), what="both groups past the replay")
    assert len(await records(bus, "audit")) == 3  # another group's replay: acknowledged unseen


async def test_a_paused_session_is_shown_and_a_replay_resumes_it_in_place_a_drop_skips(
    bus: Bus, settings: Settings, workers: WorkerProcesses
) -> None:
    settings = make_settings(
        settings.url, prefix=settings.prefix, max_deliveries=2, dead_letter_policy="pause"
    )
    await start(bus, settings, workers)
    await raw(bus).set(broken_key(settings.prefix, "steps"), 1)
    await publish_steps(bus, "call-1", failing=2)
    await publish_steps(bus, "call-2", failing=2)
    await wait_for(lambda: _equal(dead_count(bus), 2), what="two dead letters")
    assert sorted(await records(bus)) == [("call-1", 1, 1, "step"), ("call-2", 1, 1, "step")]

    letters = {d["session"]: d for d in await as_json(settings, "dead", "list")}
    assert {s: (d["paused"], d["policy"], d["seq"]) for s, d in letters.items()} == {
        "call-1": (True, "pause", 2),
        "call-2": (True, "pause", 2),
    }
    _, out, err = await flowbus(settings, "dead", "list", "--limit", "1")
    assert len(out.splitlines()) == 2 and "1 more dead letters (--limit N" in err  # head, row
    sessions = {s["session"]: s for s in await as_json(settings, "inspect", "sessions")}
    assert {s: (r["status"], r["last_seq"]) for s, r in sessions.items()} == {
        "call-1": ("paused", 3),
        "call-2": ("paused", 3),
    }
    assert sessions["call-1"]["behind"] == {"steps": 2}  # seq 2 and 3
    _, text, _ = await flowbus(settings, "inspect", "session", "call-1")
    assert "PAUSED at seq 2" in text
    [group] = await as_json(settings, "inspect", "groups")
    assert {k: group[k] for k in ("name", "workers", "partitions_owned", "paused")} == {
        "name": "steps",
        "workers": 1,
        "partitions_owned": 64,
        "paused": 2,
    }
    assert group["dead_letters"] == 2
    # seq 3 is pending too if it was read ahead with seq 2 (then given back), else lagging
    assert group["pending"] >= 2 and group["pending"] + group["lag"] == 4
    detail = await as_json(settings, "inspect", "session", "call-1")
    [steps] = detail["groups"]
    assert steps["paused_entry"] == letters["call-1"]["entry"]
    assert [x["id"] for x in steps["pending"] if x["deliveries"]] == [letters["call-1"]["entry"]]
    assert [e["progress"]["steps"] for e in detail["events"]] == [
        "done",
        "dead",
        "waiting",
    ]  # paused on it

    await raw(bus).delete(broken_key(settings.prefix, "steps"))
    _, text, _ = await flowbus(settings, "dead", "replay", letters["call-1"]["ref"])
    assert "session call-1 resumed for steps" in text and "retried in place" in text
    _, text, _ = await flowbus(settings, "dead", "drop", letters["call-2"]["ref"])
    assert "dropped; session call-2 goes on for steps" in text
    await wait_for(lambda: _is(records(bus), 5), what="both sessions to go on")
    handled = await records(bus)
    assert [r[1] for r in handled if r[0] == "call-1"] == [1, 2, 3]  # in place, in order
    assert [r[1] for r in handled if r[0] == "call-2"] == [1, 3]  # dropped
    assert await as_json(settings, "dead", "list") == []


async def test_an_ended_sessions_dead_letter_cannot_be_replayed_and_says_so(
    bus: Bus, settings: Settings, workers: WorkerProcesses
) -> None:
    settings = make_settings(settings.url, prefix=settings.prefix, max_deliveries=1)
    await start(bus, settings, workers)
    await raw(bus).set(broken_key(settings.prefix, "steps"), 1)
    await publish_steps(bus, "call-9", failing=2, last_final=True)
    await wait_for(lambda: _equal(dead_count(bus), 1), what="the dead letter")
    [letter] = await as_json(settings, "dead", "list")
    status, _, err = await flowbus(settings, "dead", "replay", "--all", check=False)
    assert status == 1
    assert "session call-9 has ended and takes no new event" in err
    assert f"flowbus dead drop {letter['ref']}" in err
    await flowbus(settings, "dead", "drop", "--all", "--session", "call-9")
    assert await dead_count(bus) == 0


async def test_owners_and_workers_show_who_holds_what(
    bus: Bus, settings: Settings, workers: WorkerProcesses
) -> None:
    await start(bus, settings, workers)
    owners = await as_json(settings, "inspect", "owners", "--group", "steps")
    assert sorted(o["partition"] for o in owners) == list(range(64))
    [worker] = {o["worker"] for o in owners}
    [member] = await as_json(settings, "inspect", "workers")
    assert (member["group"], member["worker"], member["partitions"]) == ("steps", worker, 64)
    _, text, _ = await flowbus(settings, "inspect", "owners")
    assert "steps: 64 of 64 partitions owned" in text and worker in text


async def test_inspect_that_finds_nothing_says_where_it_looked(settings: Settings) -> None:
    """An empty listing is often the wrong server or prefix (a URL not exported)."""
    where = f"flowbus: none on {settings.redacted_url} under the prefix {settings.prefix!r}\n"
    for what, says in [("sessions", "no sessions\n"), ("groups", "no services registered\n")]:
        _, out, err = await flowbus(settings, "inspect", what)
        assert (out, err) == (says, where)


async def test_inspect_refuses_an_unknown_session_and_dead_an_unknown_letter(
    settings: Settings,
) -> None:
    status, _, err = await flowbus(settings, "inspect", "session", "call-0", check=False)
    where = f"on {settings.redacted_url} under the prefix {settings.prefix!r}"
    assert status == 1 and f"no session 'call-0' {where} (never started" in err
    status, _, err = await flowbus(settings, "dead", "show", "3/1-0", check=False)
    assert status == 1 and "no dead letter 3/1-0" in err
    status, _, err = await flowbus(settings, "dead", "replay", check=False)
    assert status == 2 and "name dead letters (P/ID ...) or give --all" in err
    status, _, err = await flowbus(settings, "dead", "replay", "3/1-0", "--all", check=False)
    assert status == 2 and "or give --all, not both" in err
    status, _, err = await flowbus(settings, "dead", "show", "99/1-0", check=False)
    assert status == 2 and "there are only 64 partitions" in err
    status, _, err = await flowbus(settings, "dead", "list", "--session", "a\nb", check=False)
    assert status == 2 and "control characters" in err
    status, _, err = await flowbus(settings, "dead", "drop", "--all", "--session", "", check=False)
    assert status == 2 and "invalid session id '': it is empty" in err  # not "no dead letters"
    status, _, err = await flowbus(settings, "inspect", "owners", "--group", "nosuch", check=False)
    assert status == 1 and "no service 'nosuch'" in err


async def test_dead_names_one_letter_each_an_id_in_two_partitions_wants_its_partition(
    bus: Bus, settings: Settings
) -> None:
    letter = {"session": "call-1", "group": "steps", "entry": "1-0", "deliveries": "5"}
    letter |= {"error": "boom", "policy": "skip", "type": "step", "seq": "1", "ts": "1"}
    for p in (3, 5):  # dead-letter stream ids are per partition: the same id in two of them
        await raw(bus).xadd(bus.keys.dead(p), letter, id="1700000000000-0")
    status, _, err = await flowbus(settings, "dead", "show", "1700000000000-0", check=False)
    assert status == 2
    assert "names 2 dead letters (3/1700000000000-0, 5/1700000000000-0): give P/ID" in err
    status, _, err = await flowbus(settings, "dead", "show", "1700000000000", check=False)
    assert status == 2 and "'1700000000000' is not a dead letter's name (P/ID" in err
    await raw(bus).xadd(bus.keys.dead(40), letter, id="1600000000000-0")  # older, later P
    [oldest] = await as_json(settings, "dead", "list", "--limit", "1")
    assert oldest["ref"] == "40/1600000000000-0"
    await raw(bus).delete(bus.keys.dead(40))
    ref = "3/1700000000000-0"
    _, out, _ = await flowbus(settings, "dead", "drop", ref, ref)
    assert out.splitlines() == [f"{ref}: dropped"]  # named twice, dropped once
    [left] = await as_json(settings, "dead", "list")
    assert left["ref"] == "5/1700000000000-0"


async def test_inspect_lists_no_session_whose_keys_expired_and_every_pending_entry(
    bus: Bus, settings: Settings
) -> None:
    await bus.publish("call-new", Step(n=1), final=True)  # no service: it retires at once
    p = bus.keys.partition("call-gone")
    await raw(bus).zadd(bus.keys.ended(p), {"call-gone": 1})  # its keys expired long ago
    rows = await as_json(settings, "inspect", "sessions")
    assert [row["session"] for row in rows] == ["call-new"]
    # More entries pending than one page of XPENDING held (100): each still shown pending.
    await bus.register_service(ServiceInfo("slow"))
    for n in range(1, 152):
        await bus.publish("call-many", Step(n=n))
    stream = bus.keys.session("call-many")
    await raw(bus).xreadgroup("slow", "p0", {stream: ">"}, count=150)
    detail = await as_json(settings, "inspect", "session", "call-many")
    marks = [event["progress"]["slow"] for event in detail["events"]]
    assert marks == ["pending"] * 150 + ["waiting"]


async def test_inspect_session_reads_a_long_stream_a_page_at_a_time(
    bus: Bus, settings: Settings
) -> None:
    await bus.publish("call-long", Step(n=1))
    stream = bus.keys.session("call-long")
    pipe = raw(bus).pipeline(transaction=False)
    for n in range(2, 2501):
        data = json.dumps({"type": "step", "n": n})
        pipe.xadd(stream, {"type": "step", "seq": n, "ts": n, "data": data})
    await pipe.execute()
    await raw(bus).xgroup_create(stream, "late", id="0")  # by hand: none of it read
    await raw(bus).config_set("slowlog-log-slower-than", 0)  # every command, with its args
    await raw(bus).config_set("slowlog-max-len", 1000)
    await raw(bus).slowlog_reset()
    try:
        detail = await as_json(settings, "inspect", "session", "call-long", "--inbox")
        log = await raw(bus).slowlog_get(1000)
    finally:
        await raw(bus).config_set("slowlog-log-slower-than", 10_000)
    assert [e["seq"] for e in detail["events"]] == list(range(1, 2501))
    assert {g["name"]: g["lag"] for g in detail["groups"]} == {"late": 2500}
    reads = [
        e["command"].split()
        for e in log
        if e["command"].startswith(b"XRANGE " + stream.encode())  # the inbox's too
    ]
    assert len(reads) >= 3 + 1  # the stream's pages and the inbox's
    # No command read more than a page (an unbounded one would hold the server up).
    assert all(r[-2:-1] == [b"COUNT"] and int(r[-1]) <= 1000 for r in reads), reads


async def test_inspect_sessions_says_how_many_its_limit_left_out(
    bus: Bus, settings: Settings
) -> None:
    for session in ("call-1", "call-2", "call-3"):
        await bus.publish(session, Step(n=1))
    _, out, err = await flowbus(settings, "inspect", "sessions", "--limit", "2")
    assert len(out.splitlines()) == 1 + 2  # the header, two sessions
    assert "flowbus: 1 more sessions not shown (--limit N shows more)" in err
    _, out, err = await flowbus(settings, "inspect", "sessions", "--limit", "2", "--json")
    assert len(json.loads(out)) == 2 and "1 more sessions not shown" in err
    _, out, err = await flowbus(settings, "inspect", "sessions", "--limit", "3")
    assert len(out.splitlines()) == 1 + 3 and "more sessions" not in err


async def test_inspect_counts_the_lag_the_server_leaves_unknown_after_an_entry_deleted_by_hand(
    bus: Bus, settings: Settings
) -> None:
    await bus.register_service(ServiceInfo("slow"))  # no worker of it runs
    for n in (1, 2, 3, 4):
        await bus.publish("call-1", Step(n=n))
    stream = bus.keys.session("call-1")
    await raw(bus).xreadgroup("slow", "p0", {stream: ">"}, count=1)
    [(last, _)] = await raw(bus).xrevrange(stream, count=1)
    await raw(bus).xdel(stream, last)  # by hand, after the group's position
    assert (await raw(bus).xinfo_groups(stream))[0]["lag"] is None  # the server cannot tell
    [row] = await as_json(settings, "inspect", "sessions")
    assert row["behind"] == {"slow": 3}  # seq 1 pending, 2 and 3 not read
    [group] = (await as_json(settings, "inspect", "session", "call-1"))["groups"]
    assert (group["lag"], len(group["pending"])) == (2, 1)
    _, text, _ = await flowbus(settings, "inspect", "session", "call-1")
    assert "slow: read up to seq 1, lag 2, pending 1" in text
    [service] = await as_json(settings, "inspect", "groups")
    assert (service["lag"], service["pending"]) == (2, 1)
    [(first, _)] = await raw(bus).xrange(stream, count=1)
    await raw(bus).xdel(stream, first)  # the entry the group read last
    _, text, _ = await flowbus(settings, "inspect", "session", "call-1")
    assert f"slow: read up to entry {first.decode()} (no longer in the stream)" in text, text
    partition = bus.keys.partition("call-1")
    assert await lag_of(bus, "slow", [partition]) == 3  # the metrics' flowbus_lag_events


async def test_inspect_session_shows_a_malformed_entry_as_it_is_with_what_is_wrong(
    bus: Bus, settings: Settings
) -> None:
    await bus.publish("call-1", Step(n=1))
    stream = bus.keys.session("call-1")
    await raw(bus).xadd(stream, {"type": "step", "seq": "x", "data": "{}"})  # by hand
    _, text, _ = await flowbus(settings, "inspect", "session", "call-1")
    [row] = [line for line in text.splitlines() if "(malformed)" in line]
    assert row.split()[:3] == ["0", "-", "(malformed)"], row  # no time from a start of 0
    assert "seq" in row and '"type":"step"' in row, row  # what is wrong, and its own fields


async def test_dead_replay_all_goes_on_past_a_letter_too_large_to_replay_but_not_in_its_session(
    bus: Bus, settings: Settings
) -> None:
    big = json.dumps({"type": "step", "n": 1, "pad": "x" * (bus.settings.max_payload_bytes - 50)})
    small = '{"type": "step", "n": 2}'
    letters = [("call-big", 1, big), ("call-big", 2, small), ("call-ok", 1, small)]
    for session, seq, data in letters:
        await bus.publish(session, Step(n=seq))
        letter = {"session": session, "group": "steps", "entry": f"{seq}-0", "deliveries": "5"}
        letter |= {"error": "boom", "policy": "skip", "type": "step", "seq": str(seq), "ts": "1"}
        await raw(bus).xadd(bus.keys.dead(bus.keys.partition(session)), {**letter, "data": data})
    status, out, err = await flowbus(settings, "dead", "replay", "--all", check=False)
    assert status == 1 and "cannot be replayed" in err and "flowbus dead drop" in err
    assert "of session call-ok replayed for steps" in out
    # call-big's seq 2 would be handled before its seq 1: it waits
    assert "of session call-big" not in out
    assert "not replayed, to keep session call-big's order for steps" in err
    assert [e.type for e in await bus.history("call-big")] == ["step", "step"]
    assert len(await as_json(settings, "dead", "list", "--session", "call-big")) == 2


async def a_dead_letter(bus: Bus, session: str, *, paused: bool) -> None:
    """A dead letter of group steps for the session's one event, as a worker leaves it: with
    policy skip (the entry acknowledged), or pause (the session paused on the entry)."""
    await bus.register_service(ServiceInfo("steps"))
    await bus.publish(session, Step(n=1))
    p, stream = bus.keys.partition(session), bus.keys.session(session)
    [(_, [(entry, fields)])] = await raw(bus).xreadgroup("steps", f"p{p}", {stream: ">"}, count=1)
    letter = {"session": session, "group": "steps", "entry": entry, "deliveries": 5}
    letter |= {"error": "RuntimeError: boom", "policy": "pause" if paused else "skip", **fields}
    if paused:
        await raw(bus).hset(bus.keys.paused(p, "steps"), session, entry)
    else:
        await raw(bus).xack(stream, "steps", entry)
    await raw(bus).xadd(bus.keys.dead(p), letter)


class Interrupted(Exception):
    """Ctrl-C, or a connection lost for good, as the server has just run the script."""


@pytest.mark.parametrize("paused", [False, True], ids=["skipped", "paused"])
async def test_a_replay_cut_short_after_the_server_ran_it_and_run_again_hands_it_back_once(
    bus: Bus, settings: Settings, monkeypatch: pytest.MonkeyPatch, paused: bool
) -> None:
    await a_dead_letter(bus, "call-1", paused=paused)
    name = "RESUME" if paused else "PUBLISH"
    real = getattr(scripts, name)

    async def cut_short(*args: Any) -> Any:
        await real(*args)
        raise Interrupted

    monkeypatch.setattr(scripts, name, cut_short)
    [letter] = await list_dead(bus)
    assert letter.paused is paused
    with pytest.raises(Interrupted):  # a Bus without a publisher calls `scripts.PUBLISH`
        await replay(Bus(bus.redis, bus.settings), letter)
    monkeypatch.undo()

    _, out, _ = await flowbus(settings, "dead", "replay", "--all")  # the operator runs it again
    assert out == "no dead letters\n"
    history = [e.type for e in await bus.history("call-1")]
    assert history == (["step"] if paused else ["step", "flowbus.replay"])
    if paused:  # retried in place, once
        stream = bus.keys.session("call-1")
        [pending] = await raw(bus).xpending_range(stream, "steps", "-", "+", 10)
        assert pending["times_delivered"] == 0


@pytest.mark.parametrize("paused", [False, True], ids=["skipped", "paused"])
async def test_a_dead_letter_replayed_by_another_meanwhile_is_not_replayed_again(
    bus: Bus, paused: bool
) -> None:
    await a_dead_letter(bus, "call-1", paused=paused)
    [letter] = await list_dead(bus)
    await replay(bus, letter)  # another operator's, between our list and our replay
    meanwhile = "it was resumed already" if paused else "replayed or dropped meanwhile"
    with pytest.raises(DeadLetterError, match=meanwhile):
        await replay(bus, letter)
    history = [e.type for e in await bus.history("call-1")]
    assert history == (["step"] if paused else ["step", "flowbus.replay"])
    assert await list_dead(bus) == []


async def test_a_dead_letter_its_session_was_resumed_on_is_not_handed_over_again(
    bus: Bus, settings: Settings
) -> None:
    """A letter its pause did not note (from before flowbus noted them; made by hand here),
    past the letters `Bus.resume` looks for it among, stays: its entry was retried in place,
    so a replay would make the group handle the event twice."""
    await a_dead_letter(bus, "call-1", paused=True)
    dead = bus.keys.dead(bus.keys.partition("call-1"))
    [(first, fields)] = await raw(bus).xrange(dead)
    await raw(bus).xdel(dead, first)  # written again after 100 others (then gone):
    others = [await raw(bus).xadd(dead, {"session": "call-0"}) for _ in range(100)]
    await raw(bus).xadd(dead, fields)
    assert await bus.resume("call-1", "steps") is not None
    await raw(bus).xdel(dead, *others)
    [letter] = await as_json(settings, "dead", "list")
    assert (letter["paused"], letter["policy"]) == (False, "pause")
    status, out, err = await flowbus(settings, "dead", "replay", "--all", check=False)
    assert status == 1 and out == ""
    assert f"{letter['ref']}: session call-1 is no longer paused on it for steps" in err
    assert f"flowbus dead drop {letter['ref']} removes the dead letter" in err
    assert [e.type for e in await bus.history("call-1")] == ["step"]  # nothing republished
    _, out, _ = await flowbus(settings, "dead", "drop", letter["ref"])
    assert out == f"{letter['ref']}: dropped\n"


async def test_a_dead_letter_that_holds_no_event_is_not_replayed(
    bus: Bus, settings: Settings
) -> None:
    """The consumer dead-letters an entry deleted from the stream before it was handled with
    no original fields: there is nothing to hand back (a replay of it fails in every worker)."""
    await bus.publish("call-1", Step(n=1))
    error = "the entry was deleted from the stream before it was handled"
    letter = {"session": "call-1", "group": "steps", "entry": "1-0", "deliveries": "1"}
    letter |= {"error": error, "policy": "skip"}
    await raw(bus).xadd(bus.keys.dead(bus.keys.partition("call-1")), letter)
    status, out, err = await flowbus(settings, "dead", "replay", "--all", check=False)
    assert status == 1 and out == ""
    assert f"holds no event to replay ({error}); drop it (flowbus dead drop " in err
    assert [e.type for e in await bus.history("call-1")] == ["step"]
    assert len(await as_json(settings, "dead", "list")) == 1


@pytest.mark.parametrize("app", ["stuck", "stuck_in_thread"])
async def test_a_worker_stopped_hard_by_a_second_signal_says_so_in_its_status(
    bus: Bus, settings: Settings, workers: WorkerProcesses, app: str
) -> None:
    """A handler stuck in a thread cannot be cancelled: the process exits all the same."""
    proc = workers.start(f"tests.workers.apps:{app}", settings)

    async def owned() -> bool:
        return all([await raw(bus).get(bus.keys.lease(p, "stuck")) for p in range(64)])

    await wait_for(owned, what="the worker to own every partition")
    await bus.publish("call-1", Step(n=1))
    await wait_for(lambda: _equal(raw(bus).llen(records_key(settings.prefix, "stuck")), 1))
    proc.send_signal(signal.SIGTERM)  # drains: waits for the stuck handler
    await wait_for(lambda: "worker_draining" in workers.log(proc), what="the drain")
    proc.send_signal(signal.SIGTERM)  # stops at once
    assert proc.wait(30) == 128 + signal.SIGTERM  # not 0: it did not drain
    assert "worker_stopped_hard" in workers.log(proc)


async def _is(records: Any, n: int) -> bool:
    return len(await records) == n


async def _equal(value: Any, n: int) -> bool:
    return bool(await value == n)


async def _settled(bus: Bus, session: str, seq: int) -> bool:
    groups = await raw(bus).xinfo_groups(bus.keys.session(session))
    return all(g["entries-read"] == seq and g["pending"] == 0 for g in groups)


async def test_the_acl_rule_the_readme_gives_is_enough_for_a_worker_and_the_cli(
    bus: Bus, settings: Settings, workers: WorkerProcesses
) -> None:
    rule = "~flowbus:* &flowbus:* +@read +@write +@scripting +@pubsub +@connection +info +time"
    assert f"ACL SETUSER app on >secret {rule}" in (ROOT / "README.md").read_text()
    user = f"app{settings.prefix}"
    await raw(bus).execute_command(
        "ACL", "SETUSER", user, "on", ">secret", *rule.replace("flowbus", settings.prefix).split()
    )
    try:
        host = settings.url.removeprefix("redis://")
        limited = make_settings(f"redis://{user}:secret@{host}", prefix=settings.prefix)
        await start(bus, limited, workers)
        await publish_steps(bus, "call-1", failing=0)
        await wait_for(lambda: _is(records(bus), 3), what="the limited user's worker to handle")
        [group] = await as_json(limited, "inspect", "groups")
        assert (group["name"], group["workers"]) == ("steps", 1)
        assert await as_json(limited, "dead", "list") == []
    finally:
        await raw(bus).execute_command("ACL", "DELUSER", user)


async def test_end_ends_named_sessions_and_those_idle_for_long(
    bus: Bus, settings: Settings
) -> None:
    for session in ("call-old", "call-new"):
        await bus.publish(session, Step(n=1))
    await raw(bus).hset(bus.keys.meta("call-old"), "publish_entry", "1000-0")  # long ago

    _, out, _ = await flowbus(settings, "end", "--idle-for", "3600", "--dry-run")
    assert re.fullmatch(r"call-old: would end \(idle \d+h\)\n", out)
    assert [s["status"] for s in await as_json(settings, "inspect", "sessions")] == [
        "live",
        "live",
    ]
    _, out, err = await flowbus(settings, "end", "--idle-for", "3600")
    assert out.startswith("call-old: ended and retired") and "1 ended" in err
    code, out, err = await flowbus(settings, "end", "call-new", "call-gone", check=False)
    assert code == 1 and out.startswith("call-new: ended and retired")
    assert "no session 'call-gone'" in err
    rows = await as_json(settings, "inspect", "sessions")
    assert sorted((r["session"], r["status"]) for r in rows) == [
        ("call-new", "ended"),
        ("call-old", "ended"),
    ]
    code, _, err = await flowbus(settings, "end", check=False)
    assert code == 2 and "name sessions or give --idle-for SECONDS\n" in err  # not "not both"
    code, _, err = await flowbus(settings, "end", "call-new", "--idle-for", "1", check=False)
    assert code == 2 and "name sessions or give --idle-for SECONDS, not both" in err


def losing_a_connection(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[bool]:
    """`module.name` (a reader) loses its connection the first time; the list says it did."""
    real, lost = getattr(module, name), list[bool]()

    async def losing_one(*args: Any, **kwargs: Any) -> Any:
        if not lost:
            lost.append(True)
            raise RedisConnectionError("Connection closed by server.")
        return await real(*args, **kwargs)

    monkeypatch.setattr(module, name, losing_one)
    return lost


async def test_inspect_and_dead_read_again_after_a_lost_connection(
    bus: Bus, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A connection lost during ``flowbus inspect``'s or ``dead``'s reads (a restart, a
    failover: when an operator looks) is read again, as the bus's own calls are, not the
    command's end."""
    await bus.register_service(ServiceInfo("svc"))
    lost = losing_a_connection(monkeypatch, inspection, "groups")
    assert await commands.inspect(bus, parser().parse_args(["inspect", "groups", "--json"])) == 0
    assert [g["name"] for g in json.loads(capsys.readouterr().out)] == ["svc"] and lost
    lost = losing_a_connection(monkeypatch, deadletters, "list_dead")
    assert await commands.dead(bus, parser().parse_args(["dead", "list", "--json"])) == 0
    assert json.loads(capsys.readouterr().out) == [] and lost


async def test_dead_replay_and_drop_go_on_through_a_lost_connection_and_act_once(
    bus: Bus, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A connection lost during ``dead replay`` (its check that the session is there, then
    the reply of its publish, which the server ran) or ``dead drop`` is sent again: the event
    is handed back once, the letters are gone."""
    for session in ("call-1", "call-2"):
        await a_dead_letter(bus, session, paused=False)
    by_session = {letter.session: letter.ref for letter in await list_dead(bus)}
    checked = losing_a_connection(monkeypatch, bus.redis, "exists")
    published, real = list[bool](), scripts.PUBLISH

    async def reply_lost(*args: Any) -> Any:
        reply = await real(*args)
        if not published:
            published.append(True)
            raise RedisConnectionError("Connection closed by server.")
        return reply

    monkeypatch.setattr(scripts, "PUBLISH", reply_lost)
    replaying = parser().parse_args(["dead", "replay", by_session["call-1"]])
    assert await commands.dead(Bus(bus.redis, bus.settings), replaying) == 0  # PUBLISH, as above
    assert "replayed for steps as seq 2" in capsys.readouterr().out and checked and published
    removed = losing_a_connection(monkeypatch, bus.redis, "xdel")
    dropping = parser().parse_args(["dead", "drop", by_session["call-2"]])
    assert await commands.dead(bus, dropping) == 0
    assert capsys.readouterr().out == f"{by_session['call-2']}: dropped\n" and removed
    monkeypatch.undo()
    assert await list_dead(bus) == []
    assert [e.type for e in await bus.history("call-1")] == ["step", "flowbus.replay"]


async def _ended(bus: Bus, session: str) -> bool:
    return await end_states(bus, [session]) == ["ended"]


async def test_end_every_ends_the_sessions_that_go_idle_until_it_is_stopped(
    bus: Bus, settings: Settings
) -> None:
    """``end --idle-for S --every E`` runs as a service: each round ends the sessions idle that
    long (the second session is published once the first was ended: a later round ends it),
    and SIGTERM stops it, status 0."""
    env = {**os.environ, **settings_env(settings)}
    command = [sys.executable, "-m", "workers", "end", "--idle-for", "0", "--every", "0.1"]
    async with await anyio.open_process(command, cwd=ROOT, env=env) as sweeper:
        for session in ("call-1", "call-2"):
            await bus.publish(session, Step(n=1))
            await wait_for(partial(_ended, bus, session), what=f"{session} to end")
        sweeper.send_signal(signal.SIGTERM)
        with anyio.fail_after(10):
            code = await sweeper.wait()
        assert sweeper.stdout is not None and sweeper.stderr is not None
        out = b"".join([chunk async for chunk in sweeper.stdout]).decode()
        err = b"".join([chunk async for chunk in sweeper.stderr]).decode()
    assert code == 0, err
    assert [line.partition(":")[0] for line in out.splitlines()] == ["call-1", "call-2"]
    assert "call-2: ended and retired" in out
    assert err.startswith("flowbus: ending every session idle for 0 s, every 0.1 s")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["call-1", "--every", "5"], "--every repeats --idle-for"),
        (["--idle-for", "60", "--every", "5", "--dry-run"], "a --dry-run would say the same"),
        (["--idle-for", "60", "--every", "0"], "--every must be above 0 seconds, not 0.0"),
        (["--idle-for", "60", "--every", "nan"], "--every must be above 0 seconds, not nan"),
    ],
)
async def test_end_every_refuses_what_it_cannot_repeat(
    settings: Settings, args: list[str], says: str
) -> None:
    code, _, err = await flowbus(settings, "end", *args, check=False)
    assert code == 2 and says in err


async def test_end_every_logs_a_round_the_server_does_not_answer_and_goes_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(connection, "RETRY_SECONDS", 0.2)
    args = parser().parse_args(["end", "--idle-for", "0", "--every", "0.05"])
    with LocalServer(KIND) as server, capture_logs() as logs:
        async with Bus.connect(make_settings(server.url)) as bus, anyio.create_task_group() as tg:
            tg.start_soon(commands.end_every, bus, args)
            server.kill()
            await wait_for(
                lambda: any(e["event"] == "end_round_failed" for e in logs),
                what="a round that failed",
            )
            server.start()
            await bus.publish("call-1", Step(n=1))
            await wait_for(partial(_ended, bus, "call-1"), what="the session to end")
            tg.cancel_scope.cancel()
    [failed, *_] = [e for e in logs if e["event"] == "end_round_failed"]
    assert failed["error"].startswith("finding idle sessions failed after")
    assert capsys.readouterr().out.startswith("call-1: ended and retired")


async def test_end_dry_run_says_of_an_unknown_or_ended_session_what_the_run_would(
    bus: Bus, settings: Settings
) -> None:
    await bus.publish("call-live", Step(n=1))
    await bus.publish("call-done", Step(n=1), final=True)  # no service: it retires at once
    code, out, err = await flowbus(
        settings, "end", "call-live", "call-done", "call-gone", "--dry-run", check=False
    )
    where = f"on {settings.redacted_url} under the prefix {settings.prefix!r}"
    assert code == 1 and f"no session 'call-gone' {where} (never started, or its keys" in err
    assert "flowbus inspect sessions lists them" in err  # where to look for the right id
    assert out.splitlines() == [
        "call-live: would end",
        "call-done: had ended before (nothing changed)",
    ]
    rows = await as_json(settings, "inspect", "sessions")
    assert sorted((r["session"], r["status"]) for r in rows) == [
        ("call-done", "ended"),
        ("call-live", "live"),
    ]


async def test_a_session_its_bot_ended_shows_as_ending_until_every_service_handled_it(
    bus: Bus, settings: Settings
) -> None:
    await bus.register_service(ServiceInfo("audit"))  # no worker of it runs
    await bus.publish("call-1", Step(n=1), final=True)
    [row] = await as_json(settings, "inspect", "sessions")
    assert (row["status"], row["behind"]) == ("ending", {"audit": 1})
    assert [r["session"] for r in await as_json(settings, "inspect", "sessions", "--live")] == [
        "call-1"
    ]
    await bus.register_service(ServiceInfo("late"))  # after the session started: not its
    groups = await as_json(settings, "inspect", "groups")
    assert {g["name"]: g["live_sessions"] for g in groups} == {"audit": 1, "late": 0}


async def test_a_worker_whose_handler_is_stuck_in_a_thread_exits_after_its_drain_timeout(
    bus: Bus, settings: Settings, workers: WorkerProcesses
) -> None:
    proc = workers.start(
        "tests.workers.apps:stuck_in_thread", settings, {"FLOWBUS_DRAIN_TIMEOUT_SECONDS": "1"}
    )

    async def owned() -> bool:
        return all([await raw(bus).get(bus.keys.lease(p, "stuck")) for p in range(64)])

    await wait_for(owned, what="the worker to own every partition")
    await bus.publish("call-1", Step(n=1))
    await wait_for(lambda: _equal(raw(bus).llen(records_key(settings.prefix, "stuck")), 1))
    proc.send_signal(signal.SIGTERM)  # one signal: the drain gives up after its 1 s (+ 3 s)
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert "worker_exited_without_its_handlers" in workers.log(proc)


async def test_dead_letters_are_listed_and_counted_per_group_page_by_page(bus: Bus) -> None:
    expected: dict[str, int] = {}
    ids = []
    for p, letters in ((0, 5), (3, 4), (63, 1)):
        for i in range(letters):
            group = "a" if i % 2 else "b"
            expected[group] = expected.get(group, 0) + 1
            entry = await raw(bus).xadd(bus.keys.dead(p), {"session": f"s{i}", "group": group})
            ids.append(f"{p}/{entry.decode()}")
    for page in (1, 2, 4, 2000):
        assert await count_dead(bus, page=page) == expected
        assert [d.ref for d in await list_dead(bus, page=page)] == ids  # by partition, then age
    assert [d.ref for d in await list_dead(bus, group="a", page=1)] == [
        i for i, n in zip(ids, [0, 1, 0, 1, 0, 0, 1, 0, 1, 0], strict=True) if n
    ]


def _worker_logging_to_a_pipe(settings: Settings) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "workers", "worker", APP, "--log-level", "debug"],
        cwd=ROOT,
        env={**os.environ, **settings_env(settings)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def test_a_worker_whose_log_reader_went_away_goes_on_handling(
    bus: Bus, settings: Settings
) -> None:
    """A closed stderr (``flowbus worker ... 2>&1 | head``, a log shipper or journald that
    went away) loses the log lines, not the worker: no handling fails for its log line, and
    the worker neither dies nor exits 0 as if it had been stopped."""
    proc = _worker_logging_to_a_pipe(settings)
    try:
        assert proc.stderr is not None

        async def owned() -> bool:
            return all([await raw(bus).get(bus.keys.lease(p, "steps")) for p in range(64)])

        await wait_for(owned, what="the worker to own every partition")
        proc.stderr.close()  # its next log line meets EPIPE
        await publish_steps(bus, "call-9", failing=0)
        await wait_for(lambda: _is(records(bus), 3), what="the three steps handled")
        await wait_for(lambda: _settled(bus, "call-9", 3), what="the steps acknowledged")
        assert await dead_count(bus) == 0
        assert proc.poll() is None, proc.returncode  # still serving
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
