"""Calls to one provider: breaker, mapping, one aiohttp exchange, errors mapped once here.

Where a failed call stopped decides what it means, never the exception's type: until a
connection is handed out, nothing of the request can have reached the provider (ProviderNotReached,
or Overloaded when payagg itself ran out of file descriptors or pool slots); from then on, the
provider may have read it (OutcomeUnknown).
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
from collections.abc import Mapping
from contextvars import ContextVar
from email.utils import parsedate_to_datetime
from enum import Enum
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.connector import Connection
from aiohttp.helpers import get_env_proxy_for_url
from multidict import CIMultiDictProxy
from yarl import URL

from proxy.breaker import CallVerdict, ProviderBreaker
from proxy.config import Provider
from proxy.deadlines import CancelAfter
from proxy.errors import (
    InvalidRequest,
    OutcomeUnknown,
    Overloaded,
    PaymentAlreadyExists,
    ProviderBusy,
    ProviderFailed,
    ProviderMismatch,
    ProviderNotReached,
    ProviderRejected,
)
from proxy.mapping import Answer, PaymentFields
from proxy.metrics import GatewayMetrics
from proxy.payment import Payment

log = logging.getLogger("payagg.upstream")
# A provider's answer is a small JSON document; anything larger is not one we can use.
MAX_ANSWER_BYTES = 1024 * 1024
# Local shortages: payagg's, not the provider's.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Only these answers carry a Retry-After that speaks about the provider's availability.
_RETRY_AFTER_STATUSES = frozenset({429, 503})
# What an egress proxy answers when it could not get an answer from the provider; it may have
# forwarded the request first.
_PROXY_GAVE_UP = frozenset({502, 504})


class Phase(Enum):
    POOL = "waiting for a pool slot"
    CONNECT = "connecting"
    SENT = "sent"


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
    """A configured provider as the request path sees it: `pay()` or a PaymentError."""

    def __init__(
        self, provider: Provider, metrics: GatewayMetrics, breaker: ProviderBreaker
    ) -> None:
        self.name = provider.name
        self.provider = provider
        self.breaker = breaker
        settings = provider.settings
        self._mapping = provider.mapping
        self._url = URL(provider.url)
        self._timeout_s = settings.timeout_s
        self._pool_wait_s = min(settings.pool_wait_s, settings.timeout_s)
        self._slots = asyncio.Semaphore(settings.pool_size)
        self._default_payer = settings.default_payer
        self._duration = metrics.upstream_duration.labels(provider.name)
        self._mismatches = metrics.provider_mismatches.labels(provider.name)
        # Built once: an unusable file was already a config error.
        self._tls: ssl.SSLContext | bool = (
            settings.tls.context() if settings.tls is not None else _default_tls(self._url)
        )
        # HTTPS_PROXY / HTTP_PROXY / NO_PROXY (and the proxy's .netrc credentials), read once at
        # start-up rather than on every call as aiohttp's trust_env does (a thread hop each time).
        self._proxy: URL | None = None
        self._proxy_auth: aiohttp.BasicAuth | None = None
        with contextlib.suppress(LookupError):
            self._proxy, self._proxy_auth = get_env_proxy_for_url(self._url)
        self._client_timeout = aiohttp.ClientTimeout(
            total=None, connect=min(settings.connect_timeout_s, settings.timeout_s)
        )
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The lifecycle's view of the provider; the provider protocols (#14) fill these in.
        self.has_status = False
        self.not_found_grace_s = 0.0
        self.sync_wait_s = settings.sync_wait_s
        self.timeout_s = settings.timeout_s

    def callback_url(self, reference: str) -> str | None:
        """payagg's callback URL for this payment; None: this provider sends no callbacks."""
        return None

    async def query_status(self, reference: str) -> Answer:
        """The payment's state at the provider; this provider has no status query."""
        raise LookupError(f"{self.name} has no status query")

    def authenticate_callback(self, method: str, headers: Mapping[str, str], raw: bytes) -> bool:
        """Whether a callback passes the provider's own check; this provider sends none."""
        return False

    def callback_state(self, raw: bytes) -> str | None:
        return None

    def check(self, payment: Payment) -> None:
        """Reject, before any side effect, a payment this provider's mapping cannot express."""
        if self._mapping.requires_payer and payment.payer is None:
            raise InvalidRequest({"Payer": f"is required by provider {self.name}"})
        if self._mapping.header_inputs:
            # The reference is not known yet, and no header problem can come from it.
            unsafe = self._mapping.header_problems(self._fields(payment, reference=""))
            if unsafe:
                raise InvalidRequest(unsafe)

    async def pay(
        self, payment: Payment, reference: str, callback_url: str | None = None
    ) -> Answer:
        """SUCCESS or DECLINED about this payment; raises ProviderUnavailable, ProviderNotReached,
        ProviderFailed (ProviderRejected, ProviderBusy), OutcomeUnknown, PaymentAlreadyExists,
        ProviderMismatch or Overloaded."""
        fields = self._fields(payment, reference)
        with self.breaker.call() as verdict:
            return await self._exchange(fields, verdict)

    def _fields(self, payment: Payment, reference: str) -> PaymentFields:
        return PaymentFields(
            transaction_id=payment.transaction_id,
            amount=payment.amount,
            currency=payment.currency,
            payer=payment.payer or self._default_payer,
            reference=reference,
            # The payment's identity, stable across retries whatever header they carry.
            idempotency_key=payment.transaction_id,
            provider=self.name,
        )

    def render_headers(self, fields: PaymentFields) -> dict[str, str]:
        return {
            "Content-Type": "application/json",
            "Accept": "application/json",
            **self._mapping.render_headers(fields),
        }

    async def _exchange(self, fields: PaymentFields, verdict: CallVerdict) -> Answer:
        body = self._mapping.render_body(fields)
        headers = self.render_headers(fields)
        call = _Call()
        token = _CURRENT_CALL.set(call)
        started = time.perf_counter()
        try:
            with CancelAfter(self._bound_loop(), self._timeout_s):
                await self._take_slot(call)
                try:
                    status, answer_headers, raw = await self._send(headers, body)
                finally:
                    self._slots.release()
        except TimeoutError:
            raise self._timed_out(call) from None
        except (aiohttp.ClientError, OSError, ResendRefused, AnswerTooLarge) as error:
            raise self._failed(call, error) from None
        finally:
            _CURRENT_CALL.reset(token)
            self._duration.observe(time.perf_counter() - started)
        return self._believe(
            self._mapping.classify(status, raw), fields, status, answer_headers, verdict
        )

    def _believe(
        self,
        answer: Answer,
        fields: PaymentFields,
        status: int,
        headers: CIMultiDictProxy[str],
        verdict: CallVerdict,
    ) -> Answer:
        """SUCCESS or DECLINED about this very payment; every other answer raises here."""
        if answer.outcome == "failure":
            if status in _RETRY_AFTER_STATUSES:
                verdict.retry_after_s = retry_after_s(headers.get("Retry-After"))
            if self._proxy is not None and status in _PROXY_GAVE_UP:
                raise OutcomeUnknown(
                    self.name,
                    f"the egress proxy answered HTTP {status} for {self.name}; it may have "
                    "forwarded the payment",
                )
            raise ProviderFailed(self.name, f"{self.name} failed: {answer.detail}")
        if answer.outcome == "busy":
            raise ProviderBusy(self.name, answer.detail)
        if answer.outcome == "rejected":
            raise ProviderRejected(self.name, answer.detail)
        if answer.contradicts(fields.amount, fields.currency):
            self._report_mismatch(answer, fields)
            raise ProviderMismatch()
        if answer.outcome == "already_exists":
            raise PaymentAlreadyExists(self.name)
        return answer

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

    async def _send(
        self, headers: dict[str, str], body: bytes
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        response = await self._client().request(
            self._mapping.method,
            self._url,
            data=body,
            headers=headers,
            # A redirected payment would be sent again (307/308) or turned into a GET.
            allow_redirects=False,
            ssl=self._tls,
            proxy=self._proxy,
            proxy_auth=self._proxy_auth,
        )
        try:
            return response.status, response.headers, await _read_answer(response)
        except BaseException:
            response.close()  # an answer not read to its end leaves the connection unusable
            raise

    def _timed_out(self, call: _Call) -> Exception:
        if call.phase is Phase.POOL:
            return Overloaded(f"no connection to {self.name} became free in time")
        if call.phase is Phase.CONNECT:
            connect_s = self._client_timeout.connect
            return ProviderNotReached(
                self.name, f"cannot reach {self.name}: no connection within {connect_s:g}s"
            )
        return OutcomeUnknown(self.name, f"{self.name} did not answer within {self._timeout_s:g}s")

    def _failed(self, call: _Call, error: BaseException) -> Exception:
        if call.phase is not Phase.SENT:
            if _out_of_resources(error):
                return Overloaded(f"payagg is out of resources: {_describe(error)}")
            return ProviderNotReached(self.name, f"cannot reach {self.name}: {_describe(error)}")
        return OutcomeUnknown(
            self.name, f"{self.name} sent no usable answer after the request: {_describe(error)}"
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

    def _report_mismatch(self, verdict: Answer, fields: PaymentFields) -> None:
        self._mismatches.inc()
        log.warning(
            "%s answered about another payment under reference %s: %s %s, the request %s %s;"
            " answered 422, nothing stored",
            self.name,
            fields.reference,
            verdict.amount,
            verdict.currency,
            fields.amount,
            fields.currency,
            extra={
                "fields": {
                    "provider": self.name,
                    "transaction_id": fields.transaction_id,
                    "provider_reference": fields.reference,
                    "answer_amount": verdict.amount,
                    "answer_currency": verdict.currency,
                    "request_amount": str(fields.amount),
                    "request_currency": fields.currency,
                }
            },
        )

    def _bound_loop(self) -> asyncio.AbstractEventLoop:
        # Looked up once: a client and its pooled connections live in one loop.
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

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


def _default_tls(url: URL) -> ssl.SSLContext | bool:
    # Built here rather than aiohttp's module-level one, so SSL_CERT_FILE set before start-up
    # (tests, containers) is honoured.
    return ssl.create_default_context() if url.scheme == "https" else False


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
