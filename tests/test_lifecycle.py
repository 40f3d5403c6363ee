"""The payment lifecycle in one process: PENDING, UNRESOLVED, late reports, tombstones, callbacks,
`payagg reconcile --once`, the lifecycle's metrics, and leases. A real Redis and a real in-process
canonical upstream (`tests/canonical_upstream.py`) whose payments can stay PENDING."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import random
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import cli
from proxy.payments.lifecycle import compact_json, now_ms
from proxy.payments.request import reference_for
from proxy.providers.callbacks import callback_token, static_token
from proxy.settings.config import ConfigError, GatewayConfig, RedisSettings
from proxy.store.client import StoreClient
from proxy.store.keys import all_shards, payment_sha, shard_for
from proxy.store.payments import PaymentRecords
from tests.canonical_upstream import UpstreamState
from tests.conftest import GatewayClient, RedisServer, make_config, payment, running_gateway

Upstream = tuple[UpstreamState, str]
SECRET = "lifecycle-test-callback-secret"


def config_text(
    upstream_url: str,
    redis_url: str,
    *,
    sync_wait_s: float = 0,
    give_up_after_s: float = 3600,
    result_ttl_s: int = 600,
    public_url: str | None = None,
    callback: str = "{verify: none, state: status}",
) -> str:
    server = (
        f'server: {{public_url: "{public_url}", callback_secret: "{SECRET}"}}\n'
        if public_url
        else ""
    )
    return server + textwrap.dedent(
        f"""\
        redis: {{url: "{redis_url}", timeout_s: 0.5}}
        idempotency: {{lock_ttl_s: 10, result_ttl_s: {result_ttl_s}}}
        reconcile: {{max_interval_s: 1, give_up_after_s: {give_up_after_s}}}
        defaults:
          timeout_s: 1
          breaker: {{failure_rate_threshold: 0.6, minimum_calls: 3, window_s: 30, open_s: 30}}
        providers:
          CANON:
            url: "{upstream_url}"
            sync_wait_s: {sync_wait_s}
            callback: {callback}
        """
    )


def config(upstream_url: str, redis_url: str, **knobs: Any) -> GatewayConfig:
    return make_config(config_text(upstream_url, redis_url, **knobs))


async def pay(client: GatewayClient, transaction_id: str, **fields: object) -> tuple[int, Any]:
    async with client.post("/v1/pay", json=payment(transaction_id, **fields)) as reply:
        return reply.status, await reply.json()


async def looked_up(client: GatewayClient, transaction_id: str) -> dict[str, Any]:
    async with client.get(f"/v1/payments/{transaction_id}") as reply:
        assert reply.status == 200, await reply.text()
        found: dict[str, Any] = await reply.json()
        return found


async def eventually(check: Callable[[], Awaitable[Any]], what: str, bound_s: float = 20) -> Any:
    deadline = time.monotonic() + bound_s
    while True:
        found = await check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def in_state(client: GatewayClient, transaction_id: str, state: str) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        found = await looked_up(client, transaction_id)
        return found if found["state"] == state else None

    result: dict[str, Any] = await eventually(reached, f"{transaction_id} to be {state}")
    return result


async def metrics(client: GatewayClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with client.get("/metrics") as reply:
        text = await reply.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def stay_pending(state: UpstreamState) -> None:
    state.pending_polls = 1_000_000


def settle(state: UpstreamState, transaction_id: str) -> None:
    """The payer approves: the upstream's next status answer is final."""
    state.polls_left[reference_for("CANON", transaction_id)] = 0


async def test_every_lifecycle_series_is_there_from_start_up(upstream: Upstream, redis_url: str):
    async with running_gateway(config(upstream[1], redis_url)) as client:
        found = await metrics(client)
    canon = (("provider", "CANON"),)
    assert found["payagg_payments_pending", canon] == 0
    assert found["payagg_unresolved_payments", canon] == 0
    assert found["payagg_reconcile_conflicts_total", canon] == 0
    assert found["payagg_payment_time_to_final_seconds_count", canon] == 0
    for result in ("success", "declined", "pending", "not_found", "failed", "busy", "breaker_open"):
        key = ("payagg_reconcile_polls_total", (("provider", "CANON"), ("result", result)))
        assert found[key] == 0
    open_client = ("client", "open")
    pending = (open_client, ("outcome", "pending"), ("provider", "CANON"))
    assert found["payagg_requests_total", pending] == 0
    timeout = (open_client, ("outcome", "timeout"), ("provider", "CANON"))
    assert ("payagg_requests_total", timeout) not in found


async def test_a_payment_not_final_after_give_up_after_s_is_unresolved_and_a_late_report_settles_it(
    upstream: Upstream, redis_url: str
):
    state, url = upstream
    stay_pending(state)
    async with running_gateway(config(url, redis_url, give_up_after_s=1)) as client:
        status, body = await pay(client, "TXN-GIVE-UP")
        assert (status, body["status"]) == (202, "PENDING")
        unresolved = await in_state(client, "TXN-GIVE-UP", "UNRESOLVED")
        assert unresolved["reason"] == "gave_up"
        assert "response" not in unresolved, "not final: no answer is guessed"
        counted = await metrics(client)
        assert counted["payagg_unresolved_payments", (("provider", "CANON"),)] == 1
        assert counted["payagg_payments_pending", (("provider", "CANON"),)] == 0
        again = await pay(client, "TXN-GIVE-UP")
        assert again[0] == 202, "a retry is answered 202, never sent again"
        assert state.requests == 1

        # A late report: the payer approved after all, and a callback brings it back.
        settle(state, "TXN-GIVE-UP")
        sha = payment_sha("TXN-GIVE-UP")
        lifecycle = client.gateway.store.lifecycle
        assert await lifecycle.records.poke(shard_for("payagg:", sha), sha, now_ms()) == 2
        settled = await in_state(client, "TXN-GIVE-UP", "SUCCESS")
        assert settled["status_code"] == 200
        counted = await metrics(client)
        assert counted["payagg_unresolved_payments", (("provider", "CANON"),)] == 0
    assert state.requests == 1


async def test_a_status_about_another_amount_makes_the_payment_unresolved_never_success(
    upstream: Upstream, redis_url: str
):
    state, url = upstream
    state.pending_polls = 2
    reference = reference_for("CANON", "TXN-OTHER-AMOUNT")
    async with running_gateway(config(url, redis_url)) as client:
        assert (await pay(client, "TXN-OTHER-AMOUNT"))[0] == 202
        state.answered[reference] = json.dumps(
            {"status": "SUCCESS", "provider_reference": "up-x", "amount": 999, "currency": "ZAR"}
        ).encode()
        found = await in_state(client, "TXN-OTHER-AMOUNT", "UNRESOLVED")
        counted = await metrics(client)
    assert found["reason"] == "provider_mismatch"
    assert counted["payagg_provider_mismatch_total", (("provider", "CANON"),)] == 1


async def test_after_its_result_expired_the_tombstone_refuses_another_amount_and_replays_the_same(
    upstream: Upstream, redis_url: str, redis_server: RedisServer
):
    state, url = upstream
    async with running_gateway(config(url, redis_url, result_ttl_s=1)) as client:
        status, first = await pay(client, "TXN-TOMB")
        assert status == 200
        sha = payment_sha("TXN-TOMB")
        record = shard_for("payagg:", sha).payment(sha)

        async def expired() -> bool:
            return not redis_server.client().exists(record)

        await eventually(expired, "the result to expire")
        reused = await pay(client, "TXN-TOMB", Amount=999)
        same = await pay(client, "TXN-TOMB")
    assert reused[0] == 422
    assert reused[1]["error"] == "idempotency_key_reused"
    assert same == (200, first), "the same answer, rebuilt from the tombstone"
    assert state.requests == 1, "never charged twice"


async def test_reconcile_once_prints_what_it_did(
    upstream: Upstream, redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    state, url = upstream
    stay_pending(state)
    path = tmp_path / "gateway.yaml"
    path.write_text(config_text(url, redis_url))
    async with running_gateway(config(url, redis_url)) as client:
        assert (await pay(client, "TXN-ONCE"))[0] == 202
    # No process reconciles now; one pass from the command line does.
    settle(state, "TXN-ONCE")
    code = await asyncio.to_thread(cli.main, ["reconcile", "--once", "--config", str(path)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "TXN-ONCE CANON: PENDING -> SUCCESS (status query: success)" in printed
    assert "1 payment(s) reconciled" in printed
    assert state.requests == 1


async def test_two_leases_taken_at_once_never_share_a_payment(upstream: Upstream, redis_url: str):
    state, url = upstream
    stay_pending(state)
    async with running_gateway(config(url, redis_url)) as client:
        await asyncio.gather(*(pay(client, f"TXN-LEASE-{n}") for n in range(40)))
    # The gateway and its reconciler are gone: two lessors race over every shard.
    records = PaymentRecords(StoreClient(RedisSettings(url=redis_url, timeout_s=1)))
    clock = now_ms() + 60_000  # everything is due by then
    taken: list[list[str]] = []
    for shard in all_shards("payagg:"):
        one, two = await asyncio.gather(
            records.lease(shard, clock, clock + 10_000, 100),
            records.lease(shard, clock, clock + 10_000, 100),
        )
        assert not set(one) & set(two)
        taken.append(one + two)
    assert sum(len(shas) for shas in taken) == 40


async def test_a_callback_before_the_posts_answer_wakes_it_and_changes_nothing_by_itself(
    upstream: Upstream, redis_url: str, unused_tcp_port: int
):
    state, url = upstream
    stay_pending(state)
    public = f"http://127.0.0.1:{unused_tcp_port}"
    knobs = {"sync_wait_s": 30, "public_url": public}
    async with running_gateway(config(url, redis_url, **knobs)) as client:
        paying = asyncio.create_task(pay(client, "TXN-CB-EARLY"))
        await eventually(lambda: _true(state.requests == 1), "the payment to be sent")
        reference = reference_for("CANON", "TXN-CB-EARLY")
        token = callback_token(SECRET, "CANON", reference)
        path = f"/v1/callbacks/CANON/{token}"
        async with client.put(path, data=b'{"status": "SUCCESSFUL"}') as hint:
            assert hint.status == 200
        assert (await looked_up(client, "TXN-CB-EARLY"))["state"] in ("PROCESSING", "PENDING")
        settle(state, "TXN-CB-EARLY")
        async with client.post(path, data=b'{"status": "SUCCESSFUL"}') as hint:
            assert hint.status == 200
        status, body = await paying
    assert (status, body["status"]) == (200, "SUCCESS")
    assert state.requests == 1


async def test_a_callback_racing_the_reconciler_settles_the_payment_once(
    upstream: Upstream, redis_url: str, unused_tcp_port: int
):
    state, url = upstream
    stay_pending(state)
    public = f"http://127.0.0.1:{unused_tcp_port}"
    async with running_gateway(config(url, redis_url, public_url=public)) as client:
        assert (await pay(client, "TXN-CB-RACE"))[0] == 202
        settle(state, "TXN-CB-RACE")
        token = callback_token(SECRET, "CANON", reference_for("CANON", "TXN-CB-RACE"))
        hints = [client.put(f"/v1/callbacks/CANON/{token}", data=b"{}") for _ in range(10)]
        answers = await asyncio.gather(*(hint.__aenter__() for hint in hints))
        assert {answer.status for answer in answers} == {200}
        settled = await in_state(client, "TXN-CB-RACE", "SUCCESS")
        counted = await metrics(client)
    assert settled["status_code"] == 200
    assert counted["payagg_payment_time_to_final_seconds_count", (("provider", "CANON"),)] == 1
    assert state.requests == 1


async def test_a_callback_for_an_unknown_payment_or_with_a_bad_token_is_401_and_asks_nothing(
    upstream: Upstream, redis_url: str, unused_tcp_port: int
):
    state, url = upstream
    public = f"http://127.0.0.1:{unused_tcp_port}"
    async with running_gateway(config(url, redis_url, public_url=public)) as client:
        unknown = callback_token(SECRET, "CANON", reference_for("CANON", "TXN-NEVER"))
        async with client.put(f"/v1/callbacks/CANON/{unknown}", data=b"{}") as reply:
            assert reply.status == 401
            assert (await reply.json())["error"] == "unauthorized"
        async with client.put("/v1/callbacks/CANON/not-a-token", data=b"{}") as reply:
            assert reply.status == 401
        async with client.put(f"/v1/callbacks/NOPE/{unknown}", data=b"{}") as reply:
            assert reply.status == 404
        await asyncio.sleep(0.6)  # a reconciler pass would have asked by now, had it been due
    assert state.status_queries == 0
    assert state.requests == 0


STATIC = f"{{reference: reference, verify: hmac_header, header: X-Signature, secret: {SECRET}}}"


def signed(body: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    """A callback body as the provider sends it to the static URL, and its signature header."""
    raw = json.dumps(body).encode()
    return raw, {"X-Signature": hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()}


@contextlib.asynccontextmanager
async def given_up_on(
    upstream: Upstream, redis_url: str, port: int, transaction_id: str
) -> AsyncIterator[GatewayClient]:
    """A gateway whose provider calls back on its static URL, with `transaction_id` given up on
    (UNRESOLVED: off the schedule, so only a callback brings it to a status query again) and
    approved by the payer since."""
    state, url = upstream
    stay_pending(state)
    knobs = {"public_url": f"http://127.0.0.1:{port}", "callback": STATIC, "give_up_after_s": 0.1}
    async with running_gateway(config(url, redis_url, **knobs)) as client:
        assert (await pay(client, transaction_id))[0] == 202
        await in_state(client, transaction_id, "UNRESOLVED")
        settle(state, transaction_id)
        yield client


STATIC_PATH = f"/v1/callbacks/CANON/{static_token(SECRET, 'CANON')}"


async def test_a_callback_on_the_static_url_finds_the_payment_by_the_signed_reference_in_its_body(
    upstream: Upstream, redis_url: str, unused_tcp_port: int
):
    async with given_up_on(upstream, redis_url, unused_tcp_port, "TXN-STATIC") as client:
        raw, headers = signed({"reference": reference_for("CANON", "TXN-STATIC"), "status": "OK"})
        async with client.post(STATIC_PATH, data=raw, headers=headers) as hint:
            assert hint.status == 200, await hint.text()
        settled = await in_state(client, "TXN-STATIC", "SUCCESS")
    assert settled["status_code"] == 200
    assert upstream[0].requests == 1


async def test_a_static_url_callback_unsigned_or_for_an_unknown_reference_changes_nothing(
    upstream: Upstream, redis_url: str, unused_tcp_port: int
):
    state, _ = upstream
    async with given_up_on(upstream, redis_url, unused_tcp_port, "TXN-STATIC-NO") as client:
        queries = state.status_queries
        raw, headers = signed({"reference": reference_for("CANON", "TXN-STATIC-NO")})
        answers = {}
        for case, path, body, sent_headers in [
            ("unsigned", STATIC_PATH, raw, {}),
            ("forged", STATIC_PATH, raw, {"X-Signature": "0" * 64}),
            ("another-body", STATIC_PATH, raw + b" ", headers),
            ("wrong-token", f"/v1/callbacks/CANON/{'0' * 64}", raw, headers),
            ("unknown", STATIC_PATH, *signed({"reference": reference_for("CANON", "TXN-NEVER")})),
            ("no-reference", STATIC_PATH, *signed({"status": "TS"})),
        ]:
            async with client.post(path, data=body, headers=sent_headers) as reply:
                answers[case] = (reply.status, (await reply.json())["error"])
        await asyncio.sleep(0.6)  # a reconciler pass would have asked by now, had it been due
        assert (await looked_up(client, "TXN-STATIC-NO"))["state"] == "UNRESOLVED"
    assert answers == {
        "unsigned": (401, "unauthorized"),
        "forged": (401, "unauthorized"),
        "another-body": (401, "unauthorized"),
        "wrong-token": (401, "unauthorized"),
        "unknown": (404, "not_found"),
        "no-reference": (400, "invalid_request"),
    }
    assert state.status_queries == queries


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("reconcile: {max_interval_s: 0}", "reconcile.max_interval_s"),
        ("reconcile: {give_up_after_s: -1}", "reconcile.give_up_after_s"),
        ("reconcile: {every_s: 1}", "reconcile.every_s"),
        ("idempotency: {tombstone_ttl_s: 0}", "idempotency.tombstone_ttl_s"),
    ],
    ids=["max-interval", "give-up", "unknown-key", "tombstone"],
)
def test_a_bad_lifecycle_setting_is_refused_at_start_up_with_its_file_and_line(line, problem):
    text = f'{line}\nproviders:\n  CANON: {{url: "http://127.0.0.1:1/pay"}}\n'
    with pytest.raises(ConfigError) as refused:
        make_config(text)
    assert any(p.startswith(f"test.yaml:1: {problem}") for p in refused.value.problems), (
        refused.value.problems
    )


# Answers' JSON ------------------------------------------------------------------------------------


def _random_amounts(count: int) -> list[float]:
    generator = random.Random(15)
    return [generator.randint(1, 100_000_000_000) / 100 for _ in range(count)]


@pytest.mark.parametrize(
    "value",
    [
        {"status": "SUCCESS", "transaction_id": "TXN-1", "amount": 20.0, "currency": "ZAR"},
        {"every_ascii_character": "".join(chr(code) for code in range(128))},
        {"reason": "Solde insuffisant \u2014 r\u00e9essayez \U0001f4b8 \u2028"},
        {"small": 0.00001, "large": 1e16, "zero": 0.0, "negative": -0.5, "nan": float("nan")},
        {"huge_integer": 2**70, "status": 402, "flag": True, "nothing": None},
        {"nested": {"fields": {"Amount": "is required"}}, "list": [1, "a"]},
        {f"a{n}": amount for n, amount in enumerate(_random_amounts(5000))},
    ],
    ids=["answer", "ascii", "non-ascii", "floats", "integers", "nested", "random-amounts"],
)
def test_answers_are_written_exactly_as_json_dumps_writes_them(value: dict[str, Any]) -> None:
    # Replays and tombstone answers must match, byte for byte, what earlier versions stored.
    assert compact_json(value) == json.dumps(value, separators=(",", ":")).encode()


def test_amounts_of_every_size_are_written_exactly_as_json_dumps_writes_them() -> None:
    for amount in [*_random_amounts(20_000), 0.01, 0.1, 1.0, 1e9, 999_999_999.99]:
        body = {"amount": amount}
        assert compact_json(body) == json.dumps(body, separators=(",", ":")).encode(), amount
