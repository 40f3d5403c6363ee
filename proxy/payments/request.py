"""A payment request read from the wire and checked field by field (CONTRACT §2)."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import uuid
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple

import orjson

from proxy.errors import InvalidRequest, UnknownProvider

# Each pattern must match the whole value (`fullmatch`): with `match` and `$`, "NL-1\n" would
# pass as a TransactionID of its own, and a newline would reach a provider's header.
_TRANSACTION_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_CURRENCY = re.compile(r"[A-Z]{3}")
_PAYER = re.compile(r"[0-9]{8,15}")
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
_MAX_AMOUNT = Decimal("1e9")
_CENT = Decimal("0.01")
_MAX_FLOAT_AMOUNT = float(_MAX_AMOUNT)
# Fixed forever: changing it would change every provider reference and defeat provider dedupe.
REFERENCE_NAMESPACE = uuid.UUID("6f1d2b9e-5c3a-5d7e-9a41-7061796167ff")


class Payment(NamedTuple):
    """A valid payment request; immutable (a NamedTuple builds four times faster than a frozen
    dataclass, and one is built per request)."""

    transaction_id: str
    amount: Decimal
    currency: str
    provider_key: str
    payer: str | None
    # The `Idempotency-Key` header as sent (None without one): recorded with the payment, never
    # its identity, which is the TransactionID alone.
    idempotency_key: str | None
    # The client's name, written in the record (None: the open API, `auth: off`).
    client: str | None = None
    # What its TransactionID is unique within: "" for the open API (and the client that owns
    # its payments), else the client's name.
    scope: str = ""

    def fingerprint(self, provider: str) -> str:
        """Hash of the request's meaning: what a reused key must match to be a replay.

        The hash of the compact JSON array `[transaction_id, amount, currency, provider, payer]`
        (stored in Redis, so it must never change). Validation leaves only JSON-safe characters
        in the payment's fields, so the array is joined by hand; only the provider's name is
        encoded with `json.dumps`.
        """
        payer = "null" if self.payer is None else f'"{self.payer}"'
        canonical = (
            f'["{self.transaction_id}","{self.amount.normalize()}","{self.currency}",'
            f"{_json_string(provider)},{payer}]"
        )
        return hashlib.sha256(canonical.encode()).hexdigest()

    def provider_reference(self, provider: str) -> str:
        """The reference of this payment at `provider`: derived from its identity alone, so every
        retry of the TransactionID, whatever header it carries, is recognisable by the provider.

        Computed once, at the first claim, and stored with the record; every later use reads the
        stored one (`IdempotencyStore`), so no change of this formula reaches a live payment.
        """
        return reference_for(provider, scoped(self.scope, self.transaction_id))


def scoped(scope: str, identity: str) -> str:
    """A TransactionID or `Idempotency-Key` within its client's scope.

    The open scope ("") leaves it as it was before clients existed, so the references and keys
    of payments made then are the ones still computed; a client's is `scope NUL identity`, which
    no open one can equal (neither may contain NUL).
    """
    return f"{scope}\x00{identity}" if scope else identity


def reference_for(provider: str, identity: str) -> str:
    """`uuid.uuid5(REFERENCE_NAMESPACE, f"{provider}\\x00{identity}")`, computed without building
    UUID objects (a third of the cost, on every payment). Fixed forever: a provider that
    deduplicates on the reference must see the same one for every retry."""
    name = f"{provider}\x00{identity}".encode()
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name, usedforsecurity=False).digest())
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    text = digest[:16].hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


@functools.cache
def _json_string(text: str) -> str:
    return json.dumps(text)


_NAMESPACE_BYTES = REFERENCE_NAMESPACE.bytes
# Built once: json.loads builds a new decoder on every call when given parse_float.
_DECODER = json.JSONDecoder(parse_float=Decimal, parse_constant=_reject_constant)
# A run of 16 or more digits (and dots) may be a number a float cannot hold exactly. Found by
# mapping digits and dots to "d" and looking for 16 in a row: a regex scan costs 4 times more.
_NUMBER_CHARS = bytes(ord("d") if chr(c) in "0123456789." else ord(" ") for c in range(256))
_LONG_NUMBER = b"d" * 16


def _parse_json(body: bytes) -> Any:
    """orjson, several times faster than the standard library, unless a float could lose digits.

    Every decimal number of at most 15 significant digits survives a float exactly (the shortest
    `repr` of the float is that number again), so `Amount` is checked exactly either way; a body
    with a longer digit run is decoded with exact Decimals instead (and with integers of any size).
    """
    if _LONG_NUMBER not in body.translate(_NUMBER_CHARS):
        return orjson.loads(body)
    return _DECODER.decode(body.decode())


def parse_payment(
    body: bytes, idempotency_header: str | None, known_providers: set[str]
) -> Payment:
    """Validate every field at once; raises InvalidRequest/UnknownProvider naming each bad one."""
    try:
        document = _parse_json(body)
    except (ValueError, RecursionError) as error:
        raise InvalidRequest({"body": f"not valid JSON: {error}"}) from None
    if not isinstance(document, dict):
        raise InvalidRequest({"body": "must be a JSON object"})
    problems: dict[str, str] = {}
    transaction_id = _text(
        document, "TransactionID", _TRANSACTION_ID, "1-64 chars of A-Z a-z 0-9 . _ : -", problems
    )
    amount = _amount(document.get("Amount"), problems)
    currency = _text(document, "Currency", _CURRENCY, "3 upper-case letters (ISO 4217)", problems)
    provider_key = _text(document, "ProviderKey", None, "", problems)
    payer = None
    if document.get("Payer") is not None:
        payer = _text(document, "Payer", _PAYER, "8-15 digits (an MSISDN)", problems)
    if idempotency_header is not None and not _IDEMPOTENCY_KEY.fullmatch(idempotency_header):
        problems["Idempotency-Key"] = "must be 1-255 printable ASCII characters"
    # ASCII only: str.lower() would read the Kelvin sign (U+212A) as the letter k.
    unknown = provider_key is not None and (
        not provider_key.isascii() or provider_key.lower() not in known_providers
    )
    if unknown:
        problems["ProviderKey"] = f"no provider named {provider_key!r} is configured"
    if unknown and provider_key is not None and len(problems) == 1:
        raise UnknownProvider(problems, provider_key)
    if problems or not (transaction_id and amount and currency and provider_key):
        raise InvalidRequest(problems)
    return Payment(
        transaction_id=transaction_id,
        amount=amount,
        currency=currency,
        provider_key=provider_key,
        payer=payer,
        idempotency_key=idempotency_header,
    )


def _text(
    document: dict[str, Any],
    name: str,
    pattern: re.Pattern[str] | None,
    rule: str,
    problems: dict[str, str],
) -> str | None:
    value = document.get(name)
    if value is None:
        problems[name] = "is required"
    elif not isinstance(value, str):
        problems[name] = f"must be a string, got {type(value).__name__}"
    elif pattern is not None and not pattern.fullmatch(value):
        problems[name] = f"must be {rule}"
    elif not value:
        problems[name] = "must not be empty"
    else:
        return value
    return None


def _amount(value: Any, problems: dict[str, str]) -> Decimal | None:
    if type(value) is float and 0 < value <= _MAX_FLOAT_AMOUNT:
        # The common case, answered from the float's shortest repr (exact, see _parse_json).
        text = repr(value)
        if "e" not in text and len(text) - text.index(".") <= 3:
            return Decimal(text)
    if value is None:
        problems["Amount"] = "is required"
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        problems["Amount"] = f"must be a number, got {_json_type(value)}"
        return None
    try:
        amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
        exact = amount.quantize(_CENT) == amount
    except InvalidOperation:
        exact = False
        amount = Decimal(0)
    if amount <= 0:
        problems["Amount"] = "must be greater than 0"
    elif amount > _MAX_AMOUNT:
        problems["Amount"] = "must be at most 1000000000"
    elif not exact:
        problems["Amount"] = "must have at most 2 decimal places"
    else:
        return amount
    return None


def _json_type(value: Any) -> str:
    return {str: "string", bool: "boolean", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )
