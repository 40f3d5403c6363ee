"""Forwarding to one provider over the wire client: request and answer mapping, errors mapped once.

A small in-process aiohttp provider answers each call as the test tells it: a status and body,
after a delay, or by hanging up without an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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

from proxy.breaker import ProviderBreaker
from proxy.errors import InvalidRequest, ProviderFailed, ProviderRejected, ProviderTimeout
from proxy.metrics import GatewayMetrics
from proxy.payment import REFERENCE_NAMESPACE, Payment
from proxy.upstream import ProviderClient
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
    canon.close()


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


async def test_a_provider_nobody_listens_on_is_a_provider_failure(metrics: GatewayMetrics) -> None:
    yaml = f'providers:\n  CANON: {{url: "http://127.0.0.1:{free_port()}/pay"}}\n'
    nobody = provider_client(yaml, "CANON", metrics)
    with pytest.raises(ProviderFailed, match="cannot reach CANON") as raised:
        await nobody.pay(a_payment(), REFERENCE)
    assert type(raised.value) is ProviderFailed
    assert raised.value.status == 502


async def test_a_provider_that_hangs_up_without_answering_is_a_provider_failure(
    client: ProviderClient, provider: FakeProvider
) -> None:
    provider.answer(Reply(hang_up=True))
    with pytest.raises(ProviderFailed, match="cannot reach CANON: connection closed"):
        await client.pay(a_payment(), REFERENCE)
    assert len(provider.seen) == 1  # a fresh connection is not retried


async def test_no_answer_within_the_timeout_is_a_provider_timeout(
    client: ProviderClient, provider: FakeProvider
) -> None:
    provider.answer(Reply(body={"status": "SUCCESS"}, delay_s=5))
    started = time.perf_counter()
    with pytest.raises(ProviderTimeout) as raised:
        await client.pay(a_payment(), REFERENCE)
    assert TIMEOUT_S <= time.perf_counter() - started < 2
    assert raised.value.status == 504
    assert raised.value.body()["status"] == "TIMEOUT"
    assert raised.value.details["provider"] == "CANON"
    assert raised.value.message == f"CANON did not answer within {TIMEOUT_S:g}s"


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
        # After the timeout closed the kept-alive connection, this hang-up is on a fresh one,
        # so it is not retried (a hang-up on a reused connection would be, by design).
        Reply(hang_up=True),
    )
    for _ in range(5):
        with contextlib.suppress(ProviderFailed, ProviderTimeout):
            await client.pay(a_payment(), REFERENCE)
    assert len(provider.seen) == 5
    assert observed("count") == 5
    assert observed("sum") >= TIMEOUT_S  # the timed-out call is observed at its full wait
