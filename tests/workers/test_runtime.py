"""The worker process's own settings."""

from __future__ import annotations

import subprocess
import sys

from workers.runtime import GC_THRESHOLD


def test_a_worker_freezes_its_start_up_heap_and_collects_young_garbage_less_often() -> None:
    check = (
        "import gc; from workers.runtime import tune_gc; tune_gc(); "
        "print(gc.get_threshold()[0], gc.get_freeze_count() > 1000)"
    )  # in a process of its own: the test process's collector stays as it is
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(GC_THRESHOLD), "True"]
