"""Access tokens: the credentials a mock accepts, and tokens issued, checked and expired."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]  # seconds, monotonic; injected so expiry is testable without sleeps


@dataclass(frozen=True)
class Credentials:
    """What the token endpoint accepts; a part left None accepts any non-empty value."""

    client_id: str | None = None
    client_secret: str | None = None
    subscription_key: str | None = None  # MTN only

    def accept_client(self, client_id: str, client_secret: str) -> bool:
        return matches(self.client_id, client_id) and matches(self.client_secret, client_secret)

    def accept_subscription_key(self, key: str) -> bool:
        return matches(self.subscription_key, key)


def matches(expected: str | None, given: str) -> bool:
    if not given:
        return False
    # Constant time, as a real provider compares secrets.
    return expected is None or hmac.compare_digest(expected.encode(), given.encode())


class Tokens:
    """Tokens issued by this process, each valid until its expiry on `clock`."""

    def __init__(self, ttl_s: float, clock: Clock) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._expiries: dict[str, float] = {}

    def issue(self) -> str:
        now = self._clock()
        # Forget expired tokens, so a long-running mock does not grow without bound.
        self._expiries = {token: at for token, at in self._expiries.items() if at > now}
        token = secrets.token_urlsafe(32)
        self._expiries[token] = now + self.ttl_s
        return token

    def valid(self, token: str | None) -> bool:
        """False for a missing, unknown or expired token."""
        if token is None:
            return False
        expiry = self._expiries.get(token)
        return expiry is not None and self._clock() < expiry


@dataclass(frozen=True)
class Access:
    """What a provider module needs to authenticate a request."""

    credentials: Credentials
    tokens: Tokens


def whole(seconds: float) -> float | int:
    """`seconds` as an integer when it is one, as providers write `expires_in`."""
    return int(seconds) if seconds == int(seconds) else seconds
