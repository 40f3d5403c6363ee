"""`make bench` smoke test: the scripts start, check their answers and print a result table."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
def test_a_short_bench_run_measures_every_scenario_and_prints_the_ratios(tmp_path):
    output = tmp_path / "BENCHMARKS.md"
    result = subprocess.run(
        [*RUN, "--seconds", "1", "--rounds", "1", "--rss-requests", "200", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for scenario in ("nginx", "payagg", "failfast", "replay"):
        assert f"round 1/1 {scenario}" in result.stdout
        assert f"| {scenario} |" in output.read_text()
    assert "payagg RSS:" in output.read_text()


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
