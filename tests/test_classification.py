"""What the end of a provider call means: one table, every case, from a real answer to the
breaker's window (proxy/providers/classification.py is the one module that decides)."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from proxy.errors import (
    REQUEST_OUTCOMES,
    Overloaded,
    PaymentError,
    ProviderNotReached,
    ProviderUnavailable,
)
from proxy.observability.metrics import OUTCOMES, GatewayMetrics
from proxy.payments.request import Payment
from proxy.providers.breaker import WindowCounts
from proxy.providers.classification import (
    BreakerVote,
    Classification,
    Phase,
    of_answer,
    of_error,
    of_transport,
)
from proxy.providers.upstream import ProviderClient
from tests.processes import free_port
from tests.test_upstream import REFERENCE, FakeProvider, Reply, provider_client
from tests.test_upstream import provider as provider  # the fixture

TIMEOUT_S = 0.3
# (outcome, counts against the breaker, the payment may be sent again)
Expected = tuple[str, bool, bool]

ANSWERS: list[tuple[str, Reply, str, Expected]] = [
    ("2xx-success", Reply(body={"status": "SUCCESS"}), "", ("success", False, False)),
    ("2xx-decline", Reply(body={"status": "DECLINED"}), "", ("declined", False, False)),
    ("2xx-pending", Reply(202, {"status": "PENDING"}), "", ("pending", False, False)),
    ("2xx-unreadable", Reply(200, b"<html>"), "", ("failure", True, False)),
    ("2xx-no-rule", Reply(body={"status": "WHO_KNOWS"}), "", ("failure", True, False)),
    ("400", Reply(400, {"error": "bad"}), "", ("rejected", False, True)),
    ("404", Reply(404), "", ("rejected", False, True)),
    ("408-counted-by-default", Reply(408), "", ("failure", True, False)),
    ("429-counted-by-default", Reply(429), "", ("failure", True, False)),
    ("429-not-counted", Reply(429), "breaker: {failure_statuses: []}", ("busy", False, True)),
    ("408-not-counted", Reply(408), "breaker: {failure_statuses: []}", ("busy", False, True)),
    ("500", Reply(500, {"error": "boom"}), "", ("failure", True, False)),
    ("503", Reply(503), "", ("failure", True, False)),
    ("409-already-exists", Reply(409), "", ("already_exists", False, False)),
    (
        "answer-about-another-amount",
        Reply(body={"status": "SUCCESS", "amount": 999}),
        "",
        ("mismatch", False, False),
    ),
    ("timeout-after-send", Reply(delay_s=5), "", ("unknown", True, False)),
    ("hang-up-after-send", Reply(hang_up=True), "", ("unknown", True, False)),
]


def a_payment() -> Payment:
    return Payment("TXN-1", Decimal("20.00"), "ZAR", "canon", None, None)


async def end_of_a_call(client: ProviderClient) -> Classification:
    try:
        answer = await client.pay(a_payment(), REFERENCE)
    except PaymentError as error:
        return of_error(error)
    return of_answer(answer.outcome, 200, via_egress_proxy=False)


def window_after_one(meaning: Classification) -> WindowCounts:
    if meaning.vote is BreakerVote.NONE:
        return WindowCounts(0, 0)
    return WindowCounts(1, int(meaning.counts_against_breaker))


@pytest.fixture
def metrics() -> GatewayMetrics:
    return GatewayMetrics(["CANON"])


@pytest.mark.parametrize(
    ("reply", "settings", "expected"),
    [case[1:] for case in ANSWERS],
    ids=[case[0] for case in ANSWERS],
)
async def test_each_provider_answer_has_one_meaning_and_the_breaker_counts_it_so(
    provider: FakeProvider,
    metrics: GatewayMetrics,
    reply: Reply,
    settings: str,
    expected: Expected,
) -> None:
    provider.answer(reply)
    extra = f"\n    {settings}" if settings else ""
    yaml = f'providers:\n  CANON:\n    url: "{provider.url}"\n    timeout_s: {TIMEOUT_S}{extra}\n'
    client = provider_client(yaml, "CANON", metrics)
    try:
        meaning = await end_of_a_call(client)
    finally:
        await client.close()
    assert (meaning.outcome, meaning.counts_against_breaker, meaning.retry_allowed) == expected
    assert client.breaker.window_counts() == window_after_one(meaning)


async def test_a_refused_connection_sent_nothing_counts_and_may_be_sent_again(
    metrics: GatewayMetrics,
) -> None:
    yaml = f'providers:\n  CANON: {{url: "http://127.0.0.1:{free_port()}/pay"}}\n'
    client = provider_client(yaml, "CANON", metrics)
    try:
        meaning = await end_of_a_call(client)
    finally:
        await client.close()
    assert (meaning.outcome, meaning.counts_against_breaker, meaning.retry_allowed) == (
        "not_sent",
        True,
        True,
    )
    assert client.breaker.window_counts() == WindowCounts(1, 1)


ENDINGS: list[tuple[str, Classification, Expected]] = [
    (
        "token-endpoint-down",
        of_error(ProviderNotReached("P", "no access token from P: HTTP 500")),
        ("not_sent", True, True),
    ),
    ("overloaded-never-counted", of_error(Overloaded("pool full")), ("overloaded", False, True)),
    ("breaker-open", of_error(ProviderUnavailable("P", 3)), ("breaker_open", False, True)),
    ("a-bug", of_error(RuntimeError("bug")), ("unknown", True, False)),
    ("cancelled", of_error(asyncio.CancelledError()), ("unknown", True, False)),
    (
        "egress-proxy-502",
        of_answer("failure", 502, via_egress_proxy=True),
        ("unknown", True, False),
    ),
    (
        "egress-proxy-504",
        of_answer("failure", 504, via_egress_proxy=True),
        ("unknown", True, False),
    ),
    (
        "502-without-proxy",
        of_answer("failure", 502, via_egress_proxy=False),
        ("failure", True, False),
    ),
    ("no-pool-slot", of_transport(Phase.POOL, True, False), ("overloaded", False, True)),
    ("connect-timeout", of_transport(Phase.CONNECT, True, False), ("not_sent", True, True)),
    (
        "out-of-fds-connecting",
        of_transport(Phase.CONNECT, False, True),
        ("overloaded", False, True),
    ),
    ("timeout-after-send", of_transport(Phase.SENT, True, False), ("unknown", True, False)),
    ("reset-after-send", of_transport(Phase.SENT, False, False), ("unknown", True, False)),
]


@pytest.mark.parametrize(
    ("meaning", "expected"),
    [case[1:] for case in ENDINGS],
    ids=[case[0] for case in ENDINGS],
)
def test_each_way_a_call_can_end_without_an_answer_has_one_meaning(
    meaning: Classification, expected: Expected
) -> None:
    assert (meaning.outcome, meaning.counts_against_breaker, meaning.retry_allowed) == expected


def test_a_busy_answer_is_neither_a_failure_nor_proof_the_provider_serves() -> None:
    assert of_answer("busy", 429, via_egress_proxy=False).vote is BreakerVote.BUSY


def test_every_outcome_an_error_can_carry_is_one_the_metrics_count() -> None:
    assert set(OUTCOMES) == set(REQUEST_OUTCOMES)
    with pytest.raises(TypeError, match="'timeout' is no metrics outcome"):
        type("ProviderTimedOut", (PaymentError,), {"outcome": "timeout"})
