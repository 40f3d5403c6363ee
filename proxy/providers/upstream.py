"""Calls to one provider: breaker, mapping, one aiohttp exchange, errors raised once here.

What an answer or a failed exchange means is `classification`'s to say; this module tracks how
far each exchange got (until a connection is handed out, nothing of the request can have reached
the provider; from then on, it may have read it) and raises the error each outcome names.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import select
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import replace
from decimal import Decimal
from email.utils import parsedate_to_datetime
from functools import partial
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.connector import Connection
from aiohttp.helpers import get_env_proxy_for_url
from multidict import CIMultiDictProxy
from yarl import URL

from proxy.errors import (
    InvalidRequest,
    OutcomeUnknown,
    Overloaded,
    PaymentAlreadyExists,
    PaymentError,
    ProviderBusy,
    ProviderFailed,
    ProviderMismatch,
    ProviderNotReached,
    ProviderRejected,
    ProviderUnavailable,
)
from proxy.observability.metrics import GatewayMetrics
from proxy.payments.request import Payment
from proxy.providers.access_tokens import (
    AccessTokens,
    AuthSpec,
    IssuedToken,
    TokenRefused,
    TokenRequest,
    read_token,
)
from proxy.providers.breaker import CallVerdict, ProviderBreaker
from proxy.providers.classification import Phase, of_answer, of_transport
from proxy.providers.mapping import PaymentFields, ProviderAnswer, StatusAnswer
from proxy.settings.config import Provider

log = logging.getLogger("payagg.upstream")
# A provider's answer is a small JSON document; anything larger is not one we can use.
MAX_ANSWER_BYTES = 1024 * 1024
# Local shortages: payagg's, not the provider's.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Only these answers carry a Retry-After that speaks about the provider's availability.
_RETRY_AFTER_STATUSES = frozenset({429, 503})


Exchange = tuple[int, CIMultiDictProxy[str], bytes]


class _Call:
    __slots__ = ("phase",)

    def __init__(self) -> None:
        self.phase = Phase.POOL


_CURRENT_CALL: ContextVar[_Call | None] = ContextVar("payagg_provider_call", default=None)


class ResendRefused(Exception):
    """aiohttp tried to send a request a second time (it re-sends PUT on a reused connection the
    provider closed); for a payment that could be a second charge, so the call stops instead."""


class AnswerTooLarge(Exception):
    """The answer's body exceeded MAX_ANSWER_BYTES."""


class _PhaseConnector(aiohttp.TCPConnector):
    """A TCPConnector that marks the current call as sent once it holds a connection, gives no
    call a second connection, and never hands out an idle connection that received bytes."""

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self._used: weakref.WeakSet[ResponseHandler] = weakref.WeakSet()

    def _in_step(self, connection: Connection) -> bool:
        """False for a kept-alive connection on which anything arrived while it was idle.

        Bytes there are an answer nobody asked for (the next call would read it as its own) or
        the provider's close that the loop has not read yet (the request would die on it and
        count as an unknown outcome although nothing was sent). Checked before a byte is
        written, as urllib3 does, with one zero-timeout poll of the socket.
        """
        protocol = connection.protocol
        if protocol is None or protocol.should_close:
            return False
        if protocol not in self._used:
            self._used.add(protocol)
            return True  # fresh: a TLS server may already be sending session tickets
        transport = protocol.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            return True
        readable, _, _ = select.select([sock.fileno()], [], [], 0)
        return not readable

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Any],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109
    ) -> Any:
        call = _CURRENT_CALL.get()
        if call is None:
            return await super().connect(req, traces, timeout)
        if call.phase is Phase.SENT:
            raise ResendRefused("the HTTP client tried to send the request a second time")
        while True:
            connection = await super().connect(req, traces, timeout)
            if self._in_step(connection):
                break
            connection.close()
        # From here on bytes may reach the provider (a few lines before the first write: a
        # failure in between is reported as unknown, which is the safe side).
        call.phase = Phase.SENT
        return connection


class ProviderClient:
    """A configured provider as the request path sees it: `pay()`, `query_status()`, the
    callback check; each call ends in an answer or a PaymentError."""

    def __init__(
        self, provider: Provider, metrics: GatewayMetrics, breaker: ProviderBreaker
    ) -> None:
        self.name = provider.name
        self.provider = provider
        self.breaker = breaker
        settings = provider.settings
        self._mapping = provider.mapping
        self._status = provider.status
        self.has_status = provider.status is not None
        self.not_found_grace_s = provider.status.not_found_grace_s if provider.status else 0.0
        self.sync_wait_s = settings.sync_wait_s
        self.timeout_s = settings.timeout_s
        self._callbacks = provider.callbacks
        self._callback = settings.callback
        self._url = URL(provider.url)
        self._timeout_s = settings.timeout_s
        self._pool_wait_s = min(settings.pool_wait_s, settings.timeout_s)
        self._slots = asyncio.Semaphore(settings.pool_size)
        self._default_payer = settings.default_payer
        self._duration = metrics.upstream_duration.labels(provider.name)
        self._mismatches = metrics.provider_mismatches.labels(provider.name)
        self._unrecognised = metrics.unrecognised_status.labels(provider.name)
        # Built once: an unusable file was already a config error.
        self._tls: ssl.SSLContext | None = (
            settings.tls.context() if settings.tls is not None else None
        )
        # HTTPS_PROXY / HTTP_PROXY / NO_PROXY (and the proxy's .netrc credentials), read once per
        # host rather than on every call as aiohttp's trust_env does (a thread hop each time).
        self._proxies: dict[str, tuple[URL | None, aiohttp.BasicAuth | None]] = {}
        self._proxy, _ = self._proxy_for(self._url)
        self._client_timeout = aiohttp.ClientTimeout(
            total=None, connect=min(settings.connect_timeout_s, settings.timeout_s)
        )
        self._session: aiohttp.ClientSession | None = None
        auth = settings.auth
        self._tokens = (
            AccessTokens(partial(self._fetch_token, auth, auth.request()), auth.refresh_before_s)
            if auth is not None
            else None
        )

    def check(self, payment: Payment) -> None:
        """Reject, before any side effect, a payment this provider's mapping cannot express."""
        if self._mapping.requires_payer and payment.payer is None:
            raise InvalidRequest({"Payer": f"is required by provider {self.name}"})
        if self._mapping.header_inputs:
            # The reference is not known yet, and no header problem can come from it.
            unsafe = self._mapping.header_problems(self._fields(payment, reference=""))
            if unsafe:
                raise InvalidRequest(unsafe)

    def callback_url(self, reference: str) -> str | None:
        """payagg's callback URL for this payment; None without `server.public_url`."""
        if self._callbacks is None:
            return None
        return self._callbacks.url_for(self.name, reference)

    def static_callback_url(self) -> str | None:
        """The one callback URL of a provider that names the payment in the body."""
        return self.provider.static_callback_url

    def callback_reference(self, raw: bytes) -> str | None:
        """The provider reference a callback's body names (YAML `callback.reference`)."""
        return self._callback.reference_of(raw) if self._callback is not None else None

    async def pay(
        self, payment: Payment, reference: str, callback_url: str | None = None
    ) -> ProviderAnswer:
        """SUCCESS, DECLINED or PENDING about this payment; raises ProviderUnavailable,
        ProviderNotReached, ProviderFailed (ProviderRejected, ProviderBusy), OutcomeUnknown,
        PaymentAlreadyExists, ProviderMismatch or Overloaded."""
        fields = self._fields(payment, reference, callback_url)
        body = self._mapping.render_body(fields)
        with self.breaker.call() as verdict:
            status, headers, raw = await self._authorised(
                lambda token: self._request(
                    self._mapping.method,
                    self._url,
                    self.render_headers(replace(fields, token=token)),
                    body,
                )
            )
            return self._believe(
                self._mapping.classify(status, raw), fields, status, headers, verdict
            )

    async def query_status(
        self, reference: str, provider_reference: str | None = None, past_breaker: bool = False
    ) -> StatusAnswer:
        """The payment's state at the provider: success, declined, pending or not_found.

        Raises ProviderUnavailable (breaker open), or for a failed query ProviderNotReached,
        OutcomeUnknown, ProviderFailed, ProviderBusy or Overloaded: ask again later. A query
        never changes money.
        """
        spec = self._status
        if spec is None:
            raise LookupError(f"{self.name} has no status query")
        fields = PaymentFields(
            transaction_id="",
            amount=Decimal(0),
            currency="",
            payer=None,
            reference=quote(reference, safe=""),
            idempotency_key="",
            provider=self.name,
            provider_reference=quote(provider_reference or "", safe=""),
        )
        # The breaker counts payments, one vote each: a status query obeys it but never votes,
        # so polling neither dilutes a failing provider's window nor takes a half-open trial.
        # `past_breaker`: the one question right after a payment's own call failed, so that the
        # call that opened the breaker still learns whether its payment was created.
        if self.breaker.rejects_now() and not past_breaker:
            raise ProviderUnavailable(self.name, self.breaker.retry_after_s())

        async def ask(token: str) -> Exchange:
            with_token = replace(fields, token=token)
            url = URL(spec.render_url(with_token), encoded=True)
            headers = {"Accept": "application/json", **spec.render_headers(with_token)}
            return await self._request(spec.method, url, headers, b"")

        status, headers, raw = await self._authorised(ask)
        answer = spec.classify(status, raw)
        self._refuse(answer, status, headers, None)
        if answer.detail:
            self._unrecognised.inc()
            log.warning(
                "%s status answer for %s %s: left pending",
                self.name,
                reference,
                answer.detail,
                extra={"fields": {"provider": self.name, "provider_reference": reference}},
            )
        return answer

    def authenticate_callback(self, method: str, headers: Mapping[str, str], raw: bytes) -> bool:
        """Whether a callback passes the provider's own check (YAML `callback:`); the URL's
        token is checked by whoever routes it. No `callback:`: this provider sends none."""
        if self._callback is None or method.upper() not in ("PUT", "POST"):
            return False
        return self._callback.authenticate(headers, raw)

    def callback_state(self, raw: bytes) -> str | None:
        """The state a callback reports (for logs: the status query is the state of record)."""
        return self._callback.state_of(raw) if self._callback is not None else None

    def _fields(
        self, payment: Payment, reference: str, callback_url: str | None = None
    ) -> PaymentFields:
        return PaymentFields(
            transaction_id=payment.transaction_id,
            amount=payment.amount,
            currency=payment.currency,
            payer=payment.payer or self._default_payer,
            reference=reference,
            # The payment's identity, stable across retries whatever header they carry.
            idempotency_key=payment.transaction_id,
            provider=self.name,
            callback_url=callback_url or "",
        )

    def render_headers(self, fields: PaymentFields) -> dict[str, str]:
        return {
            "Content-Type": "application/json",
            "Accept": "application/json",
            **self._mapping.render_headers(fields),
        }

    async def _authorised(self, send: Callable[[str], Awaitable[Exchange]]) -> Exchange:
        """`send(token)`, with the provider's access token ("" without `auth:`); on a 401 the
        token is refreshed once and the request sent once more."""
        if self._tokens is None:
            return await send("")
        token = await self._tokens.current()
        exchange = await send(token)
        if exchange[0] != 401:
            return exchange
        # A 401 means the provider refused the request itself, before creating anything: the
        # same request with a fresh token cannot be a second payment.
        exchange = await send(await self._tokens.after_refusal(token))
        if exchange[0] == 401:
            raise ProviderFailed(self.name, f"{self.name} refused a fresh access token (HTTP 401)")
        return exchange

    async def _fetch_token(self, auth: AuthSpec, request: TokenRequest) -> IssuedToken:
        """A new access token; any failure is ProviderNotReached (no payment left payagg),
        or Overloaded when payagg itself ran short."""
        try:
            status, _, raw = await self._request(
                request.method, URL(request.url), request.headers, request.body
            )
            return read_token(auth, status, raw)
        except Overloaded:
            raise
        except TokenRefused as refused:
            problem = str(refused)
        except PaymentError as error:
            problem = error.message
        raise ProviderNotReached(self.name, f"no access token from {self.name}: {problem}")

    async def _request(
        self, method: str, url: URL, headers: dict[str, str], body: bytes
    ) -> Exchange:
        """One HTTP exchange with the provider; where a failure stopped decides its error."""
        call = _Call()
        token = _CURRENT_CALL.set(call)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._take_slot(call)
                try:
                    return await self._send(method, url, headers, body)
                finally:
                    self._slots.release()
        except TimeoutError:
            raise self._timed_out(call) from None
        except (aiohttp.ClientError, OSError, ResendRefused, AnswerTooLarge) as error:
            raise self._failed(call, error) from None
        finally:
            _CURRENT_CALL.reset(token)
            self._duration.observe(time.perf_counter() - started)

    def _believe(
        self,
        answer: ProviderAnswer,
        fields: PaymentFields,
        status: int,
        headers: CIMultiDictProxy[str],
        verdict: CallVerdict,
    ) -> ProviderAnswer:
        """SUCCESS, DECLINED or PENDING about this very payment; every other answer raises."""
        self._refuse(answer, status, headers, verdict)
        if answer.contradicts(fields.amount, fields.currency):
            self.report_mismatch(answer, fields, fields.reference)
            raise ProviderMismatch()
        if answer.outcome == "already_exists":
            raise PaymentAlreadyExists(self.name)
        return answer

    def _refuse(
        self,
        answer: ProviderAnswer,
        status: int,
        headers: CIMultiDictProxy[str],
        verdict: CallVerdict | None,
    ) -> None:
        """Raises for an answer that is not about a payment: a failure, busy or a refusal."""
        outcome = of_answer(answer.outcome, status, self._proxy is not None).outcome
        if outcome == "failure" and verdict is not None and status in _RETRY_AFTER_STATUSES:
            verdict.retry_after_s = retry_after_s(headers.get("Retry-After"))
        if outcome == "unknown":
            raise OutcomeUnknown(
                self.name,
                f"the egress proxy answered HTTP {status} for {self.name}; it may have "
                "forwarded the payment",
            )
        if outcome == "failure":
            raise ProviderFailed(self.name, f"{self.name} failed: {answer.detail}")
        if outcome == "busy":
            raise ProviderBusy(self.name, answer.detail)
        if outcome == "rejected":
            raise ProviderRejected(self.name, answer.detail)

    async def _take_slot(self, call: _Call) -> None:
        if self._slots.locked():
            try:
                async with asyncio.timeout(self._pool_wait_s):
                    await self._slots.acquire()
            except TimeoutError:
                raise Overloaded(
                    f"all {self.provider.settings.pool_size} connections to {self.name} stayed "
                    f"busy for {self._pool_wait_s:g}s"
                ) from None
        else:
            await self._slots.acquire()  # returns at once: a slot is free
        call.phase = Phase.CONNECT

    async def _send(self, method: str, url: URL, headers: dict[str, str], body: bytes) -> Exchange:
        proxy, proxy_auth = self._proxy_for(url)
        response = await self._client().request(
            method,
            url,
            data=body or None,
            headers=headers,
            # A redirected payment would be sent again (307/308) or turned into a GET.
            allow_redirects=False,
            ssl=self._tls_for(url),
            proxy=proxy,
            proxy_auth=proxy_auth,
        )
        try:
            return response.status, response.headers, await _read_answer(response)
        except BaseException:
            response.close()  # an answer not read to its end leaves the connection unusable
            raise

    def _timed_out(self, call: _Call) -> Exception:
        outcome = of_transport(call.phase, timed_out=True, out_of_resources=False).outcome
        if outcome == "overloaded":
            return Overloaded(f"no connection to {self.name} became free in time")
        if outcome == "not_sent":
            connect_s = self._client_timeout.connect
            return ProviderNotReached(
                self.name, f"cannot reach {self.name}: no connection within {connect_s:g}s"
            )
        return OutcomeUnknown(self.name, f"{self.name} did not answer within {self._timeout_s:g}s")

    def _failed(self, call: _Call, error: BaseException) -> Exception:
        described = _describe(error)
        outcome = of_transport(call.phase, False, _out_of_resources(error)).outcome
        if outcome == "overloaded":
            return Overloaded(f"payagg is out of resources: {described}")
        if outcome == "not_sent":
            return ProviderNotReached(self.name, f"cannot reach {self.name}: {described}")
        return OutcomeUnknown(
            self.name, f"{self.name} sent no usable answer after the request: {described}"
        )

    def _client(self) -> aiohttp.ClientSession:
        # Created on the first call, so inside the loop that serves (aiohttp requires it).
        if self._session is None:
            settings = self.provider.settings
            self._session = aiohttp.ClientSession(
                connector=_PhaseConnector(
                    limit=0,  # the slots above bound the connections, with their own wait
                    keepalive_timeout=settings.keepalive_expiry_s,
                ),
                timeout=self._client_timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
                # Answers are small JSON: uncompressed, as they were measured against the limit.
                skip_auto_headers=("Accept-Encoding",),
            )
        return self._session

    def _tls_for(self, url: URL) -> ssl.SSLContext | bool:
        if url.scheme != "https":
            return False
        if self._tls is None:
            # Built on first use rather than aiohttp's module-level one, so SSL_CERT_FILE set
            # before start-up (tests, containers) is honoured.
            self._tls = ssl.create_default_context()
        return self._tls

    def _proxy_for(self, url: URL) -> tuple[URL | None, aiohttp.BasicAuth | None]:
        host = f"{url.scheme}://{url.host}"
        if host not in self._proxies:
            found: tuple[URL | None, aiohttp.BasicAuth | None] = (None, None)
            with contextlib.suppress(LookupError):
                found = get_env_proxy_for_url(url)
            self._proxies[host] = found
        return self._proxies[host]

    def report_mismatch(
        self, verdict: ProviderAnswer, request: PaymentFields | Payment, reference: str
    ) -> None:
        """An answer about another payment than the request's: counted and logged, no payer data."""
        self._mismatches.inc()
        log.warning(
            "%s answered about another payment under reference %s: %s %s, the request %s %s;"
            " answered 422, nothing stored",
            self.name,
            reference,
            verdict.amount,
            verdict.currency,
            request.amount,
            request.currency,
            extra={
                "fields": {
                    "provider": self.name,
                    "transaction_id": request.transaction_id,
                    "provider_reference": reference,
                    "answer_amount": verdict.amount,
                    "answer_currency": verdict.currency,
                    "request_amount": str(request.amount),
                    "request_currency": request.currency,
                }
            },
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_answer(response: aiohttp.ClientResponse) -> bytes:
    length = response.content_length
    if length is not None:
        if length > MAX_ANSWER_BYTES:
            raise AnswerTooLarge(f"answer larger than {MAX_ANSWER_BYTES} bytes")
        return await response.read()
    chunks, size = [], 0
    while chunk := await response.content.readany():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise AnswerTooLarge(f"answer larger than {MAX_ANSWER_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def retry_after_s(value: str | None) -> float:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); 0 when absent or bad."""
    if not value:
        return 0.0
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, when.timestamp() - time.time())


def _out_of_resources(error: BaseException | None) -> bool:
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError) and error.errno in _OUT_OF_RESOURCES:
            return True
        nested = getattr(error, "os_error", None)
        error = nested if isinstance(nested, OSError) else (error.__cause__ or error.__context__)
        seen += 1
    return False


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__
