"""Every JSON answer payagg builds is written the same way: compact, `application/json`."""

from __future__ import annotations

import json

import pytest

from tests.conftest import GatewayClient, payment


def compact(body: bytes) -> bytes:
    """The same document, key order kept, with no space after `,` or `:`."""
    return json.dumps(json.loads(body), separators=(",", ":"), ensure_ascii=False).encode()


async def test_healthz_is_exactly_the_compact_document(gateway: GatewayClient) -> None:
    answer = await gateway.get("/healthz")
    assert await answer.read() == b'{"status":"ok"}'
    assert answer.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(
    "path",
    ["/healthz", "/readyz", "/v1/providers", "/openapi.json", "/v1/payments/TXN-json", "/nowhere"],
    ids=["healthz", "readyz", "providers", "openapi", "payment-lookup", "an-error"],
)
async def test_each_json_endpoint_answers_compact_json(gateway: GatewayClient, path: str) -> None:
    paid = await gateway.post("/v1/pay", json=payment("TXN-json"))
    assert paid.status == 200
    answer = await gateway.get(path)
    body = await answer.read()
    assert answer.headers["Content-Type"] == "application/json"
    assert body == compact(body)
