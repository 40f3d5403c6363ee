"""The served OpenAPI document and the never-a-traceback rule for unexpected errors."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import regress
from aiohttp.test_utils import TestClient
from jsonschema import Draft202012Validator, ValidationError, validators
from openapi_spec_validator import validate

import proxy.payments.flow
from proxy.errors import InvalidRequest
from proxy.payments.request import parse_payment
from proxy.server.openapi import build_document
from tests.conftest import GatewayClient, gateway_yaml, make_config, payment, running_gateway


async def test_the_openapi_document_is_valid_openapi_3_1_and_covers_every_route(gateway):
    answer = await gateway.get("/openapi.json")
    document = await answer.json()
    validate(document)
    assert document["openapi"].startswith("3.1")
    assert set(gateway.gateway.paths()) == set(document["paths"])


async def test_an_unexpected_error_is_a_json_500_with_the_request_id_and_is_logged(
    gateway: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(proxy.payments.flow, "parse_payment", broken)
    with caplog.at_level(logging.ERROR, logger="payagg"):
        answer = await gateway.post("/v1/pay", json=payment(), headers={"X-Request-ID": "rid-42"})
    assert answer.status == 500
    assert answer.headers["X-Request-ID"] == "rid-42"
    body = await answer.json()
    assert body["error"] == "internal_error"
    assert "Traceback" not in json.dumps(body)
    assert "a bug" not in json.dumps(body)
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.fields["request_id"] == "rid-42"  # type: ignore[attr-defined]
    assert record.exc_info is not None


def test_the_document_lists_the_configured_providers_and_stays_valid_openapi():
    document = build_document(["MTN", "AIRTEL", "Airtel_KE-2"])
    validate(document)
    provider_key = document["components"]["schemas"]["PaymentRequest"]["properties"]["ProviderKey"]
    assert provider_key["examples"] == ["MTN", "AIRTEL", "Airtel_KE-2"]
    assert "MTN, AIRTEL, Airtel_KE-2" in provider_key["description"]
    assert build_document(["CANON"]) != document, "each config gets its own document"


def _ecma_pattern(
    validator: Any, pattern: str, instance: object, schema: object
) -> Iterator[ValidationError]:
    """JSON Schema's `pattern` as the specification has it: an ECMA-262 regex (flag u)."""
    if validator.is_type(instance, "string") and regress.Regex(pattern, "u").find(instance) is None:
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


# The same 2020-12 validator (the dialect of OpenAPI 3.1), once with Python's re (jsonschema's
# own `re.search`, where `$` also matches before a final newline) and once with a real ECMA engine.
EcmaValidator = validators.extend(Draft202012Validator, {"pattern": _ecma_pattern})
SECOND_PROVIDER = "Airtel_KE-2"
IDEMPOTENCY_KEY = "Idempotency-Key"
# field -> (values the contract accepts, values it refuses)
CORPUS: dict[str, tuple[list[str], list[str]]] = {
    "TransactionID": (
        ["NL-1", "a", "x" * 64, "A.b_c:d-9"],
        ["NL-1\n", "NL-1\r", "NL-1\x00", "\nNL-1", "NL-1\n\n", "NL 1", "", "x" * 65, "NL\u20131"],
    ),
    "Currency": (
        ["ZAR", "USD"],
        ["ZAR\n", "ZAR\r\n", "zar", "ZA", "ZARR", "Z\nR", "\uff3a\uff21\uff32"],
    ),
    "Payer": (
        ["12345678", "256772123456", "1" * 15],
        ["256772123456\n", "1234567", "1" * 16, "+256772123456", "\u0662" * 9],
    ),
    "ProviderKey": (
        ["CANON", "canon", "CaNoN", SECOND_PROVIDER, SECOND_PROVIDER.upper()],
        ["CANON\n", "CANONX", "ANON", "", "\u212a" + "CANON"[1:], "Airtel_\u212aE-2"],
    ),
    IDEMPOTENCY_KEY: (
        ["k", "k" * 255, "a key ~!@#"],
        ["k\n", "k\r", "k\x00", "", "k" * 256, "caf\u00e9", "k\x7f"],
    ),
}
CORPUS_CASES = [
    pytest.param(field, value, accepted, id=f"{field}-{'good' if accepted else 'bad'}-{value!r}")
    for field, (good, bad) in CORPUS.items()
    for accepted, values in ((True, good), (False, bad))
    for value in values
]


@pytest.fixture
async def two_provider_gateway(upstream, redis_url: str) -> AsyncIterator[GatewayClient]:
    text = gateway_yaml(upstream[1], redis_url).replace(
        "  CANON:", f'  {SECOND_PROVIDER}: {{url: "{upstream[1]}"}}\n  CANON:'
    )
    async with running_gateway(make_config(text)) as client:
        yield client


def _schema_of(document: dict[str, Any], field: str) -> dict[str, Any]:
    if field == IDEMPOTENCY_KEY:
        (parameter,) = [
            p for p in document["paths"]["/v1/pay"]["post"]["parameters"] if p["name"] == field
        ]
        return parameter["schema"]  # type: ignore[no-any-return]
    return document["components"]["schemas"]["PaymentRequest"]["properties"][field]  # type: ignore[no-any-return]


async def _server_accepts(gateway: GatewayClient, field: str, value: str) -> bool:
    if field == IDEMPOTENCY_KEY:
        # An HTTP header cannot carry CR, LF or NUL at all, so the header's rule is asked of the
        # very function the gateway reads every request with.
        try:
            parse_payment(json.dumps(payment()).encode(), value, {"canon", "airtel_ke-2"})
        except InvalidRequest as error:
            return field not in error.details["fields"]
        return True
    body = payment(value if field == "TransactionID" else f"CORPUS-{value.encode().hex()}")
    body[field] = value
    answer = await gateway.post("/v1/pay", json=body)
    return answer.status != 400 or field not in (await answer.json())["fields"]


@pytest.mark.parametrize(("field", "value", "accepted"), CORPUS_CASES)
async def test_the_documents_patterns_accept_and_refuse_exactly_what_the_server_does(
    two_provider_gateway: GatewayClient, field: str, value: str, accepted: bool
):
    document = await (await two_provider_gateway.get("/openapi.json")).json()
    schema = _schema_of(document, field)
    verdicts = {
        "server": await _server_accepts(two_provider_gateway, field, value),
        "document read with Python's re": Draft202012Validator(schema).is_valid(value),
        "document read as ECMA-262": EcmaValidator(schema).is_valid(value),
    }
    assert verdicts == dict.fromkeys(verdicts, accepted)
