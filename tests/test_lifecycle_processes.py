"""The payment lifecycle with real processes: `payagg serve` (one or two), the MTN mock whose payer
approves after a delay, the real Redis.

Every test checks the money invariant on the mock's own books (`/__mock/stats`): each
TransactionID is charged at most once, every 200 is one charge, every charged payment ends SUCCESS
in payagg.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as redis_sync

from proxy.store.keys import payment_sha, shard_for
from tests.conftest import RedisServer
from tests.processes import ServiceProcess, free_port, mock_provider, payagg_serve, running
from tests.test_providers_end_to_end import Reply, call

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "gateway.yaml"
REDIS_DB = 8
APPROVAL_MS = 1500  # the payer approves after this (the 20 s, shortened)
SYNC_WAIT_S = 0.3  # POST /v1/pay waits this long: less than the approval, so 202 first
BOUND_S = 60.0  # generous: the machine is shared


@dataclass
class Proxy:
    url: str
    process: ServiceProcess

    def pay(self, transaction_id: str) -> Reply:
        body = {
            "TransactionID": transaction_id,
            "Amount": 20.0,
            "Currency": "ZAR",
            "ProviderKey": "MTN",
        }
        return call(f"{self.url}/v1/pay", "POST", json.dumps(body).encode())

    def payment(self, transaction_id: str) -> dict[str, object]:
        reply = call(f"{self.url}/v1/payments/{transaction_id}")
        assert reply.status == 200, reply.raw
        return reply.body

    def metric(self, name: str, **labels: str) -> float:
        text = call(f"{self.url}/metrics").raw.decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


@dataclass
class Stack:
    mock: str
    mock_port: int
    redis: redis_sync.Redis
    redis_url: str
    config: Path
    processes: ExitStack

    def proxy(self, **env: str) -> Proxy:
        port = free_port()
        environment = {
            "MTN_URL": self.mock,
            "REDIS_URL": self.redis_url,
            "MTN_SYNC_WAIT_S": str(SYNC_WAIT_S),
            "PROVIDER_TIMEOUT_S": "2",
            "RECONCILE_MAX_INTERVAL_S": "1",
            **env,
        }
        process = self.processes.enter_context(
            running(payagg_serve(self.config, port), f"http://127.0.0.1:{port}/readyz", environment)
        )
        return Proxy(f"http://127.0.0.1:{port}", process)

    def stats(self) -> dict[str, int]:
        return call(f"{self.mock}/__mock/stats").body  # type: ignore[return-value]


@pytest.fixture
def stack(redis_server, tmp_path) -> Iterator[Stack]:
    if redis_server.process is None:
        redis_server.start()
    redis = redis_sync.Redis(port=redis_server.port, db=REDIS_DB, socket_timeout=2)
    redis.flushdb()
    config = tmp_path / "gateway.yaml"
    config.write_text(SHIPPED.read_text(encoding="utf-8"), encoding="utf-8")
    port = free_port()
    mock = f"http://127.0.0.1:{port}"
    with ExitStack() as processes:
        argv = mock_provider(
            "mtn", port, "--seed", "5", "--approval-ms", f"{APPROVAL_MS},{APPROVAL_MS}"
        )
        processes.enter_context(running(argv, f"{mock}/healthz"))
        yield Stack(mock, port, redis, f"{redis_server.url_for(REDIS_DB)}", config, processes)


def fresh(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:10]}"


def eventually_final(proxy: Proxy, transaction_id: str) -> dict[str, object]:
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline:
        found = proxy.payment(transaction_id)
        if found["state"] in ("SUCCESS", "DECLINED", "NOT_CREATED", "UNRESOLVED"):
            return found
        time.sleep(0.1)
    raise AssertionError(f"{transaction_id} not final after {BOUND_S} s: {found}")


def assert_money_invariant(stack: Stack, proxy: Proxy, paid: list[str], before: dict[str, int]):
    """Each one charged exactly once at the mock, never sent twice, SUCCESS in payagg."""
    after = stack.stats()
    assert after["charges"] - before["charges"] == len(paid)
    assert after["requests"] - before["requests"] == len(paid), "a payment was sent again"
    assert after["duplicates"] == before["duplicates"]
    for transaction_id in paid:
        assert proxy.payment(transaction_id)["state"] == "SUCCESS"


def test_a_payer_approving_late_gets_202_then_success_by_status_and_a_webhook_enqueued(stack):
    proxy = stack.proxy()
    transaction_id = fresh("LATE")
    before = stack.stats()

    first = proxy.pay(transaction_id)
    assert first.status == 202, first.raw
    assert first.body == {
        "status": "PENDING",
        "transaction_id": transaction_id,
        "provider": "MTN",
        "provider_reference": first.body["provider_reference"],
        "status_url": f"/v1/payments/{transaction_id}",
    }
    assert first.headers["Location"] == f"/v1/payments/{transaction_id}"
    assert int(first.headers["Retry-After"]) >= 1
    replayed = proxy.pay(transaction_id)
    assert replayed.status in (202, 200)  # the same 202 while pending, never a second call
    assert stack.stats()["requests"] - before["requests"] == 1

    final = eventually_final(proxy, transaction_id)
    assert final["state"] == "SUCCESS"
    assert final["status_code"] == 200
    retry = proxy.pay(transaction_id)
    assert retry.status == 200
    assert retry.headers.get("Idempotent-Replayed") == "true"
    assert retry.body["provider_reference"] == final["provider_reference"]
    assert_money_invariant(stack, proxy, [transaction_id], before)

    sha = payment_sha(transaction_id)
    shard = shard_for("payagg:", sha)
    hook = json.loads(stack.redis.get(shard.hook(sha, "SUCCESS")))
    assert json.loads(hook["body"]) == {
        "transaction_id": transaction_id,
        "state": "SUCCESS",
        "provider": "MTN",
        "provider_reference": final["provider_reference"],
        "amount": 20.0,
        "currency": "ZAR",
        "reason": None,
    }
    assert stack.redis.zscore(shard.outbox, f"{sha}:SUCCESS") is not None
    assert proxy.metric("payagg_requests_total", provider="MTN", outcome="pending") >= 1
    assert proxy.metric("payagg_payment_time_to_final_seconds_count", provider="MTN") >= 1


def test_a_proxy_killed_while_holding_leases_leaves_every_payment_to_another_that_settles_it(
    stack,
):
    first = stack.proxy()
    paid = [fresh(f"KILL-{n}") for n in range(6)]
    before = stack.stats()
    with concurrent.futures.ThreadPoolExecutor(len(paid)) as pool:
        replies = list(pool.map(first.pay, paid))
    assert [reply.status for reply in replies] == [202] * len(paid), [r.raw for r in replies]
    # Its reconciler has leased and asked about them: the leases die with it.
    deadline = time.monotonic() + BOUND_S
    while first.metric("payagg_reconcile_polls_total", provider="MTN", result="pending") < 1:
        assert time.monotonic() < deadline, "the first proxy never polled"
        time.sleep(0.05)
    first.process.signal(signal.SIGKILL)
    first.process.stop()

    second = stack.proxy()
    for transaction_id in paid:
        assert eventually_final(second, transaction_id)["state"] == "SUCCESS"
    assert_money_invariant(stack, second, paid, before)
    assert second.metric("payagg_payments_pending", provider="MTN") == 0


def test_two_proxies_reconciling_the_same_payments_settle_each_once(stack):
    one, two = stack.proxy(), stack.proxy()
    paid = [fresh(f"TWO-{n}") for n in range(8)]
    before = stack.stats()
    with concurrent.futures.ThreadPoolExecutor(len(paid)) as pool:
        replies = list(
            pool.map(
                lambda pair: pair[0].pay(pair[1]),
                [((one, two)[n % 2], t) for n, t in enumerate(paid)],
            )
        )
    assert {reply.status for reply in replies} <= {200, 202}
    for transaction_id in paid:
        assert eventually_final(one, transaction_id) == eventually_final(two, transaction_id)
    assert_money_invariant(stack, one, paid, before)


def test_a_callback_from_the_provider_is_authenticated_and_only_makes_the_payment_due(stack):
    port = free_port()
    secret = "lifecycle-callback-secret"
    proxy_env = {"PAYAGG_PUBLIC_URL": f"http://127.0.0.1:{port}", "PAYAGG_CALLBACK_SECRET": secret}
    environment = {
        "MTN_URL": stack.mock,
        "REDIS_URL": stack.redis_url,
        "MTN_SYNC_WAIT_S": str(SYNC_WAIT_S),
        "PROVIDER_TIMEOUT_S": "2",
        **proxy_env,
    }
    process = stack.processes.enter_context(
        running(payagg_serve(stack.config, port), f"http://127.0.0.1:{port}/readyz", environment)
    )
    proxy = Proxy(f"http://127.0.0.1:{port}", process)
    transaction_id = fresh("CB")
    before = stack.stats()

    assert proxy.pay(transaction_id).status == 202
    forged = call(f"{proxy.url}/v1/callbacks/MTN/{'0' * 64}", "PUT", b'{"status": "SUCCESSFUL"}')
    assert forged.status == 401
    assert forged.body["error"] == "unauthorized"
    assert proxy.payment(transaction_id)["state"] == "PENDING", "a forged callback changes nothing"

    assert eventually_final(proxy, transaction_id)["state"] == "SUCCESS"
    deadline = time.monotonic() + BOUND_S
    while stack.stats()["callbacks_sent"] == before["callbacks_sent"]:
        assert time.monotonic() < deadline, "the mock never called back"
        time.sleep(0.05)
    after = stack.stats()
    assert after["callbacks_failed"] == before["callbacks_failed"], "payagg refused MTN's callback"
    assert_money_invariant(stack, proxy, [transaction_id], before)


def test_redis_killed_and_restarted_on_its_append_only_file_mid_reconciliation_loses_nothing(
    stack, tmp_path
):
    durable = RedisServer(tmp_path / "aof", "--appendonly", "yes", "--appendfsync", "always")
    (tmp_path / "aof").mkdir()
    durable.start()
    try:
        proxy = stack.proxy(REDIS_URL=durable.url)
        paid = [fresh(f"AOF-{n}") for n in range(4)]
        before = stack.stats()
        with concurrent.futures.ThreadPoolExecutor(len(paid)) as pool:
            replies = list(pool.map(proxy.pay, paid))
        assert [reply.status for reply in replies] == [202] * len(paid)

        durable.signal(signal.SIGKILL)
        durable.stop()
        durable.start()  # on the same directory: the append-only file is replayed

        for transaction_id in paid:
            assert eventually_final(proxy, transaction_id)["state"] == "SUCCESS"
        assert_money_invariant(stack, proxy, paid, before)
    finally:
        durable.stop()


def test_access_tokens_expiring_during_reconciliation_are_fetched_again_and_nothing_is_lost(
    stack,
):
    port = free_port()
    mock = f"http://127.0.0.1:{port}"
    argv = mock_provider(
        "mtn", port, "--seed", "6", "--approval-ms", "3000,3000", "--token-ttl-s", "1"
    )
    stack.processes.enter_context(running(argv, f"{mock}/healthz"))
    proxy = stack.proxy(MTN_URL=mock)
    paid = [fresh(f"TOKEN-{n}") for n in range(3)]
    before = call(f"{mock}/__mock/stats").body
    for transaction_id in paid:
        assert proxy.pay(transaction_id).status == 202
    for transaction_id in paid:
        assert eventually_final(proxy, transaction_id)["state"] == "SUCCESS"
    after = call(f"{mock}/__mock/stats").body
    assert after["charges"] - before["charges"] == len(paid)
    assert after["requests"] - before["requests"] == len(paid)
    assert after["tokens_issued"] - before["tokens_issued"] >= 2, "the token expired meanwhile"
