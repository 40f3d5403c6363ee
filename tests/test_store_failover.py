"""The failover suite: payments in a burst while a real redis-server fails over, dies, stalls
or refuses, each checked against the money invariant (tests/payment_burst.py)."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
from pathlib import Path

import pytest
import redis as redis_sync
import trustme

from tests.conftest import RedisServer, StartRedis, payment
from tests.conftest import running_gateway as gateway_on
from tests.payment_burst import (
    Upstream,
    burst_against,
    config,
    fails_closed,
    in_thread,
    pay,
    readiness,
    recovers,
    until_readiness,
)
from tests.processes import wait_until
from tests.redis_relay import Relay

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
        assert fails_closed(status, body), (status, body)
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
            assert fails_closed(status, body), (status, body)
        finally:
            await in_thread(busy.join)
        await recovers(client, "busy")
    assert "TXN-busy" not in {body["transaction_id"] for body in upstream[0].bodies}


async def test_a_charged_payments_answer_waits_out_a_busy_redis_and_is_stored(
    start_redis: StartRedis, upstream: Upstream
) -> None:
    """The provider has charged; Redis answers BUSY (it runs nothing) when the answer is to be
    stored. The old client gave up at once: the client saw 200, nothing was stored, and every
    retry got 409 until the lock expired."""
    server = start_redis("--lua-time-limit", "50")
    state, upstream_url = upstream
    state.delay_s = 1.0
    async with gateway_on(config(upstream_url, server.url)) as client:
        assert await until_readiness(client, 200) == ""
        paying = asyncio.ensure_future(pay(client, "TXN-charged"))
        await in_thread(wait_until, lambda: state.requests == 1, 10, "the provider call")
        busy = server.busy_for(3)  # 2-3 s (whole seconds of TIME): past the provider's answer
        try:
            status, body = await paying
        finally:
            await in_thread(busy.join)
    assert status == 200
    async with (
        gateway_on(config(upstream_url, server.url)) as fresh,
        fresh.post("/v1/pay", json=payment("TXN-charged")) as replay,
    ):
        assert (replay.status, await replay.read()) == (200, body)
        assert replay.headers["Idempotent-Replayed"] == "true"
    assert state.requests == 1


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
