"""The hot path's timeouts behave as asyncio.timeout does, without its event-loop lookups."""

from __future__ import annotations

import asyncio

import pytest

from proxy.deadlines import CancelAfter, fail_after


async def test_a_block_still_running_when_the_time_is_up_raises_timeout_error():
    loop = asyncio.get_running_loop()
    never = loop.create_future()
    with pytest.raises(TimeoutError), CancelAfter(loop, 0.01):
        await never
    assert never.cancelled()
    # The task's own cancellation count is back where it was: it can still be cancelled.
    current = asyncio.current_task()
    assert current is not None
    assert current.cancelling() == 0


async def test_a_block_that_finishes_in_time_is_not_cancelled_later():
    loop = asyncio.get_running_loop()
    with CancelAfter(loop, 0.05):
        await asyncio.sleep(0)
    await asyncio.sleep(0.1)  # past the deadline: a stray cancellation would land here


async def test_a_cancellation_from_elsewhere_stays_a_cancellation():
    loop = asyncio.get_running_loop()
    entered = asyncio.Event()

    async def guarded() -> None:
        with CancelAfter(loop, 10):
            entered.set()
            await loop.create_future()

    task = loop.create_task(guarded())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_outside_a_task_it_refuses_to_start():
    loop = asyncio.get_running_loop()
    outcome = loop.create_future()

    def in_a_plain_callback() -> None:
        try:
            with CancelAfter(loop, 1):
                outcome.set_result("entered")
        except RuntimeError as error:
            outcome.set_result(str(error))

    loop.call_soon(in_a_plain_callback)
    assert await outcome == "CancelAfter must be used inside a task"


async def test_fail_after_fails_a_waiter_that_is_not_done_in_time():
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    fail_after(loop, 0.01, waiter)
    with pytest.raises(TimeoutError):
        await waiter


async def test_fail_after_leaves_a_waiter_that_is_done_alone():
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    expiry = fail_after(loop, 0.01, waiter)
    waiter.set_result("answer")
    await asyncio.sleep(0.03)
    assert waiter.result() == "answer"
    expiry.cancel()
