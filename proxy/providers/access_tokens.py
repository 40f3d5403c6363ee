"""Access tokens: how a provider's token is obtained (YAML `auth:`), cached and refreshed.

One token per provider per process. It is refreshed ahead of its expiry by a single request
however many payments wait for it, and once more when the provider answers 401. A token is a
credential: it never appears in a log line, a metric, an error message or `/v1/providers`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field, field_validator

from proxy.providers.mapping import as_number, http_url, lookup_path

# A token whose answer gives no usable lifetime is used for this long.
FALLBACK_LIFETIME_S = 60.0


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BasicCredentials(_Spec):
    """HTTP Basic (RFC 7617), as MTN's token endpoint and RFC 6749 clients use."""

    username: str = Field(min_length=1)
    password: str = Field(min_length=1)


class AuthSpec(_Spec):
    """How to obtain a provider's access token (YAML `auth:`); `{token}` then renders it."""

    url: str
    method: Literal["POST", "GET"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict)
    basic: BasicCredentials | None = None
    # Sent as `form` (application/x-www-form-urlencoded, as RFC 6749 token endpoints expect) or
    # `json`; no body when absent.
    body: dict[str, str] | None = None
    body_format: Literal["form", "json"] = "form"
    # Dotted paths into the JSON answer; the lifetime may be a number or a string of one.
    token: str = "access_token"
    expires_in: str = "expires_in"
    # Refreshed this long before it expires (at most half its lifetime, for short-lived ones).
    refresh_before_s: float = Field(60, ge=0, le=86400)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        return http_url(url)

    @field_validator("token", "expires_in")
    @classmethod
    def _dotted_path(cls, path: str) -> str:
        if not all(path.split(".")):
            raise ValueError(f"must be a dotted path into the JSON answer, got {path!r}")
        return path

    def request(self) -> TokenRequest:
        """The token request, built once: it never changes while the process runs."""
        headers = {"Accept": "application/json", **self.headers}
        if self.basic is not None:
            # RFC 7617; aiohttp's BasicAuth helper is deprecated in favour of one 3.9 lacks.
            pair = f"{self.basic.username}:{self.basic.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        body = b""
        if self.body is not None:
            if self.body_format == "json":
                headers["Content-Type"] = "application/json"
                body = json.dumps(self.body, separators=(",", ":")).encode()
            else:
                headers["Content-Type"] = "application/x-www-form-urlencoded"
                body = urlencode(self.body).encode()
        return TokenRequest(self.method, self.url, headers, body)


@dataclass(frozen=True)
class TokenRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes

    def __repr__(self) -> str:  # credentials are in the headers and the body
        return f"TokenRequest({self.method} {self.url})"


@dataclass(frozen=True)
class IssuedToken:
    value: str
    lifetime_s: float

    def __repr__(self) -> str:
        return f"IssuedToken(<hidden>, {self.lifetime_s:g}s)"


class TokenRefused(Exception):
    """The token endpoint answered, but no usable token; the message never holds the answer."""


def read_token(spec: AuthSpec, status: int, raw: bytes) -> IssuedToken:
    """The token in a token endpoint's answer, or TokenRefused saying why (never quoting it)."""
    if not 200 <= status < 300:
        raise TokenRefused(f"the token endpoint answered HTTP {status}")
    try:
        document = json.loads(raw)
    except ValueError:
        raise TokenRefused(f"the token endpoint's answer (HTTP {status}) is not JSON") from None
    value = lookup_path(document, spec.token)
    if not isinstance(value, str) or not value:
        raise TokenRefused(f"the token endpoint's answer has no `{spec.token}`")
    lifetime = as_number(lookup_path(document, spec.expires_in))
    lifetime_s = float(lifetime) if lifetime is not None and lifetime > 0 else FALLBACK_LIFETIME_S
    return IssuedToken(value, lifetime_s)


Fetch = Callable[[], Awaitable[IssuedToken]]
Clock = Callable[[], float]


class AccessTokens:
    """One provider's token in this process: cached, refreshed by one request at a time."""

    def __init__(self, fetch: Fetch, refresh_before_s: float, clock: Clock = time.monotonic):
        self._fetch = fetch
        self._refresh_before_s = refresh_before_s
        self._clock = clock
        self._token: str | None = None
        self._refresh_at = 0.0
        self._refreshing: asyncio.Future[str] | None = None

    async def current(self) -> str:
        """A token not due for refresh; waits for the one refresh in flight if there is none."""
        if self._token is not None and self._clock() < self._refresh_at:
            return self._token
        return await self._refreshed()

    async def after_refusal(self, refused: str) -> str:
        """A token other than `refused`, which the provider answered 401 to: refreshed once,
        however many payments it refused at the same time."""
        if self._token is not None and self._token != refused:
            return self._token  # another call already replaced it
        self._token = None
        return await self._refreshed()

    async def _refreshed(self) -> str:
        if self._refreshing is None:
            # A task of its own: a payment that gives up waiting does not cancel the refresh
            # the others wait for.
            self._refreshing = asyncio.ensure_future(self._refresh())
            self._refreshing.add_done_callback(self._forget_refresh)
        return await asyncio.shield(self._refreshing)

    async def _refresh(self) -> str:
        started = self._clock()
        issued = await self._fetch()
        ahead_s = min(self._refresh_before_s, issued.lifetime_s / 2)
        self._token = issued.value
        self._refresh_at = started + issued.lifetime_s - ahead_s
        return issued.value

    def _forget_refresh(self, done: asyncio.Future[str]) -> None:
        self._refreshing = None
        if not done.cancelled():
            done.exception()  # retrieved: its waiters have raised it already
