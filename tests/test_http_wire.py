"""The provider wire client (proxy.http_wire) against real servers over real sockets.

aiohttp's own server stands in for an ordinary provider; raw `asyncio.start_server` handlers
send byte-exact (and misbehaving) answers where the test needs control of every byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import pytest
import trustme
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.breaker import ProviderBreaker
from proxy.http_wire import (
    MAX_ANSWER_BYTES,
    AnswerTooLarge,
    ConnectionPool,
    HttpAnswer,
    UpstreamConnectionError,
)
from proxy.mapping import PaymentFields
from proxy.metrics import GatewayMetrics
from proxy.payment import Payment
from proxy.upstream import ProviderClient
from tests.conftest import make_config
from tests.processes import free_port

REQUEST = b"POST /pay HTTP/1.1\r\nHost: provider\r\nContent-Length: 2\r\n\r\n{}"


def answer(body: bytes = b"ok", head: bytes = b"HTTP/1.1 200 OK", extra: bytes = b"") -> bytes:
    """A complete answer framed by Content-Length."""
    return b"%s\r\nContent-Length: %d\r\n%s\r\n%s" % (head, len(body), extra, body)


def chunked(*chunks: bytes) -> bytes:
    framed = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framed + b"0\r\n\r\n"


async def eventually(predicate: Callable[[], bool], what: str, timeout_s: float = 2.0) -> None:
    """Let the loop run until `predicate()` holds; fail naming `what` after `timeout_s`."""
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
        """Wait for the client to close this connection."""
        while await self.request() is not None:
            pass


Handler = Callable[[Peer], Awaitable[None]]


class RawServer:
    """asyncio.start_server on a free port; `handler` plays one connection; all are counted."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.hangups = 0  # connections the client closed while the server waited to read
        self.finished = 0  # connections whose handler has returned (the server closed them)
        self.requests: list[tuple[int, bytes]] = []  # (connection index, raw request)
        self.peers: list[Peer] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}/pay"

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
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        index, self.connections = self.connections, self.connections + 1
        peer = Peer(self, index, reader, writer)
        self.peers.append(peer)
        try:
            await self.handler(peer)
        except ConnectionError:
            pass
        finally:
            self.finished += 1
            writer.close()
            self._tasks.discard(task)


def keep_answering(reply: bytes = answer()) -> Handler:
    """A well-behaved keep-alive provider: every request gets `reply`."""

    async def handler(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(reply)

    return handler


def first_connection_then_healthy(first: Handler, reply: bytes = answer(b"fresh")) -> Handler:
    """Connection 0 plays `first`; every later connection answers `reply` to each request."""
    healthy = keep_answering(reply)

    async def handler(peer: Peer) -> None:
        await (first if peer.index == 0 else healthy)(peer)

    return handler


class Network:
    """Starts servers and pools for one test, and stops them all at its end."""

    def __init__(self) -> None:
        self.servers: list[RawServer] = []
        self.pools: list[ConnectionPool] = []

    async def serve(self, handler: Handler, tls: ssl.SSLContext | None = None) -> RawServer:
        server = await RawServer(handler, tls).start()
        self.servers.append(server)
        return server

    def pool(self, url: str, limit: int = 256) -> ConnectionPool:
        pool = ConnectionPool(url, limit)
        self.pools.append(pool)
        return pool

    async def close(self) -> None:
        for pool in self.pools:
            pool.close()
        for server in self.servers:
            await server.stop()


@asynccontextmanager
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


async def exchange(pool: ConnectionPool, request: bytes = REQUEST) -> HttpAnswer:
    """One exchange, bounded so that a client bug fails the test instead of hanging it."""
    async with asyncio.timeout(5):
        return await pool.exchange(request)


# --- Framing: every way an answer's end can be known -------------------------------------------


async def _length(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"SUCCESS"}', content_type="application/json")


async def _chunked(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    for piece in (b'{"status":', b'"SUCC', b'ESS"}'):
        await response.write(piece)
    await response.write_eof()
    return response


async def _empty(request: web.Request) -> web.Response:
    return web.Response(status=204)


@pytest.fixture
async def aiohttp_provider() -> AsyncIterator[tuple[str, set[object]]]:
    """An aiohttp server: its base URL and the transports (connections) its requests came on."""
    transports: set[object] = set()

    @web.middleware
    async def remember_transport(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        transports.add(request.transport)
        return await handler(request)

    app = web.Application(middlewares=[remember_transport])
    app.router.add_post("/length", _length)
    app.router.add_post("/chunked", _chunked)
    app.router.add_post("/empty", _empty)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")), transports
    await server.close()


def post(path: str) -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: provider\r\nContent-Length: 2\r\n\r\n{}" % path.encode()


@pytest.mark.parametrize(
    ("path", "status", "body"),
    [
        ("/length", 200, b'{"status":"SUCCESS"}'),
        ("/chunked", 200, b'{"status":"SUCCESS"}'),
        ("/empty", 204, b""),
    ],
    ids=["content-length", "chunked-in-several-chunks", "204-empty"],
)
async def test_an_answer_is_read_whole_and_its_connection_kept_alive(
    net: Network, aiohttp_provider: tuple[str, set[object]], path: str, status: int, body: bytes
) -> None:
    base, transports = aiohttp_provider
    pool = net.pool(base + path)
    for _ in range(3):
        assert await exchange(pool, post(path)) == HttpAnswer(status, body)
    assert len(transports) == 1


async def test_an_answer_without_a_length_ends_when_the_provider_closes_the_connection(
    net: Network,
) -> None:
    async def close_delimited(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n")
        await peer.send(b'{"status":')
        await peer.send(b'"SUCCESS"}')

    server = await net.serve(first_connection_then_healthy(close_delimited))
    pool = net.pool(server.url)
    assert await exchange(pool) == HttpAnswer(200, b'{"status":"SUCCESS"}')
    assert await exchange(pool) == HttpAnswer(200, b"fresh")
    assert server.connections == 2


@pytest.mark.parametrize(
    ("interim", "final"),
    [
        (b"HTTP/1.1 100 Continue\r\n\r\n", answer(b"final")),
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n", answer(b"final")),
        (b"HTTP/1.1 100 Continue\r\n\r\n", chunked(b"fin", b"al")),
    ],
    ids=["100-continue", "103-early-hints", "100-then-chunked"],
)
async def test_an_interim_1xx_answer_is_skipped_for_the_final_one(
    net: Network, interim: bytes, final: bytes
) -> None:
    async def interim_first(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(interim + final)

    server = await net.serve(interim_first)
    pool = net.pool(server.url)
    assert await exchange(pool) == HttpAnswer(200, b"final")
    assert await exchange(pool) == HttpAnswer(200, b"final")
    assert server.connections == 1


# --- Keep-alive ------------------------------------------------------------------------------


async def test_sequential_exchanges_share_one_kept_alive_connection(
    net: Network, aiohttp_provider: tuple[str, set[object]]
) -> None:
    base, transports = aiohttp_provider
    pool = net.pool(base + "/length")
    for _ in range(25):
        await exchange(pool, post("/length"))
    assert len(transports) == 1


async def test_concurrent_exchanges_open_only_as_many_connections_as_were_in_flight(
    net: Network, aiohttp_provider: tuple[str, set[object]]
) -> None:
    base, transports = aiohttp_provider
    pool = net.pool(base + "/length")
    for _ in range(4):
        answers = await asyncio.gather(*(exchange(pool, post("/length")) for _ in range(10)))
        assert {a.status for a in answers} == {200}
    assert len(transports) == 10


async def test_connection_close_from_the_provider_is_honoured(net: Network) -> None:
    async def answer_and_ask_to_close(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer(b"bye", extra=b"Connection: close\r\n"))
        await peer.until_hangup()  # the client, not the server, closes

    server = await net.serve(answer_and_ask_to_close)
    pool = net.pool(server.url)
    assert await exchange(pool) == HttpAnswer(200, b"bye")
    await eventually(lambda: server.hangups == 1, "the client closes the connection")
    assert await exchange(pool) == HttpAnswer(200, b"bye")
    assert server.connections == 2


async def test_an_http_1_0_answer_is_not_kept_alive(net: Network) -> None:
    async def http_1_0(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer(b"old", head=b"HTTP/1.0 200 OK"))
        await peer.until_hangup()

    server = await net.serve(http_1_0)
    pool = net.pool(server.url)
    assert await exchange(pool) == HttpAnswer(200, b"old")
    assert await exchange(pool) == HttpAnswer(200, b"old")
    assert server.connections == 2


async def test_a_kept_alive_connection_the_provider_closed_while_idle_is_replaced(
    net: Network,
) -> None:
    async def answer_once_then_close(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer(b"once"))

    server = await net.serve(answer_once_then_close)
    pool = net.pool(server.url)
    assert await exchange(pool) == HttpAnswer(200, b"once")
    await eventually(lambda: server.finished == 1, "the provider closes the idle connection")
    assert await exchange(pool) == HttpAnswer(200, b"once")
    assert server.connection_of_each_request() == [0, 1]


async def test_a_kept_alive_connection_closed_as_the_request_is_written_is_retried_once(
    net: Network,
) -> None:
    async def answer_once_then_drop_the_next(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer(b"first"))
        await peer.request()  # the client reused this connection; it closes without a byte

    server = await net.serve(first_connection_then_healthy(answer_once_then_drop_the_next))
    pool = net.pool(server.url)
    assert await exchange(pool) == HttpAnswer(200, b"first")
    assert await exchange(pool) == HttpAnswer(200, b"fresh")
    # The documented trade: the same request (same provider reference) reached the provider
    # twice, once on the dying connection and once on a fresh one.
    assert server.connection_of_each_request() == [0, 0, 1]


async def _drop_without_answering(peer: Peer) -> None:
    await peer.request()


async def _answer_then_cut_the_next_answer_short(peer: Peer) -> None:
    await peer.request()
    await peer.send(answer(b"first"))
    await peer.request()
    await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")


@pytest.mark.parametrize(
    ("first", "warm_up", "requests_seen"),
    [
        (_drop_without_answering, False, [0]),
        (_answer_then_cut_the_next_answer_short, True, [0, 0]),
    ],
    ids=["fresh-connection-closed-before-any-answer", "reused-connection-answer-cut-short"],
)
async def test_a_failure_that_is_not_a_stale_kept_alive_connection_is_not_retried(
    net: Network, first: Handler, warm_up: bool, requests_seen: list[int]
) -> None:
    server = await net.serve(first_connection_then_healthy(first))
    pool = net.pool(server.url)
    if warm_up:
        assert await exchange(pool) == HttpAnswer(200, b"first")
    with pytest.raises(UpstreamConnectionError, match="closed before a complete answer"):
        await exchange(pool)
    assert server.connection_of_each_request() == requests_seen


async def test_connection_refused_raises_os_error(net: Network) -> None:
    pool = net.pool(f"http://127.0.0.1:{free_port()}/pay")
    with pytest.raises(ConnectionRefusedError):
        await exchange(pool)


# --- Answers that cannot be used -----------------------------------------------------------


def _too_large(style: str) -> bytes:
    body = b"x" * (MAX_ANSWER_BYTES + 1)
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
    async def oversized(peer: Peer) -> None:
        await peer.request()
        await peer.send(_too_large(style))
        await peer.until_hangup()  # the client drops it; the server would keep it open

    server = await net.serve(first_connection_then_healthy(oversized))
    pool = net.pool(server.url)
    with pytest.raises(AnswerTooLarge, match=f"larger than {MAX_ANSWER_BYTES} bytes"):
        await exchange(pool)
    assert issubclass(AnswerTooLarge, UpstreamConnectionError)
    await eventually(lambda: server.hangups == 1, "the client closes the oversized connection")
    assert await exchange(pool) == HttpAnswer(200, b"fresh")
    assert server.connections == 2


async def test_an_answer_of_exactly_the_limit_is_read(net: Network) -> None:
    body = b"y" * MAX_ANSWER_BYTES
    server = await net.serve(keep_answering(answer(body)))
    assert await exchange(net.pool(server.url)) == HttpAnswer(200, body)


@pytest.mark.parametrize(
    ("reply", "then_close"),
    [
        (b"garbage that is not HTTP\r\n\r\n", False),
        (b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", False),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n", False),
        (b"HTT", True),
        (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", True),
        (b"HTTP/1.1 100 Continue\r\n\r\n", True),
    ],
    ids=[
        "garbage",
        "bad-status-code",
        "bad-content-length",
        "bad-chunk-size",
        "protocol-switch",
        "status-line-cut-short",
        "head-cut-short",
        "body-cut-short",
        "chunk-cut-short",
        "only-an-interim-answer",
    ],
)
async def test_a_malformed_or_incomplete_answer_is_a_connection_error(
    net: Network, reply: bytes, then_close: bool
) -> None:
    async def misbehave(peer: Peer) -> None:
        await peer.request()
        await peer.send(reply)
        if not then_close:
            await peer.until_hangup()

    server = await net.serve(first_connection_then_healthy(misbehave))
    pool = net.pool(server.url)
    with pytest.raises(UpstreamConnectionError):
        await exchange(pool)
    assert await exchange(pool) == HttpAnswer(200, b"fresh")
    assert server.connection_of_each_request() == [0, 1]


async def test_an_answer_nobody_asked_for_takes_the_connection_out_of_the_pool(
    net: Network,
) -> None:
    send_stray = asyncio.Event()

    async def answer_twice(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer(b"asked"))
        await send_stray.wait()
        await peer.send(answer(b"STRAY"))
        await peer.until_hangup()

    server = await net.serve(first_connection_then_healthy(answer_twice))
    pool = net.pool(server.url)
    assert await exchange(pool) == HttpAnswer(200, b"asked")
    send_stray.set()
    await eventually(lambda: server.hangups == 1, "the client drops the out-of-step connection")
    assert await exchange(pool) == HttpAnswer(200, b"fresh")


async def test_a_second_answer_in_the_same_packet_is_never_read_as_the_next_answer(
    net: Network,
) -> None:
    async def answer_twice_at_once(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer(b"asked") + answer(b"STRAY"))
        await peer.until_hangup()

    server = await net.serve(first_connection_then_healthy(answer_twice_at_once))
    pool = net.pool(server.url)
    assert await exchange(pool) == HttpAnswer(200, b"asked")
    assert await exchange(pool) == HttpAnswer(200, b"fresh")
    assert server.connection_of_each_request() == [0, 1]


# --- Timeouts and the pool limit ---------------------------------------------------------------


async def test_a_timeout_mid_exchange_closes_the_connection_so_a_late_answer_is_never_read(
    net: Network,
) -> None:
    release = asyncio.Event()

    async def answer_late_then_keep_answering(peer: Peer) -> None:
        await peer.request()
        await release.wait()
        await peer.send(answer(b"LATE"))
        while await peer.request() is not None:
            await peer.send(answer(b"STALE"))

    server = await net.serve(first_connection_then_healthy(answer_late_then_keep_answering))
    pool = net.pool(server.url)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await pool.exchange(REQUEST)
    await eventually(lambda: server.peers[0].reader.at_eof(), "the client closes the connection")
    release.set()
    await eventually(lambda: server.finished == 1, "the late answer met a closed connection")
    assert await exchange(pool) == HttpAnswer(200, b"fresh")
    assert server.connection_of_each_request() == [0, 1]


async def test_no_more_than_limit_exchanges_are_in_flight_at_once(net: Network) -> None:
    limit = 3
    in_flight = 0
    most_in_flight = 0
    limit_reached = asyncio.Event()

    async def hold_until_the_limit_is_reached(peer: Peer) -> None:
        nonlocal in_flight, most_in_flight
        while await peer.request() is not None:
            in_flight += 1
            most_in_flight = max(most_in_flight, in_flight)
            if in_flight >= limit:
                limit_reached.set()
            await limit_reached.wait()  # the first `limit` requests are all held at once
            in_flight -= 1
            await peer.send(answer())

    server = await net.serve(hold_until_the_limit_is_reached)
    pool = net.pool(server.url, limit=limit)
    answers = await asyncio.gather(*(exchange(pool) for _ in range(4 * limit)))
    assert [a.status for a in answers] == [200] * 4 * limit
    assert most_in_flight == limit
    assert server.connections == limit


# --- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate_authority() -> trustme.CA:
    return trustme.CA()


def tls_server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


@pytest.fixture
def trust(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[trustme.CA], None]:
    """Make `ssl.create_default_context()` (so pools created afterwards) trust only this CA."""

    def trust_only(ca: trustme.CA) -> None:
        path = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(path))
        monkeypatch.setenv("SSL_CERT_FILE", str(path))
        monkeypatch.delenv("SSL_CERT_DIR", raising=False)

    return trust_only


async def test_https_with_a_trusted_certificate_is_read_and_kept_alive(
    net: Network, certificate_authority: trustme.CA, trust: Callable[[trustme.CA], None]
) -> None:
    trust(certificate_authority)
    tls = tls_server_context(certificate_authority, "127.0.0.1", "localhost")
    server = await net.serve(keep_answering(chunked(b"sec", b"ure")), tls=tls)
    assert server.url.startswith("https://")
    pool = net.pool(server.url)
    assert await exchange(pool) == HttpAnswer(200, b"secure")
    assert await exchange(pool) == HttpAnswer(200, b"secure")
    assert server.connections == 1


@pytest.mark.parametrize(
    ("issuer", "names"),
    [("another-ca", ("127.0.0.1",)), ("trusted-ca", ("other.example",))],
    ids=["untrusted-issuer", "name-mismatch"],
)
async def test_https_with_a_certificate_the_client_cannot_verify_fails(
    net: Network,
    certificate_authority: trustme.CA,
    trust: Callable[[trustme.CA], None],
    issuer: str,
    names: tuple[str, ...],
) -> None:
    trust(certificate_authority)
    ca = trustme.CA() if issuer == "another-ca" else certificate_authority
    server = await net.serve(keep_answering(), tls=tls_server_context(ca, *names))
    with pytest.raises(ssl.SSLCertVerificationError):
        await exchange(net.pool(server.url))
    assert server.requests == []


# --- The request on the wire ---------------------------------------------------------------


async def test_the_provider_receives_exactly_the_request_that_was_rendered(
    net: Network,
) -> None:
    server = await net.serve(keep_answering(answer(b'{"result":"ok","id":"P-7"}')))
    config = make_config(
        f"""
providers:
  CUSTOM:
    url: "{server.url.replace("/pay", "/v2/charge?merchant=42&mode=live")}"
    request:
      method: PUT
      headers: {{X-Api-Key: "key-{{provider}}", Idempotency-Key: "{{idempotency_key}}"}}
      body: {{ref: "{{reference}}", cents: "{{amount:minor_units}}", msisdn: "{{payer}}"}}
    response:
      success: [{{status: 200, field: result, equals: ok}}]
      provider_reference: id
"""
    )
    provider = config.providers[0]
    client = ProviderClient(
        provider, GatewayMetrics(["CUSTOM"]), ProviderBreaker("CUSTOM", provider.settings.breaker)
    )
    try:
        payment = Payment("TXN-9", Decimal("12.34"), "UGX", "custom", "256700000001", "KEY-9")
        verdict = await client.pay(payment, "REF-9")
    finally:
        client.close()
    fields = PaymentFields(
        "TXN-9", Decimal("12.34"), "UGX", "256700000001", "REF-9", "TXN-9", "CUSTOM"
    )
    ((_, sent),) = server.requests
    assert sent == client.render_request(fields)
    head, _, body = sent.partition(b"\r\n\r\n")
    port = server.url.split(":")[2].split("/")[0]
    assert head.decode().split("\r\n") == [
        "PUT /v2/charge?merchant=42&mode=live HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        "Accept: application/json",
        "X-Api-Key: key-CUSTOM",
        "Idempotency-Key: TXN-9",  # the payment's identity, whatever header the client sent
        f"Content-Length: {len(body)}",
    ]
    assert json.loads(body) == {"ref": "REF-9", "cents": 1234, "msisdn": "256700000001"}
    assert (verdict.outcome, verdict.provider_reference) == ("success", "P-7")


# --- uvloop, the loop payagg serves on --------------------------------------------------------


async def _the_main_paths(net: Network) -> None:
    async def answer_once_then_drop_the_next(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer(b"first"))
        await peer.request()

    server = await net.serve(first_connection_then_healthy(answer_once_then_drop_the_next))
    pool = net.pool(server.url)
    assert await exchange(pool) == HttpAnswer(200, b"first")
    assert await exchange(pool) == HttpAnswer(200, b"fresh")  # retried on a fresh connection
    assert await exchange(pool) == HttpAnswer(200, b"fresh")  # and that one kept alive
    assert server.connection_of_each_request() == [0, 0, 1, 1]

    async def close_delimited(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n\r\nuntil-")
        await peer.send(b"eof")

    server = await net.serve(close_delimited)
    assert await exchange(net.pool(server.url)) == HttpAnswer(200, b"until-eof")

    server = await net.serve(keep_answering(chunked(b"a" * 1000, b"b")))
    pool = net.pool(server.url)
    answers = await asyncio.gather(*(exchange(pool) for _ in range(5)))
    assert {a.body for a in answers} == {b"a" * 1000 + b"b"}

    server = await net.serve(first_connection_then_healthy(_drop_without_answering))
    with pytest.raises(UpstreamConnectionError):
        await exchange(net.pool(server.url))

    async def answer_late(peer: Peer) -> None:
        await peer.request()
        await asyncio.sleep(5)

    server = await net.serve(first_connection_then_healthy(answer_late))
    pool = net.pool(server.url)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await pool.exchange(REQUEST)
    assert await exchange(pool) == HttpAnswer(200, b"fresh")


async def _tls_paths(net: Network, ca: trustme.CA) -> None:
    tls = tls_server_context(ca, "127.0.0.1")
    server = await net.serve(keep_answering(chunked(b"sec", b"ure")), tls=tls)
    pool = net.pool(server.url)
    assert await exchange(pool) == HttpAnswer(200, b"secure")
    assert await exchange(pool) == HttpAnswer(200, b"secure")
    assert server.connections == 1

    server = await net.serve(keep_answering(), tls=tls_server_context(trustme.CA(), "127.0.0.1"))
    with pytest.raises(ssl.SSLCertVerificationError):
        await exchange(net.pool(server.url))


def test_the_main_paths_work_on_uvloop_transports(
    certificate_authority: trustme.CA, trust: Callable[[trustme.CA], None]
) -> None:
    trust(certificate_authority)

    async def scenario() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        async with network() as net:
            await _the_main_paths(net)
            await _tls_paths(net, certificate_authority)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


async def test_endless_answer_headers_are_cut_off_at_the_head_limit() -> None:
    async def endless_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n")
        with contextlib.suppress(ConnectionError):
            while not writer.is_closing():
                writer.write(b"X-Filler: " + b"a" * 1000 + b"\r\n")
                await writer.drain()

    server = await asyncio.start_server(endless_headers, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = ConnectionPool(f"http://127.0.0.1:{port}/")
    try:
        with pytest.raises(AnswerTooLarge, match="headers larger than"):
            await asyncio.wait_for(pool.exchange(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), 10)
    finally:
        pool.close()
        server.close()
