"""`payagg-mock`: one mock provider service, configured by flags or MOCK_* environment variables."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import NoReturn

from aiohttp import web

from mock_providers import airtel, mtn, validation
from mock_providers.api import ProviderApi
from mock_providers.app import MockOptions, create_app, write_log_line
from mock_providers.faults import FaultConfig, InvalidFaultConfig, check_latency, check_rate
from mock_providers.tokens import Credentials

PROVIDERS = {api.name: api for api in (mtn.API, airtel.API)}
# How long answers in flight (sleeping out their latency) get to leave at shutdown.
SHUTDOWN_TIMEOUT_S = 2.0


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but an error is a single line on stderr (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def provider_name(text: str) -> str:
    if text not in PROVIDERS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(PROVIDERS)}, got {text!r}")
    return text


def port_number(text: str) -> int:
    if not text.isdecimal() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [1, 65535], got {text!r}")
    return int(text)


def host_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def rate(text: str) -> float:
    try:
        return check_rate("rate", float(text))
    except (ValueError, InvalidFaultConfig):
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None


def latency_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(bound) for bound in text.split(","))
        return check_latency("latency_ms", (lo, hi))
    except (ValueError, InvalidFaultConfig):
        raise argparse.ArgumentTypeError(
            f"must be LO,HI milliseconds with 0 <= LO <= HI, got {text!r}"
        ) from None


def positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return seconds


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def http_url(text: str) -> str:
    if not validation.is_http_url(text):
        raise argparse.ArgumentTypeError(f"must be an http(s) URL, got {text!r}")
    return text


def boolean(text: str) -> bool:
    """For a switch's environment variable."""
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false, got {text!r}")


def seed_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


@dataclass(frozen=True)
class Option:
    """A command-line option and the environment variable that stands in for it."""

    flag: str
    env: str
    parse: Callable[[str], object]
    metavar: str | None  # None: a switch, without a value (its variable reads true or false)
    help: str

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


OPTIONS = (
    Option("--provider", "MOCK_PROVIDER", provider_name, "{mtn,airtel}", "which mock (required)"),
    Option("--host", "MOCK_HOST", host_name, "H", "address to listen on (default 127.0.0.1)"),
    Option("--port", "MOCK_PORT", port_number, "P", "port (default: mtn 9101, airtel 9102)"),
    Option(
        "--failure-rate",
        "MOCK_FAILURE_RATE",
        rate,
        "R",
        "share of payments answered 500 without a charge (default 0)",
    ),
    Option(
        "--decline-rate",
        "MOCK_DECLINE_RATE",
        rate,
        "R",
        "share of payments declined in the provider's format (default 0)",
    ),
    Option(
        "--latency-ms",
        "MOCK_LATENCY_MS",
        latency_range,
        "LO,HI",
        "added latency, uniform in [LO, HI] milliseconds (default 0,0)",
    ),
    Option(
        "--hang-rate",
        "MOCK_HANG_RATE",
        rate,
        "R",
        "share of payments charged and then never answered (default 0)",
    ),
    Option(
        "--seed",
        "MOCK_SEED",
        seed_number,
        "N",
        "seed of every random decision (default: random, printed at start-up)",
    ),
    Option(
        "--approval-ms",
        "MOCK_APPROVAL_MS",
        latency_range,
        "LO,HI",
        "delay before the payer approves, uniform in [LO, HI] ms (default 0,0: at once)",
    ),
    Option(
        "--abandon-rate",
        "MOCK_ABANDON_RATE",
        rate,
        "R",
        "share of payers who never approve: the payment expires (default 0)",
    ),
    Option(
        "--approval-timeout-s",
        "MOCK_APPROVAL_TIMEOUT_S",
        positive_seconds,
        "S",
        "seconds before an unapproved payment expires (default: mtn 300, airtel 60)",
    ),
    Option(
        "--sync-declines",
        "MOCK_SYNC_DECLINES",
        boolean,
        None,
        "answer declines on the payment request itself (MTN: a 500 naming the reason)",
    ),
    Option(
        "--status-failure-rate",
        "MOCK_STATUS_FAILURE_RATE",
        rate,
        "R",
        "share of status queries answered 500 (default 0)",
    ),
    Option(
        "--token-ttl-s",
        "MOCK_TOKEN_TTL_S",
        positive_seconds,
        "S",
        "lifetime of an access token (default: the provider's, mtn 3600, airtel 180)",
    ),
    Option(
        "--client-id",
        "MOCK_CLIENT_ID",
        non_empty,
        "ID",
        "the only client id (MTN: API user) accepted (default: any non-empty one)",
    ),
    Option(
        "--client-secret",
        "MOCK_CLIENT_SECRET",
        non_empty,
        "SECRET",
        "the only client secret (MTN: API key) accepted (default: any non-empty one)",
    ),
    Option(
        "--subscription-key",
        "MOCK_SUBSCRIPTION_KEY",
        non_empty,
        "KEY",
        "MTN only: the only Ocp-Apim-Subscription-Key accepted (default: any non-empty one)",
    ),
    Option(
        "--callback-url",
        "MOCK_CALLBACK_URL",
        http_url,
        "URL",
        "where final payments are sent when the request names no callback URL (Airtel's way)",
    ),
    Option(
        "--callback-secret",
        "MOCK_CALLBACK_SECRET",
        non_empty,
        "SECRET",
        "Airtel: sign callbacks with a `hash` field (HMAC-SHA256 with this key)",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="payagg-mock",
        description="Run a mock MTN MoMo or Airtel Money service with faults you can dial in. "
        "Each option can come from its environment variable; a flag wins over it.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_package_version()}")
    for option in OPTIONS:
        if option.metavar is None:
            parser.add_argument(
                option.flag,
                action="store_true",
                default=None,
                help=f"{option.help}; env {option.env}",
            )
        else:
            parser.add_argument(
                option.flag,
                type=option.parse,
                metavar=option.metavar,
                help=f"{option.help}; env {option.env}",
            )
    return parser


def _package_version() -> str:
    try:
        return metadata.version("payagg")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Settings:
    """Everything one mock process needs, resolved and validated."""

    api: ProviderApi
    host: str
    port: int
    faults: FaultConfig
    seed: int
    options: MockOptions


def read_settings(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Settings:
    """Flags, else environment variables, else defaults; any bad value exits 2 with one line."""
    parser = build_parser()
    values = vars(parser.parse_args(argv))
    for option in OPTIONS:
        raw = environ.get(option.env, "")
        if values[option.dest] is None and raw:
            try:
                values[option.dest] = option.parse(raw)
            except argparse.ArgumentTypeError as bad:
                parser.error(f"argument {option.flag} (from {option.env}): {bad}")
    provider = values["provider"]
    if provider is None:
        parser.error("argument --provider is required (or set MOCK_PROVIDER)")
    try:
        faults = FaultConfig(
            failure_rate=values["failure_rate"] or 0.0,
            decline_rate=values["decline_rate"] or 0.0,
            latency_ms=values["latency_ms"] or (0.0, 0.0),
            hang_rate=values["hang_rate"] or 0.0,
            approval_ms=values["approval_ms"] or (0.0, 0.0),
            abandon_rate=values["abandon_rate"] or 0.0,
            status_failure_rate=values["status_failure_rate"] or 0.0,
        )
    except InvalidFaultConfig as bad:
        parser.error(f"--failure-rate + --decline-rate + --hang-rate {bad.problem}")
    seed = values["seed"]
    api = PROVIDERS[provider]
    if values["subscription_key"] is not None and api is not mtn.API:
        parser.error("argument --subscription-key: only MTN has subscription keys")
    options = MockOptions(
        credentials=Credentials(
            values["client_id"], values["client_secret"], values["subscription_key"]
        ),
        token_ttl_s=values["token_ttl_s"],
        approval_timeout_s=values["approval_timeout_s"],
        sync_declines=bool(values["sync_declines"]),
        callback_url=values["callback_url"],
        callback_secret=values["callback_secret"],
    )
    return Settings(
        api=api,
        host=values["host"] or "127.0.0.1",
        port=values["port"] or api.default_port,
        faults=faults,
        options=options,
        # A drawn seed is printed at start-up, so even an unseeded run can be replayed.
        seed=random.SystemRandom().randrange(2**32) if seed is None else seed,
    )


async def serve(settings: Settings) -> int:
    """Listen until SIGTERM or SIGINT (exit 0); a port that cannot be bound is exit 1."""
    app = create_app(settings.api, settings.faults, settings.seed, settings.options)
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
    except OSError as error:
        await runner.cleanup()
        print(
            f"payagg-mock: error: cannot listen on {settings.host} port {settings.port}: "
            f"{bind_problem(error)}",
            file=sys.stderr,
        )
        return 1
    announce(settings)
    await stop.wait()
    await runner.cleanup()
    return 0


def bind_problem(error: OSError) -> str:
    # asyncio rewords bind errors into a long sentence; the errno says it best. Resolver errors
    # (socket.gaierror) carry negative codes, so their own text is kept.
    if error.errno is not None and error.errno > 0:
        return os.strerror(error.errno).lower()
    return error.strerror or str(error)


def announce(settings: Settings) -> None:
    line: dict[str, object] = {
        "msg": "listening",
        "event": "listening",
        "provider": settings.api.name,
        "url": f"http://{settings.host}:{settings.port}",
        "seed": settings.seed,
        "faults": settings.faults.as_json(),
    }
    write_log_line(line)


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(serve(read_settings(argv, os.environ)))
