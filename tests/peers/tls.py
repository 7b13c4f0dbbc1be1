"""TLS material for the real-peer fixtures, and a TCP-to-TLS relay.

Certificates come from a trustme CA.  A peer's server certificate names
every host a test may use to reach it (a DNS name and 127.0.0.1), and a
client verifies it against the CA's PEM file like it would verify a real
registrar.

Debian's sipp is built without OpenSSL (`-t l1` fails with "To use a TLS
transport you must compile SIPp with OpenSSL"), so `TlsRelay` lets it reach a
TLS listener: sipp speaks SIP over plain TCP to the relay, which opens a
verified TLS connection to the peer for each TCP connection and copies bytes
both ways.  The peer sees a TLS flow from the relay's address.
"""

import asyncio
import contextlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import trustme

from tests.peers.loopback import HOST

_RELAY_CHUNK = 65536


@dataclass(frozen=True)
class ServerCertificate:
    """PEM files a TLS server loads: its certificate chain (leaf first) and its private key."""

    chain: Path
    private_key: Path


def write_ca_certificate(ca: trustme.CA, path: Path) -> Path:
    """Write the CA certificate as PEM to `path`, for clients that verify against it."""
    ca.cert_pem.write_to_path(str(path))
    return path


def issue_server_certificate(
    ca: trustme.CA, directory: Path, names: Sequence[str], stem: str = "server"
) -> ServerCertificate:
    """Issue a certificate for `names` (DNS names or IP addresses) and write it to `directory`."""
    leaf = ca.issue_cert(*names)
    chain = directory / f"{stem}.crt"
    for index, pem in enumerate(leaf.cert_chain_pems):
        pem.write_to_path(str(chain), append=index > 0)
    private_key = directory / f"{stem}.key"
    leaf.private_key_pem.write_to_path(str(private_key))
    private_key.chmod(0o600)
    return ServerCertificate(chain=chain, private_key=private_key)


def client_context(ca_certificate: Path) -> ssl.SSLContext:
    """Return a client context that trusts only the CA in `ca_certificate` and checks host names."""
    return ssl.create_default_context(cafile=str(ca_certificate))


class TlsRelay:
    """Accept plain TCP on 127.0.0.1 and carry each connection over its own TLS connection.

    Use as an async context manager; `address` is where the plain-TCP client
    connects.  When either side of a relayed connection closes, both are
    closed.  A TLS connection that cannot be set up (refused, or a
    certificate that fails verification) closes the client's connection and
    is recorded in `failures`.
    """

    def __init__(self, target: tuple[str, int], context: ssl.SSLContext, server_hostname: str):
        self._target = target
        self._context = context
        self._server_hostname = server_hostname
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.failures: list[BaseException] = []

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) on which the relay accepts plain TCP."""
        if self._server is None:
            raise RuntimeError("TlsRelay is not running")
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, HOST, 0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for connection in self._connections:
            connection.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _accept(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._relay(client_reader, client_writer)
        finally:
            self._connections.discard(task)

    async def _relay(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            peer_reader, peer_writer = await asyncio.open_connection(
                *self._target, ssl=self._context, server_hostname=self._server_hostname
            )
        except (OSError, ssl.SSLError) as error:
            self.failures.append(error)
            await _close(client_writer)
            return
        pumps = [
            asyncio.create_task(_pump(client_reader, peer_writer)),
            asyncio.create_task(_pump(peer_reader, client_writer)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            await _close(peer_writer)
            await _close(client_writer)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy bytes from `reader` to `writer` until either side closes."""
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while chunk := await reader.read(_RELAY_CHUNK):
            writer.write(chunk)
            await writer.drain()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()
