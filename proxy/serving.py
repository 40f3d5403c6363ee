"""Running one gateway process: listen, serve until SIGTERM or SIGINT, then drain and exit."""

from __future__ import annotations

import asyncio
import signal
import time

from aiohttp import web

from proxy.app import Gateway
from proxy.config import GatewayConfig
from proxy.payments.reconciler import Polled


async def serve(config: GatewayConfig, host: str, port: int, reuse_port: bool) -> None:
    """Serve until a stop signal; raises OSError when the address cannot be listened on.

    On SIGTERM (what ECS sends) the listening socket closes at once, requests in flight get
    `server.shutdown_timeout_s` to finish, and payments still settling with their provider get
    whatever remains of it, so the process exits 0 within the timeout as ECS expects.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    gateway = Gateway(config)
    timeout_s = config.server.shutdown_timeout_s
    runner = web.ServerRunner(gateway.server(), shutdown_timeout=timeout_s)
    await runner.setup()
    gateway.start()
    try:
        await web.TCPSite(runner, host, port, reuse_port=reuse_port).start()
        await stop.wait()
    finally:
        stopping_at = time.monotonic()
        await runner.cleanup()
        await gateway.close(max(0.0, timeout_s - (time.monotonic() - stopping_at)))


async def reconcile_once(config: GatewayConfig) -> list[Polled]:
    """One reconciliation pass, as `payagg reconcile --once` runs it beside the servers."""
    gateway = Gateway(config)
    try:
        return await gateway.reconciler.pass_once()
    finally:
        await gateway.close(0)
