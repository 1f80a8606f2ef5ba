"""flowbus.bus: the ordered, per-session event bus on Redis Streams.

Publish with `Bus.publish`, handle with a `Service` run by a `Consumer`; see the README for the
key layout and the ordering contract.
"""

from .client import Bus, Inbox, Message, Published, ServiceInfo
from .connection import make_client
from .consumer import Consumer
from .envelope import Codec, DecodeError, Delivery, Entry, Payload, encode, type_name
from .errors import (
    BusError,
    CommandRefusedError,
    ConfigError,
    ConnectionFailedError,
    DeadLetterGoneError,
    FencedError,
    InvalidExtraError,
    InvalidSessionIdError,
    LifespanError,
    NoSuchSessionError,
    NotPermittedError,
    PayloadTooLargeError,
    ServerUnreachableError,
    SessionEndedError,
)
from .keys import Keys, check_session_id, check_worker_id
from .service import Handler, Lifespan, Service, Stats
from .settings import DeadLetterPolicy, Settings

__all__ = [
    "Bus",
    "BusError",
    "Codec",
    "CommandRefusedError",
    "ConfigError",
    "ConnectionFailedError",
    "Consumer",
    "DeadLetterGoneError",
    "DeadLetterPolicy",
    "DecodeError",
    "Delivery",
    "Entry",
    "FencedError",
    "Handler",
    "Inbox",
    "InvalidExtraError",
    "InvalidSessionIdError",
    "Keys",
    "Lifespan",
    "LifespanError",
    "Message",
    "NoSuchSessionError",
    "NotPermittedError",
    "Payload",
    "PayloadTooLargeError",
    "Published",
    "ServerUnreachableError",
    "Service",
    "ServiceInfo",
    "SessionEndedError",
    "Settings",
    "Stats",
    "check_session_id",
    "check_worker_id",
    "encode",
    "make_client",
    "type_name",
]
