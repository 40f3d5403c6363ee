"""The `payagg` and `payagg-mock` commands: argument checks, versions, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.processes import VENV_BIN

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
