"""The served OpenAPI document and the never-a-traceback rule for unexpected errors."""

from __future__ import annotations

import json
import logging

import pytest
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate

import proxy.pay
from tests.conftest import payment


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

    monkeypatch.setattr(proxy.pay, "parse_payment", broken)
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
