"""A provider's callback, not a status poll, settles a payment: real `payagg serve` with the shipped
config, the real MTN and Airtel mocks calling back over real sockets, the real Redis.

The payment is given up on (UNRESOLVED after `reconcile.give_up_after_s`) before its payer
approves: an UNRESOLVED payment is on no schedule, so no status query is ever asked about it again
unless a callback makes it due. It reaching SUCCESS therefore proves the callback arrived, was
authenticated (MTN by its per-payment URL, Airtel by its static URL and the HMAC of its body) and
triggered the one status query that settled it. Were callbacks ignored, it would stay UNRESOLVED.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import VENV_BIN, free_port, mock_provider, payagg_serve, running
from tests.test_providers_end_to_end import call

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "gateway.yaml"
REDIS_DB = 12
PUBLIC_SECRET = "callbacks-processes-secret-0123"  # server.callback_secret: keys the URL tokens
AIRTEL_SECRET = "callbacks-processes-airtel-hmac"  # Airtel's `hash` key, on both sides
APPROVAL_MS = 5000  # the payer approves this long after the request: after payagg gave up
BOUND_S = 60.0  # generous: the machine is shared


@dataclass
class CallingBack:
    """One provider's mock, calling back to a proxy that has given up polling."""

    provider: str
    proxy: str
    mock: str

    def payment(self, transaction_id: str) -> dict[str, object]:
        reply = call(f"{self.proxy}/v1/payments/{transaction_id}")
        assert reply.status == 200, reply.raw
        return reply.body

    def stats(self) -> dict[str, int]:
        return call(f"{self.mock}/__mock/stats").body  # type: ignore[return-value]

    def polls(self, result: str) -> float:
        text = call(f"{self.proxy}/metrics").raw.decode()
        labels = (f'provider="{self.provider}"', f'result="{result}"')
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("payagg_reconcile_polls_total{") and all(x in line for x in labels)
        )

    def pay_and_let_payagg_give_up(self, prefix: str) -> str:
        """A payment the payer has not approved yet: answered 202, then given up on by payagg
        (UNRESOLVED, on no poll schedule); only a callback can make it due again."""
        transaction_id = f"{prefix}-{uuid.uuid4().hex[:10]}"
        body = {
            "TransactionID": transaction_id,
            "Amount": 20.0,
            "Currency": "UGX",
            "ProviderKey": self.provider,
        }
        first = call(f"{self.proxy}/v1/pay", "POST", json.dumps(body).encode())
        assert first.status == 202, first.raw
        self.reaches(transaction_id, "UNRESOLVED")
        return transaction_id

    def reaches(self, transaction_id: str, state: str) -> dict[str, object]:
        deadline = time.monotonic() + BOUND_S
        while True:
            found = self.payment(transaction_id)
            if found["state"] == state:
                return found
            assert time.monotonic() < deadline, f"{transaction_id} not {state} in time: {found}"
            time.sleep(0.05)


def registered_callback_url(environment: dict[str, str]) -> str:
    """Airtel's static callback URL, as `payagg check-config` tells the operator to register it."""
    checked = subprocess.run(
        [str(VENV_BIN / "payagg"), "check-config", str(SHIPPED)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, **environment},
    )
    (line,) = [line for line in checked.stdout.splitlines() if line.startswith("AIRTEL callback")]
    return line.rsplit(" ", 1)[1]


@pytest.fixture(params=["MTN", "AIRTEL"])
def calling_back(request, redis_server) -> Iterator[CallingBack]:
    provider: str = request.param
    if redis_server.process is None:
        redis_server.start()
    redis_server.client(REDIS_DB).flushdb()
    proxy_port, mock_port = free_port(), free_port()
    proxy, mock = f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{mock_port}"
    environment = {
        "PAYAGG_PUBLIC_URL": proxy,
        "PAYAGG_CALLBACK_SECRET": PUBLIC_SECRET,
        "AIRTEL_CALLBACK_SECRET": AIRTEL_SECRET,
        f"{provider}_URL": mock,
        "REDIS_URL": redis_server.url_for(REDIS_DB),
        f"{provider}_SYNC_WAIT_S": "0.3",  # answered 202 long before the payer approves
        "PROVIDER_TIMEOUT_S": "2",
        "RECONCILE_GIVE_UP_AFTER_S": "0.1",  # UNRESOLVED at the reconciler's first question
    }
    flags = ["--seed", "11", "--approval-ms", f"{APPROVAL_MS},{APPROVAL_MS}"]
    if provider == "AIRTEL":
        # Airtel has no per-request callback URL: the merchant account has one, here a flag.
        static = registered_callback_url(environment)
        assert static.startswith(f"{proxy}/v1/callbacks/AIRTEL/")
        flags += ["--callback-url", static, "--callback-secret", AIRTEL_SECRET]
    with ExitStack() as processes:
        argv = mock_provider(provider.lower(), mock_port, *flags)
        processes.enter_context(running(argv, f"{mock}/healthz"))
        serve = payagg_serve(SHIPPED, proxy_port)
        processes.enter_context(running(serve, f"{proxy}/readyz", environment))
        yield CallingBack(provider, proxy, mock)


def test_a_payment_nothing_polls_any_more_is_settled_by_the_providers_callback(calling_back):
    transaction_id = calling_back.pay_and_let_payagg_give_up("CALLBACK")
    before = calling_back.stats()
    assert before["callbacks_sent"] == 0, "the payer approved before payagg gave up: too slow"
    assert before["pending"] == 1
    assert calling_back.polls("success") == 0

    settled = calling_back.reaches(transaction_id, "SUCCESS")
    after = calling_back.stats()
    assert settled["status_code"] == 200
    assert after["callbacks_sent"] == 1
    assert after["callbacks_failed"] == 0, "payagg refused the provider's callback"
    # The one status query that settled it, asked because the callback made it due.
    assert calling_back.polls("success") == 1
    # The money invariant: one request, one charge, SUCCESS in payagg.
    assert (after["requests"], after["charges"], after["duplicates"]) == (1, 1, 0)
