"""Provider callbacks: payagg's callback URL for a payment, and each provider's own signature.

The URL is `{server.public_url}/v1/callbacks/{provider}/{token}`, where the token is an HMAC of
the provider reference under payagg's callback secret: it finds the payment and proves the
caller was given the URL, so a provider that signs nothing (MTN) is covered too. The provider's
own check (YAML `callback:`) comes on top. Every secret is compared in constant time.

A provider that calls one URL configured on the merchant account (Airtel) instead gets a static
URL per provider, whose token is the HMAC of the provider and an empty reference (which no
payment has); `callback.reference` says where the body carries the payment's reference, and only
the provider's HMAC of the body authenticates it (`CallbackSpec.problems` insists on one).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict

from proxy.providers.mapping import JsonValue, lookup_path
from proxy.settings.yaml_source import Path, Problem


def callback_token(secret: str, provider: str, reference: str) -> str:
    """The hex HMAC-SHA256, under payagg's callback secret, of provider NUL reference."""
    message = f"{provider}\x00{reference}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class CallbackTarget:
    """Where providers reach payagg (`server.public_url`) and the secret of the URL tokens."""

    public_url: str
    secret: str = field(repr=False)

    def url_for(self, provider: str, reference: str) -> str:
        """The `{callback_url}` of one payment."""
        token = callback_token(self.secret, provider, reference)
        return f"{self.public_url}/v1/callbacks/{provider}/{token}"

    def static_url_for(self, provider: str) -> str:
        """The one URL a provider that names the payment in the body is given (`reference`)."""
        return f"{self.public_url}/v1/callbacks/{provider}/{static_token(self.secret, provider)}"


def static_token(secret: str, provider: str) -> str:
    """The token of a provider's static callback URL: the HMAC of provider NUL (no reference),
    so it is no payment's token."""
    return callback_token(secret, provider, "")


def token_matches(secret: str, provider: str, reference: str, token: str) -> bool:
    """Whether a callback URL's token is this payment's, in constant time."""
    expected = callback_token(secret, provider, reference)
    return hmac.compare_digest(expected.encode(), token.encode())


Verify = Literal["none", "hmac_header", "hmac_field", "shared_token"]
# The keys each way of verifying needs, and those it may use.
_NEEDS: dict[str, tuple[str, ...]] = {
    "none": (),
    "hmac_header": ("header", "secret"),
    "hmac_field": ("field", "signed", "secret"),
    "shared_token": ("secret",),
}
_MAY_USE: dict[str, tuple[str, ...]] = {
    "none": (),
    "hmac_header": ("header", "secret", "encoding"),
    "hmac_field": ("field", "signed", "secret", "encoding"),
    "shared_token": ("header", "field", "secret"),
}


class CallbackSpec(BaseModel):
    """How to read a provider's callback (YAML `callback:`), PUT or POST."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Dotted path of the payment's state in the body (logged; the status query is the truth).
    state: str | None = None
    # Dotted path of payagg's provider reference (the `{reference}` it sent) in the body, for a
    # provider that calls one configured URL, not one per payment: its callbacks come to the
    # provider's static URL and are found by this; only a body HMAC can authenticate them.
    reference: str | None = None
    # none: the provider signs nothing (the URL's token still authenticates the caller);
    # hmac_header: an HMAC-SHA256 of the raw body in `header`;
    # hmac_field: an HMAC-SHA256 of the compact JSON of the body field `signed`, in `field`;
    # shared_token: `secret` itself, in `header` or in the body field `field`.
    verify: Verify
    header: str | None = None
    field: str | None = None
    signed: str | None = None
    secret: str | None = None
    encoding: Literal["hex", "base64"] = "hex"

    def problems(self, path: Path) -> list[Problem]:
        found = []
        for key in _NEEDS[self.verify]:
            if not getattr(self, key):
                found.append(Problem((*path, key), f"is required by `verify: {self.verify}`"))
        for key in ("header", "field", "signed", "secret"):
            if getattr(self, key) is not None and key not in _MAY_USE[self.verify]:
                found.append(Problem((*path, key), f"is not used by `verify: {self.verify}`"))
        if self.verify == "shared_token" and (self.header is None) == (self.field is None):
            found.append(Problem(path, "`verify: shared_token` needs one of `header` or `field`"))
        found.extend(self._reference_problems(path))
        return found

    def _reference_problems(self, path: Path) -> list[Problem]:
        # A static URL is the same for every payment and, once known, for anyone: only the
        # provider's HMAC of the body (reference included) says the provider sent it.
        if self.reference is None:
            return []
        if self.verify not in ("hmac_header", "hmac_field"):
            return [
                Problem(
                    (*path, "reference"),
                    "a static callback URL authenticates no payment: it needs the provider's "
                    "HMAC of the body (`verify: hmac_header` or `hmac_field`), "
                    f"not `{self.verify}`",
                )
            ]
        signed = self.signed
        if signed and not (self.reference == signed or self.reference.startswith(f"{signed}.")):
            return [
                Problem(
                    (*path, "reference"),
                    f"must lie inside the signed field `{signed}`, else nothing authenticates it",
                )
            ]
        return []

    def authenticate(self, headers: Mapping[str, str], raw: bytes) -> bool:
        """True when the callback carries the provider's own proof (always, for `none`)."""
        if self.verify == "none":
            return True
        secret = (self.secret or "").encode()
        if self.verify == "hmac_header":
            return self._equal(headers.get(self.header or ""), self._digest(secret, raw))
        document = _document(raw)
        if self.verify == "hmac_field":
            signed = lookup_path(document, self.signed or "")
            if signed is None:
                return False
            compact = json.dumps(signed, separators=(",", ":"), ensure_ascii=False).encode()
            return self._equal(
                lookup_path(document, self.field or ""), self._digest(secret, compact)
            )
        given = headers.get(self.header) if self.header else lookup_path(document, self.field or "")
        return isinstance(given, str) and hmac.compare_digest(given.encode(), secret)

    def state_of(self, raw: bytes) -> str | None:
        return self._text_at(self.state, raw)

    def reference_of(self, raw: bytes) -> str | None:
        """The provider reference a callback to the static URL names (`reference`), if any."""
        return self._text_at(self.reference, raw)

    def _text_at(self, path: str | None, raw: bytes) -> str | None:
        if path is None:
            return None
        value = lookup_path(_document(raw), path)
        return None if value is None else str(value)

    def _digest(self, secret: bytes, message: bytes) -> str:
        digest = hmac.new(secret, message, hashlib.sha256).digest()
        return digest.hex() if self.encoding == "hex" else base64.b64encode(digest).decode()

    def _equal(self, given: JsonValue, expected: str) -> bool:
        if not isinstance(given, str):
            return False
        if self.encoding == "hex":
            given = given.strip().lower()
        return hmac.compare_digest(given.encode(), expected.encode())


def _document(raw: bytes) -> JsonValue:
    try:
        return json.loads(raw)
    except ValueError:
        return None
