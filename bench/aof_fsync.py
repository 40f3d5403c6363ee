"""`appendfsync always` against `everysec`: what durability costs the lifecycle's writes.

Two local Redis servers with `appendonly yes`, one fsyncing every write, one every second, on the
same disk. Each takes the same claims (record, schedule, counter in one script, as `POST /v1/pay`
writes them) from 32 concurrent callers; rounds alternate between the two so the machine's load
falls on both alike. Prints claims per second and the median and p99 latency of one claim.

    .venv/bin/python bench/aof_fsync.py [--claims 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
from decimal import Decimal

from run import free_port, redis_server_binary  # bench/run.py, next to this script

from proxy.observability.metrics import GatewayMetrics
from proxy.payments.idempotency import IdempotencyStore
from proxy.payments.request import Payment
from proxy.settings.config import IdempotencySettings, RedisSettings

CALLERS = 32


async def one_round(port: int, label: str, claims: int) -> tuple[float, list[float]]:
    store = IdempotencyStore(
        RedisSettings(url=f"redis://127.0.0.1:{port}/0", key_prefix=f"{label}:", timeout_s=5),
        IdempotencySettings(),
        GatewayMetrics(["BENCH"]),
    )
    latencies: list[float] = []
    numbers = iter(range(claims))

    async def caller() -> None:
        for number in numbers:
            payment = Payment(f"{label}-{number}", Decimal("20.00"), "ZAR", "BENCH", None, None)
            started = time.perf_counter()
            await store.claim(payment, "BENCH", hold_s=30)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(CALLERS)))
    elapsed = time.perf_counter() - started
    await store.close()
    return claims / elapsed, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claims", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    servers: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    with tempfile.TemporaryDirectory() as root:
        for policy in ("always", "everysec"):
            port = free_port()
            argv = [
                redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--appendfsync", policy, "--dir", root,
                "--appendfilename", f"{policy}.aof",
            ]  # fmt: skip
            servers[policy] = port, subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        try:
            results: dict[str, list[tuple[float, list[float]]]] = {p: [] for p in servers}
            for round_number in range(args.rounds):
                for policy, (port, _) in servers.items():
                    label = f"{policy}-{round_number}"
                    results[policy].append(asyncio.run(one_round(port, label, args.claims)))
            for policy, rounds in results.items():
                rates = [rate for rate, _ in rounds]
                latencies = sorted(value for _, values in rounds for value in values)
                p50 = statistics.median(latencies) * 1000
                p99 = latencies[int(len(latencies) * 0.99)] * 1000
                print(
                    f"appendfsync {policy:8}: {statistics.median(rates):7.0f} claims/s, "
                    f"p50 {p50:.2f} ms, p99 {p99:.2f} ms ({CALLERS} callers)"
                )
        finally:
            for _, process in servers.values():
                process.terminate()
                process.wait()


if __name__ == "__main__":
    main()
