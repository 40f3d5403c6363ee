"""Issue #18's question, measured: CPU per `async with asyncio.timeout()` block against the
hand-made deadline payagg used until it was answered (a call_later on a loop passed in, which
skips asyncio.timeout's three getpid() system calls on Python 3.11).

Usage: .venv/bin/python bench/deadlines.py. Recorded in BENCHMARKS.md ("Maintained clients:
where the time goes"): 4.5 against 2.1 µs per block, one block per provider call, about 0.6% of
a full payment's CPU, below what `make bench` can resolve; payagg uses asyncio.timeout.
"""

import asyncio
import statistics
import time
from types import TracebackType

import uvloop


class CancelAfter:
    """The hand-made deadline, as it was in proxy/deadlines.py (kept here only to measure)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        self._loop, self._seconds, self._expired = loop, seconds, False

    def __enter__(self) -> None:
        task = asyncio.current_task(self._loop)
        assert task is not None
        self._task, self._cancelling = task, task.cancelling()
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
        if self._expired and self._task.uncancel() <= self._cancelling:
            raise TimeoutError from exc


async def main() -> None:
    loop = asyncio.get_running_loop()
    N = 100_000

    async def std() -> None:
        for _ in range(N):
            async with asyncio.timeout(10):  # noqa: ASYNC100 (the block's own cost is measured)
                pass

    async def ours() -> None:
        for _ in range(N):
            with CancelAfter(loop, 10):
                pass

    async def none() -> None:
        for _ in range(N):
            pass

    res: dict[str, list[float]] = {}
    for _ in range(5):
        for name, f in (("asyncio.timeout", std), ("CancelAfter", ours), ("nothing", none)):
            started = time.process_time()
            await loop.create_task(f())
            res.setdefault(name, []).append((time.process_time() - started) / N * 1e6)
    for name, values in res.items():
        print(f"{name:16} {statistics.median(values):.2f} µs per block (median of 5)")


if __name__ == "__main__":
    uvloop.run(main())
