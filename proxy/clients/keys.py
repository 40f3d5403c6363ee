"""API keys: the client a `Bearer` key belongs to, found by its SHA-256 (CONTRACT §2, 401)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.errors import Unauthorized
from proxy.observability.labels import OPEN_CLIENT
from proxy.settings.clients import ClientSettings

# RFC 6750's token characters; anything else is no key at all. Bounded so hashing costs nothing.
_MAX_KEY_CHARS = 512
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=")


@dataclass(frozen=True, slots=True)
class Client:
    """A caller of the payment API, as the request path sees it."""

    # The `client` metrics label.
    name: str
    # What its TransactionIDs are scoped by ("": the open API's payments, keyed as ever).
    scope: str
    # Written as the record's `client` field (None: the open API, no field, as before clients).
    record_name: str | None
    # Lower-case provider names it may use; None: every provider.
    providers: frozenset[str] | None = None
    rate_per_s: float | None = None  # None: no limit
    burst: int = 1

    def may_use(self, provider: str) -> bool:
        return self.providers is None or provider.lower() in self.providers


# `auth: off`: today's open API, one caller, unlimited.
OPEN = Client(name=OPEN_CLIENT, scope="", record_name=None)


def client_of(settings: ClientSettings) -> Client:
    return Client(
        name=settings.name,
        scope="" if settings.owns_open_payments else settings.name,
        record_name=settings.name,
        providers=frozenset(provider.lower() for provider in settings.providers),
        rate_per_s=settings.rate_per_s,
        burst=settings.burst,
    )


def key_hash(key: str) -> str:
    """What the config holds for `key`: its SHA-256, as 64 lowercase hex digits."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """Every configured key hash, and the client it belongs to."""

    def __init__(self, clients: Iterable[ClientSettings]) -> None:
        self._by_hash = {
            digest: (digest, client_of(settings))
            for settings in clients
            for digest in settings.key_hashes
        }

    def authenticate(self, authorization: str | None) -> Client:
        """The client whose key the header carries; raises Unauthorized.

        The key is hashed before anything else: the lookup is by its hash, and the configured
        hash found is compared with it in constant time, so no configured key leaks by timing.
        """
        key = _bearer_key(authorization)
        if key is None:
            raise Unauthorized()
        digest = key_hash(key)
        stored, client = self._by_hash.get(digest, ("", None))
        if client is None or not hmac.compare_digest(stored, digest):
            raise Unauthorized()
        return client


def _bearer_key(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key or len(key) > _MAX_KEY_CHARS:
        return None
    return key if _TOKEN_CHARS.issuperset(key) else None
