"""The server-side scripts, loaded once per connection pool and called by SHA.

A script missing from the server's cache (after a restart or ``SCRIPT FLUSH``) is loaded again
and the call retried, so callers of a `Script` and of `call_many` never see ``NOSCRIPT``;
`call_on` loads them again but leaves the retry to its caller.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, ResponseError

Arg = str | bytes | int | float


def _source(name: str) -> str:
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text()


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str, *, prelude: bool = False) -> Script:
        body = _source(name)
        source = _source("prelude") + "\n" + body if prelude else body
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())

    async def __call__(self, redis: Redis, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await redis.script_load(self.source)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)


PUBLISH = Script.load("publish", prelude=True)
STEP = Script.load("step", prelude=True)
ACQUIRE = Script.load("acquire")
RENEW = Script.load("renew")
RELEASE = Script.load("release")
HEARTBEAT = Script.load("heartbeat")
SEND = Script.load("send")
RESUME = Script.load("resume")
SAVE_STATE = Script.load("save_state")
WRITE_STATE = Script.load("write_state")
END = Script.load("end", prelude=True)
NOW = Script.load("now")
ALL = (
    PUBLISH,
    STEP,
    ACQUIRE,
    RENEW,
    RELEASE,
    HEARTBEAT,
    SEND,
    RESUME,
    SAVE_STATE,
    WRITE_STATE,
    END,
    NOW,
)


#: The commands that put every script in the server's cache.
LOAD_ALL: list[tuple[Arg, ...]] = [("SCRIPT", "LOAD", script.source) for script in ALL]


async def load_all(redis: Redis) -> None:
    """Put every script in the server's cache (one round trip); in a cluster, in every
    primary's (`SCRIPT LOAD` goes to all of them)."""
    if isinstance(redis, RedisCluster):
        for script in ALL:
            await redis.script_load(script.source)
        return
    pipe = redis.pipeline(transaction=False)
    for command in LOAD_ALL:
        pipe.execute_command(*command)
    await pipe.execute()


Call = tuple[Script, Sequence[str], Sequence[Arg]]


async def call_many(redis: Redis, calls: Sequence[Call]) -> list[Any]:
    """Run script calls in one pipeline (one round trip); each error reply is returned in place
    of its result. Connection errors raise.
    """
    results = await _pipeline(redis, calls)
    missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
    if missing:  # the server lost its script cache (restart, SCRIPT FLUSH)
        await load_all(redis)
        for i, result in zip(
            missing, await _pipeline(redis, [calls[i] for i in missing]), strict=True
        ):
            results[i] = result
    return results


async def _pipeline(redis: Redis, calls: Sequence[Call]) -> list[Any]:
    pipe = redis.pipeline(transaction=False)
    for call in calls:
        pipe.execute_command(*evalsha(call))
    return await pipe.execute(raise_on_error=False)


async def call_on(connection: AbstractConnection, commands: list[tuple[Arg, ...]]) -> list[Any]:
    """Send `commands` (script calls made by `evalsha`, and others) on one connection of the
    caller's own: one write, then the replies, each error in its place, without a client's
    pipeline around them (a good share of a round trip's cost in Python). If the server lost
    its scripts they are loaded again, but the calls that failed are not sent again: the
    commands after them have run, so the caller decides."""
    results, lost_scripts = await _exchange(connection, commands)
    if lost_scripts:
        await _exchange(connection, LOAD_ALL)
    return results


def evalsha(call: Call) -> tuple[Arg, ...]:
    """The command that makes `call`."""
    script, keys, args = call
    return ("EVALSHA", script.sha, len(keys), *keys, *args)


#: One command in the Redis protocol, written by hiredis in C: under a third of the cost of
#: writing it in Python. (Its type stub wants a tuple of one argument.)
_pack: Any = hiredis.pack_command


async def _exchange(
    connection: AbstractConnection, commands: list[tuple[Arg, ...]]
) -> tuple[list[Any], bool]:
    """The replies of `commands`, and whether a script call found its script gone."""
    packed = b"".join(map(_pack, commands))
    await connection.send_packed_command(packed, check_health=False)
    replies: list[Any] = []
    lost_scripts = False
    for _ in commands:
        try:
            replies.append(await connection.read_response())
        except ResponseError as exc:
            replies.append(exc)
            lost_scripts = lost_scripts or isinstance(exc, NoScriptError)
    return replies, lost_scripts
