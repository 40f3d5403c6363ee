"""Callbacks: each final payment is sent to its callback URL, retried with bounded backoff."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from mock_providers.ledger import Stats


@dataclass(frozen=True)
class Callback:
    url: str
    method: str
    body: bytes


@dataclass(frozen=True)
class RetrySchedule:
    """Delay before each retry: `first_s`, doubling up to `max_delay_s`, `retries` times.

    The default retries for about five hours, as the providers do."""

    first_s: float = 1.0
    max_delay_s: float = 900.0
    retries: int = 30
    attempt_timeout_s: float = 10.0

    def delays(self) -> list[float]:
        return [min(self.first_s * 2**n, self.max_delay_s) for n in range(self.retries)]


class Courier:
    """Delivers callbacks in the background of the app; a 2xx answer is a delivery."""

    def __init__(self, stats: Stats, schedule: RetrySchedule) -> None:
        self._stats = stats
        self._schedule = schedule
        self._queue: asyncio.Queue[Callback] = asyncio.Queue()

    def send(self, callback: Callback) -> None:
        self._queue.put_nowait(callback)

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Until cancelled (at shutdown), which cancels every delivery still retrying."""
        async with asyncio.TaskGroup() as deliveries:
            while True:
                callback = await self._queue.get()
                deliveries.create_task(self._deliver(session, callback))

    async def _deliver(self, session: aiohttp.ClientSession, callback: Callback) -> None:
        for delay in [*self._schedule.delays(), None]:
            if await self._attempt(session, callback):
                self._stats.callbacks_sent += 1
                return
            self._stats.callbacks_failed += 1
            if delay is not None:
                await asyncio.sleep(delay)

    async def _attempt(self, session: aiohttp.ClientSession, callback: Callback) -> bool:
        timeout = aiohttp.ClientTimeout(total=self._schedule.attempt_timeout_s)
        headers = {"Content-Type": "application/json"}
        try:
            async with session.request(
                callback.method, callback.url, data=callback.body, headers=headers, timeout=timeout
            ) as answer:
                return 200 <= answer.status < 300
        except (aiohttp.ClientError, TimeoutError, ValueError):
            # ValueError: a URL aiohttp cannot use; it is retried like any failure, and counted.
            return False


@contextlib.asynccontextmanager
async def running(courier: Courier) -> AsyncIterator[None]:
    """The courier's session and background task, from start-up to shutdown."""
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(courier.run(session))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
