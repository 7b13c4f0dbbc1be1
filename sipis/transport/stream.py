"""TCP and TLS flows: one connection, framed by Content-Length, kept alive with CRLF.

TLS runs over a memory BIO inside the protocol rather than through asyncio's
SSL transport: asyncio gives every TLS connection a 256 KiB read buffer,
while SIP over TLS needs at most one TLS record (16 KiB) at a time.

Keepalive (RFC 5626 §3.5.1, §4.4.1): every ``keepalive`` seconds the flow
sends a CRLF CRLF ping.  A peer that has answered a ping with a CRLF pong
once is expected to keep doing so: no pong within ``pong_timeout`` means the
flow is dead.  A peer that never pongs is not held to it (closing the
connection is then the only sign of death).  A received ping is answered
with a pong.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable

from sipis.sip.errors import SipError
from sipis.sip.message import MAX_MESSAGE_SIZE, Keepalive, Message, ParseError, StreamFramer
from sipis.sip.registration import LocalAddress

from .flow import Flow, FlowClosed
from .udp import Dispatch, uri_host

log = logging.getLogger(__name__)

TLS_READ_SIZE = 16 * 1024
PONG_TIMEOUT = 10.0


class StreamFlow(Flow, asyncio.Protocol):
    """One TCP or TLS connection carrying SIP messages."""

    __slots__ = (
        "_awaiting_pong",
        "_bio_in",
        "_bio_out",
        "_dispatch",
        "_framer",
        "_keepalive",
        "_keepalive_interval",
        "_pong_seen",
        "_ssl",
        "_transport",
        "ready",
    )

    def __init__(
        self,
        dispatch: Dispatch,
        *,
        tls: ssl.SSLContext | None = None,
        server_side: bool = False,
        server_name: str | None = None,
        keepalive: float | None = None,
    ) -> None:
        super().__init__()
        self._dispatch = dispatch
        self.server_name = server_name
        self._framer = StreamFramer(MAX_MESSAGE_SIZE)
        self._transport: asyncio.Transport | None = None
        self._keepalive_interval = keepalive
        self._keepalive: asyncio.TimerHandle | None = None
        self._pong_seen = False
        self._awaiting_pong = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._bio_in: ssl.MemoryBIO | None = None
        self._bio_out: ssl.MemoryBIO | None = None
        self._ssl: ssl.SSLObject | None = None
        if tls is not None:
            self._bio_in, self._bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self._ssl = tls.wrap_bio(
                self._bio_in,
                self._bio_out,
                server_side=server_side,
                server_hostname=None if server_side else server_name,
            )

    # -- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        host, port = transport.get_extra_info("sockname")[:2]
        peer = transport.get_extra_info("peername")
        self.remote = (peer[0], peer[1])
        self.local = LocalAddress("tls" if self._ssl else "tcp", uri_host(host), port)
        if self._ssl is None:
            self._established()
        else:
            self._handshake()

    def data_received(self, data: bytes) -> None:
        if self._ssl is None:
            self._receive_plain(data)
            return
        assert self._bio_in is not None
        self._bio_in.write(data)
        if not self.ready.done():
            self._handshake()
            if not self.ready.done():
                return
        self._read_tls()

    def eof_received(self) -> bool | None:
        self._fail("peer closed the connection")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(str(exc) if exc else "connection closed")

    # -- sending --------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if not self.alive or self._transport is None or self._transport.is_closing():
            raise FlowClosed(repr(self))
        if self._ssl is None:
            self._transport.write(data)
        else:
            self._ssl.write(data)
            self._flush()

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            if self._ssl is not None and self.ready.done():
                with contextlib.suppress(ssl.SSLError):
                    self._ssl.unwrap()
                self._flush()
            self._transport.close()
        self._fail("closed locally")

    # -- internals ------------------------------------------------------------------

    def _established(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)
        if self._keepalive_interval:
            self._schedule_ping(self._keepalive_interval)

    def _handshake(self) -> None:
        assert self._ssl is not None
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ssl.CertificateError) as exc:
            self._flush()
            self._fail(f"TLS handshake failed: {exc}")
            return
        self._flush()
        self._established()

    def _read_tls(self) -> None:
        assert self._ssl is not None
        while self.alive:
            try:
                chunk = self._ssl.read(TLS_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._fail("TLS close_notify")
                break
            except ssl.SSLError as exc:
                self._fail(f"TLS error: {exc}")
                break
            if not chunk:
                self._fail("TLS stream ended")
                break
            self._receive_plain(chunk)
        if self.alive:
            self._flush()

    def _flush(self) -> None:
        if self._bio_out is not None and self._transport is not None:
            pending = self._bio_out.read()
            if pending and not self._transport.is_closing():
                self._transport.write(pending)

    def _receive_plain(self, data: bytes) -> None:
        try:
            events = self._framer.feed(data)
        except SipError as exc:
            log.info("closing %r: unframeable input (%s)", self, exc.reason)
            self.close()
            return
        for event in events:
            if isinstance(event, Keepalive):
                if event.ping:
                    self._send_quietly(b"\r\n")
                else:
                    self._pong_seen = True
                    self._awaiting_pong = False
            elif isinstance(event, Message | ParseError):
                self._dispatch(event, self)
            if not self.alive:
                return

    def _send_quietly(self, data: bytes) -> None:
        with contextlib.suppress(FlowClosed):
            self.send(data)

    def _schedule_ping(self, delay: float) -> None:
        self._keepalive = asyncio.get_running_loop().call_later(delay, self._ping)

    def _ping(self) -> None:
        if not self.alive:
            return
        self._awaiting_pong = True
        self._send_quietly(b"\r\n\r\n")
        self._keepalive = asyncio.get_running_loop().call_later(PONG_TIMEOUT, self._check_pong)

    def _check_pong(self) -> None:
        if not self.alive:
            return
        if self._awaiting_pong and self._pong_seen:
            log.info("closing %r: no pong to the last keepalive", self)
            self.close()
            return
        assert self._keepalive_interval is not None
        self._schedule_ping(max(self._keepalive_interval - PONG_TIMEOUT, 0.0))

    def _fail(self, reason: str) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
            self.ready.exception()  # retrieved here: nobody may be waiting any more
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        if self.alive:
            log.debug("%r down: %s", self, reason)
        self._closed()


async def open_stream(
    host: str,
    port: int,
    dispatch: Dispatch,
    *,
    tls: ssl.SSLContext | None,
    server_name: str | None,
    keepalive: float | None,
    timeout: float,
) -> StreamFlow:
    """Connect (and for TLS, handshake) within ``timeout`` seconds."""
    loop = asyncio.get_running_loop()

    def factory() -> StreamFlow:
        return StreamFlow(dispatch, tls=tls, server_name=server_name, keepalive=keepalive)

    async with asyncio.timeout(timeout):
        _, flow = await loop.create_connection(factory, host, port)
        await flow.ready
    return flow


def stream_server_factory(
    dispatch: Dispatch,
    *,
    tls: ssl.SSLContext | None,
    keepalive: float | None,
    accepted: Callable[[StreamFlow], None],
) -> Callable[[], StreamFlow]:
    """A protocol factory for a listening socket; ``accepted`` learns of each new flow."""

    def factory() -> StreamFlow:
        flow = StreamFlow(dispatch, tls=tls, server_side=True, keepalive=keepalive)
        flow.ready.add_done_callback(lambda f: None if f.exception() else accepted(flow))
        return flow

    return factory
