"""The mock MTN and Airtel services: formats, faults, dedupe by reference, admin API, log lines."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any, Protocol

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mock_providers import airtel, mtn
from mock_providers.api import ProviderApi
from mock_providers.app import create_app
from mock_providers.faults import FaultConfig

AUTH = {"Authorization": "Bearer test-token"}
AUTH_MESSAGE = "Authorization: a Bearer access token is required"
MISSING = object()

Client = TestClient[web.Request, web.Application]
Json = dict[str, Any]


class Dialect(Protocol):
    """How a test speaks to one mock: a valid request, and a one-word reading of an answer."""

    api: ProviderApi

    def new_reference(self) -> str: ...
    def request(self, reference: str) -> tuple[dict[str, str], Json]: ...
    def classify(self, status: int, body: Json) -> str: ...


class MtnDialect:
    api = mtn.API

    def new_reference(self) -> str:
        return str(uuid.uuid4())

    def request(self, reference: str) -> tuple[dict[str, str], Json]:
        headers = {**AUTH, "X-Reference-Id": reference, "X-Target-Environment": "sandbox"}
        body = {
            "amount": "20.00",
            "currency": "EUR",
            "externalId": "order-1",
            "payer": {"partyIdType": "MSISDN", "partyId": "46733123450"},
            "payerMessage": "Order 1",
            "payeeNote": "Thank you",
        }
        return headers, body

    def classify(self, status: int, body: Json) -> str:
        if status == 202:
            return "success" if body["status"] == "SUCCESSFUL" else f"decline:{body['reason']}"
        assert status == 500, (status, body)
        if body["code"] == "INTERNAL_PROCESSING_ERROR":
            return "failure"
        return f"decline:{body['code']}"


class AirtelDialect:
    api = airtel.API

    def new_reference(self) -> str:
        return f"tx-{uuid.uuid4().hex[:16]}"

    def request(self, reference: str) -> tuple[dict[str, str], Json]:
        headers = {**AUTH, "X-Country": "UG", "X-Currency": "UGX"}
        body = {
            "reference": "order-1",
            "subscriber": {"country": "UG", "currency": "UGX", "msisdn": "752123456"},
            "transaction": {"amount": 1000, "country": "UG", "currency": "UGX", "id": reference},
        }
        return headers, body

    def classify(self, status: int, body: Json) -> str:
        if status == 500:
            return "failure"
        assert status == 200, (status, body)
        if body["status"]["success"]:
            return "success"
        return f"decline:{body['status']['response_code']}"


MTN, AIRTEL = MtnDialect(), AirtelDialect()
DIALECTS = pytest.mark.parametrize("dialect", [MTN, AIRTEL], ids=["mtn", "airtel"])

StartMock = Callable[..., Awaitable[Client]]


@pytest.fixture
async def start_mock() -> AsyncIterator[StartMock]:
    """Start mock apps in-process (TestServer) with the given faults; all stopped afterwards."""
    async with AsyncExitStack() as stack:

        async def start(dialect: Dialect, seed: int = 1, **faults: Any) -> Client:
            app = create_app(dialect.api, FaultConfig(**faults), seed)
            return await stack.enter_async_context(TestClient(TestServer(app)))

        yield start


async def pay(
    client: Client, dialect: Dialect, reference: str, timeout_s: float | None = None
) -> tuple[int, Json]:
    headers, body = dialect.request(reference)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with client.post(
        dialect.api.payment_path, json=body, headers=headers, timeout=timeout
    ) as answer:
        return answer.status, await answer.json()


async def get_json(client: Client, path: str, **kwargs: Any) -> tuple[int, Json]:
    async with client.get(path, **kwargs) as answer:
        return answer.status, await answer.json()


async def put_config(client: Client, changes: object) -> tuple[int, Json]:
    async with client.put("/__mock/config", json=changes) as answer:
        return answer.status, await answer.json()


async def stats(client: Client) -> Json:
    return (await get_json(client, "/__mock/stats"))[1]


async def status_of(client: Client, dialect: Dialect, reference: str) -> tuple[int, Json]:
    path = dialect.api.status_path.format(reference=reference)
    return await get_json(client, path, headers=AUTH)


async def declines_by_reason(client: Client, dialect: Dialect) -> dict[str, tuple[str, int, Json]]:
    """Pay with fresh references until every decline reason has shown up (decline_rate is 1)."""
    found: dict[str, tuple[str, int, Json]] = {}
    for _ in range(60):
        reference = dialect.new_reference()
        status, body = await pay(client, dialect, reference)
        found.setdefault(dialect.classify(status, body), (reference, status, body))
        if len(found) == len(dialect.api.decline_reasons):
            return found
    raise AssertionError(f"not every decline reason showed up: {sorted(found)}")


def mtn_result(reference: str, status: str, reason: str | None, ftid: str | None) -> Json:
    return {
        "referenceId": reference,
        "status": status,
        "reason": reason,
        "financialTransactionId": ftid,
        "amount": "20.00",
        "currency": "EUR",
        "externalId": "order-1",
    }


@DIALECTS
async def test_healthz_answers_ok(start_mock: StartMock, dialect: Dialect) -> None:
    client = await start_mock(dialect)
    assert await get_json(client, "/healthz") == (200, {"status": "ok"})


@DIALECTS
@pytest.mark.parametrize(
    "authorization",
    [None, "Basic dXNlcjpwYXNz", "Bearer ", "Bearer"],
    ids=["absent", "not-bearer", "empty-token", "scheme-only"],
)
async def test_a_payment_without_a_bearer_token_is_refused_with_401(
    start_mock: StartMock, dialect: Dialect, authorization: str | None
) -> None:
    client = await start_mock(dialect)
    headers, body = dialect.request(dialect.new_reference())
    del headers["Authorization"]
    if authorization is not None:
        headers["Authorization"] = authorization
    async with client.post(dialect.api.payment_path, json=body, headers=headers) as answer:
        assert answer.status == 401
        refusal = await answer.json()
    expected = {
        "mtn": {"code": "UNAUTHORIZED", "message": AUTH_MESSAGE},
        "airtel": {
            "status": {
                "code": "401",
                "message": AUTH_MESSAGE,
                "result_code": "ESB000001",
                "success": False,
            }
        },
    }
    assert refusal == expected[dialect.api.name]
    assert await stats(client) == {
        "requests": 1,
        "charges": 0,
        "declines": 0,
        "failures": 0,
        "duplicates": 0,
    }


@DIALECTS
async def test_the_status_lookup_also_needs_a_bearer_token(
    start_mock: StartMock, dialect: Dialect
) -> None:
    client = await start_mock(dialect)
    path = dialect.api.status_path.format(reference=dialect.new_reference())
    status, _ = await get_json(client, path)
    assert status == 401


def patched(document: Json, path: str, value: object) -> Json:
    """A deep copy of `document` with the dotted `path` set to `value` (MISSING deletes it)."""
    copy: Json = json.loads(json.dumps(document))
    *parents, last = path.split(".")
    target = copy
    for step in parents:
        target = target[step]
    if value is MISSING:
        del target[last]
    else:
        target[last] = value
    return copy


async def send_malformed(
    client: Client, dialect: Dialect, where: str, key: str, value: object
) -> tuple[int, Json]:
    headers, body = dialect.request(dialect.new_reference())
    data: bytes
    if where == "header":
        headers = patched(headers, key, value)
        data = json.dumps(body).encode()
    elif where == "body":
        data = json.dumps(patched(body, key, value)).encode()
    else:
        assert isinstance(value, bytes)
        data = value
    async with client.post(dialect.api.payment_path, data=data, headers=headers) as answer:
        return answer.status, await answer.json()


MTN_MALFORMED = [
    ("header", "X-Reference-Id", MISSING, "X-Reference-Id"),
    ("header", "X-Reference-Id", "order-1", "X-Reference-Id"),
    ("header", "X-Target-Environment", MISSING, "X-Target-Environment"),
    ("raw", "", b"{not json", "body"),
    ("raw", "", b"[]", "body"),
    ("body", "amount", 20.0, "amount"),
    ("body", "amount", "0.00", "amount"),
    ("body", "amount", "-5", "amount"),
    ("body", "amount", "twenty", "amount"),
    ("body", "amount", MISSING, "amount"),
    ("body", "currency", "eur", "currency"),
    ("body", "externalId", MISSING, "externalId"),
    ("body", "payer", MISSING, "payer.partyIdType"),
    ("body", "payer", "46733123450", "payer.partyIdType"),
    ("body", "payer.partyIdType", "PHONE", "payer.partyIdType"),
    ("body", "payer.partyId", MISSING, "payer.partyId"),
    ("body", "payer.partyId", "", "payer.partyId"),
    ("body", "payeeNote", 5, "payeeNote"),
    # Patterns match the whole value, and a digit is 0-9: Decimal() would read Arabic-Indic ones.
    ("body", "amount", "20.00\n", "amount"),
    ("body", "amount", "\u0662\u0660.00", "amount"),
    ("body", "currency", "EUR\n", "currency"),
]
MTN_MALFORMED_IDS = [
    "no-reference-id",
    "reference-id-not-a-uuid",
    "no-target-environment",
    "body-not-json",
    "body-not-an-object",
    "amount-a-number",
    "amount-zero",
    "amount-negative",
    "amount-not-decimal",
    "amount-missing",
    "currency-lower-case",
    "external-id-missing",
    "payer-missing",
    "payer-not-an-object",
    "party-id-type-unknown",
    "party-id-missing",
    "party-id-empty",
    "payee-note-not-a-string",
    "amount-trailing-newline",
    "amount-arabic-indic-digits",
    "currency-trailing-newline",
]


@pytest.mark.parametrize(("where", "key", "value", "field"), MTN_MALFORMED, ids=MTN_MALFORMED_IDS)
async def test_mtn_answers_a_malformed_request_with_400_in_mtn_format_naming_the_field(
    start_mock: StartMock, where: str, key: str, value: object, field: str
) -> None:
    client = await start_mock(MTN)
    status, body = await send_malformed(client, MTN, where, key, value)
    assert status == 400
    assert set(body) == {"code", "message"}
    assert body["code"] == "BAD_REQUEST"
    assert body["message"].startswith(f"{field}: ")
    assert (await stats(client))["charges"] == 0


AIRTEL_MALFORMED = [
    ("header", "X-Country", MISSING, "X-Country"),
    ("header", "X-Currency", "shilling", "X-Currency"),
    ("raw", "", b"", "body"),
    ("body", "reference", MISSING, "reference"),
    ("body", "subscriber", MISSING, "subscriber.msisdn"),
    ("body", "subscriber.msisdn", "07-52", "subscriber.msisdn"),
    ("body", "subscriber.msisdn", True, "subscriber.msisdn"),
    ("body", "subscriber.country", "Uganda", "subscriber.country"),
    ("body", "subscriber.currency", MISSING, "subscriber.currency"),
    ("body", "transaction.amount", "1000", "transaction.amount"),
    ("body", "transaction.amount", 0, "transaction.amount"),
    ("body", "transaction.amount", True, "transaction.amount"),
    ("body", "transaction.country", MISSING, "transaction.country"),
    ("body", "transaction.currency", "ugx", "transaction.currency"),
    ("body", "transaction.id", MISSING, "transaction.id"),
    ("body", "transaction.id", " ", "transaction.id"),
    ("body", "subscriber.msisdn", "\u0667" * 9, "subscriber.msisdn"),
    ("body", "transaction.currency", "UGX\n", "transaction.currency"),
]
AIRTEL_MALFORMED_IDS = [
    "no-country-header",
    "currency-header-malformed",
    "empty-body",
    "reference-missing",
    "subscriber-missing",
    "msisdn-not-digits",
    "msisdn-a-boolean",
    "subscriber-country-a-name",
    "subscriber-currency-missing",
    "amount-a-string",
    "amount-zero",
    "amount-a-boolean",
    "transaction-country-missing",
    "transaction-currency-lower-case",
    "transaction-id-missing",
    "transaction-id-blank",
    "msisdn-arabic-indic-digits",
    "transaction-currency-trailing-newline",
]


@pytest.mark.parametrize(
    ("where", "key", "value", "field"), AIRTEL_MALFORMED, ids=AIRTEL_MALFORMED_IDS
)
async def test_airtel_answers_a_malformed_request_with_400_in_airtel_format_naming_the_field(
    start_mock: StartMock, where: str, key: str, value: object, field: str
) -> None:
    client = await start_mock(AIRTEL)
    status, body = await send_malformed(client, AIRTEL, where, key, value)
    assert status == 400
    assert set(body) == {"status"}
    assert body["status"]["message"].startswith(f"{field}: ")
    assert body["status"] == {
        "code": "400",
        "message": body["status"]["message"],
        "result_code": "ESB000008",
        "success": False,
    }


async def test_airtel_accepts_the_msisdn_as_a_number_as_its_own_examples_send_it(
    start_mock: StartMock,
) -> None:
    client = await start_mock(AIRTEL)
    headers, body = AIRTEL.request(AIRTEL.new_reference())
    body["subscriber"]["msisdn"] = 752123456
    async with client.post(airtel.API.payment_path, json=body, headers=headers) as answer:
        assert answer.status == 200


async def test_mtn_accepts_a_payment_with_202_and_the_final_result_in_the_body(
    start_mock: StartMock,
) -> None:
    client = await start_mock(MTN)
    reference = MTN.new_reference()
    status, body = await pay(client, MTN, reference)
    assert status == 202
    ftid = body["financialTransactionId"]
    assert isinstance(ftid, str)
    assert ftid.isdigit()
    assert body == mtn_result(reference, "SUCCESSFUL", None, ftid)
    assert await status_of(client, MTN, reference) == (200, body)


async def test_airtel_accepts_a_payment_with_200_ts_and_an_airtel_money_id(
    start_mock: StartMock,
) -> None:
    client = await start_mock(AIRTEL)
    reference = AIRTEL.new_reference()
    status, body = await pay(client, AIRTEL, reference)
    assert status == 200
    money_id = body["data"]["transaction"]["airtel_money_id"]
    assert money_id.startswith("MP")
    assert body == {
        "data": {"transaction": {"id": reference, "status": "TS", "airtel_money_id": money_id}},
        "status": {
            "code": "200",
            "message": "SUCCESS",
            "result_code": "ESB000010",
            "response_code": "DP00800001001",
            "success": True,
        },
    }
    assert await status_of(client, AIRTEL, reference) == (200, body)


async def test_mtn_declines_as_failed_resources_except_not_enough_funds_which_is_a_500(
    start_mock: StartMock,
) -> None:
    client = await start_mock(MTN, decline_rate=1.0)
    declines = await declines_by_reason(client, MTN)
    for reason in ("PAYER_NOT_FOUND", "PAYEE_NOT_ALLOWED_TO_RECEIVE", "APPROVAL_REJECTED"):
        reference, status, body = declines[f"decline:{reason}"]
        assert (status, body) == (202, mtn_result(reference, "FAILED", reason, None))
    reference, status, body = declines["decline:NOT_ENOUGH_FUNDS"]
    assert (status, body) == (
        500,
        {"code": "NOT_ENOUGH_FUNDS", "message": "The payer does not have enough funds."},
    )
    assert await status_of(client, MTN, reference) == (
        200,
        mtn_result(reference, "FAILED", "NOT_ENOUGH_FUNDS", None),
    )
    counts = await stats(client)
    assert counts["declines"] == counts["requests"]
    assert (counts["charges"], counts["failures"]) == (0, 0)


AIRTEL_DECLINE_MESSAGES = {
    "DP00800001007": "User wallet does not have enough money to cover the payable amount.",
    "DP00800001010": "Payee is barred or not registered on Airtel Money platform.",
    "DP00800001002": "Incorrect pin has been entered.",
    "DP00800001008": "The transaction was refused.",
}


async def test_airtel_declines_with_200_tf_success_false_and_airtels_response_code(
    start_mock: StartMock,
) -> None:
    client = await start_mock(AIRTEL, decline_rate=1.0)
    declines = await declines_by_reason(client, AIRTEL)
    for code, message in AIRTEL_DECLINE_MESSAGES.items():
        reference, status, body = declines[f"decline:{code}"]
        assert status == 200
        assert body == {
            "data": {"transaction": {"id": reference, "status": "TF", "airtel_money_id": None}},
            "status": {
                "code": "200",
                "message": message,
                "result_code": "ESB000011",
                "response_code": code,
                "success": False,
            },
        }
        assert await status_of(client, AIRTEL, reference) == (200, body)
    counts = await stats(client)
    assert (counts["charges"], counts["failures"]) == (0, 0)


FAILURE_BODIES = {
    "mtn": {
        "code": "INTERNAL_PROCESSING_ERROR",
        "message": "An internal error occurred while processing.",
    },
    "airtel": {
        "status": {
            "code": "500",
            "message": "Something went wrong.",
            "result_code": "ESB000001",
            "success": False,
        }
    },
}


@DIALECTS
async def test_a_failure_is_a_500_that_charges_nothing_and_is_not_remembered(
    start_mock: StartMock, dialect: Dialect
) -> None:
    client = await start_mock(dialect, failure_rate=1.0)
    reference = dialect.new_reference()
    assert await pay(client, dialect, reference) == (500, FAILURE_BODIES[dialect.api.name])
    assert (await status_of(client, dialect, reference))[0] == 404
    await put_config(client, {"failure_rate": 0})
    status, body = await pay(client, dialect, reference)
    assert dialect.classify(status, body) == "success"
    assert await stats(client) == {
        "requests": 2,
        "charges": 1,
        "declines": 0,
        "failures": 1,
        "duplicates": 0,
    }


NOT_FOUND_BODIES = {
    "mtn": {"code": "RESOURCE_NOT_FOUND", "message": "Requested resource {} was not found."},
    "airtel": {
        "status": {
            "code": "404",
            "message": "No Transaction Found With Provided Transaction Id {}",
            "result_code": "ESB000045",
            "success": False,
        }
    },
}


@DIALECTS
async def test_the_status_of_an_unknown_reference_is_404_in_the_providers_format(
    start_mock: StartMock, dialect: Dialect
) -> None:
    client = await start_mock(dialect)
    reference = dialect.new_reference()
    expected = json.loads(json.dumps(NOT_FOUND_BODIES[dialect.api.name]).replace("{}", reference))
    assert await status_of(client, dialect, reference) == (404, expected)


@DIALECTS
async def test_a_hung_payment_is_charged_and_its_retry_gets_the_success_without_a_second_charge(
    start_mock: StartMock, dialect: Dialect
) -> None:
    client = await start_mock(dialect, hang_rate=1.0)
    reference = dialect.new_reference()
    hung = asyncio.create_task(pay(client, dialect, reference, timeout_s=1.0))
    # The server keeps answering other requests while one hangs; the hung one is charged.
    while (await stats(client))["charges"] == 0:
        assert not hung.done(), "the hung request ended before it was charged"
    with pytest.raises(asyncio.TimeoutError):
        await hung
    status, body = await pay(client, dialect, reference)
    assert dialect.classify(status, body) == "success"
    assert await stats(client) == {
        "requests": 2,
        "charges": 1,
        "declines": 0,
        "failures": 0,
        "duplicates": 1,
    }


@DIALECTS
async def test_a_repeated_reference_gets_the_first_answer_and_is_never_charged_twice(
    start_mock: StartMock, dialect: Dialect
) -> None:
    client = await start_mock(dialect)
    reference = dialect.new_reference()
    first = await pay(client, dialect, reference)
    # Faults dialled in later do not touch a reference that already has its answer.
    await put_config(client, {"failure_rate": 0.5, "decline_rate": 0.5})
    assert await pay(client, dialect, reference) == first
    assert await pay(client, dialect, reference) == first
    assert await stats(client) == {
        "requests": 3,
        "charges": 1,
        "declines": 0,
        "failures": 0,
        "duplicates": 2,
    }


@DIALECTS
async def test_a_repeated_declined_reference_is_declined_again_without_counting_a_new_decline(
    start_mock: StartMock, dialect: Dialect
) -> None:
    client = await start_mock(dialect, decline_rate=1.0)
    reference = dialect.new_reference()
    first = await pay(client, dialect, reference)
    await put_config(client, {"decline_rate": 0})
    assert await pay(client, dialect, reference) == first
    assert await stats(client) == {
        "requests": 2,
        "charges": 0,
        "declines": 1,
        "failures": 0,
        "duplicates": 1,
    }


async def outcomes(client: Client, dialect: Dialect, count: int) -> list[str]:
    return [
        dialect.classify(*await pay(client, dialect, dialect.new_reference())) for _ in range(count)
    ]


@DIALECTS
async def test_two_mocks_with_the_same_seed_give_the_same_outcome_sequence(
    start_mock: StartMock, dialect: Dialect
) -> None:
    faults = {"failure_rate": 0.3, "decline_rate": 0.3, "latency_ms": (0, 2)}
    first = await start_mock(dialect, seed=2024, **faults)
    second = await start_mock(dialect, seed=2024, **faults)
    sequence = await outcomes(first, dialect, 30)
    assert await outcomes(second, dialect, 30) == sequence
    assert {"success", "failure"} < set(sequence)
    assert any(outcome.startswith("decline:") for outcome in sequence)


async def test_latency_is_added_within_the_configured_range(start_mock: StartMock) -> None:
    client = await start_mock(MTN, latency_ms=(60, 80))
    started = time.monotonic()
    status, _ = await pay(client, MTN, MTN.new_reference())
    assert status == 202
    assert time.monotonic() - started >= 0.06


async def test_stats_report_exactly_the_contract_counters(start_mock: StartMock) -> None:
    client = await start_mock(MTN)
    assert await stats(client) == {
        "requests": 0,
        "charges": 0,
        "declines": 0,
        "failures": 0,
        "duplicates": 0,
    }


async def test_the_config_endpoint_applies_a_partial_update_and_answers_the_whole_config(
    start_mock: StartMock,
) -> None:
    client = await start_mock(MTN, failure_rate=0.1)
    assert await put_config(client, {"decline_rate": 0.2, "latency_ms": [5, 10]}) == (
        200,
        {"failure_rate": 0.1, "decline_rate": 0.2, "latency_ms": [5.0, 10.0], "hang_rate": 0.0},
    )
    assert (await put_config(client, {}))[1]["decline_rate"] == 0.2


BAD_CONFIGS = [
    ({"failure_rate": 1.5}, "failure_rate"),
    ({"decline_rate": -0.1}, "decline_rate"),
    ({"hang_rate": "0.5"}, "hang_rate"),
    ({"failure_rate": True}, "failure_rate"),
    ({"latency_ms": [10, 5]}, "latency_ms"),
    ({"latency_ms": [-1, 5]}, "latency_ms"),
    ({"latency_ms": [5]}, "latency_ms"),
    ({"latency_ms": "5,10"}, "latency_ms"),
    ({"timeout_rate": 0.1}, "timeout_rate"),
    (
        {"failure_rate": 0.5, "decline_rate": 0.4, "hang_rate": 0.2},
        "failure_rate+decline_rate+hang_rate",
    ),
    ([0.1], None),
]
BAD_CONFIG_IDS = [
    "rate-above-one",
    "rate-negative",
    "rate-a-string",
    "rate-a-boolean",
    "latency-lo-above-hi",
    "latency-negative",
    "latency-one-bound",
    "latency-a-string",
    "unknown-key",
    "rates-sum-above-one",
    "body-not-an-object",
]


@pytest.mark.parametrize(("changes", "field"), BAD_CONFIGS, ids=BAD_CONFIG_IDS)
async def test_a_bad_config_value_is_a_400_naming_the_field_and_changes_nothing(
    start_mock: StartMock, changes: object, field: str | None
) -> None:
    client = await start_mock(MTN, failure_rate=0.1)
    status, body = await put_config(client, changes)
    assert status == 400
    assert body["error"] == "invalid_config"
    assert body["field"] == field
    assert body["message"]
    assert (await put_config(client, {}))[1]["failure_rate"] == 0.1


async def test_a_config_body_that_is_not_json_is_a_400(start_mock: StartMock) -> None:
    client = await start_mock(MTN)
    async with client.put("/__mock/config", data=b"{") as answer:
        assert answer.status == 400
        assert (await answer.json())["field"] is None


@DIALECTS
async def test_every_request_writes_one_json_log_line(
    start_mock: StartMock, dialect: Dialect, capsys: pytest.CaptureFixture[str]
) -> None:
    client = await start_mock(dialect)
    reference = dialect.new_reference()
    await pay(client, dialect, reference)
    await get_json(client, "/healthz")
    payment, health = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert payment.pop("latency_ms") >= 0
    assert payment == {
        "provider": dialect.api.name,
        "method": "POST",
        "path": dialect.api.payment_path,
        "reference": reference,
        "outcome": "success",
        "status": {"mtn": 202, "airtel": 200}[dialect.api.name],
    }
    assert (health["path"], health["outcome"], health["status"]) == ("/healthz", None, 200)
