"""The admin API in-process: the token, who and why, forced breakers, config reloads, metrics.

The gateway runs in this process on the test Redis, in front of the in-process canonical
upstream; its public and admin servers each listen on a free port. The config lives in a file,
since a reload re-reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient
from prometheus_client.parser import text_string_to_metric_families

from proxy.admin.errors import AdminStoreUnavailable
from proxy.admin.reload import moved_providers
from proxy.admin.token import ADMIN_TOKEN_ENV
from proxy.observability.metrics import RELOAD_RESULTS
from proxy.providers.breaker import BreakerState
from proxy.server.app import Gateway
from proxy.settings.config import ConfigError, load_config
from tests.canonical_upstream import UpstreamState
from tests.conftest import GatewayClient, GatewayTestServer, gateway_yaml, make_config, payment
from tests.processes import VENV_BIN, free_port
from tests.test_workers import samples

TOKEN = "admin-token-for-the-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}", "X-Admin-Actor": "ops_1@example.com"}


class AdminTestServer(BaseTestServer):
    """The gateway's admin port on a free port."""

    def __init__(self, gateway: Gateway) -> None:
        super().__init__(host="127.0.0.1")
        self.gateway = gateway

    async def _make_runner(self, **kwargs: Any) -> web.ServerRunner:
        return web.ServerRunner(self.gateway.server(admin=True))


class Ports:
    def __init__(self, public: GatewayClient, admin: TestClient, config: Path) -> None:  # type: ignore[type-arg]
        self.public = public
        self.admin = admin
        self.config = config
        self.gateway = public.gateway

    async def act(self, path: str, body: object, headers: dict[str, str] | None = None) -> Any:
        answer = await self.admin.post(
            path, json=body, headers=AUTH if headers is None else headers
        )
        return answer.status, await answer.json()

    async def provider(self, name: str) -> dict[str, Any]:
        listed = await (await self.admin.get("/v1/providers")).json()
        return next(entry for entry in listed["providers"] if entry["name"] == name)

    async def metrics(self) -> str:
        return await (await self.admin.get("/metrics")).text()


@asynccontextmanager
async def admin_gateway(config_path: Path) -> AsyncIterator[Ports]:
    gateway = Gateway(load_config(config_path, {}))
    public = GatewayClient(GatewayTestServer(gateway))
    public.gateway = gateway
    admin = TestClient(AdminTestServer(gateway))
    await public.start_server()
    await admin.start_server()
    gateway.start()
    try:
        yield Ports(public, admin, config_path)
    finally:
        await admin.close()
        await public.close()
        await gateway.close(1)


@pytest.fixture
def admin_key_cleared(redis_url: str) -> None:
    """Forced states live in Redis across tests: each test starts with none."""
    redis_sync.Redis.from_url(redis_url).delete("payagg:admin")


@pytest.fixture
async def ports(
    upstream: tuple[UpstreamState, str],
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    admin_key_cleared: None,
) -> AsyncIterator[Ports]:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    config = tmp_path / "gateway.yaml"
    # A pending payment is answered 202 at once rather than after 10 s.
    text = gateway_yaml(upstream[1], redis_url).replace(
        "  timeout_s: 1\n", "  timeout_s: 1\n  sync_wait_s: 0.1\n"
    )
    config.write_text(text)
    async with admin_gateway(config) as both:
        yield both


# --- who may act --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Admin-Actor": "ops"},
        {"Authorization": "Bearer wrong-token-0123456789", "X-Admin-Actor": "ops"},
        {"Authorization": f"Basic {TOKEN}", "X-Admin-Actor": "ops"},
    ],
    ids=["no token", "another token", "not a bearer token"],
)
async def test_an_admin_action_without_the_token_is_401_and_changes_nothing(
    ports: Ports, headers: dict[str, str]
) -> None:
    status, body = await ports.act(
        "/admin/breakers/CANON", {"state": "open", "reason": "x"}, headers
    )
    assert (status, body["error"]) == (401, "unauthorized")
    assert (await ports.provider("CANON"))["forced"] is False


async def test_without_a_configured_token_the_admin_api_is_off_with_503(
    upstream: tuple[UpstreamState, str],
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    config = tmp_path / "gateway.yaml"
    config.write_text(gateway_yaml(upstream[1], redis_url))
    async with admin_gateway(config) as both:
        status, body = await both.act("/admin/reload", {"reason": "x"})
    assert (status, body["error"]) == (503, "admin_disabled")
    assert ADMIN_TOKEN_ENV in body["message"]


@pytest.mark.parametrize(
    ("body", "headers", "fields"),
    [
        ({"state": "open"}, AUTH, {"reason"}),
        ({"state": "open", "reason": "  "}, AUTH, {"reason"}),
        ({"state": "half_open", "reason": "x"}, AUTH, {"state"}),
        ({"reason": "x"}, AUTH, {"state"}),
        (
            {"state": "open", "reason": "x"},
            {"Authorization": AUTH["Authorization"]},
            {"X-Admin-Actor"},
        ),
        ([1, 2], AUTH, {"body"}),
    ],
    ids=["no reason", "blank reason", "unknown state", "no state", "no actor", "not an object"],
)
async def test_a_bad_admin_request_is_400_naming_the_field(
    ports: Ports, body: object, headers: dict[str, str], fields: set[str]
) -> None:
    status, answer = await ports.act("/admin/breakers/CANON", body, headers)
    assert (status, answer["error"]) == (400, "invalid_request")
    assert set(answer["fields"]) == fields


async def test_a_body_that_is_not_json_is_400_not_500(ports: Ports) -> None:
    answer = await ports.admin.post("/admin/reload", data=b"{not json", headers=AUTH)
    assert answer.status == 400
    assert (await answer.json())["fields"] == {"body": "must be a JSON object"}


async def test_an_unknown_provider_is_404(ports: Ports) -> None:
    status, body = await ports.act("/admin/breakers/NOPE", {"state": "open", "reason": "x"})
    assert (status, body["error"]) == (404, "not_found")


async def test_the_admin_api_is_not_served_on_the_public_port(ports: Ports) -> None:
    answer = await ports.public.post("/admin/reload", json={"reason": "x"}, headers=AUTH)
    assert answer.status == 404
    for path in ("/metrics", "/v1/providers", "/openapi.json"):
        assert (await ports.public.get(path)).status == 200, path
        assert (await ports.admin.get(path)).status == 200, path


async def test_every_admin_action_is_logged_with_who_and_why(
    ports: Ports, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="payagg.admin")
    await ports.act("/admin/breakers/canon", {"state": "open", "reason": "MTN maintenance 22:00"})
    ports.config.write_text(ports.config.read_text() + "# edited\n")
    await ports.act("/admin/reload", {"reason": "new timeouts"})
    actions = [
        record.fields  # type: ignore[attr-defined]
        for record in caplog.records
        if "admin_action" in getattr(record, "fields", {})
    ]
    assert [(a["admin_action"], a["actor"], a["reason"]) for a in actions] == [
        ("breaker", "ops_1@example.com", "MTN maintenance 22:00"),
        ("reload", "ops_1@example.com", "new timeouts"),
    ]
    assert actions[0]["provider"] == "CANON"
    assert actions[0]["state"] == "open"


# --- forced breakers ----------------------------------------------------------------------


async def test_a_breaker_forced_open_answers_503_but_still_replays_and_says_who_forced_it(
    ports: Ports, upstream: tuple[UpstreamState, str]
) -> None:
    assert (await ports.public.post("/v1/pay", json=payment("ADM-PAID"))).status == 200
    status, body = await ports.act("/admin/breakers/CANON", {"state": "open", "reason": "maint"})
    assert status == 200
    assert body["forced"] is True
    assert body["state"] == "open"

    refused = await ports.public.post("/v1/pay", json=payment("ADM-NEW"))
    assert refused.status == 503
    assert (await refused.json())["error"] == "provider_unavailable"
    replay = await ports.public.post("/v1/pay", json=payment("ADM-PAID"))
    assert replay.status == 200
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert upstream[0].requests == 1

    shown = await ports.provider("CANON")
    assert (shown["state"], shown["forced"]) == ("open", True)
    assert (shown["forced_reason"], shown["forced_by"]) == ("maint", "ops_1@example.com")
    text = await ports.metrics()
    assert samples(text, "payagg_circuit_breaker_state", provider="CANON", state="open") == [1]
    assert samples(text, "payagg_circuit_breaker_forced", provider="CANON", state="open") == [1]

    status, body = await ports.act("/admin/breakers/CANON", {"state": "auto", "reason": "done"})
    assert (status, body["forced"], body["state"]) == (200, False, "closed")
    assert (await ports.public.post("/v1/pay", json=payment("ADM-NEW"))).status == 200
    text = await ports.metrics()
    assert samples(text, "payagg_circuit_breaker_forced", provider="CANON", state="open") == [0]


async def test_a_breaker_forced_closed_lets_calls_through_a_failing_window(
    ports: Ports, upstream: tuple[UpstreamState, str]
) -> None:
    await ports.act("/admin/breakers/CANON", {"state": "closed", "reason": "we know"})
    upstream[0].failure_rate = 1.0
    statuses = [
        (await ports.public.post("/v1/pay", json=payment(f"ADM-FAIL-{n}"))).status for n in range(6)
    ]
    assert 503 not in statuses
    assert upstream[0].requests == 6
    breaker = ports.gateway.breakers["CANON"]
    await ports.act("/admin/breakers/CANON", {"state": "auto", "reason": "back to the window"})
    assert breaker.forced is None
    assert breaker.state is BreakerState.OPEN  # what the window said all along


async def test_a_forced_state_written_by_another_process_is_picked_up_by_the_refresh(
    ports: Ports, redis_url: str
) -> None:
    held = {"state": "open", "reason": "elsewhere", "by": "other", "at": "2026-01-01T00:00:00Z"}
    redis_sync.Redis.from_url(redis_url).hset("payagg:admin", "breaker:CANON", json.dumps(held))
    await ports.gateway.admin.sync.refresh()
    assert (await ports.provider("CANON"))["forced_by"] == "other"


# --- config reloads -----------------------------------------------------------------------

SPARE = """\
  SPARE: {{url: "{url}"}}
"""


async def test_a_reload_adds_a_provider_keeps_the_others_breakers_and_shows_the_new_hash(
    ports: Ports, upstream: tuple[UpstreamState, str]
) -> None:
    canon = ports.gateway.breakers["CANON"]
    old_hash = ports.gateway.config.content_sha256
    text = await ports.metrics()
    assert {
        s for r in RELOAD_RESULTS for s in samples(text, "payagg_config_reloads_total", result=r)
    } == {0}

    ports.config.write_text(ports.config.read_text() + SPARE.format(url=upstream[1]))
    status, body = await ports.act("/admin/reload", {"reason": "add SPARE"})

    assert status == 200, body
    assert (body["status"], body["added"], body["removed"]) == ("reloaded", ["SPARE"], [])
    assert ports.gateway.breakers["CANON"] is canon
    assert (await ports.provider("SPARE"))["state"] == "closed"
    paid = await ports.public.post("/v1/pay", json=payment("ADM-SPARE", ProviderKey="spare"))
    assert paid.status == 200
    text = await ports.metrics()
    assert samples(text, "payagg_config_reloads_total", result="ok") == [1]
    shown = {s.labels["config_hash"]: s.value for s in _build_info(text)}
    assert shown == {body["config_hash"]: 1.0}
    assert old_hash not in shown
    assert samples(
        text, "payagg_requests_total", provider="SPARE", outcome="success", client="open"
    ) == [1]


async def test_a_retry_of_a_payment_whose_provider_a_reload_removed_is_replayed_never_400(
    ports: Ports, upstream: tuple[UpstreamState, str]
) -> None:
    without_spare = ports.config.read_text()
    ports.config.write_text(without_spare + SPARE.format(url=upstream[1]))
    assert (await ports.act("/admin/reload", {"reason": "add SPARE"}))[0] == 200
    request = payment("ADM-GONE", ProviderKey="spare")
    first = await ports.public.post("/v1/pay", json=request)
    assert first.status == 200
    ports.config.write_text(without_spare)
    status, body = await ports.act("/admin/reload", {"reason": "SPARE retired"})
    assert (status, body.get("removed")) == (200, ["SPARE"]), body

    retry = await ports.public.post("/v1/pay", json=request)
    assert (retry.status, retry.headers.get("Idempotent-Replayed")) == (200, "true")
    assert await retry.read() == await first.read()
    changed = await ports.public.post("/v1/pay", json={**request, "Amount": 99})
    assert (changed.status, (await changed.json())["error"]) == (422, "idempotency_key_reused")
    fresh = await ports.public.post("/v1/pay", json=payment("ADM-NEVER", ProviderKey="spare"))
    assert (fresh.status, (await fresh.json())["error"]) == (400, "unknown_provider")


async def test_a_reload_of_the_same_text_changes_nothing_and_is_not_counted(ports: Ports) -> None:
    status, body = await ports.act("/admin/reload", {"reason": "just in case"})
    assert (status, body["status"]) == (200, "unchanged")
    assert samples(await ports.metrics(), "payagg_config_reloads_total", result="ok") == [0]


async def test_a_reload_leaves_auth_and_clients_as_they_started_and_says_they_need_a_restart(
    ports: Ports,
) -> None:
    # A client's scope fixes its payments' references: it never changes under a running payment.
    key_hash = hashlib.sha256(b"a-key-of-the-tests").hexdigest()
    ports.config.write_text(
        ports.config.read_text()
        + "auth: required\nclients:\n  - name: shop\n"
        + f'    key_sha256: ["{key_hash}"]\n    providers: [CANON]\n'
        + "    rate_per_s: 10\n    burst: 10\n"
    )
    status, body = await ports.act("/admin/reload", {"reason": "turn clients on"})

    assert (status, body.get("status")) == (200, "reloaded"), body
    assert {"auth", "clients"} <= set(body["needs_restart"])
    assert (ports.gateway.config.auth, ports.gateway.config.clients) == ("off", ())
    assert (await ports.public.post("/v1/pay", json=payment("ADM-STILL-OPEN"))).status == 200


async def test_an_invalid_file_is_refused_with_every_error_and_nothing_changes(
    ports: Ports, upstream: tuple[UpstreamState, str]
) -> None:
    running = ports.gateway.config
    ports.config.write_text(
        ports.config.read_text().replace("timeout_s: 1", "timeout_s: -1")
        + SPARE.format(url="ftp://nowhere")
        + "unknown_section: 1\n"
    )
    status, body = await ports.act("/admin/reload", {"reason": "typo"})

    assert (status, body["error"]) == (422, "config_invalid")
    with pytest.raises(ConfigError) as expected:
        load_config(ports.config, {})
    assert body["problems"] == expected.value.problems
    assert len(body["problems"]) >= 3
    assert all(problem.startswith(f"{ports.config}:") for problem in body["problems"])
    assert ports.gateway.config is running
    assert (await ports.public.post("/v1/pay", json=payment("ADM-STILL"))).status == 200
    text = await ports.metrics()
    assert samples(text, "payagg_config_reloads_total", result="invalid") == [1]
    assert {s.labels["config_hash"] for s in _build_info(text)} == {running.content_sha256}


async def test_a_reload_removing_a_provider_with_a_pending_payment_is_refused_with_the_count(
    ports: Ports, upstream: tuple[UpstreamState, str]
) -> None:
    upstream[0].pending_polls = 1000
    for n in range(2):
        assert (await ports.public.post("/v1/pay", json=payment(f"ADM-PEND-{n}"))).status == 202
    ports.config.write_text(ports.config.read_text().replace("CANON:", "RENAMED:"))
    status, body = await ports.act("/admin/reload", {"reason": "rename"})

    assert (status, body["error"]) == (409, "reload_refused")
    assert body["pending"] == {"CANON": 2}
    assert "CANON (removed): 2" in body["message"]
    assert [p.name for p in ports.gateway.config.providers] == ["CANON"]
    assert samples(await ports.metrics(), "payagg_config_reloads_total", result="refused") == [1]


MTN = """\
providers:
  MTN:
    url: "{url}"
    request:
      headers: {{X-Target-Environment: "{environment}", X-Reference-Id: "{{reference}}"}}
      body: {{amount: "{{amount}}"}}
    response: {{success: [{{status: 200}}]}}
    timeout_s: {timeout}
"""


@pytest.mark.parametrize(
    ("changes", "moved"),
    [
        ({}, {}),
        ({"timeout": 2}, {}),
        ({"url": "http://mtn.example:9999/pay"}, {"MTN": "re-targeted"}),
        ({"url": "https://mtn.example/pay"}, {"MTN": "re-targeted"}),
        ({"environment": "mtnuganda"}, {"MTN": "re-targeted"}),
        ({"url": "http://mtn.example/other/path"}, {}),
    ],
    ids=["same", "another timeout", "another port", "https", "another environment", "same host"],
)
def test_a_provider_is_re_targeted_by_another_host_or_environment_only(
    changes: dict[str, object], moved: dict[str, str]
) -> None:
    original = {"url": "http://mtn.example/pay", "environment": "sandbox", "timeout": 1}
    old = make_config(MTN.format(**original))
    new = make_config(MTN.format(**{**original, **changes}))
    assert moved_providers(old, new) == moved


def test_a_provider_left_out_is_removed() -> None:
    old = make_config(MTN.format(url="http://a/pay", environment="x", timeout=1))
    new = make_config(textwrap.dedent('providers:\n  OTHER: {url: "http://a/pay"}\n'))
    assert moved_providers(old, new) == {"MTN": "removed"}


def _build_info(text: str) -> list[Any]:
    return [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "payagg_build_info" and sample.value == 1
    ]


# --- the admin port and the token at start-up ------------------------------------------------


@pytest.mark.parametrize(
    ("server", "problem"),
    [
        ("{port: 8080, admin_port: 8080}", "test.yaml:1: server: admin_port must differ from port"),
        ("{admin_port: 70000}", "test.yaml:1: server.admin_port: must be <= 65535"),
        ("{admin_port: -1}", "test.yaml:1: server.admin_port: must be >= 0"),
    ],
    ids=["same as the port", "too high", "negative"],
)
def test_a_bad_admin_port_is_a_config_error_with_its_line(server: str, problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        make_config(f'server: {server}\nproviders:\n  P: {{url: "http://p/pay"}}\n')
    assert any(line.startswith(problem) for line in error.value.problems), error.value.problems


def test_the_admin_port_defaults_to_9090_and_0_turns_it_off() -> None:
    providers = 'providers:\n  P: {url: "http://p/pay"}\n'
    assert make_config(providers).server.admin_port == 9090
    assert make_config("server: {admin_port: 0}\n" + providers).server.admin_port == 0


def run_payagg(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "payagg"), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        check=False,
    )


def test_serve_refuses_an_admin_token_shorter_than_16_characters(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text('providers:\n  P: {url: "http://127.0.0.1:1/pay"}\n')
    result = run_payagg("serve", "--config", str(config), **{ADMIN_TOKEN_ENV: "short"})
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"payagg: {ADMIN_TOKEN_ENV}: must be at least 16 characters, got 5"
    )


def test_serve_refuses_an_admin_port_equal_to_the_port(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text('providers:\n  P: {url: "http://127.0.0.1:1/pay"}\n')
    result = run_payagg("serve", "--config", str(config), "--port", "9090")
    assert result.returncode == 1
    assert result.stderr.strip() == "payagg: the port and the admin port are both 9090"


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_serve_refuses_an_admin_port_outside_0_to_65535(port: str) -> None:
    result = run_payagg("serve", "--admin-port", port)
    assert result.returncode == 2
    assert "must be a port number in [1, 65535] or 0 (none)" in result.stderr


async def test_a_redis_outage_keeps_the_last_known_forced_state(
    upstream: tuple[UpstreamState, str],
    start_redis: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    own_redis = start_redis()
    config = tmp_path / "gateway.yaml"
    config.write_text(gateway_yaml(upstream[1], own_redis.url))
    async with admin_gateway(config) as both:
        await both.act("/admin/breakers/CANON", {"state": "open", "reason": "maintenance"})
        own_redis.stop()
        with pytest.raises(AdminStoreUnavailable):
            await both.gateway.admin.sync.refresh()
        assert both.gateway.breakers["CANON"].state is BreakerState.OPEN
        assert (await both.provider("CANON"))["forced_reason"] == "maintenance"
        status, body = await both.act("/admin/breakers/CANON", {"state": "auto", "reason": "x"})
        assert (status, body["error"]) == (503, "store_unavailable")
        assert both.gateway.breakers["CANON"].forced is BreakerState.OPEN


def test_a_busy_admin_port_is_a_one_line_error_and_the_process_exits(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text('providers:\n  P: {url: "http://127.0.0.1:1/pay"}\n')
    port = free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        result = run_payagg(
            "serve",
            *("--config", str(config), "--host", "127.0.0.1"),
            *("--port", str(port), "--admin-port", str(busy)),
            REDIS_URL="redis://127.0.0.1:1/0",
        )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"payagg: cannot listen on 127.0.0.1:{port} or {busy}: address already in use"
    )
