"""The shipped MTN and Airtel mappings against the real mock providers, all as real processes.

One stack for the module: the real Redis, `payagg-mock --provider mtn`, two `payagg-mock --provider
airtel` (Uganda and Kenya) and `payagg serve` on a copy of the SHIPPED config/gateway.yaml to which
only a third provider, AIRTEL_KE, is appended: a new market is configuration, not code. Each test
dials one fault to 1.0 on a mock through its admin API and puts it back to 0 afterwards.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as redis_sync

from proxy.payments.request import REFERENCE_NAMESPACE
from tests.processes import (
    ServiceProcess,
    free_port,
    mock_provider,
    payagg_serve,
    running,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "gateway.yaml"
REDIS_DB = 7  # a database of its own on the shared test Redis, flushed when the stack starts
# Any non-empty credentials get a token from the mocks (what the shipped defaults rely on).
MTN_SUBSCRIPTION = {"Ocp-Apim-Subscription-Key": "e2e-subscription-key"}

# The decline codes each mock draws from (mock_providers/README.md).
MTN_DECLINES = {
    "NOT_ENOUGH_FUNDS",
    "PAYER_NOT_FOUND",
    "PAYEE_NOT_ALLOWED_TO_RECEIVE",
    "APPROVAL_REJECTED",
}
AIRTEL_DECLINES = {"DP00800001007", "DP00800001010", "DP00800001002", "DP00800001008"}

# Appended to the shipped file, nothing else changes: a Kenyan Airtel account on its own mock.
AIRTEL_KE = """
  AIRTEL_KE:                               # added by tests/test_providers_end_to_end.py only
    url: "http://127.0.0.1:KE_PORT/merchant/v1/payments/"
    default_payer: "254712123456"
    auth:
      url: "http://127.0.0.1:KE_PORT/auth/oauth2/token"
      body_format: json
      body: {client_id: payagg-ke, client_secret: ke-secret, grant_type: client_credentials}
    request:
      method: POST
      headers:
        Authorization: "Bearer {token}"
        X-Country: KE
        X-Currency: "{currency}"
      body:
        reference: "{transaction_id}"
        subscriber: {country: KE, currency: "{currency}", msisdn: "{payer}"}
        transaction: {amount: "{amount}", country: KE, currency: "{currency}", id: "{reference}"}
    response:
      pending:
        - {status: 200, field: status.response_code, equals: DP00800001006}
      success:
        - {status: 200, field: status.response_code, equals: DP00800001001}
      declined:
        - {status: 200, field: status.success, equals: false}
      provider_reference: data.transaction.airtel_money_id
      reason: [status.response_code, status.message]
    status:
      url: "http://127.0.0.1:KE_PORT/standard/v1/payments/{reference}"
      headers: {Authorization: "Bearer {token}", X-Country: KE, X-Currency: KES}
      success:
        - {status: 200, field: data.transaction.status, equals: TS}
      declined:
        - {status: 200, field: data.transaction.status, equals: TF}
      pending:
        - {status: 200, field: data.transaction.status, equals: [TIP, TA]}
      not_found:
        - {status: 404}
      provider_reference: data.transaction.airtel_money_id
      reason: [status.response_code, data.transaction.message]
"""


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    raw: bytes
    seconds: float

    @property
    def body(self) -> dict[str, object]:
        return json.loads(self.raw)  # type: ignore[no-any-return]


def call(
    url: str,
    method: str = "GET",
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> Reply:
    request = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            status, answer_headers, raw = answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        status, answer_headers, raw = error.code, dict(error.headers), error.read()
    return Reply(status, answer_headers, raw, time.perf_counter() - started)


@dataclass
class Mock:
    """One mock provider process, seen through its admin API."""

    provider: str
    url: str
    process: ServiceProcess

    def stats(self) -> dict[str, int]:
        return call(f"{self.url}/__mock/stats").body  # type: ignore[return-value]

    def configure(self, **changes: object) -> None:
        reply = call(f"{self.url}/__mock/config", "PUT", json.dumps(changes).encode())
        assert reply.status == 200, reply.raw

    @contextmanager
    def faults(self, **rates: float) -> Iterator[None]:
        """Dial these rates in for the block, then back to 0 whatever happens."""
        self.configure(**rates)
        try:
            yield
        finally:
            self.configure(**dict.fromkeys(rates, 0.0))

    def token(self) -> dict[str, str]:
        """Headers with a fresh access token of the mock's, as a client of the real API gets."""
        if self.provider == "mtn":
            basic = base64.b64encode(b"e2e-user:e2e-key").decode()
            reply = call(
                f"{self.url}/collection/token/",
                "POST",
                headers={"Authorization": f"Basic {basic}", **MTN_SUBSCRIPTION},
            )
            extra = MTN_SUBSCRIPTION
        else:
            credentials = {
                "client_id": "e2e",
                "client_secret": "e2e",
                "grant_type": "client_credentials",
            }
            reply = call(f"{self.url}/auth/oauth2/token", "POST", json.dumps(credentials).encode())
            extra = {}
        assert reply.status == 200, reply.raw
        return {"Authorization": f"Bearer {reply.body['access_token']}", **extra}

    def lookup(self, reference: str) -> dict[str, object]:
        """The mock's own record of a payment (its status endpoint)."""
        path = (
            f"/collection/v1_0/requesttopay/{reference}"
            if self.provider == "mtn"
            else f"/standard/v1/payments/{reference}"
        )
        reply = call(f"{self.url}{path}", headers=self.token())
        assert reply.status == 200, reply.raw
        return reply.body


@dataclass
class Stack:
    proxy: str
    mocks: dict[str, Mock]  # by ProviderKey
    config_text: str
    config: Path
    env: dict[str, str]
    redis: redis_sync.Redis

    def pay(self, provider: str, transaction_id: str, **extra: object) -> Reply:
        body = {
            "TransactionID": transaction_id,
            "Amount": 20.00,
            "Currency": "ZAR",
            "ProviderKey": provider,
            **extra,
        }
        return self.pay_raw(json.dumps(body).encode())

    def pay_raw(self, raw: bytes) -> Reply:
        return call(f"{self.proxy}/v1/pay", "POST", raw)


def fresh(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


def provider_reference(provider: str, idempotency_key: str) -> str:
    """The reference the proxy sends (CONTRACT §2: a UUIDv5 of provider name and key)."""
    return str(uuid.uuid5(REFERENCE_NAMESPACE, f"{provider}\x00{idempotency_key}"))


def the_providers_own_id(stack: Stack, provider: str, transaction_id: str) -> str:
    record = stack.mocks[provider].lookup(provider_reference(provider, transaction_id))
    if provider == "MTN":
        return str(record["financialTransactionId"])
    return str(record["data"]["transaction"]["airtel_money_id"])  # type: ignore[index]


# Not about money: tokens come and go (the tests' own lookups take some too).
NOT_MONEY = {"tokens_issued"}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {
        name: after[name] - before[name]
        for name in after
        if after[name] != before[name] and name not in NOT_MONEY
    }


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory) -> Iterator[Stack]:
    if redis_server.process is None:  # another module may have stopped it
        redis_server.start()
    redis_sync.Redis(port=redis_server.port, db=REDIS_DB, socket_timeout=2).flushdb()
    ports = {"MTN": free_port(), "AIRTEL": free_port(), "AIRTEL_KE": free_port()}
    proxy_port = free_port()
    shipped = SHIPPED.read_text(encoding="utf-8")
    config_text = (
        shipped.rstrip("\n") + "\n" + AIRTEL_KE.replace("KE_PORT", str(ports["AIRTEL_KE"]))
    )
    config = tmp_path_factory.mktemp("providers") / "gateway.yaml"
    config.write_text(config_text, encoding="utf-8")
    env = {
        "MTN_URL": f"http://127.0.0.1:{ports['MTN']}",
        "AIRTEL_URL": f"http://127.0.0.1:{ports['AIRTEL']}",
        "REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/{REDIS_DB}",
        "PROVIDER_TIMEOUT_S": "1",
        "BREAKER_MINIMUM_CALLS": "100",  # the breaker is tested elsewhere; here it must stay closed
    }
    kinds = {"MTN": "mtn", "AIRTEL": "airtel", "AIRTEL_KE": "airtel"}
    proxy_argv = payagg_serve(config, proxy_port)
    with ExitStack() as processes:
        mocks = {}
        for seed, (name, port) in enumerate(ports.items(), start=1):
            url = f"http://127.0.0.1:{port}"
            # MTN answers its declines on the POST, as a 500 naming the reason (its habit for
            # insufficient funds): the shipped mapping must read them as declines. MOMO3 in
            # test_protocols.py covers MTN's asynchronous FAILED.
            extra = ["--sync-declines"] if name == "MTN" else []
            argv = mock_provider(kinds[name], port, "--seed", str(seed), *extra)
            process = processes.enter_context(running(argv, f"{url}/healthz"))
            mocks[name] = Mock(kinds[name], url, process)
        processes.enter_context(
            running(proxy_argv, f"http://127.0.0.1:{proxy_port}/readyz", env=env)
        )
        redis = redis_sync.Redis(port=redis_server.port, socket_timeout=2)
        yield Stack(f"http://127.0.0.1:{proxy_port}", mocks, config_text, config, env, redis)


def test_the_proxy_serves_the_shipped_config_plus_a_provider_added_in_yaml_only(stack):
    assert stack.config_text.startswith(SHIPPED.read_text(encoding="utf-8").rstrip("\n"))
    providers = call(f"{stack.proxy}/v1/providers").body["providers"]
    assert [p["name"] for p in providers] == ["MTN", "AIRTEL", "AIRTEL_KE"]  # type: ignore[index, union-attr]
    assert {p["state"] for p in providers} == {"closed"}  # type: ignore[index, union-attr]


@pytest.mark.parametrize("provider", ["MTN", "AIRTEL", "AIRTEL_KE"])
def test_a_successful_payment_is_200_with_the_providers_own_reference(stack, provider):
    transaction_id = fresh(f"OK-{provider}")
    others = {name: mock.stats() for name, mock in stack.mocks.items()}
    reply = stack.pay(provider, transaction_id, Payer="256772000111")
    assert reply.status == 200, reply.raw
    assert reply.body == {
        "status": "SUCCESS",
        "transaction_id": transaction_id,
        "provider": provider,
        "provider_reference": the_providers_own_id(stack, provider, transaction_id),
        "amount": 20.0,
        "currency": "ZAR",
    }
    # The provider's id, not the proxy's own UUID, is what the client gets back.
    assert reply.body["provider_reference"] != provider_reference(provider, transaction_id)
    for name, mock in stack.mocks.items():
        moved = delta(others[name], mock.stats())
        assert moved == ({"requests": 1, "charges": 1} if name == provider else {}), name


@pytest.mark.parametrize(
    ("provider", "transaction_id", "raw"),
    [
        (
            "AIRTEL",
            "TXN-ID-022-1",
            b'{"TransactionID":"TXN-ID-022-1", "Amount":20.00, "Currency":"ZAR", '
            b'"ProviderKey":"AIRTEL"}',
        ),
        (
            "MTN",
            "TXN-ID-022-MTN",
            b'{"TransactionID":"TXN-ID-022-MTN", "Amount":20.00, "Currency":"ZAR", '
            b'"ProviderKey":"MTN"}',
        ),
    ],
    ids=["AIRTEL-the-exact-original-body", "MTN-the-same-body-for-MTN"],
)
def test_the_original_services_body_without_payer_is_paid_by_both_providers(
    stack, provider, transaction_id, raw
):
    # The MTN row keeps the original shape with its own id: reusing TXN-ID-022-1 for another
    # provider would rightly be a 422 (same idempotency key, different request).
    if provider == "MTN":
        transaction_id = fresh("TXN-ID-022-MTN")
        raw = raw.replace(b"TXN-ID-022-MTN", transaction_id.encode())
    reply = stack.pay_raw(raw)
    assert reply.status == 200, reply.raw
    assert reply.body["status"] == "SUCCESS"
    assert reply.body["transaction_id"] == transaction_id
    assert reply.body["amount"] == 20.0
    assert reply.body["provider_reference"] == the_providers_own_id(stack, provider, transaction_id)


@pytest.mark.parametrize(
    ("provider", "codes", "must_see"),
    [
        ("MTN", MTN_DECLINES, {"NOT_ENOUGH_FUNDS", "PAYER_NOT_FOUND"}),
        ("AIRTEL", AIRTEL_DECLINES, {"DP00800001007"}),
    ],
    ids=["MTN-202-FAILED-and-500-NOT_ENOUGH_FUNDS", "AIRTEL-success-false"],
)
def test_a_decline_is_402_with_the_providers_reason(stack, provider, codes, must_see):
    """The mock draws each decline's reason at random: pay until the reasons that matter appear.

    For MTN that includes NOT_ENOUGH_FUNDS, which the provider sends as an HTTP 500: it must
    still come back as a 402 decline, never as a 502.
    """
    mock = stack.mocks[provider]
    before = mock.stats()
    seen: set[str] = set()
    attempts = 0
    with mock.faults(decline_rate=1.0):
        while not must_see <= seen:
            attempts += 1
            assert attempts <= 40, f"the mock never declined with {must_see - seen}"
            transaction_id = fresh(f"DECLINE-{provider}")
            reply = stack.pay(provider, transaction_id)
            assert reply.status == 402, reply.raw
            assert reply.body == {
                "status": "DECLINED",
                "transaction_id": transaction_id,
                "provider": provider,
                "reason": reply.body["reason"],
            }
            assert reply.body["reason"] in codes
            seen.add(str(reply.body["reason"]))
    assert delta(before, mock.stats()) == {"requests": attempts, "declines": attempts}
    if provider == "MTN":
        answered_500 = [
            json.loads(line)
            for line in mock.process.log().splitlines()
            if '"outcome":"decline"' in line and '"status":500' in line
        ]
        assert answered_500, "NOT_ENOUGH_FUNDS went through the mock's HTTP 500 path"


@pytest.mark.parametrize("provider", ["MTN", "AIRTEL"])
def test_a_provider_failure_is_502_and_releases_the_key_for_a_retry(stack, provider):
    mock = stack.mocks[provider]
    transaction_id = fresh(f"FAIL-{provider}")
    before = mock.stats()
    with mock.faults(failure_rate=1.0):
        reply = stack.pay(provider, transaction_id)
    assert reply.status == 502, reply.raw
    assert reply.body["error"] == "provider_error"
    assert reply.body["status"] == "PROVIDER_ERROR"
    assert reply.body["provider"] == provider
    assert delta(before, mock.stats()) == {"requests": 1, "failures": 1}
    retry = stack.pay(provider, transaction_id)
    assert retry.status == 200, retry.raw
    assert "Idempotent-Replayed" not in retry.headers


@pytest.mark.parametrize("provider", ["MTN", "AIRTEL"])
def test_a_hang_is_settled_by_the_status_endpoint_charged_once_with_no_client_retry(
    stack, provider
):
    """Before the lifecycle this was 504 with the key released; now the unknown outcome is asked
    about at once and the payment's real state is the answer."""
    mock = stack.mocks[provider]
    transaction_id = fresh(f"HANG-{provider}")
    before = mock.stats()
    with mock.faults(hang_rate=1.0):
        reply = stack.pay(provider, transaction_id)
    assert reply.status == 200, reply.raw
    # The mock never answers the POST: PROVIDER_TIMEOUT_S=1 ran out before the status query.
    assert reply.seconds >= 0.9, "answered before PROVIDER_TIMEOUT_S=1 ran out"
    assert reply.body["provider_reference"] == the_providers_own_id(stack, provider, transaction_id)
    assert delta(before, mock.stats()) == {"requests": 1, "charges": 1}
    looked_up = call(f"{stack.proxy}/v1/payments/{transaction_id}").body
    assert looked_up["state"] == "SUCCESS"

    retry = stack.pay(provider, transaction_id)
    assert retry.status == 200, retry.raw
    assert retry.headers.get("Idempotent-Replayed") == "true"
    assert retry.raw == reply.raw
    assert delta(before, mock.stats()) == {"requests": 1, "charges": 1}, "never sent again"


@pytest.mark.parametrize(
    ("provider", "rates", "status"),
    [
        ("MTN", {}, 200),
        ("AIRTEL", {}, 200),
        ("MTN", {"decline_rate": 1.0}, 402),
        ("AIRTEL", {"decline_rate": 1.0}, 402),
    ],
    ids=["MTN-success", "AIRTEL-success", "MTN-decline", "AIRTEL-decline"],
)
def test_a_replay_of_a_completed_payment_is_the_same_body_and_calls_no_provider(
    stack, provider, rates, status
):
    mock = stack.mocks[provider]
    transaction_id = fresh(f"REPLAY-{provider}")
    with mock.faults(**rates):
        first = stack.pay(provider, transaction_id)
    assert first.status == status, first.raw
    assert "Idempotent-Replayed" not in first.headers
    before = mock.stats()
    replay = stack.pay(provider, transaction_id)
    assert replay.status == status
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert replay.raw == first.raw
    assert mock.stats() == before, "a replay never reaches the provider"


@pytest.mark.parametrize(
    ("provider", "field", "value"),
    [
        ("AIRTEL", "TransactionID", "\n"),
        ("MTN", "TransactionID", "\n"),
        ("AIRTEL", "Currency", "ZAR\n"),
        ("MTN", "Payer", "256772123456\n"),
    ],
    ids=[
        "AIRTEL-transaction-id-is-not-a-second-payment",
        "MTN-transaction-id-is-not-a-second-payment",
        "AIRTEL-currency-never-reaches-the-x-currency-header",
        "MTN-payer",
    ],
)
def test_a_trailing_newline_is_a_400_naming_the_field_and_nothing_is_charged(
    stack, provider, field, value
):
    mock = stack.mocks[provider]
    transaction_id = fresh(f"NL-{provider}")
    paid = stack.pay(provider, transaction_id)
    assert paid.status == 200, paid.raw
    before = mock.stats()
    if field == "TransactionID":
        reply = stack.pay(provider, transaction_id + value)
    else:
        reply = stack.pay(provider, fresh(f"NL-{provider}"), **{field: value})
    assert reply.status == 400, reply.raw
    assert reply.body["error"] == "invalid_request"
    assert list(reply.body["fields"]) == [field]  # type: ignore[call-overload]
    assert mock.stats() == before, "nothing reached the provider, nothing was charged"


@dataclass
class Task:
    url: str
    process: ServiceProcess

    def pay(self, transaction_id: str, amount: float) -> Reply:
        body = {
            "TransactionID": transaction_id,
            "Amount": amount,
            "Currency": "ZAR",
            "ProviderKey": "MTN",
        }
        return call(f"{self.url}/v1/pay", "POST", json.dumps(body).encode())

    def metric(self, name: str, **labels: str) -> float:
        for line in call(f"{self.url}/metrics").raw.decode().splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no sample {name} {labels}")

    def log_lines(self) -> list[dict[str, object]]:
        return [
            json.loads(line) for line in self.process.log().splitlines() if line.startswith("{")
        ]


@pytest.fixture(scope="module")
def another_task(stack: Stack) -> Iterator[Task]:
    """A second proxy process on the same config, Redis and mocks: another task of the service.

    It never saw the payments the first one answered, so only Redis could tell it about them (a
    process also keeps the answers it gave itself, which would hide a lost Redis record).
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running(payagg_serve(stack.config, port), f"{url}/readyz", env=stack.env) as process:
        yield Task(url, process)


def test_after_redis_lost_a_record_a_payment_for_another_amount_is_422_never_a_second_200(
    stack, another_task
):
    """Issue #12's DL-1: MTN answers a repeated reference from its first payment, for 20.00; a
    request for 999 under the same TransactionID must not be told 999 was paid."""
    mock = stack.mocks["MTN"]
    transaction_id = fresh("DL-1")
    before = mock.stats()
    first = stack.pay("MTN", transaction_id)
    assert first.status == 200, first.raw
    assert first.body["amount"] == 20.0

    stack.redis.flushall()  # Redis restarted without persistence: the record is gone
    reused = another_task.pay(transaction_id, 999)
    assert reused.status == 422, reused.raw
    assert reused.body["error"] == "idempotency_key_reused"
    assert another_task.metric("payagg_provider_mismatch_total", provider="MTN") == 1
    assert delta(before, mock.stats()) == {"requests": 2, "charges": 1, "duplicates": 1}
    (warning,) = [line for line in another_task.log_lines() if "answer_amount" in line]
    assert warning["level"] == "warning"
    assert (warning["answer_amount"], warning["answer_currency"]) == ("20.00", "ZAR")
    assert (warning["request_amount"], warning["request_currency"]) == ("999", "ZAR")
    assert "256772123456" not in json.dumps(warning), "no payer data in the log"

    # Nothing was stored for the 999 request: the real client's retry for 20.00 is the payment
    # the provider holds, answered 200 with MTN's own id and not charged again.
    retry = another_task.pay(transaction_id, 20.00)
    assert retry.status == 200, retry.raw
    assert "Idempotent-Replayed" not in retry.headers
    assert retry.body == first.body
    assert delta(before, mock.stats()) == {"requests": 3, "charges": 1, "duplicates": 2}
