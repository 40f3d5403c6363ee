"""The GCRA script against a real Redis: the burst, the steady rate, the Retry-After it answers,
its key (hash-tagged, expiring), with an injected clock and with Redis's own."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from proxy.settings.config import RedisSettings
from proxy.store.client import StoreClient
from proxy.store.rate_limits import RateLimits
from tests.conftest import RedisServer


class Clock:
    def __init__(self) -> None:
        self.ms = 1_700_000_000_000.0

    def __call__(self) -> float:
        return self.ms


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def limits(redis_url: str, clock: Clock) -> AsyncIterator[RateLimits]:
    limiter = RateLimits(StoreClient(RedisSettings(url=redis_url, timeout_s=2)), "t:", clock)
    yield limiter
    await limiter.close()


async def admitted(limits: RateLimits, rate_per_s: float, burst: int, times: int) -> list[int]:
    return [await limits.wait_s("shop", rate_per_s, burst) for _ in range(times)]


async def test_a_full_burst_is_admitted_at_once_and_the_next_request_waits_one_interval(
    limits: RateLimits,
) -> None:
    assert await admitted(limits, 0.5, 5, 6) == [0, 0, 0, 0, 0, 2]


async def test_a_steady_rate_is_admitted_forever_and_faster_is_not(
    limits: RateLimits, clock: Clock
) -> None:
    answers = []
    for _ in range(50):
        answers.append(await limits.wait_s("shop", 10, 1))
        clock.ms += 100  # exactly 10 per second
    assert answers == [0] * 50
    clock.ms -= 50  # the next one 50 ms early
    assert await limits.wait_s("shop", 10, 1) == 1  # 50 ms, rounded up to a whole second


async def test_retry_after_is_the_time_until_admission_in_whole_seconds_rounded_up(
    limits: RateLimits, clock: Clock
) -> None:
    assert await limits.wait_s("shop", 0.2, 1) == 0  # one per 5 s
    assert await limits.wait_s("shop", 0.2, 1) == 5
    clock.ms += 2_500
    assert await limits.wait_s("shop", 0.2, 1) == 3  # 2.5 s left
    clock.ms += 2_499
    assert await limits.wait_s("shop", 0.2, 1) == 1  # 1 ms left
    clock.ms += 1
    assert await limits.wait_s("shop", 0.2, 1) == 0


async def test_a_refused_request_does_not_use_up_the_allowance(
    limits: RateLimits, clock: Clock
) -> None:
    assert await admitted(limits, 1, 2, 2) == [0, 0]
    assert await admitted(limits, 1, 2, 20) == [1] * 20
    clock.ms += 1_000
    assert await admitted(limits, 1, 2, 2) == [0, 1]


async def test_each_client_has_its_own_allowance(limits: RateLimits) -> None:
    assert await limits.wait_s("shop", 1, 1) == 0
    assert await limits.wait_s("shop", 1, 1) == 1
    assert await limits.wait_s("other", 1, 1) == 0


async def test_redis_time_is_the_clock_when_none_is_injected(
    redis_url: str, redis_server: RedisServer
) -> None:
    limits = RateLimits(StoreClient(RedisSettings(url=redis_url, timeout_s=2)), "t:")
    try:
        answers = [await limits.wait_s("shop", 0.001, 3) for _ in range(4)]  # one per 1000 s
    finally:
        await limits.close()
    assert answers[:3] == [0, 0, 0]
    # 1000 s minus the little time the four calls took.
    assert 990 <= answers[3] <= 1000
    key = limits.key("shop")
    assert key == "{t:rate:shop}", "the whole key is its hash tag: one slot in a cluster"
    # Kept as long as it matters (3 x 1000 s ahead), then gone by itself.
    assert 2_990_000 <= redis_server.client().pttl(key) <= 3_000_001
