"""Per-provider circuit breaker: aiobreaker's state machine driven by a failure-rate window.

aiobreaker 1.2.0 only counts consecutive failures, lets every concurrent call through while
half-open, raises CircuitBreakerError from the call that trips it, and times its reopening with a
mix of utcnow() and now() on the wall clock. So it is used here as the state holder and listener
bus only: this module decides every transition itself, from a rate window on a monotonic clock,
and never routes a call through `CircuitBreaker.call_async`.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

from aiobreaker import CircuitBreaker, CircuitBreakerListener, CircuitBreakerState

from proxy.errors import Overloaded, PaymentError, ProviderUnavailable
from proxy.settings.config import BreakerSettings


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_FROM_AIOBREAKER = {
    CircuitBreakerState.CLOSED: BreakerState.CLOSED,
    CircuitBreakerState.OPEN: BreakerState.OPEN,
    CircuitBreakerState.HALF_OPEN: BreakerState.HALF_OPEN,
}

# A provider's Retry-After is honoured up to this: a bogus day-long value must not shut it out.
MAX_RETRY_AFTER_S = 3600.0

TransitionHook = Callable[[str, BreakerState, BreakerState], None]


class _TransitionRelay(CircuitBreakerListener):  # type: ignore[misc]
    """Forwards aiobreaker's state changes to the gateway's hook (metrics, logs)."""

    def __init__(self, provider: str, hook: TransitionHook) -> None:
        self._provider = provider
        self._hook = hook

    def state_change(self, breaker: object, old: object, new: object) -> None:
        before = _FROM_AIOBREAKER[old.state] if old is not None else BreakerState.CLOSED  # type: ignore[attr-defined]
        after = _FROM_AIOBREAKER[new.state]  # type: ignore[attr-defined]
        if before != after:
            self._hook(self._provider, before, after)


@dataclass(slots=True)
class CallVerdict:
    """Set by the caller inside `ProviderBreaker.call()`: did the provider prove it is up?"""

    provider_is_up: bool = True
    # Up but not serving us (a 429 the YAML does not count): a half-open trial stays undecided.
    provider_serves: bool = True
    # False when payagg never got as far as the provider (Overloaded): the call proves nothing.
    about_provider: bool = True
    # The provider's own Retry-After on a failed answer: if this call opens the breaker, it stays
    # open that long when it is longer than `open_s`.
    retry_after_s: float = 0.0


@dataclass(frozen=True, slots=True)
class WindowCounts:
    calls: int
    failures: int


class ProviderBreaker:
    """Opens when, within `window_s`, at least `minimum_calls` calls failed at >= the threshold."""

    def __init__(
        self,
        provider: str,
        settings: BreakerSettings,
        on_transition: TransitionHook | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider = provider
        self.settings = settings
        self._clock = clock
        listeners = [_TransitionRelay(provider, on_transition)] if on_transition else []
        self._machine = CircuitBreaker(
            # Never reached: this class trips the machine itself, from the rate window.
            fail_max=2**62,
            timeout_duration=timedelta(seconds=settings.open_s),
            listeners=listeners,
            name=provider,
        )
        self._window: deque[tuple[float, bool]] = deque()
        self._window_failures = 0
        self._opened_at = 0.0
        self._open_for_s = settings.open_s
        # Each state change starts a new generation; a call admitted in an older one can no
        # longer sway the breaker (it only frees its half-open slot if it holds one).
        self._generation = 0
        self._trials_in_flight = 0
        self._trial_successes = 0
        # An operator's override (the admin API, proxy/admin/): while set, it is the state every
        # caller sees; the window keeps counting underneath and decides again once it is lifted.
        self.forced: BreakerState | None = None

    @property
    def state(self) -> BreakerState:
        """The current state, moving open -> half-open once `open_s` has passed."""
        if self.forced is not None:
            return self.forced
        state = _FROM_AIOBREAKER[self._machine.current_state]
        if state is BreakerState.OPEN and self._clock() - self._opened_at >= self._open_for_s:
            self._enter(BreakerState.HALF_OPEN)
            return BreakerState.HALF_OPEN
        return state

    def retry_after_s(self) -> int:
        """Whole seconds until a trial call may be admitted (at least 1)."""
        if self.forced is BreakerState.OPEN:
            return max(1, math.ceil(self.settings.open_s))  # held open: no trial is coming
        if self.state is BreakerState.OPEN:
            remaining = self._open_for_s - (self._clock() - self._opened_at)
            return max(1, math.ceil(remaining))
        return 1

    def window_counts(self) -> WindowCounts:
        self._forget_old_calls(self._clock())
        return WindowCounts(len(self._window), self._window_failures)

    def rejects_now(self) -> bool:
        """True when a call would be refused right now (no slot is taken by asking)."""
        state = self.state
        if state is BreakerState.OPEN:
            return True
        return (
            state is BreakerState.HALF_OPEN
            and self._trials_in_flight >= self.settings.half_open_max_calls
        )

    @contextmanager
    def call(self) -> Iterator[CallVerdict]:
        """Admit one call or raise ProviderUnavailable; the call's outcome drives the state.

        The body ends normally when the provider answered (success or decline), raises a
        PaymentError whose `counts_against_breaker` says whether it was an outage (and
        `shows_provider_serving` whether a trial ending in it may close the breaker), or raises
        anything else (cancellation included), which counts as a failure: a trial call must
        always free its slot, or the breaker would stick half-open.
        """
        state = self.state
        if self.rejects_now():
            raise ProviderUnavailable(self.provider, self.retry_after_s())
        generation, is_trial = self._generation, state is BreakerState.HALF_OPEN
        if is_trial:
            self._trials_in_flight += 1
        verdict = CallVerdict()
        try:
            yield verdict
        except PaymentError as error:
            verdict.provider_is_up = not error.counts_against_breaker
            verdict.provider_serves = error.shows_provider_serving
            verdict.about_provider = not isinstance(error, Overloaded)
            raise
        except BaseException:
            verdict.provider_is_up = False
            raise
        finally:
            if is_trial and generation == self._generation:
                self._trials_in_flight -= 1
            if generation == self._generation and verdict.about_provider:
                self._record(verdict, is_trial)

    def _record(self, verdict: CallVerdict, is_trial: bool) -> None:
        provider_is_up = verdict.provider_is_up
        if is_trial:
            if not provider_is_up:
                self._enter(BreakerState.OPEN, verdict.retry_after_s)
                return
            if not verdict.provider_serves:
                return  # its slot is free again: the next trial decides
            self._trial_successes += 1
            # As gobreaker does: close after `half_open_max_calls` successful trials in a row.
            if self._trial_successes >= self.settings.half_open_max_calls:
                self._enter(BreakerState.CLOSED)
            return
        now = self._clock()
        self._window.append((now, not provider_is_up))
        self._window_failures += not provider_is_up
        self._forget_old_calls(now)
        calls = len(self._window)
        if (
            not provider_is_up
            and calls >= self.settings.minimum_calls
            and self._window_failures / calls >= self.settings.failure_rate_threshold
        ):
            self._enter(BreakerState.OPEN, verdict.retry_after_s)

    def _forget_old_calls(self, now: float) -> None:
        horizon = now - self.settings.window_s
        while self._window and self._window[0][0] <= horizon:
            _, failed = self._window.popleft()
            self._window_failures -= failed

    def _enter(self, state: BreakerState, retry_after_s: float = 0.0) -> None:
        self._generation += 1
        self._trials_in_flight = 0
        self._trial_successes = 0
        self._window.clear()
        self._window_failures = 0
        if state is BreakerState.OPEN:
            self._opened_at = self._clock()
            self._open_for_s = max(self.settings.open_s, min(retry_after_s, MAX_RETRY_AFTER_S))
            self._machine.open()
        elif state is BreakerState.HALF_OPEN:
            self._machine.half_open()
        else:
            self._machine.close()
