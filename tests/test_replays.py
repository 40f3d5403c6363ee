"""Replays of completed payments from the per-process cache (`proxy/replays.py`).

First `ReplayCache` alone with an injected clock, then through the gateway: a copy answers
without Redis, says the same thing Redis would (422 for a reused key), never outlives the
original, and `idempotency.replay_cache_size: 0` turns it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import textwrap
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.config import GatewayConfig
from proxy.replays import ReplayCache
from tests.canonical_upstream import UpstreamState
from tests.conftest import (
    GatewayClient,
    RedisServer,
    make_config,
    payment,
    running_gateway,
)
from tests.redis_relay import Relay

Upstream = tuple[UpstreamState, str]
Client = GatewayClient


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# 1. The cache alone ------------------------------------------------------------------------------


def test_an_entry_is_served_until_its_deadline_and_not_at_it() -> None:
    clock = Clock()
    cache: ReplayCache[str] = ReplayCache(10, clock)
    cache.put(b"k", "answer", ttl_s=5)

    clock.now += 4.999
    assert cache.get(b"k") == "answer"
    clock.now += 0.001
    assert cache.get(b"k") is None
    assert len(cache) == 0


def test_a_new_put_replaces_the_value_and_the_deadline() -> None:
    clock = Clock()
    cache: ReplayCache[str] = ReplayCache(10, clock)
    cache.put(b"k", "old", ttl_s=1)
    cache.put(b"k", "new", ttl_s=10)

    clock.now += 5
    assert cache.get(b"k") == "new"
    assert len(cache) == 1


def test_at_capacity_the_least_recently_used_entry_is_evicted() -> None:
    cache: ReplayCache[str] = ReplayCache(3, Clock())
    for key in (b"a", b"b", b"c"):
        cache.put(key, key.decode(), ttl_s=60)

    cache.put(b"d", "d", ttl_s=60)

    assert len(cache) == 3
    assert [cache.get(key) for key in (b"a", b"b", b"c", b"d")] == [None, "b", "c", "d"]


def test_a_get_makes_an_entry_recently_used() -> None:
    cache: ReplayCache[str] = ReplayCache(3, Clock())
    for key in (b"a", b"b", b"c"):
        cache.put(key, key.decode(), ttl_s=60)

    assert cache.get(b"a") == "a"
    cache.put(b"d", "d", ttl_s=60)

    assert [cache.get(key) for key in (b"a", b"b", b"c", b"d")] == ["a", None, "c", "d"]


def test_a_put_of_a_known_key_makes_it_recently_used() -> None:
    cache: ReplayCache[str] = ReplayCache(2, Clock())
    cache.put(b"a", "a", ttl_s=60)
    cache.put(b"b", "b", ttl_s=60)
    cache.put(b"a", "a2", ttl_s=60)

    cache.put(b"c", "c", ttl_s=60)

    assert [cache.get(key) for key in (b"a", b"b", b"c")] == ["a2", None, "c"]


def test_capacity_zero_stores_nothing() -> None:
    cache: ReplayCache[str] = ReplayCache(0, Clock())
    cache.put(b"k", "answer", ttl_s=60)

    assert cache.get(b"k") is None
    assert len(cache) == 0


@pytest.mark.parametrize("ttl_s", [0, -0.001, -1], ids=["zero", "pttl-without-expiry", "negative"])
def test_a_non_positive_ttl_is_not_stored(ttl_s: float) -> None:
    cache: ReplayCache[str] = ReplayCache(10, Clock())
    cache.put(b"k", "answer", ttl_s=ttl_s)

    assert cache.get(b"k") is None
    assert len(cache) == 0


# 2. Through the gateway ------------------------------------------------------------------------


def config(
    upstream_url: str,
    redis_url: str,
    *,
    result_ttl_s: int = 600,
    replay_cache_size: int | None = None,
    redis_timeout_s: float = 0.3,
) -> GatewayConfig:
    cache = "" if replay_cache_size is None else f", replay_cache_size: {replay_cache_size}"
    return make_config(
        textwrap.dedent(
            f"""\
            redis: {{url: "{redis_url}", timeout_s: {redis_timeout_s}}}
            idempotency: {{lock_ttl_s: 10, result_ttl_s: {result_ttl_s}{cache}}}
            defaults:
              timeout_s: 1
              breaker: {{failure_rate_threshold: 0.6, minimum_calls: 3, window_s: 30, open_s: 30}}
            providers:
              CANON: {{url: "{upstream_url}"}}
            """
        )
    )


class Answer:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def replayed(self) -> bool:
        return bool(self.headers.get("Idempotent-Replayed") == "true")


async def pay(client: Client, body: dict[str, object]) -> Answer:
    async with client.post("/v1/pay", json=body) as response:
        return Answer(response.status, response.headers, await response.read())


async def get(client: Client, path: str) -> Answer:
    async with client.get(path) as response:
        return Answer(response.status, response.headers, await response.read())


@contextlib.asynccontextmanager
async def redis_stopped(server: RedisServer) -> AsyncIterator[None]:
    await asyncio.to_thread(server.stop)
    try:
        yield
    finally:
        await asyncio.to_thread(server.start)


def wait_until_redis_forgets(server: RedisServer, key: bytes, timeout_s: float = 5.0) -> None:
    redis = server.client()
    deadline = time.monotonic() + timeout_s
    while redis.exists(key):
        assert time.monotonic() < deadline, f"Redis still has {key!r} after {timeout_s}s"
        time.sleep(0.01)


async def test_a_completed_payment_is_replayed_by_its_gateway_while_redis_is_down(
    upstream: Upstream, redis_url: str, redis_server: RedisServer
) -> None:
    state, url = upstream
    async with running_gateway(config(url, redis_url)) as client:
        first = await pay(client, payment("TXN-cached"))
        assert first.status == 200
        assert not first.replayed

        async with redis_stopped(redis_server):
            replay = await pay(client, payment("TXN-cached"))
            reused = await pay(client, payment("TXN-cached", Amount=99.00))
            lookup = await get(client, "/v1/payments/TXN-cached")
            new_key = await pay(client, payment("TXN-new"))

    assert replay.status == 200
    assert replay.body == first.body
    assert replay.replayed
    assert reused.status == 422
    assert reused.json()["error"] == "idempotency_key_reused"
    assert lookup.status == 200
    assert lookup.json()["state"] == "COMPLETED"
    assert lookup.json()["response"] == first.json()
    assert new_key.status == 503
    assert new_key.json()["error"] == "idempotency_store_unavailable"
    assert state.requests == 1


async def test_a_result_read_from_redis_is_kept_by_the_gateway_that_read_it(
    upstream: Upstream, redis_url: str, redis_server: RedisServer
) -> None:
    state, url = upstream
    async with (
        running_gateway(config(url, redis_url)) as storing,
        running_gateway(config(url, redis_url)) as reading,
    ):
        first = await pay(storing, payment("TXN-shared"))
        from_redis = await pay(reading, payment("TXN-shared"))

        async with redis_stopped(redis_server):
            from_cache = await pay(reading, payment("TXN-shared"))

    assert first.status == 200
    assert from_redis.replayed
    assert from_redis.body == first.body
    assert from_cache.status == 200
    assert from_cache.replayed
    assert from_cache.body == first.body
    assert state.requests == 1


async def test_the_copy_expires_with_the_original_in_the_gateway_that_stored_it(
    upstream: Upstream, redis_url: str, redis_server: RedisServer
) -> None:
    state, url = upstream
    async with running_gateway(config(url, redis_url, result_ttl_s=1)) as client:
        first = await pay(client, payment("TXN-ttl"))
        replay = await pay(client, payment("TXN-ttl"))
        await asyncio.to_thread(
            wait_until_redis_forgets, redis_server, client.gateway.store.redis_key("TXN-ttl")
        )

        again = await pay(client, payment("TXN-ttl"))

    assert (first.status, replay.status, again.status) == (200, 200, 200)
    assert replay.replayed
    assert not again.replayed
    assert state.requests == 2


async def test_a_copy_read_over_a_slow_link_does_not_outlive_the_original(
    upstream: Upstream, redis_url: str, redis_server: RedisServer
) -> None:
    """The copy's deadline counts from when the read was sent, not from when the reply (and
    its PTTL) arrived: otherwise it outlives the original by the round trip."""
    state, url = upstream
    async with Relay(redis_server.port, reply_delay_s=0.3) as slow_link:
        slow_url = f"redis://127.0.0.1:{slow_link.port}/0"
        async with running_gateway(config(url, redis_url, result_ttl_s=1)) as storing:
            first = await pay(storing, payment("TXN-slow"))
            key = storing.gateway.store.redis_key("TXN-slow")
        async with running_gateway(
            config(url, slow_url, result_ttl_s=1, redis_timeout_s=2)
        ) as reading:
            from_redis = await pay(reading, payment("TXN-slow"))
            await asyncio.to_thread(wait_until_redis_forgets, redis_server, key)

            again = await pay(reading, payment("TXN-slow"))

    assert first.status == 200
    assert from_redis.replayed
    assert again.status == 200
    assert not again.replayed
    assert state.requests == 2


async def test_a_replay_cache_size_of_zero_sends_every_replay_to_redis(
    upstream: Upstream, redis_url: str, redis_server: RedisServer
) -> None:
    state, url = upstream
    async with running_gateway(config(url, redis_url, replay_cache_size=0)) as client:
        first = await pay(client, payment("TXN-nocache"))
        replay = await pay(client, payment("TXN-nocache"))
        async with redis_stopped(redis_server):
            without_redis = await pay(client, payment("TXN-nocache"))

    assert first.status == 200
    assert replay.replayed
    assert without_redis.status == 503
    assert without_redis.json()["error"] == "idempotency_store_unavailable"
    assert state.requests == 1
