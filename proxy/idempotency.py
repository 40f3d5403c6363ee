"""Redis-backed idempotency: one owner per payment at a time, answers kept for replay (CONTRACT §2).

A payment's identity is its TransactionID: its record (`proxy/records.py`) is stored under
`key_prefix` + SHA-256 of it. A claim takes the record with one `SET NX EX` (so a lock always
expires); store and release happen in Lua, only while the caller's exact lock value is still
there, so a request whose lock expired cannot overwrite or delete the state of the request that
took the record after it. An `Idempotency-Key` header is bound to its TransactionID under a key of
its own before the claim: every script touches exactly one key (Redis Cluster).

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

from proxy import records
from proxy.config import IdempotencySettings, RedisSettings
from proxy.errors import KeyReused, RequestInProgress, StoreUnavailable
from proxy.metrics import GatewayMetrics
from proxy.payment import Payment, reference_for
from proxy.records import KeyState, StoredResult
from proxy.store_client import RedisReplyError, RedisUnavailable, Script, StoreClient
from proxy.tokens import unique_tokens

log = logging.getLogger("payagg.idempotency")

# One round trip whatever the key holds: take it, or say what is there.
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
# Store a value (ARGV[2] non-empty) or delete (ARGV[2] empty), only while ARGV[1] is there.
# A durable store may run twice (retried after an unconfirmed first run): finding its own value
# already there is success, not a lost lock.
_FINISH = Script("""
local current = redis.call('GET', KEYS[1])
if ARGV[2] ~= '' and current == ARGV[2] then return 1 end
if current ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1])
else redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
return 1
""")
_BINDING = b"idempotency-key:"
# When the first process of this version started: records keyed by the header may exist until
# `result_ttl_s` after the last old process wrote one. Kept without expiry (one small key): were
# it to expire, the next start would open the window again.
_IDENTITY_SINCE = b"identity-by-transaction-id-since"
# Twice result_ttl_s: covers the records old processes write during a rolling deploy shorter than
# result_ttl_s itself.
_LEGACY_WINDOWS = 2
_new_lock_token = unique_tokens()
# Bounds the memory of unanswered claims when Redis stays away; older ones expire in Redis anyway.
_MAX_UNANSWERED = 10_000


class IdempotencyStore:
    """The only place that talks to Redis; its errors become StoreUnavailable here."""

    def __init__(
        self, settings: RedisSettings, ttl: IdempotencySettings, metrics: GatewayMetrics
    ) -> None:
        self._prefix = settings.key_prefix.encode()
        self._ttl = ttl
        self._metrics = metrics
        self._redis = StoreClient(settings)
        # Claims whose reply never came (Redis stalled, not dead): Redis may still run them when
        # it wakes up, leaving a lock nobody owns that would answer 409 until lock_ttl_s. Each is
        # released, only if its exact value is still there, before the next claim or lookup.
        self._unanswered: dict[bytes, bytes] = {}
        self._releasing: asyncio.Future[None] | None = None
        self._store_errors = _StoreErrors(metrics)
        self._legacy_until: float | None = None
        if ttl.replay_cache_size is not None:
            log.warning(
                "idempotency.replay_cache_size is deprecated and ignored: every replay is read "
                "from Redis, so no process answers what Redis no longer holds; remove the key"
            )

    def redis_key(self, transaction_id: str) -> bytes:
        return self._prefix + _hashed(transaction_id)

    def binding_key(self, idempotency_key: str) -> bytes:
        return self._prefix + _BINDING + _hashed(idempotency_key)

    async def claim(self, payment: Payment, provider: str) -> Claim | StoredResult:
        """Own the payment, or get its replay; raises RequestInProgress, KeyReused,
        StoreUnavailable."""
        if self._unanswered:
            await self._release_unanswered()
        fingerprint = payment.fingerprint(provider)
        if payment.idempotency_key is not None:
            await self._bind(payment.idempotency_key, payment.transaction_id)
        key = self.redis_key(payment.transaction_id)
        reference = payment.provider_reference(provider)
        token = _new_lock_token()
        lock = records.in_flight(
            token, payment.transaction_id, reference, payment.idempotency_key, fingerprint
        )
        current = await self._write_lock(_CLAIM, key, lock, [lock, self._ttl.lock_ttl_s])
        if current is not None:
            state = records.decode(current)
            if not state.guard:
                return judge(state, fingerprint)
            # Another payment's guard (its header is this TransactionID): this payment's record
            # takes its place, an owner-checked swap like any finish.
            swap = [current, lock, self._ttl.lock_ttl_s]
            if not await self._write_lock(_FINISH, key, lock, swap):
                raise RequestInProgress()
        claim = Claim(self, key, lock, payment, fingerprint, reference, self._ttl.result_ttl_s)
        legacy_key = await self._legacy_key(payment)
        if legacy_key is not None:
            adopted = await self._adopt(claim, legacy_key, provider)
            if adopted is not None:
                return adopted
        return claim

    async def replay(self, payment: Payment, provider: str) -> StoredResult | None:
        """The stored answer, without claiming anything (the provider's breaker is open): None
        when there is none; raises RequestInProgress, KeyReused, StoreUnavailable."""
        if payment.idempotency_key is not None:
            with self._store_errors:
                bound = await self._redis.execute(b"GET", self.binding_key(payment.idempotency_key))
            if bound is not None and bound != payment.transaction_id.encode():
                raise _key_bound_elsewhere()
        state = await self.peek(payment.transaction_id)
        legacy_key = None if state is not None else await self._legacy_key(payment)
        if legacy_key is not None:
            legacy = await self.peek(legacy_key)
            if legacy is not None and legacy.legacy and legacy.result is not None:
                state = legacy
        # Hashed only now: most fail-fast requests find nothing to judge.
        return None if state is None else judge(state, payment.fingerprint(provider))

    async def peek(self, transaction_id: str) -> KeyState | None:
        if self._unanswered:
            await self._release_unanswered()
        with self._store_errors:
            current = await self._redis.execute(b"GET", self.redis_key(transaction_id))
        state = None if current is None else records.decode(current)
        return None if state is None or state.guard else state

    async def _write_lock(self, script: Script, key: bytes, lock: bytes, args: list[Any]) -> Any:
        """Run a script that may leave `lock` in `key`; unanswered, it is released later."""
        try:
            with self._store_errors:
                return await self._redis.run_script(script, [key], args)
        except StoreUnavailable:
            self._remember_unanswered(key, lock)
            raise

    async def _bind(self, idempotency_key: str, transaction_id: str) -> None:
        ttl_s = self._ttl.result_ttl_s + self._ttl.lock_ttl_s  # never shorter than the record's
        with self._store_errors:
            bound = await self._redis.run_script(
                _BIND, [self.binding_key(idempotency_key)], [transaction_id, ttl_s]
            )
        if bound is not None and bound != transaction_id.encode():
            raise _key_bound_elsewhere()

    async def _unbind(self, idempotency_key: str, transaction_id: str) -> None:
        """Undo this request's binding: the header belongs to an older payment (a record of the
        old form), whose own retries must find it free."""
        try:
            with self._store_errors:
                await self._redis.run_script(
                    _FINISH, [self.binding_key(idempotency_key)], [transaction_id, b"", 0]
                )
        except StoreUnavailable:
            log.error("could not unbind Idempotency-Key of payment %s", transaction_id)

    async def _legacy_key(self, payment: Payment) -> str | None:
        """The header when a record of the old form may still be keyed by it, else None."""
        header = payment.idempotency_key
        if header is None or header == payment.transaction_id:
            return None  # its old key is the TransactionID's own
        if self._legacy_until is None:
            marker = self._prefix + _IDENTITY_SINCE
            with self._store_errors:
                await self._redis.execute(b"SET", marker, int(time.time()), b"NX")
                since = await self._redis.execute(b"GET", marker)
            window_s = _LEGACY_WINDOWS * self._ttl.result_ttl_s
            self._legacy_until = float(since or time.time()) + window_s
        return header if time.time() < self._legacy_until else None

    async def _adopt(self, claim: Claim, header: str, provider: str) -> StoredResult | None:
        """Look, while holding the claim, for a record of the old form under the header's key,
        leaving a guard there when it is free (`records.guard`: old processes of a rolling deploy
        then see this payment too).

        Found and made for this request: its answer is copied into this payment's record with the
        reference it was charged with (derived from the header) and replayed. Made for another
        request: the header was already bound (422), or an old process is charging under it
        (409; whose payment it is cannot be told before it ends). Else the claim stands.
        """
        payment = claim.payment
        guard = records.guard(payment.transaction_id, header, claim.fingerprint)
        try:
            with self._store_errors:
                found = await self._redis.run_script(
                    _CLAIM, [self.redis_key(header)], [guard, self._ttl.result_ttl_s]
                )
        except StoreUnavailable:
            self._remember_unanswered(claim.key, claim.lock)  # the claim this request holds
            raise
        legacy = None if found is None else records.decode(found)
        if legacy is None or not legacy.legacy:
            return None  # guarded now, or a record (or guard) of this version
        if legacy.fingerprint == claim.fingerprint:
            if legacy.result is None:
                await claim.release()
                raise RequestInProgress()
            # The reference it was charged with: the old version derived it from the header.
            reference = reference_for(provider, header)
            adopted = records.final(
                payment.transaction_id, reference, header, claim.fingerprint, legacy.result
            )
            await claim.replace(adopted)
            return legacy.result
        if legacy.result is not None and legacy.transaction_id == header:
            return None  # payment `header`'s own record, made without a header: no binding
        await claim.release()
        await self._unbind(header, payment.transaction_id)
        if legacy.result is None:
            raise RequestInProgress()
        raise _key_bound_elsewhere()

    def _remember_unanswered(self, key: bytes, lock: bytes) -> None:
        if len(self._unanswered) >= _MAX_UNANSWERED:
            self._unanswered.pop(next(iter(self._unanswered)))
        self._unanswered[key] = lock

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
        pending = list(self._unanswered.items())
        with self._store_errors:
            await asyncio.gather(
                *(self._redis.run_script(_FINISH, [key], [lock, b"", 0]) for key, lock in pending)
            )
        for key, lock in pending:
            if self._unanswered.get(key) == lock:
                del self._unanswered[key]

    async def finish(self, key: bytes, lock: bytes, value: bytes, ttl_s: int) -> bool:
        with self._store_errors:
            done = await self._redis.run_script(
                _FINISH, [key], [lock, value, ttl_s], durable=bool(value)
            )
        return bool(done)

    def count_unknown_outcome(self, action: str) -> None:
        self._metrics.unknown_store_outcomes.labels(action).inc()

    async def ping(self) -> bool:
        """True when a write would succeed now; raises StoreUnavailable (its cause says why)."""
        with self._store_errors:
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


def judge(state: KeyState, fingerprint: str) -> StoredResult:
    """The stored answer for a request with this fingerprint; raises KeyReused when the record
    was made for another request, RequestInProgress while it has no answer yet."""
    if state.fingerprint != fingerprint:
        raise KeyReused()
    if state.result is None:
        raise RequestInProgress()
    return state.result


@dataclass(frozen=True, slots=True)
class Claim:
    """Ownership of one payment's record until `keep` or `release`."""

    store: IdempotencyStore
    key: bytes
    lock: bytes
    payment: Payment
    fingerprint: str
    reference: str  # the one stored in the record
    result_ttl_s: int

    async def keep(self, status: int, body: bytes) -> None:
        """Keep a final answer for replay; never raises: the client gets its answer regardless."""
        payment = self.payment
        value = records.final(
            payment.transaction_id,
            self.reference,
            payment.idempotency_key,
            self.fingerprint,
            StoredResult(status, body),
        )
        await self._finish(value, self.result_ttl_s, "store")

    async def replace(self, value: bytes) -> None:
        """Put an adopted final record in place of the lock; never raises."""
        await self._finish(value, self.result_ttl_s, "store")

    async def release(self) -> None:
        """Free the payment so the client may retry (502/503/504); never raises."""
        await self._finish(b"", 0, "release")

    async def _finish(self, value: bytes, ttl_s: int, action: str) -> bool:
        try:
            owned = await self.store.finish(self.key, self.lock, value, ttl_s)
        except StoreUnavailable:
            # Redis may well have applied it (a stall, not a refusal): say only what is known.
            self.store.count_unknown_outcome(action)
            log.error(
                "%s outcome unknown for payment %s with provider reference %s (key %s): Redis "
                "did not confirm it; if it was not applied, the lock expires after lock_ttl_s "
                "and a retry reuses the same reference, so the provider can still refuse a "
                "double charge",
                action,
                self.payment.transaction_id,
                self.reference,
                self.key.decode(),
            )
            return False
        if not owned:
            log.error(
                "lock on %s expired before we could %s payment %s",
                self.key.decode(),
                action,
                self.reference,
            )
        return owned


def _hashed(text: str) -> bytes:
    # Client strings never become raw Redis keys: no key-space games, bounded length.
    return hashlib.sha256(text.encode()).hexdigest().encode()


def _key_bound_elsewhere() -> KeyReused:
    return KeyReused("this Idempotency-Key is already bound to another TransactionID")


def describe(state: KeyState) -> dict[str, Any]:
    """The lookup endpoint's view of a payment (CONTRACT §2 `GET /v1/payments/{TransactionID}`)."""
    if state.result is None:
        return {"state": "IN_PROGRESS"}
    return {
        "state": "COMPLETED",
        "status_code": state.result.status,
        "response": json.loads(state.result.body),
    }
