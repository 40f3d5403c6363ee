"""Redis-backed idempotency: one owner per payment at a time, every answer kept (CONTRACT §2).

A payment's identity is its TransactionID. Its record lives at a shard key
(`proxy/store/keys.py`) and is written, PROCESSING and scheduled for reconciliation, by one script
before the request leaves payagg (`proxy/store/payments.py`); it never expires before it is final.
An owner that is gone only hands over the right to act: the reconciler finds the record due and
asks the provider (`proxy/payments/reconciler.py`). An `Idempotency-Key` header is bound to its
TransactionID under a key of its own, and the provider reference is bound to the payment, before
the claim: every script touches keys of one hash slot (Redis Cluster).

Records of the versions before stay where they were (`<prefix><sha256(TransactionID)>`, and the
header's key while old processes may have written there) and are honoured: a final one is
replayed, one in flight is 409, one made for another request is 422 (`proxy/records.py`). The
TransactionID's old key is read only while such a record can exist: for twice `result_ttl_s`
after the first process of the lifecycle started, and never in a store that held no key under
the prefix then (`_LIFECYCLE_SINCE`).

Every answer is read from Redis: no process keeps a copy that Redis may have lost since, so two
processes never disagree about a payment (BENCHMARKS.md, "The per-process replay cache").
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from proxy.errors import KeyReused, PaymentError, RequestInProgress, StoreUnavailable
from proxy.observability.metrics import GatewayMetrics
from proxy.payments.lifecycle import (
    Lifecycle,
    Record,
    Report,
    compact_json,
    count_field,
    now_ms,
    payment_body,
)
from proxy.payments.request import Payment, reference_for, scoped
from proxy.settings.config import IdempotencySettings, RedisSettings
from proxy.store import records
from proxy.store.client import RedisReplyError, RedisUnavailable, Script, StoreClient
from proxy.store.keys import reference_key
from proxy.store.payments import PaymentRecords
from proxy.store.records import KeyState, StoredResult
from proxy.store.tokens import unique_tokens

log = logging.getLogger("payagg.idempotency")

# Take a key or say what is there: the guard left under a header's old key.
_CLAIM = Script("""
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return false end
return redis.call('GET', KEYS[1])
""")
# Bind a header value to a TransactionID, or say which one it is bound to; a binding to the same
# TransactionID is kept alive as long as that payment is retried.
_BIND = Script("""
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return false end
local bound = redis.call('GET', KEYS[1])
if bound == ARGV[1] then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return bound
""")
# Delete a key only while it holds ARGV[1].
_UNBIND = Script("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
""")
_BINDING = b"idempotency-key:"
# When the first process keying records by TransactionID started: records keyed by the header
# may exist until `result_ttl_s` after the last old process wrote one. Kept without expiry.
_IDENTITY_SINCE = b"identity-by-transaction-id-since"
# Twice result_ttl_s: covers the records old processes write during a rolling deploy shorter than
# result_ttl_s itself.
_LEGACY_WINDOWS = 2
# When the first process keeping records at shard keys started (unix seconds), or `fresh`: there
# was no key under the prefix then, so no version before ever wrote a record to this store. Read
# (and, the first time, written) once per process; kept without expiry. The versions before wrote
# records under a TransactionID's own key until their processes stopped: such a record lives
# result_ttl_s at most, so after twice result_ttl_s (a rolling deploy shorter than result_ttl_s)
# none is left and that key is no longer read. Set by hand to a unix time, it opens the window
# again (docs/performance.md).
_LIFECYCLE_SINCE = b"lifecycle-since"
_FRESH = b"fresh"
_new_lock_token = unique_tokens()
# Bounds the memory of unanswered claims when Redis stays away; the reconciler settles the rest.
_MAX_UNANSWERED = 10_000


class IdempotencyStore:
    """The only place that talks to Redis; its errors become StoreUnavailable here."""

    def __init__(
        self,
        settings: RedisSettings,
        ttl: IdempotencySettings,
        metrics: GatewayMetrics,
        enqueue_webhooks: bool = False,
        webhook_clients: frozenset[str] = frozenset(),
    ) -> None:
        self._prefix = settings.key_prefix.encode()
        self._ttl = ttl
        self._metrics = metrics
        self._redis = StoreClient(settings)
        self.errors = _StoreErrors(metrics)
        self.lifecycle = Lifecycle(
            PaymentRecords(self._redis),
            settings.key_prefix,
            ttl,
            metrics,
            self.errors,
            enqueue_webhooks,
            webhook_clients,
        )
        self._legacy_until: float | None = None
        # Until when a record of the versions before may be under a TransactionID's old key
        # (unix seconds; 0: never): None until read from the store (`_old_records_until`).
        self._old_until: float | None = None
        self._finding_old_until: asyncio.Future[float] | None = None
        # Claims whose reply never came, by payment (see `claim`).
        self._unanswered: dict[str, Record] = {}
        self._releasing: asyncio.Future[None] | None = None
        if ttl.replay_cache_size is not None:
            log.warning(
                "idempotency.replay_cache_size is deprecated and ignored: every replay is read "
                "from Redis, so no process answers what Redis no longer holds; remove the key"
            )

    def redis_key(self, transaction_id: str, scope: str = "") -> bytes:
        """Where this version keeps the payment's record."""
        sha, shard = self.lifecycle.locate(transaction_id, scope)
        return shard.payment(sha)

    def old_key(self, identity: str) -> bytes:
        """Where the versions before kept a record keyed by this TransactionID or header."""
        return self._prefix + _hashed(identity)

    def binding_key(self, idempotency_key: str, scope: str = "") -> bytes:
        return self._prefix + _BINDING + _hashed(scoped(scope, idempotency_key))

    async def claim(
        self,
        payment: Payment,
        provider: str,
        hold_s: float,
        callback_token: str | None = None,
        reference: str | None = None,
    ) -> Claim | StoredResult:
        """Own the payment for `hold_s` (then the reconciler may take it over), or get its
        replay; raises RequestInProgress, KeyReused, StoreUnavailable. `callback_token`: the
        token of the payment's callback URL, by which a callback finds it. `reference`: the
        request's provider reference, when the caller has it already (`Claim.reference` is
        the one stored, which a retry of a payment never created keeps)."""
        if self._unanswered:
            await self._release_unanswered()
        if self._old_until is None:  # looked for before this process writes a key of its own
            await self._old_records_until()
        fingerprint = payment.fingerprint(provider)
        if payment.idempotency_key is not None:
            await self._bind(payment.idempotency_key, payment.transaction_id, payment.scope)
        # Versions before clients kept open-scope records only.
        old = None if payment.scope else await self._old_answer(payment, provider, fingerprint)
        if old is not None:
            return old
        lifecycle = self.lifecycle
        sha, shard = lifecycle.locate(payment.transaction_id, payment.scope)
        token = _new_lock_token()
        clock = now_ms()
        reference = reference or payment.provider_reference(provider)
        value = _processing_record(
            payment, provider, fingerprint, reference, payment.idempotency_key, token, clock
        )
        due_ms = clock + int(hold_s * 1000)
        ref_ttl_s = self._ttl.result_ttl_s + self._ttl.tombstone_ttl_s
        with self.errors:
            if callback_token is not None:
                # Before the claim, so a callback that comes back before the answer finds it.
                await self._redis.execute(
                    b"SET",
                    reference_key(lifecycle.prefix, provider, callback_token),
                    f"{sha} {shard.number} {reference}",
                    b"EX",
                    ref_ttl_s,
                )
            try:
                found = await lifecycle.records.claim(
                    shard, sha, value, due_ms, count_field("PROCESSING", provider)
                )
            except (RedisUnavailable, OSError):
                # Redis may still run it when it wakes up (stalled, not dead), leaving a record
                # nobody sends: undone, if exactly this value is still there, before the next
                # claim; else the reconciler settles it once its hold ends.
                self._remember_unanswered(Record(sha, shard, value, records.decode(value)))
                raise
            if found.kind == "tombstone" and found.value is not None:
                answer = _tombstone_answer(found.value, fingerprint)
                if answer is not None:
                    return answer
                found = await lifecycle.records.claim(
                    shard, sha, value, due_ms, count_field("PROCESSING", provider), True
                )
        if found.kind == "claimed":
            record = Record(sha, shard, value, records.decode(value))
            return Claim(self, record, payment, fingerprint, reference, token)
        assert found.value is not None
        record = Record(sha, shard, found.value, records.decode(found.value))
        if record.state.fingerprint != fingerprint:
            raise KeyReused()
        if record.name != "NOT_CREATED":
            return judge(record.state, fingerprint)
        # Provably never received: it starts again, with the reference stored at the first claim.
        with self.errors:
            retaken = await lifecycle.apply(
                record, Report("PROCESSING", owner=token, due_ms=due_ms, leased=True)
            )
        if retaken is None or retaken.facts.get("token") != token:
            raise RequestInProgress()
        return Claim(self, retaken, payment, fingerprint, str(retaken.facts["reference"]), token)

    async def replay(self, payment: Payment, provider: str) -> StoredResult | None:
        """The stored answer, without claiming anything (the provider's breaker is open): None
        when there is none; raises RequestInProgress, KeyReused, StoreUnavailable."""
        if payment.idempotency_key is not None:
            with self.errors:
                bound = await self._redis.execute(
                    b"GET", self.binding_key(payment.idempotency_key, payment.scope)
                )
            if bound is not None and bound != payment.transaction_id.encode():
                raise _key_bound_elsewhere()
        old: KeyState | None = None
        if not payment.scope and await self._reads_old_keys():
            # Both reads at once: they go to Redis in one pipeline, so a fail-fast answer costs
            # one round trip, not two, while records of the versions before may still exist.
            record, old = await asyncio.gather(
                self.find(payment.transaction_id, payment.scope),
                self._peek_old(payment.transaction_id),
            )
        else:
            record = await self.find(payment.transaction_id, payment.scope)
        if record is None and old is None and (payment.scope or payment.idempotency_key is None):
            return None  # nothing to judge (the usual fail-fast answer): no fingerprint needed
        fingerprint = payment.fingerprint(provider)
        if record is not None:
            if record.name == "NOT_CREATED" and record.state.fingerprint == fingerprint:
                return None  # nothing to replay: a retry starts again
            return judge(record.state, fingerprint)
        if old is not None:
            return judge(old, fingerprint)
        return await self._old_header_answer(payment, provider, fingerprint, guard=False)

    async def find(self, transaction_id: str, scope: str = "") -> Record | None:
        # A claim this process knows nobody sends is undone first, so that a lookup or a
        # fail-fast replay never shows it as a payment in flight (the claim does the same).
        if self._unanswered:
            await self._release_unanswered()
        with self.errors:
            return await self.lifecycle.find(transaction_id, scope)

    async def peek_old(self, transaction_id: str, scope: str = "") -> KeyState | None:
        """A record of the versions before under this TransactionID's old key (which knew no
        clients: only the open scope has them)."""
        if scope or not await self._reads_old_keys():
            return None
        return await self._peek_old(transaction_id)

    async def _peek_old(self, transaction_id: str) -> KeyState | None:
        with self.errors:
            current = await self._redis.execute(b"GET", self.old_key(transaction_id))
        state = None if current is None else records.decode(current)
        if state is None or state.guard or not state.belongs_to(transaction_id):
            return None
        return state

    async def _old_answer(
        self, payment: Payment, provider: str, fingerprint: str, guard: bool = True
    ) -> StoredResult | None:
        """A record of the versions before for this payment: its replay (a final one), 409 (in
        flight) or 422 (another request's); None when there is none.

        Under the header's old key, while old processes may still write there, a guard is left
        (`records.guard`): an old process of a rolling deploy then sees this payment in flight
        instead of charging it under a reference derived from the header.
        """
        old = await self.peek_old(payment.transaction_id)
        if old is not None:
            return judge(old, fingerprint)
        return await self._old_header_answer(payment, provider, fingerprint, guard)

    async def _old_header_answer(
        self, payment: Payment, provider: str, fingerprint: str, guard: bool
    ) -> StoredResult | None:
        """`_old_answer`'s second half: a record of the version before made with this request's
        `Idempotency-Key`, under the header's old key (while the migration window is open)."""
        header = await self._legacy_header(payment)
        if header is None:
            return None
        key = self.old_key(header)
        with self.errors:
            if guard:
                value = records.guard(payment.transaction_id, header, fingerprint)
                found = await self._redis.run_script(_CLAIM, [key], [value, self._ttl.result_ttl_s])
            else:
                found = await self._redis.execute(b"GET", key)
        legacy = None if found is None else records.decode(found)
        if legacy is None or not legacy.legacy:
            return None  # guarded now, or a record (or guard) of this version
        if legacy.fingerprint == fingerprint:
            answer = judge(legacy, fingerprint)
            if guard:
                await self._adopt(payment, provider, fingerprint, header, answer)
            return answer
        if legacy.result is not None and legacy.transaction_id == header:
            return None  # payment `header`'s own record, made without a header: no binding
        await self._unbind(header, payment.transaction_id)
        if legacy.result is None:
            raise RequestInProgress()
        raise _key_bound_elsewhere()

    async def _adopt(
        self, payment: Payment, provider: str, fingerprint: str, header: str, answer: StoredResult
    ) -> None:
        """Copy a final answer of the old form, made with this header, into this payment's
        record, with the reference it was charged under (the old version derived it from the
        header): a retry without the header then finds it too, and is never charged again."""
        lifecycle = self.lifecycle
        sha, shard = lifecycle.locate(payment.transaction_id)
        clock = now_ms()
        value = _processing_record(
            payment, provider, fingerprint, reference_for(provider, header), header, None, clock
        )
        with self.errors:
            claimed = await lifecycle.records.claim(
                shard, sha, value, clock, count_field("PROCESSING", provider), True
            )
            if claimed.kind != "claimed":
                return
            state = "SUCCESS" if answer.status == 200 else "DECLINED"
            adopted = Record(sha, shard, value, records.decode(value))
            await lifecycle.apply(adopted, Report(state, answer=(answer.status, answer.body)))

    async def _bind(self, idempotency_key: str, transaction_id: str, scope: str = "") -> None:
        ttl_s = self._ttl.result_ttl_s + self._ttl.lock_ttl_s  # never shorter than the record's
        with self.errors:
            bound = await self._redis.run_script(
                _BIND, [self.binding_key(idempotency_key, scope)], [transaction_id, ttl_s]
            )
        if bound is not None and bound != transaction_id.encode():
            raise _key_bound_elsewhere()

    async def _unbind(self, idempotency_key: str, transaction_id: str) -> None:
        """Undo this request's binding: the header belongs to an older payment (a record of the
        old form), whose own retries must find it free."""
        with self.errors:
            await self._redis.run_script(
                _UNBIND, [self.binding_key(idempotency_key)], [transaction_id]
            )

    async def _legacy_header(self, payment: Payment) -> str | None:
        """The header when a record of the old form may still be keyed by it, else None."""
        header = payment.idempotency_key
        if header is None or header == payment.transaction_id:
            return None  # its old key is the TransactionID's own
        if self._legacy_until is None:
            marker = self._prefix + _IDENTITY_SINCE
            with self.errors:
                await self._redis.execute(b"SET", marker, int(time.time()), b"NX")
                since = await self._redis.execute(b"GET", marker)
            window_s = _LEGACY_WINDOWS * self._ttl.result_ttl_s
            self._legacy_until = float(since or time.time()) + window_s
        return header if time.time() < self._legacy_until else None

    async def _reads_old_keys(self) -> bool:
        """Whether a record of the versions before may be under a TransactionID's old key now."""
        until = self._old_until
        if until is None:
            until = await self._old_records_until()
        return time.time() < until

    async def _old_records_until(self) -> float:
        # Requests arriving together at start-up share one look instead of each making it; a
        # look Redis did not answer is made again by the next request.
        finding = self._finding_old_until
        if finding is None or (
            finding.done() and (finding.cancelled() or finding.exception() is not None)
        ):
            finding = self._finding_old_until = asyncio.ensure_future(self._find_old_until())
            finding.add_done_callback(lambda done: done.cancelled() or done.exception())
        return await asyncio.shield(finding)

    async def _find_old_until(self) -> float:
        marker = self._prefix + _LIFECYCLE_SINCE
        with self.errors:
            since = await self._redis.execute(b"GET", marker)
            if since is None:
                # The first process of the lifecycle on this store: were there keys before it?
                # Nothing of this process is under the prefix yet (its readiness probe waits
                # for this), so whatever is there was written by another process.
                fresh = not await self._redis.holds_keys(self._prefix)
                await self._redis.execute(
                    b"SET", marker, _FRESH if fresh else int(time.time()), b"NX"
                )
                since = await self._redis.execute(b"GET", marker)
        until = _window_end(since, _LEGACY_WINDOWS * self._ttl.result_ttl_s)
        self._old_until = until
        return until

    def _remember_unanswered(self, record: Record) -> None:
        if len(self._unanswered) >= _MAX_UNANSWERED:
            self._unanswered.pop(next(iter(self._unanswered)))
        self._unanswered[record.sha] = record

    async def _release_unanswered(self) -> None:
        # Claims arriving together after an outage share one release instead of each sending
        # them all again.
        if self._releasing is None or self._releasing.done():
            self._releasing = asyncio.ensure_future(self._release_all())
            # Retrieved here too, so a release every waiter gave up on is not reported unhandled.
            self._releasing.add_done_callback(lambda done: done.cancelled() or done.exception())
        await asyncio.shield(self._releasing)

    async def _release_all(self) -> None:
        # All at once, pipelined on the one connection: after a long outage thousands may be
        # waiting, and the claim that found them must not pay a round trip for each.
        pending = list(self._unanswered.values())
        forget = self.lifecycle.records.forget
        with self.errors:
            await asyncio.gather(
                *(forget(r.shard, r.sha, r.value, count_field(r.name, r.provider)) for r in pending)
            )
        for released in pending:
            if self._unanswered.get(released.sha) is released:
                del self._unanswered[released.sha]

    def count_unknown_outcome(self, action: str) -> None:
        self._metrics.unknown_store_outcomes.labels(action).inc()

    async def ping(self) -> bool:
        """True when a write would succeed now; raises StoreUnavailable (its cause says why)."""
        # Before the first probe is written: the look for keys of the versions before must not
        # find this process's own.
        if self._old_until is None:
            await self._old_records_until()
        with self.errors:
            await self._redis.check_writable()
        return True

    async def close(self) -> None:
        await self._redis.close()


class _StoreErrors:
    """Turns Redis failures into StoreUnavailable, counted and logged once each.

    A plain class, not @contextmanager: entered on every Redis call, where a generator-based
    context manager costs several times more; it keeps no state, so one instance is shared.
    """

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(error, RedisUnavailable | RedisReplyError | OSError):
            self._metrics.store_errors.inc()
            log.warning("idempotency store unavailable: %s", error)
            raise StoreUnavailable() from error


def _window_end(since: bytes | None, window_s: int) -> float:
    """Until when records of the versions before may exist, from the `_LIFECYCLE_SINCE` marker."""
    if since == _FRESH:
        return 0.0
    try:
        return float(since or time.time()) + window_s
    except ValueError:
        log.warning("%s is neither a unix time nor %r: old keys are read", _LIFECYCLE_SINCE, _FRESH)
        return float("inf")


def judge(state: KeyState, fingerprint: str) -> StoredResult:
    """The stored answer for a request with this fingerprint; raises KeyReused when the record
    was made for another request, RequestInProgress while it has no answer yet."""
    if state.fingerprint != fingerprint:
        raise KeyReused()
    if state.result is None or state.state == "PROCESSING":
        raise RequestInProgress()
    return state.result


def _tombstone_answer(value: bytes, fingerprint: str) -> StoredResult | None:
    """The answer for a request arriving after the result expired, from the tombstone: 422 for
    another request; the same answer, rebuilt, for SUCCESS or DECLINED (never a second call);
    None for NOT_CREATED (never charged: it starts again)."""
    stone = json.loads(value)
    if stone["fingerprint"] != fingerprint:
        raise KeyReused()
    state = stone["state"]
    if state == "NOT_CREATED":
        return None
    body = payment_body(stone, state, stone.get("reason"), stone.get("provider_reference"))
    return StoredResult(200 if state == "SUCCESS" else 402, body)


@dataclass(slots=True)
class Claim:
    """Ownership of one payment's record while its request is sent and waited for."""

    store: IdempotencyStore
    record: Record
    payment: Payment
    fingerprint: str
    reference: str  # the one stored in the record
    token: str

    async def settle(self, report: Report) -> Record | None:
        """Record what was learnt; the record afterwards (None when Redis did not confirm)."""
        try:
            with self.store.errors:
                after = await self.store.lifecycle.apply(self.record, report)
        except StoreUnavailable:
            # Redis may well have applied it (a stall, not a refusal): the reconciler finds the
            # record due and asks the provider, so nothing is forgotten.
            self.store.count_unknown_outcome("store")
            log.error(
                "%s not confirmed by Redis for payment %s with provider reference %s: the "
                "reconciler settles it from the provider's status",
                report.state,
                self.payment.transaction_id,
                self.reference,
            )
            return None
        if after is not None:
            self.record = after
        return after

    async def keep(self, status: int, body: bytes, reason: str | None, pref: str | None) -> None:
        """Record a final answer (SUCCESS or DECLINED); never raises."""
        state = "SUCCESS" if status == 200 else "DECLINED"
        await self.settle(
            Report(state, reason=reason, provider_reference=pref, answer=(status, body))
        )

    async def not_created(self, error: PaymentError) -> None:
        """The provider provably never received it; never raises."""
        answer = (error.status, compact_json(error.body()))
        await self.settle(Report("NOT_CREATED", reason=error.code, owner=self.token, answer=answer))

    async def forget(self) -> None:
        """Undo the claim (nothing of this request reached any payment: the provider holds
        another one under this reference); never raises."""
        record = self.record
        try:
            with self.store.errors:
                await self.store.lifecycle.records.forget(
                    record.shard,
                    record.sha,
                    record.value,
                    count_field(record.name, record.provider),
                )
        except StoreUnavailable:
            self.store.count_unknown_outcome("release")


def _hashed(text: str) -> bytes:
    # Client strings never become raw Redis keys: no key-space games, bounded length.
    return hashlib.sha256(text.encode()).hexdigest().encode()


def _key_bound_elsewhere() -> KeyReused:
    return KeyReused("this Idempotency-Key is already bound to another TransactionID")


def describe(record: Record) -> dict[str, Any]:
    """The lookup endpoint's view of a payment (CONTRACT §2 `GET /v1/payments/{TransactionID}`)."""
    facts = record.facts
    answer: dict[str, Any] = {
        "transaction_id": facts["transaction_id"],
        "provider": facts["provider"],
        "state": record.name,
        "provider_reference": facts.get("provider_reference") or facts["reference"],
        "amount": float(facts["amount"]),
        "currency": facts["currency"],
        "reason": facts.get("reason"),
        "created_at": _iso(facts["created_ms"]),
        "updated_at": _iso(facts["updated_ms"]),
    }
    result = record.state.result
    if record.name in ("SUCCESS", "DECLINED", "NOT_CREATED") and result is not None:
        answer["status_code"] = result.status
        answer["response"] = json.loads(result.body)
    return answer


def describe_old(state: KeyState) -> dict[str, Any]:
    """A record of the versions before, as the lookup endpoint showed it then."""
    if state.result is None:
        return {"state": "PROCESSING"}
    return {
        "state": "SUCCESS" if state.result.status == 200 else "DECLINED",
        "status_code": state.result.status,
        "response": json.loads(state.result.body),
    }


def _iso(unix_ms: Any) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(unix_ms) / 1000)) + (
        f".{int(unix_ms) % 1000:03d}Z"
    )


def _processing_record(
    payment: Payment,
    provider: str,
    fingerprint: str,
    reference: str,
    idempotency_key: str | None,
    token: str | None,
    clock: int,
) -> bytes:
    """A payment's record as it is first written: PROCESSING, owned by `token` (None: nobody)."""
    facts = {
        "token": token,
        "transaction_id": payment.transaction_id,
        "reference": reference,
        "idempotency_key": idempotency_key,
        "state": "PROCESSING",
        "provider": provider,
        "amount": str(payment.amount),
        "currency": payment.currency,
        "reason": None,
        "created_ms": clock,
        "updated_ms": clock,
        "sent_ms": clock,
    }
    if payment.client is not None:
        # Whose payment it is, for its webhook target; open-API records stay as they were.
        facts["client"] = payment.client
    return records.lifecycle(facts, fingerprint)
