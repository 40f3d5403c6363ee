"""Merchant webhooks: signed, at least once, retried with backoff, leased, given up, measured."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import random
import re
import textwrap
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.crc import key_slot

from proxy.observability.metrics import GatewayMetrics
from proxy.payments.webhooks import DeliveryTiming, WebhookDelivery
from proxy.settings.config import (
    ConfigError,
    RedisSettings,
    WebhookSettings,
    load_config,
    parse_config,
)
from proxy.store.client import Argument, Script, StoreClient
from proxy.store.keys import SHARDS, outbox_member, payment_sha, shard_for, shard_of
from proxy.store.outbox import HookRecord, Lease, Outbox
from tests.conftest import gateway_yaml
from tests.processes import ServiceProcess, free_port, http_ok, payagg_serve, wait_until
from tests.test_end_to_end import metric

SECRET = "whsec-test-0123456789abcdef"
DELIVERIES = "payagg_webhook_deliveries_total"
PREFIX = "payagg:"
SHIPPED = Path(__file__).resolve().parent.parent / "config" / "gateway.yaml"
# Fast enough for tests; the lease outlives an attempt as in production.
FAST = DeliveryTiming(
    poll_interval_s=0.05, timeout_s=2, lease_s=5, first_retry_s=0.1, max_retry_interval_s=0.4
)


# --- a receiver: a real HTTP server that records what it gets and answers as told -----------


@dataclass
class Received:
    body: bytes
    signature: str
    content_type: str


@dataclass
class Receiver:
    """Answers with `statuses` in turn (the last one for ever after); `hold` delays answers."""

    statuses: list[int] = field(default_factory=lambda: [200])
    received: list[Received] = field(default_factory=list)
    hold: asyncio.Event | None = None
    delay_s: float = 0.0
    in_flight: Counter[bytes] = field(default_factory=Counter)
    most_at_once: Counter[bytes] = field(default_factory=Counter)
    redirected: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append(
            Received(body, request.headers.get("Payagg-Signature", ""), request.content_type)
        )
        self.in_flight[body] += 1
        self.most_at_once[body] = max(self.most_at_once[body], self.in_flight[body])
        try:
            if self.hold is not None:
                await self.hold.wait()
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight[body] -= 1
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if status == 302:
            return web.Response(status=302, headers={"Location": "/elsewhere"})
        return web.Response(status=status, text="ok")

    async def elsewhere(self, request: web.Request) -> web.Response:
        self.redirected += 1
        return web.Response(text="followed")

    def bodies(self) -> Counter[bytes]:
        return Counter(item.body for item in self.received)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    state = Receiver()
    app = web.Application()
    app.router.add_post("/hooks", state.handle)
    app.router.add_route("*", "/elsewhere", state.elsewhere)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield state, str(server.make_url("/hooks"))
    await server.close()


# --- the delivery side, in-process: each `WebhookDelivery` is one proxy process's loop --------


def settings(url: str, retry_for_s: float = 86400) -> WebhookSettings:
    return WebhookSettings(url=url, secret=SECRET, retry_for_s=retry_for_s)


# A standalone server's URL, or the settings of another store (a cluster).
Redis = str | RedisSettings


def redis_settings(redis: Redis) -> RedisSettings:
    if isinstance(redis, RedisSettings):
        return redis
    return RedisSettings(url=redis, timeout_s=2, key_prefix=PREFIX)


def store_client(redis: Redis) -> StoreClient:
    return StoreClient(redis_settings(redis))


def outbox_on(redis: Redis) -> Outbox:
    return Outbox(store_client(redis), redis_settings(redis).key_prefix)


@asynccontextmanager
async def delivering(
    redis_url: Redis,
    webhooks: WebhookSettings,
    timing: DeliveryTiming = FAST,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[tuple[WebhookDelivery, GatewayMetrics]]:
    metrics = GatewayMetrics(["CANON"])
    delivery = WebhookDelivery(
        webhooks, outbox_on(redis_url), metrics, timing, clock, random.Random(7)
    )
    delivery.start()
    try:
        yield delivery, metrics
    finally:
        await delivery.close(timeout_s=0)


def body_for(transaction_id: str, state: str = "SUCCESS") -> bytes:
    """A body as life's transitions write it; the delivery sends whatever bytes it holds."""
    return json.dumps(
        {
            "transaction_id": transaction_id,
            "state": state,
            "provider": "CANON",
            "provider_reference": f"ref-{transaction_id}",
            "amount": 20.0,
            "currency": "ZAR",
            "reason": None,
        },
        separators=(",", ":"),
    ).encode()


async def enqueue(redis_url: Redis, transaction_id: str, state: str = "SUCCESS") -> bytes:
    """What a transition script does: the record and the outbox member, in one script."""
    sha = payment_sha(transaction_id)
    body = body_for(transaction_id, state)
    outbox = outbox_on(redis_url)
    await outbox.enqueue(sha, state, body, int(time.time() * 1000))
    await outbox.close()
    return body


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], what: str, timeout_s: float = 20
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if await result if isinstance(result, Awaitable) else result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def sample(metrics: GatewayMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def backlog(redis_url: Redis) -> int:
    outbox = outbox_on(redis_url)
    try:
        return await outbox.backlog()
    finally:
        await outbox.close()


async def outbox_empty(redis_url: Redis) -> bool:
    return await backlog(redis_url) == 0


def verify(secret: str, header: str, body: bytes, now: float, tolerance_s: int = 300) -> bool:
    """A receiver's check, written from the contract's words alone (as the README shows it)."""
    parts = dict(item.split("=", 1) for item in header.split(","))
    timestamp = parts["t"]
    expected = hmac.new(
        secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, "sha256"
    ).hexdigest()
    fresh = abs(now - int(timestamp)) <= tolerance_s
    return fresh and hmac.compare_digest(expected, parts["v1"])


# --- what is sent ----------------------------------------------------------------------------


async def test_a_delivery_is_signed_with_hmac_sha256_of_timestamp_dot_body(redis_url, receiver):
    state, url = receiver
    body = await enqueue(redis_url, "TXN-SIGNED")
    async with delivering(redis_url, settings(url)):
        await eventually(lambda: len(state.received) == 1, "the webhook")
    (got,) = state.received
    assert got.body == body
    assert got.content_type == "application/json"
    assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", got.signature)
    assert verify(SECRET, got.signature, body, time.time())
    assert not verify("another-secret-0123456789", got.signature, body, time.time())
    assert not verify(SECRET, got.signature, body + b" ", time.time())
    assert not verify(SECRET, got.signature, body, time.time() + 301), "a replay 5 min later"


async def test_a_receiver_failing_twice_then_succeeding_gets_the_same_body_three_times_then_nothing(
    redis_url, receiver
):
    state, url = receiver
    state.statuses = [500, 503, 200]
    body = await enqueue(redis_url, "TXN-RETRIED")
    async with delivering(redis_url, settings(url)) as (_, metrics):
        await eventually(lambda: len(state.received) == 3, "three attempts")
        await eventually(lambda: sample(metrics, DELIVERIES, result="delivered") == 1, "delivered")
        assert await backlog(redis_url) == 0
        # Many poll intervals more: nothing is sent again once the receiver said 2xx.
        await asyncio.sleep(20 * FAST.poll_interval_s)
    assert [item.body for item in state.received] == [body, body, body]
    assert sample(metrics, DELIVERIES, result="failed") == 2
    assert sample(metrics, DELIVERIES, result="expired") == 0


async def test_a_redirect_is_not_followed_and_the_delivery_is_tried_again(redis_url, receiver):
    state, url = receiver
    state.statuses = [302, 200]
    await enqueue(redis_url, "TXN-REDIRECTED")
    async with delivering(redis_url, settings(url)) as (_, metrics):
        await eventually(lambda: sample(metrics, DELIVERIES, result="delivered") == 1, "delivered")
    assert state.redirected == 0
    assert len(state.received) == 2
    assert sample(metrics, DELIVERIES, result="failed") == 1


async def test_backoff_doubles_with_jitter_from_the_first_retry_up_to_the_cap(redis_url):
    timing = DeliveryTiming(first_retry_s=1, max_retry_interval_s=10)
    delivery = WebhookDelivery(
        settings("http://127.0.0.1:1/"),
        outbox_on(redis_url),
        GatewayMetrics([]),
        timing,
        jitter=random.Random(3),
    )
    waits = [delivery._backoff_ms(failed) / 1000 for failed in range(8)]
    ceilings = [1, 2, 4, 8, 10, 10, 10, 10]
    assert all(
        ceiling / 2 <= wait <= ceiling for wait, ceiling in zip(waits, ceilings, strict=True)
    )
    assert len(set(waits)) == len(waits), "jittered: no two waits alike"
    await delivery.close(0)


async def test_a_delivery_is_given_up_after_retry_for_s_logged_with_its_payment_and_removed(
    redis_url, receiver, caplog
):
    state, url = receiver
    state.statuses = [500]
    await enqueue(redis_url, "TXN-EXPIRED", "DECLINED")
    with caplog.at_level(logging.WARNING, logger="payagg.webhooks"):
        async with delivering(redis_url, settings(url, retry_for_s=1)) as (_, metrics):
            await eventually(
                lambda: sample(metrics, DELIVERIES, result="expired") == 1,
                "the delivery to be given up",
            )
            assert await backlog(redis_url) == 0
    assert len(state.received) >= 2, "retried before giving up"
    assert sample(metrics, DELIVERIES, result="failed") == len(state.received) - 1
    assert sample(metrics, DELIVERIES, result="delivered") == 0
    (error,) = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert error.fields["transaction_id"] == "TXN-EXPIRED"
    assert error.fields["state"] == "DECLINED"
    assert "TXN-EXPIRED DECLINED given up" in error.getMessage()
    assert not redis_keys(redis_url)


def redis_keys(redis_url: str) -> list[bytes]:
    import redis as redis_sync

    return list(redis_sync.Redis.from_url(redis_url).keys("*"))


# --- leases: restarts and several processes ---------------------------------------------------


async def test_a_delivery_in_flight_when_its_process_stops_is_sent_by_the_next_once_its_lease_ends(
    redis_url, receiver
):
    state, url = receiver
    state.hold = asyncio.Event()  # the first process's attempt never gets its answer
    body = await enqueue(redis_url, "TXN-RESTART")
    async with delivering(redis_url, settings(url)):
        await eventually(lambda: len(state.received) == 1, "the first attempt")
    # Stopped mid-attempt: the delivery is still there, leased until the lease's end.
    assert await backlog(redis_url) == 1
    state.hold.set()
    # A new process whose clock is a second before, then past, the first one's lease end.
    skew = {"s": FAST.lease_s - 1}
    async with delivering(redis_url, settings(url), clock=lambda: time.time() + skew["s"]):
        await asyncio.sleep(10 * FAST.poll_interval_s)
        assert len(state.received) == 1, "a leased delivery is not sent again before its lease ends"
        skew["s"] = FAST.lease_s + 1
        await eventually(lambda: len(state.received) == 2, "the attempt after the lease")
        await eventually(lambda: outbox_empty(redis_url), "the delivery to be removed")
    assert [item.body for item in state.received] == [body, body]


async def test_two_processes_never_deliver_the_same_webhook_at_once(redis_url, receiver):
    state, url = receiver
    state.delay_s = 0.05  # long enough for the other process to try the same member meanwhile
    bodies = [await enqueue(redis_url, f"TXN-{number}") for number in range(40)]
    assert len({shard_of(payment_sha(f"TXN-{n}")) for n in range(40)}) > 8
    async with (
        delivering(redis_url, settings(url)) as (_, first),
        delivering(redis_url, settings(url)) as (_, second),
    ):
        await eventually(lambda: outbox_empty(redis_url), "every delivery to be done", 60)
    assert state.bodies() == Counter(bodies), "each webhook exactly once: no lease ended"
    assert set(state.most_at_once.values()) == {1}
    delivered = [
        sample(metrics, DELIVERIES, result="delivered") or 0 for metrics in (first, second)
    ]
    assert sum(delivered) == 40


# --- Redis Cluster: every script's keys in one hash slot --------------------------------------


class RecordingRunner:
    """A real Redis client that remembers the KEYS of every script it runs."""

    def __init__(self, client: StoreClient) -> None:
        self.client = client
        self.calls: list[list[str]] = []

    async def run_script(
        self, script: Script, keys: Sequence[Argument], args: Sequence[Argument]
    ) -> Any:
        self.calls.append([key.decode() if isinstance(key, bytes) else str(key) for key in keys])
        return await self.client.run_script(script, keys, args)

    async def close(self) -> None:
        await self.client.close()


async def test_every_outbox_script_declares_its_keys_and_they_share_one_hash_slot(redis_url):
    runner = RecordingRunner(store_client(redis_url))
    outbox = Outbox(runner, PREFIX)
    sha = payment_sha("TXN-SLOTS")
    shard = shard_for(PREFIX, sha)
    member = outbox_member(sha, "SUCCESS")
    now_ms = int(time.time() * 1000)
    await outbox.enqueue(sha, "SUCCESS", b"{}", now_ms)
    assert await outbox.due(shard, now_ms, 10) == [member]
    lease = await outbox.lease(shard, member, now_ms, now_ms + 1000)
    assert lease is not None
    assert await outbox.retry(lease, now_ms, lease.record.failed_once_more())
    lease = await outbox.lease(shard, member, now_ms, now_ms + 2000)
    assert lease is not None
    assert lease.record.attempts == 1
    ended = Lease(lease.shard, lease.member, lease.record, now_ms + 1000)
    assert not await outbox.give_up(ended), "only the lease's holder gives up"
    await outbox.delivered(lease)
    assert await outbox.backlog() == 0
    await outbox.close()

    assert len(runner.calls) == 7 + SHARDS
    assert {f"{{payagg:s{number:02d}}}outbox" for number in range(SHARDS)} <= {
        key for keys in runner.calls for key in keys
    }
    for keys in runner.calls:
        assert keys, "a script without KEYS cannot be routed in a cluster"
        tags = {re.match(r"\{[^}]+\}", key).group(0) for key in keys}  # type: ignore[union-attr]
        assert len(tags) == 1, keys
        assert len({key_slot(key.encode()) for key in keys}) == 1, keys
    assert runner.calls[0] == [shard.outbox.decode(), shard.hook(sha, "SUCCESS").decode()]


def test_a_hook_record_keeps_the_body_byte_for_byte():
    body = body_for('TXN-\u00e9/"\\')
    record = HookRecord.parse(HookRecord(body, 1_764_446_195_123).text())
    assert record == HookRecord(body, 1_764_446_195_123, 0, None)


# --- configuration ---------------------------------------------------------------------------


def webhooks_yaml(block: str) -> str:
    return gateway_yaml("http://127.0.0.1:9/pay", "redis://127.0.0.1:6379/0", block)


def test_the_shipped_config_sends_no_webhooks_without_a_url_and_reads_the_secret_from_the_env():
    assert load_config(SHIPPED, environ={}).webhooks == WebhookSettings()
    webhooks = load_config(
        SHIPPED,
        environ={
            "PAYAGG_WEBHOOK_URL": "https://merchant.example/hooks",
            "PAYAGG_WEBHOOK_SECRET": SECRET,
        },
    ).webhooks
    assert webhooks == WebhookSettings(
        url="https://merchant.example/hooks", secret=SECRET, retry_for_s=86400
    )
    assert SECRET not in repr(webhooks)


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (
            'webhooks: {url: "https://m.example/hooks"}',
            "test.yaml:8: webhooks.secret: required when webhooks.url is set",
        ),
        (
            'webhooks:\n  url: "https://m.example/hooks"\n  secret: short\n',
            "test.yaml:10: webhooks.secret: must be at least 16 characters, got 5",
        ),
        (
            f'webhooks: {{url: "ftp://m.example/hooks", secret: "{SECRET}"}}',
            "test.yaml:8: webhooks.url: must be an http:// or https:// URL with a host, got 'ftp://m.example/hooks'",
        ),
        (
            "webhooks: {retry_for_s: 0}",
            "test.yaml:8: webhooks.retry_for_s: must be >= 1, got 0",
        ),
        (
            "webhooks: {retry_for_s: 2592001}",
            "test.yaml:8: webhooks.retry_for_s: must be <= 2.592e+06, got 2592001",
        ),
        (
            "webhooks: {url: '', retry_for: 60}",
            "test.yaml:8: webhooks.retry_for: unknown key (did you mean 'retry_for_s'?)",
        ),
    ],
    ids=["url-without-secret", "short-secret", "not-http", "retry-zero", "retry-too-long", "typo"],
)
def test_a_bad_webhooks_setting_is_a_config_error_with_file_line_and_key(block, expected):
    with pytest.raises(ConfigError) as error:
        parse_config(webhooks_yaml(block), "test.yaml", {})
    assert any(problem.startswith(expected) for problem in error.value.problems), (
        error.value.problems
    )


# --- real proxy processes ---------------------------------------------------------------------


async def sample_of(port: int, name: str, **labels: str) -> float:
    return await asyncio.to_thread(metric, f"http://127.0.0.1:{port}", name, **labels)


@pytest.fixture
def two_proxies(
    tmp_path: Path, redis_url: str, receiver: tuple[Receiver, str]
) -> Iterator[list[int]]:
    """Two `payagg serve` processes delivering to the receiver; the secret from the environment."""
    block = textwrap.dedent(
        f"""\
        webhooks:
          url: "{receiver[1]}"
          secret: "${{PAYAGG_WEBHOOK_SECRET}}"
        """
    )
    config = tmp_path / "gateway.yaml"
    config.write_text(gateway_yaml("http://127.0.0.1:9/pay", redis_url, block))
    ports = [free_port(), free_port()]
    processes = [
        ServiceProcess(payagg_serve(config, port), env={"PAYAGG_WEBHOOK_SECRET": SECRET})
        for port in ports
    ]
    yield ports
    # SIGTERM, as ECS stops a task: deliveries in flight are finished or left to their lease.
    codes = [process.stop() for process in processes]
    assert codes == [0, 0], [process.log_path.read_text() for process in processes]


async def test_proxy_processes_deliver_webhooks_and_each_reports_the_whole_backlog(
    two_proxies, redis_url, receiver
):
    state, _ = receiver
    state.statuses = [500]
    bodies = [await enqueue(redis_url, f"TXN-P{number}") for number in range(5)]
    ready = [asyncio.to_thread(wait_ready, port) for port in two_proxies]
    await asyncio.gather(*ready)
    await eventually(lambda: set(state.bodies()) == set(bodies), "a first attempt of each", 30)
    for port in two_proxies:
        assert await sample_of(port, "payagg_webhook_backlog") == 5
        assert await sample_of(port, DELIVERIES, result="delivered") == 0
        assert await sample_of(port, DELIVERIES, result="expired") == 0

    state.statuses = [200]

    async def all_delivered() -> bool:
        backlogs = [await sample_of(port, "payagg_webhook_backlog") for port in two_proxies]
        return backlogs == [0, 0]

    await eventually(all_delivered, "every webhook delivered", 60)
    assert await backlog(redis_url) == 0
    assert all(verify(SECRET, item.signature, item.body, time.time()) for item in state.received)
    delivered = [await sample_of(port, DELIVERIES, result="delivered") for port in two_proxies]
    assert sum(delivered) == 5


def wait_ready(port: int) -> None:
    wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 30, f"payagg on {port}")


def test_every_webhook_series_exists_from_start_up():
    metrics = GatewayMetrics(["CANON"])
    for result in ("delivered", "failed", "expired"):
        assert sample(metrics, DELIVERIES, result=result) == 0
    assert sample(metrics, "payagg_webhook_backlog") == 0


async def test_without_a_url_no_delivery_loop_runs(redis_url):
    delivery = WebhookDelivery(WebhookSettings(), outbox_on(redis_url), GatewayMetrics([]))
    delivery.start()
    assert not delivery.enabled
    assert delivery._loop_task is None
    await delivery.close(0)


def readme_receiver() -> str:
    """The Python receiver shown in the README's "Merchant webhooks" section."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n## Merchant webhooks\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


async def test_the_readmes_receiver_accepts_a_real_webhook_once_and_refuses_forgeries_and_replays(
    redis_url, receiver, monkeypatch
):
    state, url = receiver
    body = await enqueue(redis_url, "TXN-README", "DECLINED")
    async with delivering(redis_url, settings(url)):
        await eventually(lambda: len(state.received) == 1, "the webhook")
    (got,) = state.received
    monkeypatch.setenv("PAYAGG_WEBHOOK_SECRET", SECRET)
    example: dict[str, Any] = {}
    exec(compile(readme_receiver(), "README.md", "exec"), example)

    assert example["handle"](got.signature, got.body) == 200
    assert example["handle"](got.signature, got.body) == 200
    assert example["handled"] == {("TXN-README", "DECLINED")}
    assert example["handle"](got.signature, body.replace(b"DECLINED", b"SUCCESS")) == 400
    assert example["handle"]("t=1,v1=00", got.body) == 400
    assert example["handle"]("garbage", got.body) == 400
    assert example["verified_event"](got.signature, got.body, now=time.time() + 301) is None


async def test_webhooks_are_delivered_through_a_redis_cluster(redis_cluster, receiver):
    """Every script runs on one node: a key outside its shard's slot would fail CROSSSLOT."""
    state, url = receiver
    cluster = RedisSettings(
        url=redis_cluster.url_via(redis_cluster.masters()[0]),
        mode="cluster",
        key_prefix="hooks-cluster:",
        timeout_s=2,
    )
    bodies = [await enqueue(cluster, f"TXN-C{number}") for number in range(20)]
    assert await backlog(cluster) == 20
    async with delivering(cluster, settings(url)):
        await eventually(lambda: outbox_empty(cluster), "every delivery to be done", 60)
    assert state.bodies() == Counter(bodies)


async def test_a_clean_shutdown_finishes_the_attempt_in_flight(redis_url, receiver):
    state, url = receiver
    state.hold = asyncio.Event()
    await enqueue(redis_url, "TXN-SHUTDOWN")
    async with delivering(redis_url, settings(url)) as (delivery, metrics):
        await eventually(lambda: len(state.received) == 1, "the attempt")
        closing = asyncio.ensure_future(delivery.close(timeout_s=10))
        await asyncio.sleep(0.1)
        assert not closing.done(), "close waits for the attempt in flight"
        state.hold.set()
        await closing
        assert sample(metrics, DELIVERIES, result="delivered") == 1
    assert await backlog(redis_url) == 0


async def test_the_delivery_loop_outlives_a_redis_outage(redis_server, redis_url, receiver):
    state, url = receiver
    async with delivering(redis_url, settings(url)):
        redis_server.stop()
        await asyncio.sleep(10 * FAST.poll_interval_s)  # polls that fail, and are logged
        redis_server.start()
        body = await enqueue(redis_url, "TXN-AFTER-OUTAGE")
        await eventually(lambda: outbox_empty(redis_url), "the delivery after the outage")
    assert [item.body for item in state.received] == [body]
