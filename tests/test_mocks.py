"""The mock MTN and Airtel services: tokens, asynchronous payments, status, callbacks, faults,
dedupe by reference, admin API, log lines."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
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
from mock_providers.app import MockOptions, create_app
from mock_providers.callbacks import RetrySchedule
from mock_providers.faults import FaultConfig
from mock_providers.tokens import Credentials

SUBSCRIPTION = {"Ocp-Apim-Subscription-Key": "sub-key"}
MISSING = object()
# Polling bound: generous, the machine is loaded; a poll never sleeps on a fixed schedule.
POLL_BOUND_S = 30.0

Client = TestClient[web.Request, web.Application]
Json = dict[str, Any]


class FakeClock:
    """The mock's clock, moved by hand: expiry and approval without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Dialect(Protocol):
    """How a test speaks to one mock: credentials, a valid request, a one-word final reading."""

    api: ProviderApi

    def new_reference(self) -> str: ...
    def token_request(self, client_id: str, secret: str) -> dict[str, Any]: ...
    def auth(self, token: str) -> dict[str, str]: ...
    def request(self, reference: str, token: str) -> tuple[dict[str, str], Json]: ...
    def final(self, body: Json) -> str | None: ...


class MtnDialect:
    api = mtn.API

    def new_reference(self) -> str:
        return str(uuid.uuid4())

    def token_request(self, client_id: str, secret: str) -> dict[str, Any]:
        basic = aiohttp.encode_basic_auth(client_id, secret)
        return {"headers": {**SUBSCRIPTION, "Authorization": basic}}

    def auth(self, token: str) -> dict[str, str]:
        return {**SUBSCRIPTION, "Authorization": f"Bearer {token}"}

    def request(self, reference: str, token: str) -> tuple[dict[str, str], Json]:
        headers = {
            **self.auth(token),
            "X-Reference-Id": reference,
            "X-Target-Environment": "sandbox",
        }
        body = {
            "amount": "20.00",
            "currency": "EUR",
            "externalId": "order-1",
            "payer": {"partyIdType": "MSISDN", "partyId": "46733123450"},
            "payerMessage": "Order 1",
            "payeeNote": "Thank you",
        }
        return headers, body

    def final(self, body: Json) -> str | None:
        if body["status"] == "PENDING":
            return None
        return "success" if body["status"] == "SUCCESSFUL" else f"failed:{body['reason']}"


class AirtelDialect:
    api = airtel.API

    def new_reference(self) -> str:
        return f"tx-{uuid.uuid4().hex[:16]}"

    def token_request(self, client_id: str, secret: str) -> dict[str, Any]:
        grant = {"client_id": client_id, "client_secret": secret}
        return {"json": {**grant, "grant_type": "client_credentials"}}

    def auth(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def request(self, reference: str, token: str) -> tuple[dict[str, str], Json]:
        headers = {**self.auth(token), "X-Country": "UG", "X-Currency": "UGX"}
        body = {
            "reference": "order-1",
            "subscriber": {"country": "UG", "currency": "UGX", "msisdn": "752123456"},
            "transaction": {"amount": 1000, "country": "UG", "currency": "UGX", "id": reference},
        }
        return headers, body

    def final(self, body: Json) -> str | None:
        status = body["data"]["transaction"]["status"]
        if status == "TIP":
            return None
        return "success" if status == "TS" else f"failed:{body['status']['response_code']}"


MTN, AIRTEL = MtnDialect(), AirtelDialect()
DIALECTS = pytest.mark.parametrize("dialect", [MTN, AIRTEL], ids=["mtn", "airtel"])

StartMock = Callable[..., Awaitable[Client]]


@pytest.fixture
async def start_mock() -> AsyncIterator[StartMock]:
    """Start mock apps in-process (TestServer, real sockets); all stopped afterwards."""
    async with AsyncExitStack() as stack:

        async def start(
            dialect: Dialect,
            seed: int = 1,
            options: MockOptions | None = None,
            clock: Callable[[], float] = time.monotonic,
            **faults: Any,
        ) -> Client:
            app = create_app(dialect.api, FaultConfig(**faults), seed, options, clock)
            return await stack.enter_async_context(TestClient(TestServer(app)))

        yield start


async def token(client: Client, dialect: Dialect, client_id: str = "u", secret: str = "s") -> str:
    async with client.post(
        dialect.api.token_path, **dialect.token_request(client_id, secret)
    ) as answer:
        assert answer.status == 200, await answer.text()
        return str((await answer.json())["access_token"])


async def pay(
    client: Client,
    dialect: Dialect,
    reference: str,
    access_token: str | None = None,
    timeout_s: float | None = None,
) -> tuple[int, Json | None]:
    """POST a payment; the body is None when the answer has none (MTN's 202)."""
    access_token = access_token or await token(client, dialect)
    headers, body = dialect.request(reference, access_token)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with client.post(
        dialect.api.payment_path, json=body, headers=headers, timeout=timeout
    ) as answer:
        raw = await answer.read()
        return answer.status, json.loads(raw) if raw else None


async def get_json(client: Client, path: str, **kwargs: Any) -> tuple[int, Json]:
    async with client.get(path, **kwargs) as answer:
        return answer.status, await answer.json()


async def put_config(client: Client, changes: object) -> tuple[int, Json]:
    async with client.put("/__mock/config", json=changes) as answer:
        return answer.status, await answer.json()


async def stats(client: Client) -> Json:
    return (await get_json(client, "/__mock/stats"))[1]


async def status_of(
    client: Client, dialect: Dialect, reference: str, access_token: str | None = None
) -> tuple[int, Json]:
    access_token = access_token or await token(client, dialect)
    path = dialect.api.status_path.format(reference=reference)
    return await get_json(client, path, headers=dialect.auth(access_token))


async def final_status(client: Client, dialect: Dialect, reference: str) -> Json:
    """Poll the status endpoint until the payment is final (bounded, never a fixed sleep)."""
    access_token = await token(client, dialect)
    deadline = time.monotonic() + POLL_BOUND_S
    while time.monotonic() < deadline:
        status, body = await status_of(client, dialect, reference, access_token)
        assert status == 200, body
        if dialect.final(body) is not None:
            return body
        await asyncio.sleep(0)
    raise AssertionError(f"{reference} still pending after {POLL_BOUND_S} s")


def counters(**changed: int) -> Json:
    zero = {
        "requests": 0, "charges": 0, "declines": 0, "failures": 0, "duplicates": 0,
        "pending": 0, "tokens_issued": 0, "unauthorized": 0, "callbacks_sent": 0,
        "callbacks_failed": 0,
    }
    return {**zero, **changed}


ACCEPTED = {
    "mtn": (202, None),
    "airtel": (
        200,
        {
            "data": {"transaction": {"id": "{reference}", "status": "SUCCESS"}},
            "status": {
                "code": "200",
                "message": "SUCCESS",
                "result_code": "ESB000010",
                "response_code": "DP00800001006",
                "success": True,
            },
        },
    ),
}


def accepted(dialect: Dialect, reference: str) -> tuple[int, Json | None]:
    status, body = ACCEPTED[dialect.api.name]
    if body is None:
        return status, None
    return status, json.loads(json.dumps(body).replace("{reference}", reference))


def mtn_resource(status: str, **extra: str) -> Json:
    return {
        **({"financialTransactionId": extra.pop("ftid")} if "ftid" in extra else {}),
        "externalId": "order-1",
        "amount": "20.00",
        "currency": "EUR",
        "payer": {"partyIdType": "MSISDN", "partyId": "46733123450"},
        "payerMessage": "Order 1",
        "payeeNote": "Thank you",
        "status": status,
        **extra,
    }


def airtel_enquiry(reference: str, status: str, code: str, message: str, money_id: Any) -> Json:
    success = status != "TF"
    return {
        "data": {
            "transaction": {
                "airtel_money_id": money_id,
                "id": reference,
                "message": message,
                "status": status,
            }
        },
        "status": {
            "code": "200",
            "message": {"TIP": "Transaction in progress", "TS": "SUCCESS"}.get(status, message),
            "result_code": "ESB000010" if success else "ESB000011",
            "response_code": code,
            "success": success,
        },
    }


@DIALECTS
async def test_healthz_answers_ok(start_mock: StartMock, dialect: Dialect) -> None:
    client = await start_mock(dialect)
    assert await get_json(client, "/healthz") == (200, {"status": "ok"})


# --- tokens -----------------------------------------------------------------------------------


async def test_mtn_issues_a_token_for_basic_credentials_and_a_subscription_key(
    start_mock: StartMock,
) -> None:
    client = await start_mock(MTN)
    basic = aiohttp.encode_basic_auth("api-user", "api-key")
    headers = {**SUBSCRIPTION, "Authorization": basic}
    async with client.post("/collection/token/", headers=headers) as answer:
        assert answer.status == 200
        body = await answer.json()
    assert body == {
        "access_token": body["access_token"], "token_type": "access_token", "expires_in": 3600,
    }
    assert len(body["access_token"]) >= 32
    assert await stats(client) == counters(tokens_issued=1)


async def test_airtel_issues_a_token_for_client_credentials_expiring_in_180_s(
    start_mock: StartMock,
) -> None:
    client = await start_mock(AIRTEL)
    grant = {"client_id": "id", "client_secret": "secret", "grant_type": "client_credentials"}
    async with client.post("/auth/oauth2/token", json=grant) as answer:
        assert answer.status == 200
        body = await answer.json()
    assert body == {
        "access_token": body["access_token"], "expires_in": "180", "token_type": "bearer",
    }


CONFIGURED = Credentials("the-user", "the-secret", "sub-key")


@pytest.mark.parametrize(
    ("client_id", "secret"),
    [("the-user", "wrong"), ("someone", "the-secret"), ("", "")],
    ids=["wrong-secret", "wrong-id", "empty"],
)
@DIALECTS
async def test_wrong_credentials_get_the_providers_real_refusal_and_no_token(
    start_mock: StartMock, dialect: Dialect, client_id: str, secret: str
) -> None:
    client = await start_mock(dialect, options=MockOptions(credentials=CONFIGURED))
    async with client.post(
        dialect.api.token_path, **dialect.token_request(client_id, secret)
    ) as answer:
        refusal = (answer.status, await answer.json())
    assert refusal == {
        # Sic: MTN answers bad API user credentials with a 500.
        "mtn": (500, {"error": "login_failed"}),
        "airtel": (
            401,
            {"error": "invalid_client", "error_description": "Client authentication failed"},
        ),
    }[dialect.api.name]
    assert await stats(client) == counters(unauthorized=1)
    assert await token(client, dialect, "the-user", "the-secret")


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, mtn.MISSING_KEY),
        ({"Ocp-Apim-Subscription-Key": "other"}, mtn.INVALID_KEY),
    ],
    ids=["missing", "wrong"],
)
async def test_mtn_refuses_a_missing_or_wrong_subscription_key_with_the_gateways_401(
    start_mock: StartMock, headers: dict[str, str], message: str
) -> None:
    client = await start_mock(MTN, options=MockOptions(credentials=CONFIGURED))
    basic = aiohttp.encode_basic_auth("the-user", "the-secret")
    async with client.post(
        "/collection/token/", headers={**headers, "Authorization": basic}
    ) as answer:
        assert (answer.status, await answer.json()) == (
            401,
            {"statusCode": 401, "message": message},
        )


async def test_airtel_refuses_another_grant_type_with_400(start_mock: StartMock) -> None:
    client = await start_mock(AIRTEL)
    grant = {"client_id": "id", "client_secret": "secret", "grant_type": "password"}
    async with client.post("/auth/oauth2/token", json=grant) as answer:
        assert answer.status == 400
        assert (await answer.json())["error"] == "unsupported_grant_type"


UNAUTHORIZED = {
    "mtn": {"statusCode": 401, "message": mtn.INVALID_TOKEN},
    "airtel": {
        "status": {
            "code": "401",
            "message": "Authorization: a valid Bearer access token is required",
            "result_code": "ESB000001",
            "success": False,
        }
    },
}


@DIALECTS
@pytest.mark.parametrize(
    "authorization",
    [None, "Basic dXNlcjpwYXNz", "Bearer ", "Bearer made-up-token"],
    ids=["absent", "not-bearer", "empty-token", "unknown-token"],
)
async def test_a_payment_without_a_valid_token_is_refused_with_the_providers_401(
    start_mock: StartMock, dialect: Dialect, authorization: str | None
) -> None:
    client = await start_mock(dialect)
    headers, body = dialect.request(dialect.new_reference(), "x")
    del headers["Authorization"]
    if authorization is not None:
        headers["Authorization"] = authorization
    async with client.post(dialect.api.payment_path, json=body, headers=headers) as answer:
        assert (answer.status, await answer.json()) == (401, UNAUTHORIZED[dialect.api.name])
    assert await stats(client) == counters(requests=1, unauthorized=1)


@DIALECTS
async def test_a_token_expires_after_its_ttl_on_the_mocks_clock(
    start_mock: StartMock, dialect: Dialect
) -> None:
    clock = FakeClock()
    client = await start_mock(dialect, options=MockOptions(token_ttl_s=60), clock=clock)
    access_token = await token(client, dialect)
    reference = dialect.new_reference()
    clock.now += 59.9
    assert await pay(client, dialect, reference, access_token) == accepted(dialect, reference)
    clock.now += 0.1
    status, body = await status_of(client, dialect, reference, access_token)
    assert (status, body) == (401, UNAUTHORIZED[dialect.api.name])
    assert (await status_of(client, dialect, reference))[0] == 200  # a fresh token works


@DIALECTS
async def test_the_status_lookup_also_needs_a_valid_token(
    start_mock: StartMock, dialect: Dialect
) -> None:
    client = await start_mock(dialect)
    path = dialect.api.status_path.format(reference=dialect.new_reference())
    status, _ = await get_json(client, path, headers=dialect.auth("made-up"))
    assert status == 401
    assert (await stats(client))["unauthorized"] == 1


# --- validation ---------------------------------------------------------------------------------


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
    headers, body = dialect.request(dialect.new_reference(), await token(client, dialect))
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
    ("body", "payer.partyId", "0733123450", "payer.partyId"),
    ("body", "payer.partyId", "+46733123450", "payer.partyId"),
    ("header", "X-Callback-Url", "callbacks.example", "X-Callback-Url"),
]
MTN_MALFORMED_IDS = [
    "no-reference-id", "reference-id-not-a-uuid", "no-target-environment", "body-not-json",
    "body-not-an-object", "amount-a-number", "amount-zero", "amount-negative",
    "amount-not-decimal", "amount-missing", "currency-lower-case", "external-id-missing",
    "payer-missing", "payer-not-an-object", "party-id-type-unknown", "party-id-missing",
    "party-id-empty", "payee-note-not-a-string", "amount-trailing-newline",
    "amount-arabic-indic-digits", "currency-trailing-newline", "msisdn-national",
    "msisdn-with-plus", "callback-url-not-a-url",
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
    "no-country-header", "currency-header-malformed", "empty-body", "reference-missing",
    "subscriber-missing", "msisdn-not-digits", "msisdn-a-boolean", "subscriber-country-a-name",
    "subscriber-currency-missing", "amount-a-string", "amount-zero", "amount-a-boolean",
    "transaction-country-missing", "transaction-currency-lower-case", "transaction-id-missing",
    "transaction-id-blank", "msisdn-arabic-indic-digits", "transaction-currency-trailing-newline",
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
    headers, body = AIRTEL.request(AIRTEL.new_reference(), await token(client, AIRTEL))
    body["subscriber"]["msisdn"] = 752123456
    async with client.post(airtel.API.payment_path, json=body, headers=headers) as answer:
        assert answer.status == 200


# --- asynchronous payments ----------------------------------------------------------------------


async def test_mtn_accepts_with_an_empty_202_then_reports_pending_then_successful(
    start_mock: StartMock,
) -> None:
    clock = FakeClock()
    client = await start_mock(MTN, clock=clock, approval_ms=(1000, 1000))
    reference = MTN.new_reference()
    assert await pay(client, MTN, reference) == (202, None)
    assert await status_of(client, MTN, reference) == (200, mtn_resource("PENDING"))
    assert await stats(client) == counters(requests=1, pending=1, tokens_issued=2)
    clock.now += 1.0
    status, body = await status_of(client, MTN, reference)
    ftid = body["financialTransactionId"]
    assert ftid.isdigit()
    assert (status, body) == (200, mtn_resource("SUCCESSFUL", ftid=ftid))
    assert await stats(client) == counters(requests=1, charges=1, tokens_issued=3)


async def test_airtel_answers_in_progress_then_tip_then_ts_with_an_airtel_money_id(
    start_mock: StartMock,
) -> None:
    clock = FakeClock()
    client = await start_mock(AIRTEL, clock=clock, approval_ms=(1000, 1000))
    reference = AIRTEL.new_reference()
    assert await pay(client, AIRTEL, reference) == accepted(AIRTEL, reference)
    assert await status_of(client, AIRTEL, reference) == (
        200,
        airtel_enquiry(reference, "TIP", "DP00800001006", "In process", None),
    )
    clock.now += 1.0
    status, body = await status_of(client, AIRTEL, reference)
    money_id = body["data"]["transaction"]["airtel_money_id"]
    assert money_id.startswith("MP")
    message = f"Paid UGX 1000, Trans ID {money_id}."
    assert (status, body) == (
        200,
        airtel_enquiry(reference, "TS", "DP00800001001", message, money_id),
    )
    assert (await stats(client))["charges"] == 1


@DIALECTS
async def test_instant_approval_makes_a_payment_final_before_its_post_is_answered(
    start_mock: StartMock, dialect: Dialect
) -> None:
    client = await start_mock(dialect)  # approval_ms 0,0, the local default
    reference = dialect.new_reference()
    await pay(client, dialect, reference)
    assert dialect.final((await status_of(client, dialect, reference))[1]) == "success"
    assert (await stats(client))["charges"] == 1


@DIALECTS
async def test_a_real_approval_delay_ends_final_without_anyone_moving_a_clock(
    start_mock: StartMock, dialect: Dialect
) -> None:
    client = await start_mock(dialect, approval_ms=(5, 20))
    reference = dialect.new_reference()
    await pay(client, dialect, reference)
    assert dialect.final(await final_status(client, dialect, reference)) == "success"


MTN_REASONS = ["NOT_ENOUGH_FUNDS", "PAYER_NOT_FOUND", "PAYEE_NOT_ALLOWED_TO_RECEIVE",
               "APPROVAL_REJECTED"]
AIRTEL_CODES = {
    "DP00800001007": "User wallet does not have enough money to cover the payable amount.",
    "DP00800001010": "Payee is barred or not registered on Airtel Money platform.",
    "DP00800001002": "Incorrect pin has been entered.",
    "DP00800001008": "The transaction was refused.",
}


async def finals_by_reason(client: Client, dialect: Dialect, count: int) -> dict[str, Json]:
    """Pay until `count` different final outcomes showed up; the final status of each."""
    found: dict[str, Json] = {}
    access_token = await token(client, dialect)
    for _ in range(60):
        reference = dialect.new_reference()
        await pay(client, dialect, reference, access_token)
        body = (await status_of(client, dialect, reference, access_token))[1]
        found.setdefault(str(dialect.final(body)), body)
        if len(found) == count:
            return found
    raise AssertionError(f"not every reason showed up: {sorted(found)}")


async def test_mtn_declines_arrive_as_failed_resources_with_mtns_reason(
    start_mock: StartMock,
) -> None:
    client = await start_mock(MTN, decline_rate=1.0)
    found = await finals_by_reason(client, MTN, len(MTN_REASONS))
    for reason in MTN_REASONS:
        assert found[f"failed:{reason}"] == mtn_resource("FAILED", reason=reason)
    counts = await stats(client)
    assert counts["declines"] == counts["requests"]
    assert (counts["charges"], counts["failures"], counts["pending"]) == (0, 0, 0)


async def test_airtel_declines_arrive_as_tf_with_airtels_response_code(
    start_mock: StartMock,
) -> None:
    client = await start_mock(AIRTEL, decline_rate=1.0)
    found = await finals_by_reason(client, AIRTEL, len(AIRTEL_CODES))
    for code, message in AIRTEL_CODES.items():
        body = found[f"failed:{code}"]
        reference = body["data"]["transaction"]["id"]
        assert body == airtel_enquiry(reference, "TF", code, message, None)


async def test_mtn_with_sync_declines_refuses_on_the_post_with_a_500_naming_the_reason(
    start_mock: StartMock,
) -> None:
    client = await start_mock(
        MTN, options=MockOptions(sync_declines=True), decline_rate=1.0, approval_ms=(9e6, 9e6)
    )
    reference = MTN.new_reference()
    status, body = await pay(client, MTN, reference)
    assert status == 500
    assert body is not None
    assert body["code"] in MTN_REASONS
    assert body == {"code": body["code"], "message": mtn.DECLINES[body["code"]]}
    # Final at once, whatever the approval delay; the reason is the one the POST named.
    assert await status_of(client, MTN, reference) == (
        200,
        mtn_resource("FAILED", reason=body["code"]),
    )
    assert await stats(client) == counters(requests=1, declines=1, tokens_issued=2)


async def test_airtel_with_sync_declines_answers_the_post_with_the_final_tf(
    start_mock: StartMock,
) -> None:
    client = await start_mock(
        AIRTEL, options=MockOptions(sync_declines=True), decline_rate=1.0, approval_ms=(9e6, 9e6)
    )
    reference = AIRTEL.new_reference()
    status, body = await pay(client, AIRTEL, reference)
    assert status == 200
    assert body is not None
    assert AIRTEL.final(body) == f"failed:{body['status']['response_code']}"
    assert await status_of(client, AIRTEL, reference) == (200, body)


EXPIRED = {
    "mtn": mtn_resource("FAILED", reason="EXPIRED"),
    "airtel": airtel_enquiry("{reference}", "TF", "DP00800001024", "Transaction Timed Out.", None),
}


@DIALECTS
async def test_an_abandoned_payment_expires_after_the_approval_timeout_with_the_expiry_reason(
    start_mock: StartMock, dialect: Dialect
) -> None:
    clock = FakeClock()
    client = await start_mock(
        dialect,
        options=MockOptions(approval_timeout_s=120),
        clock=clock,
        abandon_rate=1.0,
        approval_ms=(10, 10),
    )
    reference = dialect.new_reference()
    await pay(client, dialect, reference)
    clock.now += 119
    assert dialect.final((await status_of(client, dialect, reference))[1]) is None
    clock.now += 1
    expected = json.loads(json.dumps(EXPIRED[dialect.api.name]).replace("{reference}", reference))
    assert await status_of(client, dialect, reference) == (200, expected)
    counts = await stats(client)
    assert (counts["charges"], counts["declines"], counts["pending"]) == (0, 1, 0)


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
async def test_a_failure_is_a_500_that_creates_nothing_and_is_not_remembered(
    start_mock: StartMock, dialect: Dialect
) -> None:
    client = await start_mock(dialect, failure_rate=1.0)
    access_token = await token(client, dialect)
    reference = dialect.new_reference()
    assert await pay(client, dialect, reference, access_token) == (
        500,
        FAILURE_BODIES[dialect.api.name],
    )
    assert (await status_of(client, dialect, reference, access_token))[0] == 404
    await put_config(client, {"failure_rate": 0})
    assert await pay(client, dialect, reference, access_token) == accepted(dialect, reference)
    assert await stats(client) == counters(requests=2, charges=1, failures=1, tokens_issued=1)


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
async def test_the_status_failure_rate_fails_status_queries_but_not_the_payment(
    start_mock: StartMock, dialect: Dialect
) -> None:
    client = await start_mock(dialect, status_failure_rate=1.0)
    reference = dialect.new_reference()
    assert await pay(client, dialect, reference) == accepted(dialect, reference)
    assert await status_of(client, dialect, reference) == (500, FAILURE_BODIES[dialect.api.name])
    await put_config(client, {"status_failure_rate": 0})
    assert dialect.final((await status_of(client, dialect, reference))[1]) == "success"


DUPLICATE = {
    "mtn": (
        409,
        {
            "code": "RESOURCE_ALREADY_EXIST",
            "message": "Duplicated reference id. Creation of resource failed.",
        },
    ),
}


async def duplicate_answer(
    client: Client, dialect: Dialect, reference: str, access_token: str
) -> tuple[int, Any]:
    """What a repeat of `reference` must get: MTN's 409, Airtel's current state of the first."""
    if dialect.api.name == "mtn":
        return DUPLICATE["mtn"]
    return await status_of(client, dialect, reference, access_token)


@DIALECTS
async def test_a_hung_payment_is_created_and_charged_once_and_its_retry_is_a_duplicate(
    start_mock: StartMock, dialect: Dialect
) -> None:
    client = await start_mock(dialect, hang_rate=1.0)
    access_token = await token(client, dialect)
    reference = dialect.new_reference()
    hung = asyncio.create_task(pay(client, dialect, reference, access_token, timeout_s=1.0))
    # The server keeps answering other requests while one hangs; the hung one is charged.
    while (await stats(client))["charges"] == 0:
        assert not hung.done(), "the hung request ended before it was charged"
    with pytest.raises(asyncio.TimeoutError):
        await hung
    expected = await duplicate_answer(client, dialect, reference, access_token)
    assert await pay(client, dialect, reference, access_token) == expected
    assert await stats(client) == counters(requests=2, charges=1, duplicates=1, tokens_issued=1)


@DIALECTS
async def test_a_hung_payment_approved_later_is_charged_once_when_it_turns_successful(
    start_mock: StartMock, dialect: Dialect
) -> None:
    clock = FakeClock()
    client = await start_mock(dialect, clock=clock, hang_rate=1.0, approval_ms=(500, 500))
    reference = dialect.new_reference()
    hung = asyncio.create_task(pay(client, dialect, reference, timeout_s=1.0))
    while (await stats(client))["pending"] == 0:
        assert not hung.done()
    assert (await stats(client))["charges"] == 0
    with pytest.raises(asyncio.TimeoutError):
        await hung
    clock.now += 0.5
    assert dialect.final((await status_of(client, dialect, reference))[1]) == "success"
    await pay(client, dialect, reference)
    counts = await stats(client)
    assert (counts["charges"], counts["pending"], counts["duplicates"]) == (1, 0, 1)


@DIALECTS
async def test_a_repeated_reference_is_never_charged_twice_whatever_the_faults_since(
    start_mock: StartMock, dialect: Dialect
) -> None:
    client = await start_mock(dialect)
    access_token = await token(client, dialect)
    reference = dialect.new_reference()
    assert await pay(client, dialect, reference, access_token) == accepted(dialect, reference)
    await put_config(client, {"failure_rate": 0.5, "decline_rate": 0.5})
    expected = await duplicate_answer(client, dialect, reference, access_token)
    assert await pay(client, dialect, reference, access_token) == expected
    assert await pay(client, dialect, reference, access_token) == expected
    assert await stats(client) == counters(requests=3, charges=1, duplicates=2, tokens_issued=1)


async def test_airtel_answers_a_repeated_pending_transaction_id_with_its_tip_state(
    start_mock: StartMock,
) -> None:
    clock = FakeClock()
    client = await start_mock(AIRTEL, clock=clock, approval_ms=(1000, 1000))
    reference = AIRTEL.new_reference()
    await pay(client, AIRTEL, reference)
    status, body = await pay(client, AIRTEL, reference)
    assert (status, body) == (
        200,
        airtel_enquiry(reference, "TIP", "DP00800001006", "In process", None),
    )


async def outcomes(client: Client, dialect: Dialect, count: int) -> list[str]:
    access_token = await token(client, dialect)
    sequence = []
    for _ in range(count):
        reference = dialect.new_reference()
        status, _ = await pay(client, dialect, reference, access_token)
        if status == 500:
            sequence.append("failure")
        else:
            body = (await status_of(client, dialect, reference, access_token))[1]
            sequence.append(str(dialect.final(body)))
    return sequence


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
    assert any(outcome.startswith("failed:") for outcome in sequence)


@DIALECTS
async def test_the_same_seed_draws_the_same_approval_delays(
    start_mock: StartMock, dialect: Dialect
) -> None:
    finals = []
    for _ in range(2):
        clock = FakeClock()
        client = await start_mock(dialect, seed=99, clock=clock, approval_ms=(0, 1000))
        access_token = await token(client, dialect)
        references = [dialect.new_reference() for _ in range(20)]
        for reference in references:
            await pay(client, dialect, reference, access_token)
        clock.now += 0.5
        statuses = [(await status_of(client, dialect, ref, access_token))[1] for ref in references]
        finals.append([dialect.final(body) is not None for body in statuses])
    assert finals[0] == finals[1]
    assert 0 < sum(finals[0]) < 20  # the delays really spread over the range


async def test_latency_is_added_within_the_configured_range(start_mock: StartMock) -> None:
    client = await start_mock(MTN, latency_ms=(60, 80))
    access_token = await token(client, MTN)
    started = time.monotonic()
    status, _ = await pay(client, MTN, MTN.new_reference(), access_token)
    assert status == 202
    assert time.monotonic() - started >= 0.06


# --- callbacks ----------------------------------------------------------------------------------


class Receiver:
    """A real HTTP server taking callbacks; it answers 500 to the first `failures` attempts."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.attempts = 0
        self.delivered: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue()

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.attempts <= self.failures:
            return web.Response(status=500)
        await self.delivered.put((request.method, request.path, await request.read()))
        return web.Response(status=200)

    async def next(self) -> tuple[str, str, bytes]:
        return await asyncio.wait_for(self.delivered.get(), POLL_BOUND_S)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    hooks = Receiver(failures=2)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hooks.handle)
    async with TestServer(app) as server:
        yield hooks, str(server.make_url("/callbacks/mtn/abc"))


FAST_RETRIES = RetrySchedule(first_s=0.01, max_delay_s=0.02, retries=5)


async def test_mtn_puts_the_final_resource_to_the_requests_x_callback_url_retrying_failures(
    start_mock: StartMock, receiver: tuple[Receiver, str]
) -> None:
    hooks, url = receiver
    client = await start_mock(
        MTN, options=MockOptions(callback_retries=FAST_RETRIES), approval_ms=(10, 20)
    )
    access_token = await token(client, MTN)
    reference = MTN.new_reference()
    headers, body = MTN.request(reference, access_token)
    headers["X-Callback-Url"] = url
    async with client.post(mtn.API.payment_path, json=body, headers=headers) as answer:
        assert answer.status == 202
    method, path, delivered = await hooks.next()
    assert (method, path) == ("PUT", "/callbacks/mtn/abc")
    assert json.loads(delivered) == (await status_of(client, MTN, reference))[1]
    assert json.loads(delivered)["status"] == "SUCCESSFUL"
    assert hooks.attempts == 3
    counts = await stats(client)
    assert (counts["callbacks_sent"], counts["callbacks_failed"]) == (1, 2)


async def test_airtel_posts_its_callback_to_the_configured_url_with_an_hmac_hash(
    start_mock: StartMock, receiver: tuple[Receiver, str]
) -> None:
    hooks, url = receiver
    options = MockOptions(
        callback_url=url, callback_secret="s3cret", callback_retries=FAST_RETRIES
    )
    client = await start_mock(AIRTEL, options=options, decline_rate=1.0, approval_ms=(10, 20))
    reference = AIRTEL.new_reference()
    await pay(client, AIRTEL, reference)
    method, _, delivered = await hooks.next()
    assert method == "POST"
    document = json.loads(delivered)
    assert set(document) == {"transaction", "hash"}
    transaction = document["transaction"]
    code = (await status_of(client, AIRTEL, reference))[1]["status"]["response_code"]
    assert transaction == {
        "id": reference,
        "message": AIRTEL_CODES[code],
        "status_code": "TF",
        "airtel_money_id": None,
    }
    signed = json.dumps(transaction, separators=(",", ":")).encode()
    expected = base64.b64encode(hmac.new(b"s3cret", signed, hashlib.sha256).digest()).decode()
    assert document["hash"] == expected


async def test_an_airtel_callback_without_a_secret_carries_no_hash(
    start_mock: StartMock, receiver: tuple[Receiver, str]
) -> None:
    hooks, url = receiver
    hooks.failures = 0
    options = MockOptions(callback_url=url, callback_retries=FAST_RETRIES)
    client = await start_mock(AIRTEL, options=options)
    await pay(client, AIRTEL, AIRTEL.new_reference())
    _, _, delivered = await hooks.next()
    assert set(json.loads(delivered)) == {"transaction"}
    assert json.loads(delivered)["transaction"]["status_code"] == "TS"


async def test_a_callback_that_never_gets_through_stops_after_the_last_retry(
    start_mock: StartMock, receiver: tuple[Receiver, str]
) -> None:
    hooks, url = receiver
    hooks.failures = 10**6
    retries = RetrySchedule(first_s=0.001, max_delay_s=0.002, retries=3)
    client = await start_mock(MTN, options=MockOptions(callback_url=url, callback_retries=retries))
    await pay(client, MTN, MTN.new_reference())
    deadline = time.monotonic() + POLL_BOUND_S
    while (await stats(client))["callbacks_failed"] < 4:
        assert time.monotonic() < deadline, "the callback was not retried"
        await asyncio.sleep(0.01)
    assert hooks.attempts == 4  # the first attempt and three retries, then no more
    assert (await stats(client))["callbacks_sent"] == 0


# --- admin and logs -----------------------------------------------------------------------------


async def test_stats_report_exactly_the_contract_counters(start_mock: StartMock) -> None:
    client = await start_mock(MTN)
    assert await stats(client) == counters()


async def test_the_config_endpoint_applies_a_partial_update_and_answers_the_whole_config(
    start_mock: StartMock,
) -> None:
    client = await start_mock(MTN, failure_rate=0.1)
    changes = {"decline_rate": 0.2, "latency_ms": [5, 10], "approval_ms": [1, 2]}
    assert await put_config(client, {**changes, "abandon_rate": 0.3}) == (
        200,
        {
            "failure_rate": 0.1,
            "decline_rate": 0.2,
            "latency_ms": [5.0, 10.0],
            "hang_rate": 0.0,
            "approval_ms": [1.0, 2.0],
            "abandon_rate": 0.3,
            "status_failure_rate": 0.0,
        },
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
    ({"approval_ms": [100, 10]}, "approval_ms"),
    ({"abandon_rate": 2}, "abandon_rate"),
    ({"status_failure_rate": -1}, "status_failure_rate"),
]
BAD_CONFIG_IDS = [
    "rate-above-one", "rate-negative", "rate-a-string", "rate-a-boolean", "latency-lo-above-hi",
    "latency-negative", "latency-one-bound", "latency-a-string", "unknown-key",
    "rates-sum-above-one", "body-not-an-object", "approval-lo-above-hi", "abandon-above-one",
    "status-failure-negative",
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
    access_token = await token(client, dialect)
    reference = dialect.new_reference()
    await pay(client, dialect, reference, access_token)
    await get_json(client, "/healthz")
    output = capsys.readouterr().out
    assert ", " not in output  # compact, like the proxy's lines
    issued, payment, health = (json.loads(line) for line in output.splitlines())
    assert (issued["path"], issued["status"]) == (dialect.api.token_path, 200)
    assert payment.pop("latency_ms") >= 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", payment.pop("ts"))
    assert payment == {
        "level": "info",
        "msg": "request",
        "provider": dialect.api.name,
        "method": "POST",
        "path": dialect.api.payment_path,
        "reference": reference,
        "outcome": "success",
        "status": {"mtn": 202, "airtel": 200}[dialect.api.name],
    }
    assert (health["path"], health["outcome"], health["status"]) == ("/healthz", None, 200)
