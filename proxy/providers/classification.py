"""What the end of a provider call means: the one place that decides it, breaker included.

In: an answer no mapping rule describes (its HTTP status, readable or not), a rule's outcome, where
a failed exchange stopped (the transport phase), or the exception a call ended in. Out: a
`Classification`: the call's outcome, whether it counts against the provider's breaker, and
whether the payment may be sent again (the provider provably holds nothing of it). The upstream
client raises the error an outcome names, the breaker votes with `of_error`, the pay flow asks
`retry_allowed`; the table in the README and tests/test_classification.py list every case.

May import `proxy.errors` only: the config compiler reaches it through `mapping`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from proxy.errors import (
    Overloaded,
    PaymentAlreadyExists,
    ProviderBusy,
    ProviderFailed,
    ProviderMismatch,
    ProviderNotReached,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
)

# What a mapping's rules (or, failing them, `unmatched`) read in one answer.
AnswerOutcome = Literal[
    "success",
    "declined",
    "pending",
    "not_found",
    "already_exists",
    "failure",
    "busy",
    "rejected",
]
# ... and how else a call can end.
CallOutcome = (
    AnswerOutcome | Literal["unknown", "not_sent", "mismatch", "overloaded", "breaker_open"]
)

# Answers that mean the provider cannot serve us right now (rate limited, or it gave up waiting
# for our request). By default they count as breaker failures (`breaker.failure_statuses`); in
# any case they never show a half-open breaker that the provider serves again.
BUSY_STATUSES = (408, 429)
# What an egress proxy answers when it got no answer from the provider; it may have forwarded
# the request first.
PROXY_GAVE_UP = frozenset({502, 504})


class BreakerVote(Enum):
    """What a call's end tells the provider's breaker."""

    UP = "up"  # the provider answered as a working one does: a success; it closes a half-open one
    DOWN = "down"  # a sign of an outage: a failure; it reopens a half-open breaker
    BUSY = "busy"  # up but not serving us: a success in the window, a trial stays undecided
    NONE = "none"  # nothing about the provider (payagg's own shortage): not counted at all


class Phase(Enum):
    """How far a provider exchange got; where a failed one stopped decides what it means."""

    POOL = "waiting for a pool slot"
    CONNECT = "connecting"
    SENT = "sent"


@dataclass(frozen=True, slots=True)
class Classification:
    outcome: CallOutcome
    vote: BreakerVote
    # The provider provably holds nothing of this payment: it may be sent again (the record
    # becomes NOT_CREATED). Otherwise only the status query may tell.
    retry_allowed: bool

    @property
    def counts_against_breaker(self) -> bool:
        return self.vote is BreakerVote.DOWN


SUCCESS = Classification("success", BreakerVote.UP, retry_allowed=False)
DECLINED = Classification("declined", BreakerVote.UP, retry_allowed=False)
PENDING = Classification("pending", BreakerVote.UP, retry_allowed=False)
NOT_FOUND = Classification("not_found", BreakerVote.UP, retry_allowed=False)
# MTN's 409 RESOURCE_ALREADY_EXIST: a proper answer, but it may have charged the reference.
ALREADY_EXISTS = Classification("already_exists", BreakerVote.UP, retry_allowed=False)
# A proper answer about another amount or currency under this reference (a record payagg lost).
MISMATCH = Classification("mismatch", BreakerVote.UP, retry_allowed=False)
# A 4xx that no rule calls a decline: the provider is up and refused the request itself.
REJECTED = Classification("rejected", BreakerVote.UP, retry_allowed=True)
BUSY = Classification("busy", BreakerVote.BUSY, retry_allowed=True)
# A 5xx, an unreadable answer, a counted 408/429: the provider may have created the payment.
FAILURE = Classification("failure", BreakerVote.DOWN, retry_allowed=False)
# Connection refused, DNS, TLS, no access token: no byte of the payment left payagg.
NOT_SENT = Classification("not_sent", BreakerVote.DOWN, retry_allowed=True)
# A timeout or reset after the request was handed over: the provider may have charged it.
UNKNOWN = Classification("unknown", BreakerVote.DOWN, retry_allowed=False)
OVERLOADED = Classification("overloaded", BreakerVote.NONE, retry_allowed=True)
BREAKER_OPEN = Classification("breaker_open", BreakerVote.NONE, retry_allowed=True)

_OF_ANSWER: dict[AnswerOutcome, Classification] = {
    "success": SUCCESS,
    "declined": DECLINED,
    "pending": PENDING,
    "not_found": NOT_FOUND,
    "already_exists": ALREADY_EXISTS,
    "failure": FAILURE,
    "busy": BUSY,
    "rejected": REJECTED,
}

# Most specific first: the first class an error is an instance of decides.
_OF_ERROR: tuple[tuple[type[BaseException], Classification], ...] = (
    (ProviderMismatch, MISMATCH),
    (PaymentAlreadyExists, ALREADY_EXISTS),
    (ProviderTimeout, UNKNOWN),  # OutcomeUnknown among them
    (ProviderNotReached, NOT_SENT),
    (ProviderBusy, BUSY),
    (ProviderRejected, REJECTED),
    (ProviderFailed, FAILURE),
    (Overloaded, OVERLOADED),
    (ProviderUnavailable, BREAKER_OPEN),
)


def unmatched(
    status: int, readable: bool, failure_statuses: Iterable[int]
) -> tuple[AnswerOutcome, str]:
    """An answer no mapping rule describes: failure, busy or rejected, and why."""
    if status in failure_statuses:
        return "failure", f"provider answered HTTP {status} (breaker.failure_statuses)"
    if status in BUSY_STATUSES:
        return "busy", f"provider cannot serve us now (HTTP {status})"
    if 400 <= status < 500:
        return "rejected", f"provider refused the request with HTTP {status}"
    if not readable:
        return "failure", f"unreadable answer (HTTP {status}, not JSON)"
    return "failure", f"provider answered HTTP {status}"


def of_answer(outcome: AnswerOutcome, status: int, via_egress_proxy: bool) -> Classification:
    """A provider's answer, as its mapping read it."""
    if outcome == "failure" and via_egress_proxy and status in PROXY_GAVE_UP:
        return UNKNOWN
    return _OF_ANSWER[outcome]


def of_transport(phase: Phase, timed_out: bool, out_of_resources: bool) -> Classification:
    """An exchange that ended without an answer, by where it stopped."""
    if phase is Phase.SENT:
        return UNKNOWN
    if phase is Phase.POOL and timed_out:
        return OVERLOADED  # no pool slot became free: payagg's own shortage
    if out_of_resources and not timed_out:
        return OVERLOADED  # out of file descriptors or buffers, before sending anything
    return NOT_SENT


def of_error(error: BaseException) -> Classification:
    """The error a provider call ended in. Anything unforeseen (a bug, a cancellation) counts
    against the breaker: a half-open trial must end, and end its slot, in a decision."""
    for kind, classification in _OF_ERROR:
        if isinstance(error, kind):
            return classification
    return UNKNOWN
