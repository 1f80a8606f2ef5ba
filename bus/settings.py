"""Connection and deployment settings, with their environment variables."""

from __future__ import annotations

import math
import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import Literal, get_args

import msgspec

from .errors import ConfigError

#: What a key prefix or a service (consumer group) name may look like.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

DeadLetterPolicy = Literal["skip", "pause"]
AckMode = Literal["each", "batch"]

#: The least value of each duration (seconds): the server takes milliseconds, and a worker
#: renews its leases five times per TTL.
_LEAST_SECONDS = {
    "retention_seconds": 0.001,
    "lease_ttl_seconds": 0.1,
    "handler_timeout_seconds": 0.001,
    "drain_timeout_seconds": 0.001,
    "replica_timeout_seconds": 0.001,
}
#: The most of each duration (seconds, about 31 years): the server's scripts take its
#: milliseconds as an integer, which a Lua number past 1e14 no longer prints as.
_MOST_SECONDS = 1e9


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a bus client or worker needs to know about its deployment.

    `url` may be ``redis://``, ``rediss://`` (TLS) or ``unix://``; an ACL user and password go
    in it (``redis://user:secret@host:6379/0``). `partitions` is fixed per deployment: changing
    it moves sessions to other keys.
    """

    url: str = "redis://127.0.0.1:6379/0"
    #: The server is a Redis (or Valkey) Cluster; `url` names any one of its nodes.
    cluster: bool = False
    prefix: str = "flowbus"
    partitions: int = 64
    #: How long a session's keys live after it ended and every group handled all of it.
    retention_seconds: float = 86_400.0
    max_payload_bytes: int = 64 * 1024
    #: A partition lease lapses this long after its owner's last renewal.
    lease_ttl_seconds: float = 5.0
    #: Deliveries of a failing event before it is dead-lettered (or its session paused).
    max_deliveries: int = 5
    retry_backoff_seconds: float = 0.1
    retry_backoff_max_seconds: float = 5.0
    dead_letter_policy: DeadLetterPolicy = "skip"
    #: A handler still running after this long counts as failed.
    handler_timeout_seconds: float = 60.0
    #: Handlers running at once in one worker process, over all its sessions.
    concurrency: int = 256
    #: Entries of one session read in one step; still handled one at a time, in order, each
    #: acknowledged once its handler returned.
    read_batch: int = 32
    #: When a handled entry's acknowledgement reaches the server. 'each': before the next
    #: entry of its session is handled (the ordering contract). 'batch': with the step after
    #: the last entry of its read batch, one step per batch instead of one per entry (about
    #: half again the events per second). Handlers still run one at a time, in order; but a
    #: crash or a lost lease can repeat up to `read_batch` handled entries of a session
    #: instead of one (a stale owner starts no more handlers than with 'each': none on a
    #: lease not renewed within its TTL).
    ack_mode: AckMode = "each"
    #: How long a stopping worker lets in-flight handlers finish.
    drain_timeout_seconds: float = 30.0
    #: Replicas that must hold a publish or inbox write before it returns (a ``WAIT`` after
    #: each batch; in a cluster, replicas of the primary that took it); 0: return once the
    #: primary has it.
    min_replicas: int = 0
    #: How long one ``WAIT`` lasts; a write that too few replicas confirmed is sent again (it
    #: is not appended twice) for as long as a lost connection would be.
    replica_timeout_seconds: float = 0.5

    def __post_init__(self) -> None:
        self._check_types()
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme in ("redis", "rediss") and "@" in parts.path + parts.query + parts.fragment:
            # A '/', '?' or '#' in the user or password ends the address early; redis-py
            # then reads part of the password as the port or the database, and says so.
            raise ConfigError(
                f"url {self.redacted_url!r}: a '/', '?', '#' or '@' in its user or password "
                "must be percent-encoded (%2F, %3F, %23, %40)"
            )
        database = parts.path.strip("/")
        if parts.scheme in ("redis", "rediss") and database and not database.isdigit():
            raise ConfigError(
                f"the database in url {self.redacted_url!r} must be a number, not {database!r}"
            )
        if self.cluster and parts.scheme == "unix":
            raise ConfigError(
                "a cluster is reached over TCP: url must be redis:// or rediss://, not unix://"
            )
        if self.cluster and database not in ("", "0"):
            raise ConfigError(
                f"a cluster has database 0 only; url {self.redacted_url!r} names {database!r}"
            )
        if not NAME_PATTERN.match(self.prefix):
            raise ConfigError(f"prefix {self.prefix!r} must match {NAME_PATTERN.pattern}")
        if not 1 <= self.partitions <= 16_384:
            raise ConfigError(f"partitions must be within 1..16384, not {self.partitions}")
        if self.max_deliveries < 1:
            raise ConfigError(f"max_deliveries must be at least 1, not {self.max_deliveries}")
        if self.dead_letter_policy not in ("skip", "pause"):
            raise ConfigError(
                f"dead_letter_policy must be 'skip' or 'pause', not {self.dead_letter_policy!r}"
            )
        if self.ack_mode not in ("each", "batch"):
            raise ConfigError(f"ack_mode must be 'each' or 'batch', not {self.ack_mode!r}")
        for name, least in _LEAST_SECONDS.items():
            if getattr(self, name) < least:
                raise ConfigError(f"{name} must be at least {least:g}, not {getattr(self, name)}")
            if getattr(self, name) > _MOST_SECONDS:
                raise ConfigError(
                    f"{name} must be at most {_MOST_SECONDS:g}, not {getattr(self, name)}"
                )
        for name in ("retry_backoff_seconds", "retry_backoff_max_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, not {getattr(self, name)}")
        for name in ("concurrency", "max_payload_bytes", "read_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.min_replicas < 0:
            raise ConfigError(f"min_replicas must be 0 or more, not {self.min_replicas}")

    def _check_types(self) -> None:
        """Each field of its type, a float finite (the struct does not check at construction)."""
        for field in msgspec.structs.fields(self):
            value, kind = getattr(self, field.name), field.type
            if kind is float:
                ok = type(value) in (int, float) and math.isfinite(value)
            else:  # a Literal's values are checked below
                ok = type(value) is (kind if kind in (int, bool) else str)
            if not ok:
                raise ConfigError(f"{field.name} must be {_wanted(kind)}, not {value!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read ``FLOWBUS_<FIELD>`` variables (e.g. ``FLOWBUS_REDIS_URL``, ``FLOWBUS_PREFIX``).

        Explicit keyword overrides win over the environment; `None` overrides are ignored,
        as are empty variables (``FLOWBUS_PREFIX=`` is the default prefix). Raises
        `ConfigError` for a value of the wrong type or out of range, naming the variable that
        holds it.
        """
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        variables: dict[str, str] = {}  # field -> the variable its value came from
        for field in msgspec.structs.fields(cls):
            name = VARIABLES[field.name]
            if env.get(name):
                try:
                    values[field.name] = msgspec.convert(env[name], field.type, strict=False)
                except msgspec.ValidationError:
                    wanted = _wanted(field.type)
                    raise ConfigError(f"{name}={env[name]!r}: must be {wanted}") from None
                variables[field.name] = name
        given = {k: v for k, v in overrides.items() if v is not None}
        values.update(given)
        try:
            return msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"invalid setting: {exc}") from None
        except ConfigError:
            # Name the variable when one is wrong on its own (the message has its value,
            # and a URL's password stays hidden).
            for field_name, name in variables.items():
                if field_name not in given:
                    try:
                        cls(**{field_name: values[field_name]})  # type: ignore[arg-type]  # its field's type, converted above
                    except ConfigError as exc:
                        raise ConfigError(f"{name}: {exc}") from None
            raise

    @property
    def redacted_url(self) -> str:
        """The URL with any password replaced by ``***``, for messages and logs."""
        # Up to the last '@': a password may hold one (redis-py reads it so).
        url = re.sub(r"(//[^:/@]*:).*@", r"\1***@", self.url)
        return re.sub(r"([?&]password=)[^&#]*", r"\1***", url)


#: The environment variable of each setting, by field: ``FLOWBUS_<FIELD>``, the URL's
#: ``FLOWBUS_REDIS_URL``.
VARIABLES = {
    f.name: "FLOWBUS_REDIS_URL" if f.name == "url" else f"FLOWBUS_{f.name.upper()}"
    for f in msgspec.structs.fields(Settings)
}


def _wanted(kind: object) -> str:
    """What a value of a field of type `kind` must be, in words."""
    if kind is float:
        return "a finite number"
    if kind is int:
        return "an integer"
    if kind is bool:
        return "true or false (or 1 or 0)"
    if kind is str:
        return "a string"
    return "one of " + ", ".join(repr(v) for v in get_args(kind))
