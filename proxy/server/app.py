"""Wiring: the gateway's state, its routes and the one handler aiohttp's low-level server calls.

payagg has seven fixed routes, so it routes with a dictionary and runs on aiohttp's low-level
`web.Server` instead of `web.Application`: the URL dispatcher, the middleware chain and the
request clone cost a tenth of a replayed payment (measured with `make bench`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from urllib.parse import unquote

from aiohttp import web

from proxy.admin.api import BREAKERS_PREFIX, RELOAD_PATH, AdminApi
from proxy.admin.token import admin_token
from proxy.clients.gate import CLIENT, Gate
from proxy.errors import (
    ClientClosed,
    ConnectionEnding,
    MalformedRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PaymentError,
    StoreUnavailable,
)
from proxy.observability.labels import OPEN_CLIENT, UNKNOWN_CLIENT
from proxy.observability.logs import log_request
from proxy.observability.metrics import UNKNOWN_PROVIDER, GatewayMetrics
from proxy.payments.callbacks_in import CALLBACK_PREFIX, CALLBACK_ROUTE, CallbackService
from proxy.payments.flow import OUTCOME, PROVIDER, PaymentService
from proxy.payments.idempotency import IdempotencyStore
from proxy.payments.json_answer import json_answer
from proxy.payments.reconciler import Reconciler
from proxy.payments.webhooks import WebhookDelivery
from proxy.providers.breaker import BreakerState, ProviderBreaker
from proxy.providers.upstream import ProviderClient
from proxy.server.connections import GatewayServer, UnreadableBody
from proxy.server.openapi import build_document
from proxy.settings.config import GatewayConfig
from proxy.store.client import StoreClient
from proxy.store.keys import all_shards
from proxy.store.outbox import Outbox
from proxy.store.rate_limits import RateLimits
from proxy.store.tokens import unique_tokens

log = logging.getLogger("payagg")

PAY_PATH = "/v1/pay"
LOOKUP_PREFIX = "/v1/payments/"
LOOKUP_ROUTE = LOOKUP_PREFIX + "{TransactionID}"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_new_request_id = unique_tokens()
# After the payments that started with a client a reload replaced are done.
_RETIRED_CLIENT_GRACE_S = 5.0


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
        self.metrics = GatewayMetrics(
            [provider.name for provider in config.providers], clients=_client_labels(config)
        )
        self.metrics.show_build(config.content_sha256)
        self.breakers = {
            provider.name: ProviderBreaker(
                provider.name,
                provider.settings.breaker,
                on_transition=_transition_hook(self.metrics),
            )
            for provider in config.providers
        }
        self.store = IdempotencyStore(
            config.redis,
            config.idempotency,
            self.metrics,
            enqueue_webhooks=bool(config.webhooks.url),
            webhook_clients=frozenset(c.name for c in config.clients if c.webhook is not None),
        )
        # Each provider has its own HTTP session (created on its first call, inside the loop):
        # its keep-alive pool, TLS settings and egress proxy.
        self._clients = {
            provider.name: ProviderClient(provider, self.metrics, self.breakers[provider.name])
            for provider in config.providers
        }
        self.gate = _gate(config, self.metrics)
        # Clients a reload replaced, closed once the payments that started with them are done.
        self._retired_clients: list[ProviderClient] = []
        self._retiring: set[asyncio.Task[None]] = set()
        self.admin = AdminApi(
            self,
            lambda: self.breakers,
            self.metrics,
            StoreClient(config.redis),  # its own connection, as the webhooks have
            config.redis.key_prefix,
            admin_token(os.environ),
        )
        # Its own Redis connection: deliveries never queue behind payments' commands.
        self.webhooks = WebhookDelivery(
            config.webhooks,
            Outbox(StoreClient(config.redis), config.redis.key_prefix),
            self.metrics,
            client_targets={c.name: c.webhook for c in config.clients if c.webhook is not None},
        )
        self._reconciling: asyncio.Task[None] | None = None
        self._use_clients(self._clients, previous=None)
        get_routes: dict[str, Handler] = {
            "/v1/providers": self._providers,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
            "/openapi.json": self._openapi,
        }
        self._routes: dict[str, dict[str, Handler]] = {
            PAY_PATH: {"POST": self._pay},
            **{path: {"GET": handler, "HEAD": handler} for path, handler in get_routes.items()},
        }
        self._lookup_route: dict[str, Handler] = {"GET": self._lookup, "HEAD": self._lookup}
        self._callback_route: dict[str, Handler] = {"PUT": self._callback, "POST": self._callback}
        # The admin port: what the ALB never forwards, and the admin API, served nowhere else.
        self._admin_routes: dict[str, dict[str, Handler]] = {
            path: {"GET": handler, "HEAD": handler}
            for path, handler in get_routes.items()
            if path in ("/metrics", "/v1/providers", "/openapi.json", "/healthz")
        }
        self._admin_routes[RELOAD_PATH] = {"POST": self.admin.reload}

    def paths(self) -> list[str]:
        """Every route this gateway serves, in the OpenAPI document's notation."""
        return [*self._routes, LOOKUP_ROUTE, CALLBACK_ROUTE]

    def start(self) -> None:
        """Start this process's reconciler, webhook delivery and admin state refresh (inside
        the running loop)."""
        if self._reconciling is None:
            self._reconciling = asyncio.get_running_loop().create_task(self.reconciler.run())
        self.webhooks.start()
        self.admin.sync.start()

    def use_config(self, config: GatewayConfig) -> None:
        """Serve `config`'s providers from now on (an admin reload), in one step.

        A provider whose settings are unchanged keeps its client (pool, token) and breaker; one
        whose breaker settings are unchanged keeps its breaker's state; new ones start closed.
        Payments in flight finish with the clients they started with.
        """
        clients = {}
        for provider in config.providers:
            old = self._clients.get(provider.name)
            if old is not None and (old.provider.settings, old.provider.callbacks) == (
                provider.settings,
                provider.callbacks,
            ):
                clients[provider.name] = old
                continue
            breaker = self.breakers.get(provider.name)
            if breaker is None or breaker.settings != provider.settings.breaker:
                breaker = ProviderBreaker(
                    provider.name,
                    provider.settings.breaker,
                    on_transition=_transition_hook(self.metrics),
                )
            clients[provider.name] = ProviderClient(provider, self.metrics, breaker)
        self.metrics.add_providers(clients)
        retired = [client for client in self._clients.values() if client not in clients.values()]
        self.config = config
        self._use_clients(clients, previous=self.payments)
        self.admin.sync.apply()  # a provider's new breaker is held as its old one was
        if retired:
            self._retire(retired)

    def _use_clients(
        self, clients: dict[str, ProviderClient], previous: PaymentService | None
    ) -> None:
        """Everything built from the providers: payments, callbacks, reconciler, OpenAPI."""
        self._clients = clients
        self.breakers = {name: client.breaker for name, client in clients.items()}
        self.payments = PaymentService(clients, self.store, self.gate)
        if previous is not None:
            # One set of payments settling and of waiters for callbacks, across reloads.
            self.payments.settling, self.payments.wakeups = previous.settling, previous.wakeups
        self.callbacks = CallbackService(clients, self.store.lifecycle, self.payments.wakeups)
        self.reconciler = Reconciler(self.store.lifecycle, clients, self.config.reconcile)
        if self._reconciling is not None:
            # A pass cut short leaves its leases to expire: those payments are asked again then.
            self._reconciling.cancel()
            self._reconciling = asyncio.get_running_loop().create_task(self.reconciler.run())
        self._openapi_document = build_document(
            [provider.name for provider in self.config.providers]
        )

    def _retire(self, clients: list[ProviderClient]) -> None:
        settling = set(self.payments.settling)
        self._retired_clients.extend(clients)

        async def close_when_unused() -> None:
            if settling:
                await asyncio.wait(settling)
            # A payment that looked its client up just before the reload is past its claim by now.
            await asyncio.sleep(_RETIRED_CLIENT_GRACE_S)
            for client in clients:
                self._retired_clients.remove(client)
                await client.close()

        task = asyncio.get_running_loop().create_task(close_when_unused())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def pending_payments(self) -> dict[str, int]:
        """Payments not final (PROCESSING, PENDING, UNRESOLVED) per provider, from the store;
        raises StoreUnavailable."""
        totals = await self._store_counts()
        providers = {field.split(":", 1)[1] for field in totals if ":" in field}
        return {
            name: totals.get(f"pending:{name}", 0) + totals.get(f"unresolved:{name}", 0)
            for name in providers
        }

    def server(self, admin: bool = False) -> web.Server:
        """The public port's server, or (`admin`) the admin port's: its own routes, the same
        connection limits."""
        return GatewayServer(
            self.handle_admin if admin else self.handle,
            self.config.server,
            answer_error=self.answer_unreadable,
            on_refused=self.metrics.connections_refused.inc,
        )

    async def handle_admin(self, request: web.BaseRequest) -> web.StreamResponse:
        """The admin port's routes, errors as JSON, each request logged."""
        started = time.perf_counter()
        request_id = _request_id(request)
        path = request.path
        try:
            if path.startswith(BREAKERS_PREFIX) and request.method == "POST":
                response: web.StreamResponse = await self.admin.force_breaker(
                    request, unquote(path[len(BREAKERS_PREFIX) :])
                )
            else:
                methods = self._admin_routes.get(path)
                handler = None if methods is None else methods.get(request.method)
                if handler is None:
                    raise NotFound(f"no such route on the admin port: {request.method} {path}")
                response = await handler(request)
        except PaymentError as error:
            response = self._answer_error(error, request_id)
        except web.HTTPException as http_error:  # 413 from reading an oversized body
            mapped = _HTTP_ERRORS.get(http_error.status, PaymentError)(http_error.reason)
            response = self._answer_error(mapped, request_id)
        except Exception:
            response = self._answer_error(_unexpected(request, request_id), request_id)
        return _logged(request, response, request_id, "", started)

    async def close(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for payments still settling, then close every connection."""
        await self.admin.close()
        for retiring in self._retiring:
            retiring.cancel()
        if self._reconciling is not None:
            self._reconciling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciling
            self._reconciling = None
        await asyncio.gather(self._settle_payments(timeout_s), self.webhooks.close(timeout_s))
        for client in [*self._clients.values(), *self._retired_clients]:
            await client.close()
        await self.gate.close()
        await self.store.close()

    async def _settle_payments(self, timeout_s: float) -> None:
        settling = self.payments.settling
        if settling:
            log.info("waiting for %d payment(s) in flight before exit", len(settling))
            await asyncio.wait(settling, timeout=timeout_s)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Route, then answer errors as JSON and log and count every request."""
        started = time.perf_counter()
        request_id = _request_id(request)
        path = request.path
        outcome = ""
        try:
            response = await self._route(request, path)
            outcome = request.get(OUTCOME, "")
        except PaymentError as error:
            response, outcome = self._answer_error(error, request_id), error.outcome
        except web.HTTPException as http_error:  # 413 from reading an oversized body
            mapped = _HTTP_ERRORS.get(http_error.status, PaymentError)(http_error.reason)
            response, outcome = self._answer_error(mapped, request_id), mapped.outcome
        except Exception as unexpected:
            answered = _unreadable(request, unexpected) or _unexpected(request, request_id)
            response, outcome = self._answer_error(answered, request_id), answered.outcome
        if path == PAY_PATH and outcome:
            self.metrics.count(
                request.get(PROVIDER) or UNKNOWN_PROVIDER,
                outcome,
                request.get(CLIENT) or UNKNOWN_CLIENT,
            )
        self.metrics.observe_answer(
            self._route_label(path), outcome or "ok", time.perf_counter() - started
        )
        return _logged(request, response, request_id, outcome, started)

    def answer_unreadable(self, request: web.BaseRequest, error: PaymentError) -> web.Response:
        """The answer to a request the connection could not read (malformed, too slow).

        Its route is unknown, so it is counted as a payment request of no known provider.
        """
        started = time.perf_counter()
        request_id = _request_id(request)
        response = self._answer_error(error, request_id)
        self.metrics.count(UNKNOWN_PROVIDER, error.outcome, UNKNOWN_CLIENT)
        self.metrics.observe_answer("unmatched", error.outcome, time.perf_counter() - started)
        _logged(request, response, request_id, error.outcome, started)
        return response

    def _answer_error(self, error: PaymentError, request_id: str) -> web.Response:
        response = _error_response(error)
        if isinstance(error, ConnectionEnding):
            response.force_close()
        if isinstance(error, MalformedRequest):
            # The reason only: the request's bytes may carry a payment's details.
            log.warning(
                "malformed HTTP request: %s",
                error.reason,
                extra={"fields": {"request_id": request_id, "reason": error.reason}},
            )
        return response

    def _route(self, request: web.BaseRequest, path: str) -> Awaitable[web.StreamResponse]:
        methods = self._routes.get(path)
        if methods is None:
            if _callback_parts(request)[0]:
                methods = self._callback_route
            elif _lookup_transaction_id(request):
                methods = self._lookup_route
            else:
                raise NotFound("no such route")
        handler = methods.get(request.method)
        if handler is None:
            not_allowed = MethodNotAllowed(f"{request.method} is not allowed on {path}")
            not_allowed.headers["Allow"] = ",".join(methods)
            raise not_allowed
        return handler(request)

    def _route_label(self, path: str) -> str:
        """The route as the OpenAPI document names it: a label value never taken from the URL."""
        if path in self._routes:
            return path
        if path.startswith(CALLBACK_PREFIX):
            return CALLBACK_ROUTE
        return LOOKUP_ROUTE if path.startswith(LOOKUP_PREFIX) else "unmatched"

    def _pay(self, request: web.BaseRequest) -> Awaitable[web.Response]:
        # Looked up at each request: a reload replaces the payment service.
        return self.payments.pay(request)

    async def _lookup(self, request: web.BaseRequest) -> web.Response:
        return await self.payments.lookup(request, _lookup_transaction_id(request))

    async def _callback(self, request: web.BaseRequest) -> web.Response:
        provider, token = _callback_parts(request)
        return await self.callbacks.receive(request, provider, token)

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
                    **self.admin.describe_forced(provider.name),
                }
            )
        return json_answer({"providers": answer})

    async def _healthz(self, request: web.BaseRequest) -> web.Response:
        return json_answer({"status": "ok"})

    async def _readyz(self, request: web.BaseRequest) -> web.Response:
        try:
            await self.store.ping()
        except StoreUnavailable as error:
            # Ready means a payment could be taken now: Redis must accept a write, not only PING.
            reason = f"redis cannot take a write: {error.__cause__ or error}"
            return json_answer({"status": "not_ready", "reason": reason}, status=503)
        return json_answer({"status": "ready"})

    async def _metrics(self, request: web.BaseRequest) -> web.Response:
        for name, breaker in self.breakers.items():
            # The state callers see (forced or not), after a due open -> half_open move.
            self.metrics.show_state(name, breaker.state)
        await self.webhooks.refresh_backlog()
        with contextlib.suppress(StoreUnavailable):
            await self._show_store_gauges()
        return web.Response(
            body=self.metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def _show_store_gauges(self) -> None:
        """The pending and unresolved gauges, from the store's counters: every process shows
        the same, right, values."""
        totals = await self._store_counts()
        for provider in self.config.providers:
            name = provider.name
            self.metrics.payments_pending.labels(name).set(totals.get(f"pending:{name}", 0))
            self.metrics.unresolved_payments.labels(name).set(totals.get(f"unresolved:{name}", 0))

    async def _store_counts(self) -> dict[str, int]:
        """`pending:<PROVIDER>` and `unresolved:<PROVIDER>` summed over the shards."""
        totals: dict[str, int] = {}
        lifecycle = self.store.lifecycle
        with lifecycle.errors:
            for shard in all_shards(lifecycle.prefix):
                for field, count in (await lifecycle.records.counts(shard)).items():
                    totals[field] = totals.get(field, 0) + count
        return totals

    async def _openapi(self, request: web.BaseRequest) -> web.Response:
        return json_answer(self._openapi_document)


def _client_labels(config: GatewayConfig) -> list[str]:
    if config.auth == "off":
        return [OPEN_CLIENT]
    return [client.name for client in config.clients]


def _gate(config: GatewayConfig, metrics: GatewayMetrics) -> Gate:
    """The gate, with its own Redis connection for the rate limits when clients have them."""
    limits = None
    if config.auth == "required":
        limits = RateLimits(StoreClient(config.redis), config.redis.key_prefix)
    return Gate(config.auth, config.clients, limits, metrics)


def _request_id(request: web.BaseRequest) -> str:
    request_id = request.headers.get("X-Request-ID", "")
    return request_id if _REQUEST_ID.fullmatch(request_id) else _new_request_id()


def _unreadable(request: web.BaseRequest, error: Exception) -> ConnectionEnding | None:
    """The answer when reading the body failed: too slow, malformed, or the client hung up.

    A hang-up mid-body surfaces as a reset while reading the body of a connection now closed.
    """
    if isinstance(error, UnreadableBody):
        return error.error
    if request.transport is None and isinstance(error, ConnectionError):
        return ClientClosed()
    return None


def _unexpected(request: web.BaseRequest, request_id: str) -> PaymentError:
    log.exception(
        "unexpected error answering %s %s",
        request.method,
        request.path,
        extra={"fields": {"request_id": request_id}},
    )
    return PaymentError("unexpected error; it was logged with this request id")


def _logged(
    request: web.BaseRequest,
    response: web.StreamResponse,
    request_id: str,
    outcome: str,
    started: float,
) -> web.StreamResponse:
    response.headers["X-Request-ID"] = request_id
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


def _lookup_transaction_id(request: web.BaseRequest) -> str:
    """`{TransactionID}` of `/v1/payments/{TransactionID}`, or "" for another path.

    It is one path segment, as in the OpenAPI document; a `/` in it arrives as `%2F`, which
    `path_safe` keeps encoded (with `%25`) so the segment can be split off first.
    """
    path = request.rel_url.path_safe
    if not path.startswith(LOOKUP_PREFIX) or "/" in path[len(LOOKUP_PREFIX) :]:
        return ""
    return unquote(path[len(LOOKUP_PREFIX) :])


def _callback_parts(request: web.BaseRequest) -> tuple[str, str]:
    """`{provider}` and `{token}` of `/v1/callbacks/{provider}/{token}`, or ("", "")."""
    path = request.rel_url.path_safe
    if not path.startswith(CALLBACK_PREFIX):
        return "", ""
    parts = path[len(CALLBACK_PREFIX) :].split("/")
    if len(parts) != 2 or not all(parts):
        return "", ""
    return unquote(parts[0]), unquote(parts[1])


def _error_response(error: PaymentError) -> web.Response:
    # orjson: a fail-fast 503 is mostly this serialisation (json_response uses json.dumps).
    return json_answer(error.body(), error.status, error.headers)
