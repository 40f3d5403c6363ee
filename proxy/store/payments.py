"""The lifecycle's Redis operations: claim, compare-and-swap transitions, leases, pokes.

Every script touches the keys of one shard (`proxy/store/keys.py`): one hash slot. The record's
JSON is built and judged in Python (`proxy/payments/lifecycle.py`); a script only swaps it in if
the record still holds exactly the value the caller judged, and moves the schedule, the gauge
counters, the webhook outbox and the tombstone with it, so none of them can disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.store.client import Script, StoreClient
from proxy.store.keys import Shard

# The record, its schedule and its lease, the gauge counter: one step.
_CLAIM = Script("""
local current = redis.call('GET', KEYS[1])
if current then return {1, current} end
if ARGV[5] ~= '1' then
  local tomb = redis.call('GET', KEYS[4])
  if tomb then return {2, tomb} end
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[3])
redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
return {0}
""")
# Compare-and-swap of a record, with everything that moves with it.
_SWAP = Script("""
local current = redis.call('GET', KEYS[1])
if not current then return {2} end
if current ~= ARGV[1] then return {1, current} end
if ARGV[3] ~= '0' then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else redis.call('SET', KEYS[1], ARGV[2]) end
local sha = ARGV[5]
if ARGV[4] == '' then
  redis.call('ZREM', KEYS[2], sha)
  redis.call('ZREM', KEYS[7], sha)
  redis.call('SREM', KEYS[8], sha)
else
  local at = ARGV[4]
  if ARGV[13] == '1' then redis.call('ZADD', KEYS[7], at, sha)
  else
    redis.call('ZREM', KEYS[7], sha)
    if redis.call('SREM', KEYS[8], sha) == 1 then at = ARGV[10] end
  end
  redis.call('ZADD', KEYS[2], at, sha)
end
if ARGV[6] ~= '' then redis.call('HINCRBY', KEYS[3], ARGV[6], -1) end
if ARGV[7] ~= '' then redis.call('HINCRBY', KEYS[3], ARGV[7], 1) end
if ARGV[8] ~= '' and redis.call('SET', KEYS[5], ARGV[8], 'NX') then
  redis.call('ZADD', KEYS[4], ARGV[10], ARGV[9])
end
if ARGV[11] ~= '' then redis.call('SET', KEYS[6], ARGV[11], 'PX', ARGV[12]) end
return {0}
""")
# Due payments, each leased until ARGV[2]: O(log n) per payment taken.
_LEASE = Script("""
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, sha in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[2], sha)
  redis.call('ZADD', KEYS[2], ARGV[2], sha)
end
return due
""")
# A callback: due now, or, while someone holds the lease, a note that they look again at once.
_POKE = Script("""
if redis.call('EXISTS', KEYS[4]) == 0 then return 0 end
local lease = redis.call('ZSCORE', KEYS[2], ARGV[1])
if lease and tonumber(lease) > tonumber(ARGV[2]) then
  redis.call('SADD', KEYS[3], ARGV[1])
  return 1
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 2
""")
# A claim undone: the record, only while it holds exactly ARGV[1], its schedule and its count.
_FORGET = Script("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('HINCRBY', KEYS[4], ARGV[3], -1)
return 1
""")
# Off the schedule: a record that is final, or gone.
_DROP = Script("""
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
""")


@dataclass(frozen=True, slots=True)
class Claimed:
    """What a claim found: nothing (claimed), a record, or a tombstone."""

    kind: str  # "claimed", "record", "tombstone"
    value: bytes | None = None


@dataclass(frozen=True, slots=True)
class Swap:
    """One transition: the new value and what moves with it."""

    value: bytes
    ttl_ms: int = 0  # 0: no expiry (a payment not final never expires)
    due_ms: int | None = None  # None: off the schedule (final)
    leased: bool = False  # the due time is the caller's lease, kept
    count_from: str = ""
    count_to: str = ""
    hook: bytes = b""  # the webhook's stored JSON; empty: none
    hook_state: str = ""
    tombstone: bytes = b""
    tombstone_ttl_ms: int = 0


class PaymentRecords:
    """The records and schedules of the lifecycle, over one Redis connection."""

    def __init__(self, redis: StoreClient) -> None:
        self._redis = redis

    async def read(self, shard: Shard, sha: str) -> bytes | None:
        value = await self._redis.execute(b"GET", shard.payment(sha))
        return None if value is None else bytes(value)

    async def claim(
        self,
        shard: Shard,
        sha: str,
        value: bytes,
        due_ms: int,
        count_field: str,
        past_tombstone: bool = False,
    ) -> Claimed:
        keys = [
            shard.payment(sha),
            shard.due,
            shard.counts,
            shard.tombstone(sha),
            shard.leases,
        ]
        args: list[Any] = [value, due_ms, sha, count_field, "1" if past_tombstone else "0"]
        reply = await self._redis.run_script(_CLAIM, keys, args)
        if reply[0] == 0:
            return Claimed("claimed")
        return Claimed("record" if reply[0] == 1 else "tombstone", bytes(reply[1]))

    async def swap(
        self, shard: Shard, sha: str, expected: bytes, swap: Swap, now_ms: int
    ) -> tuple[bool, bytes | None]:
        """(True, None) when swapped; else (False, what the record holds now, None if gone)."""
        keys = [
            shard.payment(sha),
            shard.due,
            shard.counts,
            shard.outbox,
            shard.hook(sha, swap.hook_state or "-"),
            shard.tombstone(sha),
            shard.leases,
            shard.poked,
        ]
        args: list[Any] = [
            expected,
            swap.value,
            swap.ttl_ms,
            "" if swap.due_ms is None else swap.due_ms,
            sha,
            swap.count_from,
            swap.count_to,
            swap.hook,
            f"{sha}:{swap.hook_state}",
            now_ms,
            swap.tombstone,
            swap.tombstone_ttl_ms,
            "1" if swap.leased else "0",
        ]
        # A final state records what the provider did with the money: retried through a failover
        # (the compare-and-swap is safe to run twice: a second run finds its own value).
        durable = swap.due_ms is None
        reply = await self._redis.run_script(_SWAP, keys, args, durable=durable)
        if reply[0] == 0:
            return True, None
        return False, (bytes(reply[1]) if reply[0] == 1 else None)

    async def lease(self, shard: Shard, now_ms: int, until_ms: int, limit: int) -> list[str]:
        due = await self._redis.run_script(
            _LEASE, [shard.due, shard.leases], [now_ms, until_ms, limit]
        )
        return [_text(member) for member in due]

    async def poke(self, shard: Shard, sha: str, now_ms: int) -> int:
        """0: no such payment; 1: its holder will look again; 2: due now."""
        keys = [shard.due, shard.leases, shard.poked, shard.payment(sha)]
        return int(await self._redis.run_script(_POKE, keys, [sha, now_ms]))

    async def forget(self, shard: Shard, sha: str, expected: bytes, count_field: str) -> bool:
        keys = [shard.payment(sha), shard.due, shard.leases, shard.counts]
        return bool(await self._redis.run_script(_FORGET, keys, [expected, sha, count_field]))

    async def drop(self, shard: Shard, sha: str) -> None:
        await self._redis.run_script(_DROP, [shard.due, shard.leases, shard.poked], [sha])

    async def counts(self, shard: Shard) -> dict[str, int]:
        found = await self._redis.execute(b"HGETALL", shard.counts)
        # RESP3 answers a map, RESP2 a flat list of fields and values.
        pairs = (
            found.items() if isinstance(found, dict) else zip(found[::2], found[1::2], strict=True)
        )
        return {_text(field): int(count) for field, count in pairs}

    async def find_callback(self, key: bytes) -> tuple[str, int, str] | None:
        """(sha, shard number, reference) of the payment a callback token names, if any."""
        found = await self._redis.execute(b"GET", key)
        if found is None:
            return None
        sha, number, reference = _text(found).split(" ", 2)
        return sha, int(number), reference


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
