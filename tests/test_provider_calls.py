"""Provider calls over real sockets: framing, keep-alive, the phase a failure happened in, TLS,
egress proxies, pool limits and local resource exhaustion.

Raw `asyncio.start_server` handlers play the provider where a test needs control of every byte
(and of misbehaviour); each test checks what the provider saw as well as what payagg answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import resource
import socket
import ssl
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop

from proxy.errors import (
    OutcomeUnknown,
    Overloaded,
    PaymentError,
    ProviderFailed,
    ProviderNotReached,
)
from proxy.observability.metrics import GatewayMetrics
from proxy.payments.request import Payment
from proxy.providers.breaker import BreakerState, ProviderBreaker
from proxy.providers.classification import of_error
from proxy.providers.mapping import ProviderAnswer
from proxy.providers.upstream import MAX_ANSWER_BYTES, ProviderClient, retry_after_s
from tests.canonical_upstream import UpstreamState
from tests.conftest import (
    RedisServer,
    gateway_yaml,
    make_config,
    payment,
    running_gateway,
)
from tests.processes import free_port, payagg_serve, running

ROOT = Path(__file__).resolve().parent.parent

REFERENCE = "9d1f6a4e-0d6c-5d52-8f43-7d3f0b1b8f10"


def ok(reference: str = "P-1", pad: int = 0) -> bytes:
    """A canonical SUCCESS body, optionally padded to a given size."""
    return json.dumps(
        {"status": "SUCCESS", "provider_reference": reference, "pad": "x" * pad},
        separators=(",", ":"),
    ).encode()


def answer(body: bytes = ok(), head: bytes = b"HTTP/1.1 200 OK", extra: bytes = b"") -> bytes:
    """A complete answer framed by Content-Length."""
    return b"%s\r\nContent-Length: %d\r\n%s\r\n%s" % (head, len(body), extra, body)


def chunked(*chunks: bytes) -> bytes:
    framed = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framed + b"0\r\n\r\n"


async def eventually(predicate: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting until {what}")
        await asyncio.sleep(0.002)


class Peer:
    """The server's side of one accepted connection."""

    def __init__(
        self,
        server: RawServer,
        index: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.index = index
        self.reader = reader
        self.writer = writer

    async def request(self) -> bytes | None:
        """The next whole request (head and Content-Length body); None once the client hung up."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            raw = head + await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.server.hangups += 1
            return None
        self.server.requests.append((self.index, raw))
        return raw

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until_hangup(self) -> None:
        while await self.request() is not None:
            pass

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[Peer], Awaitable[None]]


class RawServer:
    """asyncio.start_server on a free port; `handler` plays one connection; all are counted."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.hangups = 0
        self.finished = 0
        self.requests: list[tuple[int, bytes]] = []
        self.peers: list[Peer] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/pay"

    def connection_of_each_request(self) -> list[int]:
        return [index for index, _ in self.requests]

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self.tls)
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        index, self.connections = self.connections, self.connections + 1
        peer = Peer(self, index, reader, writer)
        self.peers.append(peer)
        try:
            await self.handler(peer)
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            self.finished += 1
            writer.close()
            self._tasks.discard(task)


def keep_answering(reply: bytes = answer()) -> Handler:
    async def handler(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(reply)

    return handler


def first_connection_then_healthy(first: Handler, reply: bytes = answer(ok("fresh"))) -> Handler:
    healthy = keep_answering(reply)

    async def handler(peer: Peer) -> None:
        await (first if peer.index == 0 else healthy)(peer)

    return handler


class Network:
    """Starts servers and provider clients for one test, and stops them all at its end."""

    def __init__(self) -> None:
        self.servers: list[RawServer] = []
        self.clients: list[ProviderClient] = []

    async def serve(self, handler: Handler, tls: ssl.SSLContext | None = None) -> RawServer:
        server = await RawServer(handler, tls).start()
        self.servers.append(server)
        return server

    def client(self, url: str, settings: str = "", request: str = "") -> ProviderClient:
        timeout = "" if "timeout_s:" in settings else "    timeout_s: 2\n"
        yaml = f'providers:\n  CANON:\n    url: "{url}"\n{timeout}{settings}{request}'
        provider = make_config(yaml).providers[0]
        breaker = ProviderBreaker("CANON", provider.settings.breaker)
        client = ProviderClient(provider, GatewayMetrics(["CANON"]), breaker)
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        for server in self.servers:
            await server.stop()


@contextlib.asynccontextmanager
async def network() -> AsyncIterator[Network]:
    net = Network()
    try:
        yield net
    finally:
        await net.close()


@pytest.fixture
async def net() -> AsyncIterator[Network]:
    async with network() as started:
        yield started


async def pay(client: ProviderClient) -> ProviderAnswer:
    """One payment, bounded so that a client bug fails the test instead of hanging it."""
    payment = Payment("TXN-1", Decimal("20.00"), "ZAR", "canon", None, "TXN-1")
    async with asyncio.timeout(10):
        return await client.pay(payment, REFERENCE)


async def reference_of(client: ProviderClient) -> str | None:
    return (await pay(client)).provider_reference


# --- Framing: every way an answer's end can be known ----------------------------------------


@pytest.mark.parametrize(
    "reply",
    [answer(ok("P-7")), chunked(ok("P-7")[:10], ok("P-7")[10:20], ok("P-7")[20:])],
    ids=["content-length", "chunked-in-several-chunks"],
)
async def test_an_answer_is_read_whole_and_its_connection_kept_alive(
    net: Network, reply: bytes
) -> None:
    server = await net.serve(keep_answering(reply))
    client = net.client(server.url)
    for _ in range(3):
        assert await reference_of(client) == "P-7"
    assert server.connections == 1


async def test_an_answer_without_a_length_ends_when_the_provider_closes_the_connection(
    net: Network,
) -> None:
    async def close_delimited(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n")
        await peer.send(ok("UNTIL-EOF")[:9])
        await peer.send(ok("UNTIL-EOF")[9:])

    server = await net.serve(first_connection_then_healthy(close_delimited))
    client = net.client(server.url)
    assert await reference_of(client) == "UNTIL-EOF"
    assert await reference_of(client) == "fresh"
    assert server.connections == 2


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n",
    ],
    ids=["100-continue", "103-early-hints"],
)
async def test_an_interim_1xx_answer_is_skipped_for_the_final_one(
    net: Network, interim: bytes
) -> None:
    server = await net.serve(keep_answering(interim + answer(ok("FINAL"))))
    client = net.client(server.url)
    assert await reference_of(client) == "FINAL"
    assert await reference_of(client) == "FINAL"
    assert server.connections == 1


# --- Keep-alive --------------------------------------------------------------------------------


async def test_concurrent_calls_open_only_as_many_connections_as_were_in_flight(
    net: Network,
) -> None:
    everyone_in = asyncio.Event()

    async def hold_until_ten_arrived(peer: Peer) -> None:
        while await peer.request() is not None:
            if len(peer.server.requests) >= 10:
                everyone_in.set()
            await everyone_in.wait()
            await peer.send(answer())

    server = await net.serve(hold_until_ten_arrived)
    client = net.client(server.url)
    for _ in range(3):
        await asyncio.gather(*(pay(client) for _ in range(10)))
    assert server.connections == 10
    assert len(server.requests) == 30


@pytest.mark.parametrize(
    "reply",
    [answer(extra=b"Connection: close\r\n"), answer(head=b"HTTP/1.0 200 OK")],
    ids=["connection-close", "http-1.0"],
)
async def test_an_answer_that_ends_the_connection_is_not_kept_alive(
    net: Network, reply: bytes
) -> None:
    async def answer_once(peer: Peer) -> None:
        await peer.request()
        await peer.send(reply)
        await peer.until_hangup()  # the client, not the server, closes

    server = await net.serve(answer_once)
    client = net.client(server.url)
    await pay(client)
    await pay(client)
    assert server.connection_of_each_request() == [0, 1]
    await eventually(lambda: server.hangups == 2, "the client closes both connections")


async def test_an_idle_connection_older_than_keepalive_expiry_s_is_never_reused(
    net: Network,
) -> None:
    server = await net.serve(keep_answering())
    client = net.client(server.url, "    keepalive_expiry_s: 0.2\n")
    await pay(client)
    await pay(client)
    assert server.connection_of_each_request() == [0, 0]
    await asyncio.sleep(0.5)  # idle for longer than keepalive_expiry_s
    await pay(client)
    assert server.connection_of_each_request() == [0, 0, 1]
    await eventually(lambda: server.hangups == 1, "the client closes the expired connection")


async def test_a_kept_alive_connection_the_provider_closed_while_idle_is_replaced(
    net: Network,
) -> None:
    closed = asyncio.Event()

    async def answer_once_then_close(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer())
        peer.writer.close()
        await peer.writer.wait_closed()
        closed.set()

    server = await net.serve(answer_once_then_close)
    client = net.client(server.url)
    await pay(client)
    await closed.wait()  # the FIN is on its way; the client's loop has not read it yet
    await pay(client)
    assert server.connection_of_each_request() == [0, 1]
    assert client.breaker.window_counts().failures == 0


# --- Phases: not sent, or sent with an unknown outcome ----------------------------------------


async def _never_read(peer: Peer) -> None:
    await asyncio.Event().wait()


async def _read_then_reset(peer: Peer) -> None:
    await peer.request()
    peer.reset()


async def _read_then_answer_half(peer: Peer) -> None:
    await peer.request()
    await peer.send(answer()[:-5])


async def _read_then_close(peer: Peer) -> None:
    await peer.request()


@pytest.mark.parametrize(
    "provider",
    [_never_read, _read_then_reset, _read_then_answer_half, _read_then_close],
    ids=["accepts-and-never-reads", "reads-and-resets", "answers-half", "reads-and-closes"],
)
async def test_a_call_that_failed_after_the_request_was_written_has_an_unknown_outcome(
    net: Network, provider: Handler
) -> None:
    server = await net.serve(first_connection_then_healthy(provider))
    client = net.client(server.url, "    timeout_s: 0.3\n")
    with pytest.raises(OutcomeUnknown) as raised:
        await pay(client)
    assert (raised.value.status, raised.value.code) == (504, "provider_timeout")
    assert of_error(raised.value).counts_against_breaker
    assert client.breaker.window_counts().failures == 1
    assert await reference_of(client) == "fresh"  # on a new connection: never sent twice
    assert server.connections == 2
    assert [index for index, _ in server.requests if index == 0] in ([], [0])


async def test_a_refused_connection_was_not_sent(net: Network) -> None:
    client = net.client(f"http://127.0.0.1:{free_port()}/pay")
    with pytest.raises(ProviderNotReached, match="cannot reach CANON") as raised:
        await pay(client)
    assert (raised.value.status, raised.value.code) == (502, "provider_error")
    assert client.breaker.window_counts().failures == 1


async def test_a_tls_handshake_that_never_completes_was_not_sent(net: Network) -> None:
    server = await net.serve(_never_read)  # plain TCP: the client's TLS hello gets no answer
    url = server.url.replace("http://", "https://")
    client = net.client(url, "    connect_timeout_s: 0.2\n")
    with pytest.raises(ProviderNotReached, match=r"cannot reach CANON: no connection within 0\.2s"):
        await pay(client)
    assert server.connections == 1


async def test_a_redirect_is_not_followed(net: Network) -> None:
    server = await net.serve(
        keep_answering(
            answer(b"", head=b"HTTP/1.1 307 Temporary Redirect", extra=b"Location: /b\r\n")
        )
    )
    with pytest.raises(ProviderFailed, match="HTTP 307"):
        await pay(net.client(server.url))
    assert len(server.requests) == 1


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_a_request_is_never_sent_again_on_a_reused_connection_the_provider_closed(
    net: Network, method: str
) -> None:
    async def answer_once_then_read_and_close(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer())
        await peer.request()  # the provider read it: it may be charging

    server = await net.serve(first_connection_then_healthy(answer_once_then_read_and_close))
    request = (
        f"    request:\n      method: {method}\n"
        '      headers: {X-Reference-Id: "{reference}"}\n'
        '      body: {reference: "{reference}", amount: "{amount}"}\n'
    )
    client = net.client(server.url, request=request)
    await pay(client)
    with pytest.raises(OutcomeUnknown):
        await pay(client)
    assert server.connection_of_each_request() == [0, 0]
    assert server.connections == 1
    assert all(raw.startswith(method.encode()) for _, raw in server.requests)


async def test_the_request_carries_the_rendered_headers_and_never_expect_100_continue(
    net: Network,
) -> None:
    server = await net.serve(keep_answering())
    await pay(net.client(server.url))
    ((_, raw),) = server.requests
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().lower().split("\r\n")
    assert lines[0] == "post /pay http/1.1"
    assert f"host: 127.0.0.1:{server.port}" in lines
    assert f"x-reference-id: {REFERENCE}" in lines
    assert "content-type: application/json" in lines
    assert f"content-length: {len(body)}" in lines
    assert not [line for line in lines if line.startswith(("expect:", "accept-encoding:"))]
    assert json.loads(body)["reference"] == REFERENCE


# --- Answers that cannot be used ------------------------------------------------------------


def _too_large(style: str) -> bytes:
    body = ok(pad=MAX_ANSWER_BYTES)
    if style == "content-length":
        return answer(body)
    if style == "chunked":
        half = len(body) // 2
        return chunked(body[:half], body[half:])
    return b"HTTP/1.1 200 OK\r\n\r\n" + body


@pytest.mark.parametrize("style", ["content-length", "chunked", "close-delimited"])
async def test_an_answer_larger_than_the_limit_fails_and_its_connection_is_dropped(
    net: Network, style: str
) -> None:
    async def oversized_then_fine(peer: Peer) -> None:
        await peer.request()
        await peer.send(_too_large(style))
        await keep_answering(answer(ok("fresh")))(peer)

    server = await net.serve(first_connection_then_healthy(oversized_then_fine))
    client = net.client(server.url)
    with pytest.raises(OutcomeUnknown, match=f"larger than {MAX_ANSWER_BYTES} bytes"):
        await pay(client)
    # A connection whose answer was cut off is dropped; one whose answer was complete (chunked,
    # received whole before it was measured) is in step and may carry the next call.
    assert await reference_of(client) == "fresh"


async def test_an_answer_of_exactly_the_limit_is_read(net: Network) -> None:
    body = ok("BIG", pad=MAX_ANSWER_BYTES - len(ok("BIG")))
    assert len(body) == MAX_ANSWER_BYTES
    server = await net.serve(keep_answering(answer(body)))
    assert await reference_of(net.client(server.url)) == "BIG"


@pytest.mark.parametrize(
    ("reply", "then_close"),
    [
        (b"garbage that is not HTTP\r\n\r\n", False),
        (b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", False),
        (b"HTTP/1.1 200 OK\r\nX-Filler: " + b"a" * 100_000 + b"\r\n\r\n", False),
        (b"HTT", True),
        (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", True),
        (b"HTTP/1.1 100 Continue\r\n\r\n", True),
    ],
    ids=[
        "garbage",
        "bad-status-code",
        "bad-content-length",
        "bad-chunk-size",
        "endless-header",
        "status-line-cut-short",
        "head-cut-short",
        "chunk-cut-short",
        "only-an-interim-answer",
    ],
)
async def test_a_malformed_or_incomplete_answer_leaves_the_outcome_unknown(
    net: Network, reply: bytes, then_close: bool
) -> None:
    async def misbehave(peer: Peer) -> None:
        await peer.request()
        await peer.send(reply)
        if not then_close:
            await peer.until_hangup()

    server = await net.serve(first_connection_then_healthy(misbehave))
    client = net.client(server.url)
    with pytest.raises(OutcomeUnknown):
        await pay(client)
    assert await reference_of(client) == "fresh"
    assert server.connection_of_each_request() == [0, 1]


@pytest.mark.parametrize(
    ("when", "stray"),
    [
        ("later", answer(ok("STRAY"))),
        ("in-the-same-packet", answer(ok("STRAY"))),
        ("just-before-the-next-call", answer(ok("STRAY"))),
    ],
    ids=["later", "in-the-same-packet", "just-before-the-next-call"],
)
async def test_an_answer_nobody_asked_for_is_never_read_as_the_next_answer(
    net: Network, when: str, stray: bytes
) -> None:
    stray_sent = asyncio.Event()

    async def answer_twice(peer: Peer) -> None:
        await peer.request()
        if when == "in-the-same-packet":
            await peer.send(answer(ok("ASKED")) + stray)
        else:
            await peer.send(answer(ok("ASKED")))
            await asyncio.sleep(0)
            await peer.send(stray)
        stray_sent.set()
        await peer.until_hangup()

    server = await net.serve(first_connection_then_healthy(answer_twice))
    client = net.client(server.url)
    assert await reference_of(client) == "ASKED"
    await stray_sent.wait()
    if when != "just-before-the-next-call":
        await asyncio.sleep(0.05)  # the stray bytes reach the idle connection's protocol
    assert await reference_of(client) == "fresh"
    assert server.connection_of_each_request() == [0, 1]


async def test_a_timeout_closes_the_connection_so_a_late_answer_is_never_read(
    net: Network,
) -> None:
    release = asyncio.Event()

    async def answer_late(peer: Peer) -> None:
        await peer.request()
        await release.wait()
        await peer.send(answer(ok("LATE")))
        await peer.until_hangup()

    server = await net.serve(first_connection_then_healthy(answer_late))
    client = net.client(server.url, "    timeout_s: 0.2\n")
    with pytest.raises(OutcomeUnknown, match=r"did not answer within 0\.2s"):
        await pay(client)
    await eventually(lambda: server.peers[0].reader.at_eof(), "the client closes the connection")
    release.set()
    assert await reference_of(client) == "fresh"
    assert server.connection_of_each_request() == [0, 1]


# --- The pool and payagg's own resources ---------------------------------------------------


async def test_a_full_pool_answers_overloaded_after_pool_wait_s_and_blames_no_provider(
    net: Network,
) -> None:
    release = asyncio.Event()

    async def hold(peer: Peer) -> None:
        while await peer.request() is not None:
            await release.wait()
            await peer.send(answer())

    server = await net.serve(hold)
    client = net.client(server.url, "    pool_size: 1\n    pool_wait_s: 0.1\n")
    first = asyncio.ensure_future(pay(client))
    await eventually(lambda: len(server.requests) == 1, "the first call holds the only slot")
    with pytest.raises(Overloaded, match="connections to CANON stayed busy") as raised:
        await pay(client)
    assert (raised.value.status, raised.value.code, raised.value.outcome) == (
        503,
        "overloaded",
        "overloaded",
    )
    assert raised.value.headers["Retry-After"] == "1"
    release.set()
    assert (await first).outcome == "success"
    assert await reference_of(client) == "P-1"
    assert server.connections == 1
    assert client.breaker.window_counts().calls == 2, "the overloaded call is not counted"


@contextlib.contextmanager
def file_descriptors_exhausted() -> Iterator[None]:
    """Lower RLIMIT_NOFILE to just above the open descriptors and fill the rest."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8, hard))
    try:
        with contextlib.suppress(OSError):
            while True:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_running_out_of_file_descriptors_is_overloaded_never_a_provider_failure(
    net: Network,
) -> None:
    server = await net.serve(keep_answering())
    client = net.client(server.url, "    breaker: {minimum_calls: 1}\n")
    with file_descriptors_exhausted():
        for _ in range(3):
            with pytest.raises(Overloaded, match="Too many open files"):
                await pay(client)
    assert client.breaker.state is BreakerState.CLOSED
    assert client.breaker.window_counts().calls == 0
    assert await reference_of(client) == "P-1"
    assert server.connections == 1


# --- Retry-After ------------------------------------------------------------------------------


async def test_a_503_with_retry_after_keeps_the_breaker_open_that_long(net: Network) -> None:
    server = await net.serve(
        keep_answering(answer(b"", head=b"HTTP/1.1 503 Busy", extra=b"Retry-After: 120\r\n"))
    )
    client = net.client(server.url, "    breaker: {minimum_calls: 1, open_s: 5}\n")
    with pytest.raises(ProviderFailed):
        await pay(client)
    assert client.breaker.state is BreakerState.OPEN
    assert 110 < client.breaker.retry_after_s() <= 120


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("120", 120), (" 7 ", 7), ("", 0), (None, 0), ("soon", 0), ("-3", 0)],
)
def test_retry_after_is_read_as_delta_seconds(header: str | None, seconds: float) -> None:
    assert retry_after_s(header) == seconds


def test_retry_after_is_read_as_an_http_date() -> None:
    import time
    from email.utils import formatdate

    assert 50 < retry_after_s(formatdate(time.time() + 60, usegmt=True)) <= 61
    assert retry_after_s(formatdate(time.time() - 60, usegmt=True)) == 0


# --- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_server(ca: trustme.CA, *names: str, client_ca: trustme.CA | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    if client_ca is not None:
        client_ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "provider-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


async def test_https_to_a_provider_signed_by_its_ca_file_is_read_and_kept_alive(
    net: Network, ca: trustme.CA, tmp_path: Path
) -> None:
    server = await net.serve(keep_answering(chunked(ok("SECURE"))), tls=tls_server(ca, "127.0.0.1"))
    client = net.client(server.url, f'    tls: {{ca_file: "{ca_file(ca, tmp_path)}"}}\n')
    assert await reference_of(client) == "SECURE"
    assert await reference_of(client) == "SECURE"
    assert server.connections == 1


@pytest.mark.parametrize("issuer", ["another-ca", "system-store"])
async def test_https_with_a_certificate_the_client_does_not_trust_was_not_sent(
    net: Network, ca: trustme.CA, tmp_path: Path, issuer: str
) -> None:
    server = await net.serve(keep_answering(), tls=tls_server(trustme.CA(), "127.0.0.1"))
    settings = (
        f'    tls: {{ca_file: "{ca_file(ca, tmp_path)}"}}\n' if issuer == "another-ca" else ""
    )
    client = net.client(server.url, settings)
    with pytest.raises(ProviderNotReached, match="cannot reach CANON"):
        await pay(client)
    assert server.requests == []


async def test_a_client_certificate_is_presented_to_a_provider_that_requires_one(
    net: Network, ca: trustme.CA, tmp_path: Path
) -> None:
    client_ca = trustme.CA()
    server = await net.serve(keep_answering(), tls=tls_server(ca, "127.0.0.1", client_ca=client_ca))
    cert = client_ca.issue_cert("payagg@example.org")
    cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    client = net.client(
        server.url,
        f'    tls: {{ca_file: "{ca_file(ca, tmp_path)}", cert_file: "{cert_file}", '
        f'key_file: "{key_file}"}}\n',
    )
    assert await reference_of(client) == "P-1"
    peer_cert = server.peers[0].writer.get_extra_info("peercert")
    assert ("email", "payagg@example.org") in peer_cert["subjectAltName"]


# --- Egress proxy -----------------------------------------------------------------------------


@pytest.fixture
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


async def test_http_proxy_from_the_environment_carries_the_call(
    net: Network, no_proxy_environment: pytest.MonkeyPatch
) -> None:
    proxy = await net.serve(keep_answering(answer(ok("VIA-PROXY"))))
    no_proxy_environment.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    provider_url = f"http://127.0.0.1:{free_port()}/pay"
    assert await reference_of(net.client(provider_url)) == "VIA-PROXY"
    ((_, raw),) = proxy.requests
    assert raw.startswith(f"POST {provider_url} HTTP/1.1\r\n".encode())


@pytest.mark.parametrize("status", [502, 504])
async def test_an_egress_proxys_gateway_error_leaves_the_outcome_unknown(
    net: Network, no_proxy_environment: pytest.MonkeyPatch, status: int
) -> None:
    proxy = await net.serve(keep_answering(answer(b"", head=b"HTTP/1.1 %d Bad Gateway" % status)))
    no_proxy_environment.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    with pytest.raises(OutcomeUnknown, match="egress proxy"):
        await pay(net.client(f"http://127.0.0.1:{free_port()}/pay"))


async def test_no_proxy_sends_the_call_directly(
    net: Network, no_proxy_environment: pytest.MonkeyPatch
) -> None:
    proxy = await net.serve(keep_answering(answer(ok("VIA-PROXY"))))
    provider = await net.serve(keep_answering(answer(ok("DIRECT"))))
    no_proxy_environment.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    no_proxy_environment.setenv("NO_PROXY", "127.0.0.1")
    assert await reference_of(net.client(provider.url)) == "DIRECT"
    assert proxy.requests == []


# --- uvloop, the loop payagg serves on ------------------------------------------------------


def test_the_main_paths_work_on_uvloop(ca: trustme.CA, tmp_path: Path) -> None:
    async def scenario() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        async with network() as net:
            server = await net.serve(first_connection_then_healthy(_read_then_reset))
            client = net.client(server.url)
            with pytest.raises(OutcomeUnknown):
                await pay(client)
            assert await reference_of(client) == "fresh"
            assert await reference_of(client) == "fresh"
            assert server.connection_of_each_request() == [0, 1, 1]
            with pytest.raises(ProviderNotReached):
                await pay(net.client(f"http://127.0.0.1:{free_port()}/pay"))
            closed = asyncio.Event()

            async def answer_once_then_close(peer: Peer) -> None:
                await peer.request()
                await peer.send(answer())
                peer.writer.close()
                await peer.writer.wait_closed()
                closed.set()

            closing = await net.serve(answer_once_then_close)
            client = net.client(closing.url)
            await pay(client)
            await closed.wait()
            await pay(client)  # the unread close is seen before anything is written
            assert closing.connection_of_each_request() == [0, 1]
            tls = tls_server(ca, "127.0.0.1")
            secure = await net.serve(keep_answering(chunked(ok("SECURE"))), tls=tls)
            client = net.client(secure.url, f'    tls: {{ca_file: "{ca_file(ca, tmp_path)}"}}\n')
            assert await reference_of(client) == "SECURE"

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


def test_every_provider_call_error_is_a_payment_error_with_its_own_status() -> None:
    assert issubclass(ProviderNotReached, ProviderFailed)
    assert issubclass(OutcomeUnknown, PaymentError)
    assert not of_error(Overloaded("pool full")).counts_against_breaker


async def test_a_full_pool_answers_503_overloaded_through_the_gateway_and_releases_the_key(
    upstream: tuple[UpstreamState, str], redis_url: str
) -> None:
    state, url = upstream
    state.delay_s = 0.5
    yaml = gateway_yaml(url, redis_url).replace(
        f'CANON: {{url: "{url}"}}', f'CANON: {{url: "{url}", pool_size: 1, pool_wait_s: 0.05}}'
    )
    async with running_gateway(make_config(yaml)) as gateway:
        first = asyncio.ensure_future(gateway.post("/v1/pay", json=payment("TXN-A")))
        await eventually(lambda: state.requests == 1, "the first payment holds the only slot")
        refused = await gateway.post("/v1/pay", json=payment("TXN-B"))
        assert refused.status == 503
        assert refused.headers["Retry-After"] == "1"
        assert (await refused.json())["error"] == "overloaded"
        assert (await first).status == 200
        state.delay_s = 0
        retried = await gateway.post("/v1/pay", json=payment("TXN-B"))
        assert retried.status == 200, "nothing was stored for the overloaded attempt"
        assert "Idempotent-Replayed" not in retried.headers
        metrics = await (await gateway.get("/metrics")).text()
        overloaded = 'payagg_requests_total{client="open",outcome="overloaded",provider="CANON"}'
        assert f"{overloaded} 1.0" in metrics
        assert gateway.gateway.breakers["CANON"].window_counts().calls == 2


def _lowest_free_fd(pid: int) -> int:
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return next(number for number in range(len(used) + 1) if number not in used)


def test_a_proxy_out_of_file_descriptors_answers_503_overloaded_and_blames_no_provider(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    upstream_port, proxy_port = free_port(), free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f'redis: {{url: "{redis_server.url}"}}\n'
        "providers:\n"
        f'  CANON: {{url: "http://127.0.0.1:{upstream_port}/pay", breaker: {{minimum_calls: 1}}}}\n'
    )
    upstream_argv = [sys.executable, "-m", "tests.canonical_upstream", "--port", str(upstream_port)]
    with (
        running(
            upstream_argv,
            f"http://127.0.0.1:{upstream_port}/healthz",
            env={"PYTHONPATH": str(ROOT)},
        ),
        running(payagg_serve(config, proxy_port), f"http://127.0.0.1:{proxy_port}/readyz") as proxy,
    ):
        connection = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)

        def ask(method: str, path: str, body: object = None) -> tuple[int, dict[str, str], Any]:
            data = json.dumps(body).encode() if body is not None else None
            connection.request(method, path, data, {"Content-Type": "application/json"})
            answer = connection.getresponse()
            return answer.status, dict(answer.headers), json.loads(answer.read())

        assert ask("GET", "/readyz")[0] == 200  # Redis connected, this connection accepted
        pid = proxy.process.pid
        _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        # No descriptor can be opened any more: the next one would be numbered past the limit.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (_lowest_free_fd(pid), hard))
        status, headers, body = ask("POST", "/v1/pay", payment("FD-1"))
        assert (status, body["error"], headers["Retry-After"]) == (503, "overloaded", "1")
        assert "Too many open files" in body["message"]
        _, _, providers = ask("GET", "/v1/providers")
        assert providers["providers"][0]["state"] == "closed"
        assert providers["providers"][0]["window"] == {"calls": 0, "failures": 0}
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
        status, _, body = ask("POST", "/v1/pay", payment("FD-1"))
        assert (status, body["status"]) == (200, "SUCCESS"), "the key was released"
        connection.close()


def connect_tunnel(refuse_with: bytes | None = None) -> Handler:
    """An egress proxy's CONNECT: a byte pipe to the named host, or a refusal."""

    async def handler(peer: Peer) -> None:
        head = await peer.request()
        assert head is not None
        assert head.startswith(b"CONNECT ")
        if refuse_with is not None:
            await peer.send(refuse_with)
            return
        host, _, port = head.split(b" ")[1].decode().rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        await peer.send(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
            sink.close()

        await asyncio.gather(pipe(peer.reader, writer), pipe(reader, peer.writer))

    return handler


async def test_https_proxy_from_the_environment_tunnels_the_call_with_tls_end_to_end(
    net: Network, no_proxy_environment: pytest.MonkeyPatch, ca: trustme.CA, tmp_path: Path
) -> None:
    provider = await net.serve(
        keep_answering(answer(ok("TUNNELLED"))), tls=tls_server(ca, "127.0.0.1")
    )
    proxy = await net.serve(connect_tunnel())
    no_proxy_environment.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    client = net.client(provider.url, f'    tls: {{ca_file: "{ca_file(ca, tmp_path)}"}}\n')
    assert await reference_of(client) == "TUNNELLED"
    ((_, connect),) = proxy.requests
    assert connect.startswith(f"CONNECT 127.0.0.1:{provider.port} HTTP/1.1\r\n".encode())
    assert len(provider.requests) == 1


async def test_a_tunnel_the_egress_proxy_refuses_was_not_sent(
    net: Network, no_proxy_environment: pytest.MonkeyPatch, ca: trustme.CA, tmp_path: Path
) -> None:
    provider = await net.serve(keep_answering(), tls=tls_server(ca, "127.0.0.1"))
    proxy = await net.serve(
        connect_tunnel(refuse_with=answer(b"", head=b"HTTP/1.1 502 Bad Gateway"))
    )
    no_proxy_environment.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    client = net.client(provider.url, f'    tls: {{ca_file: "{ca_file(ca, tmp_path)}"}}\n')
    with pytest.raises(ProviderNotReached, match="cannot reach CANON"):
        await pay(client)
    assert provider.requests == []
