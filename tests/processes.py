"""Real processes for the tests: free ports, start-and-poll-until-ready, stop without leftovers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: object, timeout_s: float = 15.0, what: str = "condition") -> None:
    """Poll `predicate()` until it is truthy; fail the test with `what` after `timeout_s`."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as answer:
            return bool(200 <= answer.status < 300)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


class ServiceProcess:
    """A child process whose output goes to a log file, readable when a test fails."""

    def __init__(
        self, argv: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.argv = list(argv)
        self.log_path = Path(tempfile.mkstemp(prefix="payagg-test-", suffix=".log")[1])
        self._log = self.log_path.open("wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
            cwd=cwd,
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, url: str, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.argv} exited with {self.process.returncode}:\n{self.log()}"
                )
            if http_ok(url):
                return
            time.sleep(0.02)
        raise AssertionError(f"{self.argv} not ready at {url} after {timeout_s}s:\n{self.log()}")

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, wait, then SIGKILL the whole process group; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        return self.process.returncode


@contextlib.contextmanager
def running(
    argv: Sequence[str], ready_url: str, env: dict[str, str] | None = None, timeout_s: float = 20.0
) -> Iterator[ServiceProcess]:
    """Start `argv`, wait until `ready_url` answers 2xx, stop it afterwards."""
    service = ServiceProcess(argv, env)
    try:
        service.wait_ready(ready_url, timeout_s)
        yield service
    finally:
        service.stop()


def payagg_serve(config: object, port: int, *extra: str, admin_port: int = 0) -> list[str]:
    """argv of the proxy (`payagg serve`) with `config` on 127.0.0.1:`port`; no admin port
    unless asked for (two proxies of one test session would both want 9090)."""
    return [
        str(VENV_BIN / "payagg"),
        "serve",
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--admin-port",
        str(admin_port),
        *extra,
    ]


def mock_provider(provider: str, port: int, *extra: str) -> list[str]:
    """argv of a mock provider process (`payagg-mock`) on 127.0.0.1:`port`."""
    return [
        str(VENV_BIN / "payagg-mock"),
        "--provider",
        provider,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]
