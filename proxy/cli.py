"""The `payagg` command: serve, check-config (and the local-stack helpers)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from aiohttp import web

from proxy.app import build_app
from proxy.config import DEFAULT_CONFIG_PATH, ConfigError, GatewayConfig, load_config
from proxy.logs import configure_logging

log = logging.getLogger("payagg")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="payagg", description="A resilient payment gateway aggregator."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument(
        "--config", help=f"YAML file (default: $PAYAGG_CONFIG, else {DEFAULT_CONFIG_PATH})"
    )
    serve.add_argument("--host", help="address to listen on (default: server.host)")
    serve.add_argument("--port", type=int, help="port to listen on (default: server.port)")
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("path", help="the YAML file to check")
    check.set_defaults(run=_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


def _config_path(args: argparse.Namespace) -> str:
    return str(args.config or os.environ.get("PAYAGG_CONFIG") or DEFAULT_CONFIG_PATH)


def _load_or_report(path: str) -> GatewayConfig | None:
    try:
        return load_config(path)
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return None


def _check_config(args: argparse.Namespace) -> int:
    config = _load_or_report(args.path)
    if config is None:
        return 1
    print(config.summary())
    return 0


def _serve(args: argparse.Namespace) -> int:
    configure_logging()
    config = _load_or_report(_config_path(args))
    if config is None:
        return 1
    host = args.host or config.server.host
    port = args.port or config.server.port
    log.info(
        "payagg serving on http://%s:%d with %s",
        host,
        port,
        config.summary(),
        extra={"fields": {"host": host, "port": port}},
    )
    try:
        # run_app turns SIGTERM/SIGINT into a graceful stop: no new connections, in-flight
        # requests finish within shutdown_timeout, then the process exits 0 as ECS expects.
        web.run_app(
            build_app(config),
            host=host,
            port=port,
            shutdown_timeout=config.server.shutdown_timeout_s,
            access_log=None,
            print=None,
        )
    except OSError as error:
        print(f"payagg: cannot listen on {host}:{port}: {error.strerror or error}", file=sys.stderr)
        return 1
    log.info("payagg stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
