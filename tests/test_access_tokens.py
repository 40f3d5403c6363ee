"""Access tokens: fetched once however many payments wait, refreshed ahead of expiry and once on
a 401, never shown; a failing token endpoint is a provider failure that sent no payment."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.errors import PaymentError, ProviderFailed, ProviderNotReached
from proxy.observability.metrics import GatewayMetrics
from proxy.payments.request import Payment
from proxy.providers.access_tokens import AccessTokens, AuthSpec, IssuedToken, read_token
from proxy.providers.breaker import ProviderBreaker
from proxy.providers.classification import of_error
from proxy.providers.upstream import ProviderClient
from tests.conftest import make_config

SECRET_PREFIX = "tok-SECRET-"


@dataclass
class TokenProvider:
    """A provider whose payments need the latest token it issued (OAuth2 client credentials)."""

    url: str = ""
    issued: int = 0
    payments: int = 0
    created: list[str] = field(default_factory=list)
    valid: set[str] = field(default_factory=set)
    token_status: int = 200
    expires_in: object = "3600"
    refuse_every_token: bool = False
    token_bodies: list[dict[str, str]] = field(default_factory=list)
    token_delay_s: float = 0.0
    token_field: str = "access_token"

    def revoke_all(self) -> None:
        self.valid.clear()


KEY = web.AppKey("provider", TokenProvider)


async def _token(request: web.Request) -> web.Response:
    provider = request.app[KEY]
    provider.token_bodies.append(dict(await request.post()))
    if provider.token_delay_s:
        await asyncio.sleep(provider.token_delay_s)
    if provider.token_status != 200:
        return web.json_response({"error": "invalid_client"}, status=provider.token_status)
    provider.issued += 1
    token = f"{SECRET_PREFIX}{provider.issued}"
    if not provider.refuse_every_token:
        provider.valid.add(token)
    return web.json_response({provider.token_field: token, "expires_in": provider.expires_in})


async def _pay(request: web.Request) -> web.Response:
    provider = request.app[KEY]
    provider.payments += 1
    bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
    if bearer not in provider.valid:
        return web.json_response({"error": "invalid token"}, status=401)
    body = await request.json()
    provider.created.append(body["reference"])
    return web.json_response({"status": "SUCCESS", "provider_reference": "P-" + body["reference"]})


@pytest.fixture
async def token_provider() -> AsyncIterator[TokenProvider]:
    provider = TokenProvider()
    app = web.Application()
    app[KEY] = provider
    app.router.add_post("/oauth2/token", _token)
    app.router.add_post("/pay", _pay)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    provider.url = str(server.make_url(""))
    yield provider
    await server.close()


def client_for(provider: TokenProvider, extra: str = "") -> ProviderClient:
    text = f"""\
providers:
  TOK:
    url: "{provider.url}/pay"
    timeout_s: 2
    breaker: {{minimum_calls: 100}}
    auth:
      url: "{provider.url}/oauth2/token"
      basic: {{username: client-1, password: s3cret}}
      body: {{grant_type: client_credentials}}
      {extra}
    request:
      headers: {{Authorization: "Bearer {{token}}"}}
      body: {{reference: "{{reference}}", amount: "{{amount}}"}}
    response:
      success: [{{status: 200, field: status, equals: SUCCESS}}]
      provider_reference: provider_reference
"""
    config = make_config(text).providers[0]
    return ProviderClient(
        config, GatewayMetrics(["TOK"]), ProviderBreaker("TOK", config.settings.breaker)
    )


def a_payment(number: int) -> Payment:
    return Payment(f"TXN-{number}", Decimal("20.00"), "ZAR", "tok", None, None)


async def test_many_payments_with_a_cold_cache_cause_exactly_one_token_request(token_provider):
    token_provider.token_delay_s = 0.05  # every payment arrives while the request is in flight
    client = client_for(token_provider)
    try:
        answers = await asyncio.gather(*(client.pay(a_payment(n), f"ref-{n}") for n in range(20)))
    finally:
        await client.close()
    assert {answer.outcome for answer in answers} == {"success"}
    assert token_provider.issued == 1
    assert token_provider.payments == 20


async def test_the_token_request_is_form_encoded_with_http_basic_as_rfc_6749_expects(
    token_provider,
):
    client = client_for(token_provider)
    try:
        await client.pay(a_payment(1), "ref-1")
    finally:
        await client.close()
    assert token_provider.token_bodies == [{"grant_type": "client_credentials"}]


async def test_a_cached_token_serves_later_payments_without_a_new_request(token_provider):
    client = client_for(token_provider)
    try:
        for n in range(3):
            await client.pay(a_payment(n), f"ref-{n}")
    finally:
        await client.close()
    assert token_provider.issued == 1


async def test_a_401_refreshes_the_token_once_and_the_payment_is_sent_once_more(token_provider):
    client = client_for(token_provider)
    try:
        await client.pay(a_payment(1), "ref-1")
        token_provider.revoke_all()  # the provider dropped the token before its expiry
        answer = await client.pay(a_payment(2), "ref-2")
    finally:
        await client.close()
    assert answer.outcome == "success"
    assert token_provider.issued == 2
    assert token_provider.payments == 3  # ref-1, ref-2 refused (401), ref-2 with the new token
    assert token_provider.created == ["ref-1", "ref-2"], "one payment created per reference"


async def test_concurrent_401s_cause_one_refresh(token_provider):
    client = client_for(token_provider)
    try:
        await client.pay(a_payment(0), "ref-0")
        token_provider.revoke_all()
        token_provider.token_delay_s = 0.05
        await asyncio.gather(*(client.pay(a_payment(n), f"ref-{n}") for n in range(1, 11)))
    finally:
        await client.close()
    assert token_provider.issued == 2


async def test_a_401_to_a_fresh_token_is_a_provider_failure_without_a_third_attempt(
    token_provider, caplog
):
    token_provider.refuse_every_token = True
    client = client_for(token_provider)
    caplog.set_level(logging.DEBUG)
    try:
        with pytest.raises(ProviderFailed) as failed:
            await client.pay(a_payment(1), "ref-1")
    finally:
        await client.close()
    assert type(failed.value) is ProviderFailed
    assert of_error(failed.value).counts_against_breaker
    assert token_provider.issued == 2
    assert token_provider.payments == 2
    assert_no_token_in(failed.value, caplog)


@pytest.mark.parametrize(
    ("status", "token_field"),
    [(401, "access_token"), (500, "access_token"), (200, "token")],
    ids=["401-bad-credentials", "500", "no-access-token-in-the-answer"],
)
async def test_a_failing_token_endpoint_is_not_reached_counted_by_the_breaker_and_sends_no_payment(
    token_provider, status, token_field, caplog
):
    token_provider.token_status = status
    token_provider.token_field = token_field
    client = client_for(token_provider)
    caplog.set_level(logging.DEBUG)
    try:
        with pytest.raises(ProviderNotReached) as failed:
            await client.pay(a_payment(1), "ref-1")
    finally:
        await client.close()
    assert of_error(failed.value).counts_against_breaker
    assert client.breaker.window_counts().failures == 1
    assert token_provider.payments == 0, "no payment was sent"
    assert "no access token from TOK" in failed.value.message
    assert_no_token_in(failed.value, caplog)


@pytest.mark.parametrize(
    ("answer", "lifetime_s"),
    [
        ({"access_token": "t", "expires_in": 3600}, 3600.0),
        ({"access_token": "t", "expires_in": "180"}, 180.0),
        ({"access_token": "t"}, 60.0),
        ({"access_token": "t", "expires_in": "soon"}, 60.0),
        ({"access_token": "t", "expires_in": -5}, 60.0),
    ],
    ids=["number", "string-as-airtel-writes-it", "absent-60s", "unreadable-60s", "negative-60s"],
)
def test_a_tokens_lifetime_is_read_as_a_number_or_a_string(answer, lifetime_s):
    spec = AuthSpec(url="http://127.0.0.1:1/token")
    assert read_token(spec, 200, json.dumps(answer).encode()).lifetime_s == lifetime_s


def test_a_token_never_shows_in_its_repr():
    assert "secret-value" not in repr(IssuedToken("secret-value", 60))
    spec = AuthSpec(url="http://127.0.0.1:1/t", basic={"username": "u", "password": "pw-secret"})
    assert "pw-secret" not in repr(spec.request())


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_token_is_refreshed_ahead_of_its_expiry_by_refresh_before_s_at_most_half_its_life():
    clock = FakeClock()
    fetched: list[float] = []

    async def fetch() -> IssuedToken:
        fetched.append(clock.now)
        return IssuedToken(f"t{len(fetched)}", 100.0)

    tokens = AccessTokens(fetch, refresh_before_s=30, clock=clock)
    assert await tokens.current() == "t1"
    clock.now += 69
    assert await tokens.current() == "t1"
    clock.now += 1  # 30 s before expiry
    assert await tokens.current() == "t2"
    fetched.clear()

    async def short_lived() -> IssuedToken:
        fetched.append(clock.now)
        return IssuedToken("s", 1.0)

    short = AccessTokens(short_lived, refresh_before_s=30, clock=clock)
    await short.current()
    clock.now += 0.4
    await short.current()
    assert len(fetched) == 1, "a 1 s token is used for half its life"
    clock.now += 0.1
    await short.current()
    assert len(fetched) == 2


def assert_no_token_in(error: PaymentError, caplog: pytest.LogCaptureFixture) -> None:
    assert SECRET_PREFIX not in json.dumps(error.body())
    assert SECRET_PREFIX not in str(error)
    assert all(SECRET_PREFIX not in record.getMessage() for record in caplog.records)
    assert all(SECRET_PREFIX not in json.dumps(getattr(r, "fields", {})) for r in caplog.records)
