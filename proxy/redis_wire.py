"""A small Redis client: one multiplexed connection, commands pipelined once per loop tick.

redis-py's asyncio client spends about 50 µs of CPU per command on pool and connection
bookkeeping; the gateway needs at most two commands per payment, from many requests at once.
Here every command of a loop iteration is written in one `write()` on one connection, and
hiredis parses the replies in order: about 8 µs per command, measured side by side (README,
"Performance"). It speaks RESP2 with AUTH, SELECT, TLS (`rediss://`) and unix sockets, which
is all ElastiCache and a local server need.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

from proxy.deadlines import fail_after

Argument = bytes | str | int


class RedisUnavailable(Exception):
    """Redis unreachable or too slow to answer: the command may or may not have run."""


class RedisReplyError(Exception):
    """Redis answered with an error (`-ERR ...`)."""


@dataclass(frozen=True)
class RedisAddress:
    """Where and how to connect, read from a `redis://`, `rediss://` or `unix://` URL."""

    host: str = "127.0.0.1"
    port: int = 6379
    unix_path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        password = unquote(parts.password) if parts.password else None
        username = unquote(parts.username) if parts.username else None
        if parts.scheme == "unix":
            db = int(query.get("db", ["0"])[0])
            return cls(unix_path=unquote(parts.path), db=db, username=username, password=password)
        path_db = parts.path.lstrip("/")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=int(path_db or query.get("db", ["0"])[0]),
            username=username or None,
            password=password,
            tls=parts.scheme == "rediss",
        )


def encode_command(args: Sequence[Argument]) -> bytes:
    """RESP2 array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Connection(asyncio.Protocol):
    """One socket; replies resolve the oldest waiting command, as RESP guarantees order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._reader = hiredis.Reader()
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._outgoing: list[bytes] = []
        self._flush_scheduled = False
        self._transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            waiter = self._waiting.popleft()
            if waiter.done():  # its caller timed out; the reply is dropped, order is kept
                continue
            if isinstance(reply, hiredis.ReplyError):
                waiter.set_exception(RedisReplyError(str(reply)))
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(RedisUnavailable(f"connection to Redis lost: {exc}"))

    def send(self, command: bytes) -> asyncio.Future[Any]:
        waiter: asyncio.Future[Any] = self.loop.create_future()
        if self.closed:
            waiter.set_exception(RedisUnavailable("connection to Redis closed"))
            return waiter
        self._waiting.append(waiter)
        self._outgoing.append(command)
        if not self._flush_scheduled:
            # Commands issued during this loop iteration leave together: one write, one packet.
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        return waiter

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._transport is not None and not self.closed:
            self._transport.write(b"".join(self._outgoing))
        self._outgoing.clear()

    def close(self) -> None:
        # Closed at once for senders: a command issued before connection_lost runs must not
        # be queued on a connection that will never answer it.
        self.closed = True
        if self._transport is not None:
            self._transport.close()


class Script:
    """A Lua script run by its SHA1 (EVALSHA), sent in full once when the server lacks it."""

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source, usedforsecurity=False).hexdigest().encode()


class RedisClient:
    """Commands over one lazily (re)connected connection; every call bounded by `timeout_s`."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self._address = RedisAddress.from_url(url)
        self._timeout_s = timeout_s
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None

    async def execute(self, *args: Argument) -> Any:
        """Run one command; raises RedisUnavailable (unreachable, timed out) or RedisReplyError."""
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connect()
        waiter = connection.send(encode_command(args))
        expiry = fail_after(connection.loop, self._timeout_s, waiter)
        try:
            return await waiter
        except TimeoutError:
            # A connection that stopped answering is not trusted again; the next call reconnects.
            connection.close()
            raise RedisUnavailable(f"Redis did not answer within {self._timeout_s:g}s") from None
        finally:
            expiry.cancel()

    async def run_script(
        self, script: Script, keys: Sequence[Argument], args: Sequence[Argument]
    ) -> Any:
        try:
            return await self.execute(b"EVALSHA", script.sha, len(keys), *keys, *args)
        except RedisReplyError as error:
            if not str(error).startswith("NOSCRIPT"):
                raise
        return await self.execute(b"EVAL", script.source, len(keys), *keys, *args)

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def _connect(self) -> _Connection:
        # Concurrent callers share one connection attempt instead of opening one each.
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
            # Retrieved here so an attempt every caller gave up on is not reported as unhandled.
            self._connecting.add_done_callback(
                lambda attempt: attempt.cancelled() or attempt.exception()
            )
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done():
                self._connecting = None

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        address = self._address
        connection: _Connection | None = None
        try:
            async with asyncio.timeout(self._timeout_s):
                if address.unix_path is not None:
                    _, connection = await loop.create_unix_connection(
                        lambda: _Connection(loop), address.unix_path
                    )
                else:
                    _, connection = await loop.create_connection(
                        lambda: _Connection(loop),
                        address.host,
                        address.port,
                        ssl=ssl.create_default_context() if address.tls else None,
                    )
                await self._handshake(connection)
        except (OSError, TimeoutError, RedisReplyError) as error:
            if connection is not None:
                connection.close()
            raise RedisUnavailable(
                f"cannot connect to Redis: {error or type(error).__name__}"
            ) from error
        self._connection = connection
        return connection

    async def _handshake(self, connection: _Connection) -> None:
        address = self._address
        steps = []
        if address.password is not None:
            credentials = (
                [address.username, address.password] if address.username else [address.password]
            )
            steps.append(connection.send(encode_command([b"AUTH", *credentials])))
        if address.db:
            steps.append(connection.send(encode_command([b"SELECT", address.db])))
        # gather, not one await per step: when AUTH fails, SELECT's error is retrieved too, or
        # asyncio would log "Future exception was never retrieved" on every reconnect attempt.
        await asyncio.gather(*steps)
