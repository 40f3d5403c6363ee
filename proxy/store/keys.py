"""Where the lifecycle keeps each payment in Redis (lifecycle-design §2).

Payments are spread over `SHARDS` shards, each with a hash tag (`{<prefix>sNN}`), so that every
script touches keys of one hash slot (Redis Cluster, MemoryDB): a payment's record, its shard's
schedule (`due`), webhook outbox (`outbox`), webhook bodies (`hook:`) and gauge counters
(`counts`). Only the lookup by callback token (`ref:`) lives outside the shards: it is a
single-key write made before the claim.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

# Fixed forever: changing it would move every record to another shard.
SHARDS = 16
FINAL_STATES = frozenset({"SUCCESS", "DECLINED", "NOT_CREATED"})


def payment_sha(transaction_id: str, scope: str = "") -> str:
    """SHA-256 hex of scope + NUL + TransactionID: client strings never become raw Redis keys."""
    return hashlib.sha256(f"{scope}\x00{transaction_id}".encode()).hexdigest()


def shard_of(sha: str) -> int:
    return int(sha[:8], 16) % SHARDS


@dataclass(frozen=True, slots=True)
class Shard:
    """The keys of one shard; every name carries the shard's hash tag.

    The tag and the shard-wide keys are built with the shard, not per use: a payment's claim
    and final transition name eight of them (`shard_for` hands out one shard object each).
    """

    prefix: str
    number: int
    tag: str = field(init=False, repr=False, compare=False)
    # zset: member `<sha>`, score = unix ms when next due (lease expiry while leased).
    due: bytes = field(init=False, repr=False, compare=False)
    # zset: member `<sha>:<STATE>`, score = unix ms of the next delivery attempt.
    outbox: bytes = field(init=False, repr=False, compare=False)
    # hash: `pending:<PROVIDER>`, `unresolved:<PROVIDER>`.
    counts: bytes = field(init=False, repr=False, compare=False)
    # zset: member `<sha>`, score = unix ms when its holder's lease (handler, poller) ends.
    leases: bytes = field(init=False, repr=False, compare=False)
    # set: leased payments a callback asked about: their holder looks again at once.
    poked: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tag = f"{{{self.prefix}s{self.number:02d}}}"
        for name, value in (
            ("tag", tag),
            ("due", f"{tag}due".encode()),
            ("outbox", f"{tag}outbox".encode()),
            ("counts", f"{tag}counts".encode()),
            ("leases", f"{tag}leases".encode()),
            ("poked", f"{tag}poked".encode()),
        ):
            object.__setattr__(self, name, value)

    def payment(self, sha: str) -> bytes:
        """string: the payment's record (JSON facts, `proxy/records.py`)."""
        return f"{self.tag}pay:{sha}".encode()

    def hook(self, sha: str, state: str) -> bytes:
        """string: `{"body", "created_ms", "attempts", "target"}` of one webhook."""
        return f"{self.tag}hook:{sha}:{state}".encode()

    def tombstone(self, sha: str) -> bytes:
        """string: provider, reference, amount, currency and final state of an expired result."""
        return f"{self.tag}tomb:{sha}".encode()


def shard_for(prefix: str, sha: str) -> Shard:
    return _shard(prefix, shard_of(sha))


@functools.lru_cache(maxsize=SHARDS * 4)
def _shard(prefix: str, number: int) -> Shard:
    return Shard(prefix, number)


def all_shards(prefix: str) -> list[Shard]:
    return [_shard(prefix, number) for number in range(SHARDS)]


def reference_key(prefix: str, provider: str, token: str) -> bytes:
    """string: `<sha> <shard> <reference>` of the payment whose callback URL carries `token`.

    Keyed by the URL's token (an HMAC of the provider reference, `proxy/providers/callbacks.py`)
    rather than the reference itself: the token is all a callback's URL carries.
    """
    return f"{prefix}ref:{provider}:{token}".encode()


def outbox_member(sha: str, state: str) -> str:
    return f"{sha}:{state}"


def admin_key(prefix: str) -> bytes:
    """hash: `breaker:<PROVIDER>` -> a forced state as JSON, `config_generation` -> a counter.

    One key, so one HGETALL per refresh reads it all, on any node of a cluster.
    """
    return f"{prefix}admin".encode()
