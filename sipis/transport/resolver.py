"""RFC 3263 server location: which transport, address and port to try, in which order.

A SIP or SIPS URI names a host, maybe a port and maybe a ``transport``
parameter.  RFC 3263 section 4 turns that into targets to try one after the
other (the caller fails over to the next target when one does not answer):

====================  ==========================================================
URI has               lookups
====================  ==========================================================
an IP literal host    none: that address, the given or default transport and port
a port                A and AAAA of the host, at that port
a transport           SRV for that transport; no SRV: A and AAAA, default port
neither               NAPTR; each usable record's replacement: SRV.
                      No usable NAPTR: SRV for every transport this side speaks.
                      No SRV at all: A and AAAA, UDP (sip) or TLS (sips), default port
====================  ==========================================================

RFC 3263 section 4.1 names the NAPTR services::

    SIP+D2U   SIP over UDP        SIP+D2T   SIP over TCP        SIPS+D2T  SIP over TLS over TCP

"A client resolving a SIPS URI MUST discard any services that do not contain
"SIPS" as the protocol in the service field"; a SIP URI keeps SIPS records when
TLS is enabled.  Each SRV set is ordered as RFC 2782 says (priority, then
weighted random), and each host's IPv4 addresses come before its IPv6 ones.

The name a TLS certificate is checked against (``Target.host``) is always the
URI host, never a NAPTR replacement or SRV target: DNS is not trusted to say
who the server is (RFC 5922, "Domain Certificates in SIP").

Two departures from a literal reading, both for availability: a NAPTR set whose
records lead to no target falls through to the plain SRV lookups, and a lookup
that fails (timeout, SERVFAIL, malformed reply) counts as "no records" for its
step, so a broken NAPTR still lets the SRV and A/AAAA lookups run.

Every DNS question goes through one cache keyed by name and type and kept for
the answer's TTL on the injected clock (capped at ``MAX_TTL``; negative answers
at ``NEGATIVE_TTL_CAP``).  Failed lookups are not cached, so a recovering
server is used at once.  Concurrent identical questions share one query, which
keeps a restart that resolves thousands of bindings to one registrar to a
handful of packets.
"""

import asyncio
import functools
import ipaddress
import itertools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA
from dns.rdtypes.IN.NAPTR import NAPTR
from dns.rdtypes.IN.SRV import SRV

SUPPORTED_TRANSPORTS = ("udp", "tcp", "tls")
DEFAULT_PORTS = {"udp": 5060, "tcp": 5060, "tls": 5061}
MAX_TARGETS = 16
MAX_TTL = 3600.0
NEGATIVE_TTL_CAP = 30.0
CACHE_ENTRIES = 4096

_NAPTR_SERVICES = {b"sip+d2u": "udp", b"sip+d2t": "tcp", b"sips+d2t": "tls"}
_SRV_PREFIXES = {"udp": "_sip._udp", "tcp": "_sip._tcp", "tls": "_sips._tcp"}
_FAILURES_NAMED = 4

_Records = tuple[dns.rdata.Rdata, ...]


@dataclass(frozen=True)
class Target:
    """One place to send a request: connect to ``address``:``port`` over ``transport``.

    ``host`` is the name to put in SNI and to check the server's certificate
    against; for an IP literal URI it is that literal.
    """

    transport: str
    host: str
    address: str
    port: int


class ResolveError(Exception):
    """No target could be found for ``host``; ``reason`` says why."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"cannot locate a SIP server for {host!r}: {reason}")
        self.host = host
        self.reason = reason


@dataclass(frozen=True)
class _Cached:
    expires: float
    records: _Records


class Resolver:
    """Finds the targets for a SIP URI's host, port and transport (RFC 3263 section 4).

    ``nameservers`` are (address, port) pairs; ``None`` reads the system's
    resolver configuration.  ``timeout`` bounds every DNS question, including
    its retries.  ``transports`` lists the transports this side speaks, in the
    order to prefer them when DNS leaves the choice open.  ``rng`` drives the
    RFC 2782 weighted choice.
    """

    def __init__(
        self,
        nameservers: list[tuple[str, int]] | None = None,
        *,
        timeout: float = 2.0,
        transports: tuple[str, ...] = SUPPORTED_TRANSPORTS,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        unknown = set(transports) - set(SUPPORTED_TRANSPORTS)
        if not transports or unknown:
            raise ValueError(f"transports must be some of {SUPPORTED_TRANSPORTS}, not {transports}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._dns = dns.asyncresolver.Resolver(configure=nameservers is None)
        if nameservers is not None:
            self._dns.nameservers = [
                dns.nameserver.Do53Nameserver(address, port) for address, port in nameservers
            ]
        # Half the budget per try leaves room for one retry of a lost datagram.
        self._dns.timeout = timeout / 2
        self._dns.lifetime = timeout
        self._timeout = timeout
        self._transports = transports
        self._clock = clock
        self._rng = rng or random.Random()
        self._cache: dict[tuple[str, dns.rdatatype.RdataType], _Cached] = {}
        self._asking: dict[tuple[str, dns.rdatatype.RdataType], asyncio.Task[_Records | None]] = {}

    async def resolve(
        self, host: str, port: int | None, transport: str | None, secure: bool
    ) -> list[Target]:
        """Return the targets for a URI, best first, at most ``MAX_TARGETS``.

        ``secure`` is true for a SIPS URI: then every target is TLS.  Raises
        ``ResolveError`` when no target is found.
        """
        wanted = self._checked_transport(host, transport, secure)
        if port is not None and not 0 < port < 65536:
            raise ResolveError(host, f"port {port} is out of range")
        literal = _ip_literal(host)
        if literal is not None:
            chosen = wanted or self._default_transport(secure)
            return [Target(chosen, literal, literal, port or DEFAULT_PORTS[chosen])]
        domain = _domain(host)
        failed: list[str] = []
        if port is not None:
            chosen = wanted or self._default_transport(secure)
            targets = await self._addresses(domain, domain, chosen, port, failed)
        elif wanted is not None:
            targets = await self._by_transport(domain, wanted, failed)
        else:
            targets = await self._by_naptr(domain, secure, failed)
        found = list(dict.fromkeys(targets))[:MAX_TARGETS]
        if not found:
            raise ResolveError(host, _no_target_reason(failed))
        return found

    def _checked_transport(self, host: str, transport: str | None, secure: bool) -> str | None:
        """The transport the URI asks for, or None when it leaves the choice open.

        In a SIPS URI ``transport=tcp`` means TLS over TCP: RFC 3263 section 4.2
        looks it up with "the service identifier "_sips" for SIPS URIs".
        """
        if secure and "tls" not in self._transports:
            raise ResolveError(host, "a sips URI needs TLS, which is not enabled")
        if transport is None:
            return None
        wanted = transport.lower()
        if secure and wanted == "tcp":
            wanted = "tls"
        if secure and wanted != "tls":
            raise ResolveError(host, f"transport {transport!r} cannot carry a sips URI")
        if wanted not in self._transports:
            raise ResolveError(host, f"transport {transport!r} is not enabled")
        return wanted

    def _default_transport(self, secure: bool) -> str:
        """The transport when DNS gives none: UDP for SIP, TLS over TCP for SIPS.

        RFC 3263 section 4.1: "the client SHOULD use UDP for a SIP URI, and TCP
        for a SIPS URI".  Without UDP enabled, the first enabled transport.
        """
        if secure:
            return "tls"
        return "udp" if "udp" in self._transports else self._transports[0]

    async def _by_naptr(self, domain: str, secure: bool, failed: list[str]) -> list[Target]:
        """NAPTR, then SRV per transport, then A/AAAA: RFC 3263 sections 4.1 and 4.2."""
        services = self._naptr_services(await self._lookup(domain, "NAPTR", failed), secure)
        if services:
            found = await asyncio.gather(
                *(self._srv(name, transport, domain, failed) for transport, name in services)
            )
            targets = [target for group in found if group for target in group]
            if targets:
                return targets
        transports = ("tls",) if secure else self._transports
        found = await asyncio.gather(
            *(self._srv(_srv_name(t, domain), t, domain, failed) for t in transports)
        )
        if any(group is not None for group in found):
            return [target for group in found if group for target in group]
        chosen = self._default_transport(secure)
        return await self._addresses(domain, domain, chosen, DEFAULT_PORTS[chosen], failed)

    async def _by_transport(self, domain: str, transport: str, failed: list[str]) -> list[Target]:
        """SRV for the one transport the URI names; without SRV, A/AAAA at its default port."""
        targets = await self._srv(_srv_name(transport, domain), transport, domain, failed)
        if targets is not None:
            return targets
        return await self._addresses(domain, domain, transport, DEFAULT_PORTS[transport], failed)

    def _naptr_services(self, records: _Records, secure: bool) -> list[tuple[str, str]]:
        """(transport, SRV name) of each NAPTR record this side can use, by order and preference.

        RFC 3263 section 4.1: the records wanted have the "S" flag, an empty
        regular expression and a replacement naming an SRV record.
        """
        usable: list[tuple[str, str]] = []
        naptrs = sorted(
            (r for r in records if isinstance(r, NAPTR)), key=lambda r: (r.order, r.preference)
        )
        for record in naptrs:
            transport = _NAPTR_SERVICES.get(record.service.lower())
            if (
                transport is not None
                and transport in self._transports
                and (transport == "tls" or not secure)
                and record.flags.lower() == b"s"
                and not record.regexp
                and record.replacement != dns.name.root
            ):
                usable.append((transport, record.replacement.to_text()))
        return usable[:MAX_TARGETS]

    async def _srv(
        self, name: str, transport: str, verify_host: str, failed: list[str]
    ) -> list[Target] | None:
        """Targets of one SRV set, or None when there is none (the caller falls back).

        RFC 2782: 'A Target of "." means that the service is decidedly not
        available at this domain': such records (and port 0) give no target
        and no fallback either.
        """
        records = [r for r in await self._lookup(name, "SRV", failed) if isinstance(r, SRV)]
        if not records:
            return None
        usable = [r for r in records if r.target != dns.name.root and r.port != 0]
        ordered = _rfc2782_order(usable, self._rng, MAX_TARGETS)
        found = await asyncio.gather(
            *(
                self._addresses(r.target.to_text(), verify_host, transport, r.port, failed)
                for r in ordered
            )
        )
        return [target for group in found for target in group]

    async def _addresses(
        self, name: str, verify_host: str, transport: str, port: int, failed: list[str]
    ) -> list[Target]:
        """A then AAAA records of ``name``: IPv4 addresses are tried first."""
        ipv4, ipv6 = await asyncio.gather(
            self._lookup(name, "A", failed), self._lookup(name, "AAAA", failed)
        )
        return [
            Target(transport, verify_host.rstrip(".").lower(), record.address, port)
            for record in (*ipv4, *ipv6)
            if isinstance(record, A | AAAA)
        ]

    async def _lookup(self, name: str, rdtype_text: str, failed: list[str]) -> _Records:
        """Records of one question, from the cache or from one shared query.

        A failed question gives no records and is noted in ``failed``.
        """
        key = (name.lower(), dns.rdatatype.from_text(rdtype_text))
        cached = self._cache.get(key)
        if cached is not None and cached.expires > self._clock():
            return cached.records
        asking = self._asking.get(key)
        if asking is None:
            asking = asyncio.create_task(self._ask(*key))
            self._asking[key] = asking
            asking.add_done_callback(functools.partial(self._asked, key))
        records = await asyncio.shield(asking)
        if records is None:
            failed.append(f"{rdtype_text} {name.rstrip('.')}")
            return ()
        return records

    def _asked(
        self, key: tuple[str, dns.rdatatype.RdataType], _task: "asyncio.Task[_Records | None]"
    ) -> None:
        del self._asking[key]

    async def _ask(self, name: str, rdtype: dns.rdatatype.RdataType) -> _Records | None:
        """Query the nameservers once (with dnspython's retries); None when that failed."""
        try:
            async with asyncio.timeout(self._timeout):
                answer = await self._dns.resolve(
                    name, rdtype, raise_on_no_answer=False, search=False
                )
        except dns.resolver.NXDOMAIN as nxdomain:
            # The replies NXDOMAIN carries; each holds the SOA that sets its negative TTL.
            replies: dict[dns.name.Name, dns.message.QueryMessage] = nxdomain.kwargs["responses"]
            negative_ttl = min(
                (reply.resolve_chaining().minimum_ttl for reply in replies.values()), default=0
            )
            self._remember((name, rdtype), (), min(negative_ttl, NEGATIVE_TTL_CAP))
            return ()
        except (dns.exception.DNSException, OSError):
            # OSError covers TimeoutError from the asyncio bound and socket errors.
            return None
        ttl = answer.chaining_result.minimum_ttl
        if answer.rrset is None:
            self._remember((name, rdtype), (), min(ttl, NEGATIVE_TTL_CAP))
            return ()
        records = tuple(answer.rrset)
        self._remember((name, rdtype), records, min(ttl, MAX_TTL))
        return records

    def _remember(
        self, key: tuple[str, dns.rdatatype.RdataType], records: _Records, ttl: float
    ) -> None:
        """Cache ``records`` for ``ttl`` seconds; when full, expired then oldest entries go."""
        if ttl <= 0:
            return
        now = self._clock()
        if key not in self._cache and len(self._cache) >= CACHE_ENTRIES:
            for stale in [k for k, entry in self._cache.items() if entry.expires <= now]:
                del self._cache[stale]
            if len(self._cache) >= CACHE_ENTRIES:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = _Cached(now + ttl, records)


def _rfc2782_order(records: Sequence[SRV], rng: random.Random, limit: int) -> list[SRV]:
    """The first ``limit`` SRV records in the order RFC 2782 "Usage rules" gives.

    Lowest priority first.  Within a priority: "arrange all SRV RRs (that have
    not been ordered yet) in any order, except that all those with weight 0 are
    placed at the beginning of the list.  Compute the sum of the weights of
    those RRs, and with each RR associate the running sum in the selected
    order.  Then choose a uniform random number between 0 and the sum computed
    (inclusive), and select the RR whose running sum value is the first in the
    selected order which is greater than or equal to the random number
    selected."  The "any order" is a shuffle, so that records of weight 0 share
    the load too, and the extra chance the inclusive 0 gives the record arranged
    first falls on each record alike.
    """
    ordered: list[SRV] = []
    for priority in sorted({r.priority for r in records}):
        pending = [r for r in records if r.priority == priority]
        rng.shuffle(pending)
        pending.sort(key=lambda r: r.weight != 0)
        while pending and len(ordered) < limit:
            pick = rng.randint(0, sum(r.weight for r in pending))
            running = itertools.accumulate(r.weight for r in pending)
            index = next(i for i, total in enumerate(running) if total >= pick)
            ordered.append(pending.pop(index))
    return ordered


def _ip_literal(host: str) -> str | None:
    """The address when ``host`` is an IPv4 or (bracketed) IPv6 literal, else None."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        return None


def _domain(host: str) -> str:
    """``host`` as an absolute, lower-case domain name in DNS text form."""
    try:
        name = dns.name.from_text(host)
    except dns.exception.DNSException as exc:
        raise ResolveError(host, f"not a domain name ({exc})") from None
    if name == dns.name.root:
        raise ResolveError(host, "no domain name")
    return name.to_text().lower()


def _srv_name(transport: str, domain: str) -> str:
    """RFC 3263 section 4.2: "_sips" for TLS, "_sip" otherwise, then the protocol."""
    return f"{_SRV_PREFIXES[transport]}.{domain}"


def _no_target_reason(failed: list[str]) -> str:
    if not failed:
        return "DNS has no usable NAPTR, SRV, A or AAAA records"
    named = ", ".join(failed[:_FAILURES_NAMED])
    more = f" and {len(failed) - _FAILURES_NAMED} more" if len(failed) > _FAILURES_NAMED else ""
    return f"no usable records found; DNS lookups failed: {named}{more}"
