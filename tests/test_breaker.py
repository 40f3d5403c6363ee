"""The per-provider breaker: rate window, minimum calls, open/half-open/closed, trial slots."""

from __future__ import annotations

import asyncio

import pytest

from proxy.errors import (
    Overloaded,
    PaymentAlreadyExists,
    ProviderBusy,
    ProviderFailed,
    ProviderMismatch,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
)
from proxy.providers.breaker import BreakerState, ProviderBreaker
from proxy.settings.config import BreakerSettings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_breaker(
    clock: FakeClock, transitions: list[tuple[str, str]] | None = None, **settings: float
) -> ProviderBreaker:
    defaults = {
        "failure_rate_threshold": 0.6,
        "minimum_calls": 3,
        "window_s": 5,
        "open_s": 30,
        "half_open_max_calls": 1,
    }
    defaults.update(settings)
    hook = None
    if transitions is not None:

        def hook(provider: str, before: BreakerState, after: BreakerState) -> None:
            transitions.append((before.value, after.value))

    return ProviderBreaker("P", BreakerSettings(**defaults), on_transition=hook, clock=clock)


def succeed(breaker: ProviderBreaker) -> None:
    with breaker.call():
        pass


def fail(breaker: ProviderBreaker, error: Exception | None = None) -> None:
    with pytest.raises(type(error) if error else ProviderFailed), breaker.call():
        raise error or ProviderFailed("P", "HTTP 500")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_the_breaker_opens_at_the_failure_rate_once_minimum_calls_are_reached(clock):
    breaker = make_breaker(clock)
    fail(breaker)
    fail(breaker)
    assert breaker.state is BreakerState.CLOSED, "2 calls are fewer than minimum_calls"
    succeed(breaker)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)  # 3 failures of 4 = 75% >= 60%
    assert breaker.state is BreakerState.OPEN


def test_a_failure_rate_below_the_threshold_keeps_the_breaker_closed(clock):
    breaker = make_breaker(clock)
    for _ in range(3):
        succeed(breaker)
    fail(breaker)
    fail(breaker)  # 2 of 5 = 40%
    assert breaker.state is BreakerState.CLOSED


def test_the_seed_services_threshold_trips_at_sixty_percent_of_three_calls_or_more(clock):
    breaker = make_breaker(clock)
    succeed(breaker)
    fail(breaker)
    assert breaker.state is BreakerState.CLOSED
    succeed(breaker)  # 1 of 3 failed
    fail(breaker)  # 2 of 4 = 50%
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)  # 3 of 5 = 60%
    assert breaker.state is BreakerState.OPEN


def test_calls_older_than_the_window_no_longer_count(clock):
    breaker = make_breaker(clock, window_s=5)
    fail(breaker)
    fail(breaker)
    clock.advance(5.1)
    fail(breaker)  # the two old failures fell out: 1 call < minimum_calls
    assert breaker.state is BreakerState.CLOSED
    assert breaker.window_counts().calls == 1


@pytest.mark.parametrize(
    "error",
    [ProviderRejected("P", "HTTP 400"), ProviderBusy("P", "HTTP 429")],
    ids=["client-error-4xx", "busy-429-a-provider-does-not-count"],
)
def test_client_errors_do_not_count_as_failures(clock, error):
    breaker = make_breaker(clock)
    for _ in range(5):
        fail(breaker, error)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.window_counts().failures == 0


def test_declines_do_not_count_as_breaker_failures(clock):
    breaker = make_breaker(clock)
    for _ in range(5):
        with breaker.call():
            pass  # a DECLINED answer ends the call normally: the provider is up
    assert breaker.state is BreakerState.CLOSED
    assert breaker.window_counts() == breaker.window_counts().__class__(5, 0)


@pytest.mark.parametrize(
    "error",
    [ProviderTimeout("P", 1.0), ProviderFailed("P", "reset"), RuntimeError("bug")],
    ids=["timeout", "connection-error", "unexpected-exception"],
)
def test_timeouts_connection_errors_and_unexpected_errors_count_as_failures(clock, error):
    breaker = make_breaker(clock)
    for _ in range(3):
        fail(breaker, error)
    assert breaker.state is BreakerState.OPEN


def test_an_open_breaker_rejects_with_the_seconds_left_and_runs_nothing(clock):
    breaker = make_breaker(clock, open_s=30)
    for _ in range(3):
        fail(breaker)
    clock.advance(10.2)
    ran = False
    with pytest.raises(ProviderUnavailable) as rejected, breaker.call():
        ran = True
    assert not ran
    assert rejected.value.headers["Retry-After"] == "20"
    assert rejected.value.details["retry_after_s"] == 20


def test_after_open_s_the_breaker_is_half_open_and_a_successful_trial_closes_it(clock):
    transitions: list[tuple[str, str]] = []
    breaker = make_breaker(clock, transitions, open_s=30)
    for _ in range(3):
        fail(breaker)
    clock.advance(30)
    assert breaker.state is BreakerState.HALF_OPEN
    succeed(breaker)
    assert breaker.state is BreakerState.CLOSED
    assert transitions == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_a_failed_trial_reopens_the_breaker_for_another_open_s(clock):
    breaker = make_breaker(clock, open_s=30)
    for _ in range(3):
        fail(breaker)
    clock.advance(30)
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_after_s() == 30


def test_a_decline_during_half_open_is_a_successful_trial_and_closes_the_breaker(clock):
    breaker = make_breaker(clock)
    for _ in range(3):
        fail(breaker)
    clock.advance(30)
    with breaker.call():
        pass  # DECLINED: proof the provider is up
    assert breaker.state is BreakerState.CLOSED


def test_half_open_admits_at_most_half_open_max_calls_at_once(clock):
    breaker = make_breaker(clock, minimum_calls=3, half_open_max_calls=2)
    for _ in range(3):
        fail(breaker)
    clock.advance(30)
    first, second = breaker.call(), breaker.call()
    first.__enter__()
    second.__enter__()
    with pytest.raises(ProviderUnavailable) as rejected, breaker.call():
        pass
    assert rejected.value.headers["Retry-After"] == "1"
    first.__exit__(None, None, None)
    assert breaker.state is BreakerState.HALF_OPEN, "closing takes half_open_max_calls successes"
    second.__exit__(None, None, None)
    assert breaker.state is BreakerState.CLOSED


async def test_a_cancelled_trial_frees_its_slot_and_reopens_the_breaker(clock):
    breaker = make_breaker(clock)
    for _ in range(3):
        fail(breaker)
    clock.advance(30)
    started = asyncio.Event()

    async def trial() -> None:
        with breaker.call():
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(trial())
    await started.wait()
    assert breaker.rejects_now(), "the single trial slot is taken"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state is BreakerState.OPEN, "a cancelled trial counts as a failure"
    clock.advance(30)
    assert not breaker.rejects_now(), "and its slot is free for the next trial"


def test_a_call_admitted_before_the_breaker_opened_cannot_sway_the_next_state(clock):
    breaker = make_breaker(clock)
    slow = breaker.call()
    slow.__enter__()
    for _ in range(3):
        fail(breaker)
    clock.advance(30)
    assert breaker.state is BreakerState.HALF_OPEN
    slow.__exit__(None, None, None)  # a success from the closed era, not a trial
    assert breaker.state is BreakerState.HALF_OPEN


def test_retry_after_uses_the_monotonic_clock_not_the_wall_clock(clock):
    breaker = make_breaker(clock, open_s=30)
    for _ in range(3):
        fail(breaker)
    clock.advance(29.5)
    assert breaker.retry_after_s() == 1
    clock.advance(0.5)
    assert breaker.state is BreakerState.HALF_OPEN


def test_a_trial_answered_busy_neither_closes_nor_reopens_the_breaker_and_frees_its_slot(clock):
    transitions: list[tuple[str, str]] = []
    breaker = make_breaker(clock, transitions)
    for _ in range(3):
        fail(breaker)
    clock.advance(30)
    fail(breaker, ProviderBusy("P", "provider cannot serve us now (HTTP 429)"))
    assert breaker.state is BreakerState.HALF_OPEN, "a 429 is no proof the provider serves"
    assert not breaker.rejects_now(), "the trial slot is free for the next trial"
    succeed(breaker)
    assert breaker.state is BreakerState.CLOSED
    assert transitions == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


@pytest.mark.parametrize(
    "error",
    [ProviderMismatch(), PaymentAlreadyExists("P")],
    ids=["answer-about-another-amount", "already-exists"],
)
def test_a_trial_the_provider_answered_properly_closes_the_breaker_whatever_payagg_answers(
    clock, error
):
    breaker = make_breaker(clock)
    for _ in range(3):
        fail(breaker)
    clock.advance(30)
    fail(breaker, error)
    assert breaker.state is BreakerState.CLOSED


def fail_saying_retry_after(breaker: ProviderBreaker, retry_after_s: float) -> None:
    def answered_503() -> None:
        with breaker.call() as verdict:
            verdict.retry_after_s = retry_after_s
            raise ProviderFailed("P", "HTTP 503")

    with pytest.raises(ProviderFailed):
        answered_503()


@pytest.mark.parametrize(
    ("retry_after_s", "open_for_s"),
    [(120, 120), (10, 30), (0, 30), (10**6, 3600)],
    ids=["longer-than-open_s", "shorter-than-open_s", "none", "capped-at-an-hour"],
)
def test_the_providers_retry_after_keeps_the_breaker_open_when_longer_than_open_s(
    clock, retry_after_s, open_for_s
):
    breaker = make_breaker(clock, minimum_calls=1)
    fail_saying_retry_after(breaker, retry_after_s)
    assert breaker.state is BreakerState.OPEN
    assert breaker.retry_after_s() == open_for_s
    clock.advance(open_for_s - 1)
    assert breaker.state is BreakerState.OPEN
    clock.advance(1)
    assert breaker.state is BreakerState.HALF_OPEN


def test_a_failed_trial_with_retry_after_reopens_for_that_long_and_the_next_opening_uses_open_s(
    clock,
):
    breaker = make_breaker(clock, minimum_calls=1)
    fail(breaker)
    clock.advance(30)
    fail_saying_retry_after(breaker, 90)  # the trial call
    assert breaker.retry_after_s() == 90
    clock.advance(90)
    succeed(breaker)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    assert breaker.retry_after_s() == 30


def test_payagg_being_overloaded_is_neither_a_failure_nor_a_success_for_the_breaker(clock):
    breaker = make_breaker(clock, minimum_calls=1)
    for _ in range(5):
        fail(breaker, Overloaded("out of file descriptors"))
    assert breaker.state is BreakerState.CLOSED
    assert breaker.window_counts().calls == 0
    fail(breaker)
    clock.advance(30)
    assert breaker.state is BreakerState.HALF_OPEN
    fail(breaker, Overloaded("pool full"))  # the trial never reached the provider
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.rejects_now(), "the trial slot is free again"


def test_a_hook_reading_the_state_hears_each_transition_once_and_sees_the_new_state(clock):
    """The hook (metrics, logs) reads the breaker while it is told of a change; with aiobreaker
    that re-entered the open -> half-open move, once per read, nested."""
    heard: list[tuple[str, str, str]] = []

    def hook(provider: str, before: BreakerState, after: BreakerState) -> None:
        heard.append((before.value, after.value, breaker.state.value))
        breaker.rejects_now()
        breaker.retry_after_s()
        breaker.window_counts()

    settings = BreakerSettings(
        failure_rate_threshold=0.6, minimum_calls=1, window_s=5, open_s=30, half_open_max_calls=1
    )
    breaker = ProviderBreaker("P", settings, on_transition=hook, clock=clock)
    fail(breaker)
    clock.advance(30)
    assert breaker.state is BreakerState.HALF_OPEN
    succeed(breaker)
    assert heard == [
        ("closed", "open", "open"),
        ("open", "half_open", "half_open"),
        ("half_open", "closed", "closed"),
    ]
