"""Redis-backed idempotency: one owner per key at a time, results kept for replay (CONTRACT §2).

A key holds either a lock `L|token|fingerprint` (taken with one `SET NX EX`, so it always
expires) or a result `C|fingerprint|status|body`. Release and store happen in Lua, only while
the caller's exact lock value is still there: a request whose lock expired cannot overwrite or
delete the state of the request that took the key after it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from proxy.config import IdempotencySettings, RedisSettings
from proxy.errors import KeyReused, RequestInProgress, StoreUnavailable
from proxy.metrics import GatewayMetrics
from proxy.replays import ReplayCache
from proxy.store_client import RedisReplyError, RedisUnavailable, Script, StoreClient
from proxy.tokens import unique_tokens

log = logging.getLogger("payagg.idempotency")

# One round trip whatever the key holds: take the lock, or say what is there (and for how long).
_CLAIM = Script("""
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return false end
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
""")
_PEEK = Script("""
local value = redis.call('GET', KEYS[1])
if not value then return false end
return {value, redis.call('PTTL', KEYS[1])}
""")
# Store a result (ARGV[2] non-empty) or release (ARGV[2] empty), only as the lock's owner.
_FINISH = Script("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1])
else redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
return 1
""")
_COMPLETED = b"C"  # a stored result; a lock starts with b"L"
_new_lock_token = unique_tokens()
# Bounds the memory of unanswered claims when Redis stays away; older ones expire in Redis anyway.
_MAX_UNANSWERED = 10_000


@dataclass(frozen=True, slots=True)
class StoredResult:
    """A completed payment's answer, replayed byte for byte."""

    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class KeyState:
    """What a key holds: in progress (no result) or completed (a result)."""

    fingerprint: str
    result: StoredResult | None


def _decode(value: bytes) -> KeyState:
    if value[:1] == _COMPLETED:
        _, fingerprint, status, body = value.split(b"|", 3)
        return KeyState(fingerprint.decode(), StoredResult(int(status), body))
    _, _, fingerprint = value.split(b"|", 2)
    return KeyState(fingerprint.decode(), None)


class IdempotencyStore:
    """The only place that talks to Redis; its errors become StoreUnavailable here."""

    def __init__(
        self, settings: RedisSettings, ttl: IdempotencySettings, metrics: GatewayMetrics
    ) -> None:
        self._prefix = settings.key_prefix.encode()
        self._ttl = ttl
        self._metrics = metrics
        self._redis = StoreClient(settings)
        self._replays: ReplayCache[KeyState] = ReplayCache(ttl.replay_cache_size)
        # Claims whose reply never came (Redis stalled, not dead): Redis may still run them when
        # it wakes up, leaving a lock nobody owns that would answer 409 until lock_ttl_s. Each is
        # released, only if its exact value is still there, before the next claim or lookup.
        self._unanswered: dict[bytes, bytes] = {}
        self._releasing: asyncio.Future[None] | None = None
        self._store_errors = _StoreErrors(metrics)

    def redis_key(self, idempotency_key: str) -> bytes:
        # Client strings never become raw Redis keys: no key-space games, bounded length.
        return self._prefix + hashlib.sha256(idempotency_key.encode()).hexdigest().encode()

    async def claim(
        self, idempotency_key: str, fingerprint: str, reference: Callable[[], str]
    ) -> Claim | StoredResult:
        """Own the key, or get its replay; raises RequestInProgress, KeyReused, StoreUnavailable.

        `reference` gives the provider reference the claim is made for; it is computed only
        when the key is really claimed, not for a replay.
        """
        key = self.redis_key(idempotency_key)
        known = self._replays.get(key)
        if known is not None:
            return judge(known, fingerprint)
        lock = b"L|" + _new_lock_token().encode() + b"|" + fingerprint.encode()
        if self._unanswered:
            await self._release_unanswered()
        try:
            with self._store_errors:
                sent_at = time.monotonic()
                current = await self._redis.run_script(_CLAIM, [key], [lock, self._ttl.lock_ttl_s])
        except StoreUnavailable:
            self._remember_unanswered(key, lock)
            raise
        if current is None:
            return Claim(self, key, lock, self._ttl.result_ttl_s, reference())
        return judge(self._read(key, current, sent_at), fingerprint)

    async def peek(self, idempotency_key: str) -> KeyState | None:
        key = self.redis_key(idempotency_key)
        known = self._replays.get(key)
        if known is not None:
            return known
        if self._unanswered:
            await self._release_unanswered()
        with self._store_errors:
            sent_at = time.monotonic()
            current = await self._redis.run_script(_PEEK, [key], [])
        return None if current is None else self._read(key, current, sent_at)

    def _read(self, key: bytes, reply: list[Any], sent_at: float) -> KeyState:
        value, ttl_ms = reply
        state = _decode(value)
        if state.result is not None:
            # Redis read the PTTL after `sent_at`: counted from there, not from the reply's
            # arrival, the copy cannot outlive the original by the round trip.
            self._replays.put(key, state, ttl_ms / 1000 - (time.monotonic() - sent_at))
        return state

    def remember(self, key: bytes, state: KeyState, ttl_s: float) -> None:
        """A result this process just stored: later replays need no Redis round trip."""
        self._replays.put(key, state, ttl_s)

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
    """The stored answer for a request with this fingerprint; raises KeyReused when the key was
    used for another request, RequestInProgress while it has no answer yet."""
    if state.fingerprint != fingerprint:
        raise KeyReused()
    if state.result is None:
        raise RequestInProgress()
    return state.result


@dataclass(frozen=True, slots=True)
class Claim:
    """Ownership of one idempotency key until `store` or `release`."""

    store: IdempotencyStore
    key: bytes
    lock: bytes
    result_ttl_s: int
    reference: str

    async def keep(self, status: int, body: bytes) -> None:
        """Keep a final answer for replay; never raises: the client gets its answer regardless."""
        fingerprint = self.lock.split(b"|", 2)[2]
        value = b"C|" + fingerprint + b"|" + str(status).encode() + b"|" + body
        # The copy's clock starts before Redis's does, so it never outlives the original.
        stored_at = time.monotonic()
        if await self._finish(value, self.result_ttl_s, "store the result of"):
            remaining = self.result_ttl_s - (time.monotonic() - stored_at)
            state = KeyState(fingerprint.decode(), StoredResult(status, body))
            self.store.remember(self.key, state, remaining)

    async def release(self) -> None:
        """Free the key so the client may retry (502/503/504); never raises."""
        await self._finish(b"", 0, "release")

    async def _finish(self, value: bytes, ttl_s: int, action: str) -> bool:
        try:
            owned = await self.store.finish(self.key, self.lock, value, ttl_s)
        except StoreUnavailable:
            log.error(
                "FAILED to %s payment with provider reference %s (key %s): the lock stays until "
                "it expires; a retry then reuses the same reference, so the provider can still "
                "refuse a double charge",
                action,
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


def describe(state: KeyState) -> dict[str, Any]:
    """The lookup endpoint's view of a key (CONTRACT §2 `GET /v1/payments/{key}`)."""
    if state.result is None:
        return {"state": "IN_PROGRESS"}
    return {
        "state": "COMPLETED",
        "status_code": state.result.status,
        "response": json.loads(state.result.body),
    }
