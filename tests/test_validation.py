"""POST /v1/pay input checks: a malformed request is a 4xx JSON error that reaches no provider."""

from __future__ import annotations

import json

import pytest

from tests.conftest import payment

JSON = {"Content-Type": "application/json"}


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
    (body(Amount=1e10), JSON, 400, "invalid_request", ["Amount"]),
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
    "amount-above-1e9",
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
