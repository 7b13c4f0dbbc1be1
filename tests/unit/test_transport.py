"""UDP, TCP and TLS flows over loopback sockets."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

import pytest
import trustme

from sipis.sip.message import Message, ParseError, Request, parse_message
from sipis.transport import stream
from sipis.transport.flow import Flow, FlowClosed
from sipis.transport.layer import TransportLayer, TransportSettings
from sipis.transport.resolver import Target

OPTIONS = (
    b"OPTIONS sip:relay@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKx\r\n"
    b"From: <sip:a@example.com>;tag=1\r\nTo: <sip:relay@127.0.0.1>\r\nCall-ID: c1\r\n"
    b"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
)


class Inbox:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[Message | ParseError, Flow]] = asyncio.Queue()

    def __call__(self, message: Message | ParseError, flow: Flow) -> None:
        self.queue.put_nowait((message, flow))

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
async def client(ca: trustme.CA, tmp_path) -> AsyncIterator[tuple[TransportLayer, Inbox]]:
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


async def test_unframeable_stream_is_closed(server: tuple[TransportLayer, Inbox]) -> None:
    server_layer, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", server_layer.listening["tcp"])
    writer.write(OPTIONS.replace(b"Content-Length: 0", b"Content-Length: x"))
    async with asyncio.timeout(5):
        assert await reader.read() == b""
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
