"""Child processes that end with the process that started them, however it ended."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def ending_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` for `subprocess.Popen` after which the child gets SIGTERM when this
    process dies, even by SIGKILL: a demo killed that way leaves no worker or server running.
    None off Linux, and off the main thread (the kernel counts the end of the thread that
    started the child as its parent's death)."""
    if (
        not sys.platform.startswith("linux")
        or threading.current_thread() is not threading.main_thread()
    ):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the forked child
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # it died before the call: no signal would come
            os._exit(1)

    return preexec
