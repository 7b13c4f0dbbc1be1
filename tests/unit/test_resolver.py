"""RFC 3263 server location against a real DNS server on loopback."""

import asyncio
import ipaddress
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from sipis.transport import resolver as resolver_module
from sipis.transport.resolver import (
    MAX_TARGETS,
    NEGATIVE_TTL_CAP,
    ResolveError,
    Resolver,
    Target,
)
from tests.peers.dnsserver import DnsServer, Record

# Answers come within milliseconds; the bound only has to survive a loaded machine.
QUERY_TIMEOUT = 2.0
# Where the server stays silent or answers garbage, every question waits this long.
FAILING_TIMEOUT = 0.5
TEST_BOUND = 5.0

# example.test offers TLS, TCP and UDP through NAPTR.
EXAMPLE: list[Record] = [
    ("example.test", "NAPTR", 300, '10 50 "s" "SIPS+D2T" "" _sips._tcp.example.test.'),
    ("example.test", "NAPTR", 300, '10 60 "s" "SIP+D2T" "" _sip._tcp.example.test.'),
    ("example.test", "NAPTR", 300, '20 10 "s" "SIP+D2U" "" _sip._udp.example.test.'),
    ("_sips._tcp.example.test", "SRV", 300, "0 0 5061 tls.example.test."),
    ("_sip._tcp.example.test", "SRV", 300, "0 0 5060 tcp.example.test."),
    ("_sip._udp.example.test", "SRV", 300, "0 0 5060 udp.example.test."),
    ("tls.example.test", "A", 300, "192.0.2.10"),
    ("tcp.example.test", "A", 300, "192.0.2.20"),
    ("tcp.example.test", "AAAA", 300, "2001:db8::20"),
    ("udp.example.test", "A", 300, "192.0.2.30"),
]
# srv.test has no NAPTR (the name does not exist), only SRV for UDP and TLS.
SRV_ONLY: list[Record] = [
    ("_sip._udp.srv.test", "SRV", 300, "0 0 5070 host.srv.test."),
    ("_sips._tcp.srv.test", "SRV", 300, "0 0 5071 host.srv.test."),
    ("host.srv.test", "A", 300, "192.0.2.40"),
]
# plain.test has addresses only.
PLAIN: list[Record] = [
    ("plain.test", "A", 300, "192.0.2.50"),
    ("plain.test", "AAAA", 300, "2001:db8::50"),
]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def resolver_for(server: DnsServer, **options: Any) -> Resolver:
    options.setdefault("timeout", QUERY_TIMEOUT)
    options.setdefault("clock", FakeClock())
    options.setdefault("rng", random.Random(7))
    return Resolver([server.address], **options)


async def resolve(
    resolver: Resolver,
    host: str,
    port: int | None = None,
    transport: str | None = None,
    secure: bool = False,
) -> list[Target]:
    async with asyncio.timeout(TEST_BOUND):
        return await resolver.resolve(host, port, transport, secure)


def udp(host: str, address: str, port: int = 5060) -> Target:
    return Target("udp", host, address, port)


def tcp(host: str, address: str, port: int = 5060) -> Target:
    return Target("tcp", host, address, port)


def tls(host: str, address: str, port: int = 5061) -> Target:
    return Target("tls", host, address, port)


# --- no DNS at all ----------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "transport", "secure", "expected"),
    [
        ("192.0.2.7", None, None, False, udp("192.0.2.7", "192.0.2.7")),
        ("192.0.2.7", 5099, "TCP", False, tcp("192.0.2.7", "192.0.2.7", 5099)),
        ("[2001:db8::7]", None, None, True, tls("2001:db8::7", "2001:db8::7")),
        ("[2001:db8::7]", 5071, "tcp", True, tls("2001:db8::7", "2001:db8::7", 5071)),
        ("2001:db8::7", None, "tls", False, tls("2001:db8::7", "2001:db8::7")),
    ],
)
async def test_ip_literal_host_needs_no_dns(host, port, transport, secure, expected):
    async with DnsServer(EXAMPLE) as server:
        found = await resolve(resolver_for(server), host, port, transport, secure)
        assert found == [expected]
        assert server.queries == Counter()


# --- NAPTR ------------------------------------------------------------------


async def test_naptr_is_followed_by_order_then_preference():
    async with DnsServer(EXAMPLE) as server:
        found = await resolve(resolver_for(server), "example.test")
    assert found == [
        tls("example.test", "192.0.2.10"),
        tcp("example.test", "192.0.2.20"),
        tcp("example.test", "2001:db8::20"),
        udp("example.test", "192.0.2.30"),
    ]


async def test_certificate_name_is_the_uri_host_not_the_srv_target():
    async with DnsServer(EXAMPLE) as server:
        found = await resolve(resolver_for(server), "Example.TEST.", secure=True)
    assert [t.host for t in found] == ["example.test"]
    assert found[0].address == "192.0.2.10"


async def test_secure_keeps_only_sips_services():
    async with DnsServer(EXAMPLE) as server:
        found = await resolve(resolver_for(server), "example.test", secure=True)
        assert found == [tls("example.test", "192.0.2.10")]
        assert server.asked("_sip._tcp.example.test", "SRV") == 0
        assert server.asked("_sip._udp.example.test", "SRV") == 0


async def test_naptr_services_are_limited_to_enabled_transports():
    async with DnsServer(EXAMPLE) as server:
        found = await resolve(resolver_for(server, transports=("udp",)), "example.test")
        assert found == [udp("example.test", "192.0.2.30")]
        assert server.asked("_sips._tcp.example.test", "SRV") == 0
        assert server.asked("_sip._tcp.example.test", "SRV") == 0


async def test_unusable_naptr_records_lead_to_srv_lookups():
    records = [
        ("odd.test", "NAPTR", 300, '10 10 "u" "SIP+D2U" "!^.*$!sip:x@odd.test!" .'),
        ("odd.test", "NAPTR", 300, '10 20 "s" "SIP+D2S" "" _sip._sctp.odd.test.'),
        ("odd.test", "NAPTR", 300, '10 30 "s" "E2U+sip" "" _sip._udp.elsewhere.test.'),
        ("odd.test", "NAPTR", 300, '10 40 "s" "SIP+D2U" "" .'),
        ("odd.test", "NAPTR", 300, '10 50 "a" "SIP+D2T" "" tcp.odd.test.'),
        ("_sip._sctp.odd.test", "SRV", 300, "0 0 5060 host.odd.test."),
        ("_sip._udp.elsewhere.test", "SRV", 300, "0 0 5060 host.odd.test."),
        ("_sip._tcp.odd.test", "SRV", 300, "0 0 5090 host.odd.test."),
        ("host.odd.test", "A", 300, "192.0.2.60"),
        ("tcp.odd.test", "A", 300, "192.0.2.61"),
    ]
    async with DnsServer(records) as server:
        found = await resolve(resolver_for(server), "odd.test")
        assert found == [tcp("odd.test", "192.0.2.60", 5090)]
        assert server.asked("_sip._sctp.odd.test", "SRV") == 0
        assert server.asked("_sip._udp.elsewhere.test", "SRV") == 0
        assert server.asked("tcp.odd.test", "A") == 0


async def test_naptr_whose_srv_is_missing_falls_through_to_srv_lookups():
    records = [
        ("gap.test", "NAPTR", 300, '10 10 "s" "SIP+D2T" "" _sip._tcp.missing.test.'),
        ("_sip._udp.gap.test", "SRV", 300, "0 0 5062 host.gap.test."),
        ("host.gap.test", "A", 300, "192.0.2.61"),
    ]
    async with DnsServer(records) as server:
        found = await resolve(resolver_for(server), "gap.test")
        assert found == [udp("gap.test", "192.0.2.61", 5062)]
        assert server.asked("_sip._tcp.missing.test", "SRV") == 1


# --- SRV without NAPTR, and addresses ----------------------------------------


async def test_without_naptr_srv_is_asked_for_each_transport_in_preference_order():
    async with DnsServer(SRV_ONLY) as server:
        default_order = await resolve(resolver_for(server), "srv.test")
        tls_first = await resolve(
            resolver_for(server, transports=("tls", "tcp", "udp")), "srv.test"
        )
        assert server.asked("srv.test", "NAPTR") == 2
        assert server.asked("_sip._tcp.srv.test", "SRV") == 2
    assert default_order == [
        udp("srv.test", "192.0.2.40", 5070),
        tls("srv.test", "192.0.2.40", 5071),
    ]
    assert tls_first == [tls("srv.test", "192.0.2.40", 5071), udp("srv.test", "192.0.2.40", 5070)]


@pytest.mark.parametrize(
    ("secure", "transports", "expected_transport", "expected_port"),
    [
        (False, ("udp", "tcp", "tls"), "udp", 5060),
        (True, ("udp", "tcp", "tls"), "tls", 5061),
        (False, ("tcp", "tls"), "tcp", 5060),
    ],
)
async def test_without_naptr_and_srv_the_host_is_used_at_the_default_port(
    secure, transports, expected_transport, expected_port
):
    async with DnsServer(PLAIN) as server:
        found = await resolve(
            resolver_for(server, transports=transports), "plain.test", secure=secure
        )
    assert found == [
        Target(expected_transport, "plain.test", "192.0.2.50", expected_port),
        Target(expected_transport, "plain.test", "2001:db8::50", expected_port),
    ]


async def test_explicit_port_asks_only_for_addresses():
    async with DnsServer(EXAMPLE) as server:
        found = await resolve(resolver_for(server), "tcp.example.test", 5099)
        with_transport = await resolve(resolver_for(server), "tcp.example.test", 5099, "tcp")
        assert {question[1] for question in server.queries} == {"A", "AAAA"}
    assert found == [
        udp("tcp.example.test", "192.0.2.20", 5099),
        udp("tcp.example.test", "2001:db8::20", 5099),
    ]
    assert [t.transport for t in with_transport] == ["tcp", "tcp"]


async def test_ipv6_only_host():
    async with DnsServer([("six.test", "AAAA", 300, "2001:db8::6")]) as server:
        found = await resolve(resolver_for(server), "six.test", 5060)
    assert found == [udp("six.test", "2001:db8::6")]


@pytest.mark.parametrize(
    ("transport", "secure", "expected"),
    [
        ("tcp", False, [tcp("example.test", "192.0.2.20"), tcp("example.test", "2001:db8::20")]),
        ("UDP", False, [udp("example.test", "192.0.2.30")]),
        ("tls", False, [tls("example.test", "192.0.2.10")]),
        ("tcp", True, [tls("example.test", "192.0.2.10")]),
    ],
)
async def test_transport_parameter_asks_for_its_srv_only(transport, secure, expected):
    async with DnsServer(EXAMPLE) as server:
        found = await resolve(resolver_for(server), "example.test", None, transport, secure)
        assert server.asked("example.test", "NAPTR") == 0
        assert sum(n for (_, rdtype), n in server.queries.items() if rdtype == "SRV") == 1
    assert found == expected


@pytest.mark.parametrize(("transport", "port"), [("tcp", 5060), ("tls", 5061), ("udp", 5060)])
async def test_transport_parameter_without_srv_uses_the_default_port(transport, port):
    async with DnsServer(PLAIN) as server:
        found = await resolve(resolver_for(server), "plain.test", None, transport)
    assert found == [
        Target(transport, "plain.test", "192.0.2.50", port),
        Target(transport, "plain.test", "2001:db8::50", port),
    ]


async def test_srv_target_dot_means_no_service_and_no_fallback():
    records = [
        ("_sip._udp.closed.test", "SRV", 300, "0 0 0 ."),
        ("closed.test", "A", 300, "192.0.2.70"),
    ]
    async with DnsServer(records) as server:
        with pytest.raises(ResolveError, match=r"closed\.test"):
            await resolve(resolver_for(server), "closed.test", None, "udp")
        assert server.asked("closed.test", "A") == 0


async def test_srv_records_with_port_zero_are_skipped():
    records = [
        ("_sip._udp.zero.test", "SRV", 300, "0 0 0 host.zero.test."),
        ("_sip._udp.zero.test", "SRV", 300, "5 0 5080 host.zero.test."),
        ("host.zero.test", "A", 300, "192.0.2.71"),
    ]
    async with DnsServer(records) as server:
        found = await resolve(resolver_for(server), "zero.test", None, "udp")
    assert found == [udp("zero.test", "192.0.2.71", 5080)]


async def test_duplicate_targets_are_listed_once():
    records = [
        ("dup.test", "NAPTR", 300, '10 10 "s" "SIP+D2U" "" _sip._udp.dup.test.'),
        ("dup.test", "NAPTR", 300, '10 20 "s" "SIP+D2U" "" _sip._udp.dup.test.'),
        ("_sip._udp.dup.test", "SRV", 300, "0 0 5060 a.dup.test."),
        ("_sip._udp.dup.test", "SRV", 300, "1 0 5060 b.dup.test."),
        ("a.dup.test", "A", 300, "192.0.2.80"),
        ("b.dup.test", "A", 300, "192.0.2.80"),
    ]
    async with DnsServer(records) as server:
        found = await resolve(resolver_for(server), "dup.test")
    assert found == [udp("dup.test", "192.0.2.80")]


# --- RFC 2782 ordering --------------------------------------------------------


def srv_set(domain: str, entries: list[tuple[int, int, str]]) -> list[Record]:
    """SRV records (priority, weight, host label) for UDP, each host with one address."""
    records: list[Record] = []
    for number, (priority, weight, label) in enumerate(entries, start=1):
        records.append(
            (f"_sip._udp.{domain}", "SRV", 300, f"{priority} {weight} 5060 {label}.{domain}.")
        )
        records.append((f"{label}.{domain}", "A", 300, f"192.0.2.{number}"))
    return records


async def first_choices(resolver: Resolver, domain: str, rounds: int) -> Counter[str]:
    """How often each address came first over ``rounds`` resolutions of ``domain`` over UDP."""
    firsts: Counter[str] = Counter()
    for _ in range(rounds):
        found = await resolve(resolver, domain, None, "udp")
        firsts[found[0].address] += 1
    return firsts


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
async def test_srv_priority_sets_the_failover_order(seed):
    entries = [(20, 5, "b"), (10, 1, "a"), (30, 50, "c"), (20, 5, "d")]
    async with DnsServer(srv_set("prio.test", entries)) as server:
        found = await resolve(
            resolver_for(server, rng=random.Random(seed)), "prio.test", None, "udp"
        )
    addresses = [t.address for t in found]
    assert addresses[0] == "192.0.2.2"
    assert set(addresses[1:3]) == {"192.0.2.1", "192.0.2.4"}
    assert addresses[3] == "192.0.2.3"


async def test_srv_weights_share_the_load():
    entries = [(10, 1, "light"), (10, 3, "heavy"), (20, 100, "backup")]
    async with DnsServer(srv_set("weight.test", entries)) as server:
        resolver = resolver_for(server, rng=random.Random(2782))
        firsts = await first_choices(resolver, "weight.test", 2000)
        assert server.asked("_sip._udp.weight.test", "SRV") == 1
    assert firsts["192.0.2.3"] == 0
    # RFC 2782 draws from 0..sum inclusive, so the record arranged first also wins
    # on 0: heavy first 1/2 * 4/5 + 1/2 * 3/5 = 70 % (standard deviation about 1 %).
    assert 0.66 < firsts["192.0.2.2"] / 2000 < 0.74
    assert firsts["192.0.2.1"] + firsts["192.0.2.2"] == 2000


async def test_weight_zero_is_picked_rarely_but_not_never():
    entries = [(10, 0, "zero"), (10, 10, "ten")]
    async with DnsServer(srv_set("zero.test", entries)) as server:
        firsts = await first_choices(resolver_for(server, rng=random.Random(11)), "zero.test", 1100)
    # RFC 2782: weight 0 records "should have a very small chance of being selected".
    # Expected 1100 / 11 = 100 (standard deviation about 9.5).
    assert 70 < firsts["192.0.2.1"] < 130
    assert firsts["192.0.2.1"] + firsts["192.0.2.2"] == 1100


async def test_records_all_of_weight_zero_share_the_load():
    entries = [(10, 0, "a"), (10, 0, "b"), (10, 0, "c")]
    async with DnsServer(srv_set("flat.test", entries)) as server:
        firsts = await first_choices(resolver_for(server, rng=random.Random(3)), "flat.test", 600)
    assert all(150 < firsts[f"192.0.2.{n}"] < 250 for n in (1, 2, 3))


async def test_targets_are_capped_and_a_truncated_answer_is_asked_again_over_tcp():
    entries = [(10, 1, f"host{n:02d}") for n in range(40)]
    async with DnsServer(srv_set("many.test", entries)) as server:
        found = await resolve(resolver_for(server), "many.test", None, "udp")
        address_queries = sum(n for (name, rdtype), n in server.queries.items() if rdtype == "A")
        # One question over UDP, answered truncated, then the same over TCP.
        assert server.asked("_sip._udp.many.test", "SRV") == 2
    assert len(found) == MAX_TARGETS
    assert len({t.address for t in found}) == MAX_TARGETS
    assert address_queries == MAX_TARGETS


# --- cache --------------------------------------------------------------------


async def test_answers_are_cached_for_their_ttl():
    records = [
        ("_sip._tcp.ttl.test", "SRV", 300, "0 0 5060 host.ttl.test."),
        ("host.ttl.test", "A", 60, "192.0.2.90"),
    ]
    clock = FakeClock()
    async with DnsServer(records) as server:
        resolver = resolver_for(server, clock=clock)
        first = await resolve(resolver, "ttl.test", None, "tcp")
        before = server.queries.copy()
        assert await resolve(resolver, "ttl.test", None, "tcp") == first
        assert server.queries == before

        clock.advance(61)
        assert await resolve(resolver, "ttl.test", None, "tcp") == first
        assert server.asked("host.ttl.test", "A") == 2
        assert server.asked("_sip._tcp.ttl.test", "SRV") == 1

        clock.advance(240)
        await resolve(resolver, "ttl.test", None, "tcp")
        assert server.asked("_sip._tcp.ttl.test", "SRV") == 2
    assert first == [tcp("ttl.test", "192.0.2.90")]


@pytest.mark.parametrize(("negative_ttl", "kept"), [(10, 10), (3600, NEGATIVE_TTL_CAP)])
async def test_negative_answers_are_cached_briefly(negative_ttl, kept):
    """srv.test does not exist (NXDOMAIN); plain.test exists without NAPTR (no data)."""
    clock = FakeClock()
    async with DnsServer(SRV_ONLY + PLAIN, negative_ttl=negative_ttl) as server:
        resolver = resolver_for(server, clock=clock)
        for _ in range(2):
            await resolve(resolver, "srv.test")
            await resolve(resolver, "plain.test")
        assert server.asked("srv.test", "NAPTR") == 1
        assert server.asked("plain.test", "NAPTR") == 1
        assert server.asked("_sip._tcp.srv.test", "SRV") == 1
        clock.advance(kept - 1)
        await resolve(resolver, "srv.test")
        await resolve(resolver, "plain.test")
        assert server.asked("srv.test", "NAPTR") == 1
        assert server.asked("plain.test", "NAPTR") == 1
        clock.advance(2)
        await resolve(resolver, "srv.test")
        await resolve(resolver, "plain.test")
        assert server.asked("srv.test", "NAPTR") == 2
        assert server.asked("plain.test", "NAPTR") == 2
        assert server.asked("_sip._tcp.srv.test", "SRV") == 2
        assert server.asked("_sip._udp.srv.test", "SRV") == 1


async def test_a_full_cache_drops_its_oldest_entries(monkeypatch):
    monkeypatch.setattr(resolver_module, "CACHE_ENTRIES", 4)
    records = [(f"h{n}.test", "A", 300, f"192.0.2.{n}") for n in (1, 2, 3)]
    async with DnsServer(records) as server:
        resolver = resolver_for(server)
        for host in ("h1.test", "h2.test", "h3.test", "h3.test", "h1.test"):
            await resolve(resolver, host, 5060)
        assert server.asked("h1.test", "A") == 2
        assert server.asked("h1.test", "AAAA") == 2
        assert server.asked("h3.test", "A") == 1


async def test_concurrent_resolves_share_one_query_per_question():
    async with DnsServer(EXAMPLE) as server:
        # A generous timeout: a retry under load would count as a second query.
        resolver = resolver_for(server, timeout=3.0)
        async with asyncio.timeout(TEST_BOUND):
            results = await asyncio.gather(
                *(resolver.resolve("example.test", None, None, False) for _ in range(20))
            )
        assert all(result == results[0] for result in results)
        assert len(results[0]) == 4
        assert server.asked("example.test", "NAPTR") == 1
        assert server.asked("tcp.example.test", "AAAA") == 1


# --- failures -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["servfail", "silent"])
async def test_naptr_failure_still_lets_srv_and_addresses_resolve(how):
    async with DnsServer(SRV_ONLY + PLAIN) as server:
        server.fail(how, [("srv.test", "NAPTR"), ("plain.test", "NAPTR")])
        resolver = resolver_for(server, timeout=FAILING_TIMEOUT)
        via_srv = await resolve(resolver, "srv.test")
        via_address = await resolve(resolver, "plain.test")
    assert via_srv == [udp("srv.test", "192.0.2.40", 5070), tls("srv.test", "192.0.2.40", 5071)]
    assert via_address == [udp("plain.test", "192.0.2.50"), udp("plain.test", "2001:db8::50")]


async def test_srv_failure_falls_back_to_addresses():
    async with DnsServer(
        [*PLAIN, ("_sip._tcp.plain.test", "SRV", 300, "0 0 5080 x.test.")]
    ) as server:
        server.fail("servfail", [("_sip._tcp.plain.test", "SRV")])
        found = await resolve(resolver_for(server), "plain.test", None, "tcp")
    assert found == [tcp("plain.test", "192.0.2.50"), tcp("plain.test", "2001:db8::50")]


@pytest.mark.parametrize("how", ["servfail", "silent"])
async def test_dns_failing_then_recovering(how):
    clock = FakeClock()
    async with DnsServer(EXAMPLE) as server:
        resolver = resolver_for(server, clock=clock, timeout=FAILING_TIMEOUT)
        server.fail(how)
        started = time.monotonic()
        with pytest.raises(ResolveError, match=r"example\.test.*DNS lookups failed: NAPTR"):
            await resolve(resolver, "example.test")
        # NAPTR, then the SRV lookups together, then the address lookups together.
        assert time.monotonic() - started < 4 * FAILING_TIMEOUT + 1
        failed_queries = server.asked("example.test", "NAPTR")
        assert failed_queries >= 1

        server.recover()
        found = await resolve(resolver, "example.test")
        assert server.asked("example.test", "NAPTR") == failed_queries + 1
    assert len(found) == 4


async def test_cached_answers_outlive_a_dns_failure():
    clock = FakeClock()
    async with DnsServer(EXAMPLE) as server:
        resolver = resolver_for(server, clock=clock)
        first = await resolve(resolver, "example.test")
        server.fail("servfail")
        clock.advance(299)
        assert await resolve(resolver, "example.test") == first
        clock.advance(2)
        with pytest.raises(ResolveError):
            await resolve(resolver, "example.test")


def raw(data: bytes) -> Callable[[dns.message.Message], bytes]:
    return lambda _query: data


def with_id(offset: int) -> Callable[[dns.message.Message], bytes]:
    def respond(query: dns.message.Message) -> bytes:
        response = dns.message.make_response(query)
        response.id = (query.id + offset) % 65536
        return response.to_wire()

    return respond


def with_rcode(
    rcode: dns.rcode.Rcode, answer: str | None = None
) -> Callable[[dns.message.Message], bytes]:
    def respond(query: dns.message.Message) -> bytes:
        response = dns.message.make_response(query)
        response.set_rcode(rcode)
        if answer is not None:
            response.answer.append(
                dns.rrset.from_text(query.question[0].name, 60, "IN", *answer.split(" ", 1))
            )
        return response.to_wire()

    return respond


def cname_loop(query: dns.message.Message) -> bytes:
    response = dns.message.make_response(query)
    name = query.question[0].name
    response.answer.append(dns.rrset.from_text(name, 60, "IN", "CNAME", name.to_text()))
    return response.to_wire()


def truncated_everywhere(query: dns.message.Message) -> bytes:
    response = dns.message.make_response(query)
    response.flags |= dns.flags.TC
    return response.to_wire()


def cut_short(query: dns.message.Message) -> bytes:
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "192.0.2.1"))
    return response.to_wire()[:-3]


def wrong_question(query: dns.message.Message) -> bytes:
    other = dns.message.make_query("elsewhere.test", query.question[0].rdtype)
    other.id = query.id
    response = dns.message.make_response(other)
    response.answer.append(dns.rrset.from_text("elsewhere.test", 60, "IN", "A", "192.0.2.1"))
    return response.to_wire()


@pytest.mark.parametrize(
    "respond",
    [
        pytest.param(raw(b""), id="empty"),
        pytest.param(raw(b"\xff" * 3), id="short"),
        pytest.param(raw(bytes(random.Random(5).randrange(256) for _ in range(300))), id="noise"),
        pytest.param(with_id(1), id="wrong-id"),
        pytest.param(cut_short, id="cut-short"),
        pytest.param(wrong_question, id="wrong-question"),
        pytest.param(with_rcode(dns.rcode.REFUSED), id="refused"),
        pytest.param(with_rcode(dns.rcode.FORMERR), id="formerr"),
        pytest.param(with_rcode(dns.rcode.NOTIMP), id="notimp"),
        pytest.param(with_rcode(dns.rcode.NXDOMAIN, "A 192.0.2.1"), id="nxdomain-with-answer"),
        pytest.param(with_rcode(dns.rcode.NOERROR, "TXT hello"), id="type-mismatch"),
        pytest.param(cname_loop, id="cname-loop"),
        pytest.param(truncated_everywhere, id="truncated-on-tcp-too"),
    ],
)
async def test_malformed_and_odd_answers_raise_only_resolve_error(respond):
    async with DnsServer(EXAMPLE) as server:
        server.respond = respond
        started = time.monotonic()
        with pytest.raises(ResolveError, match=r"example\.test"):
            await resolve(resolver_for(server, timeout=FAILING_TIMEOUT), "example.test")
        assert time.monotonic() - started < 4 * FAILING_TIMEOUT + 1
        assert server.asked("example.test", "NAPTR") >= 1


async def test_mangled_answers_give_targets_or_resolve_error():
    """Valid answers with a few bytes overwritten: well-formed targets or ResolveError."""
    rng = random.Random(3263)
    outcomes: Counter[str] = Counter()

    async with DnsServer(EXAMPLE) as server:

        def mangle(query: dns.message.Message) -> bytes:
            wire = bytearray(server.answer(query))
            for _ in range(rng.randint(1, 4)):
                wire[rng.randrange(2, len(wire))] = rng.randrange(256)
            return bytes(wire)

        server.respond = mangle
        for _ in range(20):
            try:
                found = await resolve(resolver_for(server, timeout=0.1), "example.test")
            except ResolveError:
                outcomes["error"] += 1
                continue
            outcomes["targets"] += 1
            for target in found:
                assert target.transport in {"udp", "tcp", "tls"}
                assert target.host == "example.test"
                assert ipaddress.ip_address(target.address)
                assert 0 < target.port < 65536
    assert outcomes["error"] > 0
    assert outcomes["error"] + outcomes["targets"] == 20


# --- bad input ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "transport", "secure", "reason"),
    [
        ("", None, None, False, "no domain name"),
        ("a..test", None, None, False, "not a domain name"),
        ("x" * 64 + ".test", None, None, False, "not a domain name"),
        ("example.test", 0, None, False, "out of range"),
        ("example.test", 65536, None, False, "out of range"),
        ("example.test", None, "sctp", False, "not enabled"),
        ("example.test", None, "udp", True, "cannot carry a sips URI"),
    ],
)
async def test_bad_input_raises_resolve_error_naming_the_host(
    host, port, transport, secure, reason
):
    async with DnsServer(EXAMPLE) as server:
        with pytest.raises(ResolveError, match=reason) as raised:
            await resolve(resolver_for(server), host, port, transport, secure)
        assert server.queries == Counter()
    assert raised.value.host == host
    assert repr(host) in str(raised.value)


async def test_sips_needs_tls_enabled():
    async with DnsServer(EXAMPLE) as server:
        resolver = resolver_for(server, transports=("udp", "tcp"))
        with pytest.raises(ResolveError, match="needs TLS"):
            await resolve(resolver, "example.test", secure=True)


async def test_unknown_name_raises_resolve_error_without_failures():
    async with DnsServer(EXAMPLE) as server:
        with pytest.raises(ResolveError, match="no usable NAPTR, SRV, A or AAAA") as raised:
            await resolve(resolver_for(server), "nowhere.test")
        assert server.asked("nowhere.test", "A") == 1
    assert "failed" not in str(raised.value)


def test_transports_must_be_known():
    with pytest.raises(ValueError, match="transports"):
        Resolver([("127.0.0.1", 53)], transports=("udp", "sctp"))
    with pytest.raises(ValueError, match="transports"):
        Resolver([("127.0.0.1", 53)], transports=())
