"""Forwarding to one provider (aioresponses stands in for the network): request and answer mapping."""

from __future__ import annotations

import asyncio
import json
import uuid
from decimal import Decimal

from types import SimpleNamespace
from typing import Any

import aiohttp
import aioresponses.core as aioresponses_core
import pytest
from aioresponses import aioresponses

from proxy.breaker import ProviderBreaker
from proxy.errors import InvalidRequest, ProviderFailed, ProviderRejected, ProviderTimeout
from proxy.metrics import GatewayMetrics
from proxy.payment import REFERENCE_NAMESPACE, Payment
from proxy.upstream import ProviderClient
from tests.conftest import make_config

URL = "http://provider.test/pay"
REFERENCE = str(uuid.uuid5(REFERENCE_NAMESPACE, "CANON\x00TXN-1"))


class _Aiohttp314Response(aiohttp.ClientResponse):
    """aioresponses 0.7.9 predates aiohttp 3.14's required `stream_writer` (aioresponses#289)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(*args, **kwargs)


@pytest.fixture(autouse=True)
def _aioresponses_speaks_aiohttp_314(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aioresponses_core, "ClientResponse", _Aiohttp314Response)


def a_payment(key: str = "TXN-1", payer: str | None = None) -> Payment:
    return Payment("TXN-1", Decimal("20.00"), "ZAR", "canon", payer, key)


@pytest.fixture
async def client():
    config = make_config(
        f"""
        providers:
          CANON: {{url: "{URL}", timeout_s: 0.5}}
        """.replace("\n        ", "\n")
    )
    provider = config.providers[0]
    metrics = GatewayMetrics(["CANON"])
    async with aiohttp.ClientSession() as session:
        yield ProviderClient(
            provider, session, metrics, ProviderBreaker("CANON", provider.settings.breaker)
        )


async def test_the_canonical_request_carries_a_uuid5_reference_and_the_payment(client):
    with aioresponses() as mocked:
        mocked.post(URL, payload={"status": "SUCCESS", "provider_reference": "P-1"})
        expected = a_payment(key="KEY-9").provider_reference("CANON")
        answer = await client.pay(a_payment(key="KEY-9"), expected)
        (call,) = mocked.requests[("POST", aiohttp.client.URL(URL))]
    assert expected == str(uuid.uuid5(REFERENCE_NAMESPACE, "CANON\x00KEY-9"))
    assert call.kwargs["headers"]["X-Reference-Id"] == expected
    assert json.loads(call.kwargs["data"]) == {
        "reference": expected, "transaction_id": "TXN-1", "amount": 20,
        "currency": "ZAR", "payer": None,
    }
    assert answer.outcome == "success"
    assert answer.provider_reference == "P-1"


async def test_the_same_key_gives_the_same_reference_and_another_key_another(client):
    assert a_payment("A").provider_reference("CANON") == a_payment("A").provider_reference("CANON")
    assert a_payment("A").provider_reference("CANON") != a_payment("B").provider_reference("CANON")
    assert a_payment("A").provider_reference("CANON") != a_payment("A").provider_reference("MTN")


async def test_a_declined_answer_carries_the_reason(client):
    with aioresponses() as mocked:
        mocked.post(URL, payload={"status": "DECLINED", "reason": "NOT_ENOUGH_FUNDS"})
        answer = await client.pay(a_payment(), REFERENCE)
    assert (answer.outcome, answer.reason) == ("declined", "NOT_ENOUGH_FUNDS")


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (500, {"error": "boom"}, ProviderFailed),
        (503, None, ProviderFailed),
        (200, "<html>not json</html>", ProviderFailed),
        (200, {"status": "WHO_KNOWS"}, ProviderFailed),
        (400, {"error": "bad request"}, ProviderRejected),
        (404, None, ProviderRejected),
    ],
    ids=["500", "503-empty", "unreadable-200", "unknown-status-200", "400", "404"],
)
async def test_answers_that_are_neither_success_nor_decline_are_provider_failures(client, status, body, error):
    with aioresponses() as mocked:
        if isinstance(body, str):
            mocked.post(URL, status=status, body=body)
        else:
            mocked.post(URL, status=status, payload=body)
        with pytest.raises(error) as raised:
            await client.pay(a_payment(), REFERENCE)
    assert raised.value.status == 502
    assert raised.value.details["provider"] == "CANON"


async def test_a_connection_error_is_a_provider_failure(client):
    with aioresponses() as mocked:
        mocked.post(URL, exception=aiohttp.ClientConnectionError("connection refused"))
        with pytest.raises(ProviderFailed, match="connection refused"):
            await client.pay(a_payment(), REFERENCE)


async def test_no_answer_within_the_timeout_is_a_provider_timeout(client):
    with aioresponses() as mocked:
        mocked.post(URL, exception=asyncio.TimeoutError())
        with pytest.raises(ProviderTimeout) as raised:
            await client.pay(a_payment(), REFERENCE)
    assert raised.value.status == 504
    assert raised.value.body()["status"] == "TIMEOUT"


async def test_failures_feed_the_providers_breaker_and_client_errors_do_not(client):
    with aioresponses() as mocked:
        for _ in range(2):
            mocked.post(URL, status=400, payload={})
        for _ in range(2):
            mocked.post(URL, status=500, payload={})
        for _ in range(4):
            with pytest.raises(ProviderFailed):
                await client.pay(a_payment(), REFERENCE)
    counts = client.breaker.window_counts()
    assert (counts.calls, counts.failures) == (4, 2)


async def test_a_payment_without_payer_is_refused_before_any_call_when_the_mapping_needs_one():
    config = make_config(
        f"""
        providers:
          NEEDY:
            url: "{URL}"
            request:
              body: {{msisdn: "{{payer}}", ref: "{{reference}}"}}
            response:
              success: [{{status: 200}}]
        """.replace("\n        ", "\n")
    )
    provider = config.providers[0]
    async with aiohttp.ClientSession() as session:
        needy = ProviderClient(provider, session, GatewayMetrics(["NEEDY"]),
                               ProviderBreaker("NEEDY", provider.settings.breaker))
        with pytest.raises(InvalidRequest) as refused:
            needy.check(a_payment())
        needy.check(a_payment(payer="256700000001"))
    assert refused.value.details["fields"] == {"Payer": "is required by provider NEEDY"}
