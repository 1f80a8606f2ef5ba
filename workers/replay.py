"""Replayed dead letters: how ``flowbus dead replay`` hands an event back to one service.

A dead letter of a session that went on (policy ``skip``) is republished to its session as a
new event of type ``flowbus.replay``, carrying the original event (type, seq, entry id, data,
envelope fields) and the group it is for. It takes the session's next seq, so it is handled
after everything the session already did, in order. Every service run by ``flowbus worker``
accepts it (`accept_replays`): the named group hands the original event to its handler (as
`Delivery.type`, `payload`, `seq` and `ts` of the original), every other group acknowledges it
unseen. A session paused on the dead letter (policy ``pause``) needs no new event: its entry is
retried in place (`Bus.resume`).
"""

from __future__ import annotations

import dataclasses

import msgspec
import structlog

from bus import Codec, Delivery, Payload, Service, type_name


class Replay(Payload, tag="flowbus.replay"):
    """A dead-lettered event handed back to group `group`; `dead_letter` names the dead letter
    (``<partition>/<id>``) it came from."""

    group: str
    entry: str
    seq: int
    event: str
    ts: int
    data: msgspec.Raw
    extra: dict[str, str] = msgspec.field(default_factory=dict)
    dead_letter: str = ""


REPLAY = type_name(Replay)
#: The original's envelope fields a replay's handling logs next to its seq and type.
_LOGGED = frozenset({"replay_of", "traceparent"})


class ReplayError(Exception):
    """A replayed event that this service cannot decode (it was dead-lettered for that)."""


def accept_replays(service: Service) -> Service:
    """`service`, also accepting replays of its own dead letters (see the module docstring):
    a route of its own, so that other events reach their handlers unwrapped."""
    if REPLAY in service.codec:
        return service
    routes = service.routes

    async def handle_replay(delivery: Delivery) -> None:
        original = unwrap(delivery, service)
        if original is None:
            return  # another group's replay: acknowledged unseen
        context = {"seq": original.seq, "type": original.type}
        context |= {k: v for k, v in original.extra.items() if k in _LOGGED}
        with structlog.contextvars.bound_contextvars(**context):
            await routes.get(original.type, service.handle)(original)

    subscribes = None if service.subscribes is None else service.subscribes | {REPLAY}
    return dataclasses.replace(
        service,
        codec=service.codec | Codec([Replay]),
        subscribes=subscribes,
        routes={**routes, REPLAY: handle_replay},
    )


def unwrap(delivery: Delivery, service: Service) -> Delivery | None:
    """The original delivery inside a replay for `service`, or None if it is for another
    group. Raises `ReplayError` if the original does not decode with the service's codec."""
    replay = delivery.payload
    assert isinstance(replay, Replay)
    if replay.group != service.name:
        return None
    try:
        payload = service.codec.decode(replay.event, bytes(replay.data))
    except Exception as exc:
        raise ReplayError(f"the replayed {replay.event!r} does not decode: {exc}") from None
    return msgspec.structs.replace(
        delivery,
        type=replay.event,
        seq=replay.seq,
        ts=replay.ts,
        payload=payload,
        extra={**replay.extra, "replay_of": replay.entry},
    )
