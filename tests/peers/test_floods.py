"""Floods on every listener: the relay keeps its binding registered and its API answering.

Each test runs a relay with one instance whose account registers at
Kamailio.  Kamailio grants at most ``GRANTED_EXPIRES`` seconds, so the
binding refreshes every four seconds and a refresh crosses every flood.
While the flood runs, ``ApiProbe`` asks ``GET /healthz`` and the instance's
own ``GET /v1/instances/{id}`` in turn, each within ``API_BOUND`` seconds,
and the account must read ``registered`` every time (but in 1, see there);
and Kamailio must come to hold the contact with a higher CSeq than before
(a refresh got through).

The floods:

1. random and truncated datagrams on the SIP and device UDP ports, from
   another process, as fast as it can send them: the API answers, the
   refreshes go out, and everything is back once the flood ends;
2. half-open TCP on the device and SIP TCP ports: connections past the
   per-source and total limits are refused at once, silent and half-sent
   ones end after the idle timeout, an app registered over TCP stays;
3. TLS connections that never finish their handshake: ended by the
   handshake timeout while a real TLS app registers;
4. messages past the size cap over TCP and TLS: each connection ends, a
   request whose head could be read told 513 first;
5. 10,000 connections, each sending half a message, against a ``sipis
   serve`` process limited to 2,000: it holds no more descriptors than
   that, its memory stays within ``PER_CONNECTION_BUDGET`` per connection
   held, it serves SIP over UDP and its API meanwhile, and once they go its
   descriptors are back where they started and it takes connections again;
   a second wave stays within the same bound.

Floods from another process are this module's functions run with
``python -c``; the relay under test runs in this process except in 5,
where its resident memory is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from sipis.sip.digest import DigestClient, parse_challenge, select_challenge
from sipis.sip.message import MAX_MESSAGE_SIZE, Response, StreamFramer
from sipis.transport.layer import TransportLayer
from tests.conftest import PEER_USERS
from tests.peers.api import ApiClient, RunningRelay, instance_body, relay_with_api
from tests.peers.kamailio import Kamailio
from tests.peers.loopback import free_port, tail
from tests.peers.relay import relay_config

pytestmark = pytest.mark.peer

ROOT = Path(__file__).resolve().parents[2]
GRANTED_EXPIRES = 6  # Kamailio's max_expires: sipis refreshes 4 s after each registration
API_BOUND = 1.0  # seconds within which every API answer must come, floods or not
PROBE_INTERVAL = 0.1
SIP_TIMEOUT = 5.0
UDP_FLOOD_SECONDS = 4.5  # longer than the refresh period: a refresh falls inside
FLOOD_PROCESS_TIMEOUT = 20.0
# Other processes run as in production: without asyncio's debug mode, which this
# process's conftest turns on and which slows a loop with thousands of sockets tenfold.
PRODUCTION_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"}
# The start of a TLS record carrying a ClientHello that announces 131000 bytes: a
# handshake begun and never finished.
CLIENT_HELLO_START = bytes.fromhex("16030140000101ffb80303")

# 5: the node's limit, the connections thrown at it, and the memory each admitted
# connection may cost (a few KiB, plus the half-sent message or TLS handshake it holds).
MANY_LIMIT = 2000
MANY_CONNECTIONS = 10_000
MANY_SOURCES = 100
PER_CONNECTION_BUDGET = 128 * 1024
HALF_SENT_HEADER = 32 * 1024
HALF_SENT_HELLO = 8 * 1024


@pytest.fixture
async def kamailio(tmp_path: Path, peer_ca: trustme.CA) -> AsyncIterator[Kamailio]:
    """Kamailio as in tests/conftest.py, granting registrations of at most GRANTED_EXPIRES s."""
    async with Kamailio(
        PEER_USERS,
        ca=peer_ca,
        min_expires=4,
        max_expires=GRANTED_EXPIRES,
        workdir=tmp_path / "kamailio",
    ) as server:
        yield server


# -- the relay under test, and what is checked while it is flooded ----------------------


@dataclass
class Instance:
    id: str
    secret: str


@dataclass
class Node:
    """A relay with one instance registered at Kamailio, as the floods find it."""

    kamailio: Kamailio
    api: ApiClient
    instance: Instance
    ports: dict[str, int]
    running: RunningRelay | None = None

    async def contact_cseq(self) -> int:
        """The CSeq of the binding's contact at Kamailio (it grows with every refresh)."""
        contacts = await self.kamailio.contacts("alice")
        assert len(contacts) == 1, contacts
        return contacts[0]["cseq"]

    async def refreshed_since(self, cseq: int) -> int:
        """Wait (bounded) until a refresh newer than ``cseq`` reached Kamailio; its CSeq."""
        async with asyncio.timeout(2 * GRANTED_EXPIRES):
            while (now := await self.contact_cseq()) <= cseq:
                await asyncio.sleep(0.2)
        return now

    @property
    def device_transport(self) -> TransportLayer:
        assert self.running is not None
        return self.running.relay.device_transport

    @property
    def sip_transport(self) -> TransportLayer:
        assert self.running is not None
        return self.running.relay.transport


async def create_instance(api: ApiClient, kamailio: Kamailio) -> Instance:
    body = instance_body(kamailio.uri("udp"), user="alice", password=PEER_USERS["alice"])
    body["accounts"][0]["expires"] = 60  # the smallest the API takes; Kamailio grants less
    status, created = await api.call("POST", "/v1/instances", body=body)
    assert status == 201, created
    await kamailio.wait_for_contacts("alice", bool)
    return Instance(created["id"], created["secret"])


@asynccontextmanager
async def running_node(
    tmp_path: Path, kamailio: Kamailio, **sections: dict[str, Any]
) -> AsyncIterator[Node]:
    """A relay in this process, its provider side with a TCP port too, and its instance."""
    sip = {"tcp_port": 0, **sections.pop("sip", {})}
    async with relay_with_api(tmp_path, sip=sip, log={"level": "info"}, **sections) as running:
        instance = await create_instance(running.client, kamailio)
        ports = {
            **{f"sip_{k}": v for k, v in running.relay.transport.listening.items()},
            **{f"device_{k}": v for k, v in running.relay.device_transport.listening.items()},
        }
        yield Node(kamailio, running.client, instance, ports, running)


@dataclass
class ApiProbe:
    """Asks GET /healthz and the instance's GET in turn until stopped; notes what went wrong
    (with ``registered``, an account not registered too) and the account states seen."""

    api: ApiClient
    instance: Instance
    registered: bool
    answers: int = 0
    slowest: float = 0.0
    problems: list[str] = field(default_factory=list)
    states: set[str] = field(default_factory=set)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        asks = [("/healthz", None), (f"/v1/instances/{self.instance.id}", self.instance.secret)]
        while True:
            for path, secret in asks:
                started = loop.time()
                try:
                    async with asyncio.timeout(API_BOUND):
                        status, answer = await self.api.call("GET", path, secret=secret)
                except TimeoutError:
                    self.problems.append(f"GET {path}: no answer within {API_BOUND} s")
                    continue
                except aiohttp.ClientError as exc:
                    self.problems.append(f"GET {path}: {exc!r}")
                    continue
                self.slowest = max(self.slowest, loop.time() - started)
                self.answers += 1
                if status != 200:
                    self.problems.append(f"GET {path}: {status} {answer}")
                elif secret is not None:
                    state = answer["accounts"][0]["state"]
                    self.states.add(state)
                    if self.registered and state != "registered":
                        self.problems.append(f"account {state}")
            await asyncio.sleep(PROBE_INTERVAL)

    def check(self, at_least: int) -> None:
        assert not self.problems, self.problems[:10]
        assert self.answers >= at_least, f"only {self.answers} API answers"


@asynccontextmanager
async def probing(node: Node, *, registered: bool = True) -> AsyncIterator[ApiProbe]:
    probe = ApiProbe(node.api, node.instance, registered)
    task = asyncio.ensure_future(probe.run())
    try:
        yield probe
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- SIP peers ------------------------------------------------------------------------

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Peers:
    """Client connections opened by a test; all closed when it ends."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []

    async def connect(
        self,
        port: int,
        source: str = "127.0.0.1",
        *,
        tls: ssl.SSLContext | None = None,
        send: bytes = b"",
    ) -> Connection:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(source, 0), ssl=tls
        )
        self.writers.append(writer)
        if send:
            writer.write(send)
        return reader, writer

    async def many(
        self, port: int, source: str, count: int, send: Callable[[int], bytes] = lambda _: b""
    ) -> list[Connection]:
        """``count`` connections from ``source``, one after the other (so accepted in order)."""
        return [await self.connect(port, source, send=send(n)) for n in range(count)]

    async def close(self) -> None:
        writers, self.writers = self.writers, []
        for writer in writers:
            writer.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)


@pytest.fixture
async def peers() -> AsyncIterator[Peers]:
    clients = Peers()
    yield clients
    await clients.close()


def ended(connection: Connection) -> bool:
    """Whether the relay ended the connection (EOF or reset) as far as the client has seen."""
    reader, _ = connection
    return reader.at_eof() or reader.exception() is not None


async def all_ended(connections: Iterable[Connection], seconds: float) -> float:
    """Wait until the relay has ended every connection (reading what it says meanwhile);
    the seconds it took.  Raises TimeoutError if one outlives ``seconds``."""

    async def until_ended(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while await reader.read(65536):
                pass

    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(seconds):
        await asyncio.gather(*(until_ended(reader) for reader, _ in connections))
    return loop.time() - started


async def settle(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.02)


def request(
    method: str,
    transport: str,
    port: int,
    user: str,
    *,
    cseq: int = 1,
    call_id: str | None = None,
    headers: Iterable[str] = (),
) -> bytes:
    uri = f"sip:127.0.0.1:{port};transport={transport.lower()}"
    lines = [
        f"{method} {uri} SIP/2.0",
        f"Via: SIP/2.0/{transport.upper()} 127.0.0.1:9;branch=z9hG4bK{secrets.token_hex(8)};rport",
        "Max-Forwards: 70",
        f"From: <sip:{user}@127.0.0.1>;tag={secrets.token_hex(4)}",
        f"To: <sip:{user}@127.0.0.1>",
        f"Call-ID: {call_id or secrets.token_hex(8)}",
        f"CSeq: {cseq} {method}",
        f"Contact: <sip:app@127.0.0.1:9;transport={transport.lower()}>",
        "Expires: 300",
        *headers,
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class SipStream:
    """A SIP client on one TCP or TLS connection to the device port."""

    def __init__(self, connection: Connection, transport: str, port: int) -> None:
        self.reader, self.writer = connection
        self.transport = transport
        self.port = port
        self.framer = StreamFramer()

    async def ask(self, data: bytes) -> Response:
        self.writer.write(data)
        async with asyncio.timeout(SIP_TIMEOUT):
            while True:
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise ConnectionError("the relay closed the connection")
                for event in self.framer.feed(chunk):
                    if isinstance(event, Response):
                        return event

    async def register(self, instance: Instance) -> Response:
        """REGISTER as the instance's app: challenged, then answered with its secret."""
        call_id = secrets.token_hex(8)
        first = await self.ask(
            request("REGISTER", self.transport, self.port, instance.id, call_id=call_id)
        )
        assert first.status == 401, first
        challenge = select_challenge(
            parse_challenge(v) for v in first.headers.get_all("WWW-Authenticate")
        )
        assert challenge is not None
        uri = f"sip:127.0.0.1:{self.port};transport={self.transport}"
        authorization = DigestClient(instance.id, instance.secret).authorize(
            challenge, "REGISTER", uri
        )
        return await self.ask(
            request(
                "REGISTER",
                self.transport,
                self.port,
                instance.id,
                cseq=2,
                call_id=call_id,
                headers=[f"Authorization: {authorization}"],
            )
        )


async def udp_register_is_challenged(port: int, instance: Instance) -> bool:
    """Whether the device UDP port answers a REGISTER with 401 (retransmitted as UDP does)."""
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            if not answered.done():
                answered.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Client, local_addr=("127.0.0.1", 0))
    data = request("REGISTER", "udp", port, instance.id)
    try:
        for delay in (0.5, 1.0, 2.0, 4.0):
            transport.sendto(data, ("127.0.0.1", port))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    return (await asyncio.shield(answered)).startswith(b"SIP/2.0 401 ")
        return False
    finally:
        transport.close()


def device_tls_context(data_dir: Path) -> ssl.SSLContext:
    """Trust in the development certificate the relay made for its device and API ports."""
    return ssl.create_default_context(cafile=str(data_dir / "tls" / "dev-certificate.pem"))


# -- floods run in another process ------------------------------------------------------

GARBAGE_REQUEST = (
    b"INVITE sip:alice@127.0.0.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKgarbage;rport\r\n"
    b"Max-Forwards: 70\r\nFrom: <sip:flood@127.0.0.1>;tag=f\r\nTo: <sip:alice@127.0.0.1>\r\n"
    b"Call-ID: garbage\r\nCSeq: 1 INVITE\r\nContact: <sip:flood@127.0.0.1:9>\r\n"
    b"Content-Type: application/sdp\r\nContent-Length: 120\r\n\r\n" + b"v=0\r\n" * 24
)


def garbage_datagrams(rng: random.Random) -> list[bytes]:
    """Random bytes of every size up to a full datagram, and requests cut short."""
    datagrams = [rng.randbytes(rng.randrange(1, 1400)) for _ in range(64)]
    datagrams += [rng.randbytes(rng.randrange(1400, 65000)) for _ in range(2)]
    datagrams += [GARBAGE_REQUEST[: rng.randrange(1, len(GARBAGE_REQUEST) - 1)] for _ in range(64)]
    return datagrams


def udp_flood(targets: list[tuple[str, int]], seconds: float, seed: int) -> None:
    """Send garbage datagrams to ``targets`` from eight sockets for ``seconds``, as fast as
    possible; print the count sent as JSON once started and once done."""
    datagrams = garbage_datagrams(random.Random(seed))
    sockets = []
    for _ in range(8):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        sockets.append(sock)
    print(json.dumps({"started": True}), flush=True)
    sent = 0
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        for number, datagram in enumerate(datagrams):
            for target in targets:
                with contextlib.suppress(OSError):
                    sockets[number % 8].sendto(datagram, target)
                    sent += 1
    print(json.dumps({"sent": sent, "seconds": time.monotonic() - started}), flush=True)


@asynccontextmanager
async def in_another_process(function: str, *args: Any) -> AsyncIterator[dict[str, Any]]:
    """Run ``function(*args)`` of this module in a new process; yields once it has started,
    and fills the yielded dict with its final JSON line when it ends (bounded wait)."""
    code = f"from tests.peers.test_floods import {function}; {function}(*{args!r})"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        cwd=ROOT,
        env=PRODUCTION_ENV,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stdout is not None
    result: dict[str, Any] = {}
    try:
        async with asyncio.timeout(FLOOD_PROCESS_TIMEOUT):
            assert json.loads(await process.stdout.readline()) == {"started": True}
        yield result
        async with asyncio.timeout(FLOOD_PROCESS_TIMEOUT):
            result.update(json.loads(await process.stdout.readline()))
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped for the UDP socket bound to ``port`` (its buffer was full)."""
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            return int(fields[-1])
    raise AssertionError(f"no UDP socket on port {port}")


# -- 1. UDP garbage ---------------------------------------------------------------------


async def test_udp_garbage_on_the_sip_and_device_ports(
    tmp_path: Path, kamailio: Kamailio, peers: Peers
) -> None:
    """A datagram flood beyond what the relay can read costs it datagrams: the kernel drops
    what does not fit in the socket's buffer, the registrar's answers among them.  So while
    the API must answer throughout and the refreshes must keep reaching Kamailio (they go
    out on time), the account may read "registering" for a moment when the answer to a
    refresh was dropped; it must read "registered" again soon after the flood, and the
    device UDP port must answer an app again."""
    async with running_node(tmp_path, kamailio) as node:
        ports = [node.ports["sip_udp"], node.ports["device_udp"]]
        drops_before = sum(udp_drops(port) for port in ports)
        before = await node.contact_cseq()
        async with (
            probing(node, registered=False) as probe,
            in_another_process(
                "udp_flood", [("127.0.0.1", p) for p in ports], UDP_FLOOD_SECONDS, 1
            ) as flood,
        ):
            during = await node.refreshed_since(before)
        dropped = sum(udp_drops(port) for port in ports) - drops_before
        probe.check(at_least=10)
        assert flood["sent"] > 50_000
        async with asyncio.timeout(2 * GRANTED_EXPIRES):
            while True:
                status, view = await node.api.call(
                    "GET", f"/v1/instances/{node.instance.id}", secret=node.instance.secret
                )
                if status == 200 and view["accounts"][0]["state"] == "registered":
                    break
                await asyncio.sleep(0.2)
        assert await udp_register_is_challenged(node.ports["device_udp"], node.instance)
        port = node.ports["device_tcp"]
        app = SipStream(await peers.connect(port), "tcp", port)
        assert (await app.ask(request("OPTIONS", "tcp", port, "probe"))).status == 200
        print(
            f"\nUDP flood: {flood['sent']} datagrams in {flood['seconds']:.1f} s "
            f"({flood['sent'] / flood['seconds']:.0f}/s), {dropped} dropped by the kernel "
            f"(relay read {(flood['sent'] - dropped) / flood['seconds']:.0f}/s); "
            f"API: {probe.answers} answers, slowest {probe.slowest * 1000:.0f} ms, account "
            f"states seen {sorted(probe.states)}; contact CSeq {before} -> {during} during"
        )


# -- 2. half-open TCP --------------------------------------------------------------------

IDLE_TIMEOUT = 1.0
HALF_SENT = [
    b"",
    b"REGISTER sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;bra",
    b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nContent-Length: 500\r\n\r\nthe body never comes",
]


def half_sent(number: int) -> bytes:
    """Nothing, half a header block, or a header block whose body never comes, in turn."""
    return HALF_SENT[number % len(HALF_SENT)]


async def test_half_open_tcp_connections_are_refused_past_the_limits_and_ended_when_idle(
    tmp_path: Path, kamailio: Kamailio, peers: Peers
) -> None:
    """Connections that send nothing or half a message, on the device and SIP TCP ports:
    those past a source's limit and past the limit in all are refused as they come, the
    others end one idle timeout later, while an app registered over TCP keeps its
    connection (idle as it is) and a newcomer is served once they are gone."""
    limits = {"idle_timeout": IDLE_TIMEOUT, "max_connections": 100}
    async with running_node(
        tmp_path,
        kamailio,
        device={**limits, "max_connections_per_source": 40},
        sip={**limits, "max_connections": 30, "max_connections_per_source": 20},
    ) as node:
        device, sip = node.device_transport, node.sip_transport
        before = await node.contact_cseq()
        port = node.ports["device_tcp"]
        app = SipStream(await peers.connect(port), "tcp", port)
        assert (await app.register(node.instance)).status == 200
        async with probing(node) as probe:
            flood: list[Connection] = []
            # device port: 50 from one source, the last 10 past its 40 ...
            flood += await peers.many(port, "127.0.0.2", 50, half_sent)
            await settle(lambda: (device.connections, device.admission.refused) == (41, 10))
            # ... then 80 from two more, the last 21 past the 100 in all (the app holds one)
            flood += await peers.many(port, "127.0.0.3", 40, half_sent)
            flood += await peers.many(port, "127.0.0.4", 40, half_sent)
            await settle(lambda: (device.connections, device.admission.refused) == (100, 31))
            # provider port: 20 per source, 30 in all
            sip_port = node.ports["sip_tcp"]
            flood += await peers.many(sip_port, "127.0.0.2", 25, half_sent)
            await settle(lambda: (sip.connections, sip.admission.refused) == (20, 5))
            flood += await peers.many(sip_port, "127.0.0.3", 25, half_sent)
            await settle(lambda: (sip.connections, sip.admission.refused) == (30, 20))
            took = await all_ended(flood, 2 * IDLE_TIMEOUT + 2)
            assert (device.connections, sip.connections) == (1, 0)
            # the app's connection outlived the idle timeout: it carries a registration
            assert node.running is not None and node.running.relay.devices.get(node.instance.id)
            assert (await app.ask(request("OPTIONS", "tcp", port, "app"))).status == 200
            newcomer = SipStream(await peers.connect(port, "127.0.0.2"), "tcp", port)
            assert (await newcomer.ask(request("REGISTER", "tcp", port, "x"))).status == 401
        refreshed = await node.refreshed_since(before)
        probe.check(at_least=5)
        print(
            f"\nhalf-open: {len(flood)} connections, {device.admission.refused} refused on the "
            f"device port and {sip.admission.refused} on the SIP port, the rest ended "
            f"{took:.2f} s after the last came (idle timeout {IDLE_TIMEOUT} s); "
            f"API slowest {probe.slowest * 1000:.0f} ms; contact CSeq {before} -> {refreshed}"
        )


# -- 3. slowloris TLS ----------------------------------------------------------------------

HANDSHAKE_TIMEOUT = 1.0
STALLED_HANDSHAKES = [b"", CLIENT_HELLO_START, b"\x16"]


async def test_tls_handshakes_that_never_finish_are_ended(
    tmp_path: Path, kamailio: Kamailio, peers: Peers
) -> None:
    """TLS connections that say nothing, half a ClientHello or one byte end one handshake
    timeout after they came (the idle timeout is far off), while a real TLS app finishes
    its handshake and registers among them."""
    async with running_node(
        tmp_path,
        kamailio,
        device={"handshake_timeout": HANDSHAKE_TIMEOUT, "idle_timeout": 60},
    ) as node:
        device = node.device_transport
        assert node.running is not None
        context = device_tls_context(node.running.relay.config.data_dir)
        before = await node.contact_cseq()
        port = node.ports["device_tls"]
        async with probing(node) as probe:
            stalled: list[Connection] = []
            for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
                stalled += await peers.many(
                    port, source, 60, lambda n: STALLED_HANDSHAKES[n % len(STALLED_HANDSHAKES)]
                )
            await settle(lambda: device.connections == len(stalled))
            app = SipStream(await peers.connect(port, tls=context), "tls", port)
            assert (await app.register(node.instance)).status == 200
            took = await all_ended(stalled, HANDSHAKE_TIMEOUT + 2)
            assert device.connections == 1 and device.admission.refused == 0
            assert node.running.relay.devices.get(node.instance.id) is not None
            assert (await app.ask(request("OPTIONS", "tls", port, "app"))).status == 200
        refreshed = await node.refreshed_since(before)
        probe.check(at_least=5)
        print(
            f"\nslowloris TLS: {len(stalled)} stalled handshakes ended within {took:.2f} s "
            f"(timeout {HANDSHAKE_TIMEOUT} s) while an app registered over TLS; "
            f"API slowest {probe.slowest * 1000:.0f} ms; contact CSeq {before} -> {refreshed}"
        )


# -- 4. messages past the cap ------------------------------------------------------------------


def oversize(kind: str, transport: str, port: int) -> bytes:
    """A message the relay cannot take: past the cap by its header block, its announced
    body, or its number of header lines."""
    head = request("REGISTER", transport, port, "big")[: -len(b"Content-Length: 0\r\n\r\n")]
    if kind == "header block":
        return head + b"X-Filler: " + b"a" * MAX_MESSAGE_SIZE
    if kind == "content length":
        return head + f"Content-Length: {MAX_MESSAGE_SIZE + 1}\r\n\r\n".encode() + b"x" * 100
    return head + b"X-Line: a\r\n" * 200 + b"Content-Length: 0\r\n\r\n"


async def test_messages_past_the_cap_end_their_connection(
    tmp_path: Path, kamailio: Kamailio, peers: Peers
) -> None:
    """A header block past the message cap, a Content-Length past it, and more header lines
    than allowed, over TCP and TLS: every such connection ends, the one with a Content-Length
    past the cap told 513 first, and the app registered on the same port is not disturbed."""
    async with running_node(tmp_path, kamailio) as node:
        device = node.device_transport
        assert node.running is not None
        context = device_tls_context(node.running.relay.config.data_dir)
        before = await node.contact_cseq()
        tcp = node.ports["device_tcp"]
        app = SipStream(await peers.connect(tcp), "tcp", tcp)
        assert (await app.register(node.instance)).status == 200
        answers: dict[str, set[bytes]] = {}
        async with probing(node) as probe:
            senders: list[tuple[str, Connection]] = []
            for transport in ("tcp", "tls"):
                port = node.ports[f"device_{transport}"]
                for kind in ("header block", "content length", "header lines"):
                    for _ in range(10):
                        connection = await peers.connect(
                            port,
                            tls=context if transport == "tls" else None,
                            send=oversize(kind, transport, port),
                        )
                        senders.append((kind, connection))
            async with asyncio.timeout(5):
                for kind, (reader, _) in senders:
                    answer = b""
                    with contextlib.suppress(ConnectionError, ssl.SSLError):
                        answer = await reader.read()
                    answers.setdefault(kind, set()).add(answer.split(b"\r\n", 1)[0])
            assert all(ended(c) for _, c in senders)
            await settle(lambda: device.connections == 1)
            assert (await app.ask(request("OPTIONS", "tcp", tcp, "app"))).status == 200
        refreshed = await node.refreshed_since(before)
        probe.check(at_least=2)
        # a request whose head was read is answered before its connection ends; one whose
        # head never ended, or has too many lines to read, cannot be
        assert answers == {
            "content length": {b"SIP/2.0 513 Message Too Large"},
            "header block": {b""},
            "header lines": {b""},
        }
        print(
            f"\noversize: {len(senders)} connections (TCP and TLS) ended, answers {answers}; "
            f"API slowest {probe.slowest * 1000:.0f} ms; contact CSeq {before} -> {refreshed}"
        )


# -- 5. ten thousand connections against a node limited to two thousand ---------------


@dataclass
class ServeProcess:
    """``python -m sipis serve`` in its own session, its output in a log file."""

    process: asyncio.subprocess.Process
    log_path: Path

    def rss(self) -> int:
        """Resident memory, in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    async def stop(self) -> None:
        """SIGTERM and wait for a graceful exit; SIGKILL if it does not come in time."""
        if self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(10):
                await self.process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            await self.process.wait()
            raise


@asynccontextmanager
async def serving(
    tmp_path: Path, kamailio: Kamailio, device: dict[str, Any]
) -> AsyncIterator[tuple[Node, ServeProcess]]:
    """A ``sipis serve`` process on free ports with ``device`` settings, and its instance."""
    ports = {
        "api": free_port(socket.SOCK_STREAM),
        "sip_udp": free_port(socket.SOCK_DGRAM),
        "device_tcp": free_port(socket.SOCK_STREAM),
        "device_tls": free_port(socket.SOCK_STREAM),
        "device_udp": free_port(socket.SOCK_DGRAM),
    }
    config, path = relay_config(
        tmp_path,
        api={"port": ports["api"]},
        sip={"udp_port": ports["sip_udp"]},
        device={
            "tcp_port": ports["device_tcp"],
            "tls_port": ports["device_tls"],
            "udp_port": ports["device_udp"],
            **device,
        },
        log={"level": "info"},
    )
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sipis", "serve", "--config", str(path),
            cwd=ROOT, env=PRODUCTION_ENV, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True,
        )  # fmt: skip
    server = ServeProcess(process, log_path)
    try:
        async with asyncio.timeout(15):
            while not (config.data_dir / "tls" / "dev-certificate.pem").exists():
                assert process.returncode is None, tail(log_path)
                await asyncio.sleep(0.05)
        context = ssl.create_default_context(
            cafile=str(config.data_dir / "tls/dev-certificate.pem")
        )
        connector = aiohttp.TCPConnector(ssl=context)
        async with aiohttp.ClientSession(connector=connector) as session:
            api = ApiClient(session, f"https://127.0.0.1:{ports['api']}")
            async with asyncio.timeout(15):
                while True:
                    assert process.returncode is None, tail(log_path)
                    with contextlib.suppress(aiohttp.ClientError):
                        if (await api.call("GET", "/healthz"))[0] == 200:
                            break
                    await asyncio.sleep(0.05)
            instance = await create_instance(api, kamailio)
            yield Node(kamailio, api, instance, ports), server
    finally:
        await server.stop()


def open_file_limit_raised() -> int:
    """Raise this process's soft limit on open files to its hard limit; the limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def half_sent_to(ports: dict[str, int], number: int) -> tuple[int, bytes]:
    """Every other connection to the TCP port with half a header block, the others to the
    TLS port with half a ClientHello."""
    if number % 2:
        filler = b"REGISTER sip:127.0.0.1 SIP/2.0\r\nX-Filler: "
        return ports["device_tcp"], filler.ljust(HALF_SENT_HEADER, b"a")
    return ports["device_tls"], CLIENT_HELLO_START.ljust(HALF_SENT_HELLO, b"\0")


def hold_connections(ports: dict[str, int], count: int, limit: int) -> None:
    """The client side of 5, driven line by line over stdin: on "wave", open ``count``
    connections from MANY_SOURCES addresses, each sending half a message, wait (bounded)
    until no more than ``limit`` are left open, and print what is held; on "release",
    close them all; on "end" (or end of input), exit.  Answers are JSON lines."""
    asyncio.run(_hold_connections(ports, count, limit), debug=False)


async def _hold_connections(ports: dict[str, int], count: int, limit: int) -> None:
    loop = asyncio.get_running_loop()
    peers = Peers()
    per_source = -(-count // MANY_SOURCES)
    print(json.dumps({"started": True}), flush=True)
    while (command := (await loop.run_in_executor(None, sys.stdin.readline)).strip()) != "end":
        if command == "wave":
            started = loop.time()
            connections: list[Connection] = []
            for first in range(0, count, 500):
                batch = []
                for number in range(first, min(first + 500, count)):
                    port, data = half_sent_to(ports, number)
                    host = number // per_source
                    source = f"127.0.{1 + host // 250}.{1 + host % 250}"
                    batch.append(peers.connect(port, source, send=data))
                connections += await asyncio.gather(*batch)
            opened = loop.time() - started
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    while sum(not ended(c) for c in connections) > limit:
                        await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            held = sum(not ended(c) for c in connections)
            print(json.dumps({"opened": len(connections), "held": held, "seconds": opened}))
        elif command == "release":
            await peers.close()
            print(json.dumps({"released": True}))
        else:
            break
        sys.stdout.flush()
    await peers.close()


class Holder:
    """Talks to ``hold_connections`` in its process."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def ask(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command.encode() + b"\n")
        await self.process.stdin.drain()
        async with asyncio.timeout(FLOOD_PROCESS_TIMEOUT + 30):
            answer: dict[str, Any] = json.loads(await self.process.stdout.readline())
        return answer


@asynccontextmanager
async def holding(ports: dict[str, int], count: int, limit: int) -> AsyncIterator[Holder]:
    code = (
        "from tests.peers.test_floods import hold_connections; "
        f"hold_connections({ports!r}, {count}, {limit})"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code,
        cwd=ROOT, env=PRODUCTION_ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    holder = Holder(process)
    try:
        assert process.stdout is not None
        async with asyncio.timeout(FLOOD_PROCESS_TIMEOUT):
            assert json.loads(await process.stdout.readline()) == {"started": True}
        yield holder
        assert process.stdin is not None
        process.stdin.write(b"end\n")
        async with asyncio.timeout(FLOOD_PROCESS_TIMEOUT):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


async def test_ten_thousand_connections_meet_the_limit_and_memory_stays_bounded(
    tmp_path: Path, kamailio: Kamailio, peers: Peers
) -> None:
    """10,000 connections from 100 addresses to a node that holds at most 2,000, each
    sending half a header block (TCP) or half a ClientHello (TLS), twice."""
    count = min(MANY_CONNECTIONS, open_file_limit_raised() - 1024)
    assert count > 2 * MANY_LIMIT, f"the open-file limit leaves room for only {count} clients"
    device = {
        "max_connections": MANY_LIMIT,
        "max_connections_per_source": -(-count // MANY_SOURCES),
        "handshake_timeout": 60,
        "idle_timeout": 60,
    }
    budget = MANY_LIMIT * PER_CONNECTION_BUDGET
    async with serving(tmp_path, kamailio, device) as (node, server):
        before = await node.contact_cseq()
        rss_before, fds_before = server.rss(), server.descriptors()
        tcp = node.ports["device_tcp"]
        async with holding(node.ports, count, MANY_LIMIT) as holder, probing(node) as probe:
            for round_number in (1, 2):
                wave = await holder.ask("wave")
                held_fds, grown = server.descriptors() - fds_before, server.rss() - rss_before
                assert (wave["opened"], wave["held"]) == (count, MANY_LIMIT), wave
                assert held_fds <= MANY_LIMIT + 8, held_fds
                assert grown <= budget, f"{grown // 2**20} MiB over {budget // 2**20} MiB"
                # full: a newcomer is refused, while UDP and the API still serve
                await all_ended([await peers.connect(tcp)], 2)  # refused at once
                assert await udp_register_is_challenged(node.ports["device_udp"], node.instance)
                assert await holder.ask("release") == {"released": True}
                async with asyncio.timeout(10):
                    while server.descriptors() > fds_before:
                        await asyncio.sleep(0.1)
                app = SipStream(await peers.connect(tcp), "tcp", tcp)
                assert (await app.ask(request("REGISTER", "tcp", tcp, "x"))).status == 401
                await peers.close()
                print(
                    f"\nwave {round_number}: {count} connections opened in "
                    f"{wave['seconds']:.1f} s, {wave['held']} held (+{held_fds} descriptors), "
                    f"RSS +{grown // 2**20} MiB ({grown // 1024 // MANY_LIMIT} KiB per held "
                    f"connection; bound {budget // 2**20} MiB), afterwards "
                    f"+{(server.rss() - rss_before) // 2**20} MiB"
                )
        refreshed = await node.refreshed_since(before)
        probe.check(at_least=10)
        print(f"API slowest {probe.slowest * 1000:.0f} ms; contact CSeq {before} -> {refreshed}")
