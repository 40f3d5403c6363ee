"""The Airtel Money "USSD push" collection dialect: request parsing and answer formats."""

from __future__ import annotations

from collections.abc import Mapping

from mock_providers import validation
from mock_providers.api import Answer, ProviderApi, Rejected
from mock_providers.ledger import Entry, Payment
from mock_providers.validation import BadField

SUCCESS_CODE = "DP00800001001"
# Airtel's response codes for a refused collection, with the wording of Airtel's code table.
DECLINES = {
    "DP00800001007": "User wallet does not have enough money to cover the payable amount.",
    "DP00800001010": "Payee is barred or not registered on Airtel Money platform.",
    "DP00800001002": "Incorrect pin has been entered.",
    "DP00800001008": "The transaction was refused.",
}


def error(status: int, result_code: str, message: str) -> Answer:
    return Answer(
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


def authorize(headers: Mapping[str, str]) -> None:
    if validation.bearer_token(headers) is None:
        raise Rejected(error(401, "ESB000001", "Authorization: a Bearer access token is required"))


def read_payment(headers: Mapping[str, str], body: bytes) -> Payment:
    try:
        validation.header(headers, "X-Country", validation.COUNTRY)
        validation.header(headers, "X-Currency", validation.CURRENCY)
        document = validation.json_object(body)
        msisdn = validation.lookup(document, "subscriber.msisdn")
        # Airtel's own examples send the MSISDN (without country code) as a number or a string.
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


def payment_answer(entry: Entry) -> Answer:
    """The transaction as both the payment POST and the status GET return it, always HTTP 200."""
    code = SUCCESS_CODE if entry.decline_reason is None else entry.decline_reason
    return Answer(
        200,
        {
            "data": {
                "transaction": {
                    "id": entry.payment.reference,
                    "status": "TS" if entry.charged else "TF",
                    "airtel_money_id": f"MP{entry.provider_transaction_id}"
                    if entry.charged
                    else None,
                }
            },
            "status": {
                "code": "200",
                "message": "SUCCESS" if entry.charged else DECLINES[code],
                "result_code": "ESB000010" if entry.charged else "ESB000011",
                "response_code": code,
                "success": entry.charged,
            },
        },
    )


def failure_answer() -> Answer:
    return error(500, "ESB000001", "Something went wrong.")


def status_answer(entry: Entry | None, reference: str) -> Answer:
    if entry is None:
        return error(
            404, "ESB000045", f"No Transaction Found With Provided Transaction Id {reference}"
        )
    return payment_answer(entry)


API = ProviderApi(
    name="airtel",
    default_port=9102,
    payment_path="/merchant/v1/payments/",
    status_path="/standard/v1/payments/{reference}",
    decline_reasons=tuple(DECLINES),
    authorize=authorize,
    read_payment=read_payment,
    payment_answer=payment_answer,
    failure_answer=failure_answer,
    status_answer=status_answer,
)
