"""An authoritative DNS server on loopback for resolver tests.

It serves the records a test gives, as ``(name, type, ttl, rdata text)``
tuples, over UDP and TCP on one free port of 127.0.0.1.  Names it does not
hold get NXDOMAIN; names it holds without the asked type get an empty answer.
Both negative answers carry an SOA whose minimum (the negative TTL, RFC 2308)
the test picks.  A UDP answer longer than the client accepts (512 bytes
without EDNS) is sent truncated, so the client asks again over TCP.

It counts the questions it is asked per (name, type), and can be told to fail
(answer SERVFAIL, or stay silent) for every question or for some of them, and
then to recover.  ``respond`` replaces the answer with any bytes a test likes,
for malformed and odd replies.
"""

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Literal, Self, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

Record = tuple[str, str, int, str]
Question = tuple[str, str]
Failure = Literal["servfail", "silent"]

_UDP_PLAIN_LIMIT = 512
_TCP_LIMIT = 65535
_PORT_TRIES = 20


class DnsServer:
    """Async context manager: ``async with DnsServer(records) as server: server.address``."""

    def __init__(self, records: Iterable[Record] = (), *, negative_ttl: int = 30) -> None:
        self.queries: Counter[Question] = Counter()
        self.respond: Callable[[dns.message.Message], bytes | None] | None = None
        self._negative_ttl = negative_ttl
        self._failure: Failure | None = None
        self._failing: set[Question] | None = None
        self._zone: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], dns.rrset.RRset] = {}
        self._names: set[dns.name.Name] = set()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._streams: set[asyncio.StreamWriter] = set()
        self.set_records(records)

    @property
    def address(self) -> tuple[str, int]:
        """The (address, port) to give a resolver as its nameserver."""
        if self._udp is None:
            raise RuntimeError("the DNS server is not running")
        host, port = self._udp.get_extra_info("sockname")[:2]
        return host, port

    def set_records(self, records: Iterable[Record]) -> None:
        """Serve ``records`` from now on instead of the ones before."""
        grouped: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], list[Record]] = {}
        for record in records:
            name, rdtype = dns.name.from_text(record[0]), dns.rdatatype.from_text(record[1])
            grouped.setdefault((name, rdtype), []).append(record)
        self._zone = {
            key: dns.rrset.from_text_list(
                key[0], min(r[2] for r in group), "IN", key[1], [r[3] for r in group]
            )
            for key, group in grouped.items()
        }
        self._names = {name for name, _ in self._zone}

    def asked(self, name: str, rdtype: str) -> int:
        """How many times the question (``name`` without the final dot) came in."""
        return self.queries[(name.lower(), rdtype.upper())]

    def fail(self, how: Failure, questions: Iterable[Question] | None = None) -> None:
        """Fail every question, or only ``questions`` ((name, type) pairs), until recover()."""
        self._failure = how
        self._failing = (
            None if questions is None else {(n.lower(), t.upper()) for n, t in questions}
        )

    def recover(self) -> None:
        """Answer from the zone again."""
        self._failure = None
        self._failing = None

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        for _ in range(_PORT_TRIES):
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(self), local_addr=("127.0.0.1", 0)
            )
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_stream, "127.0.0.1", port)
            except OSError:
                udp.close()
                continue
            self._udp = udp
            return self
        raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._udp is not None:
            self._udp.close()
        for writer in list(self._streams):
            writer.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()

    def reply(self, wire: bytes, *, stream: bool) -> bytes | None:
        """The bytes to send back for the query ``wire``; None sends nothing."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if len(query.question) != 1:
            return None
        asked = query.question[0]
        question = (
            asked.name.to_text(omit_final_dot=True).lower(),
            dns.rdatatype.to_text(asked.rdtype),
        )
        self.queries[question] += 1
        if self.respond is not None:
            return self.respond(query)
        if self._failure is not None and (self._failing is None or question in self._failing):
            if self._failure == "silent":
                return None
            failure = dns.message.make_response(query)
            failure.set_rcode(dns.rcode.SERVFAIL)
            return failure.to_wire()
        return self.answer(query, _TCP_LIMIT if stream else _udp_limit(query))

    def answer(self, query: dns.message.Message, limit: int = _TCP_LIMIT) -> bytes:
        """The zone's answer to ``query``, truncated (TC set) when longer than ``limit``."""
        asked = query.question[0]
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        rrset = self._zone.get((asked.name, asked.rdtype))
        if rrset is not None:
            response.answer.append(rrset)
        else:
            if asked.name not in self._names:
                response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._soa())
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            return truncated.to_wire()

    def _soa(self) -> dns.rrset.RRset:
        ttl = self._negative_ttl
        return dns.rrset.from_text(
            dns.name.root, ttl, "IN", "SOA", f"ns.test. hostmaster.test. 1 3600 600 86400 {ttl}"
        )

    async def _serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """RFC 1035 section 4.2.2: each message is preceded by a two-byte length."""
        self._streams.add(writer)
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                answer = self.reply(await reader.readexactly(size), stream=True)
                if answer is not None:
                    writer.write(len(answer).to_bytes(2, "big") + answer)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._streams.discard(writer)
            writer.close()


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        answer = self._server.reply(data, stream=False)
        if answer is not None and self._transport is not None:
            self._transport.sendto(answer, addr)


def _udp_limit(query: dns.message.Message) -> int:
    """RFC 6891: an EDNS query states its UDP payload size; without EDNS it is 512."""
    return max(query.payload, _UDP_PLAIN_LIMIT) if query.edns >= 0 else _UDP_PLAIN_LIMIT
