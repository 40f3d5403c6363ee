"""The reconciler: every payment not final is asked about until it is, by whoever leases it.

Each proxy process runs one. A pass leases the due payments of every shard (their due time
becomes the lease's end, so a crashed process's payments fall due again and another takes them
over; two processes never poll one payment at once), asks each provider's status endpoint, applies
the answer with an atomic transition and reschedules the rest: from 1 s, doubling, capped at
`reconcile.max_interval_s`. A payment still not final after `reconcile.give_up_after_s` is
UNRESOLVED. An open breaker pauses a provider's polling without failing anything; a 429 slows it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from proxy.errors import PaymentError, ProviderBusy, ProviderUnavailable, StoreUnavailable
from proxy.payments.lifecycle import FINAL, OUTCOME_UNKNOWN, Lifecycle, Record, Report, now_ms
from proxy.providers.breaker import ProviderBreaker
from proxy.providers.mapping import ProviderAnswer
from proxy.settings.config import ReconcileSettings
from proxy.store.keys import Shard, all_shards

log = logging.getLogger("payagg.reconciler")

_FIRST_INTERVAL_S = 1.0
_LEASE_MARGIN_S = 5.0
_BATCH = 100
_IDLE_S = 0.5
_MAX_PAUSE_S = 5.0


class StatusSource(Protocol):
    """What the reconciler needs of a provider (`proxy.providers.upstream.ProviderClient`)."""

    name: str
    has_status: bool
    not_found_grace_s: float
    timeout_s: float

    breaker: ProviderBreaker

    async def query_status(
        self, reference: str, provider_reference: str | None = None, past_breaker: bool = False
    ) -> ProviderAnswer: ...


@dataclass(frozen=True, slots=True)
class Polled:
    """One payment handled by a pass: what it was, what was asked, what it is now."""

    transaction_id: str
    provider: str
    before: str
    result: str
    after: str


class AnotherPayment(Exception):
    """The provider's final answer is about another amount or currency than the record's."""

    def __init__(self, answer: ProviderAnswer) -> None:
        super().__init__("the provider's answer is about another payment")
        self.answer = answer


async def settle_from_status(
    lifecycle: Lifecycle,
    provider: StatusSource,
    record: Record,
    past_breaker: bool = False,
    refuse_mismatch: bool = False,
) -> tuple[str, Record | None]:
    """Ask the provider once and apply what its answer proves: (the poll's result, the record
    afterwards or None when nothing was learnt). A failed query changes nothing.

    A final answer about another amount or currency makes the payment UNRESOLVED, or, with
    `refuse_mismatch`, raises AnotherPayment for the caller to decide.
    """
    facts = record.facts
    polls = lifecycle.metrics.reconcile_polls
    try:
        answer = await provider.query_status(
            str(facts["reference"]), facts.get("provider_reference"), past_breaker
        )
    except ProviderUnavailable:
        polls.labels(provider.name, "breaker_open").inc()
        return "breaker_open", None
    except ProviderBusy:
        polls.labels(provider.name, "busy").inc()
        return "busy", None
    except (PaymentError, LookupError):
        polls.labels(provider.name, "failed").inc()
        return "failed", None
    outcome: str = answer.outcome
    polls.labels(provider.name, outcome).inc()
    if outcome in ("success", "declined"):
        if answer.contradicts(Decimal(str(facts["amount"])), str(facts["currency"])):
            if refuse_mismatch:
                raise AnotherPayment(answer)
            lifecycle.metrics.provider_mismatches.labels(provider.name).inc()
            log.error(
                "%s reports payment %s with another amount or currency (%s %s, recorded %s %s):"
                " UNRESOLVED",
                provider.name,
                facts["transaction_id"],
                answer.amount,
                answer.currency,
                facts["amount"],
                facts["currency"],
            )
            return outcome, await lifecycle.apply(
                record, Report("UNRESOLVED", reason="provider_mismatch")
            )
        state = "SUCCESS" if outcome == "success" else "DECLINED"
        report = Report(state, reason=answer.reason, provider_reference=answer.provider_reference)
        return outcome, await lifecycle.apply(record, report)
    sent_ms = int(facts.get("sent_ms", facts["created_ms"]))
    proven = not facts.get("provider_has_it")
    if (
        outcome == "not_found"
        and proven
        and now_ms() - sent_ms >= provider.not_found_grace_s * 1000
    ):
        return outcome, await lifecycle.apply(record, Report("NOT_CREATED", reason="not_found"))
    return outcome, None


class Reconciler:
    """Leases, polls and reschedules the due payments of every shard."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        providers: Mapping[str, StatusSource],
        settings: ReconcileSettings,
    ) -> None:
        self._lifecycle = lifecycle
        self._providers = dict(providers)
        self._settings = settings
        longest_s = max((client.timeout_s for client in providers.values()), default=0.0)
        self._lease_ms = int((longest_s + _LEASE_MARGIN_S) * 1000)
        self._shards = all_shards(lifecycle.prefix)

    async def run(self) -> None:
        """Pass after pass until cancelled; a store outage only pauses it, longer each time."""
        pause_s = _IDLE_S
        while True:
            # First a pause: a process starting up answers its readiness probe before its
            # reconciler's first questions to Redis.
            await asyncio.sleep(pause_s)
            try:
                handled = await self.pass_once()
            except StoreUnavailable:
                pause_s = min(pause_s * 2, _MAX_PAUSE_S)
                continue
            except Exception:
                log.exception("reconciliation pass failed; the next one retries")
                handled = []
            pause_s = 0 if handled else _IDLE_S

    async def pass_once(self) -> list[Polled]:
        """Lease every payment due now, handle each, say what happened."""
        handled: list[Polled] = []
        records = self._lifecycle.records
        for shard in self._shards:
            clock = now_ms()
            with self._lifecycle.errors:
                due = await records.lease(shard, clock, clock + self._lease_ms, _BATCH)
            if due:
                done = await asyncio.gather(*(self._reconcile(shard, sha) for sha in due))
                handled.extend(done)
        return handled

    async def _reconcile(self, shard: Shard, sha: str) -> Polled:
        lifecycle = self._lifecycle
        with lifecycle.errors:
            record = await lifecycle.read(sha, shard)
            if record is None or record.name in FINAL:
                await lifecycle.records.drop(shard, sha)
                name = "GONE" if record is None else record.name
                return Polled(sha, "", name, "dropped", name)
            return await self._poll(record)

    async def _poll(self, record: Record) -> Polled:
        lifecycle = self._lifecycle
        before = record.name
        tid = str(record.facts["transaction_id"])
        provider = self._providers.get(record.provider)
        if before == "PROCESSING":
            # Its owner is gone (the lease ran out): sent or not, nobody knows.
            record = await self._apply(
                record,
                Report(
                    "PENDING",
                    reason=OUTCOME_UNKNOWN,
                    due_ms=now_ms() + self._lease_ms,
                    leased=True,
                ),
            )
        result = "no_status"
        if provider is not None and provider.has_status:
            result, after = await settle_from_status(lifecycle, provider, record)
            if after is not None:
                record = after
        if record.name in FINAL:
            return Polled(tid, record.provider, before, result, record.name)
        if record.name == "UNRESOLVED":
            # Brought back by a late callback and still not final: off the schedule again.
            await lifecycle.records.drop(record.shard, record.sha)
            return Polled(tid, record.provider, before, result, record.name)
        age_s = (now_ms() - int(record.facts["created_ms"])) / 1000
        if age_s >= self._settings.give_up_after_s:
            record = await self._apply(record, Report("UNRESOLVED", reason="gave_up"))
            return Polled(tid, record.provider, before, result, record.name)
        polls = int(record.facts.get("polls", 0))
        delay_s = min(_FIRST_INTERVAL_S * 2**polls, self._settings.max_interval_s)
        if result == "breaker_open" and provider is not None:
            delay_s = max(provider.breaker.retry_after_s(), _FIRST_INTERVAL_S)  # paused, not failed
            polls -= 1
        elif result == "busy":
            delay_s = min(delay_s * 2, self._settings.max_interval_s)  # asked to slow down
        report = Report(record.name, due_ms=now_ms() + int(delay_s * 1000), polls=polls + 1)
        record = await self._apply(record, report)
        return Polled(tid, record.provider, before, result, record.name)

    async def _apply(self, record: Record, report: Report) -> Record:
        after = await self._lifecycle.apply(record, report)
        return record if after is None else after
