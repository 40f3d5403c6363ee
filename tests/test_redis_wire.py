"""The Redis client (`proxy/redis_wire.py`) against real redis-server processes.

Every server here is started by the test that needs it (a password, a unix socket, a freeze or a
restart would disturb the shared `redis_server` fixture). TLS goes through a small
TLS-terminating relay in front of a plain server, since the bundled redis-server has no TLS; the
same relay, without TLS, counts the connections the client opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import shutil
import signal
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from proxy.redis_wire import (
    RedisAddress,
    RedisClient,
    RedisReplyError,
    RedisUnavailable,
    Script,
)
from tests.conftest import RedisServer
from tests.processes import free_port

TIMEOUT_S = 0.3
# How much later than its timeout a failing call may return, on a busy shared machine.
SLACK_S = 0.5


StartRedis = Callable[..., RedisServer]


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[StartRedis]:
    """Start redis-servers for one test (`start_redis("--requirepass", "x", password="x")`)."""
    started: list[RedisServer] = []

    def start(*extra: str, password: str | None = None) -> RedisServer:
        server = RedisServer(tmp_path, *extra, password=password)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        if server.process is not None:
            server.signal(signal.SIGCONT)  # a frozen server cannot handle SIGTERM
        server.stop()


@pytest.fixture
def plain_redis(redis_server: RedisServer, redis_url: str) -> RedisServer:
    """The session's server, flushed and running, for tests that neither freeze nor stop it."""
    return redis_server


@contextlib.asynccontextmanager
async def connected(url: str, timeout_s: float = TIMEOUT_S) -> AsyncIterator[RedisClient]:
    client = RedisClient(url, timeout_s)
    try:
        yield client
    finally:
        await client.close()


class Relay:
    """Pipes bytes to a Redis port; terminates TLS when given a server context; counts accepts.

    `reply_delay_s` holds every chunk of Redis's replies back that long: a slow network.
    """

    def __init__(
        self, target_port: int, tls: ssl.SSLContext | None = None, reply_delay_s: float = 0.0
    ) -> None:
        self.target_port = target_port
        self.tls = tls
        self.reply_delay_s = reply_delay_s
        self.accepted = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer, self.reply_delay_s)
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float = 0.0
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if delay_s:
                    await asyncio.sleep(delay_s)  # latency, not synchronisation
                writer.write(data)
                await writer.drain()
        writer.close()
        self._writers.discard(writer)


# 1. Commands and replies -----------------------------------------------------------------------


async def test_replies_come_back_as_bytes_integers_none_and_lists(plain_redis: RedisServer) -> None:
    async with connected(plain_redis.url_for()) as redis:
        assert await redis.execute("SET", "wire:text", b"caf\xc3\xa9\x00\r\n") == b"OK"
        assert await redis.execute("GET", "wire:text") == b"caf\xc3\xa9\x00\r\n"
        assert await redis.execute("DEL", "wire:counter") in (0, 1)
        assert await redis.execute("INCRBY", "wire:counter", 41) == 41
        assert await redis.execute("GET", "wire:missing") is None
        await redis.execute("DEL", "wire:list")
        assert await redis.execute("RPUSH", "wire:list", "a", b"b", 3) == 3
        assert await redis.execute("LRANGE", "wire:list", 0, -1) == [b"a", b"b", b"3"]
        assert await redis.execute("LRANGE", "wire:nothing", 0, -1) == []


async def test_an_error_reply_raises_redis_reply_error_and_the_connection_stays_usable(
    plain_redis: RedisServer,
) -> None:
    async with connected(plain_redis.url_for()) as redis:
        await redis.execute("SET", "wire:string", "x")

        with pytest.raises(RedisReplyError, match=r"^WRONGTYPE"):
            await redis.execute("LPUSH", "wire:string", "y")
        with pytest.raises(RedisReplyError, match=r"^ERR unknown command"):
            await redis.execute("NOSUCHCOMMAND")

        assert await redis.execute("GET", "wire:string") == b"x"


async def test_a_thousand_concurrent_commands_share_one_connection_and_get_their_own_replies(
    plain_redis: RedisServer,
) -> None:
    keys = [f"wire:concurrent:{i}" for i in range(1000)]
    plain_redis.client().delete(*keys)
    async with connected(plain_redis.url_for(), timeout_s=5) as redis:
        echoes, increments, connection_ids = await asyncio.gather(
            asyncio.gather(*(redis.execute("ECHO", f"value-{i}") for i in range(1000))),
            asyncio.gather(*(redis.execute("INCRBY", key, i + 1) for i, key in enumerate(keys))),
            asyncio.gather(*(redis.execute("CLIENT", "ID") for _ in range(1000))),
        )
        clients = (await redis.execute("CLIENT", "LIST")).decode().splitlines()

    assert echoes == [f"value-{i}".encode() for i in range(1000)]
    assert increments == list(range(1, 1001))
    assert len(set(connection_ids)) == 1
    ours = [line for line in clients if f"id={connection_ids[0]} " in line]
    assert len(ours) == 1
    assert plain_redis.client().mget(keys[:3]) == [b"1", b"2", b"3"]


async def test_a_script_runs_by_sha_and_again_after_the_server_forgot_it(
    plain_redis: RedisServer,
) -> None:
    script = Script("return {KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1}")
    async with connected(plain_redis.url_for()) as redis:
        first = await redis.run_script(script, ["wire:k"], ["a", 41])
        assert await redis.execute("SCRIPT", "EXISTS", script.sha) == [1]
        await redis.execute("SCRIPT", "FLUSH")
        assert await redis.execute("SCRIPT", "EXISTS", script.sha) == [0]

        after_flush = await redis.run_script(script, ["wire:k"], ["b", 1])

        assert await redis.execute("SCRIPT", "EXISTS", script.sha) == [1]
    assert first == [b"wire:k", b"a", 42]
    assert after_flush == [b"wire:k", b"b", 2]


async def test_a_script_error_is_a_reply_error_not_a_retry_with_eval(
    plain_redis: RedisServer,
) -> None:
    script = Script("return redis.call('NOSUCHCOMMAND')")
    async with connected(plain_redis.url_for()) as redis:
        with pytest.raises(RedisReplyError, match="Unknown Redis command"):
            await redis.run_script(script, [], [])


# 2. AUTH, SELECT, unix sockets, TLS -------------------------------------------------------------


async def test_a_password_in_the_url_authenticates_and_the_path_selects_the_database(
    start_redis: StartRedis,
) -> None:
    server = start_redis("--requirepass", "s3cret", password="s3cret")
    async with connected(f"redis://:s3cret@127.0.0.1:{server.port}/3") as redis:
        assert await redis.execute("SET", "wire:db", "three") == b"OK"

    assert server.client(db=3).get("wire:db") == b"three"
    assert server.client(db=0).get("wire:db") is None


async def test_an_acl_user_with_percent_encoded_credentials_authenticates(
    start_redis: StartRedis,
) -> None:
    server = start_redis("--requirepass", "s3cret", password="s3cret")
    server.client().acl_setuser(
        "pay@ments",
        enabled=True,
        passwords=["+p:ss/w@rd%"],
        keys=["wire:*"],
        commands=["+get", "+set", "+acl|whoami"],
    )
    url = f"redis://pay%40ments:p%3Ass%2Fw%40rd%25@127.0.0.1:{server.port}/0"
    async with connected(url) as redis:
        assert await redis.execute("ACL", "WHOAMI") == b"pay@ments"
        assert await redis.execute("SET", "wire:acl", "ok") == b"OK"
        with pytest.raises(RedisReplyError, match="NOPERM"):
            await redis.execute("SET", "elsewhere", "no")


@pytest.mark.parametrize(
    "credentials",
    [":wrong", "default:wrong", "nobody:s3cret"],
    ids=["wrong-password", "wrong-password-for-default-user", "unknown-user"],
)
async def test_wrong_credentials_are_redis_unavailable_naming_the_problem(
    start_redis: StartRedis, credentials: str
) -> None:
    server = start_redis("--requirepass", "s3cret", password="s3cret")
    async with connected(f"redis://{credentials}@127.0.0.1:{server.port}/3") as redis:
        with pytest.raises(RedisUnavailable, match="WRONGPASS"):
            await redis.execute("PING")


async def test_a_failed_handshake_leaves_no_unretrieved_errors_behind(
    start_redis: StartRedis,
) -> None:
    """AUTH and SELECT go out together; when AUTH fails, SELECT's error must not be logged
    later as 'Future exception was never retrieved' (an ERROR line per request in production)."""
    server = start_redis("--requirepass", "s3cret", password="s3cret")
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        async with connected(f"redis://:wrong@127.0.0.1:{server.port}/3") as redis:
            for _ in range(3):
                with pytest.raises(RedisUnavailable):
                    await redis.execute("PING")
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert [context["message"] for context in reported] == []


async def test_a_unix_socket_url_connects_and_selects_the_database_from_the_query(
    start_redis: StartRedis,
) -> None:
    # A short directory: unix socket paths are limited to about 100 bytes.
    directory = Path(tempfile.mkdtemp(prefix="rw-"))
    try:
        socket_path = directory / "redis.sock"
        server = start_redis("--unixsocket", str(socket_path), "--unixsocketperm", "700")
        async with connected(f"unix://{socket_path}?db=2") as redis:
            assert await redis.execute("SET", "wire:unix", "via-socket") == b"OK"
            clients = (await redis.execute("CLIENT", "LIST")).decode()
        assert server.client(db=2).get("wire:unix") == b"via-socket"
        assert f" laddr={socket_path}:0 " in clients  # the server saw a unix-socket client
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def certificate_authority() -> trustme.CA:
    return trustme.CA()


def tls_server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


async def test_a_rediss_url_speaks_tls_verified_against_ssl_cert_file(
    plain_redis: RedisServer,
    certificate_authority: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ca_file = tmp_path / "ca.pem"
    certificate_authority.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    async with Relay(plain_redis.port, tls_server_context(certificate_authority)) as relay:
        async with connected(f"rediss://127.0.0.1:{relay.port}/0", timeout_s=2) as redis:
            assert await redis.execute("SET", "wire:tls", "encrypted") == b"OK"
            assert await redis.execute("GET", "wire:tls") == b"encrypted"
        assert relay.accepted == 1
    assert plain_redis.client().get("wire:tls") == b"encrypted"


async def test_a_certificate_from_an_untrusted_authority_is_redis_unavailable(
    plain_redis: RedisServer,
    certificate_authority: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other_ca_file = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(other_ca_file))
    async with Relay(plain_redis.port, tls_server_context(certificate_authority)) as relay:
        async with connected(f"rediss://127.0.0.1:{relay.port}/0", timeout_s=2) as redis:
            with pytest.raises(RedisUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await redis.execute("PING")
        assert relay.accepted == 0


# 3. Outages -------------------------------------------------------------------------------------


async def test_a_refused_connection_is_redis_unavailable_at_once() -> None:
    async with connected(f"redis://127.0.0.1:{free_port()}/0", timeout_s=5) as redis:
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match="cannot connect to Redis"):
            await redis.execute("PING")
        assert time.monotonic() - started < SLACK_S


async def test_a_frozen_redis_is_unavailable_within_the_timeout_and_used_again_once_thawed(
    start_redis: StartRedis,
) -> None:
    server = start_redis()
    async with connected(server.url_for()) as redis:
        assert await redis.execute("PING") == b"PONG"
        server.signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            results = await asyncio.gather(
                *(redis.execute("ECHO", i) for i in range(20)), return_exceptions=True
            )
            elapsed = time.monotonic() - started
        finally:
            server.signal(signal.SIGCONT)

        assert all(isinstance(result, RedisUnavailable) for result in results), results
        assert "did not answer within 0.3s" in str(results[0])
        assert TIMEOUT_S <= elapsed < TIMEOUT_S + SLACK_S

        assert await redis.execute("PING") == b"PONG"
        assert await redis.execute("ECHO", "after") == b"after"


async def test_a_frozen_redis_during_the_handshake_is_unavailable_within_the_timeout(
    start_redis: StartRedis,
) -> None:
    server = start_redis("--requirepass", "s3cret", password="s3cret")
    async with connected(f"redis://:s3cret@127.0.0.1:{server.port}/1") as redis:
        server.signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(RedisUnavailable):
                await redis.execute("PING")
            elapsed = time.monotonic() - started
        finally:
            server.signal(signal.SIGCONT)
        assert elapsed < TIMEOUT_S + SLACK_S
        assert await redis.execute("PING") == b"PONG"


async def test_after_a_restart_concurrent_callers_share_one_new_connection(
    start_redis: StartRedis,
) -> None:
    server = start_redis()
    async with Relay(server.port) as relay, connected(f"redis://127.0.0.1:{relay.port}/0") as redis:
        first = await asyncio.gather(*(redis.execute("PING") for _ in range(100)))
        assert first == [b"PONG"] * 100
        assert relay.accepted == 1

        await asyncio.to_thread(server.stop)
        with pytest.raises(RedisUnavailable):
            await redis.execute("PING")
        attempts_while_down = relay.accepted
        await asyncio.to_thread(server.start)
        again = await asyncio.gather(*(redis.execute("PING") for _ in range(100)))

        assert again == [b"PONG"] * 100
        assert relay.accepted == attempts_while_down + 1


async def test_redis_restarted_between_two_commands_is_reconnected_to_without_an_error(
    start_redis: StartRedis,
) -> None:
    server = start_redis()
    async with connected(server.url_for()) as redis:
        assert await redis.execute("SET", "wire:before", "1") == b"OK"
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(server.start)

        assert await redis.execute("GET", "wire:before") is None  # a fresh server, no save
        assert await redis.execute("SET", "wire:after", "2") == b"OK"


async def test_concurrent_callers_share_one_failed_connection_attempt() -> None:
    async with Relay(free_port()) as relay:  # accepts, then cannot reach Redis: closes
        async with connected(f"redis://127.0.0.1:{relay.port}/0") as redis:
            results = await asyncio.gather(
                *(redis.execute("PING") for _ in range(50)), return_exceptions=True
            )
        assert all(isinstance(result, RedisUnavailable) for result in results), results
        assert relay.accepted == 1


# 4. URLs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost", RedisAddress(host="localhost")),
        ("redis://cache.internal:6380/0", RedisAddress(host="cache.internal", port=6380)),
        ("redis://10.0.0.5/3", RedisAddress(host="10.0.0.5", db=3)),
        ("redis://10.0.0.5?db=5", RedisAddress(host="10.0.0.5", db=5)),
        ("redis://10.0.0.5/?db=5", RedisAddress(host="10.0.0.5", db=5)),
        ("redis://[::1]:6390", RedisAddress(host="::1", port=6390)),
        ("redis://:s3cret@h/1", RedisAddress(host="h", db=1, password="s3cret")),
        (
            "redis://pay%40ments:p%3Ass%2Fw%40rd%25@h:6379/0",
            RedisAddress(host="h", username="pay@ments", password="p:ss/w@rd%"),
        ),
        ("redis://user@h", RedisAddress(host="h", username="user")),
        (
            "rediss://default:tok@master.example.cache.amazonaws.com:6379/2",
            RedisAddress(
                host="master.example.cache.amazonaws.com",
                db=2,
                username="default",
                password="tok",
                tls=True,
            ),
        ),
        ("rediss://h", RedisAddress(host="h", tls=True)),
        ("unix:///var/run/redis.sock", RedisAddress(unix_path="/var/run/redis.sock")),
        ("unix:///var/run/redis.sock?db=4", RedisAddress(unix_path="/var/run/redis.sock", db=4)),
        (
            "unix://:p%40ss@/var/run/redis.sock?db=2",
            RedisAddress(unix_path="/var/run/redis.sock", db=2, password="p@ss"),
        ),
        (
            "unix:///run/my%20redis/redis.sock",
            RedisAddress(unix_path="/run/my redis/redis.sock"),
        ),
    ],
    ids=[
        "defaults",
        "host-and-port",
        "db-in-path",
        "db-in-query",
        "db-in-query-after-slash",
        "ipv6",
        "password-only",
        "percent-encoded-user-and-password",
        "user-without-password-means-no-auth",
        "rediss-elasticache",
        "rediss-defaults",
        "unix",
        "unix-db-in-query",
        "unix-password",
        "unix-percent-encoded-path",
    ],
)
def test_redis_address_from_url(url: str, expected: RedisAddress) -> None:
    assert RedisAddress.from_url(url) == expected
