"""The server-side scripts, loaded once per connection pool and called by SHA.

A script missing from the server's cache (after a restart or ``SCRIPT FLUSH``) is loaded again
and the call retried, so callers never see ``NOSCRIPT``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

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
ALL = (PUBLISH, STEP, ACQUIRE, RENEW, RELEASE, HEARTBEAT, SEND, RESUME, SAVE_STATE, WRITE_STATE)


async def load_all(redis: Redis) -> None:
    """Put every script in the server's cache (one round trip)."""
    pipe = redis.pipeline(transaction=False)
    for script in ALL:
        pipe.script_load(script.source)
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
    for script, keys, args in calls:
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
    return await pipe.execute(raise_on_error=False)
