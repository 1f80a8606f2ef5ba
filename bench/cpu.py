"""CPU time of processes (Linux /proc), to show where a benchmark's time goes."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (0.0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine spent busy so far (/proc/stat; 0.0 if unreadable)."""
    try:
        line = Path("/proc/stat").read_text().splitlines()[0]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, _steal = map(int, line.split()[1:9])
    return (user + nice + system + irq + softirq) / _TICKS  # steal: the hypervisor's, not ours


class CpuMeter:
    """CPU seconds used by named processes between `start()` and `stop()`, and by everything
    else on the machine (`other`: another test run skews a benchmark)."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self._start: dict[str, float] = {}
        self._machine = 0.0
        self.used: dict[str, float] = {}
        self.other = 0.0

    def start(self) -> None:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._machine = machine_busy_seconds()

    def stop(self) -> dict[str, float]:
        self.used = {
            name: round(cpu_seconds(pid) - self._start[name], 3) for name, pid in self.pids.items()
        }
        machine = machine_busy_seconds() - self._machine
        self.other = round(max(0.0, machine - sum(self.used.values())), 3)
        return self.used

    def per_event_us(self, events: int, names: Iterable[str] | None = None) -> float:
        """Microseconds of CPU per event over `names` (default: all)."""
        chosen = self.used if names is None else {n: self.used[n] for n in names}
        return round(sum(chosen.values()) / max(events, 1) * 1e6, 1)
