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
