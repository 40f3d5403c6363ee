"""The request path of `POST /v1/pay` and the payment lookup, step by step (CONTRACT §2)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from typing import Any

from aiohttp import HttpVersion11, web

from proxy.clients.gate import Gate
from proxy.clients.keys import Client
from proxy.errors import (
    Forbidden,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PaymentAlreadyExists,
    PaymentError,
    ProviderFailed,
    ProviderMismatch,
    ProviderUnavailable,
    UnknownProvider,
    UnsupportedMediaType,
)
from proxy.payments.idempotency import Claim, IdempotencyStore, describe, describe_old
from proxy.payments.json_answer import json_answer
from proxy.payments.lifecycle import (
    NOT_FINAL,
    OUTCOME_UNKNOWN,
    SETTLED,
    Record,
    Report,
    compact_json,
    now_ms,
    payment_body,
    status_url,
)
from proxy.payments.reconciler import AnotherPayment, settle_from_status
from proxy.payments.request import Payment, parse_payment
from proxy.payments.wakeups import Wakeups
from proxy.providers.classification import of_error
from proxy.providers.mapping import ProviderAnswer
from proxy.providers.upstream import ProviderClient
from proxy.store.records import StoredResult

# A sent request's answer may take the provider's timeout_s; this much more covers payagg's own
# work before the reconciler may take an orphaned record over.
_SEND_MARGIN_S = 5.0
_FIRST_POLL_S = 0.05
_MAX_POLL_S = 1.0
_RETRY_PENDING_S = "2"
_OUTCOMES = {200: "success", 402: "declined", 202: "pending"}
PROVIDER = web.RequestKey("provider", str)
OUTCOME = web.RequestKey("outcome", str)
_JSON = "application/json"
_REPLAY_HEADERS = {"Content-Type": _JSON, "Idempotent-Replayed": "true"}


class PaymentService:
    def __init__(
        self, providers: Mapping[str, ProviderClient], store: IdempotencyStore, gate: Gate
    ) -> None:
        self._providers = {name.lower(): client for name, client in providers.items()}
        self._known = set(self._providers)
        self._store = store
        self._gate = gate
        self.wakeups = Wakeups()
        # Payments still settling; kept so shutdown can wait for them and the GC cannot drop them.
        self.settling: set[asyncio.Task[web.Response]] = set()

    async def pay(self, request: web.BaseRequest) -> web.Response:
        # 401 before anything else; then 429 before the body is read: a limited request
        # takes no lock and calls no provider.
        client = await self._gate.admit(request, limited=True)
        body, header = await _json_body(request), request.headers.get("Idempotency-Key")
        try:
            payment = _of_client(parse_payment(body, header, self._known), client)
        except UnknownProvider as unknown:
            return await self._replay_of_unconfigured(request, body, header, client, unknown)
        provider = self._providers[payment.provider_key.lower()]
        request[PROVIDER] = provider.name
        if not client.may_use(provider.name):
            # A payment the client made while it could is answered, never refused.
            stored = await self._store.replay(payment, provider.name)
            if stored is None:
                raise Forbidden(provider.name)
            return _replay(request, stored)
        provider.check(payment)
        if provider.breaker.rejects_now():
            # Fail fast without taking a lock: only a stored answer may still be served.
            stored = await self._store.replay(payment, provider.name)
            if stored is None:
                raise ProviderUnavailable(provider.name, provider.breaker.retry_after_s())
            return _replay(request, stored)
        # Owned while the request is sent and answered; after that, the reconciler's.
        hold_s = provider.timeout_s + _SEND_MARGIN_S
        # This request's reference and callback URL, each computed here only.
        reference = payment.provider_reference(provider.name)
        callback_url = provider.callback_url(reference)
        token = None if callback_url is None else callback_url.rsplit("/", 1)[1]
        claimed = await self._store.claim(payment, provider.name, hold_s, token, reference)
        if isinstance(claimed, StoredResult):
            return _replay(request, claimed)
        if claimed.reference != reference:  # a retry of a payment never created: its own
            callback_url = provider.callback_url(claimed.reference)
        # Shielded: a client that hangs up must not abandon a payment the provider may be
        # charging; the result is still stored, and the client's retry gets the replay.
        task = request.task.get_loop().create_task(
            self._settle(provider, payment, claimed, callback_url)
        )
        self.settling.add(task)
        task.add_done_callback(self.settling.discard)
        response = await asyncio.shield(task)
        request[OUTCOME] = _OUTCOMES[response.status]
        return response

    async def _replay_of_unconfigured(
        self,
        request: web.BaseRequest,
        body: bytes,
        header: str | None,
        client: Client,
        unknown: UnknownProvider,
    ) -> web.Response:
        """A retry of a known payment is looked up before the provider is: one made with a
        provider a reload has since removed or renamed gets its stored answer, never a 400.
        Anything else is the `unknown` provider's 400 (its label stays `unknown`: label values
        come from the running config only)."""
        named = unknown.provider_key
        try:
            payment = _of_client(parse_payment(body, header, {named.lower()}), client)
        except InvalidRequest:
            raise unknown from None
        record = await self._store.find(payment.transaction_id, payment.scope)
        if record is None or record.provider.lower() != named.lower():
            raise unknown
        stored = await self._store.replay(payment, record.provider)
        if stored is None:
            raise unknown
        return _replay(request, stored)

    async def _settle(
        self, provider: ProviderClient, payment: Payment, claim: Claim, callback_url: str | None
    ) -> web.Response:
        reference = claim.reference
        unknown: PaymentError | None = None
        try:
            answer: ProviderAnswer | None = await provider.pay(payment, reference, callback_url)
        except PaymentError as error:
            meaning = of_error(error)
            if meaning.retry_allowed:
                # Nothing reached the provider, or it refused the request itself.
                await claim.not_created(error)
                raise
            if meaning.outcome == "mismatch":
                # The provider holds another payment under this reference (a record payagg
                # lost): this request made none, and the one it holds is the real client's.
                await claim.forget()
                raise
            answer, unknown = None, error
        if answer is not None and answer.outcome in ("success", "declined"):
            status, body = _final_answer(provider.name, payment, reference, answer)
            await claim.keep(status, body, answer.reason, answer.provider_reference)
            return _answer(status, body)
        pref = answer.provider_reference if answer is not None else None
        reason = None if unknown is None else OUTCOME_UNKNOWN
        until_ms = int(claim.record.facts["created_ms"]) + int(provider.sync_wait_s * 1000)
        # The lease is the handler's until created + sync_wait_s; the reconciler's after that.
        await claim.settle(
            Report(
                "PENDING",
                reason=reason,
                provider_reference=pref,
                due_ms=max(until_ms, now_ms()),
                leased=True,
                provider_has_it=unknown is None or isinstance(unknown, PaymentAlreadyExists),
            )
        )
        try:
            record = await self._wait(
                provider, claim, until_ms, isinstance(unknown, PaymentAlreadyExists)
            )
        except AnotherPayment as another:
            # The provider refused this request as a duplicate of a payment under its reference
            # about another amount (a record payagg lost): this request made none.
            provider.report_mismatch(another.answer, payment, reference)
            await claim.forget()
            raise ProviderMismatch() from None
        if record is not None and record.name == "NOT_CREATED":
            raise ProviderFailed(
                provider.name,
                f"{provider.name} has no payment under this reference after "
                f"{provider.not_found_grace_s:g}s: it was never created",
            )
        if record is not None and record.name in SETTLED and record.state.result is not None:
            return _answer(record.state.result.status, record.state.result.body)
        return _pending(claim.record)

    async def _wait(
        self, provider: ProviderClient, claim: Claim, until_ms: int, refuse_mismatch: bool
    ) -> Record | None:
        """The record once final, asking the provider's status with a short backoff and woken
        at once by a callback for this payment; None when still not final at `until_ms`.
        `refuse_mismatch`: an answer about another amount raises AnotherPayment."""
        if until_ms <= now_ms():
            return None
        record = claim.record
        delay_s = _FIRST_POLL_S
        first = True
        with self.wakeups.watch(record.sha) as woken:
            while True:
                if provider.has_status:
                    # The first question is about this handler's own call, even if that call
                    # just opened the breaker; later ones obey it.
                    result, after = await settle_from_status(
                        self._store.lifecycle,
                        provider,
                        record,
                        past_breaker=first,
                        refuse_mismatch=refuse_mismatch,
                    )
                    if after is not None:
                        record = claim.record = after
                    if record.name not in NOT_FINAL:
                        return record
                    if result == "breaker_open":
                        return None  # nobody may ask now: the reconciler will, later
                first = False
                remaining_s = (until_ms - now_ms()) / 1000
                if remaining_s <= 0:
                    return None
                woken.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(delay_s, remaining_s)):
                        await woken.wait()
                delay_s = min(delay_s * 2, _MAX_POLL_S)

    async def lookup(self, request: web.BaseRequest, transaction_id: str) -> web.Response:
        # Not rate limited: polling a 202's status_url is how a client learns the outcome.
        client = await self._gate.admit(request, limited=False)
        # Another client's payment is not found: its existence is not this client's to know.
        record = await self._store.find(transaction_id, client.scope)
        if record is not None:
            return json_answer(describe(record))
        # A record of the versions before under this TransactionID's old key.
        old = await self._store.peek_old(transaction_id, client.scope)
        if old is None:
            raise NotFound("no payment with this TransactionID")
        return json_answer(describe_old(old))


def _of_client(payment: Payment, client: Client) -> Payment:
    if client.record_name is None and not client.scope:
        return payment  # the open API: the payment as it always was
    return payment._replace(client=client.record_name, scope=client.scope)


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
    headers = _REPLAY_HEADERS
    if stored.status == 202:
        headers = {**headers, **_pending_headers(json.loads(stored.body)["transaction_id"])}
    return web.Response(status=stored.status, body=stored.body, headers=headers)


def _answer(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type=_JSON)


def _pending(record: Record) -> web.Response:
    facts = record.facts
    body = payment_body(facts, "PENDING", None, facts.get("provider_reference"))
    return web.Response(
        status=202,
        body=body,
        headers={"Content-Type": _JSON, **_pending_headers(str(facts["transaction_id"]))},
    )


def _pending_headers(transaction_id: str) -> dict[str, str]:
    return {"Location": status_url(transaction_id), "Retry-After": _RETRY_PENDING_S}


def _final_answer(
    provider: str, payment: Payment, reference: str, answer: ProviderAnswer
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
    return status, compact_json(body)
