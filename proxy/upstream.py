"""Calls to one provider: breaker, mapping, one pooled HTTP exchange, errors mapped once here."""

from __future__ import annotations

import time

import aiohttp

from proxy.breaker import ProviderBreaker
from proxy.config import Provider
from proxy.errors import InvalidRequest, ProviderFailed, ProviderRejected, ProviderTimeout
from proxy.mapping import Answer, PaymentFields
from proxy.metrics import GatewayMetrics
from proxy.payment import Payment

# A provider's answer is a small JSON document; anything larger is not one we can use.
_MAX_ANSWER_BYTES = 1024 * 1024


class ProviderClient:
    """A configured provider as the request path sees it: `pay()` or a PaymentError."""

    def __init__(
        self,
        provider: Provider,
        session: aiohttp.ClientSession,
        metrics: GatewayMetrics,
        breaker: ProviderBreaker,
    ) -> None:
        self.name = provider.name
        self.provider = provider
        self.breaker = breaker
        self._session = session
        self._metrics = metrics
        self._mapping = provider.mapping
        self._timeout = aiohttp.ClientTimeout(total=provider.settings.timeout_s)
        self._default_payer = provider.settings.default_payer
        self._duration = metrics.upstream_duration.labels(provider.name)

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
            idempotency_key=payment.idempotency_key,
            provider=self.name,
        )
        with self.breaker.call():
            return await self._exchange(fields)

    async def _exchange(self, fields: PaymentFields) -> Answer:
        headers = self._mapping.render_headers(fields)
        headers["Content-Type"] = "application/json"
        body = self._mapping.render_body(fields)
        started = time.perf_counter()
        try:
            async with self._session.request(
                self._mapping.method,
                self.provider.url,
                data=body,
                headers=headers,
                timeout=self._timeout,
            ) as answer:
                raw = await answer.content.read(_MAX_ANSWER_BYTES)
                status = answer.status
        except TimeoutError:
            raise ProviderTimeout(self.name, self.provider.settings.timeout_s) from None
        except (aiohttp.ClientError, OSError) as error:
            raise ProviderFailed(
                self.name, f"cannot reach {self.name}: {_describe(error)}"
            ) from None
        finally:
            self._duration.observe(time.perf_counter() - started)
        verdict = self._mapping.classify(status, raw)
        if verdict.outcome == "rejected":
            raise ProviderRejected(self.name, verdict.detail)
        if verdict.outcome == "failure":
            raise ProviderFailed(self.name, f"{self.name} failed: {verdict.detail}")
        return verdict


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__
