"""Calls and messages on a binding become pushes; nothing else does.

A scripted registrar on a loopback UDP socket takes the relay's REGISTER and
then sends requests from that same socket, as a registrar forwarding calls
would; a recording provider stands in for Apple and Google.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sipis.push.base import Delivered, Failed, Kind, Outcome, Push, TokenInvalid
from sipis.push.payload import unseal
from sipis.sip.message import Request, Response, parse_message
from sipis.sip.uas import make_response
from tests.peers.api import (
    OTHER_TOKEN,
    PAYLOAD_KEY_B64,
    RunningRelay,
    instance_body,
    relay_with_api,
)

RING = 0.6
_branches = itertools.count()


class RecordingProvider:
    name = "recording"

    def __init__(self) -> None:
        self.pushes: asyncio.Queue[Push] = asyncio.Queue()
        self.outcomes: list[Outcome] = []
        # while set and not open, every push waits for it (a push in flight)
        self.gate: asyncio.Event | None = None

    async def send(self, push: Push) -> Outcome:
        self.pushes.put_nowait(push)
        if self.gate is not None:
            await self.gate.wait()
        return self.outcomes.pop(0) if self.outcomes else Delivered("id")

    async def close(self) -> None:
        return None

    def credential_expiry(self) -> float | None:
        return None

    async def next(self, timeout: float = 3.0) -> Push:
        async with asyncio.timeout(timeout):
            return await self.pushes.get()


@dataclass
class Registrar(asyncio.DatagramProtocol):
    """Answers REGISTER with 200; afterwards sends requests to the registered contact."""

    transport: asyncio.DatagramTransport | None = None
    contact_user: str | None = None
    relay: tuple[str, int] | None = None
    responses: asyncio.Queue[Response] = field(default_factory=asyncio.Queue)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not data.strip():
            return
        message = parse_message(data)
        if isinstance(message, Response):
            self.responses.put_nowait(message)
            return
        assert isinstance(message, Request)
        if message.method == "REGISTER":
            contact = message.headers.get("Contact") or ""
            self.contact_user = message.contacts[0].sip_uri.user
            self.relay = addr
            ok = make_response(message, 200, to_tag="reg",
                               headers=[("Contact", f"{contact};expires=600")])  # fmt: skip
            assert self.transport is not None
            self.transport.sendto(ok.serialize(), addr)

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def send(self, data: bytes) -> None:
        assert self.transport is not None and self.relay is not None
        self.transport.sendto(data, self.relay)

    async def response(self, timeout: float = 3.0) -> Response:
        async with asyncio.timeout(timeout):
            return await self.responses.get()


def request(
    registrar: Registrar,
    method: str,
    *,
    call_id: str = "call-1",
    from_tag: str = "caller-tag",
    user: str | None = None,
    branch: str | None = None,
    extra: str = "",
    body: bytes = b"",
    content_type: str = "application/sdp",
) -> bytes:
    branch = branch or f"z9hG4bKtest{next(_branches)}"
    head = (
        f"{method} sip:{user or registrar.contact_user}@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{registrar.port};branch={branch}\r\n"
        f'From: "Bob" <sip:bob@example.test>;tag={from_tag}\r\n'
        "To: <sip:alice@example.test>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 {method}\r\nMax-Forwards: 70\r\n"
        "Contact: <sip:bob@127.0.0.1>\r\n"
        f"{extra}"
        + (f"Content-Type: {content_type}\r\n" if body else "")
        + f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


SDP = (
    b"v=0\r\no=bob 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 4000 RTP/AVP 0\r\n"
)


@dataclass
class Setup:
    running: RunningRelay
    registrar: Registrar
    provider: RecordingProvider
    instance_id: str
    secret: str


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    loop = asyncio.get_running_loop()
    transport, registrar = await loop.create_datagram_endpoint(
        Registrar, local_addr=("127.0.0.1", 0)
    )
    provider = RecordingProvider()
    async with relay_with_api(
        tmp_path,
        providers={"ios": provider, "android": provider},
        push={"ring_timeout": RING, "relay_uri": "sip:relay.test:5061;transport=tls"},
        lifecycle={"unregister_wait": 0.3},
    ) as running:
        body = instance_body(f"sip:127.0.0.1:{registrar.port};transport=udp",
                             user="alice", password="pw-calls")  # fmt: skip
        status, created = await running.client.call("POST", "/v1/instances", body=body)
        assert status == 201, created
        async with asyncio.timeout(5):
            while (
                running.relay.bindings.get(f"{created['id']}/work").session.registered_until is None
            ):  # type: ignore[union-attr]
                await asyncio.sleep(0.02)
        yield Setup(running, registrar, provider, created["id"], created["secret"])
    transport.close()


async def test_invite_pushes_rings_and_rings_out(setup: Setup) -> None:
    registrar, provider = setup.registrar, setup.provider
    registrar.send(request(registrar, "INVITE", body=SDP))
    assert (await registrar.response()).status == 100
    push = await provider.next()
    assert (push.kind, push.token, push.app_id, push.ttl) == (
        Kind.CALL,
        "a1" * 32,
        "com.example.phone",
        0,
    )
    content = unseal(push.payload, base64.b64decode(PAYLOAD_KEY_B64))
    assert content["type"] == "call" and content["caller"] == "sip:bob@example.test"
    assert content["caller_name"] == "Bob" and content["instance"] == setup.instance_id
    assert content["relay"] == "sip:relay.test:5061;transport=tls" and content["account"] == "work"
    ringing = await registrar.response()
    assert (ringing.status, ringing.headers.get("Push-Status")) == (180, "sent")
    assert ringing.to.tag is not None
    final = await registrar.response(timeout=RING + 2)
    assert final.status == 480 and final.to.tag == ringing.to.tag
    missed = await provider.next()
    assert (missed.kind, missed.token) == (Kind.CALL_MISSED, OTHER_TOKEN)
    assert missed.collapse_id == push.collapse_id


async def test_a_forked_copy_never_pushes_twice(setup: Setup) -> None:
    registrar, provider = setup.registrar, setup.provider
    registrar.send(request(registrar, "INVITE", body=SDP, branch="z9hG4bKfirst"))
    await provider.next()
    registrar.send(request(registrar, "INVITE", body=SDP, branch="z9hG4bKfirst"))  # retransmission
    registrar.send(request(registrar, "INVITE", body=SDP, branch="z9hG4bKfork"))  # forked copy
    statuses = [(await registrar.response()).status for _ in range(4)]
    # the retransmission is answered with the last provisional response, the fork with 482
    assert statuses[0] == 100 and statuses.count(482) == 1 and statuses.count(180) >= 1
    await asyncio.sleep(0.2)
    assert provider.pushes.empty()


async def test_an_ended_call_is_remembered_for_a_while(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sipis.calls.REMEMBER_ENDED", 0.5)
    registrar, provider = setup.registrar, setup.provider

    async def cancelled_call(call_id: str) -> None:
        branch = f"z9hG4bK{call_id}"
        registrar.send(request(registrar, "INVITE", call_id=call_id, body=SDP, branch=branch))
        await provider.next()
        assert [(await registrar.response()).status for _ in range(2)] == [100, 180]
        registrar.send(request(registrar, "CANCEL", call_id=call_id, branch=branch))
        assert sorted([(await registrar.response()).status for _ in range(2)]) == [200, 487]
        registrar.send(request(registrar, "ACK", call_id=call_id, branch=branch))
        assert (await provider.next()).kind is Kind.CALL_CANCELLED

    await cancelled_call("early")
    await cancelled_call("late")
    # a copy of the first call arriving late by another path is refused as merged ...
    registrar.send(request(registrar, "INVITE", call_id="early", body=SDP, branch="z9hG4bKcopy"))
    assert (await registrar.response()).status == 482
    registrar.send(request(registrar, "ACK", call_id="early", branch="z9hG4bKcopy"))
    await asyncio.sleep(0.6)
    # ... until the memory of both calls has lapsed, oldest first: then it is a new call
    registrar.send(request(registrar, "INVITE", call_id="late", body=SDP, branch="z9hG4bKagain"))
    assert (await registrar.response()).status == 100
    assert (await provider.next()).kind is Kind.CALL


@pytest.mark.parametrize(
    ("reason", "kind"),
    [("SIP;cause=487", Kind.CALL_CANCELLED),
     ('SIP;cause=200;text="Call completed elsewhere"', Kind.ANSWERED_ELSEWHERE)],
)  # fmt: skip
async def test_cancel_ends_the_call_with_487_and_a_notice(
    setup: Setup, reason: str, kind: Kind
) -> None:
    registrar, provider = setup.registrar, setup.provider
    registrar.send(request(registrar, "INVITE", body=SDP, branch="z9hG4bKcancelme"))
    await provider.next()
    assert [(await registrar.response()).status for _ in range(2)] == [100, 180]
    registrar.send(
        request(registrar, "CANCEL", branch="z9hG4bKcancelme", extra=f"Reason: {reason}\r\n")
    )
    answers = sorted(
        [(r.status, r.cseq.method) for r in [await registrar.response() for _ in range(2)]]
    )
    assert answers == [(200, "CANCEL"), (487, "INVITE")]
    notice = await provider.next()
    assert notice.kind is kind and notice.token == OTHER_TOKEN


async def test_closing_waits_for_the_push_of_a_call_it_ends(setup: Setup) -> None:
    registrar, provider = setup.registrar, setup.provider
    provider.gate = asyncio.Event()
    registrar.send(request(registrar, "INVITE", body=SDP))
    assert (await registrar.response()).status == 100
    assert (await provider.next()).kind is Kind.CALL
    closing = asyncio.ensure_future(setup.running.relay.calls.close())
    assert (await registrar.response()).status == 480
    await asyncio.sleep(0.2)
    assert not closing.done(), "the call push is still in flight"
    provider.gate.set()
    async with asyncio.timeout(2):
        await closing
    assert provider.pushes.empty()


async def test_failed_push_is_reported_in_the_180(setup: Setup) -> None:
    setup.provider.outcomes.append(Failed("no"))
    setup.registrar.send(request(setup.registrar, "INVITE", body=SDP))
    responses = [await setup.registrar.response() for _ in range(2)]
    assert responses[1].headers.get("Push-Status") == "failed"


async def test_requests_not_from_the_binding_flow_never_push(setup: Setup) -> None:
    registrar, provider = setup.registrar, setup.provider
    loop = asyncio.get_running_loop()
    spoofer_transport, spoofer = await loop.create_datagram_endpoint(
        Registrar, local_addr=("127.0.0.1", 0)
    )
    try:
        spoofer.contact_user, spoofer.relay = registrar.contact_user, registrar.relay
        spoofer.send(request(spoofer, "INVITE", body=SDP))
        assert (await spoofer.response()).status == 404
        spoofer.send(request(spoofer, "MESSAGE", body=b"hi", content_type="text/plain"))
        assert (await spoofer.response()).status == 404
        registrar.send(request(registrar, "INVITE", body=SDP, user="guessed-user"))
        assert (await registrar.response()).status == 404
        await asyncio.sleep(1.2)  # longer than Timer G's first retransmission
        assert spoofer.responses.empty() and registrar.responses.empty(), (
            "refused once, statelessly"
        )
        assert len(setup.running.relay.inbound.transactions) == 0, "no state kept for them"
        assert provider.pushes.empty()
    finally:
        spoofer_transport.close()


async def test_messages_are_queued_encrypted_and_pushed(setup: Setup) -> None:
    registrar, provider, instances = setup.registrar, setup.provider, setup.running.relay.instances
    registrar.send(
        request(registrar, "MESSAGE", call_id="m1", body=b"hello there", content_type="text/plain")
    )
    assert (await registrar.response()).status == 200
    push = await provider.next()
    assert push.kind is Kind.MESSAGE and push.token == OTHER_TOKEN
    registrar.send(request(registrar, "MESSAGE", call_id="m2", body=b"<isComposing/>",
                           content_type="application/im-iscomposing+xml"))  # fmt: skip
    registrar.send(request(registrar, "MESSAGE", call_id="m3", body=b"<imdn/>",
                           content_type="message/imdn+xml"))  # fmt: skip
    registrar.send(
        request(registrar, "MESSAGE", call_id="m4", body=b"x" * 20000, content_type="text/plain")
    )
    statuses = sorted([(await registrar.response()).status for _ in range(3)])
    assert statuses == [200, 200, 413]
    queued = await instances.queued_messages(setup.instance_id)
    assert [(m.content_type, m.body) for m in queued] == [
        ("text/plain", b"hello there"),
        ("message/imdn+xml", b"<imdn/>"),
    ]
    assert queued[0].sender == "sip:bob@example.test" and queued[0].account_id == "work"
    data = b"".join(p.read_bytes() for p in setup.running.relay.config.data_dir.glob("sipis.db*"))
    assert b"hello there" not in data, "stored encrypted"
    await asyncio.sleep(0.2)
    assert provider.pushes.empty(), "typing and receipts do not push"


async def test_rejected_token_erases_the_instance(setup: Setup) -> None:
    setup.provider.outcomes.append(TokenInvalid("Unregistered"))
    setup.registrar.send(request(setup.registrar, "INVITE", body=SDP))
    await setup.provider.next()
    store = setup.running.relay.store
    async with asyncio.timeout(5):
        while not await store.purge_log():
            await asyncio.sleep(0.05)
    [entry] = await store.purge_log()
    assert entry.reason == "token_invalid"
    assert await store.get(setup.instance_id) is None
