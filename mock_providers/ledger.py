"""The mock's books: payments by reference (pending until due, then final, never charged twice)
and the stats."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import heapq
from dataclasses import dataclass, field
from typing import Any

from mock_providers.faults import Decision, Outcome


@dataclass(frozen=True)
class Payment:
    """A valid payment request, whatever the provider's format."""

    reference: str
    amount: str
    currency: str
    external_id: str
    callback_url: str | None = None
    # Request fields the provider echoes in its status resource (MTN: payer, messages).
    echo: dict[str, Any] = field(default_factory=dict, compare=False)


class State(enum.StrEnum):
    PENDING = "PENDING"
    SUCCESSFUL = "SUCCESSFUL"
    FAILED = "FAILED"


@dataclass
class Entry:
    """A created payment: PENDING until `due`, then SUCCESSFUL, or FAILED with `fate` as reason."""

    payment: Payment
    fate: str | None  # None: the payer approves; else the reason it fails (decline, expiry)
    due: float  # on the mock's clock
    state: State = State.PENDING

    @property
    def charged(self) -> bool:
        return self.state is State.SUCCESSFUL

    @property
    def reason(self) -> str | None:
        return self.fate if self.state is State.FAILED else None

    @property
    def provider_transaction_id(self) -> str:
        # Derived from the reference rather than drawn, so ids are the same on every run.
        digest = hashlib.sha256(self.payment.reference.encode()).digest()
        return str(int.from_bytes(digest[:8]) % 10**10).zfill(10)


@dataclass
class Stats:
    """The counters GET /__mock/stats reports (CONTRACT section 5)."""

    requests: int = 0
    charges: int = 0
    declines: int = 0
    failures: int = 0
    duplicates: int = 0
    pending: int = 0
    tokens_issued: int = 0
    unauthorized: int = 0
    callbacks_sent: int = 0
    callbacks_failed: int = 0

    def as_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Booking:
    """The result of booking a payment: its entry (None for a failure), the outcome to log, and
    whether it repeats an earlier reference."""

    entry: Entry | None
    outcome: str

    @property
    def duplicate(self) -> bool:
        return self.outcome == "duplicate"


class Ledger:
    """Entries by reference; a reference's first entry is the only one, and turns final once."""

    def __init__(self) -> None:
        self.stats = Stats()
        self._entries: dict[str, Entry] = {}
        # Pending entries by due time (and booking order), so settling costs only what is due.
        self._due: list[tuple[float, int, Entry]] = []

    def find(self, reference: str) -> Entry | None:
        return self._entries.get(reference)

    def book(self, payment: Payment, decision: Decision, now: float, approval: Approval) -> Booking:
        """Apply `decision` to `payment` unless its reference was booked before."""
        earlier = self._entries.get(payment.reference)
        if earlier is not None:
            self.stats.duplicates += 1
            return Booking(earlier, "duplicate")
        if decision.outcome is Outcome.FAILURE:
            # Nothing happened at the provider, so nothing is remembered: a retry is a new attempt.
            self.stats.failures += 1
            return Booking(None, decision.outcome)
        refused_at_once = decision.outcome is Outcome.DECLINE and approval.sync_declines
        if decision.abandoned and not refused_at_once:
            entry = Entry(payment, approval.expiry_reason, now + approval.timeout_s)
        elif decision.outcome is Outcome.DECLINE:
            # A synchronous decline is refused on the POST itself, so it is final at once.
            delay = 0.0 if refused_at_once else decision.approval_s
            entry = Entry(payment, decision.decline_reason, now + delay)
        else:
            # A hang is created too: the payer approves it like any other, only the answer is
            # lost. It is charged once, when it turns SUCCESSFUL.
            entry = Entry(payment, None, now + decision.approval_s)
        self._entries[payment.reference] = entry
        heapq.heappush(self._due, (entry.due, len(self._entries), entry))
        self.stats.pending += 1
        return Booking(entry, decision.outcome)

    def settle(self, now: float) -> list[Entry]:
        """Turn every pending entry that is due final; returns them, the earliest due first."""
        settled = []
        while self._due and self._due[0][0] <= now:
            entry = heapq.heappop(self._due)[2]
            self.stats.pending -= 1
            if entry.fate is None:
                entry.state = State.SUCCESSFUL
                self.stats.charges += 1
            else:
                entry.state = State.FAILED
                self.stats.declines += 1
            settled.append(entry)
        return settled

    def next_due(self) -> float | None:
        return self._due[0][0] if self._due else None


@dataclass(frozen=True)
class Approval:
    """How a created payment ends besides approval: an abandoned one fails with
    `expiry_reason` after `timeout_s`; with `sync_declines` a decline is refused on the POST."""

    expiry_reason: str
    timeout_s: float
    sync_declines: bool = False
