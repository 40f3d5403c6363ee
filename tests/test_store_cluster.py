"""`redis.mode: cluster` against a real 3-master Redis Cluster (the `redis_cluster` fixture):
payments spread over the masters, a slot migration mid-burst is followed (ASK, then MOVED), and
a killed master's replica takes over with no TransactionID charged twice."""

from __future__ import annotations

import asyncio
import secrets
import signal

from redis.crc import key_slot

from proxy.observability.metrics import GatewayMetrics
from proxy.payments.idempotency import IdempotencyStore
from proxy.settings.config import GatewayConfig, RedisSettings
from proxy.store.client import RedisUnavailable, StoreClient
from tests.conftest import running_gateway as gateway_on
from tests.payment_burst import Upstream, burst_against, config, in_thread, pay, until_readiness
from tests.redis_cluster import RedisCluster

CLUSTER = ", mode: cluster"


def store_of(gateway_config: GatewayConfig) -> IdempotencyStore:
    """A store that is never connected: for the Redis key it gives a TransactionID."""
    return IdempotencyStore(gateway_config.redis, gateway_config.idempotency, GatewayMetrics([]))


async def test_payments_in_cluster_mode_spread_over_every_master(
    redis_cluster: RedisCluster, upstream: Upstream
) -> None:
    url = redis_cluster.url_via(redis_cluster.masters()[0])
    async with gateway_on(config(upstream[1], url, CLUSTER)) as client:
        assert await until_readiness(client, 200) == ""
        answers = [await pay(client, f"spread-{number}") for number in range(30)]
    assert [status for status, _ in answers] == [200] * 30
    # Records carry their shard's hash tag: the 16 shards' slots lie on every master.
    holding = [node for node in redis_cluster.masters() if node.client().keys("{payagg:s*}pay:*")]
    assert len(holding) == 3


async def test_a_slot_migration_mid_burst_is_followed(
    redis_cluster: RedisCluster, upstream: Upstream
) -> None:
    source, target = redis_cluster.masters()[:2]
    url = redis_cluster.url_via(source)
    store = store_of(config(upstream[1], url, CLUSTER))
    moving = sorted(redis_cluster.slots_of(source))[:32]
    candidates = (f"migrate-{number}" for number in range(200_000))
    transaction_ids = [
        transaction_id
        for transaction_id in candidates
        if key_slot(store.redis_key(transaction_id)) in moving
    ][:80]
    async with burst_against(upstream, url, "migrate", CLUSTER, transaction_ids=transaction_ids):
        await in_thread(redis_cluster.migrate, moving, target)
    stored = [store.redis_key(transaction_id) for transaction_id in transaction_ids]
    # Every answer ended on the slots' new owner (EXISTS one key at a time: one slot each).
    assert [target.client().exists(key) for key in stored] == [1] * len(stored)


async def test_a_killed_master_is_replaced_by_its_replica_and_nothing_is_charged_twice(
    redis_cluster: RedisCluster, upstream: Upstream
) -> None:
    victim, survivor = redis_cluster.masters()[:2]
    heir = redis_cluster.replica_of(victim)
    # WAIT for one replica before answering 200: the replica that takes over holds every answer
    # a client saw, though the failover is not planned.
    durable = CLUSTER + ", wait_replicas: 1"
    try:
        async with burst_against(
            upstream,
            redis_cluster.url_via(survivor),
            "kill-master",
            durable,
            locks_may_be_lost=True,
        ) as (client, _):
            victim.signal(signal.SIGKILL)
            await in_thread(victim.stop)
            # Not ready while a third of the slots has no master (cluster_state:fail).
            await until_readiness(client, 503)
            await in_thread(redis_cluster.wait_until_promoted, heir)
    finally:
        if victim.process is None:
            await in_thread(victim.start)
        await in_thread(redis_cluster.wait_until_healthy)
    assert redis_cluster.role(victim) == "slave"  # it came back as the new master's replica


async def test_a_frozen_master_fails_only_the_commands_sent_to_it(
    redis_cluster: RedisCluster,
) -> None:
    """Commands of one event-loop iteration are pipelined on one node only: in a cluster, a
    batch's single timeout would fail the commands that went to a healthy master with it."""
    frozen, healthy = redis_cluster.masters()[:2]
    frozen_key = next(
        f"k{n}"
        for n in range(10_000)
        if key_slot(f"k{n}".encode()) in redis_cluster.slots_of(frozen)
    )
    healthy_key = next(
        f"k{n}"
        for n in range(10_000)
        if key_slot(f"k{n}".encode()) in redis_cluster.slots_of(healthy)
    )
    settings = RedisSettings(url=redis_cluster.url_via(healthy), mode="cluster", timeout_s=0.5)
    client = StoreClient(settings)
    try:
        await client.execute("SET", healthy_key, "before")
        await client.execute("SET", frozen_key, "before")
        frozen.signal(signal.SIGSTOP)
        try:
            to_frozen, to_healthy = await asyncio.gather(
                client.execute("GET", frozen_key),
                client.execute("GET", healthy_key),
                return_exceptions=True,
            )
        finally:
            frozen.signal(signal.SIGCONT)
    finally:
        await client.close()
    assert isinstance(to_frozen, RedisUnavailable)
    assert to_healthy == b"before"


async def test_keys_under_a_prefix_are_found_on_whichever_master_holds_them(
    redis_cluster: RedisCluster,
) -> None:
    """The look for keys of the versions before (at the lifecycle's first start) scans every
    master, not only the one the URL names."""
    named, other = redis_cluster.masters()[:2]
    prefix = f"scan-{secrets.token_hex(4)}:"
    key = next(
        f"{prefix}{n}"
        for n in range(10_000)
        if key_slot(f"{prefix}{n}".encode()) in redis_cluster.slots_of(other)
    )
    client = StoreClient(RedisSettings(url=redis_cluster.url_via(named), mode="cluster"))
    try:
        empty = await client.holds_keys(prefix.encode())
        other.client().set(key, "old")
        found = await client.holds_keys(prefix.encode())
    finally:
        await client.close()
        other.client().delete(key)
    assert (empty, found) == (False, True)
