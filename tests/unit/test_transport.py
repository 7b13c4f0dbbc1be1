"""UDP, TCP and TLS flows over loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trustme

from sipis.config import ConfigError, parse_config
from sipis.sip.message import MAX_MESSAGE_SIZE, Message, ParseError, Request, parse_message
from sipis.transport import stream
from sipis.transport.admission import ConnectionLimits, source_of
from sipis.transport.flow import Flow, FlowClosed
from sipis.transport.layer import TransportLayer, TransportSettings, raise_descriptor_limit
from sipis.transport.resolver import Target

OPTIONS = (
    b"OPTIONS sip:relay@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKx\r\n"
    b"From: <sip:a@example.com>;tag=1\r\nTo: <sip:relay@127.0.0.1>\r\nCall-ID: c1\r\n"
    b"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
)


class Inbox:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[Message | ParseError, Flow]] = asyncio.Queue()
        # what is sent back at once for each malformed message, as Inbound does
        self.answer_errors_with: bytes | None = None

    def __call__(self, message: Message | ParseError, flow: Flow) -> None:
        self.queue.put_nowait((message, flow))
        if isinstance(message, ParseError) and self.answer_errors_with is not None:
            assert message.partial is not None
            flow.reply(self.answer_errors_with, message.partial.via)

    async def get(self) -> tuple[Message | ParseError, Flow]:
        async with asyncio.timeout(5):
            return await self.queue.get()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def server(ca: trustme.CA) -> AsyncIterator[tuple[TransportLayer, Inbox]]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("registrar.test", "127.0.0.1").configure_cert(context)
    inbox = Inbox()
    layer = TransportLayer(
        inbox,
        TransportSettings(host="127.0.0.1", udp_port=0, tcp_port=0, tls_port=0, server_tls=context),
    )
    await layer.start()
    yield layer, inbox
    await layer.close()


@pytest.fixture
async def client(ca: trustme.CA, tmp_path: Path) -> AsyncIterator[tuple[TransportLayer, Inbox]]:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    inbox = Inbox()
    layer = TransportLayer(
        inbox, TransportSettings(host="127.0.0.1", udp_port=0, keepalive=0.2, ca_file=str(ca_file))
    )
    await layer.start()
    yield layer, inbox
    await layer.close()


def target(layer: TransportLayer, transport: str, host: str = "registrar.test") -> Target:
    return Target(transport, host, "127.0.0.1", layer.listening[transport])


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
async def test_message_crosses_each_transport_and_comes_back(
    server: tuple[TransportLayer, Inbox], client: tuple[TransportLayer, Inbox], transport: str
) -> None:
    server_layer, server_inbox = server
    client_layer, client_inbox = client
    flow = await client_layer.flow_to(target(server_layer, transport))
    assert flow.transport == transport
    flow.send(OPTIONS)
    received, back = await server_inbox.get()
    assert isinstance(received, Request) and received.call_id == "c1"
    back.send(OPTIONS.replace(b"c1", b"c2"))
    answered, _ = await client_inbox.get()
    assert isinstance(answered, Request) and answered.call_id == "c2"


async def test_stream_flows_are_shared(
    server: tuple[TransportLayer, Inbox], client: tuple[TransportLayer, Inbox]
) -> None:
    server_layer, _ = server
    client_layer, _ = client
    flows = await asyncio.gather(
        *(client_layer.flow_to(target(server_layer, "tls")) for _ in range(20))
    )
    assert len({id(f) for f in flows}) == 1
    assert client_layer.connections == 1


async def test_tls_certificate_is_verified(
    server: tuple[TransportLayer, Inbox], client: tuple[TransportLayer, Inbox]
) -> None:
    server_layer, _ = server
    client_layer, _ = client
    wrong_name = target(server_layer, "tls", host="other.test")
    with pytest.raises(ConnectionError, match="TLS handshake failed"):
        await client_layer.flow_to(wrong_name)
    flow = await client_layer.flow_to(wrong_name, verify_tls=False)
    assert flow.alive


async def test_untrusted_certificate_is_refused(server: tuple[TransportLayer, Inbox]) -> None:
    server_layer, _ = server
    layer = TransportLayer(Inbox(), TransportSettings(host="127.0.0.1", udp_port=0))
    await layer.start()
    try:
        with pytest.raises(ConnectionError, match="certificate verify failed"):
            await layer.flow_to(target(server_layer, "tls"))
    finally:
        await layer.close()


async def test_closed_connection_notifies_and_refuses_sends(
    server: tuple[TransportLayer, Inbox], client: tuple[TransportLayer, Inbox]
) -> None:
    server_layer, server_inbox = server
    client_layer, _ = client
    flow = await client_layer.flow_to(target(server_layer, "tcp"))
    lost = asyncio.Event()
    flow.on_close(lambda _: lost.set())
    flow.send(OPTIONS)
    _, server_side = await server_inbox.get()
    server_side.close()
    async with asyncio.timeout(5):
        await lost.wait()
    with pytest.raises(FlowClosed):
        flow.send(OPTIONS)
    fresh = await client_layer.flow_to(target(server_layer, "tcp"))
    assert fresh is not flow and fresh.alive


async def test_keepalive_ping_is_answered_and_silence_kills_the_flow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peer that ponged once and then goes silent is declared dead."""
    monkeypatch.setattr(stream, "PONG_TIMEOUT", 0.2)
    pings = 0
    answer_pings = True
    peer_done = asyncio.Event()

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal pings
        while data := await reader.read(64):
            pings += data.count(b"\r\n\r\n")
            if answer_pings:
                writer.write(b"\r\n")
        writer.close()
        peer_done.set()

    srv = await asyncio.start_server(peer, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    layer = TransportLayer(Inbox(), TransportSettings(host="127.0.0.1", udp_port=0, keepalive=0.3))
    await layer.start()
    try:
        flow = await layer.flow_to(Target("tcp", "peer.test", "127.0.0.1", port))
        lost = asyncio.Event()
        flow.on_close(lambda _: lost.set())
        await asyncio.sleep(1.0)
        assert pings >= 2 and flow.alive
        answer_pings = False
        async with asyncio.timeout(3):
            await lost.wait()
    finally:
        await layer.close()
        async with asyncio.timeout(5):
            await peer_done.wait()
        srv.close()
        await srv.wait_closed()


async def test_incoming_ping_gets_a_pong(server: tuple[TransportLayer, Inbox]) -> None:
    server_layer, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", server_layer.listening["tcp"])
    writer.write(b"\r\n\r\n")
    async with asyncio.timeout(5):
        assert await reader.readexactly(2) == b"\r\n"
    writer.close()


async def test_malformed_stream_message_is_reported_and_stream_goes_on(
    server: tuple[TransportLayer, Inbox],
) -> None:
    server_layer, inbox = server
    _, writer = await asyncio.open_connection("127.0.0.1", server_layer.listening["tcp"])
    writer.write(OPTIONS.replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 INVITE") + OPTIONS)
    bad, _ = await inbox.get()
    good, _ = await inbox.get()
    assert isinstance(bad, ParseError) and bad.status == 400
    assert isinstance(good, Request)
    writer.close()


async def test_unframeable_stream_is_answered_then_closed(
    server: tuple[TransportLayer, Inbox],
) -> None:
    server_layer, inbox = server
    inbox.answer_errors_with = b"SIP/2.0 400 Bad Request\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", server_layer.listening["tcp"])
    writer.write(OPTIONS + OPTIONS.replace(b"Content-Length: 0", b"Content-Length: x"))
    good, _ = await inbox.get()
    bad, _ = await inbox.get()
    assert isinstance(good, Request)
    assert isinstance(bad, ParseError) and bad.status == 400
    assert isinstance(bad.partial, Request) and bad.partial.method == "OPTIONS"
    async with asyncio.timeout(5):
        assert await reader.read() == b"SIP/2.0 400 Bad Request\r\n\r\n"
    writer.close()


async def test_stream_without_a_request_to_answer_is_aborted(
    server: tuple[TransportLayer, Inbox],
) -> None:
    server_layer, inbox = server
    reader, writer = await asyncio.open_connection("127.0.0.1", server_layer.listening["tcp"])
    writer.write(b"OPTIONS sip:a SIP/2.0\r\nX: " + b"y" * 70000)
    async with asyncio.timeout(5):
        with contextlib.suppress(ConnectionResetError):
            assert await reader.read() == b""
    assert inbox.queue.empty()
    writer.close()


async def test_udp_reply_goes_to_the_source_with_rport(
    server: tuple[TransportLayer, Inbox],
) -> None:
    server_layer, inbox = server
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Peer(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            if not got.done():
                got.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Peer, local_addr=("127.0.0.1", 0))
    request = OPTIONS.replace(
        b"SIP/2.0/TCP 127.0.0.1:9;branch", b"SIP/2.0/UDP 127.0.0.1:9;rport;branch"
    )
    transport.sendto(request, ("127.0.0.1", server_layer.listening["udp"]))
    message, flow = await inbox.get()
    assert isinstance(message, Request)
    flow.reply(b"SIP/2.0 200 OK\r\n\r\n", message.via)
    async with asyncio.timeout(5):
        assert await got == b"SIP/2.0 200 OK\r\n\r\n"
    transport.close()


def test_parse_of_what_tests_send() -> None:
    assert isinstance(parse_message(OPTIONS), Request)


# -- limits on the connections peers open --------------------------------------------

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def listener(
    ca: trustme.CA, limits: ConnectionLimits, inbox: Inbox | None = None
) -> AsyncIterator[TransportLayer]:
    """A layer listening on TCP and TLS on loopback, its accepted connections held to ``limits``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("registrar.test", "127.0.0.1").configure_cert(context)
    layer = TransportLayer(
        inbox or Inbox(),
        TransportSettings(
            host="127.0.0.1",
            udp_port=None,
            tcp_port=0,
            tls_port=0,
            server_tls=context,
            limits=limits,
        ),
    )
    await layer.start()
    try:
        yield layer
    finally:
        await layer.close()


class Peers:
    """Client connections to a listener, all closed when the test ends."""

    def __init__(self, ca_file: str) -> None:
        self.ca_file = ca_file
        self.writers: list[asyncio.StreamWriter] = []

    async def connect(self, port: int, source: str = "127.0.0.1") -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        self.writers.append(writer)
        return reader, writer

    async def tls(self, port: int) -> Connection:
        """A TLS connection that finishes its handshake, trusting the test CA."""
        context = ssl.create_default_context(cafile=self.ca_file)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="registrar.test"
        )
        self.writers.append(writer)
        return reader, writer

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        for writer in self.writers:
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                async with asyncio.timeout(2):
                    await writer.wait_closed()


@pytest.fixture
async def peers(ca: trustme.CA, tmp_path: Path) -> AsyncIterator[Peers]:
    ca_file = tmp_path / "peers-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    clients = Peers(str(ca_file))
    yield clients
    await clients.close()


async def ended_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the other side ends the connection (EOF or reset) within ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


async def answers_ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Whether the listener still serves the connection: a CRLF CRLF ping gets its pong."""
    writer.write(b"\r\n\r\n")
    try:
        async with asyncio.timeout(2):
            return await reader.readexactly(2) == b"\r\n"
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return False


async def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.02)


def options_filling(excess: int) -> bytes:
    """An OPTIONS whose header block and body together are the message cap plus ``excess``."""
    head = OPTIONS[: -len(b"0\r\n\r\n")]
    length = MAX_MESSAGE_SIZE - len(head) - 5 + excess  # a five-digit Content-Length
    assert len(str(length)) == 5
    return head + str(length).encode() + b"\r\n\r\n" + b"x" * length


async def test_connections_past_the_total_limit_are_refused(
    ca: trustme.CA, peers: Peers, caplog: pytest.LogCaptureFixture
) -> None:
    limits = ConnectionLimits(max_connections=3, max_per_source=10)
    async with listener(ca, limits) as layer:
        port = layer.listening["tcp"]
        held = [await peers.connect(port, f"127.0.0.{n}") for n in (1, 2, 3)]
        await wait_until(lambda: layer.connections == 3)
        for name in ("tcp", "tls"):
            reader, _ = await peers.connect(layer.listening[name], "127.0.0.4")
            assert await ended_within(reader, 2)
        assert layer.connections == 3 and layer.admission.refused == 2
        # the operator is told, once for the lot rather than once per refusal
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "refusing connections" in warnings[0].getMessage()
        for connection in held:
            assert await answers_ping(*connection)
        held[0][1].close()
        await wait_until(lambda: layer.connections == 2)
        assert await answers_ping(*await peers.connect(port, "127.0.0.4"))


async def test_connections_past_the_per_source_limit_are_refused(
    ca: trustme.CA, peers: Peers
) -> None:
    limits = ConnectionLimits(max_connections=100, max_per_source=2)
    async with listener(ca, limits) as layer:
        port = layer.listening["tcp"]
        first = await peers.connect(port)
        await peers.connect(layer.listening["tls"])
        third, _ = await peers.connect(port)
        assert await ended_within(third, 2)
        assert await answers_ping(*await peers.connect(port, "127.0.0.2"))
        assert await answers_ping(*first)
        assert layer.connections == 3 and layer.admission.refused == 1


@pytest.mark.parametrize(
    ("address", "source"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("fe80::1%eth0", "fe80::/64"),
    ],
)
def test_a_source_is_an_ipv4_address_or_an_ipv6_64(address: str, source: str) -> None:
    assert source_of(address) == source


async def test_unused_connections_are_closed_and_busy_or_registered_ones_kept(
    ca: trustme.CA, peers: Peers
) -> None:
    inbox = Inbox()
    async with listener(ca, ConnectionLimits(idle_timeout=0.4), inbox) as layer:
        port = layer.listening["tcp"]
        loop = asyncio.get_running_loop()
        started = loop.time()
        silent = await peers.connect(port)
        partial = await peers.connect(port)
        partial[1].write(OPTIONS[:60])
        busy = await peers.connect(port)
        registered = await peers.connect(port)
        registered[1].write(OPTIONS)
        _, registered_flow = await inbox.get()

        def registration_over_it(flow: Flow) -> None:
            """Stands for a registration: what depends on the flow subscribes to it."""

        registered_flow.on_close(registration_over_it)
        # pings are answered but are no use of the connection
        assert await answers_ping(*silent)
        for _ in range(6):
            busy[1].write(OPTIONS)
            await inbox.get()
            await asyncio.sleep(0.15)
        assert await ended_within(silent[0], 1) and await ended_within(partial[0], 1)
        assert loop.time() - started >= 0.4
        assert await answers_ping(*busy) and await answers_ping(*registered)
        assert registered_flow.alive
        registered_flow.forget(registration_over_it)
        assert await ended_within(registered[0], 2) and not registered_flow.alive
        assert await ended_within(busy[0], 2)
        await wait_until(lambda: layer.connections == 0)


async def test_a_tls_handshake_must_finish_in_time(ca: trustme.CA, peers: Peers) -> None:
    limits = ConnectionLimits(handshake_timeout=0.3, idle_timeout=60)
    async with listener(ca, limits) as layer:
        port = layer.listening["tls"]
        silent, _ = await peers.connect(port)
        started, writer = await peers.connect(port)
        writer.write(CLIENT_HELLO_START)
        await wait_until(lambda: layer.connections == 2)
        assert await ended_within(silent, 2) and await ended_within(started, 2)
        assert layer.connections == 0
        finished = await peers.tls(port)
        await asyncio.sleep(0.5)
        assert await answers_ping(*finished)


async def test_a_tls_handshake_may_not_send_more_than_a_client_hello(
    ca: trustme.CA, peers: Peers
) -> None:
    limits = ConnectionLimits(handshake_timeout=60, idle_timeout=60)
    async with listener(ca, limits) as layer:
        reader, writer = await peers.connect(layer.listening["tls"])
        writer.write(CLIENT_HELLO_START.ljust(stream.MAX_HANDSHAKE_INPUT, b"\0"))
        assert not await ended_within(reader, 0.3)
        assert layer.connections == 1
        writer.write(b"\0")
        assert await ended_within(reader, 2)


async def test_the_header_block_may_not_pass_the_message_cap(ca: trustme.CA, peers: Peers) -> None:
    async with listener(ca, ConnectionLimits()) as layer:
        reader, writer = await peers.connect(layer.listening["tcp"])
        writer.write(
            b"OPTIONS sip:relay@127.0.0.1 SIP/2.0\r\nX-Filler: ".ljust(MAX_MESSAGE_SIZE, b"a")
        )
        assert not await ended_within(reader, 0.3)
        writer.write(b"a")
        assert await ended_within(reader, 2)
        await wait_until(lambda: layer.connections == 0)


@pytest.mark.parametrize("transport", ["tcp", "tls"])
async def test_a_message_may_fill_the_cap_but_not_pass_it(
    ca: trustme.CA, peers: Peers, transport: str
) -> None:
    inbox = Inbox()
    async with listener(ca, ConnectionLimits(), inbox) as layer:
        port = layer.listening[transport]
        reader, writer = await (peers.tls(port) if transport == "tls" else peers.connect(port))
        writer.write(options_filling(0))
        received, _ = await inbox.get()
        assert isinstance(received, Request) and received.content_length == len(received.body)
        too_large = options_filling(1)
        writer.write(too_large[: too_large.index(b"\r\n\r\n") + 4])
        assert await ended_within(reader, 2)
        await wait_until(lambda: layer.connections == 0)


async def test_a_peer_that_reads_nothing_is_dropped(ca: trustme.CA, peers: Peers) -> None:
    inbox = Inbox()
    async with listener(ca, ConnectionLimits(), inbox) as layer:
        _, writer = await peers.connect(layer.listening["tcp"])
        writer.write(OPTIONS)
        _, flow = await inbox.get()
        lost = asyncio.Event()
        flow.on_close(lambda _: lost.set())
        sent = 0
        async with asyncio.timeout(10):
            while flow.alive:
                flow.send(b"x" * MAX_MESSAGE_SIZE)
                sent += MAX_MESSAGE_SIZE
                await asyncio.sleep(0)
            await lost.wait()
        assert sent > stream.MAX_WRITE_BUFFER
        assert layer.connections == 0


async def test_closing_the_layer_ends_connections_still_in_their_handshake(
    ca: trustme.CA, peers: Peers
) -> None:
    async with listener(ca, ConnectionLimits()) as layer:
        reader, _ = await peers.connect(layer.listening["tls"])
        await wait_until(lambda: layer.connections == 1)
    assert await ended_within(reader, 2)


async def test_a_stalled_outgoing_handshake_gives_up_and_closes() -> None:
    peer_saw_end = asyncio.Event()

    async def silent_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionResetError):
            while await reader.read(65536):
                pass
        peer_saw_end.set()
        writer.close()

    server = await asyncio.start_server(silent_peer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    layer = TransportLayer(
        Inbox(), TransportSettings(host="127.0.0.1", udp_port=None, connect_timeout=0.3)
    )
    await layer.start()
    try:
        with pytest.raises(TimeoutError):
            await layer.flow_to(Target("tls", "registrar.test", "127.0.0.1", port))
        async with asyncio.timeout(2):
            await peer_saw_end.wait()
        assert layer.connections == 0
    finally:
        await layer.close()
        server.close()
        await server.wait_closed()


def test_the_open_file_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
    try:
        assert raise_descriptor_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("device", "max_connections", 0),
        ("device", "max_connections_per_source", True),
        ("device", "handshake_timeout", 0),
        ("device", "idle_timeout", "30"),
        ("sip", "max_connections", 1_000_001),
        ("sip", "max_connections_per_source", 1.5),
        ("sip", "idle_timeout", -1),
    ],
)
def test_limit_keys_are_checked(section: str, key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"^{section}.{key}:"):
        parse_config({section: {key: value}})


def test_limit_keys_have_their_defaults_and_take_values() -> None:
    device, sip = parse_config({}).device, parse_config({}).sip
    assert (device.max_connections, device.max_connections_per_source) == (4096, 64)
    assert (device.handshake_timeout, device.idle_timeout) == (10.0, 30.0)
    assert (sip.max_connections, sip.max_connections_per_source, sip.idle_timeout) == (
        1024,
        64,
        300.0,
    )
    config = parse_config(
        {"device": {"max_connections": 10, "idle_timeout": 2}, "sip": {"idle_timeout": 5}}
    )
    assert config.device.max_connections == 10 and config.device.idle_timeout == 2.0
    assert config.sip.idle_timeout == 5.0 and not config.warnings


# The start of a TLS record carrying a ClientHello that announces 131000 bytes.
CLIENT_HELLO_START = bytes.fromhex("16030140000101ffb80303")
