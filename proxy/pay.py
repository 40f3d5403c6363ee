"""The request path of `POST /v1/pay` and the payment lookup, step by step (CONTRACT §2)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from aiohttp import HttpVersion11, web

from proxy.errors import (
    NotFound,
    PayloadTooLarge,
    PaymentAlreadyExists,
    ProviderUnavailable,
    UnsupportedMediaType,
)
from proxy.idempotency import Claim, IdempotencyStore, describe
from proxy.mapping import FINAL_OUTCOMES, Answer
from proxy.payment import Payment, parse_payment
from proxy.payments.settle import wait_for_final
from proxy.records import StoredResult
from proxy.upstream import ProviderClient

PROVIDER = web.RequestKey("provider", str)
OUTCOME = web.RequestKey("outcome", str)
_JSON = "application/json"
_REPLAY_HEADERS = {"Content-Type": _JSON, "Idempotent-Replayed": "true"}


class PaymentService:
    def __init__(self, providers: Mapping[str, ProviderClient], store: IdempotencyStore) -> None:
        self._providers = {name.lower(): client for name, client in providers.items()}
        self._known = set(self._providers)
        self._store = store
        # Payments still settling; kept so shutdown can wait for them and the GC cannot drop them.
        self.settling: set[asyncio.Task[tuple[int, bytes]]] = set()

    async def pay(self, request: web.BaseRequest) -> web.Response:
        payment = parse_payment(
            await _json_body(request), request.headers.get("Idempotency-Key"), self._known
        )
        provider = self._providers[payment.provider_key.lower()]
        request[PROVIDER] = provider.name
        provider.check(payment)
        if provider.breaker.rejects_now():
            # Fail fast without taking a lock: only a stored answer may still be served.
            stored = await self._store.replay(payment, provider.name)
            if stored is None:
                raise ProviderUnavailable(provider.name, provider.breaker.retry_after_s())
            return _replay(request, stored)
        claimed = await self._store.claim(payment, provider.name)
        if isinstance(claimed, StoredResult):
            return _replay(request, claimed)
        # Shielded: a client that hangs up must not abandon a payment the provider may be
        # charging; the result is still stored, and the client's retry gets the replay.
        task = request.task.get_loop().create_task(self._settle(provider, payment, claimed))
        self.settling.add(task)
        task.add_done_callback(self.settling.discard)
        status, body = await asyncio.shield(task)
        request[OUTCOME] = "success" if status == 200 else "declined"
        return web.Response(status=status, body=body, content_type=_JSON)

    async def _settle(
        self, provider: ProviderClient, payment: Payment, claim: Claim
    ) -> tuple[int, bytes]:
        try:
            answer = await _provider_answer(provider, payment, claim.reference)
        except BaseException:
            await claim.release()
            raise
        status, body = _final_answer(provider.name, payment, claim.reference, answer)
        await claim.keep(status, body)
        return status, body

    async def lookup(self, transaction_id: str) -> web.Response:
        state = await self._store.peek(transaction_id)
        # Another payment's old record, stored here because it sent this TransactionID as its
        # Idempotency-Key, is not this payment: a replay would answer 422 (CONTRACT §2).
        if state is None or not state.belongs_to(transaction_id):
            raise NotFound("no payment with this TransactionID")
        return web.json_response(describe(state))


async def _provider_answer(provider: ProviderClient, payment: Payment, reference: str) -> Answer:
    """The provider's final answer, waited for within its `sync_wait_s` when it is pending.

    Interim (#14 before the payment lifecycle of #15 lands): a payment still pending after the
    wait is answered as an unknown outcome (504, key released, the same reference on retry);
    the lifecycle replaces this with 202 PENDING and reconciliation.
    """
    try:
        answer = await provider.pay(payment, reference, provider.callback_url(reference))
    except PaymentAlreadyExists:
        if not provider.has_status:
            raise
    else:
        if answer.outcome in FINAL_OUTCOMES:
            return answer
    return await wait_for_final(provider, payment, reference, provider.sync_wait_s)


async def _json_body(request: web.BaseRequest) -> bytes:
    # The exact header is the common case; only other spellings need aiohttp's parser.
    if request.headers.get("Content-Type") != _JSON and request.content_type != _JSON:
        raise UnsupportedMediaType(f"Content-Type must be {_JSON}, got {request.content_type!r}")
    content = request.content
    if content.is_eof():
        # The whole body came in with the headers (the common case): taken as it is, without
        # the chunk loop and copies of request.read().
        body = content.read_nowait()
        if len(body) > request.client_max_size:
            raise _too_large(request)
        return body
    if request.headers.get("Expect", "").lower() == "100-continue":
        await _let_the_body_come(request)
    # aiohttp enforces client_max_size (= server.max_body_bytes) while reading: 413.
    return await request.read()


async def _let_the_body_come(request: web.BaseRequest) -> None:
    """Answer `Expect: 100-continue`, as aiohttp's router did for web.Application.

    A client that asks (curl for large bodies, .NET's HttpClient) waits for the go-ahead before
    sending the body; unanswered, every such payment would stall for the client's own timeout.
    A body announced as too large is refused at once instead, which is what the header is for.
    """
    if (request.content_length or 0) > request.client_max_size:
        raise _too_large(request)
    if request.version == HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not part of the response's size


def _too_large(request: web.BaseRequest) -> PayloadTooLarge:
    return PayloadTooLarge(f"the body is larger than {request.client_max_size} bytes")


def _replay(request: web.BaseRequest, stored: StoredResult) -> web.Response:
    request[OUTCOME] = "replayed"
    return web.Response(status=stored.status, body=stored.body, headers=_REPLAY_HEADERS)


def _final_answer(
    provider: str, payment: Payment, reference: str, answer: Answer
) -> tuple[int, bytes]:
    body: dict[str, Any]
    if answer.outcome == "success":
        status = 200
        body = {
            "status": "SUCCESS",
            "transaction_id": payment.transaction_id,
            "provider": provider,
            "provider_reference": answer.provider_reference or reference,
            "amount": float(payment.amount),
            "currency": payment.currency,
        }
    else:
        status = 402
        body = {
            "status": "DECLINED",
            "transaction_id": payment.transaction_id,
            "provider": provider,
            "reason": answer.reason,
        }
    return status, json.dumps(body, separators=(",", ":")).encode()
