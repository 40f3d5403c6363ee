"""The failover suite: payments in a burst while real redis-servers fail over, die, stall or refuse.

Each test runs the gateway in-process in front of the canonical upstream, sends a burst of
payments (each TransactionID retried until it is answered 200), breaks Redis in the middle of it,
and then checks the money invariant:
- every answer a client saw was 200, or 503 `idempotency_store_unavailable` / 409 while the store
  could not be trusted (the proxy fails closed; it calls no provider);
- every TransactionID reached the provider at most once;
- every 200 a client saw is stored: a fresh gateway (no replay cache) replays it byte for byte.
Recovery is shown by polling for a fresh payment's 200 up to a generous bound, never by timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import textwrap
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
import trustme

from proxy.config import GatewayConfig
from tests.canonical_upstream import UpstreamState
from tests.conftest import GatewayClient, RedisServer, StartRedis, make_config, payment
from tests.conftest import running_gateway as gateway_on
from tests.processes import wait_until
from tests.redis_relay import Relay

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
            if not _fails_closed(status, body) and status != 200
        ]

    def successes(self) -> dict[str, set[bytes]]:
        return {
            transaction_id: {body for status, body in seen if status == 200}
            for transaction_id, seen in self.answers.items()
        }


def _fails_closed(status: int, body: bytes) -> bool:
    if status == 409:
        return True
    return status == 503 and json.loads(body).get("error") == "idempotency_store_unavailable"


async def pay(client: GatewayClient, transaction_id: str) -> tuple[int, bytes]:
    async with client.post("/v1/pay", json=payment(transaction_id)) as response:
        return response.status, await response.read()


async def run_burst(
    client: GatewayClient, burst: Burst, name: str, count: int = 120, concurrency: int = 12
) -> None:
    """`count` payments, `concurrency` at a time, each retried until answered 200."""
    waiting = iter(f"{name}-{number}" for number in range(count))

    async def payer() -> None:
        for transaction_id in waiting:
            while True:
                status, body = await pay(client, transaction_id)
                burst.answers[transaction_id].append((status, body))
                if status == 200 or not _fails_closed(status, body):
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
    burst: Burst, upstream: Upstream, redis_url: str, redis_extra: str = ""
) -> None:
    state, upstream_url = upstream
    assert burst.unexpected() == []
    calls = Counter(str(body["transaction_id"]) for body in state.bodies)
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
    upstream: Upstream, redis_url: str, name: str, redis_extra: str = ""
) -> AsyncIterator[tuple[GatewayClient, Burst]]:
    """The gateway on `redis_url` with a burst running; yields once it is midway (break Redis
    there), then waits for the burst to settle and payagg to recover, and checks the money
    invariant."""
    async with gateway_on(config(upstream[1], redis_url, redis_extra)) as client:
        burst = Burst()
        running = asyncio.ensure_future(run_burst(client, burst, name))
        try:
            async with asyncio.timeout(BURST_BOUND_S):
                await burst.midway.wait()
            yield client, burst
        finally:
            await running
        await recovers(client, name)
        assert await until_readiness(client, 200) == ""
    await assert_money_invariant(burst, upstream, redis_url, redis_extra)


def in_thread(function: Callable[..., Any], *args: Any) -> Awaitable[Any]:
    return asyncio.to_thread(function, *args)


# 1. A planned failover demotes the node payagg is connected to -----------------------------------


def replica_in_sync(replica: RedisServer) -> bool:
    return bool(replica.client().info("replication")["master_link_status"] == "up")


def is_primary(server: RedisServer) -> bool:
    return bool(server.client().info("replication")["role"] == "master")


async def test_a_failover_mid_burst_is_followed_within_seconds_and_loses_no_stored_answer(
    start_redis: StartRedis, upstream: Upstream
) -> None:
    first = start_redis()
    second = start_redis("--replicaof", "127.0.0.1", str(first.port))
    await in_thread(wait_until, lambda: replica_in_sync(second), 20, "the replica to sync")
    # Commands wait longer than FAILOVER's short write pause: a connection on the demoted node
    # is then closed by no timeout and must be left because it answers READONLY.
    patient = ", timeout_s: 2"
    async with Relay(first.port) as endpoint:
        async with burst_against(upstream, endpoint.url, "failover", patient):
            # FAILOVER (Redis 6.2) waits for the replica to catch up, so no acknowledged write
            # is lost; the endpoint then names the new primary, as ElastiCache repoints its DNS
            # name, while payagg's open connections stay on the demoted node.
            first.client().execute_command("FAILOVER")
            endpoint.target_port = second.port
            await in_thread(wait_until, lambda: is_primary(second), 20, "the failover")
        assert not is_primary(first)


async def test_readiness_fails_on_a_node_that_takes_no_writes_and_says_why(
    start_redis: StartRedis, upstream: Upstream
) -> None:
    primary = start_redis("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    replica = start_redis("--replicaof", "127.0.0.1", str(primary.port))
    async with gateway_on(config(upstream[1], replica.url)) as on_replica:
        assert replica.client().ping()  # PING alone would call it ready
        assert "replica" in await until_readiness(on_replica, 503)
    async with gateway_on(config(upstream[1], primary.url)) as on_primary:
        assert await until_readiness(on_primary, 200) == ""
        primary.client().execute_command("DEBUG", "POPULATE", "30000", "filler", "100")
        assert "OOM" in await until_readiness(on_primary, 503)
        status, body = await pay(on_primary, "TXN-full")
        assert (status, json.loads(body)["error"]) == (503, "idempotency_store_unavailable")
    assert upstream[0].requests == 0


# 2. Connections killed --------------------------------------------------------------------------


async def test_killed_connections_mid_burst_lose_no_payment_and_are_replaced(
    start_redis: StartRedis, upstream: Upstream
) -> None:
    server = start_redis()
    async with burst_against(upstream, server.url, "kill"):
        for _ in range(3):
            server.client().client_kill_filter(_type="normal", skipme=True)
            await asyncio.sleep(0.1)


# 3. Redis frozen ---------------------------------------------------------------------------------


async def test_a_redis_frozen_for_three_seconds_mid_burst_only_delays_payments(
    start_redis: StartRedis, upstream: Upstream
) -> None:
    server = start_redis()
    async with burst_against(upstream, server.url, "stall") as (client, burst):
        server.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(3)
            assert (await readiness(client))[0] == 503
        finally:
            server.signal(signal.SIGCONT)
    stalled = [status for seen in burst.answers.values() for status, _ in seen if status == 503]
    assert stalled, "the freeze was not felt: no payment was answered 503"


# 4. Redis restarted with its data ---------------------------------------------------------------


async def test_redis_killed_and_restarted_from_its_append_only_file_keeps_every_answer(
    start_redis: StartRedis, upstream: Upstream
) -> None:
    server = start_redis("--appendonly", "yes", "--appendfsync", "always")
    async with burst_against(upstream, server.url, "restart"):
        server.signal(signal.SIGKILL)
        await in_thread(server.stop)
        await in_thread(server.start)


# 5. LOADING and BUSY -----------------------------------------------------------------------------


async def test_a_redis_still_loading_its_data_is_not_ready_then_serves(
    start_redis: StartRedis, upstream: Upstream
) -> None:
    # 20,000 keys at 100 µs each: two seconds of LOADING after the restart.
    server = start_redis("--key-load-delay", "100")
    server.client().execute_command("DEBUG", "POPULATE", "20000", "filler", "10")
    server.client().save()
    async with gateway_on(config(upstream[1], server.url)) as client:
        assert await until_readiness(client, 200) == ""
        await in_thread(server.stop)
        server.start(wait=False)
        await until_readiness(client, 503)
        status, body = await pay(client, "TXN-loading")
        assert _fails_closed(status, body), (status, body)
        await recovers(client, "loading")
        assert await until_readiness(client, 200) == ""
    assert server.client().dbsize() > 20000


async def test_a_redis_busy_in_a_script_fails_closed_and_recovers_once_it_is_done(
    start_redis: StartRedis, upstream: Upstream
) -> None:
    server = start_redis("--lua-time-limit", "50")
    async with gateway_on(config(upstream[1], server.url)) as client:
        assert await until_readiness(client, 200) == ""
        busy = server.busy_for(3)
        try:
            assert "BUSY" in await until_readiness(client, 503)
            status, body = await pay(client, "TXN-busy")
            assert _fails_closed(status, body), (status, body)
        finally:
            await in_thread(busy.join)
        await recovers(client, "busy")
    assert "TXN-busy" not in {body["transaction_id"] for body in upstream[0].bodies}


# 6. TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate_authority() -> trustme.CA:
    return trustme.CA()


def tls_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.mark.parametrize(
    ("trusted", "expected"), [(True, 200), (False, 503)], ids=["test-ca", "another-ca"]
)
async def test_rediss_with_a_test_authority_is_ready_and_another_authority_is_not(
    redis_server: RedisServer,
    redis_url: str,
    upstream: Upstream,
    certificate_authority: trustme.CA,
    tmp_path: Path,
    trusted: bool,
    expected: int,
) -> None:
    ca = certificate_authority if trusted else trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with Relay(redis_server.port, tls_context(certificate_authority)) as tls_endpoint:
        extra = f', tls_ca_file: "{ca_file}"'
        async with gateway_on(config(upstream[1], tls_endpoint.url, extra)) as client:
            await until_readiness(client, expected)
            status, _ = await pay(client, "TXN-tls")
    assert status == expected
    assert upstream[0].requests == (1 if trusted else 0)
    stored = redis_sync.Redis(port=redis_server.port).keys("payagg:*")
    assert (len(stored) > 0) == trusted
