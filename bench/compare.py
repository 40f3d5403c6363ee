"""payagg's CPU time per request on the three paths `make bench` judges, checkouts side by side.

    python bench/compare.py main=/tmp/main-checkout mine=.

Each checkout (a directory holding a `proxy` package: a git worktree, `git worktree add DIR REV`)
runs as its own `python -m proxy serve` (this interpreter, `PYTHONPATH=DIR`) on its own Redis
database, in front of one nginx upstream, with `make bench`'s config; wrk with `bench/pay.lua`
drives each path in interleaved rounds whose order alternates. What is compared is the server's
CPU µs per request (user + system, all its threads): on a machine shared with other work,
requests/s follow the load, CPU per request much less. Prints each round, then the medians and
each checkout's ratio to the first. Records nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import run

PATHS = ("payagg", "failfast", "replay")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkouts", nargs="+", metavar="NAME=DIR", help="the first is the base")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=4, help="length of one measurement")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--paths", default=",".join(PATHS), help=f"some of {','.join(PATHS)}")
    args = parser.parse_args()
    checkouts = dict(checkout.split("=", 1) for checkout in args.checkouts)
    paths = args.paths.split(",")
    if run.tools_missing("compare"):
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="payagg-compare-"))
    children: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], log: str, env: dict[str, str] | None = None) -> int:
        return run.start_child(children, workdir / log, argv, env).pid

    try:
        upstream_port, nginx_port, redis_port = (run.free_port() for _ in range(3))
        start(run.nginx_command(workdir, upstream_port, nginx_port), "nginx.log")
        redis = [run.redis_server_binary(), "--port", str(redis_port), "--bind", "127.0.0.1"]
        start([*redis, "--save", "", "--appendonly", "no", "--dir", str(workdir)], "redis.log")
        run_id = f"{int(time.time())}-{os.getpid()}"
        scenarios: dict[str, dict[str, run.Scenario]] = {}
        for database, (name, directory) in enumerate(checkouts.items()):
            port = run.free_port()
            config = workdir / f"{name}.yaml"
            config.write_text(
                run.payagg_config(f"redis://127.0.0.1:{redis_port}/{database}", upstream_port)
            )
            argv = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
            pid = start(
                [*argv, "--host", "127.0.0.1", "--port", str(port), *no_admin_port(directory)],
                f"{name}.log",
                {"PYTHONPATH": str(Path(directory).resolve())},
            )
            url = f"http://127.0.0.1:{port}/v1/pay"
            scenarios[name] = {
                "payagg": run.Scenario("payagg", url, "FAST", "200", pid=pid),
                "failfast": run.Scenario("failfast", url, "DOWN", "503", pid=pid),
                "replay": run.Scenario("replay", url, "FAST", "200", replay=True, pid=pid),
            }
        for name in checkouts:
            base = scenarios[name]["payagg"].url.removesuffix("/v1/pay")
            run.wait_http(f"{base}/readyz")
            run.open_down_breakers(base, f"{run_id}-{name}")
            replayed = {
                "TransactionID": f"{run_id}-{name}-replay",  # what pay.lua's replays send
                "Amount": 20.00,
                "Currency": "ZAR",
                "ProviderKey": "FAST",
            }
            if run.post(f"{base}/v1/pay", replayed) != 200:
                raise SystemExit(f"compare: {name} did not take the replayed payment")
            for path in paths:  # warm-up, not recorded
                run.run_wrk(scenarios[name][path], 2, args.connections, f"{run_id}-{name}", "warm")
        names = list(checkouts)
        for round_number in range(1, args.rounds + 1):
            order = names if round_number % 2 else names[::-1]
            for path in paths:
                for name in order:
                    scenario = scenarios[name][path]
                    label = str(round_number)
                    prefix = f"{run_id}-{name}"
                    result = run.run_wrk(scenario, args.seconds, args.connections, prefix, label)
                    scenario.results.append(result)
                    print(
                        f"round {round_number}/{args.rounds} {path:9} {name:10} "
                        f"{result.rps:7.0f} req/s  CPU {result.cpu_us:6.1f} us/request",
                        flush=True,
                    )
        print(f"\nmedian server CPU us/request over {args.rounds} rounds; ratio to {names[0]}")
        for path in paths:
            medians = {
                name: statistics.median(r.cpu_us for r in scenarios[name][path].results)
                for name in names
            }
            print(
                f"{path:9} "
                + "  ".join(
                    f"{name} {median:6.1f} ({median / medians[names[0]]:.3f})"
                    for name, median in medians.items()
                )
            )
        return 0
    finally:
        run.stop(children)
        shutil.rmtree(workdir, ignore_errors=True)


def no_admin_port(directory: str) -> list[str]:
    """The option that serves no admin port, where the checkout has one: two checkouts cannot
    both listen on its default (9090)."""
    cli = (Path(directory) / "proxy" / "cli.py").read_text()
    return ["--admin-port", "0"] if "--admin-port" in cli else []


if __name__ == "__main__":
    sys.exit(main())
