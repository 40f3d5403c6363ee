"""`payagg demo`: the seed's validation run against a real `payagg dev` stack at 80% failures."""

from __future__ import annotations

import re
import subprocess

from proxy.devtools.demo import paint
from tests.processes import VENV_BIN, free_port
from tests.test_dev_stack import dev_stack

STATUS_LINE = re.compile(r"^(\d{3})\s", re.MULTILINE)
# With this seed the Airtel mock answers success, failure, failure, ...: a 200 before it opens.
SEED = "2"


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "payagg"), "demo", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_at_80_percent_failures_provider_answers_come_first_then_only_503s_and_a_summary():
    with dev_stack("--failure-rate", "0.8", "--seed", SEED) as stack:
        result = demo("--url", stack.proxy, "--provider", "AIRTEL", "-n", "10")
    assert result.returncode == 0, result.stderr
    statuses = [int(code) for code in STATUS_LINE.findall(result.stdout)]
    assert len(statuses) == 10, result.stdout
    first_503 = statuses.index(503)
    assert first_503 >= 3, f"the breaker needs minimum_calls first: {statuses}"
    assert set(statuses[:first_503]) <= {200, 402, 502}, statuses
    assert 200 in statuses[:first_503], f"seed {SEED} gives a success first: {statuses}"
    assert set(statuses[first_503:]) == {503}, statuses
    assert "\033[" not in result.stdout, "no colours when stdout is not a terminal"

    counts = ", ".join(f"{code} x{statuses.count(code)}" for code in sorted(set(statuses)))
    assert f"statuses: {counts}" in result.stdout, result.stdout
    assert (
        f"breaker: opened at request {first_503 + 1} (first 503 provider_unavailable)"
        in result.stdout
    )
    latency = re.search(
        r"median latency: 503s ([\d.]+) ms \(n=(\d+)\), provider answers "
        r"\(200/402/502/504\) ([\d.]+) ms \(n=(\d+)\)",
        result.stdout,
    )
    assert latency, result.stdout
    assert int(latency[2]) == 10 - first_503
    assert int(latency[4]) == first_503


def test_an_unreachable_stack_gets_a_hint_to_start_it_and_exit_1():
    result = demo("--url", f"http://127.0.0.1:{free_port()}", "-n", "3")
    assert result.returncode == 1
    assert "connection refused" in result.stderr
    assert "is the stack running? try `make dev`" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_codes_are_coloured_green_yellow_red_only_on_a_terminal():
    assert paint(200, colour=True) == "\033[32m200\033[0m"
    assert paint(402, colour=True) == "\033[33m402\033[0m"
    assert paint(503, colour=True) == "\033[31m503\033[0m"
    assert paint(504, colour=True) == "\033[31m504\033[0m"
    assert paint(200, colour=False) == "200"


def test_a_url_without_a_scheme_is_refused_with_one_line_saying_so():
    result = subprocess.run(
        [str(VENV_BIN / "payagg"), "demo", "--url", "127.0.0.1:18099"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        "argument --url: needs a scheme and a host, like http://127.0.0.1:18099, "
        "got '127.0.0.1:18099'"
    )
