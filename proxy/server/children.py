"""Child processes that do not outlive the supervisor that started them."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
# Resolved before any fork: the child runs as little as possible between fork and exec.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def stop_with_parent() -> Callable[[], None]:
    """A `preexec_fn` that has the kernel SIGTERM the child when this process dies.

    Even a SIGKILLed supervisor then leaves no process behind holding its port (Linux; elsewhere
    a no-op). The setting survives exec, so it also covers redis-server. A child whose parent
    died before the setting took effect stops itself.
    """
    parent = os.getpid()

    def preexec() -> None:
        if _prctl is None:
            return
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec
