"""Wiring: the aiohttp application, its resources, routes and the one error/log middleware."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources

from aiohttp import web

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
from proxy.upstream import ProviderClient

log = logging.getLogger("payagg")

CONFIG = web.AppKey("config", GatewayConfig)
METRICS = web.AppKey("metrics", GatewayMetrics)
BREAKERS = web.AppKey("breakers", dict[str, ProviderBreaker])
STORE = web.AppKey("store", IdempotencyStore)
PAYMENTS = web.AppKey("payments", PaymentService)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# A random per-process prefix and a counter: unique across processes without a system call
# for randomness on every request (uuid4 was a tenth of a replay's CPU time).
_REQUEST_ID_PREFIX = secrets.token_hex(8)
_request_numbers = itertools.count(1)


def _new_request_id() -> str:
    return f"{_REQUEST_ID_PREFIX}{next(_request_numbers):016x}"


_HTTP_ERRORS: dict[int, Callable[[str], PaymentError]] = {
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(config: GatewayConfig) -> web.Application:
    """A fresh application: its own metrics, breakers, HTTP session and Redis pool."""
    app = web.Application(
        client_max_size=config.server.max_body_bytes, middlewares=[_gateway_middleware]
    )
    metrics = GatewayMetrics([provider.name for provider in config.providers])
    app[CONFIG] = config
    app[METRICS] = metrics
    app[BREAKERS] = {
        provider.name: ProviderBreaker(
            provider.name, provider.settings.breaker, on_transition=_transition_hook(metrics)
        )
        for provider in config.providers
    }
    app.cleanup_ctx.append(_resources)
    app.on_shutdown.append(_let_payments_settle)
    app.router.add_post("/v1/pay", _pay)
    app.router.add_get("/v1/payments/{idempotency_key}", _lookup)
    app.router.add_get("/v1/providers", _providers)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/openapi.json", _openapi)
    return app


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


async def _resources(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    store = IdempotencyStore(config.redis, config.idempotency, app[METRICS])
    # Each provider keeps a pool of keep-alive connections, reused across payments.
    clients = {
        provider.name: ProviderClient(provider, app[METRICS], app[BREAKERS][provider.name])
        for provider in config.providers
    }
    app[STORE] = store
    app[PAYMENTS] = PaymentService(clients, store)
    yield
    for client in clients.values():
        client.close()
    await store.close()


async def _let_payments_settle(app: web.Application) -> None:
    settling = app[PAYMENTS].settling
    if settling:
        log.info("waiting for %d payment(s) in flight before exit", len(settling))
        await asyncio.wait(settling, timeout=app[CONFIG].server.shutdown_timeout_s)


@web.middleware
async def _gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, errors as JSON, one log line and the request counter, for every request."""
    started = time.perf_counter()
    request_id = request.headers.get("X-Request-ID", "")
    if not _REQUEST_ID.match(request_id):
        request_id = _new_request_id()
    outcome = ""
    try:
        response = await handler(request)
        outcome = request.get(OUTCOME, "")
    except PaymentError as error:
        response, outcome = _error_response(error), error.outcome
    except web.HTTPException as http_error:
        mapped = _HTTP_ERRORS.get(http_error.status, PaymentError)(http_error.reason)
        response, outcome = _error_response(mapped), mapped.outcome
        if http_error.status == 405 and "Allow" in http_error.headers:
            response.headers["Allow"] = http_error.headers["Allow"]
    except Exception:
        log.exception(
            "unexpected error answering %s %s",
            request.method,
            request.path,
            extra={"fields": {"request_id": request_id}},
        )
        unexpected = PaymentError("unexpected error; it was logged with this request id")
        response, outcome = _error_response(unexpected), unexpected.outcome
    response.headers["X-Request-ID"] = request_id
    if request.path == "/v1/pay" and outcome:
        provider = request.get(PROVIDER, UNKNOWN_PROVIDER)
        request.app[METRICS].count(provider, outcome)
    log_request(
        {
            "request_id": request_id,
            "method": request.method,
            "path": request.path,
            "provider": request.get(PROVIDER),
            "outcome": outcome or None,
            "status": response.status,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
    )
    return response


def _error_response(error: PaymentError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


async def _pay(request: web.Request) -> web.Response:
    return await request.app[PAYMENTS].pay(request)


async def _lookup(request: web.Request) -> web.Response:
    return await request.app[PAYMENTS].lookup(request)


async def _providers(request: web.Request) -> web.Response:
    answer = []
    for provider in request.app[CONFIG].providers:
        breaker = request.app[BREAKERS][provider.name]
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


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    try:
        await request.app[STORE].ping()
    except StoreUnavailable:
        return web.json_response(
            {"status": "not_ready", "reason": "redis does not answer PING"}, status=503
        )
    return web.json_response({"status": "ready"})


async def _metrics(request: web.Request) -> web.Response:
    for breaker in request.app[BREAKERS].values():
        _ = breaker.state  # applies a due open -> half_open move before the gauges are read
    return web.Response(
        body=request.app[METRICS].render(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


_OPENAPI = json.loads(resources.files("proxy").joinpath("openapi.json").read_text())


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(_OPENAPI)
