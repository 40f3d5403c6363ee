"""The payment's state machine: which report may move a record where, and what moves with it.

PROCESSING (payagg is calling the provider) -> PENDING (the provider has it, or may have it:
`outcome_unknown`) -> SUCCESS | DECLINED (final, never change) | NOT_CREATED (the provider provably
never received it: final, but a late report showing the payment after all still moves it) |
UNRESOLVED (not final after `reconcile.give_up_after_s`, or a status about another amount: never
guessed, still changed by a late report). Every move is a compare-and-swap of the record
(`proxy/store/payments.py`): a report judged against a record that changed meanwhile is judged
again against the new one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import orjson

from proxy.observability.metrics import GatewayMetrics
from proxy.settings.config import IdempotencySettings
from proxy.store import records
from proxy.store.keys import Shard, payment_sha, shard_for
from proxy.store.payments import PaymentRecords, Swap
from proxy.store.records import KeyState

log = logging.getLogger("payagg.lifecycle")

NOT_FINAL = frozenset({"PROCESSING", "PENDING", "UNRESOLVED"})
SETTLED = frozenset({"SUCCESS", "DECLINED"})  # never change
FINAL = frozenset({*SETTLED, "NOT_CREATED"})
OUTCOME_UNKNOWN = "outcome_unknown"
# Keys of the facts that are the payment's answer to replay.
_ANSWER_KEYS = ("status", "body")
_COMPACT = json.JSONEncoder(separators=(",", ":"))
_AS_JSON_WRITES_THEM = frozenset({str, int, bool, type(None)})


def now_ms() -> int:
    return int(time.time() * 1000)


def count_field(state: str, provider: str) -> str:
    """The gauge counter a record in `state` is counted in (`counts` hash), or ""."""
    if state in ("PROCESSING", "PENDING"):
        return f"pending:{provider}"
    if state == "UNRESOLVED":
        return f"unresolved:{provider}"
    return ""


@dataclass(frozen=True, slots=True)
class Record:
    """A record as read: the exact bytes (for the swap) and what they say."""

    sha: str
    shard: Shard
    value: bytes
    state: KeyState

    @property
    def facts(self) -> Mapping[str, Any]:
        return self.state.facts

    @property
    def name(self) -> str:
        return self.state.state

    @property
    def provider(self) -> str:
        return str(self.facts["provider"])


@dataclass(frozen=True, slots=True)
class Report:
    """What someone learnt about a payment and wants recorded."""

    state: str
    reason: str | None = None
    provider_reference: str | None = None
    # The answer a replay gets (200/402/202 bodies); None: built from the facts.
    answer: tuple[int, bytes] | None = None
    # Only the owner that sent the request may call it not created.
    owner: str | None = None
    due_ms: int | None = None  # for a state not final: when next due
    leased: bool = False
    polls: int | None = None  # status queries so far (the reconciler's backoff)
    # The provider said it holds the payment (pending, already exists): a later "not found" is
    # its inconsistency, never proof that it was not created.
    provider_has_it: bool = False


def payment_body(
    facts: Mapping[str, Any], state: str, reason: str | None, pref: str | None
) -> bytes:
    """The 200 / 402 / 202 body of a payment in `state` (CONTRACT §2), from its facts."""
    body: dict[str, Any]
    transaction_id = facts["transaction_id"]
    if state == "SUCCESS":
        body = {
            "status": "SUCCESS",
            "transaction_id": transaction_id,
            "provider": facts["provider"],
            "provider_reference": pref or facts["reference"],
            "amount": float(Decimal(facts["amount"])),
            "currency": facts["currency"],
        }
    elif state == "DECLINED":
        body = {
            "status": "DECLINED",
            "transaction_id": transaction_id,
            "provider": facts["provider"],
            "reason": reason,
        }
    else:
        body = {
            "status": "PENDING",
            "transaction_id": transaction_id,
            "provider": facts["provider"],
            "provider_reference": pref or facts["reference"],
            "status_url": status_url(transaction_id),
        }
    return compact_json(body)


def compact_json(value: Mapping[str, Any]) -> bytes:
    """`json.dumps(value, separators=(",", ":")).encode()`, byte for byte: answers are replayed
    and rebuilt from tombstones exactly as they were first written.

    orjson writes it at a twentieth of the cost when its bytes are the same: a flat object of
    strings, integers, booleans, None and floats that need no exponent, whose text is printable
    ASCII (json escapes everything else as `\\uXXXX`, orjson only control characters).
    """
    for item in value.values():
        kind = type(item)
        if kind not in _AS_JSON_WRITES_THEM and not (kind is float and 1e-4 <= abs(item) < 1e16):
            return _COMPACT.encode(value).encode()
    try:
        encoded = orjson.dumps(value)
    except orjson.JSONEncodeError:  # an integer beyond 64 bits, a key that is not text
        return _COMPACT.encode(value).encode()
    if encoded.isascii() and b"\x7f" not in encoded:
        return encoded
    return _COMPACT.encode(value).encode()


def status_url(transaction_id: str) -> str:
    return "/v1/payments/" + quote(transaction_id, safe="")


def webhook_body(facts: Mapping[str, Any]) -> bytes:
    """The merchant webhook's exact JSON text (lifecycle-design §2: keys in this order)."""
    body = {
        "transaction_id": facts["transaction_id"],
        "state": facts["state"],
        "provider": facts["provider"],
        "provider_reference": facts.get("provider_reference") or facts["reference"],
        "amount": float(Decimal(facts["amount"])),
        "currency": facts["currency"],
        "reason": facts.get("reason"),
    }
    return compact_json(body)


def tombstone(facts: Mapping[str, Any], fingerprint: str) -> bytes:
    """What stays of a final payment after `result_ttl_s`: enough to refuse a reuse (422) and to
    answer the same request again without calling anyone."""
    compact = {
        "fingerprint": fingerprint,
        "provider": facts["provider"],
        "reference": facts["reference"],
        "provider_reference": facts.get("provider_reference"),
        "amount": facts["amount"],
        "currency": facts["currency"],
        "state": facts["state"],
        "reason": facts.get("reason"),
        "transaction_id": facts["transaction_id"],
    }
    return compact_json(compact)


class Lifecycle:
    """Applies reports to records, atomically, with the metrics and logs they call for."""

    def __init__(
        self,
        records_store: PaymentRecords,
        prefix: str,
        idempotency: IdempotencySettings,
        metrics: GatewayMetrics,
        errors: AbstractContextManager[None],
        enqueue_webhooks: bool = False,
        webhook_clients: frozenset[str] = frozenset(),
    ) -> None:
        self.records = records_store
        self.prefix = prefix
        self._idempotency = idempotency
        self.metrics = metrics
        # Turns Redis failures into StoreUnavailable (`proxy.payments.idempotency`).
        self.errors = errors
        # Without `webhooks.url` nothing delivers them: the outbox would only grow.
        self._enqueue_webhooks = enqueue_webhooks
        # Clients with a webhook target of their own (enqueued even without `webhooks.url`).
        self._webhook_clients = webhook_clients

    def locate(self, transaction_id: str, scope: str = "") -> tuple[str, Shard]:
        sha = payment_sha(transaction_id, scope)
        return sha, shard_for(self.prefix, sha)

    async def read(self, sha: str, shard: Shard) -> Record | None:
        value = await self.records.read(shard, sha)
        return None if value is None else Record(sha, shard, value, records.decode(value))

    async def find(self, transaction_id: str, scope: str = "") -> Record | None:
        return await self.read(*self.locate(transaction_id, scope))

    async def apply(self, record: Record, report: Report) -> Record | None:
        """Record `report`, judged against the record as it is when the swap runs; the record as
        it is afterwards (None if it is gone)."""
        current: Record | None = record
        while current is not None:
            swap = self._judge(current, report)
            if swap is None:
                return current
            clock = now_ms()
            done, holds = await self.records.swap(
                current.shard, current.sha, current.value, swap, clock
            )
            if done:
                after = Record(current.sha, current.shard, swap.value, records.decode(swap.value))
                self._count(current, after, clock)
                return after
            current = (
                None
                if holds is None
                else Record(current.sha, current.shard, holds, records.decode(holds))
            )
        return None

    def _judge(self, record: Record, report: Report) -> Swap | None:
        before = record.name
        target = report.state
        facts = dict(record.facts)
        if before in SETTLED:
            if target in FINAL and target != before:
                self.conflict(record, target, report.reason)
            return None
        if not _may_move(before, target, facts.get("token"), report):
            return None
        provider = str(facts["provider"])
        clock = now_ms()
        facts["state"] = target
        facts["updated_ms"] = clock
        if report.reason is not None or target in FINAL:
            facts["reason"] = report.reason
        if report.provider_reference:
            facts["provider_reference"] = report.provider_reference
        if report.polls is not None:
            facts["polls"] = report.polls
        if report.provider_has_it:
            facts["provider_has_it"] = True
        if target == "PROCESSING":
            facts["token"] = report.owner
            facts["sent_ms"] = clock
        else:
            facts.pop("token", None)
        pref = facts.get("provider_reference")
        status, body = report.answer or (
            {"SUCCESS": 200, "DECLINED": 402}.get(target, 202),
            payment_body(facts, target, facts.get("reason"), pref),
        )
        facts["status"], facts["body"] = status, body.decode("latin-1")
        value = records.lifecycle(facts, record.state.fingerprint)
        swap = Swap(
            value=value,
            count_from=count_field(before, provider) if before != target else "",
            count_to=count_field(target, provider) if before != target else "",
        )
        if target == "UNRESOLVED":
            return swap  # off the schedule: only a late report brings it back
        if target not in FINAL:
            due = report.due_ms if report.due_ms is not None else clock
            return _with(swap, due_ms=due, leased=report.leased)
        idem = self._idempotency
        result_ttl_ms = idem.result_ttl_s * 1000
        final = _with(
            swap,
            ttl_ms=result_ttl_ms,
            tombstone=tombstone(facts, record.state.fingerprint),
            tombstone_ttl_ms=result_ttl_ms + idem.tombstone_ttl_s * 1000,
        )
        client = facts.get("client")
        if not (self._enqueue_webhooks or client in self._webhook_clients):
            return final
        return _with(
            final,
            hook=json.dumps(
                {
                    "body": webhook_body(facts).decode(),
                    "created_ms": clock,
                    "attempts": 0,
                    "target": client,
                },
                separators=(",", ":"),
            ).encode(),
            hook_state=target,
        )

    def conflict(self, record: Record, reported: str, detail: str | None) -> None:
        """A report contradicting a settled payment: logged with both, counted, nothing changed."""
        self.metrics.reconcile_conflicts.labels(record.provider).inc()
        log.error(
            "payment %s is %s, a later report says %s (%s): kept %s",
            record.facts["transaction_id"],
            record.name,
            reported,
            detail,
            record.name,
            extra={
                "fields": {
                    "provider": record.provider,
                    "provider_reference": record.facts.get("reference"),
                    "state": record.name,
                    "reported": reported,
                    "reason": detail,
                }
            },
        )

    def _count(self, before: Record, after: Record, clock: int) -> None:
        if after.name in FINAL and before.name != after.name:
            created = int(after.facts.get("created_ms", clock))
            self.metrics.time_to_final.labels(after.provider).observe((clock - created) / 1000)
        if after.name == "UNRESOLVED" and before.name != "UNRESOLVED":
            log.error(
                "payment %s is UNRESOLVED (%s): an operator must look at it",
                after.facts["transaction_id"],
                after.facts.get("reason"),
                extra={"fields": {"provider": after.provider}},
            )


def _may_move(before: str, target: str, token: Any, report: Report) -> bool:
    """Whether a record in `before` may move to `target` on this report (SETTLED excluded)."""
    if target == "PROCESSING":
        # Only a retry of a payment never created takes it again, under its stored reference.
        return before == "NOT_CREATED" and report.owner is not None
    if target == "NOT_CREATED":
        # Only the sender knows nothing was sent, and only while it still owns the record; a
        # not-found status after the grace period proves it for anyone.
        if before == "PROCESSING":
            return report.owner is not None and token == report.owner
        return before in ("PENDING", "UNRESOLVED") and report.owner is None
    if before == "NOT_CREATED":
        return target in SETTLED or target == "UNRESOLVED"
    return not (target == before and report.due_ms is None)


def _with(swap: Swap, **changes: Any) -> Swap:
    return replace(swap, **changes)
