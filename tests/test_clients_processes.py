"""Clients across real processes: two `payagg serve` sharing one Redis, in front of the canonical
upstream as a process. Each status of the clients work (401, 403, 404 for another client's
payment, 429) is answered the same by either proxy, and a client's rate limit is one limit for
both."""

from __future__ import annotations

import hashlib
import io
import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest

from proxy.devtools.demo import run_demo
from tests.conftest import RedisServer
from tests.processes import free_port, payagg_serve, running
from tests.test_providers_end_to_end import Reply, call

KEYS = {"alpha": "alpha-process-key-1d7c", "beta": "beta-process-key-93ae"}
REDIS_DB = 7
ALPHA_BURST = 3


def config_text(upstream: str, redis_url: str) -> str:
    def sha(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    # alpha: one request per 100 s after a burst of 3, so no refill happens during the test.
    return f"""\
redis: {{url: "{redis_url}", timeout_s: 1}}
idempotency: {{lock_ttl_s: 10, result_ttl_s: 600}}
defaults: {{timeout_s: 2}}
providers:
  CANON: {{url: "{upstream}/pay"}}
  OTHER: {{url: "{upstream}/pay"}}
auth: required
clients:
  - name: alpha
    key_sha256: ["{sha(KEYS["alpha"])}"]
    providers: [CANON, OTHER]
    rate_per_s: 0.01
    burst: {ALPHA_BURST}
  - name: beta
    key_sha256: ["{sha(KEYS["beta"])}"]
    providers: [CANON]
    rate_per_s: 100
    burst: 100
"""


@dataclass
class Stack:
    proxies: list[str]
    upstream: str

    def pay(
        self, proxy: int, transaction_id: str, who: str | None, provider: str = "CANON"
    ) -> Reply:
        body = {
            "TransactionID": transaction_id,
            "Amount": 20.0,
            "Currency": "ZAR",
            "ProviderKey": provider,
        }
        return call(
            f"{self.proxies[proxy]}/v1/pay", "POST", json.dumps(body).encode(), headers=_auth(who)
        )

    def lookup(self, proxy: int, transaction_id: str, who: str | None) -> Reply:
        return call(f"{self.proxies[proxy]}/v1/payments/{transaction_id}", headers=_auth(who))

    def references(self) -> list[str]:
        return call(f"{self.upstream}/__stats").body["references"]  # type: ignore[index, no-any-return]

    def counted(self, outcome: str, client: str) -> float:
        total = 0.0
        for proxy in self.proxies:
            for line in call(f"{proxy}/metrics").raw.decode().splitlines():
                if line.startswith("payagg_requests_total{") and (
                    f'client="{client}",outcome="{outcome}",' in line
                ):
                    total += float(line.rsplit(" ", 1)[1])
        return total


def _auth(who: str | None) -> dict[str, str]:
    return {} if who is None else {"Authorization": f"Bearer {KEYS[who]}"}


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if redis_server.process is None:
        redis_server.start()
    redis_server.client(REDIS_DB).flushdb()
    config = tmp_path_factory.mktemp("clients") / "gateway.yaml"
    upstream_port = free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    config.write_text(config_text(upstream, redis_server.url_for(REDIS_DB)), encoding="utf-8")
    with ExitStack() as processes:
        argv = [sys.executable, "-m", "tests.canonical_upstream", "--port", str(upstream_port)]
        processes.enter_context(running(argv, f"{upstream}/healthz"))
        proxies = []
        for _ in range(2):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            processes.enter_context(running(payagg_serve(config, port), f"{url}/readyz"))
            proxies.append(url)
        yield Stack(proxies, upstream)


def test_either_proxy_answers_401_without_a_key_and_calls_nothing(stack: Stack) -> None:
    before = len(stack.references())
    for proxy in (0, 1):
        answer = stack.pay(proxy, "TXN-p-anon", None)
        assert answer.status == 401
        assert answer.body["error"] == "unauthorized"  # type: ignore[index]
        assert stack.lookup(proxy, "TXN-p-anon", None).status == 401
    assert len(stack.references()) == before
    assert stack.counted("unauthorized", "unknown") == 2


def test_either_proxy_answers_403_for_a_provider_the_client_may_not_use(stack: Stack) -> None:
    for proxy in (0, 1):
        answer = stack.pay(proxy, "TXN-p-forbidden", "beta", provider="OTHER")
        assert answer.status == 403
        assert answer.body["error"] == "forbidden"  # type: ignore[index]


def test_a_payment_made_through_one_proxy_is_404_to_another_client_on_the_other(
    stack: Stack,
) -> None:
    assert stack.pay(0, "TXN-p-beta", "beta").status == 200
    assert stack.lookup(1, "TXN-p-beta", "beta").status == 200
    assert stack.lookup(1, "TXN-p-beta", "alpha").status == 404
    assert stack.lookup(0, "TXN-p-beta", "alpha").status == 404


def test_one_transaction_id_from_two_clients_is_two_payments_with_two_references_at_the_provider(
    stack: Stack,
) -> None:
    before = stack.references()
    beta = stack.pay(1, "TXN-p-shared", "beta")
    assert beta.status == 200
    alpha = stack.pay(0, "TXN-p-shared", "alpha")
    assert alpha.status == 200
    sent = stack.references()[len(before) :]
    assert len(sent) == 2
    assert len(set(sent)) == 2
    assert {alpha.body["provider_reference"], beta.body["provider_reference"]} == {  # type: ignore[index]
        f"up-{reference}" for reference in sent
    }


def test_the_rate_limit_is_one_limit_for_both_proxies(stack: Stack) -> None:
    """alpha has used one request of its burst (the shared TransactionID above, or none when run
    alone): the rest of the burst goes through either proxy, then both answer 429."""
    answers = [stack.pay(i % 2, f"TXN-p-rate-{i}", "alpha") for i in range(ALPHA_BURST + 2)]
    statuses = [answer.status for answer in answers]
    assert 429 in statuses
    first_limited = statuses.index(429)
    assert 1 <= first_limited <= ALPHA_BURST
    assert statuses[first_limited:] == [429] * (len(statuses) - first_limited)
    limited_by = {i % 2 for i in range(first_limited, len(statuses))}
    assert limited_by == {0, 1}, "both proxies refused"
    for answer in answers[first_limited:]:
        assert answer.body["error"] == "rate_limited"  # type: ignore[index]
        assert 1 <= int(answer.headers["Retry-After"]) <= 100
    # A limited request never reached the provider and left no record.
    for i in range(first_limited, len(statuses)):
        assert stack.lookup(0, f"TXN-p-rate-{i}", "alpha").status == 404
    assert stack.counted("rate_limited", "alpha") == len(statuses) - first_limited
    # Another client's allowance is its own.
    assert stack.pay(1, "TXN-p-rate-beta", "beta").status == 200


def test_payagg_demo_sends_the_key_from_payagg_api_key(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = io.StringIO()
    assert run_demo(stack.proxies[1], "CANON", 3, out) == 0
    assert "401" in out.getvalue()
    monkeypatch.setenv("PAYAGG_API_KEY", KEYS["beta"])
    out = io.StringIO()
    assert run_demo(stack.proxies[1], "CANON", 3, out) == 0
    lines = out.getvalue().splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["200"] * 3, out.getvalue()
