"""POST /v1/pay input checks: a malformed request is a 4xx JSON error that reaches no provider."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
from aiohttp import web

import proxy.payments.request
from proxy.errors import InvalidRequest
from proxy.payments.request import parse_payment
from tests.conftest import gateway_yaml, make_config, payment, running_gateway

JSON = {"Content-Type": "application/json"}
KNOWN = {str(payment()["ProviderKey"]).lower()}


def body(**changes: object) -> bytes:
    document = payment()
    for key, value in changes.items():
        if value is ...:
            document.pop(key)
        else:
            document[key] = value
    return json.dumps(document).encode()


# (request body, headers, status, error code, the fields the error must name)
CASES = [
    (b"{not json", JSON, 400, "invalid_request", ["body"]),
    (b'{"TransactionID": "\xff\xfe"}', JSON, 400, "invalid_request", ["body"]),
    (b"", JSON, 400, "invalid_request", ["body"]),
    (b"[1, 2]", JSON, 400, "invalid_request", ["body"]),
    (b'"just a string"', JSON, 400, "invalid_request", ["body"]),
    (body(TransactionID=...), JSON, 400, "invalid_request", ["TransactionID"]),
    (body(TransactionID=""), JSON, 400, "invalid_request", ["TransactionID"]),
    (body(TransactionID="x" * 65), JSON, 400, "invalid_request", ["TransactionID"]),
    (body(TransactionID="has space"), JSON, 400, "invalid_request", ["TransactionID"]),
    (body(TransactionID=12345), JSON, 400, "invalid_request", ["TransactionID"]),
    (body(Amount=...), JSON, 400, "invalid_request", ["Amount"]),
    (body(Amount=0), JSON, 400, "invalid_request", ["Amount"]),
    (body(Amount=-5), JSON, 400, "invalid_request", ["Amount"]),
    (body(Amount="20.00"), JSON, 400, "invalid_request", ["Amount"]),
    (body(Amount=20.001), JSON, 400, "invalid_request", ["Amount"]),
    (body(Amount=1e-05), JSON, 400, "invalid_request", ["Amount"]),
    (body(Amount=1000000000.01), JSON, 400, "invalid_request", ["Amount"]),
    (body(Amount=1e10), JSON, 400, "invalid_request", ["Amount"]),
    (body().replace(b"20.0", b"20.000000000000001"), JSON, 400, "invalid_request", ["Amount"]),
    (body().replace(b"20.0", b"12345678901234567890123"), JSON, 400, "invalid_request", ["Amount"]),
    (body().replace(b"20.0", b"2000e-2001"), JSON, 400, "invalid_request", ["Amount"]),
    (body(Amount=True), JSON, 400, "invalid_request", ["Amount"]),
    (body(Amount=None), JSON, 400, "invalid_request", ["Amount"]),
    (body().replace(b"20.0", b"NaN"), JSON, 400, "invalid_request", ["body"]),
    (body().replace(b"20.0", b"Infinity"), JSON, 400, "invalid_request", ["body"]),
    (body(Currency=...), JSON, 400, "invalid_request", ["Currency"]),
    (body(Currency="zar"), JSON, 400, "invalid_request", ["Currency"]),
    (body(Currency="ZARR"), JSON, 400, "invalid_request", ["Currency"]),
    (body(ProviderKey=...), JSON, 400, "invalid_request", ["ProviderKey"]),
    (body(ProviderKey=7), JSON, 400, "invalid_request", ["ProviderKey"]),
    (body(ProviderKey="VODACOM"), JSON, 400, "unknown_provider", ["ProviderKey"]),
    (body(Payer="12ab"), JSON, 400, "invalid_request", ["Payer"]),
    (body(Payer="1234567"), JSON, 400, "invalid_request", ["Payer"]),
    (body(), {**JSON, "Idempotency-Key": "é" * 3}, 400, "invalid_request", ["Idempotency-Key"]),
    (body(), {**JSON, "Idempotency-Key": "k" * 256}, 400, "invalid_request", ["Idempotency-Key"]),
    (
        body(TransactionID=..., Amount=-1, Currency="usd", ProviderKey="NOPE"),
        JSON,
        400,
        "invalid_request",
        ["TransactionID", "Amount", "Currency", "ProviderKey"],
    ),
    (body(), {"Content-Type": "text/plain"}, 415, "unsupported_media_type", []),
    (
        body(),
        {"Content-Type": "application/x-www-form-urlencoded"},
        415,
        "unsupported_media_type",
        [],
    ),
    (body(), {}, 415, "unsupported_media_type", []),
    (b'{"pad": "' + b"x" * 20000 + b'"}', JSON, 413, "payload_too_large", []),
    # Every pattern matches the whole value: `$` alone would let a final newline through.
    (body(TransactionID="NL-1\n"), JSON, 400, "invalid_request", ["TransactionID"]),
    (body(TransactionID="NL-1\r\n"), JSON, 400, "invalid_request", ["TransactionID"]),
    (body(TransactionID="NL-1\x00"), JSON, 400, "invalid_request", ["TransactionID"]),
    (body(Currency="ZAR\n"), JSON, 400, "invalid_request", ["Currency"]),
    (body(Payer="256772123456\n"), JSON, 400, "invalid_request", ["Payer"]),
    (
        body(Payer="\u0662\u0665\u0666\u0667\u0667\u0662\u0661\u0662"),
        JSON,
        400,
        "invalid_request",
        ["Payer"],
    ),
    (body(ProviderKey="CANON\n"), JSON, 400, "unknown_provider", ["ProviderKey"]),
]
IDS = [
    "malformed-json",
    "not-utf-8",
    "empty-body",
    "array-body",
    "string-body",
    "missing-transaction-id",
    "empty-transaction-id",
    "transaction-id-too-long",
    "transaction-id-bad-chars",
    "transaction-id-not-string",
    "missing-amount",
    "zero-amount",
    "negative-amount",
    "amount-as-string",
    "amount-three-decimals",
    "amount-in-exponent-notation-below-a-cent",
    "amount-a-cent-above-1e9",
    "amount-above-1e9",
    "amount-decimals-beyond-a-float",
    "amount-integer-beyond-64-bits",
    "amount-underflows-a-float",
    "amount-boolean",
    "amount-null",
    "amount-nan",
    "amount-infinity",
    "missing-currency",
    "currency-lower-case",
    "currency-four-letters",
    "missing-provider",
    "provider-not-string",
    "unknown-provider",
    "payer-not-digits",
    "payer-too-short",
    "idempotency-key-not-ascii",
    "idempotency-key-too-long",
    "every-field-at-once",
    "text-plain",
    "form-encoded",
    "no-content-type",
    "body-too-large",
    "transaction-id-trailing-newline",
    "transaction-id-trailing-crlf",
    "transaction-id-trailing-nul",
    "currency-trailing-newline",
    "payer-trailing-newline",
    "payer-arabic-indic-digits",
    "provider-trailing-newline",
]


@pytest.mark.parametrize(("raw", "headers", "status", "code", "fields"), CASES, ids=IDS)
async def test_a_malformed_request_is_a_json_4xx_that_reaches_no_provider(
    gateway, upstream, raw, headers, status, code, fields
):
    answer = await gateway.post(
        "/v1/pay", data=raw, headers=headers, skip_auto_headers={"Content-Type"}
    )
    assert answer.status == status
    assert answer.content_type == "application/json"
    error = await answer.json()
    assert error["error"] == code
    assert error["message"]
    assert sorted(error.get("fields", {})) == sorted(fields)
    assert upstream[0].requests == 0


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_other_methods_on_the_pay_route_get_405_as_json(gateway, upstream, method):
    answer = await gateway.request(method, "/v1/pay")
    assert answer.status == 405
    assert (await answer.json())["error"] == "method_not_allowed"
    assert "POST" in answer.headers["Allow"]


async def test_an_unknown_route_is_a_json_404(gateway):
    answer = await gateway.get("/v1/nothing-here")
    assert answer.status == 404
    assert (await answer.json())["error"] == "not_found"


async def test_the_provider_key_is_matched_case_insensitively_and_answers_carry_its_yaml_name(
    gateway,
):
    answer = await gateway.post("/v1/pay", json=payment(ProviderKey="canon"))
    assert answer.status == 200
    assert (await answer.json())["provider"] == "CANON"


async def test_unknown_fields_are_ignored(gateway):
    answer = await gateway.post("/v1/pay", json=payment(Extra={"nested": True}))
    assert answer.status == 200


async def test_every_answer_carries_a_request_id_echoed_when_given(gateway):
    echoed = await gateway.post("/v1/pay", data=b"{", headers={**JSON, "X-Request-ID": "abc-123"})
    assert echoed.headers["X-Request-ID"] == "abc-123"
    generated = await gateway.get("/healthz")
    assert len(generated.headers["X-Request-ID"]) == 32


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        (b"0.01", "0.01"),
        (b"20", "20"),
        (b"20.10", "20.1"),
        (b"999999999.99", "999999999.99"),
        (b"1e9", "1E+9"),
        (b"1000000000.00", "1000000000"),
        (b"2.5E1", "25"),
        # Sixteen digits and more take the exact Decimal decoder instead of a float.
        (b"0.010000000000000000", "0.01"),
        (b"999999999.9900000", "999999999.99"),
    ],
)
def test_a_valid_amount_is_read_exactly_whatever_its_notation(literal, expected):
    document = body().replace(b"20.0", literal)
    parsed = parse_payment(document, None, KNOWN)
    assert parsed.amount.normalize() == Decimal(expected).normalize()


def test_the_fingerprint_is_the_sha256_of_the_compact_json_array_it_always_was():
    # Stored in Redis with every key: a change would turn retries across a deploy into 422s.
    for document, provider in [
        (body(), "MTN"),
        (body(Payer="27831234567", Amount=1234.5), 'Airtel Money \u00e9"q\\'),
    ]:
        parsed = parse_payment(document, None, KNOWN)
        canonical = json.dumps(
            [
                parsed.transaction_id,
                str(parsed.amount.normalize()),
                parsed.currency,
                provider,
                parsed.payer,
            ],
            separators=(",", ":"),
        )
        assert parsed.fingerprint(provider) == hashlib.sha256(canonical.encode()).hexdigest()


async def _in_pieces(data: bytes, arrived: asyncio.Event) -> AsyncIterator[bytes]:
    """A request body sent chunked, the rest only once the gateway has seen the first piece."""
    yield data[:10]
    await arrived.wait()
    yield data[10:]


@pytest.mark.parametrize(
    ("data", "status"),
    [(body(), 200), (b'{"pad": "' + b"x" * 20000 + b'"}', 413)],
    ids=["valid", "too-large"],
)
async def test_a_body_still_arriving_when_the_handler_starts_is_read_and_limited_the_same(
    gateway, upstream, monkeypatch, data, status
):
    arrived = asyncio.Event()
    real_read = web.BaseRequest.read

    async def read(request: web.BaseRequest) -> bytes:
        arrived.set()  # the handler is reading a body that has not all arrived yet
        return await real_read(request)

    monkeypatch.setattr(web.BaseRequest, "read", read)
    answer = await gateway.post("/v1/pay", data=_in_pieces(data, arrived), headers=JSON)
    assert answer.status == status
    assert arrived.is_set()


async def _post_expecting_continue(gateway, data: bytes, announced: int) -> tuple[bytes, bytes]:
    """POST with `Expect: 100-continue`: the interim answer, then the final one after the body."""
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    try:
        writer.write(
            b"POST /v1/pay HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % announced
        )
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        if first.startswith(b"HTTP/1.1 100"):
            writer.write(data)
            return first, await asyncio.wait_for(reader.read(), timeout=5)
        return first, b""
    finally:
        writer.close()


async def test_a_client_that_expects_100_continue_gets_it_before_sending_its_body(gateway):
    data = body()
    interim, final = await _post_expecting_continue(gateway, data, len(data))
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    assert final.startswith(b"HTTP/1.1 200 OK")


async def test_a_body_announced_too_large_is_refused_without_asking_for_it(gateway):
    interim, _ = await _post_expecting_continue(gateway, b"", 10_000_000)
    assert interim.startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize("key", ["key-1\n", "key-1\r\n", "key-1\x00"], ids=["lf", "crlf", "nul"])
def test_an_idempotency_key_ending_in_a_line_break_or_nul_is_refused(key):
    # An HTTP header cannot carry these, so the rule is checked where every request is read.
    with pytest.raises(InvalidRequest) as refused:
        parse_payment(body(), key, KNOWN)
    assert list(refused.value.details["fields"]) == ["Idempotency-Key"]


async def test_a_value_that_would_break_a_header_is_a_400_before_redis_or_the_provider(
    upstream, redis_url, redis_server, monkeypatch
):
    """Defence in depth: were a payment pattern ever loosened, no header would carry the LF."""
    monkeypatch.setattr(proxy.payments.request, "_CURRENCY", re.compile(r"[A-Z]{3}\n?"))
    currency_in_a_header = (
        f'CANON:\n    url: "{upstream[1]}"\n'
        "    request:\n"
        '      headers: {X-Reference-Id: "{reference}", X-Currency: "{currency}"}\n'
        '      body: {reference: "{reference}", amount: "{amount}", currency: "{currency}"}\n'
    )
    text = gateway_yaml(upstream[1], redis_url).replace(
        f'CANON: {{url: "{upstream[1]}"}}\n', currency_in_a_header
    )
    async with running_gateway(make_config(text)) as gateway:
        answer = await gateway.post("/v1/pay", json=payment(Currency="ZAR\n"))
        assert answer.status == 400
        error = await answer.json()
        assert error["error"] == "invalid_request"
        assert error["fields"] == {
            "Currency": "cannot be sent in the X-Currency header: it contains CR, LF or NUL"
        }
        assert upstream[0].requests == 0
        assert redis_server.client().keys("*") == [], "nothing was claimed"
        assert (await gateway.post("/v1/pay", json=payment(Currency="ZAR"))).status == 200
