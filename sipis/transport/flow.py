"""Flows: the paths SIP messages travel between this node and one peer.

A flow (RFC 5626 §3) is a UDP 5-tuple or one TCP/TLS connection.  Bindings
send over the flow they registered through, and requests from the registrar
come back over it.  Whoever depends on a flow subscribes with
``on_close``; a flow that dies calls every subscriber once.
"""

from __future__ import annotations

from collections.abc import Callable

from sipis.sip.headers import Via
from sipis.sip.registration import LocalAddress


class FlowClosed(Exception):
    """Raised by ``send`` on a flow that is no longer usable."""


class Flow:
    """Base of UDP and stream flows: addresses, liveness, close listeners."""

    __slots__ = ("_listeners", "alive", "local", "remote", "server_name")

    local: LocalAddress
    remote: tuple[str, int]
    server_name: str | None

    def __init__(self) -> None:
        self.alive = True
        self._listeners: dict[Callable[[Flow], None], None] = {}

    @property
    def transport(self) -> str:
        return self.local.transport

    @property
    def reliable(self) -> bool:
        return self.local.transport != "udp"

    @property
    def in_use(self) -> bool:
        """Whether anything depends on the flow (subscribed with ``on_close``): a registration."""
        return bool(self._listeners)

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def reply(self, data: bytes, via: Via) -> None:
        """Send a response to a request that arrived on this flow (§18.2.2)."""
        self.send(data)

    def on_close(self, listener: Callable[[Flow], None]) -> None:
        if self.alive:
            self._listeners[listener] = None

    def forget(self, listener: Callable[[Flow], None]) -> None:
        self._listeners.pop(listener, None)

    def close(self) -> None:
        """Stop using the flow; listeners are told as if it had died."""
        self._closed()

    def _closed(self) -> None:
        if not self.alive:
            return
        self.alive = False
        listeners, self._listeners = self._listeners, {}
        for listener in listeners:
            listener(self)

    def __repr__(self) -> str:
        local, (host, port) = self.local, self.remote
        return f"<{self.transport} flow {local.host}:{local.port} -> {host}:{port}>"


def response_destination(via: Via, source: tuple[str, int]) -> tuple[str, int]:
    """Where a response to a request received over UDP goes (RFC 3261 §18.2.2, RFC 3581).

    With ``rport`` it returns to the source address and port; otherwise to
    the source address (the ``received`` value) at the sent-by port.
    """
    if "rport" in via.params:
        return source
    return (source[0], via.port or 5060)
