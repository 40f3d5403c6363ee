"""Timeouts on the hot path without `asyncio.timeout`'s event-loop lookups.

On Python 3.11 every `asyncio.get_running_loop()` makes a getpid() system call (to notice a
fork), and `asyncio.timeout`, `asyncio.ensure_future` and `current_task()` each make one or
more. On a full payment these were 15% of the proxy's CPU time (py-spy, `make bench`). The
helpers here take the loop from their caller instead.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any


def fail_after(
    loop: asyncio.AbstractEventLoop, seconds: float, waiter: asyncio.Future[Any]
) -> asyncio.TimerHandle:
    """Fail `waiter` with TimeoutError unless it is done within `seconds`; cancel the handle
    returned once the waiter is no longer awaited."""
    return loop.call_later(seconds, _expire, waiter)


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class CancelAfter:
    """`async with asyncio.timeout(seconds)` for the current task of a known loop.

    The task is cancelled when the time is up, and the cancellation comes out of the block as
    TimeoutError, exactly as with `asyncio.timeout`; a cancellation from elsewhere stays one.
    """

    __slots__ = ("_cancelling", "_expired", "_handle", "_loop", "_seconds", "_task")

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        self._loop = loop
        self._seconds = seconds
        self._expired = False

    def __enter__(self) -> None:
        task = asyncio.current_task(self._loop)
        if task is None:
            raise RuntimeError("CancelAfter must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._handle = self._loop.call_later(self._seconds, self._expire)

    def _expire(self) -> None:
        self._expired = True
        self._task.cancel()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._handle.cancel()
        if (
            self._expired
            and self._task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc
