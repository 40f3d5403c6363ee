"""Per-provider circuit breaker: a failure rate over a time window, on a monotonic clock.

The state machine is this module's own (closed -> open -> half-open -> closed or open again),
in one small class: aiobreaker, used before, counts consecutive failures only, admits every
call while half-open, replaces the tripping call's error with its own, times its reopening on
the wall clock, and calls its listeners before its stored state changes, so a listener that read
the state re-entered the open -> half-open move (docs/dependencies.md says more).

Each state change is made in full (state, timers, window, trial slots) before the transition
hook runs, so the hook (metrics, logs) may read anything here and sees the new state.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum

from proxy.errors import ProviderUnavailable
from proxy.providers.classification import BreakerVote, of_error
from proxy.settings.config import BreakerSettings


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# A provider's Retry-After is honoured up to this: a bogus day-long value must not shut it out.
MAX_RETRY_AFTER_S = 3600.0

TransitionHook = Callable[[str, BreakerState, BreakerState], None]


@dataclass(slots=True)
class CallVerdict:
    """Set by the caller inside `ProviderBreaker.call()`."""

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
        self._on_transition = on_transition
        self._state = BreakerState.CLOSED
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
        """The current state, moving open -> half-open once the open period has passed."""
        if self.forced is not None:
            return self.forced
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self._open_for_s:
            self._enter(BreakerState.HALF_OPEN)
        return self._state

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
        """Admit one call or raise ProviderUnavailable; the call's end drives the state.

        A body that ends normally is an answer about the payment (success, decline, pending);
        one that raises is judged by `classification.of_error`, which counts anything it does
        not know (cancellation included) as a failure: a trial call must always free its
        slot, or the breaker would stick half-open.
        """
        state = self.state
        if self.rejects_now():
            raise ProviderUnavailable(self.provider, self.retry_after_s())
        generation, is_trial = self._generation, state is BreakerState.HALF_OPEN
        if is_trial:
            self._trials_in_flight += 1
        verdict = CallVerdict()
        vote = BreakerVote.UP
        try:
            yield verdict
        except BaseException as error:
            vote = of_error(error).vote
            raise
        finally:
            if generation == self._generation:
                if is_trial:
                    self._trials_in_flight -= 1
                self._record(vote, verdict.retry_after_s, is_trial)

    def _record(self, vote: BreakerVote, retry_after_s: float, is_trial: bool) -> None:
        if vote is BreakerVote.NONE:
            return
        failed = vote is BreakerVote.DOWN
        if is_trial:
            if failed:
                self._enter(BreakerState.OPEN, retry_after_s)
            elif vote is BreakerVote.UP:
                self._trial_successes += 1
                # As gobreaker does: close after `half_open_max_calls` successful trials in a row.
                if self._trial_successes >= self.settings.half_open_max_calls:
                    self._enter(BreakerState.CLOSED)
            # BUSY: its slot is free again and the next trial decides.
            return
        now = self._clock()
        self._window.append((now, failed))
        self._window_failures += failed
        self._forget_old_calls(now)
        calls = len(self._window)
        if (
            failed
            and calls >= self.settings.minimum_calls
            and self._window_failures / calls >= self.settings.failure_rate_threshold
        ):
            self._enter(BreakerState.OPEN, retry_after_s)

    def _forget_old_calls(self, now: float) -> None:
        horizon = now - self.settings.window_s
        while self._window and self._window[0][0] <= horizon:
            _, failed = self._window.popleft()
            self._window_failures -= failed

    def _enter(self, state: BreakerState, retry_after_s: float = 0.0) -> None:
        """The one place the state changes; the hook hears of it once the change is complete."""
        before, self._state = self._state, state
        self._generation += 1
        self._trials_in_flight = 0
        self._trial_successes = 0
        self._window.clear()
        self._window_failures = 0
        if state is BreakerState.OPEN:
            self._opened_at = self._clock()
            self._open_for_s = max(self.settings.open_s, min(retry_after_s, MAX_RETRY_AFTER_S))
        if self._on_transition is not None and before is not state:
            self._on_transition(self.provider, before, state)
