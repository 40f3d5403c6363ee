"""Wiring: the gateway's state, its routes and the one handler aiohttp's low-level server calls.

payagg has seven fixed routes, so it routes with a dictionary and runs on aiohttp's low-level
`web.Server` instead of `web.Application`: the URL dispatcher, the middleware chain and the
request clone cost a tenth of a replayed payment (measured with `make bench`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from urllib.parse import unquote

import orjson
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from proxy.breaker import BreakerState, ProviderBreaker
from proxy.config import GatewayConfig
from proxy.errors import (
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PaymentError,
    StoreUnavailable,
)
from proxy.idempotency import IdempotencyStore
from proxy.logs import log_request
from proxy.metrics import UNKNOWN_PROVIDER, GatewayMetrics
from proxy.pay import OUTCOME, PROVIDER, PaymentService
from proxy.tokens import unique_tokens
from proxy.upstream import ProviderClient

log = logging.getLogger("payagg")

PAY_PATH = "/v1/pay"
LOOKUP_PREFIX = "/v1/payments/"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_new_request_id = unique_tokens()


_HTTP_ERRORS: dict[int, Callable[[str], PaymentError]] = {
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
}
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class Gateway:
    """One process's gateway: metrics, breakers, the Redis store and the provider clients."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.metrics = GatewayMetrics([provider.name for provider in config.providers])
        self.breakers = {
            provider.name: ProviderBreaker(
                provider.name,
                provider.settings.breaker,
                on_transition=_transition_hook(self.metrics),
            )
            for provider in config.providers
        }
        self.store = IdempotencyStore(config.redis, config.idempotency, self.metrics)
        # Each provider keeps a pool of keep-alive connections, reused across payments.
        self._clients = {
            provider.name: ProviderClient(provider, self.metrics, self.breakers[provider.name])
            for provider in config.providers
        }
        self.payments = PaymentService(self._clients, self.store)
        get_routes: dict[str, Handler] = {
            "/v1/providers": self._providers,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
            "/openapi.json": self._openapi,
        }
        self._routes: dict[str, dict[str, Handler]] = {
            PAY_PATH: {"POST": self.payments.pay},
            **{path: {"GET": handler, "HEAD": handler} for path, handler in get_routes.items()},
        }
        self._lookup_route: dict[str, Handler] = {"GET": self._lookup, "HEAD": self._lookup}

    def paths(self) -> list[str]:
        """Every route this gateway serves, in the OpenAPI document's notation."""
        return [*self._routes, LOOKUP_PREFIX + "{idempotency_key}"]

    def make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        """aiohttp's request factory, with the configured body limit (413 beyond it)."""
        return web.BaseRequest(
            message,
            payload,
            protocol,
            writer,
            task,
            task.get_loop(),
            client_max_size=self.config.server.max_body_bytes,
        )

    def server(self) -> web.Server:
        # aiohttp's access log would duplicate the gateway's own request line.
        return web.Server(self.handle, request_factory=self.make_request, access_log=None)

    async def close(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for payments still settling, then close every connection."""
        settling = self.payments.settling
        if settling:
            log.info("waiting for %d payment(s) in flight before exit", len(settling))
            await asyncio.wait(settling, timeout=timeout_s)
        for client in self._clients.values():
            client.close()
        await self.store.close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Route, then answer errors as JSON and log and count every request."""
        started = time.perf_counter()
        request_id = request.headers.get("X-Request-ID", "")
        if not _REQUEST_ID.match(request_id):
            request_id = _new_request_id()
        path = request.path
        outcome = ""
        try:
            response = await self._route(request, path)
            outcome = request.get(OUTCOME, "")
        except PaymentError as error:
            response, outcome = _error_response(error), error.outcome
        except web.HTTPException as http_error:  # 413 from reading an oversized body
            mapped = _HTTP_ERRORS.get(http_error.status, PaymentError)(http_error.reason)
            response, outcome = _error_response(mapped), mapped.outcome
        except Exception:
            log.exception(
                "unexpected error answering %s %s",
                request.method,
                path,
                extra={"fields": {"request_id": request_id}},
            )
            unexpected = PaymentError("unexpected error; it was logged with this request id")
            response, outcome = _error_response(unexpected), unexpected.outcome
        response.headers["X-Request-ID"] = request_id
        provider = request.get(PROVIDER)
        if path == PAY_PATH and outcome:
            self.metrics.count(provider or UNKNOWN_PROVIDER, outcome)
        log_request(
            {
                "request_id": request_id,
                "method": request.method,
                "path": path,
                "provider": provider,
                "outcome": outcome or None,
                "status": response.status,
                "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            }
        )
        return response

    def _route(self, request: web.BaseRequest, path: str) -> Awaitable[web.StreamResponse]:
        methods = self._routes.get(path)
        if methods is None:
            if not _lookup_key(request):
                raise NotFound("no such route")
            methods = self._lookup_route
        handler = methods.get(request.method)
        if handler is None:
            not_allowed = MethodNotAllowed(f"{request.method} is not allowed on {path}")
            not_allowed.headers["Allow"] = ",".join(methods)
            raise not_allowed
        return handler(request)

    async def _lookup(self, request: web.BaseRequest) -> web.Response:
        return await self.payments.lookup(_lookup_key(request))

    async def _providers(self, request: web.BaseRequest) -> web.Response:
        answer = []
        for provider in self.config.providers:
            breaker = self.breakers[provider.name]
            counts = breaker.window_counts()
            state = breaker.state
            answer.append(
                {
                    "name": provider.name,
                    "upstream_host": provider.host,
                    "state": state.value,
                    "retry_after_s": breaker.retry_after_s() if state is BreakerState.OPEN else 0,
                    "window": {"calls": counts.calls, "failures": counts.failures},
                    "timeout_s": provider.settings.timeout_s,
                }
            )
        return web.json_response({"providers": answer})

    async def _healthz(self, request: web.BaseRequest) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.BaseRequest) -> web.Response:
        try:
            await self.store.ping()
        except StoreUnavailable as error:
            # Ready means a payment could be taken now: Redis must accept a write, not only PING.
            reason = f"redis cannot take a write: {error.__cause__ or error}"
            return web.json_response({"status": "not_ready", "reason": reason}, status=503)
        return web.json_response({"status": "ready"})

    async def _metrics(self, request: web.BaseRequest) -> web.Response:
        for breaker in self.breakers.values():
            _ = breaker.state  # applies a due open -> half_open move before the gauges are read
        return web.Response(
            body=self.metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def _openapi(self, request: web.BaseRequest) -> web.Response:
        return web.json_response(_OPENAPI)


def _transition_hook(metrics: GatewayMetrics) -> Callable[[str, BreakerState, BreakerState], None]:
    def on_transition(provider: str, before: BreakerState, after: BreakerState) -> None:
        metrics.on_transition(provider, before, after)
        level = logging.WARNING if after is BreakerState.OPEN else logging.INFO
        log.log(
            level,
            "circuit breaker %s: %s -> %s",
            provider,
            before.value,
            after.value,
            extra={"fields": {"provider": provider, "from_state": before, "to_state": after}},
        )

    return on_transition


def _lookup_key(request: web.BaseRequest) -> str:
    """`{idempotency_key}` of `/v1/payments/{idempotency_key}`, or "" for another path.

    The key is one path segment, as in the OpenAPI document; a key with a `/` arrives as `%2F`,
    which `path_safe` keeps encoded (with `%25`) so the segment can be split off first.
    """
    path = request.rel_url.path_safe
    if not path.startswith(LOOKUP_PREFIX) or "/" in path[len(LOOKUP_PREFIX) :]:
        return ""
    return unquote(path[len(LOOKUP_PREFIX) :])


def _error_response(error: PaymentError) -> web.Response:
    # orjson: a fail-fast 503 is mostly this serialisation (json_response uses json.dumps).
    return web.Response(
        body=orjson.dumps(error.body()),
        status=error.status,
        headers={**error.headers, "Content-Type": "application/json"},
    )


_OPENAPI = json.loads(resources.files("proxy").joinpath("openapi.json").read_text())
