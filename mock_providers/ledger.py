"""The mock's books: payments by reference, so a repeat is never charged twice, and the stats."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

from mock_providers.faults import Decision, Outcome


@dataclass(frozen=True)
class Payment:
    """A valid payment request, whatever the provider's format."""

    reference: str
    amount: str
    currency: str
    external_id: str


@dataclass(frozen=True)
class Entry:
    """What the mock remembers about a reference: charged, or declined with a reason."""

    payment: Payment
    decline_reason: str | None

    @property
    def charged(self) -> bool:
        return self.decline_reason is None

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

    def as_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Booking:
    """The result of booking a payment: its entry (None for a failure) and the outcome to log."""

    entry: Entry | None
    outcome: str


class Ledger:
    """Entries by reference; a reference's first entry is final."""

    def __init__(self) -> None:
        self.stats = Stats()
        self._entries: dict[str, Entry] = {}

    def find(self, reference: str) -> Entry | None:
        return self._entries.get(reference)

    def book(self, payment: Payment, decision: Decision) -> Booking:
        """Apply `decision` to `payment` unless its reference was booked before."""
        earlier = self._entries.get(payment.reference)
        if earlier is not None:
            self.stats.duplicates += 1
            return Booking(earlier, "duplicate")
        if decision.outcome is Outcome.FAILURE:
            # Nothing happened at the provider, so nothing is remembered: a retry is a new attempt.
            self.stats.failures += 1
            return Booking(None, decision.outcome)
        if decision.outcome is Outcome.DECLINE:
            self.stats.declines += 1
            entry = Entry(payment, decision.decline_reason)
        else:
            # A hang charges too: the money moves, only the answer is lost.
            self.stats.charges += 1
            entry = Entry(payment, None)
        self._entries[payment.reference] = entry
        return Booking(entry, decision.outcome)
