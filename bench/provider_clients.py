"""CPU per provider call of the HTTP clients payagg could use, measured side by side.

    .venv/bin/python bench/provider_clients.py [--rounds 5] [--calls 3000] [--old-tree DIR]

A constant-answer provider runs in its own process; each round runs every client in a fresh
child process for `--calls` sequential calls (after a warm-up) and reports the child's CPU time
per call (all its threads: pyreqwest's runtime thread counts). Rounds interleave the clients,
so a loaded machine slows them alike: compare ratios within a round, not absolute numbers.

Clients: `payagg` (ProviderClient.pay: mapping, breaker, aiohttp), `aiohttp` (a bare
ClientSession.post and read), `pyreqwest` (when installed), and `payagg-old` when `--old-tree`
names a checkout of an older payagg (its ProviderClient, e.g. the hand-written httptools client).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

ANSWER = b'{"status":"SUCCESS","provider_reference":"P-1"}'
ROOT = Path(__file__).resolve().parent.parent


async def _provider(port: int) -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(ANSWER),
        ANSWER,
    )

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (int(line.split(b":")[1]) for line in head.split(b"\r\n")
                     if line.lower().startswith(b"content-length:")),
                    0,
                )
                await reader.readexactly(length)
                writer.write(reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


async def _calls(mode: str, url: str, calls: int) -> float:
    if mode in ("payagg", "payagg-old"):
        from proxy.observability.metrics import GatewayMetrics
        from proxy.payments.request import Payment
        from proxy.providers.breaker import ProviderBreaker
        from proxy.providers.upstream import ProviderClient
        from proxy.settings.config import parse_config

        provider = parse_config(f'providers:\n  P: {{url: "{url}"}}\n', "bench", {}).providers[0]
        client = ProviderClient(
            provider, GatewayMetrics(["P"]), ProviderBreaker("P", provider.settings.breaker)
        )
        payment = Payment("TXN-1", Decimal("20.00"), "ZAR", "p", None, "TXN-1")

        async def one() -> None:
            await client.pay(payment, "REF")

        async def close() -> None:
            closed = client.close()
            if closed is not None:
                await closed

    elif mode == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession()
        body = json.dumps({"reference": "REF", "amount": 20}).encode()
        headers = {"Content-Type": "application/json", "X-Reference-Id": "REF"}

        async def one() -> None:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()

        async def close() -> None:
            await session.close()

    else:
        from pyreqwest.client import ClientBuilder

        rq = ClientBuilder().build()
        body = json.dumps({"reference": "REF", "amount": 20}).encode()
        headers = {"Content-Type": "application/json", "X-Reference-Id": "REF"}

        async def one() -> None:
            response = await rq.post(url).headers(headers).body_bytes(body).build().send()
            await response.bytes()

        async def close() -> None:
            await rq.close()

    for _ in range(300):
        await one()
    started = time.process_time()
    for _ in range(calls):
        await one()
    spent = time.process_time() - started
    await close()
    return spent / calls * 1e6


def _child(mode: str, url: str, calls: int) -> None:
    import uvloop

    print(uvloop.run(_calls(mode, url, calls)))


def _run_child(mode: str, url: str, calls: int, old_tree: str | None) -> float:
    env = dict(os.environ)
    path = old_tree if mode == "payagg-old" else str(ROOT)
    env["PYTHONPATH"] = path
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--url", url, "--calls", str(calls)],
        env=env,
        cwd=path,
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--old-tree")
    parser.add_argument("--child")
    parser.add_argument("--url")
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.url, args.calls)
        return
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-c", f"import asyncio,sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); "
         f"import provider_clients as p; asyncio.run(p._provider({port}))"]
    )
    time.sleep(1)
    url = f"http://127.0.0.1:{port}/pay"
    modes = ["payagg", "aiohttp"]
    try:
        import pyreqwest  # noqa: F401

        modes.append("pyreqwest")
    except ImportError:
        pass
    if args.old_tree:
        modes.append("payagg-old")
    results: dict[str, list[float]] = {mode: [] for mode in modes}
    try:
        for round_ in range(args.rounds):
            for mode in modes:
                results[mode].append(_run_child(mode, url, args.calls, args.old_tree))
            print(f"round {round_ + 1}: " + ", ".join(
                f"{mode} {values[-1]:.1f}" for mode, values in results.items()), flush=True)
    finally:
        server.terminate()
        server.wait()
    print("median CPU µs per call: " + ", ".join(
        f"{mode} {statistics.median(values):.1f}" for mode, values in results.items()))


if __name__ == "__main__":
    main()
