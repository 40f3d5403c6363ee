"""Seeded fault injection: the dialled-in rates, their validation, and one decision per payment."""

from __future__ import annotations

import dataclasses
import enum
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# The three outcomes one roll chooses between, so their rates share [0, 1].
RATE_FIELDS = ("failure_rate", "decline_rate", "hang_rate")
RATES_SUM_FIELD = "+".join(RATE_FIELDS)
# Rates drawn on their own: whether a created payment's payer ever approves, whether a status
# query fails.
OWN_RATE_FIELDS = ("abandon_rate", "status_failure_rate")
RANGE_FIELDS = ("latency_ms", "approval_ms")


class Outcome(enum.StrEnum):
    """What the mock does with a new payment."""

    SUCCESS = "success"
    DECLINE = "decline"
    FAILURE = "failure"
    HANG = "hang"


class InvalidFaultConfig(ValueError):
    """A fault setting out of range; `field` names it as the admin API and the CLI spell it."""

    def __init__(self, field: str | None, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem


def check_rate(field: str, value: object) -> float:
    """A probability: a number in [0, 1]."""
    # bool is an int subclass; `true` in JSON is a typo, not a rate of 1.
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise InvalidFaultConfig(field, f"must be a number in [0, 1], got {value!r}")
    if not 0 <= value <= 1:
        raise InvalidFaultConfig(field, f"must be in [0, 1], got {value!r}")
    return float(value)


def check_latency(field: str, value: object) -> tuple[float, float]:
    """A range of milliseconds (latency, approval delay): [lo, hi] with 0 <= lo <= hi."""
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise InvalidFaultConfig(field, f"must be [lo, hi] in milliseconds, got {value!r}")
    lo, hi = value
    for bound in (lo, hi):
        if (
            isinstance(bound, bool)
            or not isinstance(bound, int | float)
            or not math.isfinite(bound)
        ):
            raise InvalidFaultConfig(field, f"bounds must be numbers, got {value!r}")
    if not 0 <= lo <= hi:
        raise InvalidFaultConfig(field, f"must satisfy 0 <= lo <= hi, got {value!r}")
    return float(lo), float(hi)


@dataclass(frozen=True)
class FaultConfig:
    """The faults currently dialled in; every instance is valid."""

    failure_rate: float = 0.0
    decline_rate: float = 0.0
    latency_ms: tuple[float, float] = (0.0, 0.0)
    hang_rate: float = 0.0
    # 0,0: the payer approves at once, so a payment is final when its POST is answered.
    approval_ms: tuple[float, float] = (0.0, 0.0)
    abandon_rate: float = 0.0
    status_failure_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in (*RATE_FIELDS, *OWN_RATE_FIELDS):
            check_rate(name, getattr(self, name))
        for name in RANGE_FIELDS:
            check_latency(name, getattr(self, name))
        total = self.failure_rate + self.decline_rate + self.hang_rate
        if total > 1:
            raise InvalidFaultConfig(RATES_SUM_FIELD, f"must add up to at most 1, got {total:g}")

    def updated(self, changes: Mapping[str, object]) -> FaultConfig:
        """This config with `changes` (as PUT /__mock/config sends them) applied."""
        known = {field.name for field in dataclasses.fields(self)}
        checked: dict[str, object] = {}
        for name, value in changes.items():
            if name not in known:
                raise InvalidFaultConfig(
                    name, f"unknown setting; known: {', '.join(sorted(known))}"
                )
            checked[name] = (
                check_latency(name, value) if name in RANGE_FIELDS else check_rate(name, value)
            )
        return dataclasses.replace(self, **checked)  # type: ignore[arg-type]

    def as_json(self) -> dict[str, object]:
        return {
            "failure_rate": self.failure_rate,
            "decline_rate": self.decline_rate,
            "latency_ms": list(self.latency_ms),
            "hang_rate": self.hang_rate,
            "approval_ms": list(self.approval_ms),
            "abandon_rate": self.abandon_rate,
            "status_failure_rate": self.status_failure_rate,
        }


@dataclass(frozen=True)
class Decision:
    """The fate of one payment request; `decline_reason` only matters for a decline, the
    approval fields only for a payment that gets created."""

    outcome: Outcome
    latency_s: float
    decline_reason: str
    approval_s: float
    abandoned: bool


class Faults:
    """The current config and the one random stream every decision is drawn from."""

    def __init__(
        self, config: FaultConfig, seed: int | None, decline_reasons: Sequence[str]
    ) -> None:
        self.config = config
        self._rng = random.Random(seed)
        # Status queries draw from their own stream: how often a client polls depends on
        # timing, and must not shift the payments' decisions.
        self._status_rng = random.Random(None if seed is None else f"{seed}:status")
        self._decline_reasons = tuple(decline_reasons)

    def decide(self) -> Decision:
        # Always the same five draws in the same order, whatever the outcome, so the n-th
        # payment's decision depends only on the seed, n and the config at that moment.
        roll = self._rng.random()
        latency_ms = self._rng.uniform(*self.config.latency_ms)
        reason = self._decline_reasons[self._rng.randrange(len(self._decline_reasons))]
        approval_ms = self._rng.uniform(*self.config.approval_ms)
        abandoned = self._rng.random() < self.config.abandon_rate
        return Decision(
            self._outcome(roll), latency_ms / 1000, reason, approval_ms / 1000, abandoned
        )

    def status_fails(self) -> bool:
        return self._status_rng.random() < self.config.status_failure_rate

    def _outcome(self, roll: float) -> Outcome:
        threshold = 0.0
        for outcome, rate in (
            (Outcome.FAILURE, self.config.failure_rate),
            (Outcome.DECLINE, self.config.decline_rate),
            (Outcome.HANG, self.config.hang_rate),
        ):
            threshold += rate
            if roll < threshold:
                return outcome
        return Outcome.SUCCESS
