"""Idempotency (CONTRACT §2): replays, reused keys, in-flight locks, release, and Redis outages.

Everything talks to a real redis-server (the `redis_server` fixture) and a real in-process
canonical upstream; the only seam used is the store's `claim`, to open a breaker at an exact
moment (see the 503 case of the release test).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import signal
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.breaker import ProviderBreaker
from proxy.config import GatewayConfig, IdempotencySettings, RedisSettings
from proxy.errors import ProviderFailed
from proxy.idempotency import Claim, IdempotencyStore, StoredResult
from proxy.metrics import GatewayMetrics
from proxy.payment import parse_payment
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
PREFIX = b"payagg:"
REDIS_TIMEOUT_S = 0.3


def config(
    upstream_url: str,
    redis_url: str,
    *,
    timeout_s: float = 1,
    lock_ttl_s: int = 10,
    result_ttl_s: int = 600,
    minimum_calls: int = 3,
    open_s: float = 30,
    key_prefix: str = PREFIX.decode(),
) -> GatewayConfig:
    """One canonical provider CANON, every knob these tests turn in one place."""
    return make_config(
        textwrap.dedent(
            f"""\
            redis: {{url: "{redis_url}", key_prefix: "{key_prefix}", timeout_s: {REDIS_TIMEOUT_S}}}
            idempotency: {{lock_ttl_s: {lock_ttl_s}, result_ttl_s: {result_ttl_s}}}
            defaults:
              timeout_s: {timeout_s}
              breaker:
                failure_rate_threshold: 0.6
                minimum_calls: {minimum_calls}
                window_s: 30
                open_s: {open_s}
            providers:
              CANON: {{url: "{upstream_url}"}}
            """
        )
    )


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def pay(client: Client, body: dict[str, object], key: str | None = None) -> Answer:
    headers = {} if key is None else {"Idempotency-Key": key}
    async with client.post("/v1/pay", json=body, headers=headers) as response:
        return Answer(response.status, response.headers, await response.read())


async def get(client: Client, path: str) -> Answer:
    async with client.get(path) as response:
        return Answer(response.status, response.headers, await response.read())


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 5.0) -> Any:
    """Poll `check()` until it returns something truthy, and return that; fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


async def upstream_has_seen(state: UpstreamState, count: int) -> None:
    async def seen() -> bool:
        return state.requests >= count

    await eventually(seen, f"{count} upstream request(s)")


def redis_key(idempotency_key: str, prefix: bytes = PREFIX) -> bytes:
    return prefix + hashlib.sha256(idempotency_key.encode()).hexdigest().encode()


def fingerprint(body: dict[str, object]) -> str:
    return parse_payment(json.dumps(body).encode(), None, {"canon"}).fingerprint("CANON")


def provider_reference(idempotency_key: str) -> str:
    return parse_payment(
        json.dumps(payment()).encode(), idempotency_key, {"canon"}
    ).provider_reference("CANON")


def is_replay(answer: Answer) -> bool:
    return answer.headers.get("Idempotent-Replayed") == "true"


async def store_errors(client: Client) -> float:
    text = (await get(client, "/metrics")).body.decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "payagg_idempotency_store_errors_total"
    )


def trip(breaker: ProviderBreaker) -> None:
    """Open the breaker exactly as failed provider calls would: through `call()`."""
    for _ in range(breaker.settings.minimum_calls):
        with contextlib.suppress(ProviderFailed), breaker.call():
            raise ProviderFailed(breaker.provider, "simulated outage")
    assert breaker.rejects_now()


# 1. Replays ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("decline", "status", "outcome"),
    [(False, 200, "SUCCESS"), (True, 402, "DECLINED")],
    ids=["success", "declined"],
)
async def test_a_replay_returns_the_stored_status_and_body_byte_for_byte(
    gateway: Client, upstream: Upstream, decline: bool, status: int, outcome: str
) -> None:
    state, _ = upstream
    state.decline = decline

    first = await pay(gateway, payment("TXN-replay"))
    replay = await pay(gateway, payment("TXN-replay"))

    assert (first.status, first.json()["status"]) == (status, outcome)
    assert not is_replay(first)
    assert replay.status == first.status
    assert replay.body == first.body
    assert is_replay(replay)
    assert replay.headers["Content-Type"] == first.headers["Content-Type"]
    assert state.requests == 1


async def test_a_replay_is_served_while_the_providers_breaker_is_open(
    upstream: Upstream, redis_url: str
) -> None:
    state, url = upstream
    async with running_gateway(config(url, redis_url, minimum_calls=3)) as client:
        done = await pay(client, payment("TXN-done"))
        assert done.status == 200
        state.failure_rate = 1.0
        for attempt in range(10):
            answer = await pay(client, payment(f"TXN-fail-{attempt}"))
            if answer.status == 503:
                break
            assert answer.status == 502
        assert answer.json()["error"] == "provider_unavailable"
        seen = state.requests

        replay = await pay(client, payment("TXN-done"))

        assert replay.status == 200
        assert replay.body == done.body
        assert is_replay(replay)
        assert state.requests == seen


# 2. Reused keys -------------------------------------------------------------------------------


async def test_a_completed_key_reused_with_a_different_body_is_refused_with_422(
    gateway: Client, upstream: Upstream
) -> None:
    assert (await pay(gateway, payment("TXN-7", Amount=20.00))).status == 200

    reused = await pay(gateway, payment("TXN-7", Amount=21.00))

    assert reused.status == 422
    assert reused.json()["error"] == "idempotency_key_reused"
    assert upstream[0].requests == 1


async def test_a_key_in_progress_reused_with_a_different_body_is_refused_with_422(
    gateway: Client, upstream: Upstream
) -> None:
    state, _ = upstream
    state.delay_s = 0.5
    first = asyncio.create_task(pay(gateway, payment("TXN-8", Amount=20.00)))
    await upstream_has_seen(state, 1)

    reused = await pay(gateway, payment("TXN-8", Amount=21.00))

    assert reused.status == 422
    assert reused.json()["error"] == "idempotency_key_reused"
    assert (await first).status == 200
    assert state.requests == 1


async def test_the_idempotency_key_header_takes_precedence_over_the_transaction_id(
    gateway: Client, upstream: Upstream
) -> None:
    state, _ = upstream
    first = await pay(gateway, payment("TXN-A"), key="order-7")

    other_transaction = await pay(gateway, payment("TXN-B"), key="order-7")
    same_request = await pay(gateway, payment("TXN-A"), key="order-7")
    same_transaction_without_header = await pay(gateway, payment("TXN-A"))

    assert first.status == 200
    assert other_transaction.status == 422
    assert other_transaction.json()["error"] == "idempotency_key_reused"
    assert same_request.status == 200
    assert is_replay(same_request)
    assert same_request.body == first.body
    # Without the header the key is "TXN-A", a different key from "order-7": a new payment.
    assert same_transaction_without_header.status == 200
    assert not is_replay(same_transaction_without_header)
    assert state.requests == 2


# 3. Concurrency -------------------------------------------------------------------------------


async def test_fifty_concurrent_requests_with_one_key_make_exactly_one_upstream_call(
    gateway: Client, upstream: Upstream
) -> None:
    state, _ = upstream
    state.delay_s = 0.5

    answers = await asyncio.gather(*(pay(gateway, payment("TXN-50")) for _ in range(50)))

    assert state.requests == 1
    assert {answer.status for answer in answers} <= {200, 409}
    fresh = [a for a in answers if a.status == 200 and not is_replay(a)]
    assert len(fresh) == 1
    in_progress = [a for a in answers if a.status == 409]
    assert in_progress, "the requests did not overlap: the test proves nothing"
    for answer in in_progress:
        assert answer.headers["Retry-After"] == "1"
        assert answer.json()["error"] == "request_in_progress"


# 4. Locks expire -------------------------------------------------------------------------------


async def test_a_lock_left_by_a_crashed_proxy_blocks_the_key_until_it_expires(
    gateway: Client, upstream: Upstream, redis_server: RedisServer
) -> None:
    state, _ = upstream
    body = payment("TXN-crash")
    key = redis_key("TXN-crash")
    redis = redis_server.client()
    # What IdempotencyStore.claim writes (`L|token|fingerprint`), owned by a proxy now dead.
    crashed_lock = f"L|{secrets.token_hex(16)}|{fingerprint(body)}"
    redis.set(key, crashed_lock, ex=1)

    blocked = await pay(gateway, body)
    assert blocked.status == 409
    assert blocked.json()["error"] == "request_in_progress"
    assert state.requests == 0

    async def expired() -> bool:
        return not redis.exists(key)

    await eventually(expired, "the crashed proxy's lock to expire")
    after = await pay(gateway, body)

    assert after.status == 200
    assert not is_replay(after)
    assert state.requests == 1


async def test_every_key_the_proxy_writes_has_an_expiry(
    upstream: Upstream, redis_url: str, redis_server: RedisServer
) -> None:
    state, url = upstream
    state.delay_s = 0.3
    redis = redis_server.client()
    key = redis_key("TXN-ttl")
    async with running_gateway(config(url, redis_url, lock_ttl_s=10, result_ttl_s=600)) as client:
        in_flight = asyncio.create_task(pay(client, payment("TXN-ttl")))
        await upstream_has_seen(state, 1)
        lock_ttl = redis.ttl(key)
        assert (await in_flight).status == 200
        result_ttl = redis.ttl(key)

    assert 0 < lock_ttl <= 10
    assert 10 < result_ttl <= 600


# 5. Release on provider failure -----------------------------------------------------------------


async def _provider_fails(state: UpstreamState, client: Client) -> None:
    state.failure_rate = 1.0


async def _provider_hangs(state: UpstreamState, client: Client) -> None:
    state.delay_s = 0.8  # > timeout_s below


async def _provider_already_has_it(state: UpstreamState, client: Client) -> None:
    state.already_exists = True


async def _breaker_opens_after_the_claim(state: UpstreamState, client: Client) -> None:
    store = client.gateway.store
    breaker = client.gateway.breakers["CANON"]
    real_claim = store.claim

    async def claim_then_open(*args: str) -> Claim | StoredResult:
        # The request passed the fail-fast check while the breaker was closed; other requests'
        # failures open it while this one holds its claim, so its own call is refused.
        claimed = await real_claim(*args)
        trip(breaker)
        delattr(store, "claim")  # once only: the retry claims normally
        return claimed

    setattr(store, "claim", claim_then_open)  # noqa: B010 (mypy forbids assigning a method)


async def _provider_recovers(state: UpstreamState, client: Client) -> None:
    state.failure_rate = 0.0
    state.delay_s = 0.0
    state.already_exists = False
    breaker = client.gateway.breakers["CANON"]

    async def admits_calls() -> bool:
        return not breaker.rejects_now()

    await eventually(admits_calls, "the breaker to let a trial call through")


@pytest.mark.parametrize(
    ("fail", "status", "error", "upstream_calls"),
    [
        (_provider_fails, 502, "provider_error", 2),
        (_provider_hangs, 504, "provider_timeout", 2),
        (_provider_already_has_it, 504, "provider_timeout", 2),
        (_breaker_opens_after_the_claim, 503, "provider_unavailable", 1),
    ],
    ids=[
        "502-provider-error",
        "504-provider-timeout",
        "504-provider-already-has-the-reference",
        "503-breaker-open-after-claim",
    ],
)
async def test_a_failed_payment_releases_its_key_and_the_retry_reuses_the_provider_reference(
    upstream: Upstream,
    redis_url: str,
    redis_server: RedisServer,
    fail: Callable[[UpstreamState, Client], Awaitable[None]],
    status: int,
    error: str,
    upstream_calls: int,
) -> None:
    state, url = upstream
    reference = provider_reference("TXN-retry")
    async with running_gateway(config(url, redis_url, timeout_s=0.3, open_s=0.3)) as client:
        await fail(state, client)
        failed = await pay(client, payment("TXN-retry"))
        assert failed.status == status
        assert failed.json()["error"] == error
        assert not redis_server.client().exists(redis_key("TXN-retry")), "key not released"

        await _provider_recovers(state, client)
        retry = await pay(client, payment("TXN-retry"))

    assert retry.status == 200
    assert not is_replay(retry)
    assert retry.json()["provider_reference"] == f"up-{reference}"
    # A 503 is refused before the provider is called; 502 and 504 reached it with the same UUID.
    assert state.references == [reference] * upstream_calls
    assert uuid.UUID(reference).version == 5


async def test_an_answer_about_another_amount_is_422_stores_nothing_and_releases_the_key(
    upstream: Upstream, redis_url: str, redis_server: RedisServer
) -> None:
    state, url = upstream
    reference = provider_reference("TXN-lost")
    # What the provider remembers under this reference: an earlier payment of 999, whose record
    # payagg no longer has.
    state.answered[reference] = json.dumps(
        {"status": "SUCCESS", "provider_reference": "up-old", "amount": 999, "currency": "ZAR"}
    ).encode()
    async with running_gateway(config(url, redis_url)) as client:
        refused = await pay(client, payment("TXN-lost"))
        assert refused.status == 422
        assert refused.json()["error"] == "idempotency_key_reused"
        assert not redis_server.client().exists(redis_key("TXN-lost")), "nothing stored"
        assert client.gateway.breakers["CANON"].window_counts().failures == 0

        del state.answered[reference]  # (a provider that would take it as a new payment)
        again = await pay(client, payment("TXN-lost"))
    assert again.status == 200, "the 422 was not stored for replay"
    assert not is_replay(again)
    assert state.references == [reference] * 2


# 6. Owner-checked finish -----------------------------------------------------------------------


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[IdempotencyStore]:
    store = IdempotencyStore(
        RedisSettings(url=redis_url, timeout_s=REDIS_TIMEOUT_S),
        IdempotencySettings(lock_ttl_s=10, result_ttl_s=600),
        GatewayMetrics(["CANON"]),
    )
    yield store
    await store.close()


@pytest.mark.parametrize(
    "finish",
    [lambda claim: claim.keep(200, b'{"status":"SUCCESS"}'), lambda claim: claim.release()],
    ids=["keep", "release"],
)
async def test_a_stale_owner_cannot_overwrite_or_delete_a_newer_lock(
    store: IdempotencyStore,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    finish: Callable[[Claim], Awaitable[None]],
) -> None:
    claim = await store.claim("stale-key", "fp", lambda: "ref-old")
    assert isinstance(claim, Claim)
    redis = redis_server.client()
    # The old lock expired and another request claimed the key with its own token.
    newer = b"L|" + secrets.token_hex(16).encode() + b"|fp"
    redis.set(claim.key, newer, ex=10)

    with caplog.at_level(logging.ERROR, logger="payagg.idempotency"):
        await finish(claim)

    assert redis.get(claim.key) == newer
    assert 0 < redis.ttl(claim.key) <= 10
    assert any("expired" in r.getMessage() and "ref-old" in r.getMessage() for r in caplog.records)


# 7. Redis outages ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def redis_outage(server: RedisServer, kind: str) -> AsyncIterator[None]:
    """Redis killed (connections refused) or frozen by SIGSTOP (connections hang), then back."""
    process = server.process
    assert process is not None
    if kind == "killed":
        await asyncio.to_thread(server.stop)
    else:
        process.signal(signal.SIGSTOP)
    try:
        yield
    finally:
        if kind == "killed":
            await asyncio.to_thread(server.start)
        else:
            process.signal(signal.SIGCONT)


def scripts_run(server: RedisServer) -> int:
    """Lua scripts Redis ran (an EVALSHA refused with NOSCRIPT, then sent as EVAL, counts once)."""
    stats = server.client().info("commandstats")
    runs = [stats.get(f"cmdstat_{name}", {}) for name in ("evalsha", "eval")]
    return sum(run.get("calls", 0) - run.get("failed_calls", 0) for run in runs)


async def ready_again(client: Client) -> None:
    async def ready() -> bool:
        return (await get(client, "/readyz")).status == 200

    await eventually(ready, "/readyz to answer 200 after Redis came back")


@pytest.mark.parametrize("kind", ["killed", "frozen"], ids=["redis-killed", "redis-frozen"])
async def test_without_redis_payments_fail_closed_fast_and_resume_by_themselves(
    upstream: Upstream, redis_url: str, redis_server: RedisServer, kind: str
) -> None:
    state, url = upstream
    async with running_gateway(config(url, redis_url)) as client:
        assert (await pay(client, payment("TXN-before"))).status == 200
        errors_before = await store_errors(client)
        async with redis_outage(redis_server, kind):
            started = time.monotonic()
            refused = await pay(client, payment("TXN-during"))
            elapsed = time.monotonic() - started
            errors_after = await store_errors(client)
            not_ready = await get(client, "/readyz")

        assert refused.status == 503
        assert refused.json()["error"] == "idempotency_store_unavailable"
        assert elapsed < REDIS_TIMEOUT_S + 0.5
        assert state.requests == 1
        assert errors_after == errors_before + 1
        assert not_ready.status == 503

        await ready_again(client)
        resumed = await pay(client, payment("TXN-after"))

    assert resumed.status == 200
    assert not is_replay(resumed)
    assert state.requests == 2


@pytest.mark.parametrize("kind", ["killed", "frozen"], ids=["redis-killed", "redis-frozen"])
async def test_a_key_refused_while_redis_was_down_can_be_retried_as_soon_as_it_is_back(
    upstream: Upstream, redis_url: str, redis_server: RedisServer, kind: str
) -> None:
    state, url = upstream
    keys = [f"TXN-during-{n}" for n in range(20)]
    async with running_gateway(config(url, redis_url)) as client:
        # A payment first, as in production: the claim then goes out on a pooled connection.
        assert (await pay(client, payment("TXN-before"))).status == 200
        async with redis_outage(redis_server, kind):
            refused = await asyncio.gather(*(pay(client, payment(key)) for key in keys))
        await ready_again(client)
        scripts_before = scripts_run(redis_server)
        retries = await asyncio.gather(*(pay(client, payment(key)) for key in keys))
        scripts_during_retries = scripts_run(redis_server) - scripts_before

    # Each retry: its claim and its stored result; plus one shared release of each key the
    # outage left unanswered, not one per retry that found them.
    assert scripts_during_retries == 3 * len(keys)
    assert [answer.status for answer in refused] == [503] * len(keys)
    assert [answer.status for answer in retries] == [200] * len(keys), [r.json() for r in retries]
    assert state.requests == 1 + len(keys)


async def test_a_result_that_cannot_be_stored_is_logged_with_its_reference_and_still_answered(
    upstream: Upstream,
    redis_url: str,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    state, url = upstream
    state.delay_s = 0.5
    reference = provider_reference("TXN-lost")
    async with running_gateway(config(url, redis_url, timeout_s=3)) as client:
        with caplog.at_level(logging.ERROR, logger="payagg.idempotency"):
            in_flight = asyncio.create_task(pay(client, payment("TXN-lost")))
            await upstream_has_seen(state, 1)  # claimed: the lock is in Redis
            await asyncio.to_thread(redis_server.stop)
            answer = await in_flight

    assert answer.status == 200
    assert answer.json()["provider_reference"] == f"up-{reference}"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any(reference in r.getMessage() for r in errors), [r.getMessage() for r in errors]


# 8. Client hang-ups ----------------------------------------------------------------------------


async def test_a_client_that_hangs_up_mid_payment_gets_the_stored_answer_on_retry(
    gateway: Client, upstream: Upstream
) -> None:
    state, _ = upstream
    state.delay_s = 0.6
    impatient = aiohttp.ClientTimeout(total=0.2)
    async with aiohttp.ClientSession(timeout=impatient) as session:
        with pytest.raises(TimeoutError):
            async with session.post(gateway.make_url("/v1/pay"), json=payment("TXN-hangup")):
                pass

    async def completed() -> Any:
        found = (await get(gateway, "/v1/payments/TXN-hangup")).json()
        return found if found.get("state") == "COMPLETED" else None

    stored = await eventually(completed, "the abandoned payment to complete")
    retry = await pay(gateway, payment("TXN-hangup"))

    assert stored["status_code"] == 200
    assert retry.status == 200
    assert is_replay(retry)
    assert retry.json() == stored["response"]
    assert state.requests == 1


# 9. Lookup -------------------------------------------------------------------------------------


async def test_the_lookup_endpoint_shows_unknown_in_progress_and_completed_payments(
    gateway: Client, upstream: Upstream
) -> None:
    state, _ = upstream
    unknown = await get(gateway, "/v1/payments/TXN-look")
    assert unknown.status == 404
    assert unknown.json()["error"] == "not_found"

    state.delay_s = 0.4
    in_flight = asyncio.create_task(pay(gateway, payment("TXN-look")))
    await upstream_has_seen(state, 1)
    during = await get(gateway, "/v1/payments/TXN-look")
    answer = await in_flight
    after = await get(gateway, "/v1/payments/TXN-look")

    assert (during.status, during.json()) == (200, {"state": "IN_PROGRESS"})
    assert after.status == 200
    assert after.json() == {"state": "COMPLETED", "status_code": 200, "response": answer.json()}


# 10. Key hashing -------------------------------------------------------------------------------


async def test_redis_keys_are_the_prefix_and_a_sha256_of_the_clients_key(
    upstream: Upstream, redis_url: str, redis_server: RedisServer
) -> None:
    odd_key = 'order 42 * [retry]?|x|"q" \\ #1 a/b 100%2F'
    async with running_gateway(config(upstream[1], redis_url, key_prefix="tenant-7:")) as client:
        assert (await pay(client, payment(), key=odd_key)).status == 200
        found = await get(client, f"/v1/payments/{quote(odd_key, safe='')}")

    keys = redis_server.client().keys("*")
    assert keys == [redis_key(odd_key, prefix=b"tenant-7:")]
    assert all(odd_key.encode() not in key for key in keys)
    assert found.json()["state"] == "COMPLETED"
