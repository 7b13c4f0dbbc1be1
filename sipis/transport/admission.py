"""Which connections a listening side accepts: at most so many in all and so many per source.

Every connection held costs a socket, a few KiB of state and up to one
message's worth of buffer (plus a TLS session on a TLS port), so a peer
that opens connections and never uses them could otherwise take the whole
process down.  ``Admission`` counts what the TCP and TLS listeners of one
transport layer hold, refuses a connection past either limit, and takes
it back off the count when the connection ends.

A "source" is an IPv4 address, or the /64 an IPv6 address lies in: a
single IPv6 host usually holds a whole /64, so counting its addresses one
by one would limit nothing.  An IPv4-mapped IPv6 address (a dual-stack
socket's view of an IPv4 peer) counts as that IPv4 address.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass

from .flow import Flow

log = logging.getLogger(__name__)

# At most one warning about refused connections per this many seconds.
REFUSAL_REPORT_INTERVAL = 60.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What connections accepted on one side are held to."""

    max_connections: int = 4096
    max_per_source: int = 64
    # seconds a TLS client has to finish its handshake
    handshake_timeout: float = 10.0
    # seconds a connection nothing depends on (no registration over it) may stay unused
    idle_timeout: float = 30.0


class Admission:
    """Counts accepted connections against ``ConnectionLimits``; holds the admitted flows."""

    __slots__ = (
        "_by_source",
        "_refused_since_report",
        "_reported_at",
        "flows",
        "limits",
        "refused",
    )

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.flows: set[Flow] = set()
        self._by_source: dict[str, int] = {}
        self.refused = 0
        self._refused_since_report = 0
        self._reported_at = -REFUSAL_REPORT_INTERVAL

    def __len__(self) -> int:
        return len(self.flows)

    def admit(self, flow: Flow) -> bool:
        """Count ``flow`` in if both limits allow it; False (and counted as refused) if not."""
        source = source_of(flow.remote[0])
        held = self._by_source.get(source, 0)
        if len(self.flows) >= self.limits.max_connections:
            self._refuse(flow, f"{len(self.flows)} connections held in all")
            return False
        if held >= self.limits.max_per_source:
            self._refuse(flow, f"{held} connections held from {source}")
            return False
        self._by_source[source] = held + 1
        self.flows.add(flow)
        return True

    def release(self, flow: Flow) -> None:
        """Take an admitted ``flow`` off the count (it ended)."""
        if flow not in self.flows:
            return
        self.flows.discard(flow)
        source = source_of(flow.remote[0])
        held = self._by_source[source] - 1
        if held:
            self._by_source[source] = held
        else:
            del self._by_source[source]

    def _refuse(self, flow: Flow, why: str) -> None:
        self.refused += 1
        self._refused_since_report += 1
        log.debug("refused a connection on port %d: %s", flow.local.port, why)
        now = time.monotonic()
        if now - self._reported_at >= REFUSAL_REPORT_INTERVAL:
            log.warning(
                "refusing connections on port %d (limits: %d in all, %d per source): "
                "%d refused since the last report, latest because %s",
                flow.local.port,
                self.limits.max_connections,
                self.limits.max_per_source,
                self._refused_since_report,
                why,
            )
            self._reported_at = now
            self._refused_since_report = 0


def source_of(address: str) -> str:
    """The source a peer address counts against: the IPv4 address, or the IPv6 /64."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))
