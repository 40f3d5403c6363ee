"""The operator's admin token: from the environment, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

ADMIN_TOKEN_ENV = "PAYAGG_ADMIN_TOKEN"
# Shorter tokens can be guessed over the network; Secrets Manager generates 32+ characters.
MIN_TOKEN_CHARS = 16


def admin_token(environ: Mapping[str, str]) -> str | None:
    """The configured token, or None when the admin API is off (the variable unset or empty)."""
    return environ.get(ADMIN_TOKEN_ENV) or None


def admin_token_problem(environ: Mapping[str, str]) -> str | None:
    """Why $PAYAGG_ADMIN_TOKEN cannot be used (one line), or None."""
    token = admin_token(environ)
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        return f"{ADMIN_TOKEN_ENV}: must be at least {MIN_TOKEN_CHARS} characters, got {len(token)}"
    return None


def token_matches(authorization: str, expected: str) -> bool:
    """Whether an `Authorization: Bearer <token>` header carries the expected token."""
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer":
        given = ""
    return hmac.compare_digest(given.strip().encode(), expected.encode())
