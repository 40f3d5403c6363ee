"""Is a per-process replay cache with a correct write-back cheaper than reading Redis?

A cached answer may be served only while Redis still holds it (CONTRACT §2: no process answers
what the store does not hold). Redis can lose a key (FLUSHALL, a restart without its file, a
failover to a replica that had not received it), so a process serving from memory must write the
record back and learn whether it was still there: `SET NX` the copy, else `GET` what is there now.
Served before that reply, a replay could contradict another process that has just claimed the
lost key. This measures, side by side on one Redis, per replay of a stored answer:

  memory             the old cache hit: a dictionary lookup, no Redis (incorrect after a loss)
  memory+writeback   the cache hit, then the write-back round trip it needs to be correct
  claim              no cache: the claim script finds the record, which is parsed and judged
  claim+memo         the same, the parse memoised on the exact bytes Redis returned (correct by
                     construction: it caches a parse, not an answer): a replay through
                     `POST /v1/pay` in payagg now
  get+memo           GET and the memoised parse (a lookup, or a replay while the breaker is open)

A write-back sent without awaiting its reply is not measured: it cannot be correct, since the
answer would go out before the process knows whether another one claimed the lost key.

32 concurrent callers per scenario; rounds interleaved so the machine's load falls on all of
them alike. Prints the median over rounds of wall time and of this process's CPU time per replay.

    .venv/bin/python bench/replay_cache.py [--rounds 7] [--replays 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable

from run import free_port, redis_server_binary  # bench/run.py, next to this script

from proxy.payments.idempotency import _CLAIM, judge  # the claim script itself, not a copy
from proxy.settings.config import RedisSettings
from proxy.store import records
from proxy.store.client import Script, StoreClient
from proxy.store.records import KeyState, StoredResult

CALLERS = 32
_WRITE_BACK = Script("""
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return false end
return redis.call('GET', KEYS[1])
""")
FINGERPRINT = "f" * 64
BODY = (
    b'{"status":"SUCCESS","transaction_id":"TXN-bench","provider":"CANON",'
    b'"provider_reference":"up-0b5e4c4e-8c1f-5a7d-9d2c-1f0e6a7b8c9d","amount":20.0,'
    b'"currency":"ZAR"}'
)


def wait_for_port(port: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


Replay = Callable[[], Awaitable[StoredResult]]


def scenarios(redis: StoreClient, key: bytes, value: bytes) -> dict[str, Replay]:
    cache: dict[bytes, KeyState] = {key: records.decode(value)}
    parse = records.decode.__wrapped__  # without the memo

    async def memory() -> StoredResult:
        return judge(cache[key], FINGERPRINT)

    async def memory_writeback() -> StoredResult:
        state = cache[key]
        current = await redis.run_script(_WRITE_BACK, [key], [value, 600])
        if current is not None and current != value:
            state = records.decode(current)  # another process's record: it wins
        return judge(state, FINGERPRINT)

    lock = records.in_flight("token", "TXN-bench", "ref", None, FINGERPRINT)

    async def claim() -> StoredResult:
        current = await redis.run_script(_CLAIM, [key], [lock, 30])
        return judge(parse(current), FINGERPRINT)

    async def claim_memo() -> StoredResult:
        current = await redis.run_script(_CLAIM, [key], [lock, 30])
        return judge(records.decode(current), FINGERPRINT)

    async def get() -> StoredResult:
        current = await redis.execute(b"GET", key)
        return judge(records.decode(current), FINGERPRINT)

    return {
        "memory": memory,
        "memory+writeback": memory_writeback,
        "claim": claim,
        "claim+memo": claim_memo,
        "get+memo": get,
    }


async def one_round(replay: Replay, replays: int) -> tuple[float, float]:
    """Wall and CPU microseconds per replay, `CALLERS` callers sharing `replays`."""

    async def caller() -> None:
        for _ in range(replays // CALLERS):
            await replay()

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(caller() for _ in range(CALLERS)))
    done = replays // CALLERS * CALLERS
    return (
        (time.perf_counter() - wall) / done * 1e6,
        (time.process_time() - cpu) / done * 1e6,
    )


async def measure(port: int, rounds: int, replays: int) -> None:
    redis = StoreClient(RedisSettings(url=f"redis://127.0.0.1:{port}/0", timeout_s=5))
    key = b"bench:" + b"0" * 64
    value = records.final("TXN-bench", "ref", None, FINGERPRINT, StoredResult(200, BODY))
    await redis.execute(b"SET", key, value, b"EX", 600)
    runs = scenarios(redis, key, value)
    for replay in runs.values():  # warm-up: scripts loaded, connection open
        await one_round(replay, CALLERS * 20)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for round_number in range(rounds):
        names = list(runs)
        if round_number % 2:
            names.reverse()  # neither end of a round is always the same scenario
        for name in names:
            results[name].append(await one_round(runs[name], replays))
    await redis.close()
    print(f"{rounds} interleaved rounds of {replays} replays, {CALLERS} concurrent callers")
    print(f"{'scenario':<18} {'wall µs/replay':>15} {'CPU µs/replay':>14}")
    for name, samples in results.items():
        wall = statistics.median(s[0] for s in samples)
        cpu = statistics.median(s[1] for s in samples)
        print(f"{name:<18} {wall:>15.1f} {cpu:>14.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--replays", type=int, default=20_000)
    options = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        server = subprocess.Popen(
            [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", directory],
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_for_port(port)
            try:
                import uvloop  # the loop payagg serves on
            except ImportError:
                asyncio.run(measure(port, options.rounds, options.replays))
            else:
                uvloop.run(measure(port, options.rounds, options.replays))
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
