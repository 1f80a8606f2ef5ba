"""The demo's live view: calls by node, events per second, lag and dead letters, as they change.

On a terminal it redraws two lines in place four times a second; otherwise (a pipe, a CI log)
it prints one plain line every two seconds.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, TextIO

import anyio

from bus import Bus

from .bots import NODES, Board
from .inspection import counted_lag
from .observe import dead_letter_count


@dataclass
class Snapshot:
    """What the view shows at one moment."""

    by_node: dict[str, int]
    calls: int
    published: int
    events_per_second: float
    lag: int
    dead_letters: int


@dataclass
class LiveView:
    """Watches the calls on `board` (their session streams on `bus`) until cancelled."""

    bus: Bus
    board: Board
    out: TextIO = field(default_factory=lambda: sys.stderr)
    _rates: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=8))
    _drawn: int = 0

    async def snapshot(self) -> Snapshot:
        sessions = list(self.board.calls)
        pipe = self.bus.redis.pipeline(transaction=False)
        for session in sessions:
            pipe.hget(self.bus.keys.meta(session), "seq")
            pipe.xinfo_groups(self.bus.keys.session(session))
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        streams = [self.bus.keys.session(session) for session in sessions]
        infos = await counted_lag(self.bus, streams, replies[1::2])
        published = sum(int(seq or 0) for seq in replies[::2])
        lag = sum(int(g["lag"]) + int(g["pending"]) for groups in infos for g in groups)
        now = time.monotonic()
        self._rates.append((now, published))
        t0, p0 = self._rates[0]
        rate = (published - p0) / (now - t0) if now > t0 else 0.0
        by_node = {state: self.board.count(state) for state in ("waiting", "connecting", *NODES)}
        by_node |= {"ended": self.board.count("ended"), "failed": self.board.count("failed")}
        dead = await dead_letter_count(self.bus, sessions)
        return Snapshot(by_node, len(sessions), published, rate, lag, dead)

    @staticmethod
    def lines(s: Snapshot) -> list[str]:
        optional = ("waiting", "failed")
        nodes = "  ".join(
            f"{name} {n}" for name, n in s.by_node.items() if n or name not in optional
        )
        return [
            f"calls  {nodes}   (of {s.calls})",
            f"events {s.published:,} published  {s.events_per_second:,.0f}/s   "
            f"lag {s.lag}   dead letters {s.dead_letters}",
        ]

    def show(self, s: Snapshot, *, tty: bool) -> None:
        lines = self.lines(s)
        if tty:
            up = f"\x1b[{self._drawn}F" if self._drawn else ""
            self.out.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
            self._drawn = len(lines)
        else:
            self.out.write(" | ".join(lines) + "\n")
        self.out.flush()

    async def run(self) -> None:
        """Show the view until cancelled; the last state stays on screen."""
        tty = self.out.isatty()
        shown = float("-inf")
        while True:
            snapshot = await self.snapshot()
            if tty or time.monotonic() - shown >= 2.0:
                self.show(snapshot, tty=tty)
                shown = time.monotonic()
            await anyio.sleep(0.25)

    async def final(self) -> Snapshot:
        """Show the view one last time, and return what it showed."""
        snapshot = await self.snapshot()
        self.show(snapshot, tty=self.out.isatty())
        return snapshot
