"""Running one gateway process: listen, serve until SIGTERM or SIGINT, then drain and exit."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from aiohttp import web

from proxy.errors import StoreUnavailable
from proxy.payments.reconciler import Polled
from proxy.server.app import Gateway
from proxy.settings.config import GatewayConfig

log = logging.getLogger("payagg")


async def serve(
    config: GatewayConfig, host: str, port: int, reuse_port: bool, admin_port: int = 0
) -> None:
    """Serve until a stop signal; raises OSError when an address cannot be listened on.

    On SIGTERM (what ECS sends) the listening sockets close at once, requests in flight get
    `server.shutdown_timeout_s` to finish, and payments still settling with their provider get
    whatever remains of it, so the process exits 0 within the timeout as ECS expects. SIGHUP
    reloads the config file (proxy/admin/). `admin_port` 0: no admin listener.

    With `--workers N` every worker listens on both ports (SO_REUSEPORT): any worker's /metrics
    shows every worker's merged values, and admin actions reach the others through Redis.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    gateway = Gateway(config)
    loop.add_signal_handler(signal.SIGHUP, gateway.admin.reload_on_signal)
    timeout_s = config.server.shutdown_timeout_s
    runners = [web.ServerRunner(gateway.server(), shutdown_timeout=timeout_s)]
    if admin_port:
        runners.append(web.ServerRunner(gateway.server(admin=True), shutdown_timeout=timeout_s))
    try:
        for runner, listen_on in zip(runners, (port, admin_port), strict=False):
            await runner.setup()
            await web.TCPSite(runner, host, listen_on, reuse_port=reuse_port).start()
        gateway.start()  # the reconciler, the webhook delivery, the admin state refresh
        log.info(
            "payagg serving on http://%s:%d with %s",
            host,
            port,
            config.summary(),
            extra={"fields": {"host": host, "port": port, "admin_port": admin_port or None}},
        )
        store_check = asyncio.create_task(_warn_if_store_unreachable(gateway, config))
        await stop.wait()
        store_check.cancel()
    finally:
        stopping_at = time.monotonic()
        for runner in runners:
            await runner.cleanup()
        await gateway.close(max(0.0, timeout_s - (time.monotonic() - stopping_at)))


async def _warn_if_store_unreachable(gateway: Gateway, config: GatewayConfig) -> None:
    """Say at start-up, not at the first payment, that Redis cannot be reached (payments then
    answer 503 store_unavailable until it can); the proxy keeps serving and retrying."""
    try:
        await gateway.store.ping()
    except StoreUnavailable:
        address = config.redis.address
        log.warning(
            "redis at %s:%d cannot take a write at start-up; payments answer 503 until it can",
            address.host,
            address.port,
            extra={"fields": {"redis_host": address.host, "redis_port": address.port}},
        )


async def reconcile_once(config: GatewayConfig) -> list[Polled]:
    """One reconciliation pass, as `payagg reconcile --once` runs it beside the servers."""
    gateway = Gateway(config)
    try:
        return await gateway.reconciler.pass_once()
    finally:
        await gateway.close(0)
