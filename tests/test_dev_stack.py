"""`payagg dev` as a real process group: Redis, both mocks and the proxy, started and stopped."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from proxy.devtools.supervisor_watch import SUPERVISOR_PID_ENV, SupervisorWatch
from tests.processes import ROOT, VENV_BIN, ServiceProcess, free_port, wait_until

STARTED = re.compile(r"^started (\w+)\s+pid (\d+)\s+(\S+)$", re.MULTILINE)
KEPT_LOGS = re.compile(r"^payagg dev: logs kept in (\S+)$", re.MULTILINE)
SERVICES = ("redis", "mtn", "airtel", "proxy")


class DevStackProcess:
    """`payagg dev` on four free ports, in its own process group like a terminal's job."""

    def __init__(self, *extra: str) -> None:
        self.ports = {name: free_port() for name in SERVICES}
        self.proxy = f"http://127.0.0.1:{self.ports['proxy']}"
        self.admin = f"http://127.0.0.1:{free_port()}"
        self.process = ServiceProcess(
            [
                str(VENV_BIN / "payagg"),
                "dev",
                "--port",
                str(self.ports["proxy"]),
                "--redis-port",
                str(self.ports["redis"]),
                "--mtn-port",
                str(self.ports["mtn"]),
                "--airtel-port",
                str(self.ports["airtel"]),
                "--admin-port",
                self.admin.rsplit(":", 1)[1],
                *extra,
            ]
        )

    def wait_ready(self) -> None:
        self.process.wait_ready(f"{self.proxy}/readyz", timeout_s=30)
        wait_until(lambda: "stack is ready" in self.process.log(), what="the ready banner")

    def children(self) -> dict[str, int]:
        return {name: int(pid) for name, pid, _ in STARTED.findall(self.process.log())}

    def exit_code(self, timeout_s: float = 20) -> int:
        return self.process.process.wait(timeout_s)

    def cleanup(self) -> None:
        """Whatever a failed test left behind: the supervisor, then every child it started."""
        children, output = self.children(), self.process.log()
        self.process.stop()
        for pid in children.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for kept in KEPT_LOGS.findall(output):
            shutil.rmtree(kept, ignore_errors=True)


@contextlib.contextmanager
def dev_stack(*extra: str) -> Iterator[DevStackProcess]:
    stack = DevStackProcess(*extra)
    try:
        stack.wait_ready()
        yield stack
    finally:
        stack.cleanup()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pay(proxy: str, transaction_id: str, provider: str) -> int:
    body = {
        "TransactionID": transaction_id,
        "Amount": 20.00,
        "Currency": "ZAR",
        "ProviderKey": provider,
    }
    request = urllib.request.Request(
        f"{proxy}/v1/pay",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_dev_serves_payments_through_both_providers_and_ctrl_c_stops_every_process():
    with dev_stack("--failure-rate", "0") as stack:
        children = stack.children()
        assert set(children) == set(SERVICES), stack.process.log()
        for name, url in ((n, u) for n, _, u in STARTED.findall(stack.process.log())):
            assert str(stack.ports[name]) in url, url
        assert pay(stack.proxy, "DEV-MTN-1", "MTN") == 200
        assert pay(stack.proxy, "DEV-AIRTEL-1", "AIRTEL") == 200
        output = stack.process.log()
        assert "curl" in output
        assert '"TransactionID":"TXN-ID-022-1","Amount":20.00' in output
        assert f"payagg demo --url {stack.proxy}" in output
        assert f"admin        {stack.admin}" in output

        os.killpg(stack.process.process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert stack.exit_code() == 0, stack.process.log()
        assert not [name for name, pid in children.items() if alive(pid)], children
        assert all(port_is_free(port) for port in stack.ports.values()), stack.ports


def test_when_one_child_dies_the_others_are_stopped_and_the_exit_names_it():
    with dev_stack("--failure-rate", "0") as stack:
        children = stack.children()
        os.kill(children["mtn"], signal.SIGKILL)
        assert stack.exit_code() != 0
        output = stack.process.log()
        died = r"mtn \(pid \d+\) exited unexpectedly \(killed by SIGKILL\)"
        assert re.search(died, output), output
        assert not [name for name, pid in children.items() if alive(pid)], children
        assert all(port_is_free(port) for port in stack.ports.values()), stack.ports


def test_sigterm_stops_the_stack_like_ctrl_c():
    with dev_stack() as stack:
        children = stack.children()
        stack.process.signal(signal.SIGTERM)
        assert stack.exit_code() == 0, stack.process.log()
        assert not [name for name, pid in children.items() if alive(pid)], children


def test_a_busy_port_is_a_one_line_error_naming_it_and_nothing_is_started():
    ports = {name: free_port() for name in SERVICES}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", ports["airtel"]))
        squatter.listen()
        result = subprocess.run(
            [
                str(VENV_BIN / "payagg"),
                "dev",
                "--port",
                str(ports["proxy"]),
                "--redis-port",
                str(ports["redis"]),
                "--mtn-port",
                str(ports["mtn"]),
                "--airtel-port",
                str(ports["airtel"]),
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    assert result.returncode != 0
    assert "started" not in result.stdout, result.stdout
    (line,) = result.stderr.splitlines()
    assert str(ports["airtel"]) in line
    assert "--airtel-port" in line
    assert "Traceback" not in result.stderr
    assert all(port_is_free(port) for port in ports.values())


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--failure-rate", "1.5"], "--failure-rate: must be a number in [0, 1]"),
        (["--port", "0"], "--port: must be a port number"),
    ],
    ids=["failure rate above 1", "port 0"],
)
def test_bad_dev_options_are_refused_before_anything_starts(flags, problem):
    result = subprocess.run(
        [str(VENV_BIN / "payagg"), "dev", *flags],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 2
    assert problem in result.stderr


def test_a_killed_supervisor_takes_its_children_with_it():
    with dev_stack() as stack:
        children = stack.children()
        assert set(children) == set(SERVICES), children
        stack.process.process.kill()  # SIGKILL: no handler runs, the kernel stops the children
        wait_until(
            lambda: not [name for name, pid in children.items() if alive(pid)],
            what="every child of the killed supervisor to exit",
        )


def mock_faults(port: int) -> dict[str, object]:
    """A mock's fault settings: an empty PUT changes nothing and answers them."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/__mock/config", data=b"{}", method="PUT",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        faults: dict[str, object] = json.loads(answer.read())
    return faults


@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"]
)
def test_make_dev_passes_its_args_and_a_signal_to_make_alone_stops_the_stack(signum):
    ports = {name: free_port() for name in SERVICES}
    args = " ".join(f"--{name}-port {port}" for name, port in ports.items() if name != "proxy")
    args += f" --port {ports['proxy']} --admin-port {free_port()} --failure-rate 0.8 --seed 7"
    venv = VENV_BIN.parent
    make = ServiceProcess(["make", "-s", "-C", str(ROOT), "dev", f"VENV={venv}", f"ARGS={args}"])
    try:
        make.wait_ready(f"http://127.0.0.1:{ports['proxy']}/readyz", timeout_s=30)
        wait_until(lambda: "stack is ready" in make.log(), what="the ready banner")
        assert mock_faults(ports["mtn"])["failure_rate"] == 0.8
        children = {name: int(pid) for name, pid, _ in STARTED.findall(make.log())}
        assert set(children) == set(SERVICES), make.log()
        # To make itself, not to its process group: GNU make forwards SIGTERM, not SIGINT or SIGHUP.
        os.kill(make.process.pid, signum)
        wait_until(lambda: make.process.poll() is not None, 60, "make to exit")
        wait_until(lambda: not [pid for pid in children.values() if alive(pid)], 60, "children")
        assert all(port_is_free(port) for port in ports.values()), ports
        if signum != signal.SIGTERM:  # SIGTERM may reach payagg dev first, forwarded by make
            received = f"make (pid {make.process.pid}) received {signum.name}"
            assert received in make.log(), make.log()
    finally:
        make.stop()


def test_the_supervisor_watch_is_off_without_a_readable_pid_and_reports_a_supervisor_gone():
    assert SupervisorWatch.from_environment({}) is None
    assert SupervisorWatch.from_environment({SUPERVISOR_PID_ENV: "not-a-pid"}) is None
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        watch = SupervisorWatch.from_environment({SUPERVISOR_PID_ENV: str(sleeper.pid)})
        assert watch is not None
        assert watch.stop_reason() is None
    finally:
        sleeper.kill()
    sleeper.wait()
    assert watch.stop_reason() == f"the process that started payagg dev (pid {sleeper.pid}) is gone"
