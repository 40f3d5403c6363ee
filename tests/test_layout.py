"""The folders tell the truth: the import contracts hold; serving never loads the dev tooling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def test_every_import_contract_in_pyproject_holds() -> None:
    result = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_serve_command_never_loads_the_local_stack_supervisor() -> None:
    probe = (
        "import sys, proxy.cli, proxy.server.serving, proxy.server.workers;"
        "print(sorted(m for m in sys.modules if m == 'proxy.devtools.devstack'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
