"""Reading a provider's request: typed lookups whose errors name the header or field path."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

POSITIVE_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")
CURRENCY = re.compile(r"[A-Z]{3}")
COUNTRY = re.compile(r"[A-Z]{2}")
MSISDN = re.compile(r"[0-9]{5,15}")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)


class BadField(ValueError):
    """A missing or invalid header or body field; each provider words it in its own format."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, None when absent or empty."""
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def header(headers: Mapping[str, str], name: str, pattern: re.Pattern[str] | None = None) -> str:
    value = headers.get(name, "").strip()
    if not value:
        raise BadField(name, "header is required")
    if pattern is not None and not pattern.fullmatch(value):
        raise BadField(name, f"header is malformed, got {value!r}")
    return value


def json_object(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except ValueError:
        raise BadField("body", "is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise BadField("body", "must be a JSON object")
    return parsed


def lookup(document: Mapping[str, Any], path: str) -> object:
    """The value at a dotted `path`; a missing step or a non-object on the way is a BadField."""
    value: object = document
    for step in path.split("."):
        if not isinstance(value, Mapping) or step not in value:
            raise BadField(path, "is required")
        value = value[step]
    return value


def text(document: Mapping[str, Any], path: str, pattern: re.Pattern[str] | None = None) -> str:
    value = lookup(document, path)
    if not isinstance(value, str) or not value.strip():
        raise BadField(path, f"must be a non-empty string, got {value!r}")
    if pattern is not None and not pattern.fullmatch(value):
        raise BadField(path, f"is malformed, got {value!r}")
    return value


def decimal_string(document: Mapping[str, Any], path: str) -> str:
    """A positive amount written as a string, the way MTN wants it ("20.00")."""
    value = text(document, path)
    if not POSITIVE_DECIMAL.fullmatch(value) or Decimal(value) <= 0:
        raise BadField(path, f"must be a string holding a positive decimal, got {value!r}")
    return value


def positive_number(document: Mapping[str, Any], path: str) -> str:
    """A positive amount written as a JSON number, the way Airtel wants it; returned as text."""
    value = lookup(document, path)
    # bool is an int subclass, but `true` is not an amount.
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise BadField(path, f"must be a positive number, got {value!r}")
    return str(value)


def is_http_url(text: str) -> bool:
    """An absolute http(s) URL with a host, the only kind a callback can go to."""
    try:
        parts = urlsplit(text)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)
