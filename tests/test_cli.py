"""The `payagg` and `payagg-mock` commands: argument checks, versions, one-line errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from tests.processes import VENV_BIN, ServiceProcess, free_port, payagg_serve, running, wait_until

ROOT = Path(__file__).resolve().parent.parent
VERSION = metadata.version("payagg")


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("port", ["70000", "0", "-1", "http"])
def test_serve_refuses_a_port_outside_1_to_65535_before_loading_anything(port: str) -> None:
    result = run(str(VENV_BIN / "payagg"), "serve", "--port", port)
    assert result.returncode == 2
    assert "must be a port number in [1, 65535]" in result.stderr
    assert "serving" not in result.stdout


@pytest.mark.parametrize(
    "argv",
    [
        [str(VENV_BIN / "payagg"), "--version"],
        [sys.executable, "-m", "proxy", "--version"],
        [str(VENV_BIN / "payagg-mock"), "--version"],
    ],
    ids=["payagg", "python -m proxy", "payagg-mock"],
)
def test_every_command_prints_the_package_version(argv: list[str]) -> None:
    result = run(*argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(VERSION)


def test_python_dash_m_proxy_is_the_payagg_command() -> None:
    result = run(sys.executable, "-m", "proxy", "--help")
    assert result.returncode == 0
    assert "check-config" in result.stdout


@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_a_bad_log_level_is_one_line_naming_the_variable(command: str) -> None:
    shipped = str(ROOT / "config" / "gateway.yaml")
    argv = ["serve", "--config", shipped] if command == "serve" else ["check-config", shipped]
    result = subprocess.run(
        [str(VENV_BIN / "payagg"), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "LOG_LEVEL": "bogus"},
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "payagg: LOG_LEVEL: must be one of debug, info, warning, error, critical, got 'bogus'"
    ]
    assert "OK" not in result.stdout


def unreachable_redis_config(tmp_path: Path) -> Path:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        'redis: {url: "redis://127.0.0.1:1/0"}\n'
        'providers:\n  CANON: {url: "http://127.0.0.1:9/pay"}\n'
    )
    return config


def test_a_failed_bind_prints_one_line_and_never_claims_to_be_serving(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(*payagg_serve(unreachable_redis_config(tmp_path), port))
    assert result.returncode == 1
    assert "serving" not in result.stdout
    assert result.stderr.strip().splitlines() == [
        f"payagg: cannot listen on 127.0.0.1:{port}: address already in use"
    ]


def test_an_unreachable_redis_is_one_warning_naming_it_at_start_up(tmp_path: Path) -> None:
    port = free_port()
    argv = payagg_serve(unreachable_redis_config(tmp_path), port)
    with running(argv, f"http://127.0.0.1:{port}/healthz") as proxy:
        wait_until(lambda: "redis at 127.0.0.1:1 " in proxy.log(), what="the Redis warning")
        lines = [json.loads(line) for line in proxy.log().splitlines()]
    serving = next(i for i, line in enumerate(lines) if "serving on" in line["msg"])
    warnings = [line for line in lines if line["msg"].startswith("redis at 127.0.0.1:1 ")]
    assert [line["level"] for line in warnings] == ["warning"]
    assert lines.index(warnings[0]) > serving
    assert warnings[0]["redis_port"] == 1


def test_the_packaged_default_config_is_the_shipped_file_itself() -> None:
    packaged = ROOT / "proxy" / "default_config" / "gateway.yaml"
    assert packaged.resolve() == (ROOT / "config" / "gateway.yaml").resolve()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "default_config/gateway.yaml" in pyproject["tool"]["setuptools"]["package-data"]["proxy"]


def test_serve_outside_the_repository_uses_the_packaged_config(tmp_path: Path) -> None:
    port = free_port()
    argv = [str(VENV_BIN / "payagg"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--admin-port", "0"]
    service = ServiceProcess(argv, env={"REDIS_URL": "redis://127.0.0.1:1/0"}, cwd=tmp_path)
    try:
        service.wait_ready(f"http://127.0.0.1:{port}/healthz")
        wait_until(lambda: "serving on" in service.log(), what="the serving line")
        assert "default_config/gateway.yaml: OK, 2 provider(s)" in service.log()
    finally:
        service.stop()


def make_plan(target: str, tmp_path: Path) -> list[str]:
    """The commands `make TARGET` would run on a machine without the virtualenv."""
    result = subprocess.run(
        ["make", "-n", "-C", str(ROOT), target, f"VENV={tmp_path / 'venv'}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.splitlines()


def test_a_first_make_dev_installs_only_the_stack_and_says_so(tmp_path: Path) -> None:
    plan = "\n".join(make_plan("dev", tmp_path))
    assert "installing what the local stack needs" in plan
    assert "-e '.[stack]'" in plan
    assert ".[dev]" not in plan
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    assert set(extras["stack"]) <= set(extras["dev"])  # make test's install covers make dev's


def test_make_test_installs_the_terraform_tools_before_pytest_starts(tmp_path: Path) -> None:
    plan = make_plan("test", tmp_path)
    tools = plan.index(f"{tmp_path / 'venv'}/bin/python -m tests.terraform_checks.tools")
    assert plan[tools + 1].endswith("-m pytest")
