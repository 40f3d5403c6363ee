"""Waking a request handler that waits for its payment when a callback for it arrives here."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager


class Wakeups:
    """One event per payment a handler of this process waits for, keyed by the payment's sha."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Event] = {}

    @contextmanager
    def watch(self, sha: str) -> Iterator[asyncio.Event]:
        event = self._waiting.setdefault(sha, asyncio.Event())
        try:
            yield event
        finally:
            if self._waiting.get(sha) is event:
                del self._waiting[sha]

    def wake(self, sha: str) -> bool:
        """Whether a handler of this process was waiting for this payment."""
        event = self._waiting.get(sha)
        if event is None:
            return False
        event.set()
        return True
