"""A payment's record in Redis: this version's format and the one before it (CONTRACT §2).

This version writes `P|<facts>|<fingerprint>`: `facts` is a JSON object, every `|` in it written
as the JSON escape `\\u007c` so it holds none, with the TransactionID, the provider reference
(computed once, at the first claim, and only read after that), the `Idempotency-Key` header as
sent, an owner token while the payment is in flight, and the status and body once it is final.

Before, a record was keyed by the header (else the TransactionID) and was `L|token|fingerprint`
(in flight) or `C|fingerprint|status|body` (final), without a reference. Both are still read:
such records live for `result_ttl_s` after the deploy, and old processes keep writing them while a
rolling deploy runs. An old process reads any value not starting with `C` as `L|token|fingerprint`,
splitting at the first two `|`: hence no `|` in the facts and the fingerprint last, so it sees
this version's record as a payment in flight with the right fingerprint and answers 409 (422 for
another request) until the deploy reaches it. It never calls a provider for such a key: its claim
is a `SET NX` and its finish is owner-checked. The same holds for a guard (`guard`), left under a
header's old key so that an old process finds the payment made with that header.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import orjson

_CURRENT = b"P"
_LEGACY_FINAL = b"C"  # anything else of the old form is a lock, `L|token|fingerprint`
_NO_FACTS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class StoredResult:
    """A final answer, replayed byte for byte."""

    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class KeyState:
    """What a record says: the request it was made for, and its answer once final."""

    fingerprint: str
    result: StoredResult | None
    # None in an in-flight record of the old form, which does not say.
    transaction_id: str | None
    # None in a record of the old form: its reference was derived from the key it is stored under.
    reference: str | None
    # A guard (see `guard`): not a record of the payment this key belongs to.
    guard: bool = False
    # The lifecycle's facts (state, provider, amount, ...) of a record at a shard key; empty in
    # the older forms.
    facts: Mapping[str, Any] = field(default_factory=lambda: _NO_FACTS)

    @property
    def state(self) -> str:
        """The lifecycle state; a record of the older forms is final once it has an answer."""
        stated = self.facts.get("state")
        if isinstance(stated, str):
            return stated
        return "PROCESSING" if self.result is None else "FINAL"

    @property
    def legacy(self) -> bool:
        return self.reference is None and not self.guard

    def belongs_to(self, transaction_id: str) -> bool:
        """False for an old record stored under this TransactionID because another payment sent
        it as its `Idempotency-Key`."""
        return self.transaction_id in (None, transaction_id)


def in_flight(
    token: str, transaction_id: str, reference: str, idempotency_key: str | None, fingerprint: str
) -> bytes:
    """The value of a claimed record (its lock): unique to its owner through `token`."""
    facts = {
        "token": token,
        "transaction_id": transaction_id,
        "reference": reference,
        "idempotency_key": idempotency_key,
    }
    return _encode(facts, fingerprint)


def guard(transaction_id: str, idempotency_key: str, fingerprint: str) -> bytes:
    """What stands, while old processes may still run, under the key the previous version used
    for a payment's `Idempotency-Key`: an old process reads it as that payment in flight (409;
    422 for another request) instead of finding nothing and charging it again under a reference
    derived from the header. Not a record: should the key be the record key of a payment whose
    TransactionID equals that header value, that payment takes its place."""
    facts = {"guard_for": transaction_id, "idempotency_key": idempotency_key}
    return _encode(facts, fingerprint)


def final(
    transaction_id: str,
    reference: str,
    idempotency_key: str | None,
    fingerprint: str,
    result: StoredResult,
) -> bytes:
    facts = {
        "transaction_id": transaction_id,
        "reference": reference,
        "idempotency_key": idempotency_key,
        "status": result.status,
        # latin-1 maps every byte to one character and back: the body is replayed exactly.
        "body": result.body.decode("latin-1"),
    }
    return _encode(facts, fingerprint)


@functools.lru_cache(maxsize=4096)
def decode(value: bytes) -> KeyState:
    """What a value read from Redis says. Memoised on the exact bytes Redis returned, so a payment
    replayed again and again is parsed once: this caches a parse of what Redis holds now, never
    an answer Redis may have lost since (BENCHMARKS.md, "The per-process replay cache")."""
    if value[:1] == _CURRENT:
        _, encoded, fingerprint = value.split(b"|", 2)
        facts = orjson.loads(encoded)
        if "guard_for" in facts:
            return KeyState(fingerprint.decode(), None, facts["guard_for"], None, guard=True)
        status = facts.get("status")
        result = None if status is None else StoredResult(status, facts["body"].encode("latin-1"))
        return KeyState(
            fingerprint.decode(),
            result,
            facts["transaction_id"],
            facts["reference"],
            facts=MappingProxyType(facts) if "state" in facts else _NO_FACTS,
        )
    if value[:1] == _LEGACY_FINAL:
        _, fingerprint, status, body = value.split(b"|", 3)
        result = StoredResult(int(status), body)
        return KeyState(fingerprint.decode(), result, _transaction_id_in(body), None)
    _, _, fingerprint = value.split(b"|", 2)
    return KeyState(fingerprint.decode(), None, None, None)


def lifecycle(facts: Mapping[str, Any], fingerprint: str) -> bytes:
    """A record at a shard key (`proxy/store/keys.py`): `facts` carries `state` and the rest of
    the lifecycle's facts; `status` and `body` once there is an answer to replay."""
    return _encode(dict(facts), fingerprint)


def _encode(facts: dict[str, Any], fingerprint: str) -> bytes:
    # Outside strings JSON has no `|`; inside them `\u007c` reads back as the same character.
    encoded = orjson.dumps(facts).replace(b"|", b"\\u007c")
    return _CURRENT + b"|" + encoded + b"|" + fingerprint.encode()


def _transaction_id_in(body: bytes) -> str | None:
    # Every final body of the old version names its transaction (200 and 402 alike).
    try:
        found = orjson.loads(body).get("transaction_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return found if isinstance(found, str) else None
