"""The MTN MoMo Collections dialect: token, asynchronous RequestToPay, status, callback."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from aiohttp import BasicAuth

from mock_providers import validation
from mock_providers.api import JsonBody, MockReply, ProviderApi, Rejected
from mock_providers.ledger import Entry, Payment, State
from mock_providers.tokens import Access, Credentials, whole
from mock_providers.validation import BadField

PARTY_ID_TYPES = ("MSISDN", "EMAIL", "PARTY_CODE")
# MTN wants the full international number: country code first, no "+", no leading 0.
INTERNATIONAL_MSISDN = re.compile(r"[1-9][0-9]{7,14}")
SUBSCRIPTION_KEY = "Ocp-Apim-Subscription-Key"
# MTN's reasons for a FAILED payment, with the mock's wording of the refusal.
DECLINES = {
    "NOT_ENOUGH_FUNDS": "The payer does not have enough funds.",
    "PAYER_NOT_FOUND": "The payer was not found.",
    "PAYEE_NOT_ALLOWED_TO_RECEIVE": "The payee is not allowed to receive.",
    "APPROVAL_REJECTED": "The payer rejected the request.",
}
EXPIRED = "EXPIRED"
MISSING_KEY = (
    "Access denied due to missing subscription key. "
    "Make sure to include subscription key when making requests to an API."
)
INVALID_KEY = (
    "Access denied due to invalid subscription key. "
    "Make sure to provide a valid key for an active subscription."
)
INVALID_TOKEN = "Access denied due to invalid or expired access token."


def error(status: int, code: str, message: str) -> MockReply:
    return MockReply(status, {"code": code, "message": message})


def gateway_refusal(message: str) -> Rejected:
    # The API gateway in front of MTN's services answers in its own format.
    return Rejected(MockReply(401, {"statusCode": 401, "message": message}), unauthorized=True)


def check_subscription_key(headers: Mapping[str, str], credentials: Credentials) -> None:
    key = headers.get(SUBSCRIPTION_KEY, "").strip()
    if not key:
        raise gateway_refusal(MISSING_KEY)
    if not credentials.accept_subscription_key(key):
        raise gateway_refusal(INVALID_KEY)


def check_credentials(headers: Mapping[str, str], body: bytes, credentials: Credentials) -> None:
    """HTTP Basic with the API user and key, plus the subscription key."""
    check_subscription_key(headers, credentials)
    try:
        basic = BasicAuth.decode(headers.get("Authorization", ""))
    except ValueError:
        basic = None
    if basic is None or not credentials.accept_client(basic.login, basic.password):
        # Sic: MTN answers unknown API user credentials with a 500.
        raise Rejected(MockReply(500, {"error": "login_failed"}), unauthorized=True)


def token_answer(token: str, ttl_s: float) -> MockReply:
    return MockReply(
        200,
        {"access_token": token, "token_type": "access_token", "expires_in": whole(ttl_s)},
    )


def authorize(headers: Mapping[str, str], access: Access) -> None:
    check_subscription_key(headers, access.credentials)
    if not access.tokens.valid(validation.bearer_token(headers)):
        raise gateway_refusal(INVALID_TOKEN)


def read_payment(headers: Mapping[str, str], body: bytes) -> Payment:
    try:
        reference = validation.header(headers, "X-Reference-Id", validation.UUID)
        validation.header(headers, "X-Target-Environment")
        callback_url = headers.get("X-Callback-Url", "").strip() or None
        if callback_url is not None and not validation.is_http_url(callback_url):
            raise BadField("X-Callback-Url", f"header must be an http(s) URL, got {callback_url!r}")
        document = validation.json_object(body)
        amount = validation.decimal_string(document, "amount")
        currency = validation.text(document, "currency", validation.CURRENCY)
        external_id = validation.text(document, "externalId")
        party_id_type = validation.text(document, "payer.partyIdType")
        if party_id_type not in PARTY_ID_TYPES:
            raise BadField("payer.partyIdType", f"must be one of {', '.join(PARTY_ID_TYPES)}")
        party_id = validation.text(document, "payer.partyId")
        if party_id_type == "MSISDN" and not INTERNATIONAL_MSISDN.fullmatch(party_id):
            raise BadField("payer.partyId", f"must be an international MSISDN, got {party_id!r}")
        echo: JsonBody = {"payer": {"partyIdType": party_id_type, "partyId": party_id}}
        for optional in ("payerMessage", "payeeNote"):
            if not isinstance(document.get(optional, ""), str):
                raise BadField(optional, "must be a string")
            if optional in document:
                echo[optional] = document[optional]
    except BadField as bad:
        raise Rejected(error(400, "BAD_REQUEST", str(bad))) from None
    return Payment(reference, amount, currency, external_id, callback_url, echo)


def resource(entry: Entry) -> JsonBody:
    """The RequestToPay resource, as the status GET and the callback carry it."""
    payment = entry.payment
    body: JsonBody = {}
    if entry.state is State.SUCCESSFUL:
        body["financialTransactionId"] = entry.provider_transaction_id
    body |= {
        "externalId": payment.external_id,
        "amount": payment.amount,
        "currency": payment.currency,
        **payment.echo,
        "status": entry.state.value,
    }
    if entry.reason is not None:
        body["reason"] = entry.reason
    return body


def accepted_answer(entry: Entry) -> MockReply:
    # The payer has just been asked to approve; the outcome is only ever read later.
    return MockReply(202, None)


def duplicate_answer(entry: Entry) -> MockReply:
    return error(
        409, "RESOURCE_ALREADY_EXIST", "Duplicated reference id. Creation of resource failed."
    )


def sync_decline_answer(entry: Entry) -> MockReply:
    # MTN's habit: some refusals come back on the POST as a 500 whose body names the reason, so
    # a client must read the code to tell this decline from a failure.
    reason = entry.reason or ""
    return error(500, reason, DECLINES.get(reason, reason))


def failure_answer() -> MockReply:
    return error(500, "INTERNAL_PROCESSING_ERROR", "An internal error occurred while processing.")


def status_answer(entry: Entry | None, reference: str) -> MockReply:
    if entry is None:
        return error(404, "RESOURCE_NOT_FOUND", f"Requested resource {reference} was not found.")
    return MockReply(200, resource(entry))


def callback_body(entry: Entry, secret: str | None) -> bytes:
    # MTN does not sign its callbacks; the secret has nothing to sign here.
    return json.dumps(resource(entry), separators=(",", ":")).encode()


API = ProviderApi(
    name="mtn",
    default_port=9101,
    token_path="/collection/token/",
    payment_path="/collection/v1_0/requesttopay",
    status_path="/collection/v1_0/requesttopay/{reference}",
    token_ttl_s=3600,
    approval_timeout_s=300,
    expiry_reason=EXPIRED,
    decline_reasons=tuple(DECLINES),
    callback_method="PUT",
    check_credentials=check_credentials,
    token_answer=token_answer,
    authorize=authorize,
    read_payment=read_payment,
    accepted_answer=accepted_answer,
    duplicate_answer=duplicate_answer,
    sync_decline_answer=sync_decline_answer,
    failure_answer=failure_answer,
    status_answer=status_answer,
    callback_body=callback_body,
)
