"""The proxy as a real process (`payagg serve`) in front of a real canonical upstream process."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import ServiceProcess, free_port, payagg_serve, running, wait_until

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: dict[str, object]
    seconds: float


def call(url: str, method: str = "GET", document: object = None, timeout: float = 10) -> Answer:
    data = json.dumps(document).encode() if document is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            status, headers, raw = answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        status, headers, raw = error.code, dict(error.headers), error.read()
    return Answer(status, headers, json.loads(raw) if raw else {}, time.perf_counter() - started)


def pay(base: str, transaction_id: str, provider: str = "CANON") -> Answer:
    return call(
        f"{base}/v1/pay",
        "POST",
        {
            "TransactionID": transaction_id,
            "Amount": 20.00,
            "Currency": "ZAR",
            "ProviderKey": provider,
        },
    )


def upstream_requests(upstream: str) -> int:
    return int(call(f"{upstream}/__stats").body["requests"])  # type: ignore[call-overload]


def control(upstream: str, **changes: object) -> None:
    assert call(f"{upstream}/__control", "PUT", changes).status == 200


def metric(base: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


@dataclass
class Stack:
    proxy: str
    upstream: str
    process: ServiceProcess


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory) -> Iterator[Stack]:
    upstream_port, proxy_port = free_port(), free_port()
    config = tmp_path_factory.mktemp("e2e") / "gateway.yaml"
    config.write_text(
        textwrap.dedent(f"""\
        redis: {{url: "{redis_server.url}"}}
        defaults:
          timeout_s: 2
          breaker: {{failure_rate_threshold: 0.6, minimum_calls: 3, window_s: 30, open_s: 2}}
        providers:
          CANON: {{url: "http://127.0.0.1:{upstream_port}/pay"}}
        """)
    )
    upstream_argv = [
        sys.executable,
        "-m",
        "tests.canonical_upstream",
        "--port",
        str(upstream_port),
        "--failure-rate",
        "0.8",
        "--seed",
        "24",
    ]
    proxy_argv = payagg_serve(config, proxy_port)
    env = {"PYTHONPATH": str(ROOT)}
    upstream = f"http://127.0.0.1:{upstream_port}"
    with (
        running(upstream_argv, f"{upstream}/healthz", env=env),
        running(proxy_argv, f"http://127.0.0.1:{proxy_port}/readyz") as proxy,
    ):
        yield Stack(f"http://127.0.0.1:{proxy_port}", upstream, proxy)


def test_the_seed_check_provider_answers_until_the_breaker_opens_then_only_fast_503s(stack):
    """The original service's validation: ten payments at an 80% upstream failure rate."""
    answers = [pay(stack.proxy, f"SEED-{i}") for i in range(10)]
    statuses = [answer.status for answer in answers]
    first_503 = statuses.index(503)
    assert first_503 >= 3, f"the breaker needs minimum_calls first: {statuses}"
    assert set(statuses[:first_503]) <= {200, 502}, statuses
    assert {200, 502} <= set(statuses[:first_503]), "seed 24 gives a success among the failures"
    assert set(statuses[first_503:]) == {503}, statuses
    assert upstream_requests(stack.upstream) == first_503, "no upstream request while open"
    for answer in answers[first_503:]:
        assert answer.body["error"] == "provider_unavailable"
        assert answer.body["provider"] == "CANON"
        assert 1 <= int(answer.headers["Retry-After"]) <= 2
    assert metric(stack.proxy, "payagg_circuit_breaker_state", provider="CANON", state="open") == 1
    assert (
        metric(stack.proxy, "payagg_requests_total", provider="CANON", outcome="breaker_open")
        == 10 - first_503
    )
    answered = sum(
        metric(stack.proxy, "payagg_requests_total", provider="CANON", outcome=o)
        for o in ("success", "provider_error")
    )
    assert answered == first_503
    assert (
        metric(
            stack.proxy,
            "payagg_circuit_breaker_transitions_total",
            provider="CANON",
            from_state="closed",
            to_state="open",
        )
        == 1
    )

    # Recovery: once open_s has passed, a trial call goes through and closes the breaker.
    control(stack.upstream, failure_rate=0)
    recovered: list[Answer] = []

    def trial_succeeds() -> bool:
        recovered.append(pay(stack.proxy, f"RECOVER-{len(recovered)}"))
        return recovered[-1].status == 200

    wait_until(trial_succeeds, timeout_s=10, what="the breaker to let a trial call through")
    assert {answer.status for answer in recovered[:-1]} <= {503}
    assert (
        metric(stack.proxy, "payagg_circuit_breaker_state", provider="CANON", state="closed") == 1
    )
    assert (
        metric(
            stack.proxy,
            "payagg_circuit_breaker_transitions_total",
            provider="CANON",
            from_state="open",
            to_state="half_open",
        )
        == 1
    )
    # Every call to the provider is timed: payments and the status queries that settle them.
    stats = call(f"{stack.upstream}/__stats").body
    assert isinstance(stats, dict)
    assert metric(
        stack.proxy, "payagg_upstream_request_duration_seconds_count", provider="CANON"
    ) == stats["requests"] + stats["status_queries"]


def test_health_readiness_providers_and_openapi_answer(stack):
    assert call(f"{stack.proxy}/healthz").body == {"status": "ok"}
    assert call(f"{stack.proxy}/readyz").status == 200
    (provider,) = call(f"{stack.proxy}/v1/providers").body["providers"]  # type: ignore[misc]
    assert provider["name"] == "CANON"
    assert provider["state"] in {"closed", "open", "half_open"}
    assert set(provider["window"]) == {"calls", "failures"}
    document = call(f"{stack.proxy}/openapi.json").body
    assert document["openapi"] == "3.1.0"
    assert {
        "/v1/pay",
        "/v1/payments/{TransactionID}",
        "/v1/providers",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= set(document["paths"])  # type: ignore[arg-type]


def test_every_request_is_one_json_log_line_with_request_id_provider_outcome_status_latency(stack):
    pay(stack.proxy, "LOGGED-1")
    lines = [json.loads(line) for line in stack.process.log().splitlines() if line.startswith("{")]
    requests = [
        line for line in lines if line.get("msg") == "request" and line["path"] == "/v1/pay"
    ]
    assert requests, stack.process.log()
    assert {"request_id", "provider", "outcome", "status", "latency_ms"} <= set(requests[-1])
    assert any(line.get("to_state") == "open" for line in lines), "state changes are logged"


def test_sigterm_lets_an_in_flight_payment_finish_then_exits_0(redis_server, tmp_path):
    upstream_port, proxy_port = free_port(), free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        textwrap.dedent(f"""\
        redis: {{url: "{redis_server.url}"}}
        providers:
          CANON: {{url: "http://127.0.0.1:{upstream_port}/pay", timeout_s: 5}}
        """)
    )
    upstream = f"http://127.0.0.1:{upstream_port}"
    base = f"http://127.0.0.1:{proxy_port}"
    with running(
        [sys.executable, "-m", "tests.canonical_upstream", "--port", str(upstream_port)],
        f"{upstream}/healthz",
        env={"PYTHONPATH": str(ROOT)},
    ):
        control(upstream, delay_s=1.0)
        proxy = ServiceProcess(payagg_serve(config, proxy_port))
        proxy.wait_ready(f"{base}/readyz")
        in_flight: list[Answer] = []
        worker = threading.Thread(target=lambda: in_flight.append(pay(base, "DRAIN-1")))
        worker.start()
        wait_until(lambda: upstream_requests(upstream) == 1, what="the payment to reach upstream")
        proxy.signal(signal.SIGTERM)
        worker.join(timeout=10)
        assert proxy.process.wait(timeout=10) == 0
        assert in_flight, "the in-flight payment got no answer"
        assert in_flight[0].status == 200, in_flight
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"{base}/healthz", timeout=1)
        proxy.stop()


def test_a_port_already_taken_is_a_one_line_error_and_exit_1(tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text(
        'redis: {url: "redis://127.0.0.1:1/0"}\n'
        'providers:\n  CANON: {url: "http://127.0.0.1:9/pay"}\n'
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            payagg_serve(config, port), capture_output=True, text=True, timeout=30, check=False
        )
    assert result.returncode == 1
    assert f"payagg: cannot listen on 127.0.0.1:{port}: " in result.stderr
    assert "Traceback" not in result.stderr
