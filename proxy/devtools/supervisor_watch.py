"""Whether the process that started `payagg dev` (`make dev`) was asked to stop.

GNU make forwards SIGTERM to its recipe's process but not SIGINT: it assumes a terminal sent SIGINT
to the whole process group, and only waits for its children. So `kill -INT <make pid>` would leave
the stack running and make waiting for it. The Makefile therefore names itself in
$PAYAGG_DEV_SUPERVISOR_PID, and `payagg dev` watches that process through Linux's /proc.

What gives make's signal away: make's fatal-signal handler resets the signal to its default action
and then waits for its children inside the handler, so the signal's bit leaves the process's
`SigCgt` (signals with a handler) while the handler runs.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Mapping
from pathlib import Path

SUPERVISOR_PID_ENV = "PAYAGG_DEV_SUPERVISOR_PID"
# The signals make treats as fatal and handles; SIGQUIT is left to the terminal's whole group.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

log = logging.getLogger("payagg.dev")


class SupervisorWatch:
    """One process's caught stop signals, compared with what they were when watching started."""

    def __init__(self, pid: int, caught_at_start: frozenset[signal.Signals]) -> None:
        self.pid = pid
        self.caught_at_start = caught_at_start

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> SupervisorWatch | None:
        """The watch of $PAYAGG_DEV_SUPERVISOR_PID, or None when it is unset or unreadable."""
        value = environ.get(SUPERVISOR_PID_ENV, "")
        if not value:
            return None
        try:
            pid = int(value)
            caught = caught_stop_signals(pid)
        except (ValueError, OSError) as error:
            log.debug("not watching %s=%r: %s", SUPERVISOR_PID_ENV, value, error)
            return None
        return cls(pid, caught)

    def stop_reason(self) -> str | None:
        """Why the stack should stop now ("make received SIGINT"), or None while it runs on."""
        try:
            caught = caught_stop_signals(self.pid)
        except OSError:
            return f"the process that started payagg dev (pid {self.pid}) is gone"
        for signum in STOP_SIGNALS:
            if signum in self.caught_at_start and signum not in caught:
                return f"make (pid {self.pid}) received {signum.name}"
        return None


def caught_stop_signals(pid: int) -> frozenset[signal.Signals]:
    """Which of STOP_SIGNALS `pid` has a handler for; OSError when it is gone or a zombie."""
    fields = dict(
        line.split(":", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":" in line
    )
    if fields.get("State", "").strip().startswith(("Z", "X")):
        raise ProcessLookupError(f"pid {pid} has exited")
    try:
        mask = int(fields["SigCgt"], 16)
    except (KeyError, ValueError):
        raise OSError(f"/proc/{pid}/status has no readable SigCgt") from None
    return frozenset(signum for signum in STOP_SIGNALS if mask & (1 << (signum - 1)))
