"""Forwarding to one provider: request and answer mapping, errors mapped once.

A small in-process aiohttp provider answers each call as the test tells it: a status and body,
after a delay, or by hanging up without an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from proxy.errors import (
    InvalidRequest,
    KeyReused,
    OutcomeUnknown,
    PaymentAlreadyExists,
    ProviderBusy,
    ProviderFailed,
    ProviderMismatch,
    ProviderNotReached,
    ProviderRejected,
    ProviderTimeout,
)
from proxy.observability.metrics import GatewayMetrics
from proxy.payments.request import REFERENCE_NAMESPACE, Payment
from proxy.providers.breaker import BreakerState, ProviderBreaker, WindowCounts
from proxy.providers.upstream import ProviderClient
from tests.conftest import make_config
from tests.processes import free_port

REFERENCE = str(uuid.uuid5(REFERENCE_NAMESPACE, "CANON\x00TXN-1"))
TIMEOUT_S = 0.2


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: Any = None  # JSON-encoded unless bytes; None is an empty body
    delay_s: float = 0.0
    hang_up: bool = False  # close the connection without answering


@dataclass(frozen=True)
class Seen:
    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class FakeProvider:
    """Replies are used in order; the last one answers every call after it."""

    url: str = ""
    replies: list[Reply] = field(default_factory=lambda: [Reply(body={"status": "SUCCESS"})])
    seen: list[Seen] = field(default_factory=list)

    def answer(self, *replies: Reply) -> None:
        self.replies = list(replies)


PROVIDER = web.AppKey("provider", FakeProvider)


async def _pay(request: web.Request) -> web.StreamResponse:
    provider = request.app[PROVIDER]
    body = await request.read()
    provider.seen.append(Seen(request.method, request.path_qs, CIMultiDict(request.headers), body))
    reply = provider.replies.pop(0) if len(provider.replies) > 1 else provider.replies[0]
    if reply.delay_s:
        await asyncio.sleep(reply.delay_s)  # cancelled when the client gives up and hangs up
    if reply.hang_up:
        assert request.transport is not None
        request.transport.close()
        return web.Response()
    if reply.body is None:
        return web.Response(status=reply.status)
    if isinstance(reply.body, bytes):
        return web.Response(status=reply.status, body=reply.body, content_type="text/html")
    return web.json_response(reply.body, status=reply.status)


@pytest.fixture
async def provider() -> AsyncIterator[FakeProvider]:
    fake = FakeProvider()
    app = web.Application()
    app[PROVIDER] = fake
    app.router.add_route("*", "/pay", _pay)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fake.url = str(server.make_url("/pay"))
    yield fake
    await server.close()


def provider_client(yaml: str, name: str, metrics: GatewayMetrics) -> ProviderClient:
    provider = make_config(yaml).providers[0]
    return ProviderClient(provider, metrics, ProviderBreaker(name, provider.settings.breaker))


@pytest.fixture
def metrics() -> GatewayMetrics:
    return GatewayMetrics(["CANON"])


@pytest.fixture
async def client(provider: FakeProvider, metrics: GatewayMetrics) -> AsyncIterator[ProviderClient]:
    yaml = f'providers:\n  CANON: {{url: "{provider.url}", timeout_s: {TIMEOUT_S}}}\n'
    canon = provider_client(yaml, "CANON", metrics)
    yield canon
    await canon.close()


def a_payment(
    transaction_id: str = "TXN-1", payer: str | None = None, header: str | None = None
) -> Payment:
    return Payment(transaction_id, Decimal("20.00"), "ZAR", "canon", payer, header)


async def test_the_canonical_request_carries_a_uuid5_reference_and_the_payment(
    client: ProviderClient, provider: FakeProvider
) -> None:
    provider.answer(Reply(body={"status": "SUCCESS", "provider_reference": "P-1"}))
    expected = a_payment(header="KEY-9").provider_reference("CANON")
    answer = await client.pay(a_payment(header="KEY-9"), expected)
    (call,) = provider.seen
    assert expected == str(uuid.uuid5(REFERENCE_NAMESPACE, "CANON\x00TXN-1"))
    assert (call.method, call.path_qs) == ("POST", "/pay")
    assert call.headers["X-Reference-Id"] == expected
    assert call.headers["Content-Type"] == "application/json"
    assert json.loads(call.body) == {
        "reference": expected,
        "transaction_id": "TXN-1",
        "amount": 20,
        "currency": "ZAR",
        "payer": None,
    }
    assert answer.outcome == "success"
    assert answer.provider_reference == "P-1"


def test_the_same_transaction_id_gives_the_same_reference_whatever_its_header() -> None:
    reference = a_payment("A").provider_reference("CANON")
    assert a_payment("A", header="k1").provider_reference("CANON") == reference
    assert a_payment("A", header="k2").provider_reference("CANON") == reference
    assert a_payment("B", header="A").provider_reference("CANON") != reference
    assert a_payment("A").provider_reference("MTN") != reference


async def test_a_declined_answer_carries_the_reason(
    client: ProviderClient, provider: FakeProvider
) -> None:
    provider.answer(Reply(body={"status": "DECLINED", "reason": "NOT_ENOUGH_FUNDS"}))
    answer = await client.pay(a_payment(), REFERENCE)
    assert (answer.outcome, answer.reason) == ("declined", "NOT_ENOUGH_FUNDS")


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (Reply(500, {"error": "boom"}), ProviderFailed),
        (Reply(503), ProviderFailed),
        (Reply(200, b"<html>not json</html>"), ProviderFailed),
        (Reply(200, {"status": "WHO_KNOWS"}), ProviderFailed),
        (Reply(400, {"error": "bad request"}), ProviderRejected),
        (Reply(404), ProviderRejected),
    ],
    ids=["500", "503-empty", "unreadable-200", "unknown-status-200", "400", "404"],
)
async def test_answers_that_are_neither_success_nor_decline_are_provider_failures(
    client: ProviderClient, provider: FakeProvider, reply: Reply, error: type[ProviderFailed]
) -> None:
    provider.answer(reply)
    with pytest.raises(ProviderFailed) as raised:
        await client.pay(a_payment(), REFERENCE)
    assert type(raised.value) is error
    assert raised.value.status == 502
    assert raised.value.details["provider"] == "CANON"
    assert f"HTTP {reply.status}" in raised.value.message


async def test_a_provider_nobody_listens_on_was_not_reached(metrics: GatewayMetrics) -> None:
    yaml = f'providers:\n  CANON: {{url: "http://127.0.0.1:{free_port()}/pay"}}\n'
    nobody = provider_client(yaml, "CANON", metrics)
    try:
        with pytest.raises(ProviderNotReached, match="cannot reach CANON") as raised:
            await nobody.pay(a_payment(), REFERENCE)
    finally:
        await nobody.close()
    assert raised.value.status == 502
    assert nobody.breaker.window_counts().failures == 1


async def test_a_provider_that_hangs_up_after_reading_the_request_leaves_the_outcome_unknown(
    client: ProviderClient, provider: FakeProvider
) -> None:
    provider.answer(Reply(hang_up=True))
    with pytest.raises(OutcomeUnknown, match="CANON sent no usable answer") as raised:
        await client.pay(a_payment(), REFERENCE)
    assert raised.value.status == 504
    assert len(provider.seen) == 1  # never sent again


async def test_no_answer_within_the_timeout_is_a_provider_timeout(
    client: ProviderClient, provider: FakeProvider
) -> None:
    provider.answer(Reply(body={"status": "SUCCESS"}, delay_s=5))
    started = time.perf_counter()
    with pytest.raises(ProviderTimeout) as raised:
        await client.pay(a_payment(), REFERENCE)
    # The provider would answer after 5 s; a timeout instead of its answer shows the bound held.
    assert time.perf_counter() - started >= TIMEOUT_S
    assert raised.value.status == 504
    assert raised.value.body()["status"] == "TIMEOUT"
    assert raised.value.details["provider"] == "CANON"
    assert raised.value.message == f"CANON did not answer within {TIMEOUT_S:g}s"


async def test_a_provider_call_cancelled_from_outside_is_a_cancellation_not_a_timeout(
    client: ProviderClient, provider: FakeProvider
) -> None:
    """The call's deadline is asyncio.timeout (issue #18: the hand-made one saved 2.5 µs of a
    ~400 µs payment, which `make bench` cannot see); a shutdown's cancellation must still come
    out as a cancellation, and the task stay cancellable after a timeout it survived."""
    provider.answer(
        Reply(body={"status": "SUCCESS"}, delay_s=5), Reply(body={"status": "SUCCESS"}, delay_s=5)
    )

    async def timed_out_then_waiting() -> None:
        with pytest.raises(ProviderTimeout):
            await client.pay(a_payment(), REFERENCE)
        await client.pay(a_payment(), REFERENCE)

    task = asyncio.ensure_future(timed_out_then_waiting())
    wait_for = time.monotonic() + 30
    # The fake provider only records what it saw: polled, up to a generous bound.
    while len(provider.seen) < 2 and time.monotonic() < wait_for:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    assert len(provider.seen) == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_after_a_timeout_the_next_payment_gets_its_own_answer(
    client: ProviderClient, provider: FakeProvider
) -> None:
    provider.answer(
        Reply(body={"status": "SUCCESS", "provider_reference": "LATE"}, delay_s=TIMEOUT_S * 2),
        Reply(body={"status": "SUCCESS", "provider_reference": "ON-TIME"}),
    )
    with pytest.raises(ProviderTimeout):
        await client.pay(a_payment(), REFERENCE)
    answer = await client.pay(a_payment(), REFERENCE)
    assert answer.provider_reference == "ON-TIME"


async def test_failures_feed_the_providers_breaker_and_client_errors_do_not(
    client: ProviderClient, provider: FakeProvider
) -> None:
    provider.answer(
        Reply(400, {}),
        Reply(404),
        Reply(body={"status": "DECLINED", "reason": "NOT_ENOUGH_FUNDS"}),
        Reply(500, {}),
        Reply(503),
        Reply(body={"status": "SUCCESS"}, delay_s=5),
    )
    outcomes = []
    for _ in range(6):
        try:
            outcomes.append((await client.pay(a_payment(), REFERENCE)).outcome)
        except ProviderFailed as error:
            outcomes.append(type(error).__name__)
        except ProviderTimeout:
            outcomes.append("ProviderTimeout")
    assert outcomes == [
        "ProviderRejected",
        "ProviderRejected",
        "declined",
        "ProviderFailed",
        "ProviderFailed",
        "ProviderTimeout",
    ]
    counts = client.breaker.window_counts()
    assert (counts.calls, counts.failures) == (6, 3)


async def test_a_payment_without_payer_is_refused_before_any_call_when_the_mapping_needs_one(
    provider: FakeProvider,
) -> None:
    needy = provider_client(
        f"""
providers:
  NEEDY:
    url: "{provider.url}"
    request:
      body: {{msisdn: "{{payer}}", ref: "{{reference}}"}}
    response:
      success: [{{status: 200}}]
""",
        "NEEDY",
        GatewayMetrics(["NEEDY"]),
    )
    with pytest.raises(InvalidRequest) as refused:
        needy.check(a_payment())
    needy.check(a_payment(payer="256700000001"))
    assert refused.value.details["fields"] == {"Payer": "is required by provider NEEDY"}
    assert provider.seen == []


async def test_the_upstream_duration_histogram_counts_each_call(
    client: ProviderClient, provider: FakeProvider, metrics: GatewayMetrics
) -> None:
    def observed(sample: str) -> float:
        value = metrics.registry.get_sample_value(
            f"payagg_upstream_request_duration_seconds_{sample}", {"provider": "CANON"}
        )
        assert value is not None
        return value

    assert observed("count") == 0
    provider.answer(
        Reply(body={"status": "SUCCESS"}),
        Reply(500, {}),
        Reply(body={"status": "DECLINED"}),
        Reply(body={"status": "SUCCESS"}, delay_s=5),
        Reply(hang_up=True),
    )
    for _ in range(5):
        with contextlib.suppress(ProviderFailed, ProviderTimeout):
            await client.pay(a_payment(), REFERENCE)
    assert len(provider.seen) == 5
    assert observed("count") == 5
    assert observed("sum") >= TIMEOUT_S  # the timed-out call is observed at its full wait


async def test_a_value_that_would_break_a_header_is_refused_before_any_call(
    provider: FakeProvider,
) -> None:
    airtel_like = provider_client(
        f"""
providers:
  AIRTEL_LIKE:
    url: "{provider.url}"
    request:
      headers: {{X-Currency: "{{currency}}"}}
      body: {{id: "{{reference}}"}}
    response:
      success: [{{status: 200}}]
""",
        "AIRTEL_LIKE",
        GatewayMetrics(["AIRTEL_LIKE"]),
    )
    with pytest.raises(InvalidRequest) as refused:
        airtel_like.check(Payment("TXN-1", Decimal("20.00"), "ZAR\n", "airtel_like", None, "TXN-1"))
    airtel_like.check(a_payment())
    assert refused.value.details["fields"] == {
        "Currency": "cannot be sent in the X-Currency header: it contains CR, LF or NUL"
    }
    assert provider.seen == []


# --- What the provider says about the payment ------------------------------------------------


def mismatches(metrics: GatewayMetrics) -> float:
    value = metrics.registry.get_sample_value(
        "payagg_provider_mismatch_total", {"provider": "CANON"}
    )
    assert value is not None, "the series exists from start-up"
    return value


@pytest.mark.parametrize(
    "body",
    [
        {"status": "SUCCESS", "provider_reference": "P-1", "amount": 999, "currency": "ZAR"},
        {"status": "SUCCESS", "provider_reference": "P-1", "amount": "20.00", "currency": "UGX"},
        {"status": "DECLINED", "reason": "NOT_ENOUGH_FUNDS", "amount": "999.00"},
    ],
    ids=["success-for-another-amount", "success-in-another-currency", "decline-of-another-amount"],
)
async def test_an_answer_about_another_amount_or_currency_is_a_422_counted_and_logged(
    client: ProviderClient,
    provider: FakeProvider,
    metrics: GatewayMetrics,
    caplog: pytest.LogCaptureFixture,
    body: dict[str, object],
) -> None:
    provider.answer(Reply(body=body))
    with caplog.at_level(logging.WARNING, "payagg.upstream"), pytest.raises(KeyReused) as raised:
        await client.pay(a_payment(), REFERENCE)
    assert type(raised.value) is ProviderMismatch
    assert (raised.value.status, raised.value.code) == (422, "idempotency_key_reused")
    assert raised.value.outcome == "key_reused"
    assert mismatches(metrics) == 1
    (line,) = [record for record in caplog.records if record.name == "payagg.upstream"]
    assert line.levelno == logging.WARNING
    logged = line.fields  # type: ignore[attr-defined]
    assert (logged["answer_amount"], logged["answer_currency"]) == (
        body.get("amount"),
        body.get("currency"),
    )
    assert (logged["request_amount"], logged["request_currency"]) == ("20.00", "ZAR")
    assert logged["provider_reference"] == REFERENCE
    # The provider answered properly: a call in the window, not a failure.
    assert client.breaker.window_counts() == WindowCounts(1, 0)


@pytest.mark.parametrize("amount", ["20.00", "20", 20, 20.0], ids=["2dp", "text", "int", "float"])
async def test_an_answer_naming_the_same_amount_in_any_spelling_is_believed(
    client: ProviderClient, provider: FakeProvider, metrics: GatewayMetrics, amount: object
) -> None:
    provider.answer(
        Reply(body={"status": "SUCCESS", "provider_reference": "P-1", "amount": amount})
    )
    answer = await client.pay(a_payment(), REFERENCE)
    assert (answer.outcome, answer.provider_reference) == ("success", "P-1")
    assert mismatches(metrics) == 0


async def test_already_exists_is_an_unknown_outcome_never_a_502_and_not_a_breaker_failure(
    client: ProviderClient, provider: FakeProvider
) -> None:
    provider.answer(Reply(409, {"code": "RESOURCE_ALREADY_EXIST"}))
    with pytest.raises(ProviderTimeout) as raised:
        await client.pay(a_payment(), REFERENCE)
    assert type(raised.value) is PaymentAlreadyExists
    assert (raised.value.status, raised.value.code) == (504, "provider_timeout")
    assert raised.value.body()["status"] == "TIMEOUT"
    assert "already holds a payment under this reference" in raised.value.message
    assert client.breaker.window_counts() == WindowCounts(1, 0)


async def test_already_exists_naming_another_amount_is_a_422_not_a_504(
    client: ProviderClient, provider: FakeProvider, metrics: GatewayMetrics
) -> None:
    provider.answer(Reply(409, {"amount": "999", "currency": "ZAR"}))
    with pytest.raises(ProviderMismatch):
        await client.pay(a_payment(), REFERENCE)
    assert mismatches(metrics) == 1


@pytest.mark.parametrize("status", [429, 408])
async def test_429_and_408_are_breaker_failures_by_default(
    client: ProviderClient, provider: FakeProvider, status: int
) -> None:
    provider.answer(Reply(status, {"error": "busy"}))
    with pytest.raises(ProviderFailed) as raised:
        await client.pay(a_payment(), REFERENCE)
    assert type(raised.value) is ProviderFailed
    assert raised.value.status == 502
    assert f"HTTP {status}" in raised.value.message
    assert client.breaker.window_counts() == WindowCounts(1, 1)


@pytest.mark.parametrize("status", [429, 408])
async def test_a_provider_may_say_429_and_408_are_not_failures(
    provider: FakeProvider, metrics: GatewayMetrics, status: int
) -> None:
    yaml = (
        f'providers:\n  CANON: {{url: "{provider.url}", timeout_s: {TIMEOUT_S}, '
        "breaker: {failure_statuses: []}}\n"
    )
    lenient = provider_client(yaml, "CANON", metrics)
    provider.answer(Reply(status, {"error": "busy"}))
    with pytest.raises(ProviderFailed) as raised:
        await lenient.pay(a_payment(), REFERENCE)
    await lenient.close()
    assert type(raised.value) is ProviderBusy
    assert raised.value.status == 502
    assert lenient.breaker.window_counts() == WindowCounts(1, 0)


@pytest.mark.parametrize(
    ("failure_statuses", "status", "after_the_trial"),
    [
        ("[408, 429]", 429, BreakerState.OPEN),
        ("[408, 429]", 408, BreakerState.OPEN),
        ("[]", 429, BreakerState.HALF_OPEN),
        ("[]", 408, BreakerState.HALF_OPEN),
    ],
    ids=["429-counted", "408-counted", "429-not-counted", "408-not-counted"],
)
async def test_a_half_open_trial_answered_429_or_408_never_closes_the_breaker(
    provider: FakeProvider,
    metrics: GatewayMetrics,
    failure_statuses: str,
    status: int,
    after_the_trial: BreakerState,
) -> None:
    now = [0.0]
    config = make_config(
        f'providers:\n  CANON: {{url: "{provider.url}", timeout_s: {TIMEOUT_S}, '
        f"breaker: {{open_s: 30, failure_statuses: {failure_statuses}}}}}\n"
    )
    settings = config.providers[0].settings.breaker
    breaker = ProviderBreaker("CANON", settings, clock=lambda: now[0])
    canon = ProviderClient(config.providers[0], metrics, breaker)
    provider.answer(Reply(500, {}), Reply(500, {}), Reply(500, {}), Reply(status, {}))
    for _ in range(3):
        with contextlib.suppress(ProviderFailed):
            await canon.pay(a_payment(), REFERENCE)
    assert breaker.state is BreakerState.OPEN
    now[0] += 30
    with pytest.raises(ProviderFailed):
        await canon.pay(a_payment(), REFERENCE)  # the trial
    await canon.close()
    assert breaker.state is after_the_trial
