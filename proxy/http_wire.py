"""A small HTTP/1.1 client for provider calls: pooled keep-alive connections, httptools parsing.

aiohttp's ClientSession costs about 60 µs of CPU per request on these machines, a large share of
a payment's budget; a provider call needs none of its generality (redirects, cookies, proxies,
streaming). This client writes one pre-built request per call on a pooled connection and lets
llhttp (httptools, the parser uvicorn uses) frame the answer: about 15 µs, measured side by side
(README, "Performance"). Content-Length, chunked and close-delimited answers, TLS, keep-alive.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

# A provider's answer is a small JSON document; anything larger is not one we can use.
MAX_ANSWER_BYTES = 1024 * 1024
# Status line and headers; the parser buffers a header until it ends, so this bounds it too.
MAX_HEAD_BYTES = 64 * 1024


class UpstreamConnectionError(Exception):
    """The connection failed, or closed before a complete answer arrived."""


class AnswerTooLarge(UpstreamConnectionError):
    """The answer body exceeded MAX_ANSWER_BYTES."""


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    body: bytes


class _Connection(asyncio.Protocol):
    """One socket carrying one exchange at a time."""

    def __init__(self, pool: ConnectionPool, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[HttpAnswer] | None = None
        self._body: list[bytes] = []
        self._body_size = 0
        self._framed = False  # Content-Length or chunked: the end is known without EOF
        self._headers_done = False
        self._head_size = 0
        self._received_any = False
        self.closed = False
        self.reused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here.
        self._transport = cast(asyncio.Transport, transport)

    def exchange(self, request: bytes) -> asyncio.Future[HttpAnswer]:
        assert self._transport is not None
        self._waiter = self._loop.create_future()
        self._body, self._body_size, self._framed, self._received_any = [], 0, False, False
        self._headers_done, self._head_size = False, 0
        self._transport.write(request)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        self._received_any = True
        self._head_size += 0 if self._headers_done else len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            # httptools wraps a callback's exception; AnswerTooLarge is worth naming as such.
            cause = error.__context__
            if not isinstance(cause, UpstreamConnectionError):
                cause = UpstreamConnectionError(f"unreadable answer: {error}")
            self._fail(cause)
            self.close()
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamConnectionError("the provider switched protocols (HTTP 101)"))
            self.close()
        if not self._headers_done and self._head_size > MAX_HEAD_BYTES and not self.closed:
            # Everything received so far is still status line and headers: endless headers end.
            self._fail(AnswerTooLarge(f"answer headers larger than {MAX_HEAD_BYTES} bytes"))
            self.close()

    def on_message_begin(self) -> None:
        if self._waiter is None:
            # Bytes nobody asked for (an extra answer, or one after a cancelled exchange): the
            # connection is out of step with the provider and must never carry another request.
            raise UpstreamConnectionError("an answer arrived with no request waiting for it")

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"content-length" or (
            lowered == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self._framed = True

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > MAX_ANSWER_BYTES:
            raise AnswerTooLarge(f"answer larger than {MAX_ANSWER_BYTES} bytes")
        self._body.append(body)

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the final one follows.
            self._body, self._body_size, self._framed, self._headers_done = [], 0, False, False
            return
        answer = HttpAnswer(status, b"".join(self._body))
        waiter, self._waiter = self._waiter, None
        if self._parser.should_keep_alive() and not self.closed:
            self._pool.give_back(self)
        else:
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._headers_done and not self._framed:
            # An answer without Content-Length or chunking ends when the connection does (but
            # one whose head was cut short is no answer at all).
            self._waiter = None
            waiter.set_result(HttpAnswer(self._parser.get_status_code(), b"".join(self._body)))
            return
        reason = f": {exc}" if exc else ""
        self._fail(UpstreamConnectionError(f"connection closed before a complete answer{reason}"))

    @property
    def answered_nothing(self) -> bool:
        return not self._received_any

    def _fail(self, error: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()


class ConnectionPool:
    """Keep-alive connections to one origin; at most `limit` exchanges at once."""

    def __init__(self, url: str, limit: int = 256) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._idle: deque[_Connection] = deque()
        self._slots = asyncio.Semaphore(limit)

    async def exchange(self, request: bytes) -> HttpAnswer:
        """One request, one answer; raises UpstreamConnectionError or OSError."""
        async with self._slots:
            connection = await self._connection()
            try:
                return await connection.exchange(request)
            except UpstreamConnectionError:
                if not (connection.reused and connection.answered_nothing):
                    raise
            except BaseException:
                connection.close()  # cancelled or timed out mid-exchange: never reused
                raise
            # A kept-alive connection the provider closed just as we wrote: nothing reached the
            # provider's application, and the request carries its provider reference anyway,
            # so it is sent once more on a fresh connection.
            connection = await self._open()
            try:
                return await connection.exchange(request)
            except BaseException:
                connection.close()
                raise

    async def _connection(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                connection.reused = True
                return connection
        return await self._open()

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(
            lambda: _Connection(self, loop), self.host, self.port, ssl=self._tls
        )
        return connection

    def give_back(self, connection: _Connection) -> None:
        self._idle.append(connection)

    def forget(self, connection: _Connection) -> None:
        if connection in self._idle:
            self._idle.remove(connection)

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
