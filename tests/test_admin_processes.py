"""The admin API with real processes: `payagg serve` (two of them, or two workers) with their
admin ports, both mock providers, the real Redis, and `payagg admin` as an operator runs it."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
from prometheus_client.parser import text_string_to_metric_families

from proxy.admin.sync import REFRESH_INTERVAL_S
from proxy.admin.token import ADMIN_TOKEN_ENV
from tests.processes import (
    VENV_BIN,
    ServiceProcess,
    free_port,
    mock_provider,
    payagg_serve,
    running,
    wait_until,
)
from tests.test_providers_end_to_end import Reply, call
from tests.test_workers import request, samples

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "gateway.yaml"
REDIS_DB = 9
TOKEN = "process-test-admin-token-0123456789"
BOUND_S = 30.0  # generous: the machine is shared
SPARE = '  SPARE: {url: "http://127.0.0.1:1/pay"}  # never paid: only added and removed\n'


@dataclass
class Proxy:
    url: str
    admin: str
    process: ServiceProcess

    def pay(self, provider: str = "MTN", transaction_id: str | None = None) -> Reply:
        body = {
            "TransactionID": transaction_id or f"ADMP-{uuid.uuid4().hex[:16]}",
            "Amount": 20.0,
            "Currency": "ZAR",
            "ProviderKey": provider,
        }
        return call(f"{self.url}/v1/pay", "POST", json.dumps(body).encode())

    def act(self, path: str, body: dict[str, str]) -> Reply:
        headers = {"Authorization": f"Bearer {TOKEN}", "X-Admin-Actor": "tests"}
        return call(f"{self.admin}{path}", "POST", json.dumps(body).encode(), headers)

    def provider(self, name: str) -> dict[str, object]:
        providers = call(f"{self.admin}/v1/providers").body["providers"]
        return next(p for p in providers if p["name"] == name)  # type: ignore[union-attr]

    def metrics(self) -> str:
        return call(f"{self.admin}/metrics").raw.decode()


@dataclass
class Stack:
    mocks: dict[str, str]
    redis_url: str
    config: Path
    processes: ExitStack

    def proxy(self, *extra: str) -> Proxy:
        port, admin_port = free_port(), free_port()
        environment = {
            "MTN_URL": self.mocks["mtn"],
            "AIRTEL_URL": self.mocks["airtel"],
            "REDIS_URL": self.redis_url,
            ADMIN_TOKEN_ENV: TOKEN,
        }
        argv = payagg_serve(self.config, port, *extra, admin_port=admin_port)
        process = self.processes.enter_context(
            running(argv, f"http://127.0.0.1:{port}/readyz", environment, timeout_s=BOUND_S)
        )
        return Proxy(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", process)


@pytest.fixture
def stack(redis_server, tmp_path) -> Iterator[Stack]:
    if redis_server.process is None:
        redis_server.start()
    redis_sync.Redis(port=redis_server.port, db=REDIS_DB, socket_timeout=2).flushdb()
    config = tmp_path / "gateway.yaml"
    config.write_text(SHIPPED.read_text(encoding="utf-8"), encoding="utf-8")
    mocks = {}
    with ExitStack() as processes:
        for provider in ("mtn", "airtel"):
            port = free_port()
            mocks[provider] = f"http://127.0.0.1:{port}"
            argv = mock_provider(provider, port, "--seed", "3", "--failure-rate", "0")
            processes.enter_context(running(argv, f"{mocks[provider]}/healthz"))
        yield Stack(mocks, redis_server.url_for(REDIS_DB), config, processes)


def test_a_breaker_forced_on_one_process_is_seen_by_a_second_one_within_a_refresh(stack):
    assert REFRESH_INTERVAL_S <= 1.0  # the promise: within 1 s; the polls below allow for load
    first, second = stack.proxy(), stack.proxy()
    assert second.pay("AIRTEL").status == 200

    forced = first.act("/admin/breakers/AIRTEL", {"state": "open", "reason": "maintenance"})
    assert forced.status == 200, forced.raw

    wait_until(
        lambda: second.provider("AIRTEL")["forced"] is True, BOUND_S, "the second process to see it"
    )
    shown = second.provider("AIRTEL")
    assert (shown["state"], shown["forced_reason"], shown["forced_by"]) == (
        "open",
        "maintenance",
        "tests",
    )
    refused = second.pay("AIRTEL")
    assert (refused.status, refused.body["error"]) == (503, "provider_unavailable")
    assert second.pay("MTN").status == 200

    assert first.act("/admin/breakers/AIRTEL", {"state": "auto", "reason": "done"}).status == 200
    wait_until(lambda: second.provider("AIRTEL")["forced"] is False, BOUND_S, "the release")
    assert second.pay("AIRTEL").status == 200


def test_reloads_under_a_steady_stream_of_payments_fail_no_request(stack):
    proxy = stack.proxy()
    original = stack.config.read_text()
    answers: list[Reply] = []
    stop = threading.Event()

    def pay_until_stopped(provider: str) -> None:
        while not stop.is_set():
            answers.append(proxy.pay(provider))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        payers = [pool.submit(pay_until_stopped, p) for p in ("MTN", "AIRTEL", "MTN", "AIRTEL")]
        reloads = []
        for n in range(4):
            wait_until(lambda n=n: len(answers) >= 5 * (n + 1), BOUND_S, "payments flowing")
            # Every other reload adds SPARE and changes AIRTEL (a new client mid-payment).
            edited = original if n % 2 else original + SPARE
            edited = edited.replace("${AIRTEL_SYNC_WAIT_S:-10}", str(8 + n))
            stack.config.write_text(edited)
            reloads.append(proxy.act("/admin/reload", {"reason": f"reload {n}"}))
        wait_until(lambda: len(answers) >= 30, BOUND_S, "payments after the reloads")
        stop.set()
        for payer in payers:
            payer.result()

    assert [(r.status, r.body["status"]) for r in reloads] == [(200, "reloaded")] * 4
    assert [r.body["added"] for r in reloads] == [["SPARE"], [], ["SPARE"], []]
    failed = [(a.status, a.raw) for a in answers if a.status != 200]
    assert not failed, failed
    assert samples(proxy.metrics(), "payagg_config_reloads_total", result="ok") == [4]
    stats = {name: call(f"{url}/__mock/stats").body for name, url in stack.mocks.items()}
    assert sum(s["charges"] for s in stats.values()) == len(answers)  # type: ignore[misc]
    assert all(s["duplicates"] == 0 for s in stats.values()), stats


def test_sighup_to_the_parent_reloads_every_worker(stack):
    proxy = stack.proxy("--workers", "2")
    seen: set[str] = set()

    def both_listen() -> bool:
        # A worker answering on the admin port handles SIGHUP (installed before it listens).
        seen.add(request(f"{proxy.admin}/healthz").worker)
        return len(seen) == 2

    wait_until(both_listen, BOUND_S, "both workers on the admin port")
    old_hash = next(s.labels["config_hash"] for s in _build_info(proxy.metrics()) if s.value == 1)
    stack.config.write_text(stack.config.read_text() + SPARE)

    proxy.process.signal(signal.SIGHUP)

    def reloaded_by_both() -> bool:
        return samples(proxy.metrics(), "payagg_config_reloads_total", result="ok") == [2]

    wait_until(reloaded_by_both, BOUND_S, "both workers to reload")
    shown = {s.labels["config_hash"]: s.value for s in _build_info(proxy.metrics())}
    assert shown[old_hash] == 0
    assert [value for value in shown.values() if value == 1] == [1]
    for _ in range(8):  # a fresh connection each: the kernel spreads them over both workers
        assert proxy.provider("SPARE")["state"] == "closed"
    assert proxy.process.process.poll() is None


def test_a_reload_removing_a_provider_with_a_pending_payment_is_refused(redis_server, tmp_path):
    if redis_server.process is None:
        redis_server.start()
    redis_sync.Redis(port=redis_server.port, db=REDIS_DB, socket_timeout=2).flushdb()
    config = tmp_path / "gateway.yaml"
    config.write_text(SHIPPED.read_text(encoding="utf-8"), encoding="utf-8")
    with ExitStack() as processes:
        port = free_port()
        mtn = f"http://127.0.0.1:{port}"
        slow_payer = mock_provider("mtn", port, "--seed", "3", "--approval-ms", "60000,60000")
        processes.enter_context(running(slow_payer, f"{mtn}/healthz"))
        proxy = Stack(
            {"mtn": mtn, "airtel": mtn}, redis_server.url_for(REDIS_DB), config, processes
        )
        served = proxy.proxy()
        environment_sync_wait = "${MTN_SYNC_WAIT_S:-10}"
        config.write_text(config.read_text().replace(environment_sync_wait, "0.2"))
        assert served.act("/admin/reload", {"reason": "short waits"}).status == 200
        assert served.pay("MTN").status == 202

        renamed = config.read_text().replace("  MTN:", "  MTN_GONE:", 1)
        # The shipped client may pay with MTN: it names the renamed provider too.
        without_mtn = renamed.replace("[MTN, AIRTEL]", "[MTN_GONE, AIRTEL]")
        config.write_text(without_mtn)
        refused = served.act("/admin/reload", {"reason": "rename MTN"})

        assert (refused.status, refused.body["error"]) == (409, "reload_refused")
        assert refused.body["pending"] == {"MTN": 1}
        assert served.provider("MTN")["state"] == "closed"


# --- payagg admin ------------------------------------------------------------------------------


def payagg_admin(*argv: str, token: str | None = TOKEN) -> tuple[int, str, str]:
    env = {key: value for key, value in os.environ.items() if key != ADMIN_TOKEN_ENV}
    if token is not None:
        env[ADMIN_TOKEN_ENV] = token
    done = subprocess.run(
        [str(VENV_BIN / "payagg"), "admin", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


def test_payagg_admin_forces_a_breaker_and_reloads_and_prints_the_answers(stack):
    proxy = stack.proxy()
    code, out, err = payagg_admin(
        "breaker", "mtn", "open", "--reason", "MTN maintenance", "--url", proxy.admin
    )
    assert (code, err) == (0, "")
    assert json.loads(out)["forced_reason"] == "MTN maintenance"
    assert proxy.provider("MTN")["forced"] is True
    assert payagg_admin("breaker", "MTN", "auto", "--reason", "over", "--url", proxy.admin)[0] == 0

    stack.config.write_text(stack.config.read_text() + SPARE)
    code, out, err = payagg_admin("reload", "--url", proxy.admin)
    assert (code, err) == (0, "")
    assert json.loads(out)["added"] == ["SPARE"]


@pytest.mark.parametrize(
    ("argv", "token", "says"),
    [
        (["breaker", "NOPE", "open", "--reason", "x"], TOKEN, "404 not_found"),
        (["breaker", "MTN", "open", "--reason", "x"], "another-token-0123456789", "401"),
        (["reload"], None, f"{ADMIN_TOKEN_ENV} is not set"),
    ],
    ids=["unknown provider", "wrong token", "no token"],
)
def test_payagg_admin_fails_with_one_line_and_a_non_zero_exit(stack, argv, token, says):
    proxy = stack.proxy()
    code, out, err = payagg_admin(*argv, "--url", proxy.admin, token=token)
    assert code == 1
    assert out == ""
    (line,) = err.splitlines()
    assert says in line


def test_payagg_admin_says_when_the_admin_port_cannot_be_reached():
    unused = f"http://127.0.0.1:{free_port()}"
    code, _, err = payagg_admin("reload", "--url", unused)
    assert code == 1
    (line,) = err.splitlines()
    assert f"cannot reach the admin API at {unused}" in line


def _build_info(text: str) -> list[Any]:
    return [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "payagg_build_info"
    ]
