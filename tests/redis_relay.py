"""A TCP relay in front of a Redis port: TLS termination, a slow link, a switchable target.

`target_port` may change while it runs: new connections go to the new target, open ones stay
where they are, which is how a DNS endpoint behaves when ElastiCache repoints it after a
failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl


class Relay:
    """Pipes bytes to a Redis port; terminates TLS when given a server context; counts accepts.

    `reply_delay_s` holds every chunk of Redis's replies back that long: a slow network.
    """

    def __init__(
        self, target_port: int, tls: ssl.SSLContext | None = None, reply_delay_s: float = 0.0
    ) -> None:
        self.target_port = target_port
        self.tls = tls
        self.reply_delay_s = reply_delay_s
        self.accepted = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer, self.reply_delay_s)
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float = 0.0
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if delay_s:
                    await asyncio.sleep(delay_s)  # latency, not synchronisation
                writer.write(data)
                await writer.drain()
        writer.close()
        self._writers.discard(writer)
