"""Which addresses sipis may send an account's REGISTERs to.

An app names its registrar (and outbound proxy); sipis then sends requests
there from inside the operator's network.  Without a rule, an app could
point sipis at the operator's own hosts (loopback, private networks,
link-local metadata services) or at sipis itself, and use it to probe or
reflect traffic.  So an address that is not globally routable, or that is
one of the relay's own listening addresses, is refused unless it lies in a
network the operator allows (``sip.allowed_networks``).

The rule is applied twice: to an address written in the URI when the API
takes the account, and to every address DNS gives when a flow is opened,
so that a name resolving to a private address later is refused too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class TargetPolicy:
    """Addresses refused as registrars: the relay's own and those not globally routable."""

    allowed: tuple[Network, ...] = ()
    own: frozenset[tuple[Address, int]] = frozenset()

    @classmethod
    def build(cls, allowed: Iterable[str], own: Iterable[tuple[str, int]] = ()) -> TargetPolicy:
        return cls(
            tuple(ipaddress.ip_network(n, strict=False) for n in allowed),
            frozenset((ipaddress.ip_address(a), p) for a, p in own),
        )

    def refusal(self, host: str, port: int | None = None) -> str | None:
        """Why requests may not go to ``host`` (an IP address) and ``port``; None if they may.

        A host that is not an IP address is not judged here: its addresses are.
        """
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if port is not None and (address, port) in self.own:
            return "the relay's own address"
        if any(address in network for network in self.allowed):
            return None
        return _kind(address)


def _kind(address: Address) -> str | None:
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if not address.is_global:
        return "a private or reserved address"
    return None
