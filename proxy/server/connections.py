"""Client connections: a read deadline, keep-alive, max_connections, malformed HTTP as JSON.

aiohttp's `RequestHandler` is the HTTP/1.1 connection; payagg extends it where aiohttp offers
no setting, through its documented hooks (`handle_error`, `data_received`, `keep_alive`) and
three internals, pinned by tests/test_connections.py so an aiohttp upgrade that changes them
fails there: the queue of parsed requests (`_messages`, whose waiting reader is `_waiter`),
into which aiohttp itself puts a request it could not parse as an `_ErrInfo` for
`handle_error` to answer; and that queue's growth, which shows when a request's headers are in.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import HttpVersion11, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import ERROR as UNPARSED
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from proxy.errors import ConnectionEnding, MalformedRequest, PaymentError, RequestTimeout
from proxy.settings.config import ServerSettings

AnswerError = Callable[[web.BaseRequest, PaymentError], web.StreamResponse]
UNPARSED_11 = UNPARSED._replace(version=HttpVersion11)
# Where a parser message starts quoting the request: `: b'...'`, ` 'GET /x'`.
_QUOTE = re.compile(r"""[:\s]\s*b?['"]""")


def parser_reason(error: HttpProcessingError) -> str:
    """The parser's reason for rejecting a request, without the request bytes it quotes.

    llhttp's messages put the bytes after a blank line (`reason:\n\n  b'...'\n  ^`);
    aiohttp's own quote them after the reason (`Got more than 8190 bytes when reading: b'...'`)
    or are the bytes alone (a bad chunk size): those give only the exception's name.
    """
    text, blank_line, _ = error.message.partition("\n\n")
    if not blank_line:
        quote = _QUOTE.search(text)
        if quote is None:
            return type(error).__name__
        text = text[: quote.start()]
    reason = " ".join(line.strip() for line in text.splitlines()).rstrip(":.").strip()
    return reason[:200] or type(error).__name__


class UnreadableBody(TimeoutError):
    """Raised by reading a request body that will never be complete; `error` is the answer.

    A TimeoutError because aiohttp, draining a body its handler left unread, stops on one and
    closes the connection quietly, where any other exception is an ERROR with a traceback.
    """

    def __init__(self, error: ConnectionEnding) -> None:
        super().__init__(error.message)
        self.error = error


class GatewayServer(web.Server):
    """aiohttp's low-level server with payagg's connection protocol and `max_connections`."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        settings: ServerSettings,
        *,
        answer_error: AnswerError,
        on_refused: Callable[[], None],
    ) -> None:
        super().__init__(handler, request_factory=self._request)
        self._settings = settings
        self._answer_error = answer_error
        self._on_refused = on_refused
        # Sockets still open, counted here: aiohttp keeps a connection listed until its
        # handler ends, which for a payment still settling is after the socket closed.
        self._open: set[RequestHandler] = set()

    def _request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        """aiohttp's request factory, with the configured body limit (413 beyond it)."""
        if message is UNPARSED:
            # aiohttp answers what it could not parse as HTTP/1.0; the client spoke 1.1 (or
            # nothing readable), and a 1.1 answer says `Connection: close` explicitly.
            message = UNPARSED_11
        return web.BaseRequest(
            message,
            payload,
            protocol,
            writer,
            task,
            task.get_loop(),
            client_max_size=self._settings.max_body_bytes,
        )

    def __call__(self) -> RequestHandler:
        return GatewayProtocol(
            self,
            loop=asyncio.get_running_loop(),
            read_timeout_s=self._settings.read_timeout_s,
            answer_error=self._answer_error,
            keepalive_timeout=self._settings.keepalive_timeout_s,
            # The gateway logs its own request line; aiohttp's access log would repeat it.
            access_log=None,
        )

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        if len(self._open) >= self._settings.max_connections:
            # Refused before a byte is read: the cheapest answer an overloaded process has.
            transport.close()
            self._on_refused()
            return
        self._open.add(handler)
        super().connection_made(handler, transport)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._open.discard(handler)
        super().connection_lost(handler, exc)


class GatewayProtocol(RequestHandler):
    """One client connection: aiohttp's HTTP/1.1 handling plus a deadline on reading requests.

    The deadline starts with a request's first byte and ends when its body is complete. Missed
    while headers are still coming, the connection answers 408 itself; missed during the body,
    reading the body raises the 408 in the handler. Either way nothing more is read and the
    connection closes after the answer. Parser errors become a JSON 400 the same way, and a
    body that a handler left unread and that can no longer complete ends the connection.
    """

    def __init__(
        self,
        manager: web.Server,
        *,
        read_timeout_s: float,
        answer_error: AnswerError,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._read_timeout_s = read_timeout_s
        self._answer_error = answer_error
        self._deadline: asyncio.TimerHandle | None = None
        self._unfinished_body: StreamReader | None = None
        self._input_closed = False

    def data_received(self, data: bytes) -> None:
        if self._input_closed:
            return
        if data and self._deadline is None:
            self._start_deadline()
        parsed_before = len(self._messages)
        super().data_received(data)
        for message, body in itertools.islice(self._messages, parsed_before, None):
            self._parsed(message, body)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_deadline()
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (or that missed its deadline)."""
        if isinstance(exc, PaymentError):
            return self._answer_error(request, exc)
        if isinstance(exc, HttpProcessingError):
            return self._answer_error(request, MalformedRequest(parser_reason(exc)))
        return super().handle_error(request, status, exc, message)

    def _parsed(self, message: object, body: StreamReader) -> None:
        if isinstance(message, _ErrInfo):
            self._input_closed = True
            self._stop_deadline()
            if isinstance(message.exc, HttpProcessingError):
                # Bad framing inside a body already being read (a broken chunk): the handler
                # reading it answers 400 (or aiohttp's drain of it closes the connection), and
                # the error queued behind it is never reached.
                self._end_body(MalformedRequest(parser_reason(message.exc)))
            return
        self._unfinished_body = None
        if body.is_eof():
            self._stop_deadline()
        else:
            self._unfinished_body = body
            body.on_eof(self._stop_deadline)

    def _start_deadline(self) -> None:
        # A request is coming in: the connection is not idle, so aiohttp's keep-alive timer,
        # which would close it silently, stops until the answer is sent.
        self.keep_alive(True)
        self._deadline = asyncio.get_running_loop().call_later(
            self._read_timeout_s, self._deadline_passed
        )

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.transport is None:
            return
        self._input_closed = True
        timeout = RequestTimeout(self._read_timeout_s)
        if self._end_body(timeout):
            return
        # Still in the headers: no handler runs yet, so answer through aiohttp's own path
        # for unparseable requests, which ends in handle_error above.
        self._messages.append((_ErrInfo(status=408, exc=timeout, message=""), EMPTY_PAYLOAD))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _end_body(self, error: ConnectionEnding) -> bool:
        """Make reading the unfinished body fail with `error`; False when none is unfinished."""
        body, self._unfinished_body = self._unfinished_body, None
        if body is None or body.is_eof():
            return False
        body.set_exception(UnreadableBody(error))
        return True
