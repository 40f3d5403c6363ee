"""Calls to one provider: breaker, mapping, one pooled HTTP exchange, errors mapped once here."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

from proxy.breaker import ProviderBreaker
from proxy.config import Provider
from proxy.deadlines import CancelAfter
from proxy.errors import InvalidRequest, ProviderFailed, ProviderRejected, ProviderTimeout
from proxy.http_wire import ConnectionPool, UpstreamConnectionError
from proxy.mapping import Answer, PaymentFields
from proxy.metrics import GatewayMetrics
from proxy.payment import Payment


class ProviderClient:
    """A configured provider as the request path sees it: `pay()` or a PaymentError."""

    def __init__(
        self, provider: Provider, metrics: GatewayMetrics, breaker: ProviderBreaker
    ) -> None:
        self.name = provider.name
        self.provider = provider
        self.breaker = breaker
        self._pool = ConnectionPool(provider.url)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mapping = provider.mapping
        self._timeout_s = provider.settings.timeout_s
        self._default_payer = provider.settings.default_payer
        self._duration = metrics.upstream_duration.labels(provider.name)
        parts = urlsplit(provider.url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # Everything but the rendered headers and body is the same for every payment.
        self._request_head = (
            f"{self._mapping.method} {target} HTTP/1.1\r\n"
            f"Host: {provider.host}\r\n"
            "Content-Type: application/json\r\n"
            "Accept: application/json\r\n"
        ).encode()

    def check(self, payment: Payment) -> None:
        """Reject, before any side effect, a payment this provider's mapping cannot express."""
        if self._mapping.requires_payer and payment.payer is None:
            raise InvalidRequest({"Payer": f"is required by provider {self.name}"})

    async def pay(self, payment: Payment, reference: str) -> Answer:
        """SUCCESS or DECLINED; raises ProviderUnavailable/ProviderFailed/ProviderTimeout."""
        fields = PaymentFields(
            transaction_id=payment.transaction_id,
            amount=payment.amount,
            currency=payment.currency,
            payer=payment.payer or self._default_payer,
            reference=reference,
            # The payment's identity, stable across retries whatever header they carry.
            idempotency_key=payment.transaction_id,
            provider=self.name,
        )
        with self.breaker.call():
            return await self._exchange(fields)

    def render_request(self, fields: PaymentFields) -> bytes:
        body = self._mapping.render_body(fields)
        headers = "".join(
            f"{name}: {value}\r\n" for name, value in self._mapping.render_headers(fields).items()
        )
        return b"%s%sContent-Length: %d\r\n\r\n%s" % (
            self._request_head,
            headers.encode(),
            len(body),
            body,
        )

    async def _exchange(self, fields: PaymentFields) -> Answer:
        request = self.render_request(fields)
        started = time.perf_counter()
        try:
            with CancelAfter(self._bound_loop(), self._timeout_s):
                answer = await self._pool.exchange(request)
        except TimeoutError:
            raise ProviderTimeout(self.name, self._timeout_s) from None
        except (UpstreamConnectionError, OSError) as error:
            raise ProviderFailed(
                self.name, f"cannot reach {self.name}: {_describe(error)}"
            ) from None
        finally:
            self._duration.observe(time.perf_counter() - started)
        verdict = self._mapping.classify(answer.status, answer.body)
        if verdict.outcome == "rejected":
            raise ProviderRejected(self.name, verdict.detail)
        if verdict.outcome == "failure":
            raise ProviderFailed(self.name, f"{self.name} failed: {verdict.detail}")
        return verdict

    def _bound_loop(self) -> asyncio.AbstractEventLoop:
        # Looked up once: a client and its pooled connections live in one loop.
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def close(self) -> None:
        self._pool.close()


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__
