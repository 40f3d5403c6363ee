"""Clients: API keys (401), providers a client may use (403), payments scoped per client (404 for
another client's, two payments for one TransactionID), rate limits (429), webhook targets, and the
open API (`auth: off`) exactly as before. In-process gateways on the real Redis and the canonical
upstream; tests/test_clients_processes.py checks the same across two real proxy processes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.payments.webhooks import SIGNATURE_HEADER, signature
from proxy.settings.config import ConfigError
from tests.canonical_upstream import UpstreamState
from tests.conftest import GatewayClient, gateway_yaml, make_config, payment, running_gateway

Upstream = tuple[UpstreamState, str]
KEYS = {"alpha": "alpha-key-3f9a0c1e7b", "beta": "beta-key-58d2e61a04", "gamma": "gamma-key-9c"}
REFERENCE_NAMESPACE = uuid.UUID("6f1d2b9e-5c3a-5d7e-9a41-7061796167ff")
WEBHOOK_SECRET = "client-webhook-secret-1"
GLOBAL_SECRET = "global-webhook-secret-1"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def bearer(client: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[client]}"}


def clients_yaml(
    upstream_url: str, redis_url: str, extra: str = "", beta_providers: str = "[CANON]"
):
    """CANON and OTHER (the same canonical upstream); alpha may use both, beta only CANON."""
    return gateway_yaml(
        upstream_url,
        redis_url,
        f"""\
  OTHER: {{url: "{upstream_url}", sync_wait_s: 0}}
auth: required
clients:
  - name: alpha
    key_sha256: ["{sha(KEYS["alpha"])}"]
    providers: [CANON, other]
    rate_per_s: 1000
    burst: 1000
  - name: beta
    key_sha256: ["{sha(KEYS["beta"])}"]
    providers: {beta_providers}
    rate_per_s: 1000
    burst: 1000
{extra}""",
    )


@asynccontextmanager
async def gateway_of(text: str) -> AsyncIterator[GatewayClient]:
    async with running_gateway(make_config(text)) as client:
        yield client


@pytest.fixture
async def clients(upstream: Upstream, redis_url: str) -> AsyncIterator[GatewayClient]:
    async with gateway_of(clients_yaml(upstream[1], redis_url)) as client:
        yield client


def counted(client: GatewayClient, outcome: str, who: str, provider: str = "unknown") -> float:
    labels = {"provider": provider, "outcome": outcome, "client": who}
    return client.gateway.metrics.registry.get_sample_value("payagg_requests_total", labels) or 0


# --- the configuration ------------------------------------------------------------------------

VALID_CLIENT = f"""\
  - name: shop
    key_sha256: ["{sha("k1")}"]
    providers: [CANON]
    rate_per_s: 5
    burst: 10
"""


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            f"auth: required\nclients:\n{VALID_CLIENT.replace(sha('k1'), sha('k1').upper())}",
            "11: clients.0.key_sha256.0: must be a SHA-256 as 64 lowercase hex digits (the key's"
            " hash, never the key), got 64 characters, not all lowercase hex",
        ),
        (
            f"auth: required\nclients:\n{VALID_CLIENT.replace(sha('k1'), 'k1')}",
            "11: clients.0.key_sha256.0: must be a SHA-256 as 64 lowercase hex digits (the key's"
            " hash, never the key), got 2 character(s)",
        ),
        (
            f"auth: required\nclients:\n{VALID_CLIENT}{VALID_CLIENT.replace('shop', 'shop2')}",
            "16: clients.1.key_sha256.0: the same key hash as client 'shop': one key, one client",
        ),
        (
            f"auth: required\nclients:\n{VALID_CLIENT}{VALID_CLIENT}",
            "15: clients.1.name: 'shop' is also client 0",
        ),
        (
            f"auth: required\nclients:\n{VALID_CLIENT.replace('[CANON]', '[CANON, NOPE]')}",
            "12: clients.0.providers.1: no provider named 'NOPE' is configured",
        ),
        (
            f"auth: required\nclients:\n{VALID_CLIENT.replace('shop', 'open')}",
            "10: clients.0.name: must be 1-32 lowercase letters",
        ),
        (
            f"auth: required\nclients:\n{VALID_CLIENT.replace('rate_per_s: 5', 'rate_per_s: 0')}",
            "13: clients.0.rate_per_s: must be > 0, got 0",
        ),
        (
            f"auth: required\nclients:\n{VALID_CLIENT.replace('burst', 'burts')}",
            "14: clients.0.burts: unknown key (did you mean 'burst'?)",
        ),
        (
            f"auth: required\nclients:\n{VALID_CLIENT.replace(sha('k1'), '')}",
            "11: clients.0.key_sha256: no key hash: with `auth: required` a client needs one",
        ),
        ("auth: required\n", "8: auth: `required` needs at least one entry in `clients:`"),
        ("auth: maybe\n", "8: auth: input should be 'required' or 'off'"),
        (
            "server: {environment: production}\nauth: off\n",
            "9: auth: must be `required` when server.environment is production",
        ),
        (
            f"auth: required\nclients:\n{VALID_CLIENT}    webhook: {{url: ftp://x, secret: s}}\n",
            "15: clients.0.webhook.secret: must be at least 16 characters, got 1",
        ),
        (
            f"auth: required\nclients:\n{VALID_CLIENT}    owns_open_payments: true\n"
            f"{VALID_CLIENT.replace('shop', 'shop2').replace(sha('k1'), sha('k2'))}"
            "    owns_open_payments: true\n",
            "21: clients.1.owns_open_payments: client 0 owns the open API's payments already",
        ),
    ],
    ids=[
        "an upper-case hash",
        "a key instead of its hash",
        "one hash for two clients",
        "two clients of one name",
        "a provider that does not exist",
        "a name that is a reserved label",
        "a rate of zero",
        "a misspelt key",
        "no key hash under auth required",
        "auth required without clients",
        "an auth mode that does not exist",
        "auth off in production",
        "a webhook secret too short",
        "two owners of the open payments",
    ],
)
def test_a_bad_clients_section_is_refused_at_start_up_naming_the_line_and_key(
    text: str, error: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        make_config(gateway_yaml("http://127.0.0.1:1/pay", "redis://127.0.0.1:1/0", text))
    assert any(error in problem for problem in refused.value.problems), refused.value.problems


def test_every_problem_of_the_clients_is_reported_at_once_with_those_of_other_sections() -> None:
    text = gateway_yaml(
        "http://127.0.0.1:1/pay",
        "redis://127.0.0.1:1/0",
        "server: {environment: production, port: 0}\nauth: required\nclients:\n"
        + VALID_CLIENT.replace("[CANON]", "[NOPE]").replace(sha("k1"), "zz"),
    )
    with pytest.raises(ConfigError) as refused:
        make_config(text)
    assert [problem.split(": ", 2)[1] for problem in refused.value.problems] == [
        "server.port",
        "clients.0.key_sha256.0",
        "clients.0.providers.0",
    ]


def test_one_entry_may_hold_two_hashes_while_a_key_is_rotated() -> None:
    entry = f"{sha('old-key')}, {sha('new-key')}"
    config = make_config(
        gateway_yaml(
            "http://127.0.0.1:1/pay",
            "redis://127.0.0.1:1/0",
            f"auth: required\nclients:\n{VALID_CLIENT.replace(sha('k1'), entry)}",
        )
    )
    assert config.clients[0].key_hashes == (sha("old-key"), sha("new-key"))


def test_no_key_appears_in_the_config_only_hashes_and_the_shipped_file_starts_open() -> None:
    shipped = make_config(Path("config/gateway.yaml").read_text(encoding="utf-8"))
    assert shipped.auth == "off"
    assert shipped.server.environment == "development"
    assert [client.name for client in shipped.clients] == ["merchant"]


# --- 401, 403, 404: who may do what ---------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-a-known-key"},
        {"Authorization": f"Basic {KEYS['alpha']}"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Bearer {sha(KEYS['alpha'])}"},
    ],
    ids=["no header", "an unknown key", "another scheme", "an empty key", "the hash itself"],
)
async def test_a_request_without_a_known_key_is_401_and_reaches_nothing(
    clients: GatewayClient, upstream: Upstream, headers: dict[str, str]
) -> None:
    answer = await clients.post("/v1/pay", json=payment("TXN-anon"), headers=headers)
    assert answer.status == 401
    assert (await answer.json())["error"] == "unauthorized"
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    lookup = await clients.get("/v1/payments/TXN-anon", headers=headers)
    assert lookup.status == 401
    assert upstream[0].requests == 0
    assert counted(clients, "unauthorized", "unknown") == 1


async def test_authentication_comes_before_reading_the_body(clients: GatewayClient) -> None:
    answer = await clients.post("/v1/pay", data=b"not json", headers={"Content-Type": "text/x"})
    assert answer.status == 401
    authenticated = await clients.post(
        "/v1/pay", data=b"not json", headers={"Content-Type": "text/x", **bearer("alpha")}
    )
    assert authenticated.status == 415


async def test_a_provider_the_client_may_not_use_is_403_and_never_called(
    clients: GatewayClient, upstream: Upstream
) -> None:
    answer = await clients.post(
        "/v1/pay", json=payment("TXN-f", ProviderKey="OTHER"), headers=bearer("beta")
    )
    assert answer.status == 403
    assert (await answer.json())["error"] == "forbidden"
    assert upstream[0].requests == 0
    assert counted(clients, "forbidden", "beta", provider="OTHER") == 1
    allowed = await clients.post(
        "/v1/pay", json=payment("TXN-f", ProviderKey="other"), headers=bearer("alpha")
    )
    assert allowed.status == 200
    assert counted(clients, "success", "alpha", provider="OTHER") == 1


async def test_a_payment_made_while_allowed_is_replayed_not_403_after_the_provider_is_removed(
    upstream: Upstream, redis_url: str
) -> None:
    async with gateway_of(
        clients_yaml(upstream[1], redis_url, beta_providers="[CANON, OTHER]")
    ) as g:
        body = payment("TXN-before", ProviderKey="OTHER")
        first = await g.post("/v1/pay", json=body, headers=bearer("beta"))
        assert first.status == 200
        first_body = await first.read()
    async with gateway_of(clients_yaml(upstream[1], redis_url)) as g:
        again = await g.post("/v1/pay", json=body, headers=bearer("beta"))
        assert again.status == 200
        assert again.headers["Idempotent-Replayed"] == "true"
        assert await again.read() == first_body
        new = await g.post(
            "/v1/pay", json=payment("TXN-new", ProviderKey="OTHER"), headers=bearer("beta")
        )
        assert new.status == 403
    assert upstream[0].requests == 1


async def test_one_transaction_id_from_two_clients_is_two_payments_with_two_references(
    clients: GatewayClient, upstream: Upstream
) -> None:
    alpha = await clients.post("/v1/pay", json=payment("TXN-both"), headers=bearer("alpha"))
    beta = await clients.post("/v1/pay", json=payment("TXN-both"), headers=bearer("beta"))
    assert (alpha.status, beta.status) == (200, 200)
    assert "Idempotent-Replayed" not in beta.headers
    assert upstream[0].requests == 2
    references = upstream[0].references
    assert len(set(references)) == 2
    assert references == [
        str(uuid.uuid5(REFERENCE_NAMESPACE, f"CANON\x00{client}\x00TXN-both"))
        for client in ("alpha", "beta")
    ]
    seen = {
        who: await (await clients.get("/v1/payments/TXN-both", headers=bearer(who))).json()
        for who in ("alpha", "beta")
    }
    assert seen["alpha"]["provider_reference"] != seen["beta"]["provider_reference"]
    record = await clients.gateway.store.find("TXN-both", "alpha")
    assert record is not None
    assert record.facts["client"] == "alpha"


async def test_another_clients_payment_is_404_as_if_it_did_not_exist(
    clients: GatewayClient,
) -> None:
    made = await clients.post("/v1/pay", json=payment("TXN-mine"), headers=bearer("alpha"))
    assert made.status == 200
    mine = await clients.get("/v1/payments/TXN-mine", headers=bearer("alpha"))
    assert mine.status == 200
    theirs = await clients.get("/v1/payments/TXN-mine", headers=bearer("beta"))
    nobody = await clients.get("/v1/payments/TXN-nobody", headers=bearer("beta"))
    assert (theirs.status, nobody.status) == (404, 404)
    assert await theirs.json() == await nobody.json()


async def test_an_idempotency_key_is_bound_within_its_client(
    clients: GatewayClient, upstream: Upstream
) -> None:
    header = {"Idempotency-Key": "order-77"}
    alpha = await clients.post(
        "/v1/pay", json=payment("TXN-a77"), headers={**header, **bearer("alpha")}
    )
    beta = await clients.post(
        "/v1/pay", json=payment("TXN-b77"), headers={**header, **bearer("beta")}
    )
    assert (alpha.status, beta.status) == (200, 200)
    reused = await clients.post(
        "/v1/pay", json=payment("TXN-other"), headers={**header, **bearer("beta")}
    )
    assert reused.status == 422
    assert upstream[0].requests == 2


# --- the open API (`auth: off`) is what it was ------------------------------------------------


async def test_an_open_payment_keeps_its_reference_and_record_and_the_owning_client_replays_it(
    upstream: Upstream, redis_url: str, redis_server: Any
) -> None:
    """Formula and key written out here, independently of the code: a change to either would
    give a live payment made before clients a second reference (a second charge)."""
    expected = str(uuid.uuid5(REFERENCE_NAMESPACE, "CANON\x00TXN-legacy"))
    async with gateway_of(gateway_yaml(upstream[1], redis_url)) as open_api:
        made = await open_api.post("/v1/pay", json=payment("TXN-legacy"))
        assert made.status == 200
        made_body = await made.read()
        assert counted(open_api, "success", "open", provider="CANON") == 1
    assert upstream[0].references == [expected]
    record_sha = hashlib.sha256(b"\x00TXN-legacy").hexdigest()
    shard = int(record_sha[:8], 16) % 16
    stored = redis_sync.Redis.from_url(redis_url).get(f"{{payagg:s{shard:02d}}}pay:{record_sha}")
    assert stored is not None
    assert expected.encode() in stored
    assert b'"client"' not in stored, "an open-API record is written as before clients"
    owner = "    owns_open_payments: true\n"
    text = clients_yaml(upstream[1], redis_url).replace(
        "    burst: 1000\n", f"    burst: 1000\n{owner}", 1
    )
    async with gateway_of(text) as with_clients:
        again = await with_clients.post(
            "/v1/pay", json=payment("TXN-legacy"), headers=bearer("alpha")
        )
        assert again.status == 200
        assert again.headers["Idempotent-Replayed"] == "true"
        assert await again.read() == made_body
        found = await with_clients.get("/v1/payments/TXN-legacy", headers=bearer("alpha"))
        assert (await found.json())["provider_reference"] == f"up-{expected}"
        other = await with_clients.get("/v1/payments/TXN-legacy", headers=bearer("beta"))
        assert other.status == 404
    assert upstream[0].requests == 1


# --- 429: rate limits -------------------------------------------------------------------------


async def test_over_the_burst_is_429_with_retry_after_calling_nothing_and_taking_no_lock(
    upstream: Upstream, redis_url: str
) -> None:
    text = clients_yaml(upstream[1], redis_url).replace(
        "rate_per_s: 1000\n    burst: 1000", "rate_per_s: 0.1\n    burst: 2", 1
    )
    async with gateway_of(text) as g:
        answers = [
            await g.post("/v1/pay", json=payment(f"TXN-r{i}"), headers=bearer("alpha"))
            for i in range(3)
        ]
        assert [answer.status for answer in answers] == [200, 200, 429]
        limited = answers[2]
        assert (await limited.json())["error"] == "rate_limited"
        assert 1 <= int(limited.headers["Retry-After"]) <= 10
        assert upstream[0].requests == 2
        assert await g.gateway.store.find("TXN-r2", "alpha") is None, "a lock was taken"
        # Others are not limited by alpha's rate; lookups are never limited.
        other = await g.post("/v1/pay", json=payment("TXN-r2"), headers=bearer("beta"))
        assert other.status == 200
        lookup = await g.get("/v1/payments/TXN-r0", headers=bearer("alpha"))
        assert lookup.status == 200
        assert counted(g, "rate_limited", "alpha") == 1


async def test_the_rate_limit_fails_closed_when_redis_does_not_answer(upstream: Upstream) -> None:
    text = clients_yaml(upstream[1], "redis://127.0.0.1:1/0")
    async with gateway_of(text) as g:
        answer = await g.post("/v1/pay", json=payment("TXN-down"), headers=bearer("alpha"))
        assert answer.status == 503
        assert (await answer.json())["error"] == "idempotency_store_unavailable"
    assert upstream[0].requests == 0


# --- webhooks to each client's own target -----------------------------------------------------


@asynccontextmanager
async def receiver() -> AsyncIterator[tuple[str, list[tuple[dict[str, Any], str, bytes]]]]:
    received: list[tuple[dict[str, Any], str, bytes]] = []

    async def take(request: web.Request) -> web.Response:
        body = await request.read()
        received.append((json.loads(body), request.headers[SIGNATURE_HEADER], body))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hooks", take)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/hooks")), received
    finally:
        await server.close()


async def test_a_clients_webhook_goes_to_its_own_target_and_the_others_to_webhooks_url(
    upstream: Upstream, redis_url: str
) -> None:
    async with receiver() as (own_url, own), receiver() as (global_url, shared):
        hook = f"    webhook: {{url: '{own_url}', secret: {WEBHOOK_SECRET}}}\n"
        text = clients_yaml(
            upstream[1], redis_url, f"webhooks: {{url: '{global_url}', secret: {GLOBAL_SECRET}}}\n"
        ).replace("    burst: 1000\n", f"    burst: 1000\n{hook}", 1)
        async with gateway_of(text) as g:
            for who in ("alpha", "beta"):
                answer = await g.post("/v1/pay", json=payment("TXN-hook"), headers=bearer(who))
                assert answer.status == 200
            async with asyncio.timeout(20):
                while not (own and shared):  # noqa: ASYNC110 (deliveries poll every second)
                    await asyncio.sleep(0.05)
    ((body, signed, raw),) = own
    assert body["transaction_id"] == "TXN-hook"
    timestamp = int(signed.split(",")[0][2:])
    assert signed == signature(WEBHOOK_SECRET, timestamp, raw)
    ((other, other_signed, other_raw),) = shared
    assert other["provider_reference"] != body["provider_reference"]
    assert other_signed == signature(GLOBAL_SECRET, int(other_signed.split(",")[0][2:]), other_raw)


async def test_a_payment_settled_by_the_reconciler_keeps_its_client_and_its_webhook_target(
    upstream: Upstream, redis_url: str
) -> None:
    upstream[0].pending_polls = 1  # PENDING at first, SUCCESS at the second status query
    async with receiver() as (own_url, own):
        hook = f"    webhook: {{url: '{own_url}', secret: {WEBHOOK_SECRET}}}\n"
        text = clients_yaml(upstream[1], redis_url).replace(
            "    burst: 1000\n", f"    burst: 1000\n{hook}", 1
        )
        async with gateway_of(text) as g:
            body = payment("TXN-later", ProviderKey="OTHER")
            answer = await g.post("/v1/pay", json=body, headers=bearer("alpha"))
            assert answer.status == 202
            async with asyncio.timeout(20):
                while not own:  # noqa: ASYNC110 (the reconciler and deliveries poll)
                    await asyncio.sleep(0.05)
            record = await g.gateway.store.find("TXN-later", "alpha")
    assert record is not None
    assert (record.name, record.facts["client"]) == ("SUCCESS", "alpha")
    ((delivered, _, _),) = own
    assert (delivered["transaction_id"], delivered["state"]) == ("TXN-later", "SUCCESS")
