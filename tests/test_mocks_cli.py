"""`payagg-mock`: flags and MOCK_* variables, one-line errors, and the real process's lifecycle."""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest

from mock_providers.app import MockOptions
from mock_providers.cli import SHUTDOWN_TIMEOUT_S, build_parser, read_settings
from mock_providers.tokens import Credentials
from tests.processes import VENV_BIN, free_port, mock_provider, running, wait_until

Json = dict[str, Any]


def http_raw(
    method: str, url: str, body: object = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def http(
    method: str, url: str, body: object = None, headers: dict[str, str] | None = None
) -> tuple[int, Json]:
    status, raw = http_raw(method, url, body, headers)
    return status, json.loads(raw)


SUBSCRIPTION = {"Ocp-Apim-Subscription-Key": "sub"}


def mtn_token(base_url: str, user: str = "user", key: str = "key") -> str:
    basic = base64.b64encode(f"{user}:{key}".encode()).decode()
    headers = {**SUBSCRIPTION, "Authorization": f"Basic {basic}"}
    status, body = http("POST", f"{base_url}/collection/token/", headers=headers)
    assert status == 200, body
    return str(body["access_token"])


def mtn_payment(base_url: str, reference: str | None = None) -> tuple[int, bytes]:
    headers = {
        **SUBSCRIPTION,
        "Authorization": f"Bearer {mtn_token(base_url)}",
        "X-Reference-Id": reference or str(uuid.uuid4()),
        "X-Target-Environment": "sandbox",
        "Content-Type": "application/json",
    }
    body = {
        "amount": "20.00",
        "currency": "EUR",
        "externalId": "order-1",
        "payer": {"partyIdType": "MSISDN", "partyId": "46733123450"},
    }
    return http_raw("POST", f"{base_url}/collection/v1_0/requesttopay", body, headers)


def mtn_status(base_url: str, reference: str) -> tuple[int, Json]:
    headers = {**SUBSCRIPTION, "Authorization": f"Bearer {mtn_token(base_url)}"}
    return http("GET", f"{base_url}/collection/v1_0/requesttopay/{reference}", headers=headers)


def test_the_parser_offers_exactly_the_contract_options() -> None:
    flags = {flag for action in build_parser()._actions for flag in action.option_strings}
    assert flags == {
        "-h", "--help", "--version", "--provider", "--host", "--port", "--failure-rate",
        "--decline-rate", "--latency-ms", "--hang-rate", "--seed", "--approval-ms",
        "--abandon-rate", "--approval-timeout-s", "--sync-declines", "--status-failure-rate",
        "--token-ttl-s",
        "--client-id", "--client-secret", "--subscription-key", "--callback-url",
        "--callback-secret",
    }


def test_defaults_depend_on_the_provider() -> None:
    mtn = read_settings(["--provider", "mtn"], {})
    airtel = read_settings(["--provider", "airtel"], {})
    assert (mtn.api.name, mtn.host, mtn.port) == ("mtn", "127.0.0.1", 9101)
    assert (airtel.api.name, airtel.port) == ("airtel", 9102)
    assert mtn.faults.as_json() == {
        "failure_rate": 0.0, "decline_rate": 0.0, "latency_ms": [0.0, 0.0], "hang_rate": 0.0,
        "approval_ms": [0.0, 0.0], "abandon_rate": 0.0, "status_failure_rate": 0.0,
    }
    # Approval is instant by default, so the local stack answers as the original service did.
    assert mtn.options == MockOptions()


def test_every_option_can_come_from_its_environment_variable() -> None:
    settings = read_settings([], {
        "MOCK_PROVIDER": "airtel", "MOCK_HOST": "0.0.0.0", "MOCK_PORT": "9200",
        "MOCK_FAILURE_RATE": "0.1", "MOCK_DECLINE_RATE": "0.2", "MOCK_LATENCY_MS": "5,10",
        "MOCK_HANG_RATE": "0.3", "MOCK_SEED": "42", "MOCK_APPROVAL_MS": "100,200",
        "MOCK_ABANDON_RATE": "0.05", "MOCK_APPROVAL_TIMEOUT_S": "90", "MOCK_SYNC_DECLINES": "true",
        "MOCK_STATUS_FAILURE_RATE": "0.01", "MOCK_TOKEN_TTL_S": "30", "MOCK_CLIENT_ID": "id",
        "MOCK_CLIENT_SECRET": "secret", "MOCK_CALLBACK_URL": "http://127.0.0.1:8080/cb",
        "MOCK_CALLBACK_SECRET": "hmac-key",
    })
    assert (settings.api.name, settings.host, settings.port, settings.seed) == (
        "airtel", "0.0.0.0", 9200, 42,
    )
    assert settings.faults.as_json() == {
        "failure_rate": 0.1, "decline_rate": 0.2, "latency_ms": [5.0, 10.0], "hang_rate": 0.3,
        "approval_ms": [100.0, 200.0], "abandon_rate": 0.05, "status_failure_rate": 0.01,
    }
    assert settings.options == MockOptions(
        credentials=Credentials("id", "secret"),
        token_ttl_s=30,
        approval_timeout_s=90,
        sync_declines=True,
        callback_url="http://127.0.0.1:8080/cb",
        callback_secret="hmac-key",
    )


def test_the_subscription_key_comes_from_its_flag_for_mtn() -> None:
    argv = ["--provider", "mtn", "--subscription-key", "k", "--sync-declines"]
    settings = read_settings(argv, {})
    assert settings.options.credentials == Credentials(None, None, "k")
    assert settings.options.sync_declines is True


def test_a_flag_wins_over_its_environment_variable() -> None:
    settings = read_settings(
        ["--provider", "mtn", "--failure-rate", "0", "--port", "9300"],
        {"MOCK_PROVIDER": "airtel", "MOCK_FAILURE_RATE": "1", "MOCK_PORT": "9200"},
    )
    assert (settings.api.name, settings.port, settings.faults.failure_rate) == ("mtn", 9300, 0.0)


BAD_VALUES = [
    (["--provider", "visa"], {}, "--provider"),
    ([], {}, "--provider"),
    (["--provider", "mtn", "--port", "0"], {}, "--port"),
    (["--provider", "mtn", "--port", "http"], {}, "--port"),
    (["--provider", "mtn", "--failure-rate", "1.5"], {}, "--failure-rate"),
    (["--provider", "mtn", "--decline-rate", "half"], {}, "--decline-rate"),
    (["--provider", "mtn", "--hang-rate", "-0.1"], {}, "--hang-rate"),
    (["--provider", "mtn", "--latency-ms", "10"], {}, "--latency-ms"),
    (["--provider", "mtn", "--latency-ms", "10,5"], {}, "--latency-ms"),
    (["--provider", "mtn", "--seed", "x"], {}, "--seed"),
    (["--provider", "mtn", "--failure-rate", "0.6", "--decline-rate", "0.6"], {}, "--failure-rate"),
    (["--provider", "mtn"], {"MOCK_LATENCY_MS": "fast"}, "MOCK_LATENCY_MS"),
    ([], {"MOCK_PROVIDER": "mpesa"}, "MOCK_PROVIDER"),
    (["--provider", "mtn", "--colour", "red"], {}, "--colour"),
    (["--provider", "mtn", "--approval-ms", "9,1"], {}, "--approval-ms"),
    (["--provider", "mtn", "--abandon-rate", "2"], {}, "--abandon-rate"),
    (["--provider", "mtn", "--token-ttl-s", "0"], {}, "--token-ttl-s"),
    (["--provider", "mtn", "--approval-timeout-s", "soon"], {}, "--approval-timeout-s"),
    (["--provider", "mtn", "--callback-url", "ftp://x"], {}, "--callback-url"),
    (["--provider", "airtel", "--subscription-key", "k"], {}, "--subscription-key"),
    (["--provider", "mtn"], {"MOCK_SYNC_DECLINES": "maybe"}, "MOCK_SYNC_DECLINES"),
    (["--provider", "mtn", "--client-id", " "], {}, "--client-id"),
]
BAD_VALUE_IDS = [
    "unknown-provider", "no-provider", "port-zero", "port-not-a-number", "rate-above-one",
    "rate-not-a-number", "rate-negative", "latency-one-bound", "latency-lo-above-hi",
    "seed-not-an-integer", "rates-sum-above-one", "bad-env-latency", "bad-env-provider",
    "unknown-flag", "approval-lo-above-hi", "abandon-above-one", "token-ttl-zero",
    "approval-timeout-not-a-number", "callback-url-not-http", "subscription-key-for-airtel",
    "bad-env-switch", "client-id-blank",
]


@pytest.mark.parametrize(("argv", "environ", "named"), BAD_VALUES, ids=BAD_VALUE_IDS)
def test_a_bad_value_is_a_one_line_error_naming_the_option_and_exit_2(
    argv: list[str], environ: dict[str, str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        read_settings(argv, environ)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.startswith("payagg-mock: error: ")
    assert named in error


def test_a_bad_value_in_the_real_command_is_one_line_without_a_traceback() -> None:
    result = subprocess.run(
        [str(VENV_BIN / "payagg-mock"), "--provider", "mtn", "--latency-ms", "5-10"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "payagg-mock: error: argument --latency-ms: must be LO,HI milliseconds with "
        "0 <= LO <= HI, got '5-10'"
    ]


def test_a_busy_port_is_a_one_line_error_naming_the_port_and_exit_1() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = subprocess.run(
            mock_provider("mtn", port), capture_output=True, text=True, timeout=30, check=False,
        )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"payagg-mock: error: cannot listen on 127.0.0.1 port {port}: address already in use"
    ]


def test_the_real_mock_serves_payments_and_exits_0_on_sigterm() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    argv = mock_provider("mtn", port, "--seed", "7", "--approval-ms", "5,20")
    with running(argv, f"{base}/healthz") as service:
        reference = str(uuid.uuid4())
        assert mtn_payment(base, reference) == (202, b"")
        wait_until(
            lambda: mtn_status(base, reference)[1]["status"] == "SUCCESSFUL",
            what="the payer's approval",
        )
        assert http("GET", f"{base}/__mock/stats")[1]["charges"] == 1
        assert service.stop() == 0
    lines = [json.loads(line) for line in service.log_path.read_text().splitlines()]
    assert {"level": "info", "msg": "listening"}.items() <= lines[0].items()
    assert all("ts" in line and "level" in line for line in lines)
    assert lines[0]["seed"] == 7
    payments = [line for line in lines if line.get("path") == "/collection/v1_0/requesttopay"]
    assert len(payments) == 1
    assert {"provider": "mtn", "outcome": "success", "status": 202}.items() <= payments[0].items()


def test_the_real_mock_reads_its_settings_from_the_environment_and_exits_0_on_sigint() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"MOCK_PROVIDER": "mtn", "MOCK_PORT": str(port), "MOCK_FAILURE_RATE": "1"}
    with running([str(VENV_BIN / "payagg-mock")], f"{base}/healthz", env=env) as service:
        status, body = mtn_payment(base)
        assert (status, json.loads(body)["code"]) == (500, "INTERNAL_PROCESSING_ERROR")
        assert http("PUT", f"{base}/__mock/config", {})[1]["failure_rate"] == 1.0
        service.signal(signal.SIGINT)
        assert service.process.wait(timeout=10) == 0


def test_a_hung_request_does_not_delay_the_real_mocks_exit_0_on_sigterm() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    body = json.dumps({
        "amount": "1", "currency": "EUR", "externalId": "x",
        "payer": {"partyIdType": "MSISDN", "partyId": "46733123450"},
    })
    with (
        running(mock_provider("mtn", port, "--hang-rate", "1"), f"{base}/healthz") as service,
        socket.create_connection(("127.0.0.1", port)) as client,
    ):
        client.sendall(
            f"POST /collection/v1_0/requesttopay HTTP/1.1\r\nHost: mock\r\n"
            f"Authorization: Bearer {mtn_token(base)}\r\nX-Reference-Id: {uuid.uuid4()}\r\n"
            f"Ocp-Apim-Subscription-Key: sub\r\n"
            f"X-Target-Environment: sandbox\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        wait_until(
            lambda: http("GET", f"{base}/__mock/stats")[1]["charges"] == 1,
            what="the hung payment to be charged",
        )
        started = time.monotonic()
        assert service.stop() == 0
        assert time.monotonic() - started < SHUTDOWN_TIMEOUT_S  # the hang did not hold the exit


def test_the_real_mock_accepts_only_the_credentials_it_was_given() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"MOCK_CLIENT_ID": "api-user", "MOCK_CLIENT_SECRET": "api-key"}
    argv = mock_provider("mtn", port, "--subscription-key", "sub")
    with running(argv, f"{base}/healthz", env=env):
        basic = base64.b64encode(b"api-user:wrong").decode()
        headers = {**SUBSCRIPTION, "Authorization": f"Basic {basic}"}
        assert http("POST", f"{base}/collection/token/", headers=headers) == (
            500,
            {"error": "login_failed"},
        )
        assert mtn_token(base, "api-user", "api-key")
        stats = http("GET", f"{base}/__mock/stats")[1]
        assert (stats["tokens_issued"], stats["unauthorized"]) == (1, 1)
