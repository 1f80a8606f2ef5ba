"""The wire format: flat, readable stream fields around a typed JSON payload.

An entry is ``type``, ``seq``, ``ts``, ``data`` (the payload as JSON) and optionally ``v``,
``traceparent``, ``reply_to`` and ``corr``. Payloads are `Payload` structs forming one tagged
union per `Codec`; the tag is the ``type`` and appears inside ``data`` too, so a payload
decodes on its own. Decoding validates everything; what fails is a `DecodeError` with a reason
a person can act on, and the entry is dead-lettered, never executed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, Union

import msgspec

OPTIONAL_FIELDS = ("v", "traceparent", "reply_to", "corr")
#: The longest value of an optional field, in bytes (a traceparent is 55; `data` has its own
#: limit, `Settings.max_payload_bytes`).
MAX_EXTRA_BYTES = 1024
_encoder = msgspec.json.Encoder()


class Payload(msgspec.Struct, kw_only=True, tag_field="type"):
    """Base of every event and command payload.

    Subclass it with the wire type as tag, e.g.
    ``class NodeEntered(Payload, tag="node.entered"): node: str``. New fields need defaults;
    never retype or rename a field: add a new type instead.
    """


def type_name(payload_type: type[Payload]) -> str:
    """The wire ``type`` of a payload class (its tag)."""
    if not (isinstance(payload_type, type) and issubclass(payload_type, Payload)):
        raise TypeError(f"{payload_type!r} is not a payload type (a subclass of bus.Payload)")
    tag = payload_type.__struct_config__.tag
    if not isinstance(tag, str):
        raise TypeError(f"{payload_type.__name__} needs a string tag, e.g. tag='node.entered'")
    return tag


def encode(payload: Payload) -> bytes:
    return _encoder.encode(payload)


class DecodeError(Exception):
    """An entry that must not be executed; `reason` says why, for the dead-letter stream."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Codec:
    """Decoder for one tagged union of payload types, built once."""

    def __init__(self, types: Iterable[type[Payload]]) -> None:
        self.types: dict[str, type[Payload]] = {}
        for t in types:
            name = type_name(t)
            if self.types.get(name, t) is not t:
                raise ValueError(f"two payload types claim the wire type {name!r}")
            self.types[name] = t
        union: Any = Union[tuple(self.types.values())] if self.types else Payload  # noqa: UP007  # a runtime-built union
        self._decoder = msgspec.json.Decoder(union)

    def __contains__(self, name: object) -> bool:
        return name in self.types

    def __or__(self, other: Codec) -> Codec:
        return Codec([*self.types.values(), *other.types.values()])

    def decode(self, name: str, data: bytes) -> Payload:
        expected = self.types.get(name)
        if expected is None:
            raise DecodeError(f"unknown type {name!r}")
        try:
            payload: Payload = self._decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise DecodeError(f"invalid data for {name!r}: {exc}") from None
        if type(payload) is not expected:
            raise DecodeError(f"field type is {name!r} but data is {type_name(type(payload))!r}")
        return payload


#: An integer field (seq, ts) as JSON writes it: twice as fast as `int()` on bytes, which also
#: takes forms no publisher writes ("012", "+1", "1_0").
_int = msgspec.json.Decoder(int).decode


class Entry(msgspec.Struct, frozen=True):
    """One stream entry with its envelope checked; the payload is still JSON."""

    id: str
    type: str
    seq: int
    ts: int
    data: bytes
    extra: Mapping[str, str] = msgspec.field(default_factory=dict)

    @classmethod
    def from_flat(cls, entry_id: str, raw: Sequence[bytes] | None, *, max_data: int) -> Entry:
        """As `parse`, from the flat field, value, field, value... list of a stream read; the
        publisher's own layout (type, seq, ts, data and nothing more) is read in place. None
        is what a read of a pending entry returns once it was deleted from the stream."""
        if raw is None:
            raise DecodeError("the entry was deleted from the stream before it was handled")
        if (
            len(raw) == 8
            and raw[0] == b"type"
            and raw[2] == b"seq"
            and raw[4] == b"ts"
            and raw[6] == b"data"
            and len(raw[7]) <= max_data
        ):
            try:
                return cls(entry_id, raw[1].decode(), _int(raw[3]), _int(raw[5]), raw[7])
            except (UnicodeDecodeError, ValueError):
                pass  # `parse` says what is wrong
        pairs = iter(raw)
        return cls.parse(entry_id, dict(zip(pairs, pairs, strict=False)), max_data=max_data)

    @classmethod
    def parse(cls, entry_id: str, raw: Mapping[bytes, bytes], *, max_data: int) -> Entry:
        """Check the envelope fields of a raw entry; raise `DecodeError` with the reason."""
        try:
            fields = {k.decode(): v for k, v in raw.items()}
        except UnicodeDecodeError:
            raise DecodeError("a field name is not UTF-8") from None
        missing = [f for f in ("type", "seq", "ts", "data") if f not in fields]
        if missing:
            raise DecodeError(f"missing field(s) {', '.join(missing)}")
        data = fields["data"]
        if len(data) > max_data:
            raise DecodeError(f"data is {len(data)} bytes; the limit is {max_data}")
        try:
            type_ = fields["type"].decode()
            seq, ts = _int(fields["seq"]), _int(fields["ts"])
            extra = {k: fields[k].decode() for k in OPTIONAL_FIELDS if k in fields}
        except (UnicodeDecodeError, ValueError):
            raise DecodeError("type, seq, ts or an optional field is malformed") from None
        for k in extra:
            if len(fields[k]) > MAX_EXTRA_BYTES:
                size = len(fields[k])
                raise DecodeError(f"{k} is {size} bytes; the limit is {MAX_EXTRA_BYTES}")
        return cls(entry_id, type_, seq, ts, data, extra)


class DeliveryContext(Protocol):
    """What the consumer gives a delivery to act on its session (see `Delivery`)."""

    async def send(
        self, payload: Payload, dedupe: str, extra: Mapping[str, str] | None
    ) -> object: ...

    async def load_state(self) -> bytes | None: ...

    async def save_state(self, data: bytes) -> None: ...

    async def read_session_state(self) -> dict[str, bytes]: ...

    async def write_session_state(self, fields: Mapping[str, str | bytes]) -> None: ...

    async def server_ms(self) -> int: ...

    async def ensure_owned(self) -> None: ...


class Delivery(msgspec.Struct):
    """What a handler receives: one decoded event of one session, and how often it was sent.

    `deliveries` is 1 on the first delivery; a handler that must not repeat side effects
    deduplicates on (`session`, `seq`). `resumed` is True for an entry that `Bus.resume`
    retried after its session paused on it: its count started over, though it was delivered
    before. (A struct, not a dataclass: one is made per event, and a dataclass's Python
    `__init__` cost the consumer a few percent of its CPU.)
    """

    session: str
    group: str
    entry_id: str
    type: str
    seq: int
    ts: int
    payload: Payload
    deliveries: int
    extra: Mapping[str, str] = msgspec.field(default_factory=dict)
    _context: DeliveryContext | None = None
    _sent: int = 0
    #: When the consumer cuts this handling short as timed out (`time.monotonic()`; infinite
    #: outside a consumer), for a handler that splits its time among parts of its work.
    deadline: float = math.inf
    resumed: bool = False

    def __repr__(self) -> str:
        shown = (f"{f}={getattr(self, f)!r}" for f in self.__struct_fields__ if f[0] != "_")
        return f"Delivery({', '.join(shown)})"

    @property
    def traceparent(self) -> str | None:
        return self.extra.get("traceparent")

    def _ctx(self) -> DeliveryContext:
        if self._context is None:
            raise RuntimeError("this delivery is not attached to a consumer")
        return self._context

    async def send(
        self,
        payload: Payload,
        *,
        dedupe: str | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> bool:
        """Write a command to this session's bot inbox, at most once per dedupe key.

        The default key is (group, entry, n) for the n-th send of this handling, so a handler
        that runs again after a redelivery does not deliver its commands twice. Returns False
        for a repeat. Refused with `FencedError` if this worker no longer owns the session's
        partition (a stale owner's command would reach the bot beside the new owner's).
        """
        self._sent += 1
        key = dedupe or f"{self.group}/{self.entry_id}/{self._sent}"
        return await self._ctx().send(payload, key, extra) is not None

    async def load_state(self) -> bytes | None:
        """This service's own state for the session, as last saved (None at first)."""
        return await self._ctx().load_state()

    async def save_state(self, data: bytes) -> None:
        """Save this service's own state for the session; refused with `FencedError` if this
        worker no longer owns the session's partition (so a stale owner cannot overwrite), and
        with `NoSuchSessionError` if the session's meta is gone."""
        await self._ctx().save_state(data)

    async def read_session_state(self) -> dict[str, bytes]:
        """The session's shared state hash (see `Bus.read_state`)."""
        return await self._ctx().read_session_state()

    async def write_session_state(self, fields: Mapping[str, str | bytes]) -> None:
        """Set fields of the session's shared state (see `Bus.write_state`); refused with
        `FencedError` if this worker no longer owns the session's partition, and with
        `NoSuchSessionError` if the session's meta is gone."""
        await self._ctx().write_session_state(fields)

    async def server_ms(self) -> int:
        """The clock of the server that holds the session, in ms: the clock of `ts`, to
        compare with it where this process's clock may differ (one round trip)."""
        return await self._ctx().server_ms()

    async def ensure_owned(self) -> None:
        """Return once this worker surely still owns the session's partition: at once, unless
        it stalled (or lost the server) for longer than the lease TTL since the last renewal;
        then after the next renewal, and a renewal that finds the lease gone cancels this
        handling. For a handler about to start an effect outside flowbus, whose own writes no
        fence refuses: the consumer checks it before each handling, not within one."""
        await self._ctx().ensure_owned()
