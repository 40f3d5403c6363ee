"""The store's Redis client (`proxy/store_client.py`, valkey-glide) against real redis-servers.

Every server here is started by the test that needs it (a password, a freeze, a replica or a
busy script would disturb the shared `redis_server` fixture). TLS goes through a TLS-terminating
relay in front of a plain server, since the bundled redis-server has no TLS; a plain relay whose
target can be switched plays an endpoint that a failover repoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
import trustme

from proxy.settings.config import RedisSettings
from proxy.store.client import RedisReplyError, RedisUnavailable, Script, StoreClient
from tests.conftest import RedisServer, StartRedis
from tests.processes import free_port, wait_until
from tests.redis_relay import Relay

TIMEOUT_S = 0.3
SET_KEY = Script("return redis.call('SET', KEYS[1], ARGV[1])")
GET_KEY = Script("return redis.call('GET', KEYS[1])")


@contextlib.asynccontextmanager
async def connected(url: str, **settings: Any) -> AsyncIterator[StoreClient]:
    settings.setdefault("timeout_s", TIMEOUT_S)
    client = StoreClient(RedisSettings(url=url, **settings))
    try:
        yield client
    finally:
        await client.close()


async def eventually_succeeds(
    client: StoreClient, script: Script, keys: list[str], args: list[Any]
) -> Any:
    """Run the script until it succeeds, up to a generous bound (the machine is shared)."""
    last: Exception | None = None
    for _ in range(300):
        try:
            return await client.run_script(script, keys, args)
        except RedisUnavailable as error:
            last = error
            await asyncio.sleep(0.05)
    raise AssertionError(f"never succeeded; last error: {last}")


# 1. Scripts and replies --------------------------------------------------------------------------


async def test_script_replies_come_back_as_bytes_integers_none_and_lists(
    redis_server: RedisServer, redis_url: str
) -> None:
    script = Script("return {KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1, false}")
    nothing = Script("return false")
    async with connected(redis_url) as client:
        assert await client.run_script(script, ["store:k"], [b"caf\xc3\xa9\x00\r\n", 41]) == [
            b"store:k",
            b"caf\xc3\xa9\x00\r\n",
            42,
            None,
        ]
        assert await client.run_script(nothing, ["store:k"], []) is None


async def test_a_script_runs_by_sha_and_again_after_the_server_forgot_it(
    redis_server: RedisServer, redis_url: str
) -> None:
    script = Script("return ARGV[1]")
    async with connected(redis_url) as client:
        assert await client.run_script(script, ["store:k"], ["first"]) == b"first"
        redis_server.client().script_flush()
        assert await client.run_script(script, ["store:k"], ["again"]) == b"again"


async def test_a_script_error_is_a_reply_error_not_an_outage(
    redis_server: RedisServer, redis_url: str
) -> None:
    script = Script("return redis.call('NOSUCHCOMMAND')")
    async with connected(redis_url) as client:
        with pytest.raises(RedisReplyError, match="Unknown Redis command"):
            await client.run_script(script, ["store:k"], [])
        assert await client.run_script(SET_KEY, ["store:k"], ["still usable"]) == "OK"


async def test_commands_issued_together_go_as_one_pipeline_each_with_its_own_reply_or_error(
    redis_server: RedisServer, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One glide call per event-loop iteration instead of one per command (its fixed cost is
    most of a replay's), a charged payment's durable write included; the replies are exactly
    those the commands get when sent alone."""
    script = Script("return {KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1, false}")
    failing = Script("return redis.call('NOSUCHCOMMAND')")

    async def together(client: StoreClient) -> list[Any]:
        return await asyncio.gather(
            client.run_script(script, ["store:k"], [b"caf\xc3\xa9", 41]),
            client.run_script(SET_KEY, ["store:together"], ["value"]),
            client.run_script(failing, ["store:k"], []),
            client.execute("GET", "store:together"),
            client.run_script(GET_KEY, ["store:missing"], []),
            client.run_script(SET_KEY, ["store:durable"], ["charged"], durable=True),
            return_exceptions=True,
        )

    async with connected(redis_url) as client:
        alone = [
            await client.run_script(script, ["store:k"], [b"caf\xc3\xa9", 41]),
            await client.run_script(SET_KEY, ["store:together"], ["value"]),
        ]
        with pytest.raises(RedisReplyError) as alone_error:
            await client.run_script(failing, ["store:k"], [])
        alone += [
            await client.execute("GET", "store:together"),
            await client.run_script(GET_KEY, ["store:missing"], []),
            await client.run_script(SET_KEY, ["store:durable"], ["charged"], durable=True),
        ]
        pipelines: list[int] = []
        glide = client._main._client
        assert glide is not None
        send_pipeline = glide.exec

        async def counted(batch: Any, raise_on_error: bool) -> Any:
            pipelines.append(len(batch.commands))
            return await send_pipeline(batch, raise_on_error=raise_on_error)

        monkeypatch.setattr(glide, "exec", counted)
        replies = await together(client)
        redis_server.client().script_flush()  # NOSCRIPT in the pipeline: sent again alone
        replies_after_flush = await together(client)

    assert pipelines == [6, 6]
    for answered in (replies, replies_after_flush):
        assert answered[:2] + answered[3:] == alone
        assert isinstance(answered[2], RedisReplyError)
        assert str(answered[2]) == str(alone_error.value)


async def test_five_thousand_scripts_in_flight_behind_a_stalled_redis_all_get_their_reply(
    start_redis: StartRedis,
) -> None:
    """glide refuses commands beyond 1,000 in flight by default, which a half-second stall under
    load reaches; the store also releases up to 10,000 unanswered claims at once."""
    server = start_redis()
    echo = Script("return ARGV[1]")
    async with connected(server.url, timeout_s=10) as client:
        await client.check_writable()
        server.signal(signal.SIGSTOP)
        asyncio.get_running_loop().call_later(0.5, server.signal, signal.SIGCONT)
        replies = await asyncio.gather(
            *(client.run_script(echo, [f"store:{i}"], [f"reply-{i}"]) for i in range(5000)),
            return_exceptions=True,
        )
    assert replies == [f"reply-{i}".encode() for i in range(5000)]


# 2. AUTH, SELECT, TLS ----------------------------------------------------------------------------


async def test_a_password_in_the_url_authenticates_and_the_path_selects_the_database(
    start_redis: StartRedis,
) -> None:
    server = start_redis("--requirepass", "s3cret", password="s3cret")
    async with connected(f"redis://:s3cret@127.0.0.1:{server.port}/3") as client:
        assert await client.run_script(SET_KEY, ["store:db"], ["three"]) == "OK"

    assert server.client(db=3).get("store:db") == b"three"
    assert server.client(db=0).get("store:db") is None


async def test_an_acl_user_with_percent_encoded_credentials_authenticates(
    start_redis: StartRedis,
) -> None:
    server = start_redis("--requirepass", "s3cret", password="s3cret")
    server.client().acl_setuser(
        "pay@ments",
        enabled=True,
        passwords=["+p:ss/w@rd%"],
        keys=["store:*"],
        commands=["+@all"],
    )
    url = f"redis://pay%40ments:p%3Ass%2Fw%40rd%25@127.0.0.1:{server.port}/0"
    async with connected(url) as client:
        assert await client.run_script(SET_KEY, ["store:acl"], ["ok"]) == "OK"
        with pytest.raises(RedisReplyError, match=r"NOPERM|PermissionDenied"):
            await client.run_script(SET_KEY, ["elsewhere"], ["no"])
    assert server.client().get("store:acl") == b"ok"


@pytest.mark.parametrize(
    "credentials",
    [":wrong", "default:wrong", "nobody:s3cret"],
    ids=["wrong-password", "wrong-password-for-default-user", "unknown-user"],
)
async def test_wrong_credentials_are_redis_unavailable_naming_the_problem(
    start_redis: StartRedis, credentials: str
) -> None:
    server = start_redis("--requirepass", "s3cret", password="s3cret")
    async with connected(f"redis://{credentials}@127.0.0.1:{server.port}/3") as client:
        with pytest.raises(RedisUnavailable, match="authentication failed"):
            await client.check_writable()


@pytest.fixture(scope="module")
def certificate_authority() -> trustme.CA:
    return trustme.CA()


def tls_server_context(ca: trustme.CA, client_ca: trustme.CA | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    if client_ca is not None:
        client_ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def write_pem(path: Path, blob: trustme.Blob) -> str:
    blob.write_to_path(str(path))
    return str(path)


async def test_a_rediss_url_speaks_tls_verified_against_the_configured_authority(
    redis_server: RedisServer, redis_url: str, certificate_authority: trustme.CA, tmp_path: Path
) -> None:
    ca_file = write_pem(tmp_path / "ca.pem", certificate_authority.cert_pem)
    async with Relay(redis_server.port, tls_server_context(certificate_authority)) as relay:
        async with connected(relay.url, tls_ca_file=ca_file, timeout_s=2) as client:
            await client.check_writable()
            assert await client.run_script(SET_KEY, ["store:tls"], ["encrypted"]) == "OK"
        assert relay.accepted >= 1
    assert redis_server.client().get("store:tls") == b"encrypted"


async def test_a_certificate_from_another_authority_is_redis_unavailable(
    redis_server: RedisServer, redis_url: str, certificate_authority: trustme.CA, tmp_path: Path
) -> None:
    other_ca_file = write_pem(tmp_path / "other-ca.pem", trustme.CA().cert_pem)
    async with (
        Relay(redis_server.port, tls_server_context(certificate_authority)) as relay,
        connected(relay.url, tls_ca_file=other_ca_file, timeout_s=2) as client,
    ):
        with pytest.raises(RedisUnavailable):
            await client.check_writable()
    assert redis_server.client().get("payagg:readiness-probe") is None


async def test_a_client_certificate_is_presented_when_the_server_requires_one(
    redis_server: RedisServer, redis_url: str, certificate_authority: trustme.CA, tmp_path: Path
) -> None:
    client_ca = trustme.CA()
    issued = client_ca.issue_cert("payagg")
    files = {
        "tls_ca_file": write_pem(tmp_path / "ca.pem", certificate_authority.cert_pem),
        "tls_cert_file": write_pem(tmp_path / "client.pem", issued.cert_chain_pems[0]),
        "tls_key_file": write_pem(tmp_path / "client.key", issued.private_key_pem),
    }
    server_context = tls_server_context(certificate_authority, client_ca=client_ca)
    async with Relay(redis_server.port, server_context) as relay:
        async with connected(relay.url, timeout_s=2, **files) as client:
            assert await client.run_script(SET_KEY, ["store:mtls"], ["mutual"]) == "OK"
        without_certificate = {"tls_ca_file": files["tls_ca_file"]}
        async with connected(relay.url, timeout_s=2, **without_certificate) as client:
            with pytest.raises(RedisUnavailable):
                await client.run_script(SET_KEY, ["store:mtls"], ["refused"])
    assert redis_server.client().get("store:mtls") == b"mutual"


# 3. Outages --------------------------------------------------------------------------------------


async def test_a_refused_connection_is_redis_unavailable() -> None:
    async with connected(f"redis://127.0.0.1:{free_port()}/0", timeout_s=5) as client:
        with pytest.raises(RedisUnavailable):
            await client.run_script(SET_KEY, ["store:k"], ["v"])


async def test_a_frozen_redis_is_unavailable_and_used_again_once_thawed(
    start_redis: StartRedis,
) -> None:
    server = start_redis()
    async with connected(server.url) as client:
        assert await client.run_script(SET_KEY, ["store:k"], ["before"]) == "OK"
        server.signal(signal.SIGSTOP)
        try:
            results = await asyncio.gather(
                *(client.run_script(SET_KEY, [f"store:{i}"], ["v"]) for i in range(20)),
                return_exceptions=True,
            )
        finally:
            server.signal(signal.SIGCONT)
        assert all(isinstance(result, RedisUnavailable) for result in results), results
        assert "did not answer within 0.3s" in str(results[0])
        assert await eventually_succeeds(client, GET_KEY, ["store:k"], []) == b"before"


async def test_one_commands_timeout_does_not_fail_the_commands_in_flight_after_it(
    start_redis: StartRedis,
) -> None:
    """The old client closed its one connection when a command timed out, failing every other
    command in flight: a charged payment's answer could be lost to another payment's timeout."""
    server = start_redis()
    async with connected(server.url, timeout_s=2.0) as client:
        await client.check_writable()
        server.signal(signal.SIGSTOP)
        try:
            first = asyncio.ensure_future(client.run_script(SET_KEY, ["store:first"], ["1"]))
            await asyncio.sleep(1.0)
            second = asyncio.ensure_future(client.run_script(SET_KEY, ["store:second"], ["2"]))
            with pytest.raises(RedisUnavailable, match="did not answer"):
                await first
        finally:
            server.signal(signal.SIGCONT)
        assert await second == "OK"
    assert server.client().get("store:second") == b"2"


async def test_redis_restarted_between_two_commands_is_reconnected_to(
    start_redis: StartRedis,
) -> None:
    server = start_redis()
    async with connected(server.url) as client:
        assert await client.run_script(SET_KEY, ["store:before"], ["1"]) == "OK"
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(server.start)
        assert await eventually_succeeds(client, SET_KEY, ["store:after"], ["2"]) == "OK"


async def test_a_durable_write_waits_out_a_short_outage_where_a_plain_one_fails_closed(
    start_redis: StartRedis,
) -> None:
    server = start_redis()
    async with connected(server.url, durable_retry_s=30) as client:
        await client.check_writable()
        server.signal(signal.SIGSTOP)
        thaw = threading.Timer(1.0, server.signal, [signal.SIGCONT])
        thaw.start()
        try:
            plain, durable = await asyncio.gather(
                client.run_script(SET_KEY, ["store:plain"], ["1"]),
                client.run_script(SET_KEY, ["store:durable"], ["1"], durable=True),
                return_exceptions=True,
            )
        finally:
            thaw.join()
        assert isinstance(plain, RedisUnavailable)
        assert durable == "OK"
    assert server.client().get("store:durable") == b"1"


# 4. Refusals: a demoted node, a busy or full server ---------------------------------------------


async def test_a_demoted_node_is_left_for_whatever_the_endpoint_names_now(
    start_redis: StartRedis,
) -> None:
    first = start_redis()
    second = start_redis()
    async with Relay(first.port) as endpoint, connected(endpoint.url) as client:
        assert await client.run_script(SET_KEY, ["store:k"], ["on-first"]) == "OK"
        # `second` becomes the primary and the endpoint names it; `first` is demoted to its
        # replica, and the client's open connection stays on `first`.
        first.client().replicaof("127.0.0.1", second.port)
        endpoint.target_port = second.port

        with pytest.raises(RedisUnavailable, match="replica"):
            await client.run_script(SET_KEY, ["store:k"], ["refused"])
        assert await eventually_succeeds(client, SET_KEY, ["store:k"], ["on-second"]) == "OK"
    assert second.client().get("store:k") == b"on-second"


async def test_readiness_needs_a_write_a_replica_fails_it_with_the_reason(
    start_redis: StartRedis,
) -> None:
    primary = start_redis()
    replica = start_redis("--replicaof", "127.0.0.1", str(primary.port))
    async with connected(primary.url) as client:
        await client.check_writable()
    async with connected(replica.url) as client:
        assert replica.client().ping()  # PING alone would call it ready
        with pytest.raises(RedisUnavailable, match="replica"):
            await client.check_writable()


async def test_a_full_redis_fails_readiness_and_scripts_with_oom(start_redis: StartRedis) -> None:
    server = start_redis("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    server.client().execute_command("DEBUG", "POPULATE", "30000", "filler", "100")
    async with connected(server.url) as client:
        with pytest.raises(RedisUnavailable, match="OOM"):
            await client.check_writable()
        server.client().flushall()
        assert await eventually_succeeds(client, SET_KEY, ["store:k"], ["room"]) == "OK"


async def test_a_busy_redis_is_backed_off_from_then_used_again(start_redis: StartRedis) -> None:
    server = start_redis("--lua-time-limit", "50")
    async with connected(server.url, timeout_s=1.0) as client:
        await client.check_writable()
        busy = server.busy_for(2)
        try:
            await asyncio.to_thread(
                wait_until, lambda: _answers_busy(server), 10, "the script to make Redis BUSY"
            )
            with pytest.raises(RedisUnavailable, match="BUSY"):
                await client.run_script(SET_KEY, ["store:k"], ["v"])
            # The next call does not reach Redis at all: it fails closed at once.
            with pytest.raises(RedisUnavailable, match=r"backing off after: .*BUSY"):
                await client.run_script(SET_KEY, ["store:k"], ["v"])
        finally:
            await asyncio.to_thread(busy.join)
        assert await eventually_succeeds(client, SET_KEY, ["store:k"], ["after"]) == "OK"


def _answers_busy(server: RedisServer) -> bool:
    try:
        server.client().ping()
    except redis_sync.BusyLoadingError:
        return False
    except redis_sync.ResponseError as error:
        return "BUSY" in str(error)
    return False


# 4b. Looking for keys under a prefix ------------------------------------------------------------


async def test_looking_for_keys_under_a_prefix_reads_its_pattern_characters_literally(
    redis_server: RedisServer, redis_url: str
) -> None:
    redis_server.client().set("tenantX1:record", "1")
    async with connected(redis_url) as client:
        found = {
            prefix: await client.holds_keys(prefix)
            for prefix in (b"tenant?1:", b"tenant[X]1:", b"tenant*", b"tenant\\X", b"tenantX1:")
        }
    assert found == {
        b"tenant?1:": False,
        b"tenant[X]1:": False,
        b"tenant*": False,
        b"tenant\\X": False,
        b"tenantX1:": True,
    }


async def test_a_user_refused_scan_is_told_keys_may_be_there(
    start_redis: StartRedis, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_redis()
    server.client().execute_command(
        "ACL", "SETUSER", "noscan", "on", ">s3cret", "~*", "&*", "+@all", "-scan"
    )
    url = f"redis://noscan:s3cret@127.0.0.1:{server.port}/0"
    async with connected(url) as client:
        with caplog.at_level(logging.WARNING, logger="payagg.redis"):
            assert await client.holds_keys(b"payagg:")
    assert "cannot look for keys under" in caplog.text


# 5. WAIT for replicas ----------------------------------------------------------------------------


async def test_with_wait_replicas_a_durable_write_returns_once_a_replica_holds_it(
    start_redis: StartRedis, caplog: pytest.LogCaptureFixture
) -> None:
    primary = start_redis()
    replica = start_redis("--replicaof", "127.0.0.1", str(primary.port))
    await asyncio.to_thread(
        wait_until,
        lambda: replica.client().info("replication")["master_link_status"] == "up",
        15,
        "the replica to sync",
    )
    async with connected(primary.url, wait_replicas=1, timeout_s=2) as client:
        with caplog.at_level(logging.ERROR, "payagg.redis"):
            await client.run_script(SET_KEY, ["store:k"], ["replicated"], durable=True)
            assert replica.client().get("store:k") == b"replicated"
        assert caplog.records == []


async def test_with_wait_replicas_and_no_replica_the_write_is_logged_as_unreplicated(
    start_redis: StartRedis, caplog: pytest.LogCaptureFixture
) -> None:
    primary = start_redis()
    async with connected(primary.url, wait_replicas=1) as client:
        with caplog.at_level(logging.ERROR, "payagg.redis"):
            assert await client.run_script(SET_KEY, ["store:k"], ["v"], durable=True) == "OK"
    assert "on the primary only (0 of 1 replicas)" in caplog.text
