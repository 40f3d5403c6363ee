"""Replays come from Redis alone (CONTRACT §2): no process answers what the store does not hold.

The per-process replay cache is gone (BENCHMARKS.md, "The per-process replay cache"): two
gateways on one Redis give the same answer for every TransactionID, whatever Redis lost, and
`idempotency.replay_cache_size` is accepted with a warning and ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.settings.config import GatewayConfig
from tests.canonical_upstream import UpstreamState
from tests.conftest import (
    GatewayClient,
    RedisServer,
    make_config,
    payment,
    running_gateway,
)

Upstream = tuple[UpstreamState, str]
Client = GatewayClient


def config(upstream_url: str, redis_url: str, idempotency_extra: str = "") -> GatewayConfig:
    return make_config(
        textwrap.dedent(
            f"""\
            redis: {{url: "{redis_url}", timeout_s: 0.3}}
            idempotency: {{lock_ttl_s: 10, result_ttl_s: 600{idempotency_extra}}}
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


async def test_two_gateways_on_one_redis_never_disagree_after_redis_loses_its_data(
    upstream: Upstream, redis_url: str, redis_server: RedisServer
) -> None:
    state, url = upstream
    async with (
        running_gateway(config(url, redis_url)) as storing,
        running_gateway(config(url, redis_url)) as other,
    ):
        first = await pay(storing, payment("TXN-lost"))
        assert (await pay(storing, payment("TXN-lost"))).replayed
        assert (await pay(other, payment("TXN-lost"))).replayed

        redis_server.client().flushall()
        looked_up = [await get(gateway, "/v1/payments/TXN-lost") for gateway in (storing, other)]
        again = await pay(other, payment("TXN-lost"))
        seen_by_storing = await pay(storing, payment("TXN-lost"))
        after = [await get(gateway, "/v1/payments/TXN-lost") for gateway in (storing, other)]

    assert first.status == 200
    # Neither gateway answers from memory what Redis no longer holds ...
    assert [answer.status for answer in looked_up] == [404, 404]
    assert again.status == 200
    assert not again.replayed
    # ... so the answer stored after the loss is the one both give.
    assert seen_by_storing.replayed
    assert seen_by_storing.body == again.body
    assert after[0].json() == after[1].json()
    assert after[0].json()["response"] == again.json()
    assert state.requests == 2


async def test_a_completed_payment_is_not_replayed_from_memory_while_redis_is_down(
    upstream: Upstream, redis_url: str, redis_server: RedisServer
) -> None:
    state, url = upstream
    async with running_gateway(config(url, redis_url)) as client:
        first = await pay(client, payment("TXN-down"))
        assert (await pay(client, payment("TXN-down"))).replayed

        async with redis_stopped(redis_server):
            replay = await pay(client, payment("TXN-down"))
            lookup = await get(client, "/v1/payments/TXN-down")

    assert first.status == 200
    assert (replay.status, replay.json()["error"]) == (503, "idempotency_store_unavailable")
    assert lookup.status == 503
    assert state.requests == 1


async def test_the_deprecated_replay_cache_size_is_accepted_with_a_warning_and_ignored(
    upstream: Upstream,
    redis_url: str,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    state, url = upstream
    with caplog.at_level(logging.WARNING, logger="payagg.idempotency"):
        async with running_gateway(config(url, redis_url, ", replay_cache_size: 10000")) as client:
            first = await pay(client, payment("TXN-config"))
            redis_server.client().flushall()
            again = await pay(client, payment("TXN-config"))

    assert any(
        "replay_cache_size is deprecated and ignored" in record.getMessage()
        for record in caplog.records
    )
    assert (first.status, again.status) == (200, 200)
    assert not again.replayed
    assert state.requests == 2
