"""Payments in a burst against a gateway whose Redis a test breaks midway, and the money
invariant checked afterwards (the failover and cluster suites).

- every answer a client saw was 200, or failed closed while the store could not be trusted
  (503 `idempotency_store_unavailable`, or 409 while an earlier attempt's lock is held);
- every TransactionID reached the provider at most once (after an unplanned failover, which may
  lose a lock: every call carried the one reference the provider deduplicates on);
- every 200 a client saw is stored: a fresh gateway (no replay cache) replays it byte for byte.
Recovery is shown by polling for a fresh payment's 200 up to a generous bound, never by timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import textwrap
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.settings.config import GatewayConfig
from tests.canonical_upstream import UpstreamState
from tests.conftest import GatewayClient, make_config, payment
from tests.conftest import running_gateway as gateway_on

Upstream = tuple[UpstreamState, str]
# Bounds, not expectations: the suite runs on a machine shared with other work.
BURST_BOUND_S = 60.0
RECOVERY_BOUND_S = 20.0


def config(upstream_url: str, redis_url: str, redis_extra: str = "") -> GatewayConfig:
    if "timeout_s" not in redis_extra:
        redis_extra += ", timeout_s: 0.3"
    return make_config(
        textwrap.dedent(
            f"""\
            redis: {{url: "{redis_url}"{redis_extra}}}
            idempotency: {{lock_ttl_s: 10, result_ttl_s: 600}}
            defaults:
              timeout_s: 2
              breaker: {{failure_rate_threshold: 0.6, minimum_calls: 1000, window_s: 30}}
            providers:
              CANON: {{url: "{upstream_url}"}}
            """
        )
    )


@dataclass
class Burst:
    """Every answer each TransactionID got, in order, and how many are settled (200)."""

    answers: dict[str, list[tuple[int, bytes]]] = field(default_factory=lambda: defaultdict(list))
    settled: int = 0
    # Set once this many payments are settled: the moment to break Redis.
    midway: asyncio.Event = field(default_factory=asyncio.Event)
    midway_at: int = 30

    def unexpected(self) -> list[tuple[str, int, bytes]]:
        return [
            (transaction_id, status, body)
            for transaction_id, seen in self.answers.items()
            for status, body in seen
            if not fails_closed(status, body) and status != 200
        ]

    def successes(self) -> dict[str, set[bytes]]:
        return {
            transaction_id: {body for status, body in seen if status == 200}
            for transaction_id, seen in self.answers.items()
        }


def fails_closed(status: int, body: bytes) -> bool:
    if status == 409:
        return True
    return status == 503 and json.loads(body).get("error") == "idempotency_store_unavailable"


async def pay(client: GatewayClient, transaction_id: str) -> tuple[int, bytes]:
    async with client.post("/v1/pay", json=payment(transaction_id)) as response:
        return response.status, await response.read()


async def run_burst(
    client: GatewayClient, burst: Burst, transaction_ids: Sequence[str], concurrency: int = 12
) -> None:
    """The payments, `concurrency` at a time, each retried until answered 200."""
    waiting = iter(transaction_ids)

    async def payer() -> None:
        for transaction_id in waiting:
            while True:
                status, body = await pay(client, transaction_id)
                burst.answers[transaction_id].append((status, body))
                if status == 200 or not fails_closed(status, body):
                    break
                await asyncio.sleep(0.05)
            burst.settled += 1
            if burst.settled >= burst.midway_at:
                burst.midway.set()

    async with asyncio.timeout(BURST_BOUND_S):
        await asyncio.gather(*(payer() for _ in range(concurrency)))


async def recovers(client: GatewayClient, name: str) -> None:
    """A fresh payment is answered 200 again, polled up to a generous bound."""
    async with asyncio.timeout(RECOVERY_BOUND_S):
        for attempt in range(10**6):
            if (await pay(client, f"{name}-probe-{attempt}"))[0] == 200:
                return
            await asyncio.sleep(0.05)


async def readiness(client: GatewayClient) -> tuple[int, str]:
    async with client.get("/readyz") as response:
        return response.status, (await response.json()).get("reason", "")


async def until_readiness(client: GatewayClient, status: int) -> str:
    async with asyncio.timeout(RECOVERY_BOUND_S):
        while True:
            seen, reason = await readiness(client)
            if seen == status:
                return reason
            await asyncio.sleep(0.02)


async def assert_money_invariant(
    burst: Burst, upstream: Upstream, redis_url: str, redis_extra: str, locks_may_be_lost: bool
) -> None:
    state, upstream_url = upstream
    assert burst.unexpected() == []
    calls = Counter(str(body["transaction_id"]) for body in state.bodies)
    if locks_may_be_lost:
        references = defaultdict(set)
        for body, reference in zip(state.bodies, state.references, strict=True):
            references[str(body["transaction_id"])].add(reference)
        assert [txid for txid, seen in references.items() if len(seen) > 1] == []
    else:
        assert [txid for txid, count in calls.items() if count > 1] == []
    successes = burst.successes()
    assert all(len(bodies) == 1 for bodies in successes.values()), successes
    # A fresh gateway has no replay cache: its answers come from Redis.
    async with gateway_on(config(upstream_url, redis_url, redis_extra)) as fresh:
        for transaction_id, bodies in successes.items():
            async with fresh.post("/v1/pay", json=payment(transaction_id)) as response:
                assert response.status == 200, transaction_id
                assert response.headers["Idempotent-Replayed"] == "true", transaction_id
                assert await response.read() == next(iter(bodies)), transaction_id
    assert Counter(str(body["transaction_id"]) for body in state.bodies) == calls


@contextlib.asynccontextmanager
async def burst_against(
    upstream: Upstream,
    redis_url: str,
    name: str,
    redis_extra: str = "",
    *,
    transaction_ids: Sequence[str] = (),
    locks_may_be_lost: bool = False,
) -> AsyncIterator[tuple[GatewayClient, Burst]]:
    """The gateway on `redis_url` with a burst running (120 payments named after `name`, or
    `transaction_ids`); yields once a quarter is settled (break Redis there), then waits for the
    burst to settle and payagg to recover, and checks the money invariant.

    `locks_may_be_lost`: an unplanned failover may lose acknowledged writes, a claim's lock
    among them, so a retry may reach the provider again: with the same reference, which the
    provider deduplicates on."""
    transaction_ids = transaction_ids or [f"{name}-{number}" for number in range(120)]
    async with gateway_on(config(upstream[1], redis_url, redis_extra)) as client:
        burst = Burst(midway_at=len(transaction_ids) // 4)
        running = asyncio.ensure_future(run_burst(client, burst, transaction_ids))
        try:
            async with asyncio.timeout(BURST_BOUND_S):
                await burst.midway.wait()
            yield client, burst
        finally:
            await running
        await recovers(client, name)
        assert await until_readiness(client, 200) == ""
    await assert_money_invariant(burst, upstream, redis_url, redis_extra, locks_may_be_lost)


def in_thread(function: Callable[..., Any], *args: Any) -> Awaitable[Any]:
    return asyncio.to_thread(function, *args)
