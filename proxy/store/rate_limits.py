"""Per-client rate limits in Redis: GCRA in one script, so every process and task shares them.

GCRA (the generic cell rate algorithm) keeps one number per client, the theoretical arrival time
(TAT) of its next request: each admitted request moves it `interval` = 1 / rate_per_s later, and
a request is admitted while TAT - now <= (burst - 1) * interval. It needs no per-request state
and no cleanup beyond the key's own expiry, and it answers exactly when the next request would
be admitted (`Retry-After`).

The clock is Redis's (`TIME`): every task reads the same one, so skew between tasks cannot
hand a client more than its rate. The key is hash-tagged: the one key a script touches names its
own slot (Redis Cluster, MemoryDB).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from proxy.store.client import Script, StoreClient

# ARGV: interval in ms, burst, and (tests only) the clock in ms instead of Redis's TIME.
# Returns 0 when admitted, else the ms until a request would be, rounded up (>= 1).
_GCRA = Script("""
local now
if ARGV[3] then
  now = tonumber(ARGV[3])
else
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
end
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local admitted_from = tat - interval * (tonumber(ARGV[2]) - 1)
if admitted_from > now then return math.ceil(admitted_from - now) end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1)
return 0
""")


class RateLimits:
    """Admission against each client's limit; raises RedisUnavailable or RedisReplyError."""

    def __init__(
        self, redis: StoreClient, prefix: str, clock_ms: Callable[[], float] | None = None
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        # None: Redis's clock, the one every task shares.
        self._clock_ms = clock_ms

    def key(self, client: str) -> str:
        return f"{{{self._prefix}rate:{client}}}"

    async def wait_s(self, client: str, rate_per_s: float, burst: int) -> int:
        """0 when this request is admitted (and counted), else whole seconds until one would be."""
        args: list[str | int] = [f"{1000 / rate_per_s:.6f}", burst]
        if self._clock_ms is not None:
            args.append(f"{self._clock_ms():.3f}")
        wait_ms = int(await self._redis.run_script(_GCRA, [self.key(client)], args))
        return math.ceil(wait_ms / 1000)

    async def close(self) -> None:
        await self._redis.close()
