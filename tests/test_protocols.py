"""The real protocols end to end: a provider added by YAML alone (MOMO3, the README's block) with
tokens, pending payments and status queries against a third mock process; token expiry mid-run;
MTN's callback to payagg's URL; and every new config key's errors."""

from __future__ import annotations

import json
import re
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from proxy.observability.metrics import GatewayMetrics
from proxy.payments.request import REFERENCE_NAMESPACE
from proxy.providers.breaker import ProviderBreaker
from proxy.providers.callbacks import token_matches
from proxy.providers.upstream import ProviderClient
from proxy.settings.config import ConfigError, load_config, parse_config
from tests.processes import free_port, mock_provider, payagg_serve, running, wait_until
from tests.test_providers_end_to_end import MTN_DECLINES, Mock, Reply, call, delta

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SHIPPED = ROOT / "config" / "gateway.yaml"
CALLBACK_SECRET = "test-callback-secret-0123"


def readme_momo3() -> str:
    """The YAML block of the README's "Adding a provider" walk-through, exactly as written."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- momo3-begin -->\n```yaml\n(.*?)```\n<!-- momo3-end -->", text, re.S)
    assert block, "README.md has the MOMO3 walk-through between its markers"
    return block.group(1)


def reference_of(provider: str, transaction_id: str) -> str:
    return str(uuid.uuid5(REFERENCE_NAMESPACE, f"{provider}\x00{transaction_id}"))


@dataclass
class Proxy:
    url: str
    mock: Mock

    def pay(self, provider: str, transaction_id: str, amount: float = 20.0) -> Reply:
        body = {
            "TransactionID": transaction_id,
            "Amount": amount,
            "Currency": "ZAR",
            "ProviderKey": provider,
        }
        return call(f"{self.url}/v1/pay", "POST", json.dumps(body).encode(), timeout=30)


REDIS_DB = 8


def stack_head(redis_port: int) -> str:
    return textwrap.dedent(
        f"""\
        redis: {{url: "redis://127.0.0.1:{redis_port}/{REDIS_DB}", timeout_s: 1}}
        idempotency: {{lock_ttl_s: 30, result_ttl_s: 600}}
        defaults:
          timeout_s: 2
          breaker: {{minimum_calls: 100}}
        """
    )


@contextmanager
def momo3_stack(redis_server, tmp_path: Path, *mock_flags: str) -> Iterator[Proxy]:
    """`payagg serve` with only the README's MOMO3 block, before a `payagg-mock --provider mtn`."""
    if redis_server.process is None:
        redis_server.start()
    redis_server.client().flushall()
    mock_port, proxy_port = free_port(), free_port()
    mock_url, proxy_url = f"http://127.0.0.1:{mock_port}", f"http://127.0.0.1:{proxy_port}"
    config = tmp_path / "momo3.yaml"
    config.write_text(stack_head(redis_server.port) + readme_momo3(), encoding="utf-8")
    env = {"MOMO3_URL": mock_url}
    argv = mock_provider("mtn", mock_port, "--seed", "3", *mock_flags)
    with (
        running(argv, f"{mock_url}/healthz") as mock_process,
        running(payagg_serve(config, proxy_port), f"{proxy_url}/readyz", env=env),
    ):
        yield Proxy(proxy_url, Mock("mtn", mock_url, mock_process))


def test_the_readme_block_is_a_valid_provider_with_tokens_pending_and_status():
    config = parse_config(readme_momo3(), "README.md", {})
    (momo3,) = config.providers
    assert momo3.name == "MOMO3"
    assert momo3.settings.auth is not None
    assert momo3.status is not None
    assert momo3.mapping.pending


def test_a_provider_added_by_yaml_alone_is_paid_once_the_payer_approves(redis_server, tmp_path):
    with momo3_stack(redis_server, tmp_path, "--approval-ms", "150,400") as stack:
        before = stack.mock.stats()
        transaction_id = f"MOMO3-{uuid.uuid4().hex[:8]}"
        reply = stack.pay("MOMO3", transaction_id)
        assert reply.status == 200, reply.raw
        record = stack.mock.lookup(reference_of("MOMO3", transaction_id))
        assert record["status"] == "SUCCESSFUL"
        assert reply.body == {
            "status": "SUCCESS",
            "transaction_id": transaction_id,
            "provider": "MOMO3",
            "provider_reference": record["financialTransactionId"],
            "amount": 20.0,
            "currency": "ZAR",
        }
        assert delta(before, stack.mock.stats()) == {"requests": 1, "charges": 1}

        with stack.mock.faults(decline_rate=1.0):
            declined = stack.pay("MOMO3", f"MOMO3-D-{uuid.uuid4().hex[:8]}")
        assert declined.status == 402, declined.raw
        assert declined.body["reason"] in MTN_DECLINES

        replay = stack.pay("MOMO3", transaction_id)
        assert replay.raw == reply.raw
        assert replay.headers.get("Idempotent-Replayed") == "true"


def test_concurrent_payments_with_a_cold_token_cache_cause_one_token_request(
    redis_server, tmp_path
):
    with momo3_stack(redis_server, tmp_path) as stack:
        assert stack.mock.stats()["tokens_issued"] == 0
        ids = [f"COLD-{n}-{uuid.uuid4().hex[:6]}" for n in range(12)]
        with ThreadPoolExecutor(max_workers=12) as pool:
            replies = list(pool.map(lambda tid: stack.pay("MOMO3", tid), ids))
        assert [reply.status for reply in replies] == [200] * 12, [r.raw for r in replies]
        stats = stack.mock.stats()
        assert stats["tokens_issued"] == 1
        assert stats["charges"] == 12


def test_tokens_expiring_mid_run_cost_no_payment(redis_server, tmp_path):
    with momo3_stack(redis_server, tmp_path, "--token-ttl-s", "1") as stack:
        replies = []
        for n in range(6):  # about 2.5 s: past two token lifetimes
            replies.append(stack.pay("MOMO3", f"TTL-{n}-{uuid.uuid4().hex[:6]}"))
            time.sleep(0.4)
        assert [reply.status for reply in replies] == [200] * 6, [r.raw for r in replies]
        stats = stack.mock.stats()
        assert stats["charges"] == 6
        assert stats["tokens_issued"] >= 3, "each token served about half its life"
        # Only a 401 (nothing created) is ever sent again: one payment request per payment.
        assert stats["requests"] - stats["unauthorized"] == 6


# --- The shipped MTN and Airtel with the payer approving later, and their callbacks --------


class Receiver(BaseHTTPRequestHandler):
    """payagg's public callback URL, as a provider reaches it (records what arrives)."""

    received: ClassVar[list[tuple[str, str, dict[str, str], bytes]]] = []

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self.received.append((self.command, self.path, dict(self.headers), body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_PUT = do_POST = _record

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_shipped_mtn_and_airtel_settle_by_polling_and_call_back_payaggs_url(
    redis_server, tmp_path, receiver
):
    if redis_server.process is None:
        redis_server.start()
    redis_server.client().flushall()
    ports = {"MTN": free_port(), "AIRTEL": free_port(), "PROXY": free_port()}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    airtel_secret = "airtel-callback-secret-42"
    env = {
        "MTN_URL": urls["MTN"],
        "AIRTEL_URL": urls["AIRTEL"],
        "REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/{REDIS_DB}",
        "PAYAGG_PUBLIC_URL": receiver,
        "PAYAGG_CALLBACK_SECRET": CALLBACK_SECRET,
        "AIRTEL_CALLBACK_SECRET": airtel_secret,
    }
    approval = ("--approval-ms", "200,500", "--seed", "5")
    airtel_callback_url = f"{receiver}/v1/callbacks/AIRTEL/merchant-account-url"
    airtel_argv = mock_provider(
        "airtel",
        ports["AIRTEL"],
        *approval,
        "--callback-url",
        airtel_callback_url,
        "--callback-secret",
        airtel_secret,
    )
    with (
        running(mock_provider("mtn", ports["MTN"], *approval), f"{urls['MTN']}/healthz") as mtn,
        running(airtel_argv, f"{urls['AIRTEL']}/healthz") as airtel,
        running(payagg_serve(SHIPPED, ports["PROXY"]), f"{urls['PROXY']}/readyz", env=env),
    ):
        mocks = {
            "MTN": Mock("mtn", urls["MTN"], mtn),
            "AIRTEL": Mock("airtel", urls["AIRTEL"], airtel),
        }
        proxy = Proxy(urls["PROXY"], mocks["MTN"])
        for provider, mock in mocks.items():
            transaction_id = f"LATE-{provider}-{uuid.uuid4().hex[:6]}"
            before = mock.stats()
            reply = proxy.pay(provider, transaction_id)
            assert reply.status == 200, reply.raw
            moved = delta(before, mock.stats())
            moved.pop("callbacks_sent", None)  # the callback of this very payment, maybe
            assert moved == {"requests": 1, "charges": 1}
        wait_until(lambda: len(Receiver.received) == 2, 15, "both providers' callbacks")

    config = load_config(SHIPPED, env)
    clients = {provider.name: provider for provider in config.providers}
    by_path = {
        path.split("/")[3]: (method, path, headers, body)
        for method, path, headers, body in Receiver.received
    }
    method, path, _, body = by_path["MTN"]
    assert method == "PUT"
    token = path.rsplit("/", 1)[1]
    mtn_reference = json.loads(body)
    assert mtn_reference["status"] == "SUCCESSFUL"
    transaction = mtn_reference["externalId"]
    assert token_matches(CALLBACK_SECRET, "MTN", reference_of("MTN", transaction), token)

    airtel_client = ProviderClient(
        clients["AIRTEL"],
        GatewayMetrics(["AIRTEL"]),
        ProviderBreaker("AIRTEL", clients["AIRTEL"].settings.breaker),
    )
    method, _, headers, body = by_path["AIRTEL"]
    assert method == "POST"
    assert airtel_client.authenticate_callback(method, headers, body)
    assert airtel_client.callback_state(body) == "TS"
    assert not airtel_client.authenticate_callback(method, headers, body.replace(b"TS", b"TF"))


# --- Config errors: every new key -------------------------------------------------------------

BASE = """\
providers:
  P:
    url: "http://127.0.0.1:9/pay"
"""
GOOD_STATUS = """\
    status:
      url: "http://127.0.0.1:9/pay/{reference}"
      success: [{status: 200, field: s, equals: OK}]
"""
TOKEN_REQUEST = """\
    request:
      headers: {Authorization: "Bearer {token}", X-Reference-Id: "{reference}"}
      body: {a: "{amount}"}
    response:
      success: [{status: 200}]
"""
CALLBACK_REQUEST = """\
    request:
      headers: {X-Callback-Url: "{callback_url}", X-Reference-Id: "{reference}"}
      body: {a: 1}
    response: {pending: [{status: 202}]}
"""
AUTH = """\
    auth: {url: "http://127.0.0.1:9/token"}
"""

CONFIG_ROWS = [
    (
        AUTH.replace("http://127.0.0.1:9/token", "ftp://x") + TOKEN_REQUEST,
        "providers.P.auth.url: must be an http:// or https:// URL",
    ),
    (
        AUTH.replace("}", ", body_format: xml}") + TOKEN_REQUEST,
        "providers.P.auth.body_format: input should be 'form' or 'json'",
    ),
    (
        AUTH.replace("}", ", token: a..b}") + TOKEN_REQUEST,
        "providers.P.auth.token: must be a dotted path",
    ),
    (
        AUTH.replace("}", ", refresh_before_s: -1}") + TOKEN_REQUEST,
        "providers.P.auth.refresh_before_s: must be >= 0",
    ),
    (
        AUTH.replace("}", ", basic: {username: '', password: p}}") + TOKEN_REQUEST,
        "providers.P.auth.basic.username:",
    ),
    (
        AUTH.replace("}", ", tokn: x}") + TOKEN_REQUEST,
        "providers.P.auth.tokn: unknown key (did you mean 'token'?)",
    ),
    (
        AUTH + TOKEN_REQUEST.replace("Bearer {token}", "Bearer static"),
        "providers.P.auth: no request or status template sends the {token}",
    ),
    (TOKEN_REQUEST, "providers.P: a template uses {token} but `auth:` says how to get none"),
    (
        TOKEN_REQUEST.replace("success: [{status: 200}]", "pending: [{status: 202}]"),
        "providers.P.response.pending: a pending payment needs a `status:` query",
    ),
    (
        GOOD_STATUS.replace("{reference}", "all"),
        "providers.P.status.url: names neither {reference} nor {provider_reference}",
    ),
    (
        GOOD_STATUS.replace("{reference}", "{amount}"),
        "providers.P.status.url: {amount} cannot be used here",
    ),
    (
        TOKEN_REQUEST.replace(
            'X-Reference-Id: "{reference}"', 'X-Reference-Id: "{provider_reference}"'
        )
        + AUTH,
        "providers.P.request.headers.X-Reference-Id: {provider_reference} cannot be used here",
    ),
    (
        GOOD_STATUS + "      not_found_grace_s: -1\n",
        "providers.P.status.not_found_grace_s: must be >= 0",
    ),
    (
        GOOD_STATUS.replace("      success: [{status: 200, field: s, equals: OK}]\n", ""),
        "providers.P.status.success: required key is missing",
    ),
    (
        GOOD_STATUS + "      pendng: []\n",
        "providers.P.status.pendng: unknown key (did you mean 'pending'?)",
    ),
    (
        GOOD_STATUS.replace(
            "success: [{status: 200, field: s, equals: OK}]", "success: [{field: s}]"
        ),
        "providers.P.status.success.0.field: needs `equals`",
    ),
    ("    callback: {verify: rsa}\n", "providers.P.callback.verify: input should be"),
    (
        "    callback: {verify: hmac_header, secret: s}\n",
        "providers.P.callback.header: is required by `verify: hmac_header`",
    ),
    (
        "    callback: {verify: hmac_field, field: hash, secret: s}\n",
        "providers.P.callback.signed: is required by `verify: hmac_field`",
    ),
    (
        "    callback: {verify: none, secret: s}\n",
        "providers.P.callback.secret: is not used by `verify: none`",
    ),
    (
        "    callback: {verify: shared_token, secret: s}\n",
        "providers.P.callback: `verify: shared_token` needs one of `header` or `field`",
    ),
    (
        TOKEN_REQUEST.replace("{token}", "x") + "    callback: {verify: none}\n",
        "providers.P.callback: a callback is only a hint to query the status: it needs `status:`",
    ),
    ("    sync_wait_s: -1\n", "providers.P.sync_wait_s: must be >= 0"),
    ("    sync_wait_s: 301\n", "providers.P.sync_wait_s: must be <= 300"),
]
CONFIG_IDS = [
    "auth-url-not-http",
    "auth-body-format-unknown",
    "auth-token-path-empty-part",
    "auth-refresh-before-negative",
    "auth-basic-empty-username",
    "auth-unknown-key",
    "auth-without-token-placeholder",
    "token-placeholder-without-auth",
    "pending-without-status",
    "status-url-names-no-payment",
    "status-url-with-a-payment-placeholder",
    "provider-reference-in-a-payment-request",
    "status-grace-negative",
    "status-without-success",
    "status-unknown-key",
    "status-rule-without-equals",
    "callback-verify-unknown",
    "callback-hmac-header-without-header",
    "callback-hmac-field-without-signed",
    "callback-none-with-a-secret",
    "callback-shared-token-without-where",
    "callback-without-status",
    "sync-wait-negative",
    "sync-wait-too-long",
]


@pytest.mark.parametrize(("text", "expected"), CONFIG_ROWS, ids=CONFIG_IDS)
def test_every_new_provider_key_is_checked_at_start_up_with_file_line_and_key(text, expected):
    with pytest.raises(ConfigError) as error:
        parse_config(BASE + text, "gw.yaml", {})
    problems = error.value.problems
    assert any(expected in problem for problem in problems), problems
    assert all(re.match(r"gw\.yaml:\d+: ", problem) for problem in problems), problems


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        (
            '{public_url: "ftp://pay.example.com"}',
            "server.public_url: must be an http:// or https:// URL",
        ),
        (
            '{public_url: "https://pay.example.com", callback_secret: short}',
            "server.callback_secret: must be at least 16 characters",
        ),
        (
            '{public_url: "https://pay.example.com"}',
            "server.callback_secret: is required once server.public_url is set",
        ),
    ],
    ids=["public-url-not-http", "callback-secret-too-short", "public-url-without-a-secret"],
)
def test_the_server_callback_keys_are_checked(server, expected):
    text = f"server: {server}\n" + BASE + CALLBACK_REQUEST + GOOD_STATUS
    with pytest.raises(ConfigError) as error:
        parse_config(text, "gw.yaml", {})
    assert any(expected in problem for problem in error.value.problems), error.value.problems


def test_the_shipped_file_starts_without_a_public_url_and_sends_no_callback_url():
    config = load_config(SHIPPED, {})
    assert config.server.public_url is None
    assert all(provider.callbacks is None for provider in config.providers)
