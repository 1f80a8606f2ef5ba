"""The throughput benchmark's service: a handler that does nothing (``bench.noop:service``)."""

from __future__ import annotations

from bus import Codec, Delivery, Payload, Service

GROUP = "noop"


class Noop(Payload, tag="bench.noop"):
    """A benchmark event; `sent_ns` is unused here but keeps the size of the probe's."""

    sent_ns: int = 0


async def handle(delivery: Delivery) -> None:
    """Do nothing: what is left is the bus's own cost per event."""


service = Service(GROUP, handle, Codec([Noop]))
