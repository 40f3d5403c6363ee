"""Idempotency (CONTRACT §2): identity, replays, reused keys, the `Idempotency-Key` header,
records of the previous version, in-flight locks, release, Redis outages and Redis durability.

Everything talks to a real redis-server (the `redis_server` fixture, or one started here with the
local stack's own arguments) and a real in-process canonical upstream that counts its calls; the
only seam used is the store's `claim`, to open a breaker at an exact moment (see the 503 case of
the release test). Records of the previous version are written with raw Redis commands, in the
exact form that version wrote them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import pathlib
import secrets
import signal
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import redis as redis_sync
from prometheus_client.parser import text_string_to_metric_families

from proxy.devtools.devstack import DevOptions, plan
from proxy.errors import ProviderFailed, RequestInProgress
from proxy.observability.metrics import GatewayMetrics
from proxy.payments import request as request_module
from proxy.payments.idempotency import Claim, IdempotencyStore
from proxy.payments.lifecycle import Report
from proxy.payments.request import Payment, parse_payment, reference_for
from proxy.providers import callbacks as callbacks_module
from proxy.providers.breaker import ProviderBreaker
from proxy.settings.config import GatewayConfig, IdempotencySettings, RedisSettings
from proxy.store import records
from proxy.store.keys import payment_sha, shard_for
from proxy.store.records import StoredResult
from tests.canonical_upstream import UpstreamState
from tests.conftest import (
    GatewayClient,
    RedisServer,
    gateway_yaml,
    make_config,
    payment,
    running_gateway,
)
from tests.processes import ServiceProcess, free_port, wait_until

Upstream = tuple[UpstreamState, str]
Client = GatewayClient
PREFIX = b"payagg:"
REDIS_TIMEOUT_S = 0.3


def config(
    upstream_url: str,
    redis_url: str,
    *,
    timeout_s: float = 1,
    lock_ttl_s: int = 10,
    result_ttl_s: int = 600,
    minimum_calls: int = 3,
    open_s: float = 30,
    key_prefix: str = PREFIX.decode(),
    redis_timeout_s: float = REDIS_TIMEOUT_S,
) -> GatewayConfig:
    """One canonical provider CANON, every knob these tests turn in one place."""
    return make_config(
        textwrap.dedent(
            f"""\
            redis: {{url: "{redis_url}", key_prefix: "{key_prefix}", timeout_s: {redis_timeout_s}}}
            idempotency: {{lock_ttl_s: {lock_ttl_s}, result_ttl_s: {result_ttl_s}}}
            defaults:
              timeout_s: {timeout_s}
              breaker:
                failure_rate_threshold: 0.6
                minimum_calls: {minimum_calls}
                window_s: 30
                open_s: {open_s}
            providers:
              CANON: {{url: "{upstream_url}"}}
            """
        )
    )


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def pay(client: Client, body: dict[str, object], key: str | None = None) -> Answer:
    headers = {} if key is None else {"Idempotency-Key": key}
    async with client.post("/v1/pay", json=body, headers=headers) as response:
        return Answer(response.status, response.headers, await response.read())


async def get(client: Client, path: str) -> Answer:
    async with client.get(path) as response:
        return Answer(response.status, response.headers, await response.read())


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 5.0) -> Any:
    """Poll `check()` until it returns something truthy, and return that; fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


async def upstream_has_seen(state: UpstreamState, count: int) -> None:
    async def seen() -> bool:
        return state.requests >= count

    await eventually(seen, f"{count} upstream request(s)")


def redis_key(text: str, prefix: bytes = PREFIX) -> bytes:
    """Where a payment's record is (`text` = its TransactionID), and where the previous version
    kept the record of a payment sent with an `Idempotency-Key` (`text` = the header)."""
    return prefix + hashlib.sha256(text.encode()).hexdigest().encode()


def binding_key(idempotency_key: str, prefix: bytes = PREFIX) -> bytes:
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest().encode()
    return prefix + b"idempotency-key:" + digest


def fingerprint(body: dict[str, object]) -> str:
    return parse_payment(json.dumps(body).encode(), None, {"canon"}).fingerprint("CANON")


def provider_reference(identity: str) -> str:
    """The reference the gateway sends: uuid5 of the provider and the TransactionID (or, in the
    previous version, of the `Idempotency-Key` header when one was sent)."""
    assert reference_for("CANON", identity) == str(
        uuid.uuid5(uuid.UUID("6f1d2b9e-5c3a-5d7e-9a41-7061796167ff"), f"CANON\x00{identity}")
    )
    return reference_for("CANON", identity)


def record_key(transaction_id: str, prefix: bytes = PREFIX) -> bytes:
    """Where this version keeps a payment's record: its shard's hash-tagged key."""
    sha = payment_sha(transaction_id)
    return shard_for(prefix.decode(), sha).payment(sha)


def record(redis_server: RedisServer, transaction_id: str) -> records.KeyState:
    value = redis_server.client().get(record_key(transaction_id))
    assert value is not None, f"no record for {transaction_id}"
    return records.decode(value)


def is_replay(answer: Answer) -> bool:
    return answer.headers.get("Idempotent-Replayed") == "true"


async def store_errors(client: Client) -> float:
    text = (await get(client, "/metrics")).body.decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "payagg_idempotency_store_errors_total"
    )


def trip(breaker: ProviderBreaker) -> None:
    """Open the breaker exactly as failed provider calls would: through `call()`."""
    for _ in range(breaker.settings.minimum_calls):
        with contextlib.suppress(ProviderFailed), breaker.call():
            raise ProviderFailed(breaker.provider, "simulated outage")
    assert breaker.rejects_now()


# 1. Replays ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("decline", "status", "outcome"),
    [(False, 200, "SUCCESS"), (True, 402, "DECLINED")],
    ids=["success", "declined"],
)
async def test_a_replay_returns_the_stored_status_and_body_byte_for_byte(
    gateway: Client, upstream: Upstream, decline: bool, status: int, outcome: str
) -> None:
    state, _ = upstream
    state.decline = decline

    first = await pay(gateway, payment("TXN-replay"))
    replay = await pay(gateway, payment("TXN-replay"))

    assert (first.status, first.json()["status"]) == (status, outcome)
    assert not is_replay(first)
    assert replay.status == first.status
    assert replay.body == first.body
    assert is_replay(replay)
    assert replay.headers["Content-Type"] == first.headers["Content-Type"]
    assert state.requests == 1


async def test_a_replay_is_served_while_the_providers_breaker_is_open(
    upstream: Upstream, redis_url: str
) -> None:
    state, url = upstream
    async with running_gateway(config(url, redis_url, minimum_calls=3)) as client:
        done = await pay(client, payment("TXN-done"))
        assert done.status == 200
        state.failure_rate = 1.0
        for attempt in range(10):
            answer = await pay(client, payment(f"TXN-fail-{attempt}"))
            if answer.status == 503:
                break
            assert answer.status == 502
        assert answer.json()["error"] == "provider_unavailable"
        seen = state.requests

        replay = await pay(client, payment("TXN-done"))

        assert replay.status == 200
        assert replay.body == done.body
        assert is_replay(replay)
        assert state.requests == seen


async def test_while_the_breaker_is_open_the_header_is_still_judged_and_old_records_replayed(
    upstream: Upstream, redis_url: str, redis_server: RedisServer
) -> None:
    state, url = upstream
    old_body = payment("TXN-old-open")
    old_answer = old_payment(redis_server, "order-old", old_body)
    async with running_gateway(config(url, redis_url)) as client:
        done = await pay(client, payment("TXN-open"), key="order-open")
        breaker = client.gateway.breakers["CANON"]
        while not breaker.rejects_now():
            with contextlib.suppress(ProviderFailed), breaker.call():
                raise ProviderFailed("CANON", "simulated outage")

        replay = await pay(client, payment("TXN-open"), key="order-other")
        borrowed = await pay(client, payment("TXN-new"), key="order-open")
        old_replay = await pay(client, old_body, key="order-old")
        refused = await pay(client, payment("TXN-new"))

    assert replay.body == done.body
    assert is_replay(replay)
    assert borrowed.status == 422
    assert old_replay.body == old_answer
    assert is_replay(old_replay)
    assert refused.json()["error"] == "provider_unavailable"
    assert state.requests == 1


# 2. Reused keys -------------------------------------------------------------------------------


async def test_a_completed_key_reused_with_a_different_body_is_refused_with_422(
    gateway: Client, upstream: Upstream
) -> None:
    assert (await pay(gateway, payment("TXN-7", Amount=20.00))).status == 200

    reused = await pay(gateway, payment("TXN-7", Amount=21.00))

    assert reused.status == 422
    assert reused.json()["error"] == "idempotency_key_reused"
    assert upstream[0].requests == 1


async def test_a_key_in_progress_reused_with_a_different_body_is_refused_with_422(
    gateway: Client, upstream: Upstream
) -> None:
    state, _ = upstream
    state.delay_s = 0.5
    first = asyncio.create_task(pay(gateway, payment("TXN-8", Amount=20.00)))
    await upstream_has_seen(state, 1)

    reused = await pay(gateway, payment("TXN-8", Amount=21.00))

    assert reused.status == 422
    assert reused.json()["error"] == "idempotency_key_reused"
    assert (await first).status == 200
    assert state.requests == 1


async def test_the_same_transaction_id_without_a_header_then_with_k1_then_k2_is_charged_once(
    gateway: Client, upstream: Upstream, redis_server: RedisServer
) -> None:
    state, _ = upstream

    first = await pay(gateway, payment("TXN-once"))
    with_k1 = await pay(gateway, payment("TXN-once"), key="k1")
    with_k2 = await pay(gateway, payment("TXN-once"), key="k2")

    assert first.status == 200
    assert not is_replay(first)
    for retry in (with_k1, with_k2):
        assert retry.status == 200
        assert is_replay(retry)
        assert retry.body == first.body
    assert state.requests == 1
    assert state.references == [provider_reference("TXN-once")]


async def test_a_header_changes_neither_the_identity_nor_the_provider_reference(
    gateway: Client, upstream: Upstream, redis_server: RedisServer
) -> None:
    state, _ = upstream

    first = await pay(gateway, payment("TXN-ref"), key="order-1")
    without_header = await pay(gateway, payment("TXN-ref"))
    changed_body = await pay(gateway, payment("TXN-ref", Amount=99.00), key="order-2")

    assert first.json()["provider_reference"] == f"up-{provider_reference('TXN-ref')}"
    assert is_replay(without_header)
    assert without_header.body == first.body
    assert changed_body.status == 422
    assert changed_body.json()["error"] == "idempotency_key_reused"
    stored = record(redis_server, "TXN-ref")
    assert (stored.transaction_id, stored.reference) == ("TXN-ref", provider_reference("TXN-ref"))
    assert state.requests == 1


async def test_a_payment_computes_its_provider_reference_and_callback_token_once(
    upstream: Upstream, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: Counter[str] = Counter()
    for module, name in ((request_module, "reference_for"), (callbacks_module, "callback_token")):
        real = getattr(module, name)

        def counted(*args: Any, real: Callable[..., str] = real, name: str = name) -> str:
            calls[name] += 1
            return real(*args)

        monkeypatch.setattr(module, name, counted)
    callbacks_on = textwrap.dedent(
        """\
        server: {public_url: "https://pay.example.com", callback_secret: "0123456789abcdef0123"}
        """
    )
    async with running_gateway(
        make_config(gateway_yaml(upstream[1], redis_url, callbacks_on))
    ) as client:
        answer = await pay(client, payment("TXN-once-each"))

    assert answer.status == 200
    assert calls == {"reference_for": 1, "callback_token": 1}


async def test_a_header_value_bound_to_another_transaction_id_is_refused_with_422(
    gateway: Client, upstream: Upstream
) -> None:
    state, _ = upstream
    first = await pay(gateway, payment("TXN-A"), key="order-7")

    other_transaction = await pay(gateway, payment("TXN-B"), key="order-7")
    other_without_header = await pay(gateway, payment("TXN-B"))

    assert first.status == 200
    assert other_transaction.status == 422
    assert other_transaction.json()["error"] == "idempotency_key_reused"
    assert "another TransactionID" in other_transaction.json()["message"]
    # TXN-B itself is untouched by the refusal: it is paid when sent without the taken header.
    assert other_without_header.status == 200
    assert not is_replay(other_without_header)
    assert state.requests == 2


async def test_a_header_equal_to_another_payments_transaction_id_does_not_disturb_that_payment(
    gateway: Client, upstream: Upstream
) -> None:
    state, _ = upstream
    paid_before = await pay(gateway, payment("TXN-C"))
    borrowing_after = await pay(gateway, payment("TXN-D"), key="TXN-C")
    borrowing_before = await pay(gateway, payment("TXN-F"), key="TXN-E")
    unknown_yet = await get(gateway, "/v1/payments/TXN-E")
    paid_after = await pay(gateway, payment("TXN-E"))

    retries = [
        await pay(gateway, payment(transaction_id), key=key)
        for transaction_id, key in (("TXN-C", None), ("TXN-D", "TXN-C"), ("TXN-F", "TXN-E"))
    ] + [await pay(gateway, payment("TXN-E"))]

    firsts = (paid_before, borrowing_after, borrowing_before, paid_after)
    assert [a.status for a in firsts] == [200] * 4
    assert not any(map(is_replay, firsts))
    assert unknown_yet.status == 404
    assert all(map(is_replay, retries))
    assert [r.body for r in retries] == [f.body for f in firsts]
    assert state.requests == 4


# 2b. Records of the previous version (keyed by the header; no stored reference) ---------------


def old_payment(redis_server: RedisServer, key: str, body: dict[str, object]) -> bytes:
    """Store what the previous version stored for `body` paid under idempotency key `key` (the
    header, else the TransactionID): `C|fingerprint|status|body`, charged with the reference it
    derived from `key`. Returns the answer body it would replay."""
    transaction_id = str(body["TransactionID"])
    answer = json.dumps(success(transaction_id, provider_reference(key)), separators=(",", ":"))
    old = b"C|" + fingerprint(body).encode() + b"|200|" + answer.encode()
    redis_server.client().set(redis_key(key), old, ex=600)
    return answer.encode()


def legacy_lock(body: dict[str, object]) -> bytes:
    return f"L|{secrets.token_hex(16)}|{fingerprint(body)}".encode()


def success(transaction_id: str, reference: str) -> dict[str, object]:
    return {
        "status": "SUCCESS",
        "transaction_id": transaction_id,
        "provider": "CANON",
        "provider_reference": f"up-{reference}",
        "amount": 20.0,
        "currency": "ZAR",
    }


async def test_a_payment_made_with_a_header_before_the_upgrade_is_adopted_not_charged_again(
    gateway: Client, upstream: Upstream, redis_server: RedisServer
) -> None:
    state, _ = upstream
    body = payment("TXN-old")
    old_answer = old_payment(redis_server, "order-9", body)
    old_reference = provider_reference("order-9")  # the previous version's: from the header

    retry = await pay(gateway, body, key="order-9")
    without_header = await pay(gateway, body)
    looked_up = await get(gateway, "/v1/payments/TXN-old")

    assert retry.status == 200
    assert is_replay(retry)
    assert retry.body == old_answer
    assert without_header.body == retry.body
    assert is_replay(without_header)
    assert looked_up.json()["response"] == retry.json()
    adopted = record(redis_server, "TXN-old")
    assert adopted.reference == old_reference != provider_reference("TXN-old")
    assert adopted.result == StoredResult(200, retry.body)
    assert state.requests == 0


async def test_a_record_of_the_previous_version_under_the_transaction_id_is_replayed_in_place(
    gateway: Client, upstream: Upstream, redis_server: RedisServer
) -> None:
    state, _ = upstream
    body = payment("TXN-plain")
    old_answer = old_payment(redis_server, "TXN-plain", body)

    replay = await pay(gateway, body, key="order-plain")

    assert replay.status == 200
    assert is_replay(replay)
    assert replay.body == old_answer
    assert state.requests == 0


async def test_a_payment_an_old_process_is_still_charging_under_the_header_answers_409(
    gateway: Client, upstream: Upstream, redis_server: RedisServer
) -> None:
    state, _ = upstream
    body = payment("TXN-busy")
    redis_server.client().set(redis_key("order-10"), legacy_lock(body), ex=10)

    answer = await pay(gateway, body, key="order-10")

    assert answer.status == 409
    assert answer.json()["error"] == "request_in_progress"
    assert not redis_server.client().exists(redis_key("TXN-busy")), "the claim was not released"
    assert state.requests == 0


async def test_a_header_an_old_record_bound_to_another_transaction_id_is_422_and_stays_its_own(
    gateway: Client, upstream: Upstream, redis_server: RedisServer
) -> None:
    state, _ = upstream
    owner = payment("TXN-X")
    old_payment(redis_server, "order-11", owner)

    borrower = await pay(gateway, payment("TXN-Y"), key="order-11")
    owners_retry = await pay(gateway, owner, key="order-11")

    assert borrower.status == 422
    assert borrower.json()["error"] == "idempotency_key_reused"
    assert not redis_server.client().exists(redis_key("TXN-Y")), "the claim was not released"
    assert owners_retry.status == 200
    assert is_replay(owners_retry)
    assert state.requests == 0


async def test_a_header_equal_to_the_transaction_id_of_an_old_record_without_header_is_free(
    gateway: Client, upstream: Upstream, redis_server: RedisServer
) -> None:
    state, _ = upstream
    old_payment(redis_server, "TXN-G", payment("TXN-G"))

    borrowing = await pay(gateway, payment("TXN-H"), key="TXN-G")

    assert borrowing.status == 200
    assert not is_replay(borrowing)
    assert state.requests == 1


async def test_after_twice_result_ttl_s_the_old_keys_are_no_longer_looked_at(
    gateway: Client, upstream: Upstream, redis_server: RedisServer
) -> None:
    state, _ = upstream
    redis = redis_server.client()
    result_ttl_s = 600  # the `gateway` fixture's
    redis.set(PREFIX + b"identity-by-transaction-id-since", int(time.time()) - 2 * result_ttl_s)
    old_payment(redis_server, "order-late", payment("TXN-late"))  # cannot exist any more

    answer = await pay(gateway, payment("TXN-late"), key="order-late")

    assert answer.status == 200
    assert not is_replay(answer)
    assert redis.get(redis_key("order-late"))[:2] == b"C|", "a guard was written"
    assert state.requests == 1


def previous_versions_reading(value: bytes) -> tuple[str, bool]:
    """How the previous version's `_decode` read a value: (fingerprint, completed)."""
    if value[:1] == b"C":
        _, fingerprint, _status, _body = value.split(b"|", 3)
        return fingerprint.decode(), True
    _, _, fingerprint = value.split(b"|", 2)
    return fingerprint.decode(), False


async def test_an_old_process_finds_a_guard_under_the_old_key_of_a_new_payments_header(
    gateway: Client, upstream: Upstream, redis_server: RedisServer
) -> None:
    """Retried on an old process during a rolling deploy, a payment made with a header on a new
    one is seen in flight there (409), not charged again under a reference from the header."""
    body = payment("TXN-guarded")
    assert (await pay(gateway, body, key="order-guarded")).status == 200

    guard = redis_server.client().get(redis_key("order-guarded"))

    assert guard is not None
    assert previous_versions_reading(guard) == (fingerprint(body), False)
    assert 0 < redis_server.client().ttl(redis_key("order-guarded")) <= 600


async def test_a_new_record_lives_at_its_shard_key_and_the_transaction_ids_old_key_stays_free(
    gateway: Client, upstream: Upstream, redis_server: RedisServer
) -> None:
    """The lifecycle's record is at a hash-tagged shard key; a process of the version before
    retrying the payment during a rolling deploy finds nothing under its key and sends the
    same reference (a UUIDv5 of the TransactionID in both versions): the provider's
    deduplication on it is what keeps that retry from charging twice."""
    body = payment("TXN-roll", Payer="256700000001")
    assert (await pay(gateway, body, key='a|b "c" |')).status == 200

    assert redis_server.client().get(redis_key("TXN-roll")) is None
    stored = record(redis_server, "TXN-roll")
    assert (stored.state, stored.fingerprint) == ("SUCCESS", fingerprint(body))
    assert stored.reference == provider_reference("TXN-roll")


# 2c. When the TransactionID's old key is read -------------------------------------------------


LIFECYCLE_SINCE = PREFIX + b"lifecycle-since"


@contextlib.contextmanager
def commands_seen(server: RedisServer) -> Iterator[list[str]]:
    """Every command the server runs while the block runs, scripts' own included (MONITOR)."""
    seen: list[str] = []
    end = f"end-of-watch-{secrets.token_hex(4)}"
    with server.client().monitor() as monitor:  # watching once this returns

        def watch() -> None:
            while end not in (command := monitor.next_command()["command"]):
                seen.append(command)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            yield seen
        finally:
            server.client().echo(end)
            watcher.join(timeout=30)


def reads_of(seen: list[str], key: bytes) -> int:
    return sum(key.decode() in command for command in seen)


def parsed(body: dict[str, object]) -> Payment:
    return parse_payment(json.dumps(body).encode(), None, {"canon"})


async def test_a_store_no_version_before_wrote_to_is_fresh_and_its_old_keys_are_never_read(
    store: IdempotencyStore, redis_server: RedisServer
) -> None:
    assert await store.ping()  # readiness first, as a deployment does; its probe key is not old
    assert redis_server.client().get(LIFECYCLE_SINCE) == b"fresh"
    body = payment("TXN-fresh")

    with commands_seen(redis_server) as seen:
        claim = await store.claim(parsed(body), "CANON", hold_s=10)
        assert isinstance(claim, Claim)
        await claim.keep(200, b'{"paid":1}', None, None)
        replayed = await store.replay(parsed(body), "CANON")
        nothing = await store.replay(parsed(payment("TXN-never")), "CANON")
        looked_up = await store.peek_old("TXN-never")

    assert replayed == StoredResult(200, b'{"paid":1}')
    assert (nothing, looked_up) == (None, None)
    assert reads_of(seen, record_key("TXN-fresh")) > 0
    assert reads_of(seen, redis_key("TXN-fresh")) == reads_of(seen, redis_key("TXN-never")) == 0


async def test_records_of_a_version_before_found_at_the_first_start_are_still_honoured(
    store: IdempotencyStore, redis_server: RedisServer
) -> None:
    body = payment("TXN-before")
    old_answer = old_payment(redis_server, "TXN-before", body)
    in_flight = payment("TXN-charging")
    redis_server.client().set(redis_key("TXN-charging"), legacy_lock(in_flight), ex=10)
    assert await store.ping()
    since = redis_server.client().get(LIFECYCLE_SINCE)
    assert since is not None
    assert abs(int(since) - time.time()) < 60

    replayed = await store.replay(parsed(body), "CANON")
    claimed = await store.claim(parsed(body), "CANON", hold_s=10)
    with pytest.raises(RequestInProgress):
        await store.claim(parsed(in_flight), "CANON", hold_s=10)
    looked_up = await store.peek_old("TXN-before")

    assert replayed == claimed == StoredResult(200, old_answer)
    assert looked_up is not None
    assert looked_up.result == StoredResult(200, old_answer)
    assert not redis_server.client().exists(record_key("TXN-charging")), "never claimed"


async def test_during_a_rolling_deploy_records_old_processes_write_later_are_honoured(
    store: IdempotencyStore, redis_server: RedisServer
) -> None:
    """The store held an old process's record when the first new process started; the old
    processes go on taking payments while the deploy runs: their later records count too."""
    old_payment(redis_server, "TXN-earlier", payment("TXN-earlier"))
    assert await store.ping()
    later = payment("TXN-later")
    later_answer = old_payment(redis_server, "TXN-later", later)
    charging = payment("TXN-still-charging")
    redis_server.client().set(redis_key("TXN-still-charging"), legacy_lock(charging), ex=10)

    replayed = await store.claim(parsed(later), "CANON", hold_s=10)
    with pytest.raises(RequestInProgress):
        await store.replay(parsed(charging), "CANON")

    assert replayed == StoredResult(200, later_answer)
    assert not redis_server.client().exists(record_key("TXN-later")), "never claimed"


async def test_twice_result_ttl_s_after_the_first_start_the_old_key_is_no_longer_read(
    store: IdempotencyStore, redis_server: RedisServer
) -> None:
    result_ttl_s = 600  # the `store` fixture's
    redis_server.client().set(LIFECYCLE_SINCE, int(time.time()) - 2 * result_ttl_s - 1)
    body = payment("TXN-window-closed")

    with commands_seen(redis_server) as seen:
        replayed = await store.replay(parsed(body), "CANON")
        claimed = await store.claim(parsed(body), "CANON", hold_s=10)

    assert replayed is None
    assert isinstance(claimed, Claim)
    assert reads_of(seen, redis_key("TXN-window-closed")) == 0


async def test_a_store_whose_window_is_open_reads_the_old_key_on_every_path(
    store: IdempotencyStore, redis_server: RedisServer
) -> None:
    redis_server.client().set(LIFECYCLE_SINCE, int(time.time()) - 600)
    body = payment("TXN-window-open")

    with commands_seen(redis_server) as seen:
        await store.replay(parsed(body), "CANON")
        await store.claim(parsed(body), "CANON", hold_s=10)
        await store.peek_old("TXN-window-open")

    assert reads_of(seen, redis_key("TXN-window-open")) == 3


async def test_on_a_fresh_store_fail_fast_and_replay_answers_read_the_record_alone(
    upstream: Upstream, redis_url: str, redis_server: RedisServer
) -> None:
    state, url = upstream
    async with running_gateway(config(url, redis_url)) as client:
        assert (await get(client, "/readyz")).status == 200
        with commands_seen(redis_server) as seen:
            done = await pay(client, payment("TXN-one-read"))
            breaker = client.gateway.breakers["CANON"]
            while not breaker.rejects_now():
                with contextlib.suppress(ProviderFailed), breaker.call():
                    raise ProviderFailed("CANON", "simulated outage")
            replay = await pay(client, payment("TXN-one-read"))
            refused = await pay(client, payment("TXN-refused"))
            looked_up = await get(client, "/v1/payments/TXN-unknown")

    assert (done.status, replay.status, refused.status, looked_up.status) == (200, 200, 503, 404)
    assert replay.body == done.body
    assert is_replay(replay)
    assert state.requests == 1
    old_keys = [redis_key(name) for name in ("TXN-one-read", "TXN-refused", "TXN-unknown")]
    assert [reads_of(seen, key) for key in old_keys] == [0, 0, 0]
    assert reads_of(seen, record_key("TXN-refused")) == 1


# 3. Concurrency -------------------------------------------------------------------------------


async def test_fifty_concurrent_requests_with_one_key_make_exactly_one_upstream_call(
    gateway: Client, upstream: Upstream
) -> None:
    state, _ = upstream
    state.delay_s = 0.5

    answers = await asyncio.gather(*(pay(gateway, payment("TXN-50")) for _ in range(50)))

    assert state.requests == 1
    assert {answer.status for answer in answers} <= {200, 409}
    fresh = [a for a in answers if a.status == 200 and not is_replay(a)]
    assert len(fresh) == 1
    in_progress = [a for a in answers if a.status == 409]
    assert in_progress, "the requests did not overlap: the test proves nothing"
    for answer in in_progress:
        assert answer.headers["Retry-After"] == "1"
        assert answer.json()["error"] == "request_in_progress"


# 4. Locks expire -------------------------------------------------------------------------------


async def test_a_lock_left_by_a_crashed_proxy_blocks_the_key_until_it_expires(
    gateway: Client, upstream: Upstream, redis_server: RedisServer
) -> None:
    state, _ = upstream
    body = payment("TXN-crash")
    key = redis_key("TXN-crash")
    redis = redis_server.client()
    # What IdempotencyStore.claim writes (`L|token|fingerprint`), owned by a proxy now dead.
    crashed_lock = f"L|{secrets.token_hex(16)}|{fingerprint(body)}"
    redis.set(key, crashed_lock, ex=1)

    blocked = await pay(gateway, body)
    assert blocked.status == 409
    assert blocked.json()["error"] == "request_in_progress"
    assert state.requests == 0

    async def expired() -> bool:
        return not redis.exists(key)

    await eventually(expired, "the crashed proxy's lock to expire")
    after = await pay(gateway, body)

    assert after.status == 200
    assert not is_replay(after)
    assert state.requests == 1


async def test_a_record_never_expires_before_it_is_final_then_lives_result_ttl_s_then_a_tombstone(
    upstream: Upstream, redis_url: str, redis_server: RedisServer
) -> None:
    state, url = upstream
    state.delay_s = 0.3
    redis = redis_server.client()
    key = record_key("TXN-ttl")
    sha = payment_sha("TXN-ttl")
    tombstone = shard_for(PREFIX.decode(), sha).tombstone(sha)
    async with running_gateway(config(url, redis_url, lock_ttl_s=10, result_ttl_s=600)) as client:
        in_flight = asyncio.create_task(pay(client, payment("TXN-ttl")))
        await upstream_has_seen(state, 1)
        pending_ttl = redis.ttl(key)
        assert (await in_flight).status == 200
        result_ttl = redis.ttl(key)

    assert pending_ttl == -1, "a payment not final never expires silently"
    assert 10 < result_ttl <= 600
    assert 600 < redis.ttl(tombstone) <= 600 + 90 * 86400


# 5. Release on provider failure -----------------------------------------------------------------


async def _provider_fails(state: UpstreamState, client: Client) -> None:
    state.failure_rate = 1.0


async def _provider_hangs(state: UpstreamState, client: Client) -> None:
    state.delay_s = 0.8  # > timeout_s below


async def _provider_already_has_it(state: UpstreamState, client: Client) -> None:
    state.already_exists = True


async def _breaker_opens_after_the_claim(state: UpstreamState, client: Client) -> None:
    store = client.gateway.store
    breaker = client.gateway.breakers["CANON"]
    real_claim = store.claim

    async def claim_then_open(*args: Any) -> Claim | StoredResult:
        # The request passed the fail-fast check while the breaker was closed; other requests'
        # failures open it while this one holds its claim, so its own call is refused.
        claimed = await real_claim(*args)
        trip(breaker)
        delattr(store, "claim")  # once only: the retry claims normally
        return claimed

    setattr(store, "claim", claim_then_open)  # noqa: B010 (mypy forbids assigning a method)


async def _provider_recovers(state: UpstreamState, client: Client) -> None:
    state.failure_rate = 0.0
    state.delay_s = 0.0
    state.already_exists = False
    breaker = client.gateway.breakers["CANON"]

    async def admits_calls() -> bool:
        return not breaker.rejects_now()

    await eventually(admits_calls, "the breaker to let a trial call through")


@pytest.mark.parametrize(
    ("fail", "status", "state_after", "upstream_calls", "retry_status"),
    [
        (_provider_fails, 502, "NOT_CREATED", 2, 200),
        (_provider_hangs, 502, "NOT_CREATED", 2, 200),
        (_provider_already_has_it, 202, "PENDING", 1, 202),
        (_breaker_opens_after_the_claim, 503, "NOT_CREATED", 1, 200),
    ],
    ids=[
        "502-5xx-then-not-found",
        "502-hang-then-not-found",
        "202-provider-already-has-the-reference",
        "503-breaker-open-after-claim",
    ],
)
async def test_a_failed_payment_is_never_released_and_a_retry_reuses_the_stored_reference(
    upstream: Upstream,
    redis_url: str,
    redis_server: RedisServer,
    fail: Callable[[UpstreamState, Client], Awaitable[None]],
    status: int,
    state_after: str,
    upstream_calls: int,
    retry_status: int,
) -> None:
    """Not created (nothing sent, refused, or unknown to the status endpoint after the grace
    period, 0 here): kept as NOT_CREATED and started again by a retry, under the same
    reference. The provider said it has it: PENDING, replayed, never sent again."""
    state, url = upstream
    reference = provider_reference("TXN-retry")
    async with running_gateway(config(url, redis_url, timeout_s=0.3, open_s=0.3)) as client:
        await fail(state, client)
        failed = await pay(client, payment("TXN-retry"))
        assert failed.status == status, failed.body
        assert record(redis_server, "TXN-retry").state == state_after, "never released"
        looked_up = (await get(client, "/v1/payments/TXN-retry")).json()
        assert looked_up["state"] == state_after

        await _provider_recovers(state, client)
        retry = await pay(client, payment("TXN-retry"))

    assert retry.status == retry_status
    if retry_status == 200:
        assert not is_replay(retry)
        assert retry.json()["provider_reference"] == f"up-{reference}"
        assert record(redis_server, "TXN-retry").state == "SUCCESS"
    else:
        assert is_replay(retry)
    # A 503 is refused before the provider is called; the others reached it with the same UUID.
    assert state.references == [reference] * upstream_calls
    assert uuid.UUID(reference).version == 5


async def test_an_answer_about_another_amount_is_422_stores_nothing_and_releases_the_key(
    upstream: Upstream, redis_url: str, redis_server: RedisServer
) -> None:
    state, url = upstream
    reference = provider_reference("TXN-lost")
    # What the provider remembers under this reference: an earlier payment of 999, whose record
    # payagg no longer has.
    state.answered[reference] = json.dumps(
        {"status": "SUCCESS", "provider_reference": "up-old", "amount": 999, "currency": "ZAR"}
    ).encode()
    async with running_gateway(config(url, redis_url)) as client:
        refused = await pay(client, payment("TXN-lost"))
        assert refused.status == 422
        assert refused.json()["error"] == "idempotency_key_reused"
        assert not redis_server.client().exists(record_key("TXN-lost")), "nothing stored"
        assert client.gateway.breakers["CANON"].window_counts().failures == 0

        del state.answered[reference]  # (a provider that would take it as a new payment)
        again = await pay(client, payment("TXN-lost"))
    assert again.status == 200, "the 422 was not stored for replay"
    assert not is_replay(again)
    assert state.references == [reference] * 2


# 6. Owner-checked finish -----------------------------------------------------------------------


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[IdempotencyStore]:
    store = IdempotencyStore(
        RedisSettings(url=redis_url, timeout_s=REDIS_TIMEOUT_S),
        IdempotencySettings(lock_ttl_s=10, result_ttl_s=600),
        GatewayMetrics(["CANON"]),
    )
    yield store
    await store.close()


async def claimed(store: IdempotencyStore, transaction_id: str) -> Claim:
    body = json.dumps(payment(transaction_id)).encode()
    claim = await store.claim(parse_payment(body, None, {"canon"}), "CANON", hold_s=10)
    assert isinstance(claim, Claim)
    return claim


async def test_a_stale_owner_cannot_call_a_payment_another_owner_retook_not_created(
    store: IdempotencyStore, redis_server: RedisServer
) -> None:
    """An owner whose hold ran out learns nothing was sent after another took the payment:
    only the record's current owner may say it was never created."""
    stale = await claimed(store, "TXN-stale")
    taken = await store.lifecycle.apply(
        stale.record, Report("PENDING", reason="outcome_unknown", due_ms=0)
    )
    assert taken is not None

    await stale.not_created(ProviderFailed("CANON", "refused"))

    assert record(redis_server, "TXN-stale").state == "PENDING"


async def test_a_settled_payment_never_changes_and_a_contradiction_is_counted(
    store: IdempotencyStore, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    claim = await claimed(store, "TXN-settled")
    await claim.keep(200, b'{"status":"SUCCESS"}', None, "P-1")
    settled = record(redis_server, "TXN-settled")

    with caplog.at_level(logging.ERROR, logger="payagg.lifecycle"):
        await claim.settle(Report("DECLINED", reason="FAILED"))

    assert record(redis_server, "TXN-settled") == settled
    assert settled.state == "SUCCESS"
    conflicts = store.lifecycle.metrics.reconcile_conflicts.labels("CANON")._value.get()
    assert conflicts == 1
    (logged,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "SUCCESS" in logged
    assert "DECLINED" in logged


# 7. Redis outages ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def redis_outage(server: RedisServer, kind: str) -> AsyncIterator[None]:
    """Redis killed (connections refused) or frozen by SIGSTOP (connections hang), then back."""
    process = server.process
    assert process is not None
    if kind == "killed":
        await asyncio.to_thread(server.stop)
    else:
        process.signal(signal.SIGSTOP)
    try:
        yield
    finally:
        if kind == "killed":
            await asyncio.to_thread(server.start)
        else:
            process.signal(signal.SIGCONT)


def scripts_run(server: RedisServer) -> int:
    """Lua scripts Redis ran (an EVALSHA refused with NOSCRIPT, then sent as EVAL, counts once)."""
    stats = server.client().info("commandstats")
    runs = [stats.get(f"cmdstat_{name}", {}) for name in ("evalsha", "eval")]
    return sum(run.get("calls", 0) - run.get("failed_calls", 0) for run in runs)


async def ready_again(client: Client) -> None:
    async def ready() -> bool:
        return (await get(client, "/readyz")).status == 200

    await eventually(ready, "/readyz to answer 200 after Redis came back")


@pytest.mark.parametrize("kind", ["killed", "frozen"], ids=["redis-killed", "redis-frozen"])
async def test_without_redis_payments_fail_closed_fast_and_resume_by_themselves(
    upstream: Upstream, redis_url: str, redis_server: RedisServer, kind: str
) -> None:
    state, url = upstream
    async with running_gateway(config(url, redis_url)) as client:
        assert (await pay(client, payment("TXN-before"))).status == 200
        errors_before = await store_errors(client)
        async with redis_outage(redis_server, kind):
            # Answered while Redis is still down: the refusal did not wait for it to come back
            # (the bound is generous, so only a payment stuck until Redis returns fails it).
            refused = await asyncio.wait_for(pay(client, payment("TXN-during")), timeout=30)
            errors_after = await store_errors(client)
            not_ready = await get(client, "/readyz")

        assert refused.status == 503
        assert refused.json()["error"] == "idempotency_store_unavailable"
        assert state.requests == 1
        # The refused payment's, and the reconciler's passes meanwhile.
        assert errors_after >= errors_before + 1
        assert not_ready.status == 503

        await ready_again(client)
        resumed = await pay(client, payment("TXN-after"))

    assert resumed.status == 200
    assert not is_replay(resumed)
    assert state.requests == 2


@pytest.mark.parametrize("kind", ["killed", "frozen"], ids=["redis-killed", "redis-frozen"])
async def test_a_key_refused_while_redis_was_down_can_be_retried_as_soon_as_it_is_back(
    upstream: Upstream, redis_url: str, redis_server: RedisServer, kind: str
) -> None:
    state, url = upstream
    keys = [f"TXN-during-{n}" for n in range(20)]
    async with running_gateway(config(url, redis_url)) as client:
        # A payment first, as in production: the claim then goes out on a pooled connection.
        assert (await pay(client, payment("TXN-before"))).status == 200
        async with redis_outage(redis_server, kind):
            refused = await asyncio.gather(*(pay(client, payment(key)) for key in keys))
        await ready_again(client)
        scripts_before = scripts_run(redis_server)
        retries = await asyncio.gather(*(pay(client, payment(key)) for key in keys))
        scripts_during_retries = scripts_run(redis_server) - scripts_before

    # Each retry: its claim and its stored result, never blocked by what the outage left (a
    # claim left unanswered is released once, shared; the reconciler's lease scripts, one per
    # shard and pass, come on top).
    assert scripts_during_retries >= 2 * len(keys)
    assert [answer.status for answer in refused] == [503] * len(keys)
    assert [answer.status for answer in retries] == [200] * len(keys), [r.json() for r in retries]
    assert state.requests == 1 + len(keys)


async def unknown_outcomes(client: Client, action: str) -> float:
    text = (await get(client, "/metrics")).body.decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "payagg_idempotency_unknown_outcomes_total"
        and sample.labels["action"] == action
    )


async def test_a_result_whose_store_is_unconfirmed_is_logged_as_unknown_counted_and_answered(
    upstream: Upstream,
    redis_url: str,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    state, url = upstream
    state.delay_s = 0.5
    reference = provider_reference("TXN-lost")
    async with running_gateway(config(url, redis_url, timeout_s=3)) as client:
        with caplog.at_level(logging.ERROR, logger="payagg.idempotency"):
            in_flight = asyncio.create_task(pay(client, payment("TXN-lost")))
            await upstream_has_seen(state, 1)  # claimed: the lock is in Redis
            await asyncio.to_thread(redis_server.stop)
            answer = await in_flight
        unknown = await unknown_outcomes(client, "store")

    assert answer.status == 200
    assert answer.json()["provider_reference"] == f"up-{reference}"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    logged = [m for m in errors if reference in m]
    assert logged, errors
    assert all("not confirmed by Redis" in m and "reconciler" in m for m in logged), logged
    assert unknown == 1


async def test_a_lookup_first_undoes_a_claim_redis_ran_but_never_answered(
    upstream: Upstream, redis_url: str, redis_server: RedisServer
) -> None:
    state, url = upstream
    # A long provider timeout: the reconciler would take the record over only after it.
    async with running_gateway(config(url, redis_url, timeout_s=30, lock_ttl_s=60)) as client:
        # A payment first: Redis then knows the claim's script (EVALSHA finds it).
        assert (await pay(client, payment("TXN-before"))).status == 200
        # Redis stops answering writes (scripts included) and still answers reads: the claim
        # waits in Redis past payagg's bound, and Redis runs it once the pause ends.
        await asyncio.to_thread(
            redis_server.client().execute_command, "CLIENT", "PAUSE", 1500, "WRITE"
        )
        refused = await pay(client, payment("TXN-unanswered"))

        async def ran_late() -> bool:
            return bool(
                await asyncio.to_thread(redis_server.client().exists, record_key("TXN-unanswered"))
            )

        await eventually(ran_late, "Redis to run the claim it never answered")
        assert record(redis_server, "TXN-unanswered").state == "PROCESSING"
        looked_up = await get(client, "/v1/payments/TXN-unanswered")
        left = await asyncio.to_thread(redis_server.client().exists, record_key("TXN-unanswered"))

    assert refused.status == 503
    assert refused.json()["error"] == "idempotency_store_unavailable"
    # Nobody sends that payment: the lookup undoes it first and says it does not exist.
    assert looked_up.status == 404, looked_up.json()
    assert left == 0
    assert state.requests == 1


# 8. Client hang-ups ----------------------------------------------------------------------------


async def test_a_client_that_hangs_up_mid_payment_gets_the_stored_answer_on_retry(
    gateway: Client, upstream: Upstream
) -> None:
    state, _ = upstream
    state.delay_s = 0.6
    impatient = aiohttp.ClientTimeout(total=0.2)
    async with aiohttp.ClientSession(timeout=impatient) as session:
        with pytest.raises(TimeoutError):
            async with session.post(gateway.make_url("/v1/pay"), json=payment("TXN-hangup")):
                pass

    async def completed() -> Any:
        found = (await get(gateway, "/v1/payments/TXN-hangup")).json()
        return found if found.get("state") == "SUCCESS" else None

    stored = await eventually(completed, "the abandoned payment to complete")
    retry = await pay(gateway, payment("TXN-hangup"))

    assert stored["status_code"] == 200
    assert retry.status == 200
    assert is_replay(retry)
    assert retry.json() == stored["response"]
    assert state.requests == 1


# 9. Lookup -------------------------------------------------------------------------------------


async def test_the_lookup_endpoint_shows_unknown_in_progress_and_completed_payments(
    gateway: Client, upstream: Upstream
) -> None:
    state, _ = upstream
    unknown = await get(gateway, "/v1/payments/TXN-look")
    assert unknown.status == 404
    assert unknown.json()["error"] == "not_found"

    state.delay_s = 0.4
    in_flight = asyncio.create_task(pay(gateway, payment("TXN-look")))
    await upstream_has_seen(state, 1)
    during = await get(gateway, "/v1/payments/TXN-look")
    answer = await in_flight
    after = await get(gateway, "/v1/payments/TXN-look")

    assert during.status == 200
    assert during.json()["state"] == "PROCESSING"
    assert after.status == 200
    described = after.json()
    assert described == {
        "transaction_id": "TXN-look",
        "provider": "CANON",
        "state": "SUCCESS",
        "provider_reference": answer.json()["provider_reference"],
        "amount": 20.0,
        "currency": "ZAR",
        "reason": None,
        "created_at": described["created_at"],
        "updated_at": described["updated_at"],
        "status_code": 200,
        "response": answer.json(),
    }
    assert described["created_at"] <= described["updated_at"]
    assert described["created_at"].endswith("Z")


async def test_a_payment_is_looked_up_by_its_transaction_id_not_by_its_header(
    gateway: Client, upstream: Upstream
) -> None:
    answer = await pay(gateway, payment("TXN-seek"), key="order-seek")

    by_transaction = await get(gateway, "/v1/payments/TXN-seek")
    by_header = await get(gateway, "/v1/payments/order-seek")

    assert by_transaction.json()["state"] == "SUCCESS"
    assert by_transaction.json()["response"] == answer.json()
    assert by_header.status == 404


# 10. Key hashing -------------------------------------------------------------------------------


async def test_redis_keys_are_the_prefix_and_a_sha256_of_the_clients_strings(
    upstream: Upstream, redis_url: str, redis_server: RedisServer
) -> None:
    odd_key = 'order 42 * [retry]?|x|"q" \\ #1 a/b 100%2F'
    odd_id = "TXN:42.a_b-c"
    async with running_gateway(config(upstream[1], redis_url, key_prefix="tenant-7:")) as client:
        assert (await pay(client, payment(odd_id), key=odd_key)).status == 200
        found = await get(client, f"/v1/payments/{quote(odd_id, safe='')}")

    keys = set(redis_server.client().keys("*"))
    sha = payment_sha(odd_id)
    shard = shard_for("tenant-7:", sha)
    assert keys == {
        shard.payment(sha),
        shard.counts,
        shard.tombstone(sha),
        binding_key(odd_key, prefix=b"tenant-7:"),
        # While records of the old form may exist: since when, and a guard under the old key.
        b"tenant-7:identity-by-transaction-id-since",
        b"tenant-7:lifecycle-since",
        redis_key(odd_key, prefix=b"tenant-7:"),
    }
    assert all(odd_key.encode() not in key and odd_id.encode() not in key for key in keys)
    assert found.json()["state"] == "SUCCESS"


# 11. Durability of the local stack's Redis -------------------------------------------------------


def dev_stack_redis(directory: pathlib.Path) -> list[str]:
    """`payagg dev`'s redis-server command line, on a free port and in `directory`."""
    options = DevOptions(config=pathlib.Path("config/gateway.yaml"), redis_port=free_port())
    redis_service = plan(options, directory)[0]
    assert redis_service.name == "redis"
    return redis_service.argv


def test_the_dev_stack_runs_redis_with_an_fsynced_append_only_file_and_no_eviction(
    tmp_path: pathlib.Path,
) -> None:
    argv = dev_stack_redis(tmp_path)
    options = dict(zip(argv[1::2], argv[2::2], strict=False))

    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "always"
    assert options["--maxmemory-policy"] == "noeviction"
    assert options["--dir"] == str(tmp_path)


def start_redis(argv: list[str]) -> ServiceProcess:
    process = ServiceProcess(argv)
    port = int(argv[argv.index("--port") + 1])
    client = redis_sync.Redis(port=port, socket_timeout=2)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis_sync.RedisError:
            return False

    wait_until(answers, what=f"redis-server on port {port}")
    return process


async def test_redis_killed_with_sigkill_and_restarted_on_its_directory_replays_every_payment(
    upstream: Upstream, tmp_path: pathlib.Path
) -> None:
    state, url = upstream
    argv = dev_stack_redis(tmp_path)
    redis_url = f"redis://127.0.0.1:{argv[argv.index('--port') + 1]}/0"
    transaction_ids = [f"TXN-durable-{n}" for n in range(20)]
    redis = start_redis(argv)
    try:
        # Every write is fsynced before Redis answers: on a loaded machine that can take longer
        # than the fail-fast bound the other tests use, and durability is the point here.
        durable = config(url, redis_url, redis_timeout_s=5)
        async with running_gateway(durable) as client:
            firsts = await asyncio.gather(*(pay(client, payment(t)) for t in transaction_ids))
            redis.signal(signal.SIGKILL)
            await asyncio.to_thread(redis.process.wait, 10)
            redis.stop()
            redis = await asyncio.to_thread(start_redis, argv)
            await ready_again(client)
            replays = [await pay(client, payment(t)) for t in transaction_ids]
    finally:
        redis.stop()

    assert [answer.status for answer in firsts] == [200] * len(transaction_ids)
    assert all(map(is_replay, replays)), [(r.status, r.body) for r in replays if not is_replay(r)]
    assert [r.body for r in replays] == [f.body for f in firsts]
    assert state.requests == len(transaction_ids)
