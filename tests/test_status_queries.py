"""Status queries: the rules that read a payment's state, and waiting for a pending payment."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.errors import (
    ProviderBusy,
    ProviderFailed,
    ProviderUnavailable,
)
from proxy.observability.metrics import GatewayMetrics
from proxy.payments.request import Payment
from proxy.providers.breaker import ProviderBreaker
from proxy.providers.mapping import StatusMapping
from proxy.providers.upstream import ProviderClient
from proxy.settings.config import load_config
from tests.canonical_upstream import UpstreamState
from tests.conftest import gateway_yaml, make_config, payment, running_gateway

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "gateway.yaml"


def shipped_status() -> dict[str, StatusMapping]:
    providers = load_config(SHIPPED, {}).providers
    return {p.name: p.status for p in providers if p.status is not None}


def mtn_resource(status: str, **extra: object) -> dict[str, object]:
    return {"externalId": "T-1", "amount": "20.00", "currency": "ZAR", "status": status, **extra}


def airtel_enquiry(status: str, code: str, money_id: str | None = None) -> dict[str, object]:
    return {
        "data": {
            "transaction": {
                "airtel_money_id": money_id,
                "id": "r",
                "message": "m",
                "status": status,
            }
        },
        "status": {"code": "200", "response_code": code, "success": status != "TF"},
    }


STATUS_ROWS = [
    ("MTN", 200, mtn_resource("PENDING"), "pending", None, None),
    (
        "MTN",
        200,
        mtn_resource("SUCCESSFUL", financialTransactionId="5716401548"),
        "success",
        "5716401548",
        None,
    ),
    (
        "MTN",
        200,
        mtn_resource("FAILED", reason="NOT_ENOUGH_FUNDS"),
        "declined",
        None,
        "NOT_ENOUGH_FUNDS",
    ),
    ("MTN", 200, mtn_resource("FAILED", reason="EXPIRED"), "declined", None, "EXPIRED"),
    ("MTN", 200, mtn_resource("ONGOING"), "pending", None, None),
    ("MTN", 404, {"code": "RESOURCE_NOT_FOUND", "message": "x"}, "not_found", None, None),
    ("MTN", 500, {"code": "INTERNAL_PROCESSING_ERROR"}, "failure", None, None),
    ("MTN", 429, {}, "busy", None, None),
    ("MTN", 200, b"<html>", "failure", None, None),
    ("AIRTEL", 200, airtel_enquiry("TIP", "DP00800001006"), "pending", None, None),
    ("AIRTEL", 200, airtel_enquiry("TA", "DP00800001000"), "pending", None, None),
    ("AIRTEL", 200, airtel_enquiry("TS", "DP00800001001", "MP1"), "success", "MP1", None),
    ("AIRTEL", 200, airtel_enquiry("TF", "DP00800001007"), "declined", None, "DP00800001007"),
    ("AIRTEL", 200, airtel_enquiry("XYZ", "DP0"), "pending", None, None),
    ("AIRTEL", 404, {"status": {"code": "404", "success": False}}, "not_found", None, None),
    ("AIRTEL", 500, {"status": {"code": "500", "success": False}}, "failure", None, None),
    ("AIRTEL", 400, {"status": {"code": "400", "success": False}}, "rejected", None, None),
]
STATUS_IDS = [
    "MTN-PENDING",
    "MTN-SUCCESSFUL-with-financialTransactionId",
    "MTN-FAILED-with-reason",
    "MTN-FAILED-EXPIRED-the-payer-never-approved",
    "MTN-unknown-status-stays-pending",
    "MTN-404-RESOURCE_NOT_FOUND-is-not-found",
    "MTN-500-is-a-failed-query",
    "MTN-429-is-busy-slow-down",
    "MTN-200-not-json-is-a-failed-query",
    "AIRTEL-TIP-is-pending",
    "AIRTEL-TA-ambiguous-is-pending-never-guessed",
    "AIRTEL-TS-with-airtel_money_id",
    "AIRTEL-TF-with-response-code",
    "AIRTEL-unknown-status-stays-pending",
    "AIRTEL-404-is-not-found",
    "AIRTEL-500-is-a-failed-query",
    "AIRTEL-400-is-a-refused-query",
]


@pytest.mark.parametrize(
    ("provider", "status", "body", "outcome", "reference", "reason"), STATUS_ROWS, ids=STATUS_IDS
)
def test_the_shipped_status_rules_read_each_answer(
    provider, status, body, outcome, reference, reason
):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = shipped_status()[provider].classify(status, raw)
    assert answer.outcome == outcome, answer
    assert answer.provider_reference == reference
    assert answer.reason == reason


def test_an_answer_no_rule_describes_is_pending_and_says_so():
    answer = shipped_status()["AIRTEL"].classify(
        200, json.dumps(airtel_enquiry("XYZ", "D")).encode()
    )
    assert answer.outcome == "pending"
    assert "matched no status rule" in answer.detail


def test_mtns_status_names_amount_and_currency_airtels_does_not():
    mtn = shipped_status()["MTN"].classify(200, json.dumps(mtn_resource("SUCCESSFUL")).encode())
    assert (mtn.amount, mtn.currency) == ("20.00", "ZAR")
    assert mtn.contradicts(Decimal("999"), "ZAR")
    airtel = shipped_status()["AIRTEL"].classify(
        200, json.dumps(airtel_enquiry("TS", "DP00800001001", "MP1")).encode()
    )
    assert (airtel.amount, airtel.currency) == (None, None)


# --- query_status against a provider ----------------------------------------------------------


@dataclass
class StatusProvider:
    url: str = ""
    answers: list[tuple[int, object]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


KEY = web.AppKey("status_provider", StatusProvider)


async def _status(request: web.Request) -> web.Response:
    provider = request.app[KEY]
    provider.paths.append(request.path_qs)
    status, body = provider.answers.pop(0) if provider.answers else (200, {"state": "PENDING"})
    return web.json_response(body, status=status)


@pytest.fixture
async def status_provider() -> AsyncIterator[StatusProvider]:
    provider = StatusProvider()
    app = web.Application()
    app[KEY] = provider
    app.router.add_get("/payments/{reference}", _status)
    app.router.add_get("/by-id/{reference}", _status)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    provider.url = str(server.make_url(""))
    yield provider
    await server.close()


def status_client(
    provider: StatusProvider, extra: str = "", metrics: GatewayMetrics | None = None
) -> ProviderClient:
    text = f"""\
providers:
  ST:
    url: "{provider.url}/pay"
    timeout_s: 2
    breaker: {{minimum_calls: 1, failure_rate_threshold: 1.0}}
    sync_wait_s: 1
    request: {{body: {{reference: "{{reference}}"}}}}
    response:
      pending: [{{status: 202}}]
    status:
      url: "{provider.url}/payments/{{reference}}"
      success: [{{status: 200, field: state, equals: DONE}}]
      declined: [{{status: 200, field: state, equals: REFUSED}}]
      pending: [{{status: 200, field: state, equals: PENDING}}]
      not_found: [{{status: 404}}]
      reason: why
      amount: amount
      currency: currency
      {extra}
"""
    config = make_config(text).providers[0]
    breaker = ProviderBreaker("ST", config.settings.breaker)
    return ProviderClient(config, metrics or GatewayMetrics(["ST"]), breaker)


async def test_a_status_query_asks_the_rendered_url_with_the_reference_escaped(status_provider):
    status_provider.answers = [(200, {"state": "DONE"})]
    client = status_client(status_provider)
    try:
        answer = await client.query_status("ref/1 x")
    finally:
        await client.close()
    assert answer.outcome == "success"
    assert status_provider.paths == ["/payments/ref%2F1%20x"]


async def test_a_status_answer_no_rule_describes_is_pending_and_counted(status_provider, caplog):
    status_provider.answers = [(200, {"state": "ON_HOLD"})]
    metrics = GatewayMetrics(["ST"])
    client = status_client(status_provider, metrics=metrics)
    try:
        answer = await client.query_status("ref-1")
    finally:
        await client.close()
    assert answer.outcome == "pending"
    assert 'payagg_status_unrecognised_total{provider="ST"} 1.0' in metrics.render().decode()
    assert any("left pending" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("status", "error"),
    [(500, ProviderFailed), (429, ProviderBusy)],
    ids=["500-failed", "429-busy"],
)
async def test_a_failed_status_query_raises_and_never_votes_in_the_breaker(
    status_provider, status, error
):
    status_provider.answers = [(status, {"error": "x"})]
    client = status_client(status_provider, "not_found_grace_s: 0")
    try:
        with pytest.raises(error):
            await client.query_status("ref-1")
    finally:
        await client.close()
    assert client.breaker.window_counts().calls == 0, "the breaker's window counts payments"


async def test_a_status_query_is_not_sent_while_the_breaker_is_open(status_provider):
    client = status_client(status_provider)
    with pytest.raises(ProviderFailed), client.breaker.call():
        raise ProviderFailed("ST", "down")  # one failed payment opens it (minimum_calls 1)
    try:
        with pytest.raises(ProviderUnavailable):
            await client.query_status("ref-1")
    finally:
        await client.close()
    assert status_provider.paths == []


# --- The canonical protocol's status endpoint, through the gateway ---------------------------


async def test_a_canonical_pending_payment_is_settled_by_its_status_endpoint(gateway, upstream):
    state: UpstreamState = upstream[0]
    state.pending_polls = 2
    reply = await gateway.post("/v1/pay", json=payment("TXN-PENDING"))
    assert reply.status == 200, await reply.text()
    body = await reply.json()
    assert body["status"] == "SUCCESS"
    assert body["provider_reference"].startswith("up-")
    assert state.requests == 1, "the payment was sent once"
    assert state.status_queries == 3, "PENDING twice, then SUCCESS"


async def test_a_canonical_409_is_settled_by_its_status_endpoint_when_the_provider_has_it(
    gateway, upstream
):
    """A retry after payagg lost its record: the provider holds the reference (409); its status
    endpoint tells the outcome, and nothing is charged again."""
    state: UpstreamState = upstream[0]
    reference = Payment("TXN-409", Decimal("20"), "ZAR", "CANON", None, None).provider_reference(
        "CANON"
    )
    state.answered[reference] = json.dumps(
        {"status": "SUCCESS", "provider_reference": "up-first"}
    ).encode()
    state.already_exists = True
    reply = await gateway.post("/v1/pay", json=payment("TXN-409"))
    assert reply.status == 200, await reply.text()
    assert (await reply.json())["provider_reference"] == "up-first"
    assert state.status_queries == 1


async def test_a_canonical_409_unknown_to_the_status_endpoint_stays_pending_never_not_created(
    gateway, upstream
):
    """The provider says it holds the reference: its status endpoint not knowing it is the
    provider's inconsistency, never proof the payment was not created."""
    state: UpstreamState = upstream[0]
    state.already_exists = True
    reply = await gateway.post("/v1/pay", json=payment("TXN-409-LOST"))
    assert reply.status == 202, await reply.text()
    assert (await reply.json())["status"] == "PENDING"
    assert reply.headers["Location"] == "/v1/payments/TXN-409-LOST"
    looked_up = await (await gateway.get("/v1/payments/TXN-409-LOST")).json()
    assert (looked_up["state"], looked_up["reason"]) == ("PENDING", "outcome_unknown")


async def test_a_payment_still_pending_after_sync_wait_s_is_202_then_settled_without_a_resend(
    upstream, redis_url
):
    state: UpstreamState = upstream[0]
    yaml = gateway_yaml(upstream[1], redis_url).replace(
        f'CANON: {{url: "{upstream[1]}"}}', f'CANON: {{url: "{upstream[1]}", sync_wait_s: 0.3}}'
    )
    state.pending_polls = 10_000  # the payer does not approve in time
    async with running_gateway(make_config(yaml)) as gateway:
        first = await gateway.post("/v1/pay", json=payment("TXN-SLOW"))
        assert first.status == 202, await first.text()
        assert (await first.json())["status"] == "PENDING"
        (reference,) = state.polls_left
        state.polls_left[reference] = 0  # the payer approves; the reconciler asks
        for _ in range(400):
            found = await (await gateway.get("/v1/payments/TXN-SLOW")).json()
            if found["state"] == "SUCCESS":
                break
            await asyncio.sleep(0.05)
        retry = await gateway.post("/v1/pay", json=payment("TXN-SLOW"))
        assert retry.status == 200, await retry.text()
        assert retry.headers["Idempotent-Replayed"] == "true"
    assert state.references == [reference], "sent once, settled by its status"
    assert len(state.answered) == 1, "one payment at the provider"
