"""The Airtel Money "USSD push" collection dialect: token, payment, enquiry, callback."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping

from mock_providers import validation
from mock_providers.api import JsonBody, MockReply, ProviderApi, Rejected
from mock_providers.ledger import Entry, Payment, State
from mock_providers.tokens import Access, Credentials, whole
from mock_providers.validation import BadField

SUCCESS_CODE = "DP00800001001"
IN_PROGRESS_CODE = "DP00800001006"
EXPIRED_CODE = "DP00800001024"
# Airtel's response codes for a refused collection, with the wording of Airtel's code table.
DECLINES = {
    "DP00800001007": "User wallet does not have enough money to cover the payable amount.",
    "DP00800001010": "Payee is barred or not registered on Airtel Money platform.",
    "DP00800001002": "Incorrect pin has been entered.",
    "DP00800001008": "The transaction was refused.",
}
FAILURE_MESSAGES = {**DECLINES, EXPIRED_CODE: "Transaction Timed Out."}
# data.transaction.status, and the callback's status_code.
TRANSACTION_STATUS = {State.PENDING: "TIP", State.SUCCESSFUL: "TS", State.FAILED: "TF"}


def error(status: int, result_code: str, message: str) -> MockReply:
    return MockReply(
        status,
        {
            "status": {
                "code": str(status),
                "message": message,
                "result_code": result_code,
                "success": False,
            }
        },
    )


def oauth_error(status: int, code: str, description: str) -> Rejected:
    return Rejected(
        MockReply(status, {"error": code, "error_description": description}),
        unauthorized=status == 401,
    )


def check_credentials(headers: Mapping[str, str], body: bytes, credentials: Credentials) -> None:
    """The client credentials grant, in a JSON body."""
    try:
        document = validation.json_object(body)
    except BadField as bad:
        raise oauth_error(400, "invalid_request", str(bad)) from None
    if document.get("grant_type") != "client_credentials":
        raise oauth_error(400, "unsupported_grant_type", "grant_type must be client_credentials")
    client_id, client_secret = document.get("client_id"), document.get("client_secret")
    if not (
        isinstance(client_id, str)
        and isinstance(client_secret, str)
        and credentials.accept_client(client_id, client_secret)
    ):
        raise oauth_error(401, "invalid_client", "Client authentication failed")


def token_answer(token: str, ttl_s: float) -> MockReply:
    # Airtel writes expires_in as a string.
    return MockReply(
        200, {"access_token": token, "expires_in": str(whole(ttl_s)), "token_type": "bearer"}
    )


def authorize(headers: Mapping[str, str], access: Access) -> None:
    if not access.tokens.valid(validation.bearer_token(headers)):
        raise Rejected(
            error(401, "ESB000001", "Authorization: a valid Bearer access token is required"),
            unauthorized=True,
        )


def read_payment(headers: Mapping[str, str], body: bytes) -> Payment:
    try:
        validation.header(headers, "X-Country", validation.COUNTRY)
        validation.header(headers, "X-Currency", validation.CURRENCY)
        document = validation.json_object(body)
        msisdn = validation.lookup(document, "subscriber.msisdn")
        # Airtel wants the national number (no country code), as a number or a string.
        if isinstance(msisdn, bool) or not validation.MSISDN.fullmatch(str(msisdn)):
            raise BadField("subscriber.msisdn", f"must be 5-15 digits, got {msisdn!r}")
        validation.text(document, "subscriber.country", validation.COUNTRY)
        validation.text(document, "subscriber.currency", validation.CURRENCY)
        validation.text(document, "transaction.country", validation.COUNTRY)
        return Payment(
            reference=validation.text(document, "transaction.id"),
            amount=validation.positive_number(document, "transaction.amount"),
            currency=validation.text(document, "transaction.currency", validation.CURRENCY),
            external_id=validation.text(document, "reference"),
        )
    except BadField as bad:
        raise Rejected(error(400, "ESB000008", str(bad))) from None


def airtel_money_id(entry: Entry) -> str | None:
    return f"MP{entry.provider_transaction_id}" if entry.charged else None


def transaction_message(entry: Entry) -> str:
    if entry.state is State.PENDING:
        return "In process"
    if entry.state is State.SUCCESSFUL:
        payment = entry.payment
        return f"Paid {payment.currency} {payment.amount}, Trans ID {airtel_money_id(entry)}."
    return FAILURE_MESSAGES[entry.reason or ""]


def outcome_status(entry: Entry) -> JsonBody:
    """The `status` block of an enquiry: the payment's response code, success or not."""
    if entry.state is State.FAILED:
        code = entry.reason or ""
        return {
            "code": "200",
            "message": FAILURE_MESSAGES[code],
            "result_code": "ESB000011",
            "response_code": code,
            "success": False,
        }
    pending = entry.state is State.PENDING
    return {
        "code": "200",
        "message": "Transaction in progress" if pending else "SUCCESS",
        "result_code": "ESB000010",
        "response_code": IN_PROGRESS_CODE if pending else SUCCESS_CODE,
        "success": True,
    }


def enquiry(entry: Entry) -> MockReply:
    """GET /standard/v1/payments/{id}: the transaction's state (no amount or currency: the real
    enquiry has none)."""
    transaction = {
        "airtel_money_id": airtel_money_id(entry),
        "id": entry.payment.reference,
        "message": transaction_message(entry),
        "status": TRANSACTION_STATUS[entry.state],
    }
    return MockReply(200, {"data": {"transaction": transaction}, "status": outcome_status(entry)})


def accepted_answer(entry: Entry) -> MockReply:
    # The push is sent; the payer is entering their PIN.
    return MockReply(
        200,
        {
            "data": {"transaction": {"id": entry.payment.reference, "status": "SUCCESS"}},
            "status": {
                "code": "200",
                "message": "SUCCESS",
                "result_code": "ESB000010",
                "response_code": IN_PROGRESS_CODE,
                "success": True,
            },
        },
    )


def failure_answer() -> MockReply:
    return error(500, "ESB000001", "Something went wrong.")


def status_answer(entry: Entry | None, reference: str) -> MockReply:
    if entry is None:
        return error(
            404, "ESB000045", f"No Transaction Found With Provided Transaction Id {reference}"
        )
    return enquiry(entry)


def callback_body(entry: Entry, secret: str | None) -> bytes:
    """Airtel's callback; with a secret, `hash` is the base64 HMAC-SHA256 of the compact JSON
    of `transaction`, exactly as it appears in the body."""
    transaction = {
        "id": entry.payment.reference,
        "message": transaction_message(entry),
        "status_code": TRANSACTION_STATUS[entry.state],
        "airtel_money_id": airtel_money_id(entry),
    }
    signed = json.dumps(transaction, separators=(",", ":"))
    if secret is None:
        return f'{{"transaction":{signed}}}'.encode()
    digest = hmac.new(secret.encode(), signed.encode(), hashlib.sha256).digest()
    hash_field = json.dumps(base64.b64encode(digest).decode())
    return f'{{"transaction":{signed},"hash":{hash_field}}}'.encode()


API = ProviderApi(
    name="airtel",
    default_port=9102,
    token_path="/auth/oauth2/token",
    payment_path="/merchant/v1/payments/",
    status_path="/standard/v1/payments/{reference}",
    token_ttl_s=180,
    approval_timeout_s=60,
    expiry_reason=EXPIRED_CODE,
    decline_reasons=tuple(DECLINES),
    callback_method="POST",
    check_credentials=check_credentials,
    token_answer=token_answer,
    authorize=authorize,
    read_payment=read_payment,
    accepted_answer=accepted_answer,
    # Airtel answers a repeated transaction id with the first payment's state.
    duplicate_answer=enquiry,
    sync_decline_answer=enquiry,
    failure_answer=failure_answer,
    status_answer=status_answer,
    callback_body=callback_body,
)
