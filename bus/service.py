"""A service, as a consumer runs it: its name (= consumer group), handlers and lifespan; and a
consumer's counters."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .envelope import Codec, Delivery
from .errors import ConfigError
from .settings import NAME_PATTERN

Handler = Callable[[Delivery], Awaitable[None]]
#: What a service's handlers use while a consumer runs (`Service.lifespan`).
Lifespan = Callable[[], contextlib.AbstractAsyncContextManager[Any]]


@dataclass(frozen=True, slots=True)
class Service:
    """A service: its name (= consumer group), its handler and the payload types it knows.

    With `subscribes`, other types are acknowledged unseen (other services' business); without
    it, every type is handled and a type the codec does not know is dead-lettered. A type in
    `routes` goes to its handler there, every other one to `handle`.

    `lifespan`, a function of no arguments returning an async context manager (one made with
    `contextlib.asynccontextmanager`, say), holds what the handlers use for as long as a
    consumer runs: entered before it joins the group, left once it drained (its handlers done).
    A database pool opened there is closed when the worker stops, not left to the process's end.
    """

    name: str
    handle: Handler
    codec: Codec
    subscribes: frozenset[str] | None = None
    routes: Mapping[str, Handler] = field(default_factory=dict)
    lifespan: Lifespan | None = None

    def __post_init__(self) -> None:
        if not NAME_PATTERN.match(self.name):
            raise ConfigError(f"service name {self.name!r} must match {NAME_PATTERN.pattern}")
        if self.lifespan is not None and not callable(self.lifespan):
            raise ConfigError(
                f"lifespan of service {self.name!r} must be a function returning an async "
                f"context manager, not {self.lifespan!r}"
            )
        if self.subscribes is not None:  # any collection of type names, kept as a frozenset
            types = self.subscribes
            if isinstance(types, str) or not all(isinstance(t, str) for t in types):
                raise ConfigError(
                    f"subscribes of service {self.name!r} must be a collection of type names, "
                    f"not {types!r}"
                )
            object.__setattr__(self, "subscribes", frozenset(types))


@dataclass(slots=True)
class Stats:
    """Counters of one consumer, for logs, metrics and the demo."""

    handled: int = 0
    skipped: int = 0
    retries: int = 0
    dead_lettered: int = 0
    partitions_lost: int = 0
    #: Steps (acks, reads) that failed and were sent again: the server out of reach, or
    #: refusing them (a user's permissions changed, say). Their sessions wait meanwhile;
    #: nothing is lost.
    step_failures: int = 0


def vars_of(stats: Stats) -> dict[str, int]:
    return {f: getattr(stats, f) for f in stats.__dataclass_fields__}
