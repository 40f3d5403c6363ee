"""Provider callbacks: payagg's callback URL and token, and each provider's own signature."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from decimal import Decimal
from pathlib import Path

import pytest

import proxy.providers.callbacks as callbacks_module
from mock_providers import airtel
from mock_providers.ledger import Entry, Payment, State
from proxy.observability.metrics import GatewayMetrics
from proxy.payments.request import Payment as ProxyPayment
from proxy.providers.breaker import ProviderBreaker
from proxy.providers.callbacks import (
    CallbackSpec,
    CallbackTarget,
    callback_token,
    static_token,
    token_matches,
)
from proxy.providers.upstream import ProviderClient
from proxy.settings.config import ConfigError, load_config
from tests.conftest import make_config

SECRET = "callback-secret-0123456789"
BODY = b'{"status":"SUCCESSFUL","externalId":"T-1"}'


def hex_hmac(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def airtel_callback(secret: str | None) -> bytes:
    """The Airtel mock's own callback body, signed as the real one is."""
    entry = Entry(
        Payment("ref-1", "1000", "UGX", "order-1"), fate=None, due=0, state=State.SUCCESSFUL
    )
    return airtel.callback_body(entry, secret)


HEADER = CallbackSpec(verify="hmac_header", header="X-Signature", secret=SECRET)
HEADER_B64 = CallbackSpec(
    verify="hmac_header", header="X-Signature", secret=SECRET, encoding="base64"
)
AIRTEL = CallbackSpec(
    verify="hmac_field", field="hash", signed="transaction", secret=SECRET, encoding="base64"
)
TOKEN_HEADER = CallbackSpec(verify="shared_token", header="X-Callback-Token", secret=SECRET)
TOKEN_FIELD = CallbackSpec(verify="shared_token", field="auth.token", secret=SECRET)
NONE = CallbackSpec(verify="none")
B64 = base64.b64encode(hmac.new(SECRET.encode(), BODY, hashlib.sha256).digest()).decode()

AUTH_ROWS = [
    (HEADER, {"X-Signature": hex_hmac(BODY)}, BODY, True),
    (HEADER, {"X-Signature": hex_hmac(BODY).upper()}, BODY, True),
    (HEADER, {"X-Signature": hex_hmac(BODY, "another-secret-0000")}, BODY, False),
    (HEADER, {"X-Signature": hex_hmac(BODY)}, BODY + b" ", False),
    (HEADER, {}, BODY, False),
    (HEADER_B64, {"X-Signature": B64}, BODY, True),
    (HEADER_B64, {"X-Signature": hex_hmac(BODY)}, BODY, False),
    (AIRTEL, {}, airtel_callback(SECRET), True),
    (AIRTEL, {}, airtel_callback("another-secret-0000"), False),
    (AIRTEL, {}, airtel_callback(None), False),
    (AIRTEL, {}, airtel_callback(SECRET).replace(b"TS", b"TF"), False),
    (AIRTEL, {}, b"not json", False),
    (TOKEN_HEADER, {"X-Callback-Token": SECRET}, BODY, True),
    (TOKEN_HEADER, {"X-Callback-Token": SECRET[:-1]}, BODY, False),
    (TOKEN_FIELD, {}, json.dumps({"auth": {"token": SECRET}}).encode(), True),
    (TOKEN_FIELD, {}, json.dumps({"auth": {"token": 12}}).encode(), False),
    (NONE, {}, b"anything", True),
]
AUTH_IDS = [
    "hmac-header-good",
    "hmac-header-upper-case-hex",
    "hmac-header-another-secret",
    "hmac-header-body-changed",
    "hmac-header-missing",
    "hmac-header-base64-good",
    "hmac-header-base64-given-hex",
    "airtel-body-hash-good",
    "airtel-body-hash-another-secret",
    "airtel-body-hash-missing",
    "airtel-body-hash-state-changed",
    "airtel-body-not-json",
    "shared-token-header-good",
    "shared-token-header-wrong",
    "shared-token-body-field-good",
    "shared-token-body-field-not-a-string",
    "none-mtn-signs-nothing",
]


@pytest.mark.parametrize(("spec", "headers", "raw", "accepted"), AUTH_ROWS, ids=AUTH_IDS)
def test_a_callback_is_authenticated_as_its_provider_signs_it(spec, headers, raw, accepted):
    assert spec.authenticate(headers, raw) is accepted


@pytest.mark.parametrize(
    "spec", [HEADER, AIRTEL, TOKEN_HEADER], ids=["hmac-header", "hmac-field", "shared-token"]
)
def test_every_signature_is_compared_in_constant_time(spec, monkeypatch):
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(callbacks_module.hmac, "compare_digest", spy)
    spec.authenticate({"X-Signature": "x", "X-Callback-Token": "x"}, airtel_callback(SECRET))
    assert compared, "hmac.compare_digest decided"


def test_the_callback_token_is_the_hex_hmac_of_provider_nul_reference():
    expected = hmac.new(SECRET.encode(), b"MTN\x00ref-1", hashlib.sha256).hexdigest()
    assert callback_token(SECRET, "MTN", "ref-1") == expected
    assert token_matches(SECRET, "MTN", "ref-1", expected)
    assert not token_matches(SECRET, "MTN", "ref-2", expected)
    assert not token_matches(SECRET, "AIRTEL", "ref-1", expected)


def test_the_callback_url_is_the_public_url_provider_and_token():
    target = CallbackTarget("https://pay.example.com", SECRET)
    token = callback_token(SECRET, "MTN", "ref-1")
    assert target.url_for("MTN", "ref-1") == f"https://pay.example.com/v1/callbacks/MTN/{token}"
    assert SECRET not in repr(target)


def mtn_like(public_url: str) -> ProviderClient:
    server = (
        f'server: {{public_url: "{public_url}", callback_secret: "{SECRET}"}}\n'
        if public_url
        else ""
    )
    text = (
        server
        + """\
providers:
  MTN:
    url: "http://127.0.0.1:9/pay"
    request:
      headers: {X-Reference-Id: "{reference}", X-Callback-Url: "{callback_url}"}
      body: {amount: "{amount}"}
    response:
      pending: [{status: 202}]
    status:
      url: "http://127.0.0.1:9/pay/{reference}"
      success: [{status: 200, field: status, equals: SUCCESSFUL}]
    callback: {verify: none, state: status}
"""
    )
    provider = make_config(text).providers[0]
    return ProviderClient(
        provider, GatewayMetrics(["MTN"]), ProviderBreaker("MTN", provider.settings.breaker)
    )


def test_callback_url_renders_payaggs_url_for_the_payment_in_its_header():
    client = mtn_like("https://pay.example.com/")
    url = client.callback_url("ref-1")
    assert (
        url == f"https://pay.example.com/v1/callbacks/MTN/{callback_token(SECRET, 'MTN', 'ref-1')}"
    )
    fields = client._fields(
        ProxyPayment("T-1", Decimal("20"), "ZAR", "mtn", None, None), "ref-1", url
    )
    assert client.render_headers(fields)["X-Callback-Url"] == url


def test_without_a_public_url_no_callback_url_header_is_sent():
    client = mtn_like("")
    assert client.callback_url("ref-1") is None
    fields = client._fields(
        ProxyPayment("T-1", Decimal("20"), "ZAR", "mtn", None, None), "ref-1", None
    )
    assert "X-Callback-Url" not in client.render_headers(fields)


def test_the_client_authenticates_put_and_post_callbacks_and_reads_their_state():
    client = mtn_like("https://pay.example.com")
    assert client.authenticate_callback("PUT", {}, b'{"status": "SUCCESSFUL"}')
    assert client.authenticate_callback("post", {}, b"{}")
    assert not client.authenticate_callback("GET", {}, b"{}")
    assert client.callback_state(b'{"status": "SUCCESSFUL"}') == "SUCCESSFUL"
    assert client.callback_state(b"not json") is None


def test_a_provider_without_a_callback_key_accepts_no_callback():
    text = 'providers:\n  CANON: {url: "http://127.0.0.1:9/pay"}\n'
    provider = make_config(text).providers[0]
    client = ProviderClient(
        provider, GatewayMetrics(["CANON"]), ProviderBreaker("CANON", provider.settings.breaker)
    )
    assert not client.authenticate_callback("POST", {}, b"{}")


# Providers that call one configured URL (Airtel): `callback.reference` and the static URL -------

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "gateway.yaml"


def static_provider(callback: str, secret: str | None = SECRET) -> str:
    """A provider that calls one configured URL, with `callback` as its YAML `callback:`."""
    keyed = f', callback_secret: "{secret}"' if secret else ""
    return (
        f'server: {{public_url: "https://pay.example.com"{keyed}}}\n'
        + """\
providers:
  AIRTELISH:
    url: "http://127.0.0.1:9/pay"
    status:
      url: "http://127.0.0.1:9/pay/{reference}"
      success: [{status: 200, field: s, equals: TS}]
"""
        + f"    callback: {callback}\n"
    )


def test_the_static_token_is_the_hmac_of_provider_nul_and_no_payments_token():
    expected = hmac.new(SECRET.encode(), b"AIRTEL\x00", hashlib.sha256).hexdigest()
    assert static_token(SECRET, "AIRTEL") == expected
    target = CallbackTarget("https://pay.example.com", SECRET)
    assert (
        target.static_url_for("AIRTEL") == f"https://pay.example.com/v1/callbacks/AIRTEL/{expected}"
    )
    assert target.static_url_for("AIRTEL") != target.url_for("AIRTEL", "ref-1")


@pytest.mark.parametrize(
    ("callback", "problem"),
    [
        (
            "{reference: id, verify: none}",
            "providers.AIRTELISH.callback.reference: a static callback URL authenticates no "
            "payment: it needs the provider's HMAC of the body",
        ),
        (
            "{reference: id, verify: shared_token, header: X-Token, secret: s}",
            "providers.AIRTELISH.callback.reference: a static callback URL authenticates no "
            "payment",
        ),
        (
            "{reference: id, verify: hmac_field, field: hash, signed: transaction, secret: s}",
            "providers.AIRTELISH.callback.reference: must lie inside the signed field "
            "`transaction`",
        ),
        (
            "{reference: transactionid, verify: hmac_field, field: hash, signed: transaction,"
            " secret: s}",
            "providers.AIRTELISH.callback.reference: must lie inside the signed field",
        ),
    ],
    ids=["unsigned", "shared-token", "outside-the-signed-field", "a-prefix-is-not-inside"],
)
def test_a_static_callback_url_without_the_providers_hmac_of_the_reference_is_refused(
    callback, problem
):
    with pytest.raises(ConfigError) as refused:
        make_config(static_provider(callback))
    assert any(problem in line for line in refused.value.problems), refused.value.problems


@pytest.mark.parametrize(
    "callback",
    [
        "{reference: transaction.id, verify: hmac_field, field: hash, signed: transaction,"
        " secret: s}",
        "{reference: data.id, verify: hmac_header, header: X-Signature, secret: s}",
    ],
    ids=["inside-the-signed-field", "whole-body-hmac"],
)
def test_a_static_callback_url_signed_by_the_provider_is_accepted_and_has_its_url(callback):
    (provider,) = make_config(static_provider(callback)).providers
    token = static_token(SECRET, "AIRTELISH")
    assert provider.static_callback_url == f"https://pay.example.com/v1/callbacks/AIRTELISH/{token}"


def test_a_static_callback_url_needs_the_callback_secret_once_public_url_is_set():
    text = static_provider("{reference: d.id, verify: hmac_header, header: X-S, secret: s}", None)
    with pytest.raises(ConfigError) as refused:
        make_config(text)
    assert any(
        "server.callback_secret: is required" in line and "callback.reference" in line
        for line in refused.value.problems
    ), refused.value.problems


def test_the_shipped_airtel_takes_callbacks_on_its_static_url_and_reads_the_reference():
    environment = {"PAYAGG_PUBLIC_URL": "https://pay.example.com", "PAYAGG_CALLBACK_SECRET": SECRET}
    config = load_config(SHIPPED, environment)
    urls = {provider.name: provider.static_callback_url for provider in config.providers}
    token = static_token(SECRET, "AIRTEL")
    assert urls == {"MTN": None, "AIRTEL": f"https://pay.example.com/v1/callbacks/AIRTEL/{token}"}
    (airtel_provider,) = [p for p in config.providers if p.name == "AIRTEL"]
    client = ProviderClient(
        airtel_provider,
        GatewayMetrics(["AIRTEL"]),
        ProviderBreaker("AIRTEL", airtel_provider.settings.breaker),
    )
    # The reference the mock echoes is the {reference} payagg sent as transaction.id.
    assert client.callback_reference(airtel_callback("payagg-dev-callback-secret")) == "ref-1"
    assert client.static_callback_url() == urls["AIRTEL"]
    assert load_config(SHIPPED, {}).providers[1].static_callback_url is None
