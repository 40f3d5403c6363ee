"""The merchant webhook outbox in Redis: enqueue, lease, settle (lifecycle design §2).

Each shard has a sorted set `{<prefix>sNN}outbox` of members `<sha>:<STATE>` scored by the unix
ms of their next attempt, and one string per member, `{<prefix>sNN}hook:<sha>:<STATE>`, holding
the exact body to POST and the delivery's bookkeeping. A lease moves the member's score to the
lease's end: no other process takes it before then, and a process that dies holding it loses
nothing, as the member is due again once the lease ends. Every script names its keys in KEYS,
all of one shard, so each runs in one hash slot of a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from proxy.store.client import Argument, Script
from proxy.store.keys import Shard, all_shards, outbox_member, shard_for

# Life's transition scripts enqueue in the same step that makes a payment final; this is the same
# as a script of its own. NX on both writes: run twice, it never resets a delivery under way.
_ENQUEUE = Script("""
if redis.call('SET', KEYS[2], ARGV[2], 'NX') then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
end
""")
# A script may only touch the keys named in its KEYS (Cluster routes by them), and a hook's key is
# known only once its member is: so leasing takes two steps, which members are due (this script),
# then each member's lease, which checks again that it is still due.
_DUE = Script("return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])")
# Only a member still due is leased, so of two processes that saw it due, one gets it.
_LEASE = Script("""
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
local record = redis.call('GET', KEYS[2])
if not record then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return false
end
redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
return record
""")
_DELIVERED = Script("""
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
""")
# Rescheduled (ARGV[3] = next attempt) or dropped (ARGV[3] = ''), only by the lease's holder: a
# lease's end is a score no later lease can have, as a lease starts after the previous one ended.
_RETRY = Script("""
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2])
else
  redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
  redis.call('SET', KEYS[2], ARGV[4], 'XX')
end
return 1
""")
_BACKLOG = Script("return redis.call('ZCARD', KEYS[1])")


class ScriptRunner(Protocol):
    """What the outbox needs of a Redis client (`StoreClient`)."""

    async def run_script(
        self, script: Script, keys: Sequence[Argument], args: Sequence[Argument]
    ) -> Any: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class HookRecord:
    """One delivery: the exact body to POST, when it was enqueued, the attempts that failed."""

    body: bytes
    created_ms: int
    attempts: int = 0
    target: str | None = None  # a client's name once clients exist; None: `webhooks.url`

    def text(self) -> str:
        return json.dumps(
            {
                "body": self.body.decode(),
                "created_ms": self.created_ms,
                "attempts": self.attempts,
                "target": self.target,
            },
            separators=(",", ":"),
        )

    @classmethod
    def parse(cls, text: bytes | str) -> HookRecord:
        fields = json.loads(text)
        return cls(
            body=fields["body"].encode(),
            created_ms=int(fields["created_ms"]),
            attempts=int(fields.get("attempts", 0)),
            target=fields.get("target"),
        )

    def failed_once_more(self) -> HookRecord:
        return replace(self, attempts=self.attempts + 1)


@dataclass(frozen=True)
class Lease:
    """A delivery this process may attempt until `until_ms`."""

    shard: Shard
    member: str
    record: HookRecord
    until_ms: int


class Outbox:
    """The outbox's scripts; Redis errors (RedisUnavailable, RedisReplyError) pass through."""

    def __init__(self, client: ScriptRunner, key_prefix: str) -> None:
        self._client = client
        self._prefix = key_prefix

    async def enqueue(self, sha: str, state: str, body: bytes, now_ms: int) -> None:
        """A webhook of `body` for the payment `sha` in `state`, due at once."""
        record = HookRecord(body, now_ms).text()
        shard = shard_for(self._prefix, sha)
        await self._client.run_script(
            _ENQUEUE,
            [shard.outbox, shard.hook(sha, state)],
            [outbox_member(sha, state), record, now_ms],
        )

    def shards(self) -> list[Shard]:
        return all_shards(self._prefix)

    async def due(self, shard: Shard, now_ms: int, limit: int) -> list[str]:
        """Members of `shard` due at `now_ms` (leased ones are not), oldest first."""
        members = await self._client.run_script(_DUE, [shard.outbox], [now_ms, limit])
        return [member.decode() for member in members]

    async def lease(self, shard: Shard, member: str, now_ms: int, until_ms: int) -> Lease | None:
        """The delivery, leased until `until_ms`; None when another process leased it first."""
        record = await self._client.run_script(
            _LEASE, self._keys(shard, member), [member, now_ms, until_ms]
        )
        if record is None:
            return None
        return Lease(shard, member, HookRecord.parse(record), until_ms)

    async def delivered(self, lease: Lease) -> None:
        """Removes the delivery, even if the lease ended meanwhile: the receiver has it."""
        await self._client.run_script(
            _DELIVERED, self._keys(lease.shard, lease.member), [lease.member]
        )

    async def retry(self, lease: Lease, next_ms: int, record: HookRecord) -> bool:
        """Schedules the next attempt; False when the lease had ended (another process has it)."""
        return bool(
            await self._client.run_script(
                _RETRY,
                self._keys(lease.shard, lease.member),
                [lease.member, lease.until_ms, next_ms, record.text()],
            )
        )

    async def give_up(self, lease: Lease) -> bool:
        """Drops the delivery; False when the lease had ended (another process has it)."""
        return bool(
            await self._client.run_script(
                _RETRY,
                self._keys(lease.shard, lease.member),
                [lease.member, lease.until_ms, b"", b""],
            )
        )

    async def backlog(self) -> int:
        """Deliveries not yet done, leased ones included, summed over the shards."""
        counts = await asyncio.gather(
            *(self._client.run_script(_BACKLOG, [shard.outbox], []) for shard in self.shards())
        )
        return sum(int(count) for count in counts)

    async def close(self) -> None:
        await self._client.close()

    def _keys(self, shard: Shard, member: str) -> list[Argument]:
        sha, state = member.split(":", 1)
        return [shard.outbox, shard.hook(sha, state)]
