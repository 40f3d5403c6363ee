"""The mapping language: templates render a payment, answer rules classify a provider's answer."""

from __future__ import annotations

import json
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

import proxy.providers.mapping as mapping_module
from proxy.providers.mapping import (
    Array,
    Constant,
    Object,
    Part,
    PaymentFields,
    Placeholder,
    ProviderAnswer,
    ProviderMapping,
    RequestSpec,
    ResponseSpec,
    TemplateCompiler,
    Text,
    compile_mapping,
)
from proxy.settings.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "gateway.yaml"
WHERE = ("providers", "TEST")


def fields(**overrides: object) -> PaymentFields:
    values: dict[str, object] = {
        "transaction_id": "TXN-1",
        "amount": Decimal("20.00"),
        "currency": "ZAR",
        "payer": "256772123456",
        "reference": "0b7f5a3e-4c1d-4f5e-9a2b-1c3d5e7f9a0b",
        "idempotency_key": "key-1",
        "provider": "TEST",
        "token": "tok-1",
        "callback_url": "https://payagg.example/v1/callbacks/TEST/abc",
    }
    values.update(overrides)
    return PaymentFields(**values)  # type: ignore[arg-type]


def compiled(body: object = None, headers: dict[str, str] | None = None) -> ProviderMapping:
    """A custom mapping with this body and these headers; the reference is always sent."""
    request = RequestSpec(headers={"X-Reference-Id": "{reference}", **(headers or {})}, body=body)
    mapping, problems = compile_mapping(request, None, has_default_payer=False, path=WHERE)
    assert problems == []
    return mapping


def rendered(body: object, **overrides: object) -> object:
    return json.loads(compiled(body).render_body(fields(**overrides)))


# --- Rendering --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("placeholder", "expected"),
    [
        ("{transaction_id}", "TXN-1"),
        ("{amount}", 20),
        ("{currency}", "ZAR"),
        ("{payer}", "256772123456"),
        ("{reference}", "0b7f5a3e-4c1d-4f5e-9a2b-1c3d5e7f9a0b"),
        ("{idempotency_key}", "key-1"),
        ("{provider}", "TEST"),
        ("{token}", "tok-1"),
        ("{callback_url}", "https://payagg.example/v1/callbacks/TEST/abc"),
    ],
    ids=[
        "transaction_id",
        "amount",
        "currency",
        "payer",
        "reference",
        "idempotency_key",
        "provider",
        "token",
        "callback_url",
    ],
)
def test_each_placeholder_alone_renders_the_payments_value(placeholder, expected):
    assert rendered({"value": placeholder}) == {"value": expected}


def test_every_payment_placeholder_is_covered_by_the_table_above():
    assert (
        sorted(
            [
                "transaction_id",
                "amount",
                "currency",
                "payer",
                "reference",
                "idempotency_key",
                "provider",
                "token",
                "callback_url",
            ]
        )
        == sorted(mapping_module.PAYMENT_PLACEHOLDERS)
    )
    # The provider's own id is known only to status queries.
    assert set(mapping_module.PLACEHOLDERS) - mapping_module.PAYMENT_PLACEHOLDERS == {
        "provider_reference"
    }


@pytest.mark.parametrize(
    ("template", "amount", "expected"),
    [
        ("{amount}", "20.00", 20),
        ("{amount}", "20.50", 20.5),
        ("{amount}", "0.01", 0.01),
        ("{amount}", "1000000000", 1000000000),
        ("{amount:number}", "20.00", 20),
        ("{amount:number}", "20.5", 20.5),
        ("{amount:decimal2}", "20", "20.00"),
        ("{amount:decimal2}", "20.5", "20.50"),
        ("{amount:decimal2}", "0.01", "0.01"),
        ("{amount:minor_units}", "20.00", 2000),
        ("{amount:minor_units}", "20.5", 2050),
        ("{amount:minor_units}", "0.29", 29),
        ("{amount:minor_units}", "1000000000", 100000000000),
        ("Pay {amount} now", "20", "Pay 20.00 now"),
        ("Pay {amount:number} now", "20.5", "Pay 20.50 now"),
        ("{amount:decimal2} {currency}", "20", "20.00 ZAR"),
        ("{amount:minor_units} cents", "20", "2000 cents"),
    ],
    ids=[
        "whole-amount-is-an-int",
        "fractional-amount-is-a-float",
        "one-cent",
        "the-largest-amount",
        "number-whole",
        "number-fractional",
        "decimal2-pads-a-whole-amount",
        "decimal2-pads-one-decimal",
        "decimal2-one-cent",
        "minor-units-whole",
        "minor-units-fractional",
        "minor-units-has-no-float-rounding-error",
        "minor-units-of-the-largest-amount",
        "amount-in-text-reads-as-money",
        "number-in-text-reads-as-money",
        "decimal2-in-text",
        "minor-units-in-text",
    ],
)
def test_each_amount_format_renders_the_documented_json(template, amount, expected):
    value = rendered({"value": template}, amount=Decimal(amount))["value"]  # type: ignore[index]
    assert value == expected
    assert type(value) is type(expected)


def test_a_whole_amount_is_sent_as_a_json_integer_not_a_float():
    assert compiled({"amount": "{amount}"}).render_body(fields()) == b'{"amount":20}'
    body = compiled({"amount": "{amount}"}).render_body(fields(amount=Decimal("20.50")))
    assert body == b'{"amount":20.5}'


def test_a_missing_payer_renders_as_json_null_when_it_is_the_whole_value():
    assert rendered({"payer": "{payer}"}, payer=None) == {"payer": None}


def test_nested_objects_and_lists_are_rendered_at_every_depth():
    body = {
        "payer": {"party": {"id": "{payer}", "type": "MSISDN"}},
        "lines": [{"amount": "{amount:decimal2}"}, ["{currency}", ["{transaction_id}"]]],
        "ids": ["{reference}", "{idempotency_key}"],
    }
    assert rendered(body) == {
        "payer": {"party": {"id": "256772123456", "type": "MSISDN"}},
        "lines": [{"amount": "20.00"}, ["ZAR", ["TXN-1"]]],
        "ids": ["0b7f5a3e-4c1d-4f5e-9a2b-1c3d5e7f9a0b", "key-1"],
    }


@pytest.mark.parametrize(
    "literal",
    ["MSISDN", "", 7, 0, -3, 2.5, True, False, None, [], {}, [1, "a", None], {"k": [True]}],
    ids=[
        "string",
        "empty-string",
        "int",
        "zero",
        "negative-int",
        "float",
        "true",
        "false",
        "null",
        "empty-list",
        "empty-object",
        "list-of-literals",
        "object-of-literals",
    ],
)
def test_literals_of_every_yaml_type_are_sent_as_they_are(literal):
    assert rendered({"value": literal}) == {"value": literal}


def test_literals_written_in_yaml_keep_their_yaml_type():
    config = parse_config(
        textwrap.dedent(
            """\
            providers:
              P:
                url: "http://127.0.0.1:9/pay"
                request:
                  body:
                    id: "{reference}"
                    count: 3
                    rate: 0.5
                    live: false
                    note: null
                    quoted: "3"
                    tags: [a, 1, true]
                response:
                  success: [{status: 200}]
            """
        ),
        "gw.yaml",
        {},
    )
    body = json.loads(config.providers[0].mapping.render_body(fields()))
    assert body == {
        "id": "0b7f5a3e-4c1d-4f5e-9a2b-1c3d5e7f9a0b",
        "count": 3,
        "rate": 0.5,
        "live": False,
        "note": None,
        "quoted": "3",
        "tags": ["a", 1, True],
    }


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{", "{"),
        ("}}", "}"),
        ("{{amount}}", "{amount}"),
        ("{{{amount}}}", "{20.00}"),
        ('{{"id": "{transaction_id}"}}', '{"id": "TXN-1"}'),
        ("a {{literal}} and {currency}", "a {literal} and ZAR"),
    ],
    ids=[
        "open-brace",
        "close-brace",
        "a-braced-name-is-not-a-placeholder",
        "literal-braces-around-a-placeholder",
        "json-looking-text",
        "literal-braces-and-a-placeholder",
    ],
)
def test_doubled_braces_are_literal_braces(template, expected):
    assert rendered({"value": template}) == {"value": expected}


def test_headers_are_always_rendered_as_strings():
    mapping = compiled(
        None,
        headers={
            "X-Amount": "{amount}",
            "X-Minor": "{amount:minor_units}",
            "X-Currency": "{currency}",
            "X-Note": "pay {transaction_id}",
            "X-Fixed": "v1",
        },
    )
    headers = mapping.render_headers(fields(amount=Decimal("20.50")))
    assert headers == {
        "X-Reference-Id": "0b7f5a3e-4c1d-4f5e-9a2b-1c3d5e7f9a0b",
        "X-Amount": "20.5",
        "X-Minor": "2050",
        "X-Currency": "ZAR",
        "X-Note": "pay TXN-1",
        "X-Fixed": "v1",
    }
    assert all(isinstance(value, str) for value in headers.values())


@pytest.mark.parametrize(
    ("headers", "overrides", "expected"),
    [
        ({"X-Currency": "{currency}"}, {"currency": "ZAR\n"}, {"Currency": "X-Currency"}),
        (
            {"X-Note": "pay {transaction_id}"},
            {"transaction_id": "T\r1"},
            {"TransactionID": "X-Note"},
        ),
        ({"X-Msisdn": "{payer}"}, {"payer": "2567\x0012"}, {"Payer": "X-Msisdn"}),
        (
            {"X-Key": "k={idempotency_key}"},
            {"idempotency_key": "k\n"},
            {"Idempotency-Key": "X-Key"},
        ),
        (
            {"X-Pair": "{currency}/{transaction_id}"},
            {"currency": "ZAR", "transaction_id": "T\n"},
            {"TransactionID": "X-Pair"},
        ),
        ({"X-Currency": "{currency}", "X-Fixed": "v1"}, {}, {}),
    ],
    ids=[
        "currency",
        "transaction-id-in-text",
        "payer-nul",
        "idempotency-key",
        "second-of-two",
        "clean",
    ],
)
def test_a_placeholder_value_that_would_break_a_header_names_its_request_field(
    headers, overrides, expected
):
    problems = compiled(None, headers=headers).header_problems(fields(**overrides))
    assert problems == {
        field: f"cannot be sent in the {header} header: it contains CR, LF or NUL"
        for field, header in expected.items()
    }


def test_values_in_the_body_are_json_escaped_and_never_a_header_problem():
    mapping = compiled({"currency": "{currency}", "note": "pay {transaction_id}"})
    unsafe = fields(currency="ZAR\n", transaction_id="T\r\n1")
    assert mapping.header_problems(unsafe) == {}
    assert json.loads(mapping.render_body(unsafe)) == {"currency": "ZAR\n", "note": "pay T\r\n1"}


def test_the_canonical_protocol_sends_the_documented_request():
    mapping, problems = compile_mapping(None, None, has_default_payer=False, path=WHERE)
    assert problems == []
    assert mapping.method == "POST"
    assert mapping.render_headers(fields()) == {
        "X-Reference-Id": "0b7f5a3e-4c1d-4f5e-9a2b-1c3d5e7f9a0b"
    }
    assert json.loads(mapping.render_body(fields(payer=None))) == {
        "reference": "0b7f5a3e-4c1d-4f5e-9a2b-1c3d5e7f9a0b",
        "transaction_id": "TXN-1",
        "amount": 20,
        "currency": "ZAR",
        "payer": None,
    }
    assert mapping.requires_payer is False


@pytest.mark.parametrize(
    ("template", "has_default_payer", "requires_payer"),
    [
        ({"msisdn": "{payer}"}, False, True),
        ({"msisdn": "{payer}"}, True, False),
        ({"note": "from {payer}"}, False, True),
        ({"tx": "{transaction_id}"}, False, False),
    ],
    ids=[
        "names-payer-without-default",
        "names-payer-with-a-default",
        "payer-inside-text",
        "does-not-name-payer",
    ],
)
def test_a_template_naming_payer_requires_one_unless_the_provider_has_a_default(
    template, has_default_payer, requires_payer
):
    request = RequestSpec(headers={"X-Reference-Id": "{reference}"}, body=template)
    mapping, problems = compile_mapping(request, None, has_default_payer, WHERE)
    assert problems == []
    assert mapping.requires_payer is requires_payer


def test_the_shipped_mtn_and_airtel_templates_render_what_each_mock_accepts():
    config = load_config(SHIPPED, environ={})
    mtn, airtel = config.providers
    payment = fields(payer="256772123456", provider="MTN")
    assert mtn.mapping.render_headers(payment) == {
        "Authorization": "Bearer tok-1",
        "Ocp-Apim-Subscription-Key": "payagg-subscription-key",
        "X-Reference-Id": "0b7f5a3e-4c1d-4f5e-9a2b-1c3d5e7f9a0b",
        "X-Target-Environment": "sandbox",
        "X-Callback-Url": "https://payagg.example/v1/callbacks/TEST/abc",
    }
    no_callback = mtn.mapping.render_headers(fields(callback_url=""))
    assert "X-Callback-Url" not in no_callback, "an empty header is not sent"
    assert json.loads(mtn.mapping.render_body(payment)) == {
        "amount": "20.00",
        "currency": "ZAR",
        "externalId": "TXN-1",
        "payer": {"partyIdType": "MSISDN", "partyId": "256772123456"},
        "payerMessage": "Payment TXN-1",
        "payeeNote": "payagg TXN-1",
    }
    assert airtel.mapping.render_headers(payment) == {
        "Authorization": "Bearer tok-1",
        "X-Country": "UG",
        "X-Currency": "ZAR",
    }
    assert json.loads(airtel.mapping.render_body(payment)) == {
        "reference": "TXN-1",
        "subscriber": {"country": "UG", "currency": "ZAR", "msisdn": "256772123456"},
        "transaction": {
            "amount": 20,
            "country": "UG",
            "currency": "ZAR",
            "id": "0b7f5a3e-4c1d-4f5e-9a2b-1c3d5e7f9a0b",
        },
    }
    # The original service sent no Payer: both shipped providers have a default one.
    assert not mtn.mapping.requires_payer
    assert not airtel.mapping.requires_payer


# --- Compiled once ----------------------------------------------------------------------------


def parts(part: Part) -> list[Part]:
    """Every node of a compiled tree."""
    found = [part]
    if isinstance(part, Object):
        for _, child in part.items:
            found += parts(child)
    elif isinstance(part, Array):
        for child in part.items:
            found += parts(child)
    return found


def test_a_template_is_compiled_into_a_tree_of_parts():
    mapping = compiled(
        {"a": "{amount}", "b": "Pay {transaction_id}", "c": ["x", 1], "d": {"e": "{{lit}}"}}
    )
    nodes = parts(mapping.body)
    assert all(isinstance(node, Part) for node in nodes)
    kinds = {type(node) for node in nodes}
    assert kinds == {Object, Array, Placeholder, Text, Constant}
    assert all(isinstance(part, Part) for _, part in mapping.headers)
    # Literal braces are resolved at compile time: nothing is left to parse.
    (literal,) = [n for n in nodes if isinstance(n, Constant) and n.value == "{lit}"]
    assert literal.value == "{lit}"


def test_rendering_never_parses_the_template_again(monkeypatch):
    mapping = compiled({"tx": "{transaction_id}", "note": "Pay {amount} {currency}"})

    def no_parsing(*args: object, **kwargs: object) -> None:
        raise AssertionError("the template was parsed again while rendering")

    monkeypatch.setattr(TemplateCompiler, "compile", no_parsing)
    monkeypatch.setattr(TemplateCompiler, "_compile_string", no_parsing)
    monkeypatch.setattr(mapping_module, "_TOKEN", None)
    first = json.loads(mapping.render_body(fields(transaction_id="A", amount=Decimal("1"))))
    second = json.loads(mapping.render_body(fields(transaction_id="B", currency="UGX")))
    assert first == {"tx": "A", "note": "Pay 1.00 ZAR"}
    assert second == {"tx": "B", "note": "Pay 20.00 UGX"}


# --- Answer classification --------------------------------------------------------------------

MTN_SUCCESS = {
    "referenceId": "0b7f5a3e-4c1d-4f5e-9a2b-1c3d5e7f9a0b",
    "status": "SUCCESSFUL",
    "reason": None,
    "financialTransactionId": "5716401548",
    "amount": "20.00",
    "currency": "EUR",
    "externalId": "order-1001",
}


def mtn_declined(reason: str) -> dict[str, object]:
    return {**MTN_SUCCESS, "status": "FAILED", "reason": reason, "financialTransactionId": None}


AIRTEL_IN_PROGRESS = {
    "data": {"transaction": {"id": "tx-1001", "status": "SUCCESS"}},
    "status": {
        "code": "200",
        "message": "SUCCESS",
        "result_code": "ESB000010",
        "response_code": "DP00800001006",
        "success": True,
    },
}
AIRTEL_SUCCESS = {
    "data": {"transaction": {"id": "tx-1001", "status": "TS", "airtel_money_id": "MP0357661001"}},
    "status": {
        "code": "200",
        "message": "SUCCESS",
        "result_code": "ESB000010",
        "response_code": "DP00800001001",
        "success": True,
    },
}


def airtel_declined(code: str, message: str) -> dict[str, object]:
    return {
        "data": {"transaction": {"id": "tx-1001", "status": "TF", "airtel_money_id": None}},
        "status": {
            "code": "200",
            "message": message,
            "result_code": "ESB000011",
            "response_code": code,
            "success": False,
        },
    }


def airtel_error(status: int, result_code: str, message: str) -> dict[str, object]:
    return {
        "status": {
            "code": str(status),
            "message": message,
            "result_code": result_code,
            "success": False,
        }
    }


def raw(document: object) -> bytes:
    return document if isinstance(document, bytes) else json.dumps(document).encode()


# (provider, HTTP status, answer body, expected ProviderAnswer); the bodies are the mocks' exact
# shapes from mock_providers/README.md.
SHIPPED_ANSWERS = [
    ("MTN", 202, b"", "pending"),
    (
        "MTN",
        500,
        {"code": "NOT_ENOUGH_FUNDS", "message": "The payer does not have enough funds."},
        ProviderAnswer("declined", reason="NOT_ENOUGH_FUNDS"),
    ),
    (
        "MTN",
        500,
        {
            "code": "INTERNAL_PROCESSING_ERROR",
            "message": "An internal error occurred while processing.",
        },
        "failure",
    ),
    ("MTN", 500, b"<html>Internal Server Error</html>", "failure"),
    ("MTN", 502, b"", "failure"),
    ("MTN", 400, {"code": "BAD_REQUEST", "message": "amount: is required"}, "rejected"),
    (
        "MTN",
        401,
        {"code": "UNAUTHORIZED", "message": "Authorization: a Bearer access token is required"},
        "rejected",
    ),
    ("MTN", 200, MTN_SUCCESS, "failure"),
    (
        "MTN",
        409,
        {
            "code": "RESOURCE_ALREADY_EXIST",
            "message": "Duplicated reference id. Creation for resource failed.",
        },
        "already_exists",
    ),
    ("MTN", 409, {"code": "CONFLICT", "message": "something else"}, "rejected"),
    ("MTN", 429, {"code": "TOO_MANY_REQUESTS", "message": "slow down"}, "failure"),
    ("MTN", 408, b"", "failure"),
    ("AIRTEL", 200, AIRTEL_IN_PROGRESS, "pending"),
    ("AIRTEL", 200, AIRTEL_SUCCESS, ProviderAnswer("success", provider_reference="MP0357661001")),
    (
        "AIRTEL",
        200,
        airtel_declined(
            "DP00800001007",
            "User wallet does not have enough money to cover the payable amount.",
        ),
        ProviderAnswer("declined", reason="DP00800001007"),
    ),
    (
        "AIRTEL",
        200,
        airtel_declined(
            "DP00800001010", "Payee is barred or not registered on Airtel Money platform."
        ),
        ProviderAnswer("declined", reason="DP00800001010"),
    ),
    ("AIRTEL", 500, airtel_error(500, "ESB000001", "Something went wrong."), "failure"),
    ("AIRTEL", 500, b"", "failure"),
    ("AIRTEL", 200, b"<html>gateway</html>", "failure"),
    (
        "AIRTEL",
        400,
        airtel_error(400, "ESB000008", "transaction.amount: must be a positive number, got '1000'"),
        "rejected",
    ),
    (
        "AIRTEL",
        401,
        airtel_error(401, "ESB000001", "Authorization: a Bearer access token is required"),
        "rejected",
    ),
    ("AIRTEL", 429, airtel_error(429, "ESB000039", "Too many requests."), "failure"),
    ("AIRTEL", 408, b"", "failure"),
]
SHIPPED_IDS = [
    "mtn-202-empty-is-pending-the-payer-is-asked",
    "mtn-500-not-enough-funds-is-declined-not-a-failure",
    "mtn-500-internal-processing-error-is-failure",
    "mtn-500-unreadable-body-is-failure",
    "mtn-502-empty-body-is-failure",
    "mtn-400-bad-request-is-rejected",
    "mtn-401-unauthorized-is-rejected",
    "mtn-success-body-with-an-unexpected-status-is-failure",
    "mtn-409-resource-already-exist-is-already-exists-never-rejected",
    "mtn-409-with-another-code-is-rejected",
    "mtn-429-is-failure",
    "mtn-408-is-failure",
    "airtel-200-DP00800001006-in-progress-is-pending",
    "airtel-200-DP00800001001-is-success-with-airtel_money_id",
    "airtel-200-success-false-DP00800001007-is-declined",
    "airtel-200-success-false-DP00800001010-is-declined",
    "airtel-500-is-failure",
    "airtel-500-empty-body-is-failure",
    "airtel-200-unreadable-body-is-failure",
    "airtel-400-is-rejected",
    "airtel-401-is-rejected",
    "airtel-429-is-failure",
    "airtel-408-is-failure",
]


@pytest.fixture(scope="module")
def shipped() -> dict[str, ProviderMapping]:
    return {provider.name: provider.mapping for provider in load_config(SHIPPED, {}).providers}


def assert_classified(answer: ProviderAnswer, expected: ProviderAnswer | str) -> None:
    if isinstance(expected, str):
        assert answer.outcome == expected, answer
        if expected not in ("pending", "not_found"):
            assert answer.detail, "a failure or a rejection says what the provider answered"
    else:
        assert (answer.outcome, answer.provider_reference, answer.reason) == (
            expected.outcome,
            expected.provider_reference,
            expected.reason,
        )


@pytest.mark.parametrize(
    ("provider", "status", "body", "expected"), SHIPPED_ANSWERS, ids=SHIPPED_IDS
)
def test_the_shipped_mappings_classify_each_mock_answer(shipped, provider, status, body, expected):
    assert_classified(shipped[provider].classify(status, raw(body)), expected)


CANONICAL_ANSWERS = [
    (200, {"status": "SUCCESS", "provider_reference": "P-1"}, ProviderAnswer("success", "P-1")),
    (201, {"status": "SUCCESS", "provider_reference": 42}, ProviderAnswer("success", "42")),
    (200, {"status": "SUCCESS"}, ProviderAnswer("success", None)),
    (200, {"status": "SUCCESS", "provider_reference": None}, ProviderAnswer("success", None)),
    (
        200,
        {"status": "DECLINED", "reason": "insufficient_funds"},
        ProviderAnswer("declined", reason="insufficient_funds"),
    ),
    (200, {"status": "DECLINED"}, ProviderAnswer("declined", reason="DECLINED")),
    (200, {"status": "DECLINED", "reason": ""}, ProviderAnswer("declined", reason="DECLINED")),
    (200, {"status": "PENDING"}, "pending"),
    (200, {"status": "PROCESSING"}, "failure"),
    (200, [1, 2], "failure"),
    (200, b"", "failure"),
    (200, b"{not json", "failure"),
    (500, {"status": "SUCCESS", "provider_reference": "P-1"}, "failure"),
    (503, b"Service Unavailable", "failure"),
    (302, {"status": "SUCCESS"}, "failure"),
    (400, {"error": "bad"}, "rejected"),
    (404, b"", "rejected"),
    (422, {"status": "DECLINED", "reason": "x"}, "rejected"),
    (409, {"error": "duplicate reference"}, "already_exists"),
    (429, b"", "failure"),
    (408, {"error": "request timeout"}, "failure"),
]
CANONICAL_IDS = [
    "2xx-SUCCESS-with-reference",
    "201-SUCCESS-numeric-reference-as-text",
    "SUCCESS-without-reference",
    "SUCCESS-with-null-reference",
    "DECLINED-with-reason",
    "DECLINED-without-reason-says-DECLINED",
    "DECLINED-with-empty-reason-says-DECLINED",
    "PENDING-is-pending",
    "unknown-status-value-is-failure",
    "not-an-object-is-failure",
    "empty-body-is-failure",
    "unreadable-body-is-failure",
    "5xx-is-failure-whatever-the-body",
    "5xx-text-is-failure",
    "3xx-is-failure",
    "400-is-rejected",
    "404-is-rejected",
    "4xx-DECLINED-body-is-still-rejected",
    "409-is-already-exists",
    "429-is-failure",
    "408-is-failure",
]


@pytest.mark.parametrize(("status", "body", "expected"), CANONICAL_ANSWERS, ids=CANONICAL_IDS)
def test_the_canonical_protocol_classifies_each_answer(status, body, expected):
    mapping, _ = compile_mapping(None, None, has_default_payer=False, path=WHERE)
    assert_classified(mapping.classify(status, raw(body)), expected)


@pytest.mark.parametrize(
    ("rule", "status", "body", "outcome"),
    [
        ({"status": "2xx"}, 299, {}, "success"),
        ({"status": "2xx"}, 300, {}, "failure"),
        ({"status": [200, 201]}, 201, {}, "success"),
        ({"status": ["2xx", 302]}, 302, {}, "success"),
        ({"field": "a.b.0.c", "equals": "x"}, 200, {"a": {"b": [{"c": "x"}]}}, "success"),
        ({"field": "a.b.1", "equals": "x"}, 200, {"a": {"b": ["x"]}}, "failure"),
        ({"field": "ok", "equals": [1, "yes"]}, 200, {"ok": "yes"}, "success"),
        ({"field": "code", "equals": 200}, 200, {"code": "200"}, "success"),
        ({"field": "code", "equals": "200"}, 200, {"code": 200}, "success"),
        ({"field": "ok", "equals": True}, 200, {"ok": True}, "success"),
        ({"field": "ok", "equals": True}, 200, {"ok": "True"}, "failure"),
        ({"field": "ok", "equals": "x"}, 200, {"ok": None}, "failure"),
        ({"status": 200, "field": "ok", "equals": "x"}, 201, {"ok": "x"}, "failure"),
    ],
    ids=[
        "status-class-top",
        "status-class-excludes-next",
        "status-list",
        "status-list-mixed",
        "dotted-path-with-list-index",
        "list-index-out-of-range",
        "equals-list",
        "yaml-int-matches-json-string",
        "yaml-string-matches-json-int",
        "bool-matches-bool",
        "bool-does-not-match-its-python-spelling",
        "null-does-not-match",
        "status-and-field-both-needed",
    ],
)
def test_an_answer_rule_matches_on_status_and_field(rule, status, body, outcome):
    response = ResponseSpec.model_validate({"success": [rule]})
    request = RequestSpec(headers={"X-Reference-Id": "{reference}"})
    mapping, problems = compile_mapping(request, response, False, WHERE)
    assert problems == []
    assert mapping.classify(status, raw(body)).outcome == outcome


def test_the_first_present_reason_wins():
    response = ResponseSpec.model_validate(
        {
            "success": [{"status": 200, "field": "ok", "equals": True}],
            "declined": [{"status": 200, "field": "ok", "equals": False}],
            "reason": ["detail.code", "message"],
        }
    )
    request = RequestSpec(headers={"X-Reference-Id": "{reference}"})
    mapping, _ = compile_mapping(request, response, False, WHERE)
    both = {"ok": False, "detail": {"code": "E1"}, "message": "m"}
    assert mapping.classify(200, raw(both)) == ProviderAnswer("declined", reason="E1")
    assert mapping.classify(200, raw({"ok": False, "message": "m"})) == ProviderAnswer(
        "declined", reason="m"
    )
    assert mapping.classify(200, raw({"ok": False, "detail": {"code": None}, "message": "m"})) == (
        ProviderAnswer("declined", reason="m")
    )
    declined = ProviderAnswer("declined", reason="DECLINED")
    assert mapping.classify(200, raw({"ok": False})) == declined


def test_success_rules_are_tried_before_declined_rules():
    response = ResponseSpec.model_validate(
        {
            "success": [{"status": "2xx"}],
            "declined": [{"status": 200, "field": "s", "equals": "NO"}],
        }
    )
    request = RequestSpec(headers={"X-Reference-Id": "{reference}"})
    mapping, _ = compile_mapping(request, response, False, WHERE)
    assert mapping.classify(200, raw({"s": "NO"})).outcome == "success"


# --- What an answer says about the payment ----------------------------------------------------


def test_the_shipped_mtn_mapping_reads_the_amount_and_currency_its_answers_name(shipped):
    status = load_config(SHIPPED, {}).providers[0].status
    assert status is not None
    success = status.classify(200, raw(MTN_SUCCESS))
    declined = status.classify(200, raw(mtn_declined("PAYER_NOT_FOUND")))
    assert (success.outcome, success.provider_reference) == ("success", "5716401548")
    assert (declined.outcome, declined.reason) == ("declined", "PAYER_NOT_FOUND")
    assert (success.amount, success.currency) == ("20.00", "EUR")
    assert (declined.amount, declined.currency) == ("20.00", "EUR")
    not_enough = shipped["MTN"].classify(500, raw({"code": "NOT_ENOUGH_FUNDS", "message": "m"}))
    assert (not_enough.outcome, not_enough.amount, not_enough.currency) == ("declined", None, None)


def test_the_shipped_airtel_mapping_reads_no_amount_because_airtel_answers_carry_none(shipped):
    success = shipped["AIRTEL"].classify(200, raw(AIRTEL_SUCCESS))
    assert (success.outcome, success.amount, success.currency) == ("success", None, None)


def test_the_canonical_protocol_reads_an_echoed_amount_and_currency():
    mapping, _ = compile_mapping(None, None, has_default_payer=False, path=WHERE)
    echoed = {"status": "SUCCESS", "amount": 20.5, "currency": "UGX"}
    expected = ProviderAnswer("success", amount=20.5, currency="UGX")
    assert mapping.classify(200, raw(echoed)) == expected
    exists = mapping.classify(409, raw({"amount": "7", "currency": "UGX"}))
    assert (exists.outcome, exists.amount, exists.currency) == ("already_exists", "7", "UGX")


# (amount in the answer, currency in the answer, contradicts a request for 20.00 ZAR?)
ECHOES = [
    ("20.00", "ZAR", False),
    ("20", "ZAR", False),
    (20, "ZAR", False),
    (20.0, "ZAR", False),
    ("20.000", "ZAR", False),
    (None, None, False),
    ("20.00", None, False),
    (None, "ZAR", False),
    ("999", "ZAR", True),
    (999, "ZAR", True),
    ("20.01", "ZAR", True),
    (20.001, "ZAR", True),
    ("2000", "ZAR", True),
    ("20.00", "UGX", True),
    ("20.00", "zar", True),
    ("20.00", "ZAR ", True),
    (None, 710, True),
    (" 20.00", "ZAR", True),
    ("20.00\n", "ZAR", True),
    ("2_0", "ZAR", True),
    ("2e1", "ZAR", True),
    ("NaN", "ZAR", True),
    ("-20", "ZAR", True),
    (True, "ZAR", True),
    ({"value": "20.00"}, "ZAR", True),
    (float("inf"), "ZAR", True),
]
ECHO_IDS = [
    "same-amount-as-text-with-cents",
    "same-amount-as-text-without-cents",
    "same-amount-as-an-integer",
    "same-amount-as-a-float",
    "same-amount-with-three-decimals",
    "neither-given-says-nothing",
    "no-currency-given-says-nothing-about-it",
    "no-amount-given-says-nothing-about-it",
    "another-amount-as-text",
    "another-amount-as-a-number",
    "one-cent-more",
    "a-tenth-of-a-cent-more",
    "minor-units-are-another-amount",
    "another-currency",
    "currency-case-differs",
    "currency-with-a-space",
    "currency-not-a-string",
    "amount-with-a-leading-space",
    "amount-with-a-trailing-newline",
    "amount-with-an-underscore",
    "amount-in-exponent-notation",
    "amount-not-a-number",
    "negative-amount",
    "amount-true",
    "amount-an-object",
    "amount-infinite",
]


@pytest.mark.parametrize(("amount", "currency", "contradicts"), ECHOES, ids=ECHO_IDS)
def test_an_answer_contradicts_the_request_only_by_a_value_it_carries(
    amount, currency, contradicts
):
    answer = ProviderAnswer("success", amount=amount, currency=currency)
    assert answer.contradicts(Decimal("20.00"), "ZAR") is contradicts


@pytest.mark.parametrize(
    ("failure_statuses", "status", "outcome"),
    [
        ((408, 429), 429, "failure"),
        ((408, 429), 408, "failure"),
        ((), 429, "busy"),
        ((), 408, "busy"),
        ((403,), 403, "failure"),
        ((403,), 429, "busy"),
        ((403,), 404, "rejected"),
    ],
    ids=[
        "429-counted-by-default",
        "408-counted-by-default",
        "429-not-counted-is-busy",
        "408-not-counted-is-busy",
        "another-4xx-listed-is-a-failure",
        "429-not-listed-is-busy",
        "a-4xx-not-listed-is-rejected",
    ],
)
def test_failure_statuses_decide_which_4xx_answers_count_as_failures(
    failure_statuses, status, outcome
):
    mapping, _ = compile_mapping(None, None, False, WHERE, failure_statuses)
    answer = mapping.classify(status, b"")
    assert answer.outcome == outcome
    assert f"HTTP {status}" in answer.detail


def test_a_rule_that_matches_a_429_wins_over_failure_statuses():
    response = ResponseSpec.model_validate(
        {
            "success": [{"status": 200}],
            "declined": [{"status": 429, "field": "code", "equals": "LIMIT_PER_PAYER"}],
        }
    )
    request = RequestSpec(headers={"X-Reference-Id": "{reference}"})
    mapping, _ = compile_mapping(request, response, False, WHERE)
    assert mapping.classify(429, raw({"code": "LIMIT_PER_PAYER"})).outcome == "declined"
    assert mapping.classify(429, raw({"code": "SLOW_DOWN"})).outcome == "failure"


# --- Config errors ----------------------------------------------------------------------------

PROVIDER_HEAD = """\
providers:
  P:
    url: "http://127.0.0.1:9/pay"
"""


def config_problems(text: str) -> list[str]:
    """Problems of one provider `P` whose remaining keys are `text` (any indentation)."""
    with pytest.raises(ConfigError) as error:
        parse_config(PROVIDER_HEAD + textwrap.indent(textwrap.dedent(text), "    "), "gw.yaml", {})
    return error.value.problems


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            """\
                request:
                  body: {id: "{reference}", amount: "{amont}"}
                response: {success: [{status: 200}]}
            """,
            [
                "gw.yaml:5: providers.P.request.body.amount: unknown placeholder {amont}; known: "
                "amount, callback_url, currency, idempotency_key, payer, provider, reference, "
                "token, transaction_id"
            ],
        ),
        (
            """\
                request:
                  headers: {X-Reference-Id: "{reference}"}
                  body:
                    amount: "{amount:cents}"
                    currency: "{currency:lower}"
                response: {success: [{status: 200}]}
            """,
            [
                "gw.yaml:7: providers.P.request.body.amount: unknown format 'cents' for {amount}; "
                "formats: decimal2, minor_units, number",
                "gw.yaml:8: providers.P.request.body.currency: unknown format 'lower' for "
                "{currency}; formats: none",
            ],
        ),
        (
            """\
                request:
                  headers: {X-Reference-Id: "{reference}"}
                  body:
                    open: "pay {amount"
                    close: "}x"
                response: {success: [{status: 200}]}
            """,
            [
                "gw.yaml:7: providers.P.request.body.open: unbalanced '{' in 'pay {amount' "
                "(write {{ for a literal)",
                "gw.yaml:8: providers.P.request.body.close: unbalanced '}' in '}x' "
                "(write }} for a literal)",
            ],
        ),
        (
            """\
                response:
                  success:
                    - {status: 200, field: status}
            """,
            [
                "gw.yaml:6: providers.P.response.success.0.field: needs `equals`: "
                "the value(s) that match"
            ],
        ),
        (
            """\
                response:
                  success:
                    - {status: 200, equals: OK}
            """,
            [
                "gw.yaml:6: providers.P.response.success.0.equals: needs `field`: "
                "the JSON field to compare"
            ],
        ),
        (
            """\
                response:
                  success:
                    - {status: 700}
            """,
            [
                "gw.yaml:6: providers.P.response.success.0.status: must be an HTTP status "
                "(100-599) or like 2xx, got 700",
                "gw.yaml:6: providers.P.response.success.0: matches every answer; give a "
                "`status`, a `field`, or both",
            ],
        ),
        (
            """\
                response:
                  success:
                    - {status: 2XY, field: s, equals: OK}
            """,
            [
                "gw.yaml:6: providers.P.response.success.0.status: must be an HTTP status "
                "(100-599) or like 2xx, got '2XY'"
            ],
        ),
        (
            """\
                response:
                  success:
                    - {status: "2xx\\n", field: s, equals: OK}
            """,
            [
                "gw.yaml:6: providers.P.response.success.0.status: must be an HTTP status "
                "(100-599) or like 2xx, got '2xx\\n'"
            ],
        ),
        (
            """\
                response:
                  success:
                    - {status: [200, 99], field: s, equals: OK}
            """,
            [
                "gw.yaml:6: providers.P.response.success.0.status.1: must be an HTTP status "
                "(100-599) or like 2xx, got 99"
            ],
        ),
        (
            """\
                response:
                  success:
                    - {field: s, equals: OK}
                  declined:
                    - {}
            """,
            [
                "gw.yaml:8: providers.P.response.declined.0: matches every answer; give a "
                "`status`, a `field`, or both"
            ],
        ),
        (
            """\
                request:
                  headers: {X-Tx: "{transaction_id}"}
                  body: {tx: "{transaction_id}", amount: "{amount}"}
                response: {success: [{status: 200}]}
            """,
            [
                "gw.yaml:4: providers.P.request: sends neither {reference} nor {idempotency_key}: "
                "a retry could charge twice"
            ],
        ),
        (
            """\
                request:
                  methd: POST
                  body: {id: "{reference}"}
                response:
                  success: [{status: 200}]
                  reasons: [message]
            """,
            [
                "gw.yaml:5: providers.P.request.methd: unknown key (did you mean 'method'?)",
                "gw.yaml:9: providers.P.response.reasons: unknown key (did you mean 'reason'?)",
            ],
        ),
        (
            """\
                response:
                  success:
                    - {status: 200, field: s, equal: OK}
            """,
            # (config.py suggests no spelling inside list items yet, so only the prefix is fixed)
            ["gw.yaml:6: providers.P.response.success.0.equal: unknown key"],
        ),
        (
            """\
                response:
                  success: []
            """,
            [
                "gw.yaml:5: providers.P.response.success: needs at least one rule "
                "(or `pending` ones)"
            ],
        ),
        (
            """\
                response:
                  declined: [{status: 402}]
            """,
            [
                "gw.yaml:4: providers.P.response.success: needs at least one rule "
                "(or `pending` ones)"
            ],
        ),
        (
            """\
                request:
                  method: GET
                  body: {id: "{reference}"}
                response: {success: [{status: 200}]}
            """,
            ["gw.yaml:5: providers.P.request.method: input should be 'POST' or 'PUT', got 'GET'"],
        ),
        (
            """\
                response:
                  success: [{status: 200}]
                  already_exists:
                    - {status: 4XX, field: code}
            """,
            [
                "gw.yaml:7: providers.P.response.already_exists.0.status: must be an HTTP status "
                "(100-599) or like 2xx, got '4XX'",
                "gw.yaml:7: providers.P.response.already_exists.0.field: needs `equals`",
            ],
        ),
        (
            """\
                response:
                  success: [{status: 200}]
                  amount: data..amount
                  currency: ""
            """,
            [
                "gw.yaml:6: providers.P.response.amount: must be a dotted path into the JSON "
                "answer (like data.amount), got 'data..amount'",
                "gw.yaml:7: providers.P.response.currency: must be a dotted path into the JSON "
                "answer (like data.amount), got ''",
            ],
        ),
        (
            """\
                response:
                  success: [{status: 200}]
                  amount: [data, amount]
            """,
            ["gw.yaml:6: providers.P.response.amount: input should be a valid string"],
        ),
    ],
    ids=[
        "unknown-placeholder",
        "unknown-format",
        "unbalanced-brace",
        "field-without-equals",
        "equals-without-field",
        "status-out-of-range",
        "status-not-a-class",
        "status-class-with-a-trailing-newline",
        "bad-status-in-a-list",
        "rule-that-matches-everything",
        "sends-neither-reference-nor-idempotency-key",
        "unknown-key-in-request-and-response",
        "unknown-key-in-a-rule",
        "empty-success-list",
        "missing-success",
        "unsupported-method",
        "bad-already-exists-rule",
        "amount-and-currency-paths-with-an-empty-part",
        "amount-path-not-a-string",
    ],
)
def test_mapping_errors_are_reported_with_file_line_and_key(text, expected):
    problems = config_problems(text)
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start), problems


def test_every_mapping_error_of_a_provider_is_reported_at_once():
    lines = config_problems(
        """\
            request:
              body: {amount: "{amont}", note: "{amount", tx: "{transaction_id}"}
            response:
              success: []
              declined: [{status: 99}]
        """
    )
    assert [line.split(": ")[1] for line in lines] == [
        "providers.P.request",
        "providers.P.request.body.amount",
        "providers.P.request.body.note",
        "providers.P.response.success",
        "providers.P.response.declined.0.status",
        "providers.P.response.declined.0",
    ]


def test_a_bare_word_such_as_a_country_code_stays_a_string():
    config = parse_config(
        PROVIDER_HEAD
        + textwrap.indent(
            textwrap.dedent(
                """\
                request:
                  body: {id: "{reference}", country: NO}
                response:
                  success: [{status: 200, field: code, equals: ON}]
                """
            ),
            "    ",
        ),
        "gw.yaml",
        {},
    )
    mapping = config.providers[0].mapping
    assert json.loads(mapping.render_body(fields()))["country"] == "NO"
    assert mapping.classify(200, raw({"code": "ON"})).outcome == "success"
