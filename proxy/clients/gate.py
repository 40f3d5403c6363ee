"""Admission to the payment API: which client calls (401) and whether it may now (429)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from aiohttp import web

from proxy.clients.keys import OPEN, Client, KeyRing
from proxy.errors import RateLimited, StoreUnavailable
from proxy.observability.labels import UNKNOWN_CLIENT
from proxy.observability.metrics import GatewayMetrics
from proxy.settings.clients import AuthMode, ClientSettings
from proxy.store.client import RedisReplyError, RedisUnavailable
from proxy.store.rate_limits import RateLimits

log = logging.getLogger("payagg.clients")

# The request's client name, for the `client` label (never taken from the request itself).
CLIENT = web.RequestKey("client", str)


class Gate:
    """Admits requests to `POST /v1/pay` and `GET /v1/payments/...` (CONTRACT §2)."""

    def __init__(
        self,
        auth: AuthMode,
        clients: Sequence[ClientSettings],
        limits: RateLimits | None,
        metrics: GatewayMetrics,
    ) -> None:
        self._required = auth == "required"
        self._keys = KeyRing(clients)
        self._limits = limits
        self._metrics = metrics
        if not self._required:
            log.warning(
                "auth: off: anyone who reaches this proxy can start payments and read every "
                "payment; set `auth: required` with `clients:` outside a local demo"
            )

    async def admit(self, request: web.BaseRequest, *, limited: bool) -> Client:
        """The calling client; raises Unauthorized (no or an unknown key) before anything else,
        then RateLimited when `limited` and the client is over its rate, or StoreUnavailable
        when Redis cannot say (fail closed, as for a payment)."""
        if not self._required:
            request[CLIENT] = OPEN.name
            return OPEN
        request[CLIENT] = UNKNOWN_CLIENT
        client = self._keys.authenticate(request.headers.get("Authorization"))
        request[CLIENT] = client.name
        if limited and client.rate_per_s is not None and self._limits is not None:
            await self._check_rate(client, client.rate_per_s)
        return client

    async def _check_rate(self, client: Client, rate_per_s: float) -> None:
        assert self._limits is not None
        try:
            wait_s = await self._limits.wait_s(client.name, rate_per_s, client.burst)
        except (RedisUnavailable, RedisReplyError, OSError) as error:
            self._metrics.store_errors.inc()
            log.warning("rate limit store unavailable: %s", error)
            raise StoreUnavailable() from error
        if wait_s:
            raise RateLimited(wait_s)

    async def close(self) -> None:
        if self._limits is not None:
            await self._limits.close()
