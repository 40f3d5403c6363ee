"""A flood of pending payments: what the lifecycle's schedule costs as it grows.

On one local Redis (no persistence: the store's own cost, not the disk's), this:
  1. writes N pending payments exactly as `POST /v1/pay` claims them (record, schedule, lease,
     counter in one script) and reports Redis's memory per pending payment;
  2. times one lease of 100 due payments and one compare-and-swap reschedule at n = N/10 and at
     n = N pending payments: both are sorted-set operations, O(log n) each, so the time per
     payment should barely move when n grows tenfold;
  3. runs reconciler passes over all N with a provider whose status query answers "pending" at
     once, in one process (one worker): the polls per second a worker sustains, payagg's own cost
     per poll (read, judge, reschedule), without any provider latency.

    .venv/bin/python bench/lifecycle_flood.py [--payments 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
from decimal import Decimal

from run import free_port, redis_server_binary  # bench/run.py, next to this script

from proxy.observability.metrics import GatewayMetrics
from proxy.payments.idempotency import IdempotencyStore
from proxy.payments.lifecycle import now_ms
from proxy.payments.reconciler import Reconciler
from proxy.payments.request import Payment
from proxy.providers.breaker import ProviderBreaker
from proxy.providers.mapping import ProviderAnswer
from proxy.settings.config import (
    BreakerSettings,
    IdempotencySettings,
    ReconcileSettings,
    RedisSettings,
)
from proxy.store.keys import all_shards

PROVIDER = "BENCH"


class PendingForever:
    """A provider whose payments never settle and whose status query costs nothing."""

    name = PROVIDER
    has_status = True
    not_found_grace_s = 0.0
    timeout_s = 1.0

    def __init__(self) -> None:
        self.breaker = ProviderBreaker(PROVIDER, BreakerSettings())
        self.queries = 0

    async def query_status(
        self, reference: str, provider_reference: str | None = None, past_breaker: bool = False
    ) -> ProviderAnswer:
        self.queries += 1
        return ProviderAnswer("pending")


async def used_memory(store: IdempotencyStore) -> int:
    info = await store._redis.execute(b"INFO", b"memory")
    for line in info.decode().splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":")[1])
    raise RuntimeError("no used_memory in INFO")


async def claim_many(store: IdempotencyStore, first: int, count: int) -> None:
    async def one(number: int) -> None:
        payment = Payment(f"FLOOD-{number}", Decimal("20.00"), "ZAR", PROVIDER, None, None)
        await store.claim(payment, PROVIDER, hold_s=0)

    for start in range(first, first + count, 500):
        await asyncio.gather(*(one(n) for n in range(start, min(start + 500, first + count))))


async def time_lease(store: IdempotencyStore) -> float:
    """Microseconds per payment leased (batches of 100 over every shard)."""
    records = store.lifecycle.records
    clock = now_ms() + 3_600_000
    started = time.perf_counter()
    leased = 0
    for shard in all_shards("bench:"):
        leased += len(await records.lease(shard, clock, clock, 100))
    return (time.perf_counter() - started) / max(leased, 1) * 1e6


async def measure(port: int, payments: int) -> None:
    metrics = GatewayMetrics([PROVIDER])
    store = IdempotencyStore(
        RedisSettings(url=f"redis://127.0.0.1:{port}/0", key_prefix="bench:", timeout_s=5),
        IdempotencySettings(),
        metrics,
    )
    empty = await used_memory(store)
    tenth = payments // 10
    await claim_many(store, 0, tenth)
    small_lease_us = await time_lease(store)
    await claim_many(store, tenth, payments - tenth)
    full = await used_memory(store)
    large_lease_us = await time_lease(store)
    print(f"pending payments: {payments}")
    print(f"store memory per pending payment: {(full - empty) / payments:.0f} bytes")
    print(
        f"lease, per payment: {small_lease_us:.1f} us at n={tenth}, "
        f"{large_lease_us:.1f} us at n={payments}"
    )

    provider = PendingForever()
    reconciler = Reconciler(
        store.lifecycle, {PROVIDER: provider}, ReconcileSettings(max_interval_s=1)
    )
    # Every payment due now: the pass leases, asks, judges and reschedules each one.
    for shard in all_shards("bench:"):
        due = await store._redis.execute(b"ZRANGE", shard.due, 0, -1)
        for sha in due:
            await store._redis.execute(b"ZADD", shard.due, 0, sha)
    started, polled = time.perf_counter(), 0
    while polled < payments:
        handled = await reconciler.pass_once()
        if not handled:
            break
        polled += len(handled)
    elapsed = time.perf_counter() - started
    print(
        f"reconciler, one worker: {polled} polls in {elapsed:.2f} s "
        f"= {polled / elapsed:.0f} polls/s"
    )
    await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=10_000)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        redis = subprocess.Popen(
            [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", directory],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            time.sleep(0.5)
            asyncio.run(measure(port, args.payments))
        finally:
            redis.terminate()
            redis.wait()


if __name__ == "__main__":
    main()
