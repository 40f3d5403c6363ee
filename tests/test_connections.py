"""Slow and broken clients: the read deadline, idle keep-alive, max_connections, hang-ups
and malformed HTTP, over real sockets against an in-process gateway."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import urllib.request
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParserC, HttpRequestParserPy

from proxy.observability.logs import JsonFormatter
from proxy.server.connections import parser_reason
from tests.canonical_upstream import UpstreamState
from tests.conftest import GatewayClient, gateway_yaml, make_config, payment, running_gateway
from tests.processes import free_port, payagg_serve, running, wait_until

SECRET = "SECRET-4111111111111111"
PAY_HEAD = "POST /v1/pay HTTP/1.1\r\nHost: payagg\r\nContent-Type: application/json\r\n"
PAY_BODY = json.dumps(payment("TXN-SLOW", Payer=SECRET)).encode()
# Generous bounds for an answer that should come at a deadline of a fraction of a second.
EVENTUALLY_S = 15


def server_settings(**settings: object) -> str:
    pairs = ", ".join(f"{key}: {value}" for key, value in settings.items())
    return f"server: {{{pairs}}}\n"


@pytest.fixture
def start_gateway(
    upstream: tuple[UpstreamState, str], redis_url: str
) -> Callable[..., contextlib.AbstractAsyncContextManager[GatewayClient]]:
    def start(**settings: object) -> contextlib.AbstractAsyncContextManager[GatewayClient]:
        settings = {"read_timeout_s": 0.3, "keepalive_timeout_s": 30, **settings}
        extra = server_settings(**settings)
        return running_gateway(make_config(gateway_yaml(upstream[1], redis_url, extra)))

    return start


@pytest.fixture
async def gateway(start_gateway) -> AsyncIterator[GatewayClient]:  # type: ignore[no-untyped-def]
    async with start_gateway() as client:
        yield client


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Callable[[], list[dict[str, object]]]:
    """Every log line the gateway (and aiohttp) wrote, as the JSON objects it would print."""
    caplog.set_level(logging.DEBUG)
    formatter = JsonFormatter()

    def lines() -> list[dict[str, object]]:
        return [json.loads(formatter.format(record)) for record in caplog.records]

    return lines


async def connect(client: GatewayClient) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert client.server.port is not None
    return await asyncio.open_connection("127.0.0.1", client.server.port)


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything the gateway sends until it closes the connection (a reset counts as closed)."""
    received = b""
    with contextlib.suppress(ConnectionResetError):
        async with asyncio.timeout(EVENTUALLY_S):
            while chunk := await reader.read(65536):
                received += chunk
    return received


def parse_answer(raw: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, json.loads(body)


def counted(client: GatewayClient, outcome: str) -> float:
    """Requests of no known provider: `unknown` client when the connection could not be read,
    `open` (auth: off) when the payment's body could not."""
    registry = client.gateway.metrics.registry
    return sum(
        registry.get_sample_value(
            "payagg_requests_total", {"provider": "unknown", "outcome": outcome, "client": who}
        )
        or 0.0
        for who in ("open", "unknown")
    )


async def eventually(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(EVENTUALLY_S):
        while not condition():  # noqa: ASYNC110 (a metric has no event to wait on)
            await asyncio.sleep(0.01)


async def keep_sending(writer: asyncio.StreamWriter, piece: bytes) -> None:
    """A client that trickles bytes and never finishes, until the gateway hangs up."""
    with contextlib.suppress(ConnectionError):
        for _ in range(1000):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)


async def answer_while_trickling(
    client: GatewayClient, first: bytes, piece: bytes
) -> tuple[bytes, bool]:
    """The answer to a request that keeps coming, and whether the trickle was still going."""
    reader, writer = await connect(client)
    writer.write(first)
    trickle = asyncio.create_task(keep_sending(writer, piece))
    answer = await read_to_eof(reader)
    still_trickling = not trickle.done()
    trickle.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await trickle
    writer.close()
    return answer, still_trickling


async def test_headers_not_complete_by_the_read_deadline_get_a_json_408_then_eof(gateway):
    reader, writer = await connect(gateway)
    writer.write(PAY_HEAD.encode())  # the blank line that ends the headers never comes

    status, headers, body = parse_answer(await read_to_eof(reader))

    assert status == 408
    assert headers["Content-Type"] == "application/json"
    assert headers["Connection"] == "close"
    assert body["error"] == "request_timeout"
    assert counted(gateway, "request_timeout") == 1
    writer.close()


async def test_a_slowloris_header_dribble_is_cut_at_the_read_deadline(gateway):
    answer, still_trickling = await answer_while_trickling(
        gateway, PAY_HEAD.encode(), b"X-Dribble: a\r\n"
    )

    status, _, body = parse_answer(answer)
    assert (status, body["error"]) == (408, "request_timeout")
    assert still_trickling, "the gateway hung up on a client that was still sending headers"


async def test_a_body_that_never_ends_is_cut_at_the_read_deadline(gateway):
    head = PAY_HEAD + "Content-Length: 100000\r\n\r\n"
    answer, still_trickling = await answer_while_trickling(gateway, head.encode(), b" ")

    status, _, body = parse_answer(answer)
    assert (status, body["error"]) == (408, "request_timeout")
    assert still_trickling
    assert counted(gateway, "request_timeout") == 1


async def test_a_slow_provider_does_not_count_against_the_read_deadline(gateway, upstream):
    upstream[0].delay_s = 0.7  # two read deadlines, spent after the request was read

    answer = await gateway.post("/v1/pay", json=payment("TXN-PATIENT"))

    assert answer.status == 200


async def test_keep_alive_requests_each_get_a_fresh_read_deadline(gateway):
    reader, writer = await connect(gateway)
    for _ in range(3):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: payagg\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if b"Content-Length" in line
        )
        await reader.readexactly(length)
        await asyncio.sleep(0.2)  # idle; with the time of the previous requests, past 0.3 s
    writer.close()


async def test_an_idle_keep_alive_connection_is_closed(start_gateway):
    async with start_gateway(keepalive_timeout_s=0.3, read_timeout_s=10) as client:
        reader, writer = await connect(client)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: payagg\r\n\r\n")

        answer = await read_to_eof(reader)

        assert answer.startswith(b"HTTP/1.1 200")
        assert b"Connection: close" not in answer, "kept alive, then closed for idling"
        writer.close()


async def test_a_connection_that_never_sends_a_byte_is_closed_after_the_keepalive_timeout(
    start_gateway,
):
    async with start_gateway(keepalive_timeout_s=0.3) as client:
        reader, writer = await connect(client)
        assert await read_to_eof(reader) == b""
        writer.close()


async def test_connections_over_max_connections_are_closed_at_once_and_counted(start_gateway):
    async with start_gateway(max_connections=2) as client:
        held = [await connect(client) for _ in range(2)]
        for reader, writer in held:  # each one served, so the gateway has accepted both
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: payagg\r\n\r\n")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")

        refused_reader, refused_writer = await connect(client)
        assert await read_to_eof(refused_reader) == b""
        refused_writer.close()
        samples = client.gateway.metrics.registry
        assert samples.get_sample_value("payagg_connections_refused_total") == 1

        held[0][1].close()
        # Once a held connection is gone there is room again (the gateway sees the close soon).
        answer = b""
        async with asyncio.timeout(EVENTUALLY_S):
            while not answer:
                reader, writer = await connect(client)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: payagg\r\nConnection: close\r\n\r\n")
                answer = await read_to_eof(reader)
                writer.close()
        assert answer.startswith(b"HTTP/1.1 200")
        held[1][1].close()


async def test_a_client_that_hangs_up_mid_body_is_client_closed_at_info_without_a_traceback(
    gateway, logs
):
    _, writer = await connect(gateway)
    head = PAY_HEAD + f"Content-Length: {len(PAY_BODY)}\r\n\r\n"
    writer.write(head.encode() + PAY_BODY[:10])
    await writer.drain()
    writer.close()

    await eventually(lambda: counted(gateway, "client_closed") == 1)

    lines = logs()
    assert not [line for line in lines if line["level"] in ("error", "critical")]
    assert not [line for line in lines if "exception" in line]
    requests = [line for line in lines if line["msg"] == "request"]
    assert [(line["level"], line["outcome"]) for line in requests] == [("info", "client_closed")]


def chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"


MALFORMED = {
    "content-length and transfer-encoding together": (
        PAY_HEAD + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    + chunked(PAY_BODY),
    "two different content-lengths": (
        PAY_HEAD + "Content-Length: 5\r\nContent-Length: 6\r\n\r\n"
    ).encode()
    + PAY_BODY,
    "a space before the colon": (PAY_HEAD + "Content-Length : 5\r\n\r\n").encode() + PAY_BODY,
    "a chunk size that is not hex": (PAY_HEAD + "Transfer-Encoding: chunked\r\n\r\n").encode()
    + b"zz\r\n"
    + PAY_BODY
    + b"\r\n0\r\n\r\n",
    "a transfer-encoding that is not chunked": (
        PAY_HEAD + "Transfer-Encoding: gzip\r\n\r\n"
    ).encode()
    + PAY_BODY,
    "a control byte in a header value": (PAY_HEAD + f"X-Note: {SECRET}\x01\r\n\r\n").encode(),
    "a bad request line": f"POST /v1/pay?{SECRET} HTTP/1.1 trailing\r\n\r\n".encode(),
    "a header line over the size limit": (
        PAY_HEAD + f"X-Note: {SECRET}{'a' * 9000}\r\n\r\n"
    ).encode(),
    "a non-HTTP greeting": f"HELLO {SECRET}\r\n\r\n".encode(),
}


@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_http_gets_a_json_400_and_one_warning_without_the_request_bytes(
    gateway, logs, request_bytes
):
    assert SECRET.encode() in request_bytes
    reader, writer = await connect(gateway)
    writer.write(request_bytes)

    status, headers, body = parse_answer(await read_to_eof(reader))

    assert (status, body["error"]) == (400, "malformed_request")
    assert headers["Connection"] == "close"
    assert body["reason"]
    await eventually(lambda: counted(gateway, "malformed") == 1)
    lines = logs()
    warnings = [line for line in lines if line["level"] == "warning"]
    assert [line["reason"] for line in warnings] == [body["reason"]]
    assert not [line for line in lines if line["level"] in ("error", "critical")]
    assert SECRET not in json.dumps(lines)
    assert SECRET not in json.dumps(body)
    writer.close()


async def test_bad_chunk_framing_in_a_body_being_read_gets_the_json_400(gateway, logs):
    reader, writer = await connect(gateway)
    head = PAY_HEAD + "Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
    writer.write(head.encode())
    # The gateway asks for the body only once the handler reads it.
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")
    writer.write(b"zz\r\n" + PAY_BODY + b"\r\n0\r\n\r\n")

    status, _, body = parse_answer(await read_to_eof(reader))

    assert (status, body["error"]) == (400, "malformed_request")
    assert SECRET not in json.dumps(logs())
    writer.close()


@pytest.mark.parametrize("parser", [HttpRequestParserC, HttpRequestParserPy], ids=["C", "Python"])
@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=MALFORMED.keys())
async def test_the_logged_reason_never_quotes_the_request_whichever_parser_rejects_it(
    parser, request_bytes
):
    loop = asyncio.get_running_loop()
    reader = parser(BaseProtocol(loop), loop, 2**16, max_line_size=8190, max_field_size=8190)
    with pytest.raises(HttpProcessingError) as rejected:
        reader.feed_data(request_bytes)

    reason = parser_reason(rejected.value)

    assert reason
    assert SECRET not in reason


def test_a_served_process_logs_broken_clients_as_json_without_errors_or_request_bytes(
    redis_server, tmp_path
):
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        gateway_yaml(f"http://127.0.0.1:{free_port()}/pay", redis_server.url)
        + server_settings(read_timeout_s=0.3)
    )
    base = f"http://127.0.0.1:{port}"
    with running(payagg_serve(config, port), f"{base}/readyz") as proxy:
        for request_bytes in MALFORMED.values():
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(request_bytes)
                assert client.recv(65536).startswith(b"HTTP/1.1 400")
        hang_ups = 20
        for _ in range(hang_ups):
            with socket.create_connection(("127.0.0.1", port)) as client:
                head = PAY_HEAD + f"Content-Length: {len(PAY_BODY)}\r\n\r\n"
                client.sendall(head.encode() + PAY_BODY[: len(PAY_BODY) // 2])
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(PAY_HEAD.encode())
            assert client.recv(65536).startswith(b"HTTP/1.1 408")

        def served_metric(outcome: str) -> float:
            text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
            return sum(
                float(line.split()[-1])
                for who in ("open", "unknown")
                for line in text.splitlines()
                if line.startswith("payagg_requests_total{")
                and f'client="{who}",outcome="{outcome}",provider="unknown"}} ' in line
            )

        wait_until(lambda: served_metric("client_closed") == hang_ups, what="every hang-up")
        assert served_metric("malformed") == len(MALFORMED)
        assert served_metric("request_timeout") == 1
        log = proxy.log()

    lines = [json.loads(line) for line in log.splitlines()]
    assert SECRET not in log
    assert [line for line in lines if line["level"] not in ("info", "warning")] == []
    warnings = [line for line in lines if line["level"] == "warning"]
    # One at start-up says the API is open (`auth: off`); one per malformed request.
    assert len(warnings) == 1 + len(MALFORMED)
    assert warnings[0]["msg"].startswith("auth: off")
    closed = [line for line in lines if line.get("outcome") == "client_closed"]
    assert [(line["level"], line["status"]) for line in closed] == [("info", 499)] * hang_ups


async def test_a_body_left_unread_by_an_early_answer_is_cut_at_the_deadline_without_an_error(
    gateway, logs
):
    head = "POST /v1/pay HTTP/1.1\r\nHost: payagg\r\nContent-Type: text/plain\r\n"
    answer, still_trickling = await answer_while_trickling(
        gateway, (head + "Content-Length: 100000\r\n\r\n").encode(), b" "
    )

    status, _, body = parse_answer(answer)
    assert (status, body["error"]) == (415, "unsupported_media_type")
    assert still_trickling
    assert [line for line in logs() if line["level"] in ("error", "critical")] == []


async def test_bad_chunk_framing_in_a_body_left_unread_closes_without_an_error(gateway, logs):
    reader, writer = await connect(gateway)
    head = "POST /v1/pay HTTP/1.1\r\nHost: payagg\r\nContent-Type: text/plain\r\n"
    writer.write((head + "Transfer-Encoding: chunked\r\n\r\n" + "5\r\nhello\r\n").encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 415")
    writer.write(b"zz\r\n" + PAY_BODY + b"\r\n0\r\n\r\n")

    await read_to_eof(reader)

    assert [line for line in logs() if line["level"] in ("error", "critical")] == []
    writer.close()
