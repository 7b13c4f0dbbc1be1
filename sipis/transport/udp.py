"""The UDP endpoint: one socket that every UDP flow sends and receives through."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import cast

from sipis.sip.errors import SipError
from sipis.sip.headers import Via
from sipis.sip.message import Message, ParseError, parse_message
from sipis.sip.registration import LocalAddress

from .flow import Flow, FlowClosed, response_destination

log = logging.getLogger(__name__)

_LOCAL_HOST_CACHE = 1024

Dispatch = Callable[[Message | ParseError, Flow], None]


class UdpFlow(Flow):
    """A (local socket, remote address) pair."""

    __slots__ = ("_endpoint", "_keepalive")

    def __init__(self, endpoint: UdpEndpoint, local: LocalAddress, remote: tuple[str, int]) -> None:
        super().__init__()
        self._endpoint = endpoint
        self.local = local
        self.remote = remote
        self.server_name = None
        self._keepalive: asyncio.TimerHandle | None = None

    def send(self, data: bytes) -> None:
        if not self.alive:
            raise FlowClosed(repr(self))
        self._endpoint.sendto(data, self.remote)

    def reply(self, data: bytes, via: Via) -> None:
        self._endpoint.sendto(data, response_destination(via, self.remote))

    def keep_alive(self, interval: float) -> None:
        """Send a CRLF keepalive every ``interval`` seconds (keeps NAT bindings open)."""
        if self._keepalive is not None:
            self._keepalive.cancel()
        loop = asyncio.get_running_loop()

        def ping() -> None:
            if self.alive:
                self._endpoint.sendto(b"\r\n\r\n", self.remote)
                self._keepalive = loop.call_later(interval, ping)

        self._keepalive = loop.call_later(interval, ping)

    def _closed(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        self._endpoint.forget_flow(self)
        super()._closed()


class UdpEndpoint(asyncio.DatagramProtocol):
    """Receives every datagram on its socket and hands messages to ``dispatch``.

    Flows that bindings asked for are kept (one per remote address, shared);
    a datagram from anywhere else gets a throwaway flow so it can be answered.
    """

    def __init__(self, dispatch: Dispatch, advertise: str | None = None) -> None:
        self._dispatch = dispatch
        self._advertise = advertise
        self._transport: asyncio.DatagramTransport | None = None
        self._flows: dict[tuple[str, int], UdpFlow] = {}
        self._local_hosts: dict[str, str] = {}
        self.host = ""
        self.port = 0

    @classmethod
    async def open(
        cls, host: str, port: int, dispatch: Dispatch, advertise: str | None = None
    ) -> UdpEndpoint:
        loop = asyncio.get_running_loop()
        _, endpoint = await loop.create_datagram_endpoint(
            lambda: cls(dispatch, advertise), local_addr=(host, port), reuse_port=False
        )
        return endpoint

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)
        self.host, self.port = transport.get_extra_info("sockname")[:2]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not data.strip(b"\r\n"):
            return  # CRLF keepalive
        try:
            message: Message | ParseError = parse_message(data)
        except ParseError as exc:
            message = exc
        except SipError:
            return
        remote = (addr[0], addr[1])
        flow = self._flows.get(remote) or UdpFlow(self, self._local_for(remote[0]), remote)
        self._dispatch(message, flow)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp socket error: %s", exc)

    def sendto(self, data: bytes, remote: tuple[str, int]) -> None:
        if self._transport is None or self._transport.is_closing():
            raise FlowClosed("udp endpoint closed")
        self._transport.sendto(data, remote)

    def flow(self, remote: tuple[str, int], keepalive: float | None) -> UdpFlow:
        """The shared flow towards ``remote``, kept alive from its creation on."""
        flow = self._flows.get(remote)
        if flow is None:
            flow = self._flows[remote] = UdpFlow(self, self._local_for(remote[0]), remote)
            if keepalive:
                flow.keep_alive(keepalive)
        return flow

    def forget_flow(self, flow: UdpFlow) -> None:
        if self._flows.get(flow.remote) is flow:
            del self._flows[flow.remote]

    def close(self) -> None:
        for flow in list(self._flows.values()):
            flow.close()
        if self._transport is not None:
            self._transport.close()

    def _local_for(self, remote_host: str) -> LocalAddress:
        """Our address as seen towards ``remote_host`` (the source address the kernel picks)."""
        if self._advertise:
            return LocalAddress("udp", self._advertise, self.port)
        if self.host not in ("0.0.0.0", "::"):  # noqa: S104 - a wildcard bind has no single address
            return LocalAddress("udp", uri_host(self.host), self.port)
        host = self._local_hosts.get(remote_host)
        if host is None:
            host = uri_host(source_address_towards(remote_host))
            if len(self._local_hosts) >= _LOCAL_HOST_CACHE:
                self._local_hosts.clear()
            self._local_hosts[remote_host] = host
        return LocalAddress("udp", host, self.port)


def source_address_towards(remote_host: str) -> str:
    """The source address the kernel would use to reach ``remote_host`` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in remote_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((remote_host, 9))
        return str(probe.getsockname()[0])


def uri_host(address: str) -> str:
    """An IP address as it appears in a URI or Via: IPv6 in brackets."""
    return f"[{address}]" if ":" in address and not address.startswith("[") else address
