"""Requests to the SIP endpoint answered in server transactions, over a real UDP socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sipis.inbound import Inbound
from sipis.sip.message import Response, parse_message
from sipis.sip.transaction import Timers
from sipis.transport.layer import TransportLayer, TransportSettings

TIMERS = Timers(t1=0.05, t2=0.2, t4=0.25)


def request(method: str, branch: str = "z9hG4bKst1", cseq_method: str | None = None) -> bytes:
    return (
        f"{method} sip:c0ffee@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:9;rport;branch={branch}\r\n"
        "From: <sip:bob@example.com>;tag=9\r\nTo: <sip:alice@example.com>\r\n"
        f"Call-ID: st-1\r\nCSeq: 7 {cseq_method or method}\r\nMax-Forwards: 70\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


class Peer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[Response] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        message = parse_message(data)
        assert isinstance(message, Response)
        self.received.put_nowait(message)

    async def next(self, timeout: float = 2.0) -> Response:
        async with asyncio.timeout(timeout):
            return await self.received.get()


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[asyncio.DatagramTransport, Peer, Inbound]]:
    inbound = Inbound(timers=TIMERS)
    layer = TransportLayer(inbound.handle, TransportSettings(host="127.0.0.1", udp_port=0))
    await layer.start()
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(
        Peer, local_addr=("127.0.0.1", 0), remote_addr=("127.0.0.1", layer.listening["udp"])
    )
    yield transport, peer, inbound
    transport.close()
    inbound.close()
    await layer.close()


async def test_invite_480_is_retransmitted_until_acked(
    endpoint: tuple[asyncio.DatagramTransport, Peer, Inbound],
) -> None:
    transport, peer, inbound = endpoint
    transport.sendto(request("INVITE"))
    first = await peer.next()
    assert first.status == 480
    again = await peer.next()  # Timer G
    assert again.serialize() == first.serialize()
    transport.sendto(request("INVITE"))  # a retransmitted INVITE gets the same answer
    assert (await peer.next()).serialize() == first.serialize()
    ack = (
        request("ACK")
        .decode()
        .replace("To: <sip:alice@example.com>", f"To: {first.headers.get('To')}")
    )
    transport.sendto(ack.encode())
    await asyncio.sleep(0.3)
    while not peer.received.empty():
        peer.received.get_nowait()
    await asyncio.sleep(0.5)
    assert peer.received.empty(), "no retransmission after the ACK"
    assert len(inbound.transactions) == 0, "confirmed, then terminated by Timer I"


async def test_options_retransmission_is_answered_from_the_transaction(
    endpoint: tuple[asyncio.DatagramTransport, Peer, Inbound],
) -> None:
    transport, peer, inbound = endpoint
    transport.sendto(request("OPTIONS"))
    first = await peer.next()
    transport.sendto(request("OPTIONS"))
    second = await peer.next()
    assert first.status == 200
    assert second.serialize() == first.serialize(), "same To tag: the same transaction"
    transport.sendto(request("OPTIONS", branch="z9hG4bKst2"))
    third = await peer.next()
    assert third.headers.get("To") != first.headers.get("To"), "a new transaction"
    assert len(inbound.transactions) == 2
    await asyncio.sleep(64 * TIMERS.t1 + 0.3)
    assert len(inbound.transactions) == 0, "Timer J ended both"


async def test_malformed_request_is_answered_statelessly(
    endpoint: tuple[asyncio.DatagramTransport, Peer, Inbound],
) -> None:
    transport, peer, inbound = endpoint
    transport.sendto(request("INVITE", cseq_method="BYE"))
    response = await peer.next()
    assert response.status == 400
    assert len(inbound.transactions) == 0
