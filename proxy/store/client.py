"""The idempotency store's Redis client: valkey-glide, its failures sorted into two errors.

valkey-glide (the Valkey project's client, a Rust core behind a thin Python layer) keeps one
multiplexed connection per node, follows Redis Cluster's MOVED/ASK and bounds each command by
its own timeout without failing the others in flight. What it leaves to us, each measured
against real redis-server processes (tests/test_store_failover.py):
- a node demoted by a failover answers every write READONLY and glide stays on it: the client is
  rebuilt, so its new connections follow the endpoint to the new primary;
- LOADING, BUSY, OOM, MASTERDOWN, CLUSTERDOWN and TRYAGAIN are Redis refusing, not failing: calls
  fail closed without being sent for a short, growing back-off instead of piling onto a node
  that cannot take them;
- a charged payment's answer must not be lost to a failover's few seconds: `durable` writes are
  retried for `redis.durable_retry_s`, and replicated with WAIT when `redis.wait_replicas` is set;
- a glide call's cost is mostly fixed: with one node, the commands of one event-loop iteration
  go as one non-atomic pipeline (its one timeout is shared by commands that share a connection
  anyway); in a cluster each goes alone.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from glide import (
    AdvancedGlideClientConfiguration,
    AdvancedGlideClusterClientConfiguration,
    Batch,
    ClusterScanCursor,
    GlideClient,
    GlideClientConfiguration,
    GlideClusterClient,
    GlideClusterClientConfiguration,
    GlideError,
    Logger,
    LogLevel,
    NodeAddress,
    ProtocolVersion,
    RequestError,
    ServerCredentials,
    SlotKeyRoute,
    SlotType,
    TlsAdvancedConfiguration,
)
from glide import Script as GlideScript
from glide import TimeoutError as GlideTimeout

from proxy.settings.config import RedisSettings

__all__ = ["RedisReplyError", "RedisUnavailable", "Script", "StoreClient"]

log = logging.getLogger("payagg.redis")

# glide writes its own log lines to stderr; payagg logs every store failure itself, as JSON.
Logger.set_logger_config(LogLevel.OFF)

Argument: TypeAlias = bytes | str | int
Glide: TypeAlias = GlideClient | GlideClusterClient

# A node that is a replica now. Inside a script Redis reports it as "-READONLY ...", on a plain
# command glide renders it as "ReadOnly: ..."; glide refuses to connect to a lone replica.
_DEMOTED = re.compile(r"READONLY|ReadOnly|No primary node found")
# Redis refusing a command it did not run: the node is starting, stuck in a script, full, or
# its cluster is not serving. Checked after _DEMOTED.
_REFUSED = re.compile(
    r"\b(LOADING|BusyLoading|BUSY|OOM|MASTERDOWN|MasterDown|CLUSTERDOWN|ClusterDown|TRYAGAIN|TryAgain)"
)
# A pipelined EVALSHA of a script the server does not hold (restarted, SCRIPT FLUSH).
_NO_SCRIPT = re.compile(r"NOSCRIPT|NoScript")
# A script that ran and raised, or a user without the rights: a bug or a misconfiguration, which
# no retry mends.
_NOT_AN_OUTAGE = re.compile(r"Error (running|compiling) script|NOPERM|PermissionDenied")

_MAX_IN_FLIGHT = 20_000
# Commands issued in one event-loop iteration go to glide as one pipeline of at most this many:
# a glide call costs ~30 µs of CPU whatever it carries (the FFI call, the wake-up of its Rust
# core, the answer's trip back through a pipe), a command in a pipeline ~5 µs (BENCHMARKS.md).
_MAX_PIPELINE = 256
# Characters SCAN's MATCH reads as a pattern, escaped in a key prefix.
_GLOB_SPECIAL = re.compile(rb"([][*?\\])")
# `holds_keys`: keys looked at per SCAN step, and steps at most (a million keys).
_SCAN_COUNT = 1000
_SCAN_STEPS = 1000
_FIRST_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 1.0


class RedisUnavailable(Exception):
    """Redis unreachable, too slow, or refusing writes: the command may or may not have run."""


class RedisReplyError(Exception):
    """Redis ran the command and answered with an error (a script's bug, not an outage)."""


class Script:
    """A Lua script, run by its SHA and sent whole once when the server lacks it."""

    def __init__(self, source: str) -> None:
        self.glide = GlideScript(source)  # type: ignore[no-untyped-call]
        self.sha: str = self.glide.get_hash()


class StoreClient:
    """Scripts and readiness checks on a lazily built glide client (standalone or cluster; a
    second one for durable writes when they WAIT for replicas)."""

    def __init__(self, settings: RedisSettings) -> None:
        self._settings = settings
        self._main = _GlideConnection(settings)
        # WAIT blocks the connection it is sent on until the replicas answer: a second connection
        # keeps claims and lookups from queueing behind it while a replica is slow.
        self._durable = _GlideConnection(settings) if settings.wait_replicas else self._main
        self._probe_key = settings.key_prefix + "readiness-probe"
        self._replicas_missing_until = 0.0

    async def run_script(
        self,
        script: Script,
        keys: Sequence[Argument],
        args: Sequence[Argument],
        *,
        durable: bool = False,
    ) -> Any:
        """Run a script by SHA (sent whole once when the server lacks it); raises RedisUnavailable
        or RedisReplyError.

        `durable`: the script writes the record of a payment the provider has charged. It is
        retried while Redis cannot take it (so it must be safe to run twice: compare-and-set),
        and with `redis.wait_replicas` it returns only once that many replicas hold it.
        """
        key_list = [_encode(key) for key in keys]
        arg_list = [_encode(arg) for arg in args]

        def call(client: Glide) -> Awaitable[Any]:
            return client.invoke_script(script.glide, keys=key_list, args=arg_list)

        # In a pipeline by SHA; a server that lacks the script gets it whole through `call`.
        evalsha = ["EVALSHA", script.sha, str(len(key_list)), *key_list, *arg_list]
        if not durable:
            return await self._main.pipelined(evalsha, call)
        reply = await self._durably(evalsha, call)
        if self._settings.wait_replicas and key_list:
            await self._replicate(key_list[0])
        return reply

    async def execute(self, *command: Argument) -> Any:
        """One plain command (`GET`, `SET ... NX`) on a single key; glide routes it by that key in
        cluster mode. Raises RedisUnavailable or RedisReplyError."""
        parts = [_encode(part) for part in command]
        return await self._main.pipelined(parts, lambda client: client.custom_command(parts))

    async def holds_keys(self, prefix: bytes) -> bool:
        """Whether any key starts with `prefix`, on any node; True also when that cannot be
        ruled out: Redis refuses SCAN, or more than `_SCAN_STEPS` steps would be needed.

        SCAN, not KEYS: it never blocks the server, whatever the keyspace's size.
        """
        pattern = _GLOB_SPECIAL.sub(rb"\\\1", prefix) + b"*"

        async def scan(client: Glide) -> bool:
            cluster = isinstance(client, GlideClusterClient)
            cursor: Any = ClusterScanCursor() if cluster else b"0"  # type: ignore[no-untyped-call]
            for _ in range(_SCAN_STEPS):
                cursor, keys = await client.scan(cursor, match=pattern, count=_SCAN_COUNT)
                if keys:
                    return True
                if cursor.is_finished() if cluster else cursor == b"0":
                    return False
            return True

        try:
            return bool(await self._main.run(scan))
        except RedisReplyError as refused:
            log.warning("cannot look for keys under %r (%s): taken as some", prefix, refused)
            return True

    async def check_writable(self) -> None:
        """Raises RedisUnavailable, saying why, unless a write would succeed now (readiness).

        A PING is answered by a demoted, full or loading node alike; a write is not.
        """
        await self._main.run(
            lambda client: client.custom_command(["SET", self._probe_key, "1", "PX", "60000"])
        )
        if self._settings.mode == "cluster":
            info = await self._main.run(lambda client: client.custom_command(["CLUSTER", "INFO"]))
            if b"cluster_state:ok" not in _first_node_reply(info):
                raise RedisUnavailable("the Redis cluster is down (cluster_state is not ok)")

    async def close(self) -> None:
        await self._main.close()
        if self._durable is not self._main:
            await self._durable.close()

    async def _durably(
        self, command: list[bytes | str], call: Callable[[Glide], Awaitable[Any]]
    ) -> Any:
        deadline = time.monotonic() + self._settings.durable_retry_s
        pause_s = _FIRST_BACKOFF_S
        while True:
            try:
                return await self._durable.pipelined(command, call)
            except RedisUnavailable:
                if time.monotonic() + pause_s > deadline:
                    raise
            await asyncio.sleep(pause_s)
            pause_s = min(pause_s * 2, _MAX_BACKOFF_S)

    async def _replicate(self, key: bytes | str) -> None:
        """WAIT for `redis.wait_replicas`; never raises: the write itself has succeeded."""
        wanted = self._settings.wait_replicas
        if time.monotonic() < self._replicas_missing_until:
            acknowledged: Any = "no WAIT: replicas were missing a moment ago"
        else:
            acknowledged = await self._wait_for_replicas(key, wanted)
        if isinstance(acknowledged, int) and acknowledged >= wanted:
            return
        # WAIT holds its connection (and every answer queued behind it) for its whole timeout
        # while a replica is missing; once one came back short, the next ones skip it a while.
        self._replicas_missing_until = time.monotonic() + _MAX_BACKOFF_S
        log.error(
            "a charged payment's answer is on the primary only (%s of %d replicas): a failover "
            "now could lose it (key %s)",
            acknowledged,
            wanted,
            _text(key),
        )

    async def _wait_for_replicas(self, key: bytes | str, wanted: int) -> int | str:
        # Half the command timeout: the answer (how many replicas made it) must come back
        # before glide gives up on the command.
        wait = ["WAIT", str(wanted), str(max(1, int(self._settings.timeout_s * 500)))]
        route = SlotKeyRoute(SlotType.PRIMARY, _text(key))

        def on_the_keys_primary(client: Glide) -> Awaitable[Any]:
            # In a cluster, WAIT counts the replicas of the node that took the write.
            if isinstance(client, GlideClusterClient):
                return client.custom_command(wait, route)
            return client.custom_command(wait)

        try:
            return int(await self._durable.run(on_the_keys_primary))
        except (RedisUnavailable, RedisReplyError) as error:
            return f"WAIT failed: {error}"


class _GlideConnection:
    """One glide client: built on first use, rebuilt after a demotion, backed off on refusals."""

    def __init__(self, settings: RedisSettings) -> None:
        self._settings = settings
        self._client: Glide | None = None
        self._creating: asyncio.Future[Glide] | None = None
        self._refusing_until = 0.0
        self._refusal = ""
        self._backoff_s = _FIRST_BACKOFF_S
        self._cluster = settings.mode == "cluster"
        self._queued: list[_Queued] = []
        self._sending: set[asyncio.Task[None]] = set()  # kept from the GC until they end

    async def run(self, call: Callable[[Glide], Awaitable[Any]]) -> Any:
        if self._refusing_until and time.monotonic() < self._refusing_until:
            raise RedisUnavailable(f"backing off after: {self._refusal}")
        client = self._client or await self._create()
        try:
            reply = await call(client)
        except GlideError as error:
            raise await self._failure(client, error) from error
        self._answered()
        return reply

    async def pipelined(
        self, command: list[bytes | str], call: Callable[[Glide], Awaitable[Any]]
    ) -> Any:
        """`call(client)`, sent with the other commands of this event-loop iteration as one
        glide pipeline (`command` is its form there); each command keeps its own reply or
        error, as if sent alone. An EVALSHA the server cannot run (NOSCRIPT) is sent alone.

        Standalone only: a batch has one timeout, and in a cluster one unresponsive node would
        fail the commands that went to healthy ones with it. On one node the commands of a
        batch share a connection, so they share its stalls anyway.
        """
        if self._cluster:
            return await self.run(call)
        if self._refusing_until and time.monotonic() < self._refusing_until:
            raise RedisUnavailable(f"backing off after: {self._refusal}")
        loop = asyncio.get_running_loop()
        queued = _Queued(command, call, loop.create_future())
        self._queued.append(queued)
        if len(self._queued) == 1:
            loop.call_soon(self._send_queued, loop)
        client, reply = await queued.answer
        if isinstance(reply, GlideError):
            if isinstance(reply, RequestError) and _NO_SCRIPT.search(str(reply)):
                return await self.run(call)
            raise await self._failure(client, reply) from reply
        self._answered()
        return reply

    def _answered(self) -> None:
        self._refusing_until = 0.0
        self._backoff_s = _FIRST_BACKOFF_S

    def _send_queued(self, loop: asyncio.AbstractEventLoop) -> None:
        queued, self._queued = self._queued, []
        for start in range(0, len(queued), _MAX_PIPELINE):
            task = loop.create_task(self._send(queued[start : start + _MAX_PIPELINE]))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, queued: list[_Queued]) -> None:
        failure: BaseException | None = None
        try:
            client = self._client or await self._create()
            try:
                if len(queued) == 1:
                    replies: list[Any] = [await queued[0].call(client)]
                else:
                    batch = Batch(is_atomic=False)
                    for waiting in queued:
                        batch.custom_command(waiting.command)
                    replies = await client.exec(batch, raise_on_error=False) or []
            except GlideError as error:
                replies = [error] * len(queued)
            for waiting, reply in zip(queued, replies, strict=False):
                if not waiting.answer.done():
                    waiting.answer.set_result((client, reply))
        except RedisUnavailable as unavailable:  # no client could be built
            failure = unavailable
        except BaseException as error:  # cancelled at shutdown
            failure = RedisUnavailable(f"the pipeline was not answered: {error!r}")
            raise
        finally:
            for waiting in queued:
                if not waiting.answer.done():
                    waiting.answer.set_exception(
                        failure or RedisUnavailable("glide answered the pipeline short")
                    )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def _failure(self, client: Glide, error: GlideError) -> Exception:
        message = str(error)
        if isinstance(error, GlideTimeout):
            return RedisUnavailable(f"Redis did not answer within {self._settings.timeout_s:g}s")
        if not isinstance(error, RequestError):  # ClosingError: this client is finished
            await self._discard(client)
            return RedisUnavailable(f"connection to Redis closed: {message}")
        if _DEMOTED.search(message):
            # Its connections stay on the demoted node; a new client resolves the endpoint again
            # and reaches whichever node is primary now.
            await self._discard(client)
            self._back_off(message)
            return RedisUnavailable(f"Redis refuses writes (the node is a replica now): {message}")
        if _REFUSED.search(message):
            self._back_off(message)
            return RedisUnavailable(f"Redis refuses commands: {message}")
        if _NOT_AN_OUTAGE.search(message):
            return RedisReplyError(message)
        return RedisUnavailable(message)

    def _back_off(self, reason: str) -> None:
        self._refusal = reason
        now = time.monotonic()
        # Refusals of commands sent before the back-off began do not lengthen it: only a new
        # attempt, refused again, does.
        if now < self._refusing_until:
            return
        self._refusing_until = now + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, _MAX_BACKOFF_S)

    async def _discard(self, client: Glide) -> None:
        # Commands in flight on a discarded client fail with it; theirs must not discard the
        # client built since.
        if self._client is client:
            self._client = None
            await client.close()

    async def _create(self) -> Glide:
        # Concurrent callers share one client instead of building one each.
        if self._creating is None:
            self._creating = asyncio.ensure_future(self._build())
        creating = self._creating
        try:
            client = await asyncio.shield(creating)
        finally:
            if creating.done() and self._creating is creating:
                self._creating = None
        return client

    async def _build(self) -> Glide:
        settings = self._settings
        address = settings.address
        credentials = (
            ServerCredentials(password=address.password, username=address.username)
            if address.password is not None
            else None
        )
        timeout_ms = max(1, int(settings.timeout_s * 1000))
        tls = _tls_config(settings) if address.tls else None
        # lazy_connect: glide's eager connect blocks the event loop until the server answers or
        # the connection timeout passes; lazily, the first command connects without blocking.
        common: dict[str, Any] = {
            "addresses": [NodeAddress(address.host, address.port)],
            "use_tls": address.tls,
            "credentials": credentials,
            "request_timeout": timeout_ms,
            "protocol": ProtocolVersion.RESP2,
            "lazy_connect": True,
            # glide refuses commands beyond 1,000 in flight by default; after an outage the store
            # releases up to 10,000 unanswered claims in one batch (idempotency.py).
            "inflight_requests_limit": _MAX_IN_FLIGHT,
        }
        client: Glide
        try:
            if settings.mode == "cluster":
                advanced = AdvancedGlideClusterClientConfiguration(timeout_ms, tls)
                client = await GlideClusterClient.create(
                    GlideClusterClientConfiguration(**common, advanced_config=advanced)
                )
            else:
                client = await GlideClient.create(
                    GlideClientConfiguration(
                        **common,
                        database_id=address.db,
                        advanced_config=AdvancedGlideClientConfiguration(timeout_ms, tls),
                    )
                )
        except GlideError as error:
            raise RedisUnavailable(f"cannot set up the Redis client: {error}") from error
        self._client = client
        return client


@dataclass(slots=True)
class _Queued:
    """A command waiting for its event-loop iteration's pipeline, and where its answer goes."""

    command: list[bytes | str]
    call: Callable[[Glide], Awaitable[Any]]
    answer: asyncio.Future[tuple[Glide, Any]]


def _tls_config(settings: RedisSettings) -> TlsAdvancedConfiguration:
    def pem(path: str | None) -> bytes | None:
        return None if path is None else Path(path).read_bytes()

    return TlsAdvancedConfiguration(
        root_pem_cacerts=pem(settings.tls_ca_file),
        client_cert_pem=pem(settings.tls_cert_file),
        client_key_pem=pem(settings.tls_key_file),
    )


def _encode(value: Argument) -> bytes | str:
    return value if isinstance(value, bytes | str) else str(value)


def _text(key: bytes | str) -> str:
    return key.decode() if isinstance(key, bytes) else key


def _first_node_reply(reply: Any) -> bytes:
    """A command sent to one node answers directly; to several, as a map of node to answer."""
    if isinstance(reply, dict):
        reply = next(iter(reply.values()))
    return reply if isinstance(reply, bytes) else str(reply).encode()
