"""Seeded fault injection: the dialled-in rates, their validation, and one decision per payment."""

from __future__ import annotations

import dataclasses
import enum
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

RATE_FIELDS = ("failure_rate", "decline_rate", "hang_rate")
RATES_SUM_FIELD = "+".join(RATE_FIELDS)


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
    """A latency range in milliseconds: [lo, hi] with 0 <= lo <= hi."""
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

    def __post_init__(self) -> None:
        for name in RATE_FIELDS:
            check_rate(name, getattr(self, name))
        check_latency("latency_ms", self.latency_ms)
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
                check_latency(name, value) if name == "latency_ms" else check_rate(name, value)
            )
        return dataclasses.replace(self, **checked)  # type: ignore[arg-type]

    def as_json(self) -> dict[str, object]:
        return {
            "failure_rate": self.failure_rate,
            "decline_rate": self.decline_rate,
            "latency_ms": list(self.latency_ms),
            "hang_rate": self.hang_rate,
        }


@dataclass(frozen=True)
class Decision:
    """The fate of one payment request; `decline_reason` only matters for a decline."""

    outcome: Outcome
    latency_s: float
    decline_reason: str


class Faults:
    """The current config and the one random stream every decision is drawn from."""

    def __init__(
        self, config: FaultConfig, seed: int | None, decline_reasons: Sequence[str]
    ) -> None:
        self.config = config
        self._rng = random.Random(seed)
        self._decline_reasons = tuple(decline_reasons)

    def decide(self) -> Decision:
        # Always the same three draws in the same order, whatever the outcome, so the n-th
        # payment's decision depends only on the seed, n and the config at that moment.
        roll = self._rng.random()
        latency_ms = self._rng.uniform(*self.config.latency_ms)
        reason = self._decline_reasons[self._rng.randrange(len(self._decline_reasons))]
        return Decision(self._outcome(roll), latency_ms / 1000, reason)

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
