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

Limits, so that peers who connect and never finish cannot exhaust the
process (every one is counted against the listener's ``Admission``):

* a connection past the listener's limits (in all, per source) is
  aborted as soon as it is accepted, before any TLS state exists for it;
* an accepted TLS connection gets its TLS session only when its first bytes
  arrive (a silent one costs what a TCP connection costs), and is aborted
  if the handshake has not finished ``handshake_timeout`` seconds after
  the connection came, or once the client sent ``MAX_HANDSHAKE_INPUT``
  bytes without finishing it;
* an accepted connection that nothing depends on (no registration
  subscribed to it) and that carried no message either way for
  ``idle_timeout`` seconds is aborted: half-open and half-sent connections
  end;
* the receive buffer holds at most one message (``MAX_MESSAGE_SIZE``, the
  framer's cap); past it the stream cannot be resynchronised: a request
  whose head was read is answered (513 for one too large, 400 for a
  Content-Length missing or unreadable) and the connection is closed once
  the answer is sent, else it is aborted;
* a peer that does not read what is sent to it stops being read from
  (asyncio's write buffer limits pause reading), and one whose unsent data
  still passes ``MAX_WRITE_BUFFER`` is aborted;
* a connection closed with data unsent is aborted after
  ``CLOSE_DRAIN_TIMEOUT`` seconds, so that a peer that stopped reading
  cannot keep its socket open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import cast

from sipis.sip.message import (
    MAX_MESSAGE_SIZE,
    Keepalive,
    Message,
    ParseError,
    Request,
    StreamBroken,
    StreamFramer,
)
from sipis.sip.registration import LocalAddress

from .admission import Admission
from .flow import Flow, FlowClosed
from .udp import Dispatch, uri_host

log = logging.getLogger(__name__)

TLS_READ_SIZE = 16 * 1024
PONG_TIMEOUT = 10.0
# Unsent bytes past which a peer is taken not to read at all: four largest messages.
MAX_WRITE_BUFFER = 4 * MAX_MESSAGE_SIZE
CLOSE_DRAIN_TIMEOUT = 5.0
# Bytes a TLS client may send before its handshake finishes: a ClientHello is a few KiB,
# while OpenSSL would gather one of up to 128 KiB (and hold several times that meanwhile).
MAX_HANDSHAKE_INPUT = 16 * 1024


class StreamFlow(Flow, asyncio.Protocol):
    """One TCP or TLS connection carrying SIP messages.

    ``admission`` is given for a connection a listener accepted (the server
    side): it is counted there and held to its limits.
    """

    __slots__ = (
        "_admission",
        "_awaiting_pong",
        "_bio_in",
        "_bio_out",
        "_dispatch",
        "_framer",
        "_handshake_input",
        "_handshake_timer",
        "_idle_timer",
        "_keepalive",
        "_keepalive_interval",
        "_last_used",
        "_loop",
        "_pong_seen",
        "_ssl",
        "_tls",
        "_transport",
        "ready",
    )

    def __init__(
        self,
        dispatch: Dispatch,
        *,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
        keepalive: float | None = None,
        admission: Admission | None = None,
    ) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._dispatch = dispatch
        self.server_name = server_name
        self._framer = StreamFramer(MAX_MESSAGE_SIZE)
        self._transport: asyncio.Transport | None = None
        self._admission = admission
        self._keepalive_interval = keepalive
        self._keepalive: asyncio.TimerHandle | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._handshake_input = 0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_used = self._loop.time()
        self._pong_seen = False
        self._awaiting_pong = False
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self._tls = tls
        self._bio_in: ssl.MemoryBIO | None = None
        self._bio_out: ssl.MemoryBIO | None = None
        self._ssl: ssl.SSLObject | None = None

    @property
    def accepted(self) -> bool:
        """Whether a listener accepted this connection (rather than this side opening it)."""
        return self._admission is not None

    @property
    def established(self) -> bool:
        """Whether the connection is up: connected, and for TLS with its handshake finished."""
        ready = self.ready
        return ready.done() and not ready.cancelled() and ready.exception() is None

    # -- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's is not an asyncio.Transport subclass)
        self._transport = transport = cast(asyncio.Transport, transport)
        host, port = transport.get_extra_info("sockname")[:2]
        self.local = LocalAddress("tls" if self._tls else "tcp", uri_host(host), port)
        peer = transport.get_extra_info("peername")
        if peer is None:
            self.remote = ("", 0)
            self._drop("the peer left before the connection was taken up")
            return
        self.remote = (peer[0], peer[1])
        admission = self._admission
        if admission is not None:
            if not admission.admit(self):
                self._drop("refused: over the connection limits")
                return
            limits = admission.limits
            self._idle_timer = self._loop.call_later(limits.idle_timeout, self._check_idle)
            if self._tls is not None:
                self._handshake_timer = self._loop.call_later(
                    limits.handshake_timeout, self._handshake_expired
                )
                return  # the client speaks first: TLS state waits for its bytes
        if self._tls is None:
            self._established()
        else:
            self._start_tls()
            self._handshake()

    def data_received(self, data: bytes) -> None:
        if not self.alive:
            return
        if self._tls is None:
            self._receive_plain(data)
            return
        if self._ssl is None:
            self._start_tls()
        assert self._bio_in is not None
        self._bio_in.write(data)
        if not self.ready.done():
            self._handshake()
            if not self.ready.done():
                self._handshake_input += len(data)
                if self.accepted and self._handshake_input > MAX_HANDSHAKE_INPUT:
                    self._drop(f"TLS handshake unfinished after {self._handshake_input} bytes")
                return
        self._read_tls()

    def eof_received(self) -> bool | None:
        self._fail("peer closed the connection")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(str(exc) if exc else "connection closed")

    def pause_writing(self) -> None:
        """The peer reads slower than we write: stop reading what it sends meanwhile."""
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    # -- sending --------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self._write(data)
        self._last_used = self._loop.time()

    def close(self) -> None:
        transport = self._transport
        if self._ssl is not None and self.established and transport and not transport.is_closing():
            with contextlib.suppress(ssl.SSLError):
                self._ssl.unwrap()  # close_notify
            self._flush()
        self._fail("closed locally")

    # -- internals ------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if not self.alive or transport is None or transport.is_closing():
            raise FlowClosed(repr(self))
        if self._tls is None:
            transport.write(data)
        elif self._ssl is not None and self.established:
            self._ssl.write(data)
            self._flush()
        else:
            raise FlowClosed(f"{self!r}: TLS handshake not finished")
        unsent = transport.get_write_buffer_size()
        if unsent > MAX_WRITE_BUFFER:
            # not from inside the caller's send: close listeners run from the loop
            self._loop.call_soon(self._drop, f"the peer reads nothing ({unsent} bytes unsent)")

    def _start_tls(self) -> None:
        assert self._tls is not None
        self._bio_in, self._bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        server_side = self.accepted
        self._ssl = self._tls.wrap_bio(
            self._bio_in,
            self._bio_out,
            server_side=server_side,
            server_hostname=None if server_side else self.server_name,
        )

    def _established(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
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

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self.alive and not self.ready.done():
            assert self._admission is not None
            timeout = self._admission.limits.handshake_timeout
            self._drop(f"TLS handshake not finished within {timeout:g} s")

    def _check_idle(self) -> None:
        """Abort the connection if nothing depends on it and it went unused for the timeout."""
        self._idle_timer = None
        if not self.alive:
            return
        assert self._admission is not None
        timeout = self._admission.limits.idle_timeout
        unused = self._loop.time() - self._last_used
        if not self.in_use and unused >= timeout:
            self._drop(f"unused for {unused:.1f} s with no registration over it")
            return
        wait = timeout if self.in_use else timeout - unused
        self._idle_timer = self._loop.call_later(wait, self._check_idle)

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
        except StreamBroken as exc:
            self._deliver(exc.framed)
            if not self.alive:
                return
            reason = f"unframeable input ({exc.reason})"
            if isinstance(exc.partial, Request):
                # the dispatcher answers it; the answer leaves before the connection closes
                self._dispatch(ParseError(exc, exc.partial), self)
                self._end(reason)
            else:
                self._drop(reason)
            return
        self._deliver(events)

    def _deliver(self, events: list[Message | Keepalive | ParseError]) -> None:
        for event in events:
            if isinstance(event, Keepalive):
                if event.ping:
                    self._send_quietly(b"\r\n")
                else:
                    self._pong_seen = True
                    self._awaiting_pong = False
            elif isinstance(event, Message | ParseError):
                self._last_used = self._loop.time()
                self._dispatch(event, self)
            if not self.alive:
                return

    def _send_quietly(self, data: bytes) -> None:
        with contextlib.suppress(FlowClosed):
            self._write(data)

    def _schedule_ping(self, delay: float) -> None:
        self._keepalive = self._loop.call_later(delay, self._ping)

    def _ping(self) -> None:
        if not self.alive:
            return
        self._awaiting_pong = True
        self._send_quietly(b"\r\n\r\n")
        self._keepalive = self._loop.call_later(PONG_TIMEOUT, self._check_pong)

    def _check_pong(self) -> None:
        if not self.alive:
            return
        if self._awaiting_pong and self._pong_seen:
            log.info("closing %r: no pong to the last keepalive", self)
            self.close()
            return
        assert self._keepalive_interval is not None
        self._schedule_ping(max(self._keepalive_interval - PONG_TIMEOUT, 0.0))

    def _end(self, reason: str) -> None:
        """Close the connection after what was sent on it (TLS: with close_notify)."""
        if self.alive:
            log.debug("%r ending: %s", self, reason)
        self.close()

    def _drop(self, reason: str) -> None:
        """End the connection at once, unsent data and all (a peer breaking the limits)."""
        if self._transport is not None:
            self._transport.abort()
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        for timer in (self._keepalive, self._handshake_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._keepalive = self._handshake_timer = self._idle_timer = None
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
            self.ready.exception()  # retrieved here: nobody may be waiting any more
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.close()
            if transport.get_write_buffer_size():
                self._loop.call_later(CLOSE_DRAIN_TIMEOUT, transport.abort)
        if self.alive:
            log.debug("%r down: %s", self, reason)
            if self._admission is not None:
                self._admission.release(self)
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
        try:
            await flow.ready
        except BaseException:
            flow.close()  # a handshake cut short must not leave the connection open
            raise
    return flow


def stream_server_factory(
    dispatch: Dispatch,
    *,
    tls: ssl.SSLContext | None,
    keepalive: float | None,
    admission: Admission,
) -> Callable[[], StreamFlow]:
    """A protocol factory for a listening socket whose connections ``admission`` counts."""

    def factory() -> StreamFlow:
        return StreamFlow(dispatch, tls=tls, keepalive=keepalive, admission=admission)

    return factory
