"""`payagg serve --workers N` as real processes: one port, merged metrics, supervised workers.

Which worker answers is the kernel's choice (SO_REUSEPORT spreads connections), so the tests
open a fresh connection per request and tell the workers apart by the per-process prefix of
`X-Request-ID` (its first 16 hex characters).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import ProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from proxy.cli import main
from tests.conftest import gateway_yaml
from tests.processes import ServiceProcess, free_port, payagg_serve, running, wait_until

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2
PAYMENTS = 24


@dataclass
class Answer:
    status: int
    worker: str
    body: bytes


def request(url: str, document: object = None) -> Answer:
    """One request on a connection of its own (urllib sends `Connection: close`)."""
    data = None if document is None else json.dumps(document).encode()
    sent = urllib.request.Request(
        url,
        data=data,
        method="GET" if data is None else "POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(sent, timeout=10) as answer:
            status, headers, body = answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        status, headers, body = error.code, error.headers, error.read()
    return Answer(status, headers["X-Request-ID"][:16], body)


def pay(base: str, transaction_id: str) -> Answer:
    return request(
        f"{base}/v1/pay",
        {
            "TransactionID": transaction_id,
            "Amount": 20.00,
            "Currency": "ZAR",
            "ProviderKey": "CANON",
        },
    )


def samples(metrics_text: str, name: str, **labels: str) -> list[float]:
    return [
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]


def live_children(pid: int) -> list[int]:
    """Processes whose parent is `pid`, zombies left out (from /proc/*/stat)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if int(parent) == pid and state != "Z":
            children.append(int(entry.name))
    return children


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def metrics_dir_of(pid: int) -> Path:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for variable in environ:
        name, _, value = variable.partition(b"=")
        if name == b"PROMETHEUS_MULTIPROC_DIR":
            return Path(value.decode())
    raise AssertionError(f"worker {pid} runs without PROMETHEUS_MULTIPROC_DIR")


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no listener
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def upstream_port() -> Iterator[int]:
    port = free_port()
    argv = [sys.executable, "-m", "tests.canonical_upstream", "--port", str(port)]
    with running(argv, f"http://127.0.0.1:{port}/healthz", env={"PYTHONPATH": str(ROOT)}):
        yield port


@dataclass
class Workers:
    base: str
    port: int
    parent: ServiceProcess

    @property
    def pid(self) -> int:
        return self.parent.process.pid

    def exit_code(self, timeout_s: float = 15.0) -> int:
        return self.parent.process.wait(timeout_s)


@pytest.fixture
def workers(redis_url: str, upstream_port: int, tmp_path: Path) -> Iterator[Workers]:
    """`payagg serve --workers 2`, returned once both workers answer."""
    config = tmp_path / "gateway.yaml"
    config.write_text(gateway_yaml(f"http://127.0.0.1:{upstream_port}/pay", redis_url))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    argv = payagg_serve(config, port, "--workers", str(WORKERS))
    parent = ServiceProcess(argv, env={"PYTHONPATH": str(ROOT)})
    try:
        parent.wait_ready(f"{base}/readyz")
        seen: set[str] = set()

        def both_answer() -> bool:
            seen.add(request(f"{base}/readyz").worker)
            return len(seen) == WORKERS

        wait_until(both_answer, what=f"{WORKERS} workers answering /readyz:\n{parent.log()}")
        assert len(live_children(parent.process.pid)) == WORKERS
        yield Workers(base, port, parent)
    finally:
        parent.stop()


def test_the_workers_share_the_port_and_metrics_add_up_whichever_worker_is_scraped(
    workers: Workers,
) -> None:
    answers = [pay(workers.base, f"TXN-workers-{i}") for i in range(PAYMENTS)]
    assert [answer.status for answer in answers] == [200] * PAYMENTS
    assert len({answer.worker for answer in answers}) == WORKERS, "one worker got everything"

    scraped_by: set[str] = set()
    for _ in range(40):
        scrape = request(f"{workers.base}/metrics")
        text = scrape.body.decode()
        scraped_by.add(scrape.worker)
        assert samples(
            text, "payagg_requests_total", client="open", provider="CANON", outcome="success"
        ) == [PAYMENTS]
        assert samples(text, "payagg_circuit_breaker_state", provider="CANON", state="closed") == [
            WORKERS
        ]
        assert samples(text, "payagg_circuit_breaker_state", provider="CANON", state="open") == [0]
        if len(scraped_by) == WORKERS:
            break
    assert len(scraped_by) == WORKERS, "every scrape was answered by the same worker"


def test_a_replay_answered_by_the_other_worker_is_counted_as_replayed(workers: Workers) -> None:
    first = pay(workers.base, "TXN-across")
    replays = [pay(workers.base, "TXN-across") for _ in range(20)]

    assert first.status == 200
    assert {(answer.status, answer.body) for answer in replays} == {(200, first.body)}
    assert any(answer.worker != first.worker for answer in replays), "no replay by the other"
    text = request(f"{workers.base}/metrics").body.decode()
    assert samples(
        text, "payagg_requests_total", client="open", provider="CANON", outcome="success"
    ) == [1]
    assert samples(
        text, "payagg_requests_total", client="open", provider="CANON", outcome="replayed"
    ) == [20]


def test_sigterm_stops_every_worker_and_the_parent_exits_zero(workers: Workers) -> None:
    children = live_children(workers.pid)
    metrics_dir = metrics_dir_of(children[0])
    assert metrics_dir.is_dir()

    workers.parent.signal(signal.SIGTERM)

    assert workers.exit_code() == 0
    wait_until(lambda: not any(is_alive(pid) for pid in children), what="workers to exit")
    assert port_is_free(workers.port)
    assert not metrics_dir.exists()


def test_a_worker_that_dies_on_its_own_stops_the_others_and_the_parent_fails(
    workers: Workers,
) -> None:
    killed, *others = live_children(workers.pid)

    os.kill(killed, signal.SIGKILL)

    assert workers.exit_code() != 0
    wait_until(lambda: not any(is_alive(pid) for pid in others), what="the other workers to exit")
    assert port_is_free(workers.port)
    assert "exited with -9; stopping the others" in workers.parent.log()


def test_zero_workers_is_refused_by_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--workers", "0"])

    assert exit_info.value.code == 2
    assert "--workers: must be a whole number >= 1, got '0'" in capsys.readouterr().err


def is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def test_workers_that_all_die_at_once_make_the_parent_fail_cleanly(workers: Workers) -> None:
    """The parent learns of both deaths in one go (it is frozen meanwhile): stopping the other
    workers must not reap one behind the supervision loop's back."""
    children = live_children(workers.pid)
    workers.parent.signal(signal.SIGSTOP)
    try:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: all(is_zombie(pid) for pid in children), what="workers to die")
    finally:
        workers.parent.signal(signal.SIGCONT)

    assert workers.exit_code() == 1
    log = workers.parent.log()
    assert "Traceback" not in log, log
    assert port_is_free(workers.port)


def test_workers_of_a_killed_supervisor_stop_and_free_the_port(workers: Workers) -> None:
    children = live_children(workers.pid)
    workers.parent.process.kill()  # SIGKILL: the supervisor cannot pass anything on
    wait_until(lambda: not any(is_alive(pid) for pid in children), what="orphaned workers to exit")
    wait_until(lambda: port_is_free(workers.port), what="the port to be free")


def resident_bytes(pid: int) -> int:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def descriptor_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no open files limit for {pid}")


def test_process_metrics_add_up_the_supervisor_and_every_worker_whichever_is_scraped(
    workers: Workers,
) -> None:
    processes = [workers.pid, *live_children(workers.pid)]
    largest = max(resident_bytes(pid) for pid in processes)
    supervisor = ProcessCollector(pid=lambda: workers.pid, registry=None)
    (supervisor_started,) = [
        family.samples[0].value
        for family in supervisor.collect()
        if family.name == "process_start_time_seconds"
    ]
    scraped_by: set[str] = set()
    for _ in range(40):
        scrape = request(f"{workers.base}/metrics")
        text = scrape.body.decode()
        scraped_by.add(scrape.worker)
        (resident,) = samples(text, "process_resident_memory_bytes")
        (open_fds,) = samples(text, "process_open_fds")
        (started,) = samples(text, "process_start_time_seconds")
        (max_fds,) = samples(text, "process_max_fds")
        assert max_fds == sum(descriptor_limit(pid) for pid in processes)
        assert len(samples(text, "process_cpu_seconds_total")) == 1
        # Three Python processes: the sum is well above the largest one, whoever answered.
        assert resident > 1.5 * largest
        assert open_fds >= 3 * len(processes)  # at least stdin/stdout/stderr of each
        assert started == supervisor_started  # the task is as old as its first process
        if len(scraped_by) == WORKERS:
            break
    assert len(scraped_by) == WORKERS, "every scrape was answered by the same worker"


def test_build_info_is_one_series_and_answers_are_timed_across_workers(workers: Workers) -> None:
    answers = [pay(workers.base, f"TXN-timed-{i}") for i in range(PAYMENTS)]
    assert {answer.status for answer in answers} == {200}

    text = request(f"{workers.base}/metrics").body.decode()

    assert samples(text, "payagg_build_info") == [1]
    assert samples(
        text, "payagg_request_duration_seconds_count", route="/v1/pay", outcome="success"
    ) == [PAYMENTS]
