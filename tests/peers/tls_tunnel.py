"""A TCP-to-TLS tunnel on loopback, for peers that cannot speak TLS themselves.

Debian's sipp is built without TLS.  ``TlsTunnel(target, context)`` listens
on a free 127.0.0.1 port; each connection accepted there gets a TLS
connection of its own to ``target`` (certificate checked against
``context``), and bytes are copied both ways until either side closes.
Seen from the target, each tunnelled peer is one TLS client.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from types import TracebackType
from typing import Self

HOST = "127.0.0.1"


class TlsTunnel:
    def __init__(self, target: tuple[str, int], context: ssl.SSLContext) -> None:
        self.target = target
        self.context = context
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accepted, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._pipes:
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self.target
        try:
            async with asyncio.timeout(5):
                tls_reader, tls_writer = await asyncio.open_connection(
                    host, port, ssl=self.context, server_hostname=host
                )
        except (OSError, TimeoutError):
            writer.close()
            return
        pipes = [
            asyncio.ensure_future(_copy(reader, tls_writer)),
            asyncio.ensure_future(_copy(tls_reader, writer)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
                self._pipes.discard(pipe)
            for end in (writer, tls_writer):
                end.close()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
