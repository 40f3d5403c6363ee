"""`make bench` smoke test: the scripts start, check their answers and print a result table."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import gateway_yaml, payment
from tests.processes import ServiceProcess, free_port, payagg_serve, running, wait_until

ROOT = Path(__file__).resolve().parent.parent
RUN = [sys.executable, str(ROOT / "bench" / "run.py")]


def test_without_nginx_or_wrk_the_bench_says_how_to_install_them(tmp_path):
    result = subprocess.run(RUN, capture_output=True, text=True, env={"PATH": str(tmp_path)})
    assert result.returncode == 2
    assert "nginx is not installed: sudo apt-get install nginx-light" in result.stderr
    assert "wrk is not installed: sudo apt-get install wrk" in result.stderr


@pytest.mark.skipif(
    not (shutil.which("nginx") and shutil.which("wrk")),
    reason="nginx and wrk come from the system's packages; .ci/run installs them where it can",
)
def test_a_quick_bench_run_measures_every_scenario_and_judges_every_target(tmp_path):
    output, picture = tmp_path / "BENCHMARKS.md", tmp_path / "ratios.png"
    result = subprocess.run(
        [*RUN, "--quick", "--output", str(output), "--chart", str(picture)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    recorded = output.read_text()
    for scenario in ("nginx", "obvious", "ceiling", "payagg", "failfast", "replay"):
        assert f"round 1/1 {scenario}" in result.stdout
        # The last column, the server's CPU time per request, is "-" for nginx (not measured).
        assert re.search(
            rf"^\| {scenario} \|( [\d.,]+ \|){{6}} ([\d,]+|-) \|$", recorded, re.MULTILINE
        )
    verdicts = re.findall(
        r"^\| (.+ (?:>=|<=|<) .+) \| .+ \| (met|missed|not judged.*) \|$", recorded, re.MULTILINE
    )
    assert len(verdicts) == 5, recorded
    # 1,000 requests in a quick run: the memory target needs 100,000 and says so.
    assert verdicts[-1][1].startswith("not judged: only"), verdicts
    assert "payagg RSS:" in recorded
    assert picture.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.skipif(
    not (shutil.which("nginx") and shutil.which("wrk")),
    reason="nginx and wrk come from the system's packages; .ci/run installs them where it can",
)
def test_compare_measures_two_checkouts_on_every_path_and_gives_each_ones_ratio():
    compare = [sys.executable, str(ROOT / "bench" / "compare.py"), "--rounds", "1"]
    result = subprocess.run(
        [*compare, "--seconds", "1", f"base={ROOT}", f"same={ROOT}"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for path in ("payagg", "failfast", "replay"):
        for checkout in ("base", "same"):
            assert re.search(rf"^round 1/1 {path} +{checkout} .* us/request$", result.stdout, re.M)
        assert re.search(
            rf"^{path} +base +[\d.]+ \(1\.000\) +same +[\d.]+ \([\d.]+\)$", result.stdout, re.M
        ), result.stdout


@pytest.fixture
def canonical_upstream() -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "tests.canonical_upstream", "--port", str(port)]
    with running(argv, f"http://127.0.0.1:{port}/healthz"):
        yield f"http://127.0.0.1:{port}/pay"


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture
def obvious(redis_url: str, canonical_upstream: str) -> Iterator[str]:
    """bench/obvious.py as `make bench` runs it; it serves POST only, so readiness is the port."""
    port = free_port()
    script = str(ROOT / "bench" / "obvious.py")
    service = ServiceProcess([sys.executable, script, str(port), redis_url, canonical_upstream])
    try:
        wait_until(
            lambda: _listening(port) or service.process.poll() is not None,
            what="bench/obvious.py to listen",
        )
        assert service.process.poll() is None, service.log()
        yield f"http://127.0.0.1:{port}/v1/pay"
    finally:
        service.stop()


@pytest.fixture
def payagg(redis_url: str, canonical_upstream: str, tmp_path: Path) -> Iterator[str]:
    config = tmp_path / "gateway.yaml"
    config.write_text(gateway_yaml(canonical_upstream, redis_url))
    port = free_port()
    with running(payagg_serve(config, port), f"http://127.0.0.1:{port}/readyz"):
        yield f"http://127.0.0.1:{port}/v1/pay"


def _pay(url: str, body: dict[str, object]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_obvious_implementation_answers_a_plain_success_like_payagg(
    obvious: str, payagg: str
) -> None:
    obvious_status, obvious_body = _pay(obvious, payment("BENCH-1"))
    payagg_status, payagg_body = _pay(payagg, payment("BENCH-1"))
    assert obvious_status == payagg_status == 200
    assert obvious_body.keys() == payagg_body.keys()
    # Each derives its own reference for the provider; both answer with the provider's.
    own_reference = {"provider_reference"}
    assert {k: v for k, v in obvious_body.items() if k not in own_reference} == {
        k: v for k, v in payagg_body.items() if k not in own_reference
    }
    assert obvious_body["provider_reference"].startswith("up-")
    assert payagg_body["provider_reference"].startswith("up-")


def test_the_obvious_implementation_charges_a_repeated_payment_once(
    obvious: str, canonical_upstream: str
) -> None:
    first = _pay(obvious, payment("BENCH-2"))
    assert _pay(obvious, payment("BENCH-2")) == first
    stats_url = canonical_upstream.replace("/pay", "/__stats")
    with urllib.request.urlopen(stats_url, timeout=5) as answer:
        assert json.loads(answer.read())["requests"] == 1


def _profile_summary():  # bench/ is a folder of scripts, not a package
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import profile_summary
    finally:
        sys.path.pop(0)
    return profile_summary


@pytest.mark.parametrize(
    ("stack", "owner"),
    [
        (
            "main (proxy/cli.py:1);run_forever (loop.c:9);uv__io_poll (linux.c:3);"
            "epoll_pwait (libc.so.6)",
            "system calls",
        ),
        (
            "main (proxy/cli.py:1);_writelines (aiohttp/http_writer.py:5);write (libc.so.6)",
            "system calls",
        ),
        ("main (proxy/cli.py:1);handle (proxy/app.py:3);dumps (json/__init__.py:2)", "payagg"),
        (
            "main (proxy/cli.py:1);handle (proxy/app.py:3);_start (aiohttp/web_response.py:8)",
            "aiohttp",
        ),
        ("main (proxy/cli.py:1);run_forever (loop.c:9);Py_DECREF (object.h:1)", "event loop"),
        (
            "main (proxy/cli.py:1);peek (proxy/idempotency.py:4);"
            "_execute_command (glide/glide_client.py:9);"
            "to_c_strings (glide_shared/ffi_helpers.py:2)",
            "valkey-glide",
        ),
    ],
)
def test_the_profile_summary_charges_each_sample_to_its_innermost_owner(stack, owner):
    assert _profile_summary().owner(stack.split(";")) == owner


def test_the_profile_summary_prints_each_owners_share(tmp_path):
    raw = tmp_path / "profile.txt"
    raw.write_text(
        "main (proxy/cli.py:1);handle (proxy/app.py:3) 3\n"
        "main (proxy/cli.py:1);_writelines (aiohttp/http_writer.py:5);write (libc.so.6) 1\n"
    )
    lines = _profile_summary().summarise(raw).splitlines()
    assert lines[0].split() == ["system", "calls", "25.0%"]
    assert lines[1].split() == ["payagg", "75.0%"]


def _chart():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import chart
    finally:
        sys.path.pop(0)
    return chart


CHART_REPORT = """\
# Benchmarks

## 2026-01-01 10:00 UTC: an older run

| scenario | requests/s (median) | p50 ms | p99 ms | ratio to nginx |
| --- | --- | --- | --- | --- |
| nginx | 40,000 | 0.70 | 1.10 | 1.00 |

## 2026-02-02 10:00 UTC: 32 connections, 3 interleaved rounds of 8 s, payagg workers: 1

| scenario | requests/s (median) | p50 ms | p99 ms | ratio to nginx | ratio to obvious |
| --- | --- | --- | --- | --- | --- |
| nginx | 40,000 | 0.70 | 1.10 | 1.00 | 8.00 |
| payagg | 8,000 | 3.80 | 7.00 | 0.20 | 1.60 |

| target | measured | verdict |
| --- | --- | --- |
| payagg >= 1.5x obvious | 1.60x | met |

payagg RSS: 68.8 MiB before, 72.6 MiB after 1,000 requests (+5.5%).
"""


def test_the_chart_reads_the_latest_run_of_a_report_with_every_ratio_column():
    run = _chart().latest_run(CHART_REPORT)

    assert run.title.startswith("2026-02-02 10:00 UTC")
    assert run.references == ["nginx", "obvious"]
    assert run.ratios == {"nginx": [1.0, 8.0], "payagg": [0.2, 1.6]}


def test_the_chart_is_written_as_a_png(tmp_path):
    chart = _chart()
    picture = tmp_path / "ratios.png"

    chart.write_chart(chart.latest_run(CHART_REPORT), picture)

    assert picture.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
