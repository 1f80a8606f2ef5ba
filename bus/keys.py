"""The key layout: every Redis key the bus touches is named here (its scripts derive the
names of a session's and a partition's other keys from the ones they are given); only the
sample services' journal (`workers.journal`) and the benchmarks' probe (`workers.probe`)
name lists of their own.

A session belongs to partition ``P = crc32(session) % partitions``. The keys of a session and
of its partition carry the hash tag ``{P}``, so each script touches a single cluster slot.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from .errors import InvalidSessionIdError

_BAD_SESSION_CHARS = re.compile(r"[\s{}\x00-\x1f\x7f]")
MAX_SESSION_ID = 200
#: A session's own keys are its stream's name and one of these: a session id ending in one
#: would name another session's key.
SESSION_KEY_SUFFIXES = (":inbox", ":meta", ":state", ":sent")


def check_session_id(session: str) -> str:
    """Return `session` unchanged, or raise `InvalidSessionIdError`."""
    if not isinstance(session, str):
        raise InvalidSessionIdError(session, "it must be a string")
    if not session:
        raise InvalidSessionIdError(session, "it is empty")
    if len(session) > MAX_SESSION_ID:
        raise InvalidSessionIdError(session, f"it is longer than {MAX_SESSION_ID} characters")
    if _BAD_SESSION_CHARS.search(session):
        raise InvalidSessionIdError(
            session, "whitespace, control characters and braces are not allowed"
        )
    if session.endswith(SESSION_KEY_SUFFIXES):
        raise InvalidSessionIdError(
            session, f"it may not end in {', '.join(SESSION_KEY_SUFFIXES)} (another's key)"
        )
    return session


def check_worker_id(worker: str) -> str:
    """Return `worker` unchanged, or raise `ValueError`: a worker id names a group member and is
    part of its lease tokens and fence keys, so it follows a session id's rules on characters."""
    if not worker:
        raise ValueError("invalid worker id: it is empty")
    if len(worker) > MAX_SESSION_ID:
        raise ValueError(f"invalid worker id: it is longer than {MAX_SESSION_ID} characters")
    if _BAD_SESSION_CHARS.search(worker):
        raise ValueError(
            f"invalid worker id {worker!r}: whitespace, control characters and braces are not "
            "allowed"
        )
    return worker


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names for one deployment (`prefix`, `partitions`)."""

    prefix: str = "flowbus"
    partitions: int = 64

    def partition(self, session: str) -> int:
        return zlib.crc32(session.encode()) % self.partitions

    def tag(self, partition: int) -> str:
        """The start of every key of the partition: ``<prefix>:{P}``, the cluster hash tag."""
        return f"{self.prefix}:{{{partition}}}"

    # -- one session ------------------------------------------------------------------------
    def session(self, session: str) -> str:
        """The session's event stream: its whole history, in order."""
        return f"{self.tag(self.partition(session))}:session:{session}"

    def inbox(self, session: str) -> str:
        """Commands and replies for the session's bot."""
        return f"{self.session(session)}:inbox"

    def meta(self, session: str) -> str:
        """Hash: ``seq`` (last event seq), ``inbox_seq``, ``started``, ``ended`` (ms),
        ``end_reason`` and ``end_request`` (a session ended by `Bus.end_session`),
        ``publish_entry``, the last publish's entry, ``publish_id`` and ``publish_reply`` (its
        seq and entry) of the last publish but a replay's and ``replay_id`` and
        ``replay_reply`` of the last replay's (so that the retry of either appends once),
        ``resume:<G>``, the last `Bus.resume` for group G (request and entry, so that its
        retry reports what it did), and ``paused_letter:<G>``, the dead letter G's pause is
        on (removed by the resume)."""
        return f"{self.session(session)}:meta"

    def state(self, session: str) -> str:
        """Hash of the session's state: ``group:<G>`` (a service's own, written fenced) and
        application fields (e.g. ``flow.<key>`` for the flow's shared state)."""
        return f"{self.session(session)}:state"

    def sent(self, session: str) -> str:
        """Hash of the inbox dedupe keys already written (to ``call seq id``), so a redelivered
        action sends once and a retried send gets its first try's write back."""
        return f"{self.session(session)}:sent"

    # -- one partition ----------------------------------------------------------------------
    def wake(self, partition: int) -> str:
        """Sharded pub/sub channel: a session of this partition has a new event, or was resumed
        (its id)."""
        return f"{self.tag(partition)}:wake"

    def live(self, partition: int) -> str:
        """Set of sessions some group may still have work in (cleared when all are done)."""
        return f"{self.tag(partition)}:live"

    def ended(self, partition: int) -> str:
        """Sorted set of retired sessions, scored by the time their keys expire (ms)."""
        return f"{self.tag(partition)}:ended"

    def dead(self, partition: int) -> str:
        """Dead-letter stream of the partition: the original fields plus session, group, entry,
        deliveries, error and policy."""
        return f"{self.tag(partition)}:dead"

    def lease(self, partition: int, group: str) -> str:
        """String ``<epoch>:<worker>`` with a TTL: who owns the partition for `group`."""
        return f"{self.tag(partition)}:lease:{group}"

    def epoch(self, partition: int, group: str) -> str:
        """Counter incremented on every acquisition of the lease (the fencing epoch), and set to
        the server's time in ms if it is behind it, so that it never repeats after a loss of
        data."""
        return f"{self.tag(partition)}:epoch:{group}"

    def fence(self, partition: int, group: str, token: str) -> str:
        """Empty stream with the group `group`, existing exactly as long as the lease `token`
        (``<epoch>:<worker>``; the key names the epoch): every read names it, so a read by a
        stale owner fails (``NOGROUP``)."""
        return f"{self.tag(partition)}:fence:{group}:{token.split(':', 1)[0]}"

    def paused(self, partition: int, group: str) -> str:
        """Hash session -> entry id of sessions paused on a dead letter for `group`."""
        return f"{self.tag(partition)}:paused:{group}"

    # -- deployment-wide (never in a hot-path script) ----------------------------------------
    def services(self) -> str:
        """Hash service name -> JSON of the services that run in this deployment."""
        return f"{self.prefix}:services"

    def deployment(self) -> str:
        """Hash of the deployment's fixed settings: ``partitions``, recorded by its first
        worker and checked by every client (`Bus.check_partitions`); ``demo``, set where
        ``flowbus demo`` ran on a server it was given."""
        return f"{self.prefix}:deployment"

    def members(self, group: str) -> str:
        """Sorted set of the group's live workers, scored by heartbeat expiry (ms)."""
        return f"{self.prefix}:members:{group}"

    @staticmethod
    def consumer(partition: int) -> str:
        """Consumer name inside a group: the partition, so a new owner inherits its pending."""
        return f"p{partition}"
