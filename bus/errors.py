"""Errors raised by the bus.

Every error the bus raises derives from `BusError`; Redis errors are translated here, at the
boundary, so callers never need to import `redis`::

    BusError
    ├── ConfigError              bad settings (URL, prefix, partitions, limits)
    ├── ConnectionFailedError    the server cannot be reached, or refused our credentials
    │   └── NotPermittedError    an ACL user lacking a command the bus needs
    ├── InvalidSessionIdError    a session id the key layout cannot carry
    ├── InvalidExtraError        an `extra` field the envelope does not carry
    ├── PayloadTooLargeError     an encoded payload above the configured limit
    ├── SessionEndedError        publishing to a session after its final event
    ├── NoSuchSessionError       writing to the inbox or state of a session that never
    │                            started (or expired)
    ├── DeadLetterGoneError      replaying a dead letter that was replayed or dropped already
    ├── FencedError              a stale owner's ack, read or state write, refused by the
    │                            lease check
    └── CommandRefusedError      the server refused a command (out of memory, a read-only
                                 replica, a missing permission)

Errors carry what a person needs to act: the session, the stream key, the group.
"""

from __future__ import annotations


class BusError(Exception):
    """Base class of every error raised by `bus`."""


class ConfigError(BusError):
    """A setting is invalid; the message names it and the accepted values."""


class ConnectionFailedError(BusError):
    """The server could not be reached or refused the connection.

    `url` is the server address with any password removed.
    """

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(f"{message} (server {url})")
        self.url = url


class ServerUnreachableError(ConnectionFailedError):
    """No server answered at the address, after every attempt."""


class NotPermittedError(ConnectionFailedError):
    """The server refused our user a command the bus needs; `reason` is its message."""

    def __init__(self, reason: str, *, url: str) -> None:
        super().__init__(f"not permitted: {reason}", url=url)
        self.reason = reason


class InvalidSessionIdError(BusError, ValueError):
    """The session id is empty, too long, contains whitespace, control characters or braces,
    or ends in the suffix of a session's key (``:inbox``, ``:meta``, ``:state``, ``:sent``)."""

    def __init__(self, session: str, reason: str) -> None:
        super().__init__(f"invalid session id {session!r}: {reason}")
        self.session = session


class InvalidExtraError(BusError, ValueError):
    """An `extra` envelope field that is not one of the optional ones (``v``, ``traceparent``,
    ``reply_to``, ``corr``), or whose value is not a string."""

    def __init__(self, field: object, reason: str) -> None:
        super().__init__(f"invalid extra field {field!r}: {reason}")
        self.field = field


class PayloadTooLargeError(BusError, ValueError):
    """An encoded payload exceeds `Settings.max_payload_bytes`."""

    def __init__(self, session: str, type_: str, size: int, limit: int) -> None:
        super().__init__(
            f"payload of {type_!r} for session {session!r} is {size} bytes; the limit is {limit}"
        )
        self.session, self.type, self.size, self.limit = session, type_, size, limit


class SessionEndedError(BusError):
    """The session already published its final event; nothing may follow it."""

    def __init__(self, session: str, stream: str) -> None:
        super().__init__(f"session {session!r} has ended; stream {stream} takes no more events")
        self.session, self.stream = session, stream


class NoSuchSessionError(BusError):
    """The session has never published an event (or its keys have expired)."""

    def __init__(self, session: str) -> None:
        super().__init__(f"session {session!r} does not exist (never started, or expired)")
        self.session = session


class DeadLetterGoneError(BusError):
    """A publish that replays a dead letter found it gone: replayed or dropped already."""

    def __init__(self, session: str, stream: str, dead_letter: str) -> None:
        super().__init__(
            f"dead letter {dead_letter} of session {session!r} is no longer in {stream} "
            "(replayed or dropped already): nothing was published"
        )
        self.session, self.stream, self.dead_letter = session, stream, dead_letter


class FencedError(BusError):
    """This worker no longer holds the partition's lease; its write was refused."""

    def __init__(self, group: str, partition: int, stream: str) -> None:
        super().__init__(
            f"group {group!r} lost partition {partition}: write to {stream} refused by the lease"
        )
        self.group, self.partition, self.stream = group, partition, stream


class LifespanError(BusError):
    """A service's `lifespan` failed to start (its error is the cause); its consumer did not
    join the group."""

    def __init__(self, service: str) -> None:
        super().__init__(f"the lifespan of service {service!r} failed to start")
        self.service = service


class CommandRefusedError(BusError):
    """The server refused a command of the bus: `reason` is its own message (``OOM …`` when
    it is out of memory, ``READONLY …`` from a replica, ``NOPERM …``)."""

    def __init__(self, command: str, reason: str, *, session: str | None = None) -> None:
        where = f" for session {session!r}" if session else ""
        super().__init__(f"the server refused {command}{where}: {reason}")
        self.command, self.reason, self.session = command, reason, session
