"""The MTN MoMo Collections "RequestToPay" dialect: request parsing and answer formats."""

from __future__ import annotations

from collections.abc import Mapping

from mock_providers import validation
from mock_providers.api import Answer, JsonBody, ProviderApi, Rejected
from mock_providers.ledger import Entry, Payment
from mock_providers.validation import BadField

PARTY_ID_TYPES = ("MSISDN", "EMAIL", "PARTY_CODE")
NOT_ENOUGH_FUNDS = "NOT_ENOUGH_FUNDS"
DECLINE_REASONS = (
    NOT_ENOUGH_FUNDS,
    "PAYER_NOT_FOUND",
    "PAYEE_NOT_ALLOWED_TO_RECEIVE",
    "APPROVAL_REJECTED",
)


def error(status: int, code: str, message: str) -> Answer:
    return Answer(status, {"code": code, "message": message})


def authorize(headers: Mapping[str, str]) -> None:
    if validation.bearer_token(headers) is None:
        raise Rejected(
            error(401, "UNAUTHORIZED", "Authorization: a Bearer access token is required")
        )


def read_payment(headers: Mapping[str, str], body: bytes) -> Payment:
    try:
        reference = validation.header(headers, "X-Reference-Id", validation.UUID)
        validation.header(headers, "X-Target-Environment")
        document = validation.json_object(body)
        payment = Payment(
            reference=reference,
            amount=validation.decimal_string(document, "amount"),
            currency=validation.text(document, "currency", validation.CURRENCY),
            external_id=validation.text(document, "externalId"),
        )
        party_id_type = validation.text(document, "payer.partyIdType")
        if party_id_type not in PARTY_ID_TYPES:
            raise BadField("payer.partyIdType", f"must be one of {', '.join(PARTY_ID_TYPES)}")
        validation.text(document, "payer.partyId")
        for optional in ("payerMessage", "payeeNote"):
            if not isinstance(document.get(optional, ""), str):
                raise BadField(optional, "must be a string")
    except BadField as bad:
        raise Rejected(error(400, "BAD_REQUEST", str(bad))) from None
    return payment


def result(entry: Entry) -> JsonBody:
    """The RequestToPay resource, as both the POST and the status GET return it."""
    payment = entry.payment
    return {
        "referenceId": payment.reference,
        "status": "SUCCESSFUL" if entry.charged else "FAILED",
        "reason": entry.decline_reason,
        "financialTransactionId": entry.provider_transaction_id if entry.charged else None,
        "amount": payment.amount,
        "currency": payment.currency,
        "externalId": payment.external_id,
    }


def payment_answer(entry: Entry) -> Answer:
    # Like the real API, MTN reports insufficient funds as a 500 with an error body, not as a
    # FAILED resource: a client must read the code to tell this decline from a failure.
    if entry.decline_reason == NOT_ENOUGH_FUNDS:
        return error(500, NOT_ENOUGH_FUNDS, "The payer does not have enough funds.")
    return Answer(202, result(entry))


def failure_answer() -> Answer:
    return error(500, "INTERNAL_PROCESSING_ERROR", "An internal error occurred while processing.")


def status_answer(entry: Entry | None, reference: str) -> Answer:
    if entry is None:
        return error(404, "RESOURCE_NOT_FOUND", f"Requested resource {reference} was not found.")
    return Answer(200, result(entry))


API = ProviderApi(
    name="mtn",
    default_port=9101,
    payment_path="/collection/v1_0/requesttopay",
    status_path="/collection/v1_0/requesttopay/{reference}",
    decline_reasons=DECLINE_REASONS,
    authorize=authorize,
    read_payment=read_payment,
    payment_answer=payment_answer,
    failure_answer=failure_answer,
    status_answer=status_answer,
)
