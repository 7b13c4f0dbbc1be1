"""The relay: a held call goes to the woken app, and its whole dialog runs through sipis.

Two scripted peers play the ends.  The caller's side is the registrar of
``test_calls`` (one loopback UDP socket that takes the relay's REGISTER),
which here also sends and answers in-dialog requests and record-routes
itself, as a provider's proxy would.  The app is a small SIP user agent on
the device port, over UDP or TCP, that registers with its instance's
digest credentials and answers exactly as each test tells it to.  Both
drop exact copies of what they already got (UDP retransmissions) and let a
test take what arrived in any order, by what it is.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar, cast

import pytest

from sipis.app import Relay
from sipis.push.base import Kind
from sipis.sip.digest import DigestClient, parse_challenge, select_challenge
from sipis.sip.message import Keepalive, Message, Request, Response, StreamFramer, parse_message
from sipis.sip.uas import make_response
from sipis.sip.uri import SipUri
from tests.peers.api import RunningRelay, instance_body, relay_with_api
from tests.unit.test_calls import SDP, RecordingProvider, Registrar

HOST = "127.0.0.1"
RING = 1.5
GRACE = 0.5
WAIT = 3.0
APP_SDP = (
    b"v=0\r\no=app 7 7 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 5000 RTP/AVP 0\r\n"
)
CALLER_FROM = '"Bob" <sip:bob@example.test>'
CALLER_TO = "<sip:alice@example.test>"

T = TypeVar("T")
_branches = itertools.count()


def new_branch() -> str:
    return f"z9hG4bKrelay{next(_branches)}x{secrets.token_hex(3)}"


def wire(start: str, fields: Iterable[tuple[str, str]], body: bytes = b"") -> bytes:
    head = "".join(f"{name}: {value}\r\n" for name, value in fields)
    return f"{start}\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def body_fields(body: bytes, content_type: str = "application/sdp") -> list[tuple[str, str]]:
    return [("Content-Type", content_type)] if body else []


class Inbox(Generic[T]):
    """What a peer received and no test took yet; taken by what it is, in any order."""

    def __init__(self) -> None:
        self._items: list[T] = []
        self._arrived = asyncio.Event()

    def put(self, item: T) -> None:
        self._items.append(item)
        self._arrived.set()

    async def take(self, match: Callable[[T], bool], timeout: float = WAIT) -> T:
        async with asyncio.timeout(timeout):
            while True:
                for index, item in enumerate(self._items):
                    if match(item):
                        return self._items.pop(index)
                self._arrived.clear()
                await self._arrived.wait()

    async def none(self, match: Callable[[T], bool], within: float) -> None:
        """Nothing that matches arrives within ``within`` seconds."""
        await asyncio.sleep(within)
        assert [item for item in self._items if match(item)] == []


def is_request(method: str, call_id: str | None = None) -> Callable[[Request], bool]:
    return lambda r: r.method == method and call_id in (None, r.call_id)


def is_response(
    status: int, method: str, call_id: str | None = None, tag: str | None = None
) -> Callable[[Response], bool]:
    return lambda r: (
        r.status == status
        and r.cseq.method == method
        and call_id in (None, r.call_id)
        and tag in (None, r.to.tag)
    )


def is_response_to(method: str, cseq: int) -> Callable[[Response], bool]:
    return lambda r: r.cseq == (cseq, method)


def route_uris(message: Message, name: str = "Record-Route") -> list[SipUri]:
    return [a.sip_uri for a in message.header_name_addrs(name)]


# -- the caller's side -----------------------------------------------------------------------


@dataclass
class CallerSide(Registrar):
    """The provider's registrar and proxy, also the caller: one UDP socket, record-routed."""

    requests: Inbox[Request] = field(default_factory=Inbox)
    answers: Inbox[Response] = field(default_factory=Inbox)
    contact_users: dict[str, str] = field(default_factory=dict)  # AoR user -> contact user
    seen: set[bytes] = field(default_factory=set)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not data.strip() or data in self.seen:
            return
        self.seen.add(data)
        message = parse_message(data)
        if isinstance(message, Response):
            self.answers.put(message)
        elif isinstance(message, Request) and message.method != "REGISTER":
            self.requests.put(message)
        else:
            user = message.to.sip_uri.user or ""
            self.contact_users[user] = message.contacts[0].sip_uri.user or ""
            super().datagram_received(data, addr)

    def via(self, branch: str) -> str:
        return f"SIP/2.0/UDP {HOST}:{self.port};branch={branch}"

    @property
    def own_route(self) -> str:
        return f"sip:{HOST}:{self.port};lr"

    @property
    def contact(self) -> str:
        return f"sip:bob@{HOST}:{self.port}"

    def reply(self, request: Request, status: int, *, body: bytes = b"") -> None:
        extra = [("Contact", f"<{self.contact}>")] if request.method in ("INVITE", "UPDATE") else []
        response = make_response(request, status, headers=extra + body_fields(body), body=body)
        self.send(response.serialize())


class Caller:
    """One call from the caller's side, and its half of the dialog once answered."""

    def __init__(self, side: CallerSide, contact_user: str) -> None:
        self.side = side
        self.contact_user = contact_user
        self.call_id = f"call-{secrets.token_hex(6)}"
        self.tag = f"caller-{secrets.token_hex(4)}"
        self.branch = new_branch()
        self.from_ = f"{CALLER_FROM};tag={self.tag}"
        self.cseq = 1
        self.remote: str | None = None  # To, the app's tag included
        self.target: str | None = None  # the app's Contact
        self.routes: list[str] = []  # the route set, without the registrar's own entry

    def invite(self, *, extra: Iterable[tuple[str, str]] = ()) -> None:
        self.side.send(
            wire(
                f"INVITE sip:{self.contact_user}@{HOST} SIP/2.0",
                [
                    ("Via", self.side.via(self.branch)),
                    ("Max-Forwards", "70"),
                    ("Record-Route", f"<{self.side.own_route}>"),
                    ("From", self.from_),
                    ("To", CALLER_TO),
                    ("Call-ID", self.call_id),
                    ("CSeq", "1 INVITE"),
                    ("Contact", f"<{self.side.contact}>"),
                    *extra,
                    *body_fields(SDP),
                ],
                SDP,
            )
        )

    def _same_hop(self, method: str, to: str) -> None:
        self.side.send(
            wire(
                f"{method} sip:{self.contact_user}@{HOST} SIP/2.0",
                [
                    ("Via", self.side.via(self.branch)),
                    ("Max-Forwards", "70"),
                    ("From", self.from_),
                    ("To", to),
                    ("Call-ID", self.call_id),
                    ("CSeq", f"1 {method}"),
                ],
            )
        )

    def cancel(self) -> None:
        self._same_hop("CANCEL", CALLER_TO)

    def ack_failure(self, response: Response) -> None:
        """The hop-by-hop ACK for a failure answer to the INVITE."""
        self._same_hop("ACK", response.headers.get("To") or "")

    def dialog_from(self, response: Response) -> None:
        """Take the dialog (early or confirmed) a response with the app's tag makes."""
        self.remote = response.headers.get("To")
        self.target = str(response.contacts[0].uri)
        own = f"<{self.side.own_route}>"
        self.routes = [str(a) for a in reversed(response.header_name_addrs("Record-Route"))]
        self.routes = [r for r in self.routes if r != own]

    def request(
        self,
        method: str,
        *,
        cseq: int | None = None,
        branch: str | None = None,
        extra: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        content_type: str = "application/sdp",
    ) -> str:
        """Send an in-dialog request along the route set; returns its branch."""
        assert self.remote is not None and self.target is not None
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        branch = branch or new_branch()
        contact = [("Contact", f"<{self.side.contact}>")] if method in ("INVITE", "UPDATE") else []
        self.side.send(
            wire(
                f"{method} {self.target} SIP/2.0",
                [
                    ("Via", self.side.via(branch)),
                    ("Max-Forwards", "70"),
                    *(("Route", route) for route in self.routes),
                    ("From", self.from_),
                    ("To", self.remote),
                    ("Call-ID", self.call_id),
                    ("CSeq", f"{cseq} {method}"),
                    *contact,
                    *extra,
                    *body_fields(body, content_type),
                ],
                body,
            )
        )
        return branch

    async def response(
        self, status: int, method: str = "INVITE", *, tag: str | None = None, timeout: float = WAIT
    ) -> Response:
        return await self.side.answers.take(is_response(status, method, self.call_id, tag), timeout)

    async def request_in(self, method: str, timeout: float = WAIT) -> Request:
        """A request of this call that reached the caller's side."""
        return await self.side.requests.take(is_request(method, self.call_id), timeout)


# -- the app ---------------------------------------------------------------------------------


class App(asyncio.Protocol, asyncio.DatagramProtocol):
    """The woken app on the device port: a user agent over UDP or TCP."""

    def __init__(self, transport: str, relay: tuple[str, int]) -> None:
        self.transport_name = transport
        self.relay = relay
        self.requests: Inbox[Request] = Inbox()
        self.responses: Inbox[Response] = Inbox()
        self._seen: set[bytes] = set()
        self._framer = StreamFramer()
        self._transport: asyncio.BaseTransport | None = None
        self._call_id = f"reg-{secrets.token_hex(6)}"
        self._cseq = 0

    @classmethod
    async def open(cls, transport: str, relay: tuple[str, int]) -> App:
        loop = asyncio.get_running_loop()
        app = cls(transport, relay)
        if transport == "udp":
            await loop.create_datagram_endpoint(lambda: app, local_addr=(HOST, 0))
        else:
            await loop.create_connection(lambda: app, *relay)
        return app

    # -- asyncio ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data.strip():
            self._received(parse_message(data))

    def data_received(self, data: bytes) -> None:
        for item in self._framer.feed(data):
            if isinstance(item, Message):
                self._received(item)
            elif isinstance(item, Keepalive) and item.ping:
                self.send(b"\r\n")

    def _received(self, message: Message) -> None:
        data = message.serialize()
        if data in self._seen:
            return
        self._seen.add(data)
        if isinstance(message, Request):
            self.requests.put(message)
        elif isinstance(message, Response):
            self.responses.put(message)

    # -- sending --------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.transport_name == "udp":
            cast(asyncio.DatagramTransport, self._transport).sendto(data, self.relay)
        else:
            cast(asyncio.Transport, self._transport).write(data)

    @property
    def port(self) -> int:
        assert self._transport is not None
        return int(self._transport.get_extra_info("sockname")[1])

    def via(self, branch: str) -> str:
        return f"SIP/2.0/{self.transport_name.upper()} {HOST}:{self.port};branch={branch};rport"

    @property
    def contact(self) -> str:
        return f"sip:app@{HOST}:{self.port};transport={self.transport_name}"

    def reply(
        self,
        request: Request,
        status: int,
        *,
        tag: str | None = None,
        extra: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> None:
        response = make_response(
            request, status, to_tag=tag, headers=[*extra, *body_fields(body)], body=body
        )
        self.send(response.serialize())

    async def register(self, instance_id: str, secret: str, *, expires: int = 600) -> Response:
        """REGISTER on the device port, answering the digest challenge; the final answer."""
        uri = f"sip:{HOST}"
        authorization: list[tuple[str, str]] = []
        for _ in range(2):
            self._cseq += 1
            self.send(
                wire(
                    f"REGISTER {uri} SIP/2.0",
                    [
                        ("Via", self.via(new_branch())),
                        ("Max-Forwards", "70"),
                        ("From", f"<sip:{instance_id}@{HOST}>;tag=app-reg"),
                        ("To", f"<sip:{instance_id}@{HOST}>"),
                        ("Call-ID", self._call_id),
                        ("CSeq", f"{self._cseq} REGISTER"),
                        ("Contact", f"<{self.contact}>"),
                        ("Expires", str(expires)),
                        *authorization,
                    ],
                )
            )
            answer = await self.responses.take(is_response_to("REGISTER", self._cseq))
            if answer.status != 401:
                return answer
            challenges = [parse_challenge(v) for v in answer.headers.get_all("WWW-Authenticate")]
            challenge = select_challenge(challenges)
            assert challenge is not None
            value = DigestClient(instance_id, secret).authorize(challenge, "REGISTER", uri)
            authorization = [("Authorization", value)]
        raise AssertionError("challenged twice")

    async def request(self, method: str, call_id: str | None = None) -> Request:
        return await self.requests.take(is_request(method, call_id))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class Answering:
    """The app's side of one forwarded INVITE and of the dialog it makes."""

    def __init__(self, app: App, invite: Request) -> None:
        self.app = app
        self.invite = invite
        self.call_id = invite.call_id
        self.tag = f"app-{secrets.token_hex(4)}"
        self.routes = invite.headers.values("Record-Route")
        self.target = str(invite.contacts[0].uri)
        self.local = f"{invite.headers.get('To')};tag={self.tag}"
        self.remote = invite.headers.get("From") or ""
        self.cseq = 100

    def respond(
        self, status: int, *, extra: Iterable[tuple[str, str]] = (), body: bytes = b""
    ) -> None:
        """Answer the INVITE (a 1xx or 2xx with the route set and a Contact)."""
        dialog = (
            [*(("Record-Route", r) for r in self.routes), ("Contact", f"<{self.app.contact}>")]
            if 100 < status < 300
            else []
        )
        self.app.reply(self.invite, status, tag=self.tag, extra=[*dialog, *extra], body=body)

    def request(
        self,
        method: str,
        *,
        cseq: int | None = None,
        extra: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        content_type: str = "application/sdp",
    ) -> None:
        """Send an in-dialog request along the route set."""
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        contact = [("Contact", f"<{self.app.contact}>")] if method in ("INVITE", "UPDATE") else []
        self.app.send(
            wire(
                f"{method} {self.target} SIP/2.0",
                [
                    ("Via", self.app.via(new_branch())),
                    ("Max-Forwards", "70"),
                    *(("Route", route) for route in self.routes),
                    ("From", self.local),
                    ("To", self.remote),
                    ("Call-ID", self.call_id),
                    ("CSeq", f"{cseq} {method}"),
                    *contact,
                    *extra,
                    *body_fields(body, content_type),
                ],
                body,
            )
        )

    async def response(self, status: int, method: str) -> Response:
        return await self.app.responses.take(is_response(status, method, self.call_id))

    async def request_in(self, method: str, timeout: float = WAIT) -> Request:
        return await self.app.requests.take(is_request(method, self.call_id), timeout)


# -- the relay between them -------------------------------------------------------------------


@dataclass
class World:
    running: RunningRelay
    side: CallerSide
    provider: RecordingProvider
    instance_id: str
    secret: str
    apps: list[App] = field(default_factory=list)

    @property
    def relay(self) -> Relay:
        return self.running.relay

    def device(self, transport: str) -> tuple[str, int]:
        return HOST, self.relay.device_transport.listening[transport]

    async def app(
        self,
        transport: str = "udp",
        *,
        instance: tuple[str, str] | None = None,
        register: bool = True,
    ) -> App:
        app = await App.open(transport, self.device(transport))
        self.apps.append(app)
        if register:
            instance_id, secret = instance or (self.instance_id, self.secret)
            assert (await app.register(instance_id, secret)).status == 200
        return app

    def caller(self, account: str = "work", instance_id: str | None = None) -> Caller:
        binding = self.relay.bindings.get(f"{instance_id or self.instance_id}/{account}")
        assert binding is not None
        return Caller(self.side, binding.session.config.contact_user)

    async def create_instance(self, accounts: list[tuple[str, str]]) -> tuple[str, str]:
        """A new instance with (account id, AoR user) accounts, all registered."""
        registrar = f"sip:{HOST}:{self.side.port};transport=udp"
        body = instance_body(registrar, user=accounts[0][1], password="pw-relay")
        body["accounts"] = [
            {**body["accounts"][0], "id": account, "aor": f"sip:{user}@example.test"}
            for account, user in accounts
        ]
        status, created = await self.running.client.call("POST", "/v1/instances", body=body)
        assert status == 201, created
        async with asyncio.timeout(5):
            for account, _ in accounts:
                while True:
                    binding = self.relay.bindings.get(f"{created['id']}/{account}")
                    if binding is not None and binding.session.registered_until is not None:
                        break
                    await asyncio.sleep(0.02)
        return created["id"], created["secret"]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    loop = asyncio.get_running_loop()
    transport, side = await loop.create_datagram_endpoint(CallerSide, local_addr=(HOST, 0))
    provider = RecordingProvider()
    async with relay_with_api(
        tmp_path,
        providers={"ios": provider, "android": provider},
        push={"ring_timeout": RING},
        device={"grace": GRACE},
        lifecycle={"unregister_wait": 0.3},
    ) as running:
        world = World(running, side, provider, "", "")
        world.instance_id, world.secret = await world.create_instance([("work", "alice")])
        try:
            yield world
        finally:
            for app in world.apps:
                app.close()
    transport.close()


async def ringing(world: World, caller: Caller) -> Response:
    """Send the caller's INVITE and wait for it to be held: 100, the call push, 180."""
    caller.invite()
    assert (await caller.response(100)).to.tag is None
    push = await world.provider.next()
    assert push.kind is Kind.CALL
    held = await caller.response(180)
    assert held.headers.get("Push-Status") == "sent"
    return held


async def answered(world: World, transport: str = "udp") -> tuple[Caller, App, Answering]:
    """A call the app answered and the caller ACKed, relayed over ``transport``."""
    caller = world.caller()
    await ringing(world, caller)
    app = await world.app(transport)
    call = Answering(app, await app.request("INVITE"))
    call.respond(180)
    await caller.response(180, tag=call.tag)
    call.respond(200, body=APP_SDP)
    ok = await caller.response(200, tag=call.tag)
    caller.dialog_from(ok)
    caller.request("ACK", cseq=1)
    await call.request_in("ACK")
    return caller, app, call


async def until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


def calls_ended(world: World, outcome: str) -> float:
    value = world.relay.metrics.registry.get_sample_value("sipis_calls_total", {"outcome": outcome})
    return value or 0.0


# -- 1, 2: the call reaches the app and the dialog runs both ways ---------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_a_held_call_goes_to_the_app_when_it_registers(world: World, transport: str) -> None:
    caller = world.caller()
    held = await ringing(world, caller)
    assert world.relay.calls.held(world.instance_id) != []
    app = await world.app(transport)
    invite = await app.request("INVITE")

    assert invite.uri == SipUri(HOST, "app", app.port, params={"transport": transport})
    assert invite.headers.get("From") == caller.from_, "the caller's identity passes untouched"
    assert invite.headers.get("To") == CALLER_TO and invite.to.tag is None
    assert (invite.body, invite.headers.get("Content-Type")) == (SDP, "application/sdp")
    assert invite.headers.get("Sipis-Account") == "work"
    assert (invite.call_id, invite.cseq, invite.max_forwards) == (caller.call_id, (1, "INVITE"), 69)
    device_port = world.device(transport)[1]
    sip_port = world.relay.transport.listening["udp"]
    top, below = invite.vias
    assert (top.transport, top.host, top.port) == (transport.upper(), HOST, device_port)
    assert below.branch == caller.branch and below.port == world.side.port
    routes = route_uris(invite)
    assert [(u.user, u.host, u.port, u.transport, "lr" in u.params) for u in routes[:2]] == [
        ("rr", HOST, device_port, transport, True),
        ("rr", HOST, sip_port, "udp", True),
    ], "the relay's two Record-Route entries on top: the app's side first"
    assert [str(u) for u in routes[2:]] == [world.side.own_route]

    call = Answering(app, invite)
    call.respond(180)
    ring = await caller.response(180, tag=call.tag)
    assert len(ring.vias) == 1 and ring.via.branch == caller.branch
    assert ring.to.tag != held.to.tag, "the app's own tag, not the one sipis rang with"
    call.respond(200, body=APP_SDP)
    ok = await caller.response(200, tag=call.tag)
    assert len(ok.vias) == 1 and ok.body == APP_SDP
    assert [str(u) for u in route_uris(ok)] == [str(u) for u in routes]
    assert world.relay.calls.held(world.instance_id) == []
    assert len(world.relay.dialogs) == 1

    caller.dialog_from(ok)
    assert caller.routes == [f"<{routes[1]}>", f"<{routes[0]}>"]
    caller.request("ACK", cseq=1)
    ack = await call.request_in("ACK")
    assert ack.cseq == (1, "ACK") and len(ack.vias) == 2 and "Route" not in ack.headers
    assert ack.uri == invite.uri and ack.to.tag == call.tag

    call.request("BYE")
    bye = await caller.request_in("BYE")
    assert bye.uri == SipUri(HOST, "bob", world.side.port)
    assert [str(u) for u in route_uris(bye, "Route")] == [world.side.own_route]
    assert len(bye.vias) == 2 and bye.vias[1].port == app.port
    assert (bye.from_.tag, bye.to.tag, bye.cseq) == (call.tag, caller.tag, (101, "BYE"))
    world.side.reply(bye, 200)
    bye_ok = await call.response(200, "BYE")
    assert len(bye_ok.vias) == 1 and bye_ok.via.port == app.port
    assert len(world.relay.dialogs) == 0
    assert calls_ended(world, "relayed") == 1


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_the_caller_hangs_up(world: World, transport: str) -> None:
    caller, app, call = await answered(world, transport)
    caller.request("BYE")
    bye = await call.request_in("BYE")
    assert bye.uri == SipUri(HOST, "app", app.port, params={"transport": transport})
    assert "Route" not in bye.headers and len(bye.vias) == 2
    assert (bye.from_.tag, bye.to.tag, bye.cseq) == (caller.tag, call.tag, (2, "BYE"))
    app.reply(bye, 200)
    ok = await caller.response(200, "BYE")
    assert len(ok.vias) == 1 and ok.to.tag == call.tag
    assert len(world.relay.dialogs) == 0
    caller.request("BYE")
    assert (await caller.response(481, "BYE")).to.tag == call.tag, "the dialog is gone"


async def test_a_call_for_a_registered_app_goes_there_at_once_and_still_pushes(
    world: World,
) -> None:
    app = await world.app()
    caller = world.caller()
    caller.invite()
    invite = await app.request("INVITE", caller.call_id)
    assert invite.headers.get("Sipis-Account") == "work"
    assert (await world.provider.next()).kind is Kind.CALL
    call = Answering(app, invite)
    call.respond(200, body=APP_SDP)
    ok = await caller.response(200, tag=call.tag)
    assert ok.body == APP_SDP
    caller.dialog_from(ok)
    caller.request("ACK", cseq=1)
    await call.request_in("ACK")


# -- 3, 4, 5, 6: calls that end before the app answers ------------------------------------


async def test_the_caller_cancels_while_the_app_rings(world: World) -> None:
    caller = world.caller()
    held = await ringing(world, caller)
    app = await world.app()
    invite = await app.request("INVITE")
    call = Answering(app, invite)
    call.respond(180)
    await caller.response(180, tag=call.tag)

    caller.cancel()
    assert (await caller.response(200, "CANCEL")).to.tag == held.to.tag
    cancelled = await caller.response(487)
    assert cancelled.to.tag == held.to.tag
    caller.ack_failure(cancelled)
    assert (await world.provider.next()).kind is Kind.CALL_CANCELLED

    cancel = await call.request_in("CANCEL")
    assert cancel.cseq == (1, "CANCEL") and cancel.via.branch == invite.via.branch
    assert len(cancel.vias) == 1 and cancel.to.tag is None
    app.reply(cancel, 200)
    call.respond(487)
    ack = await call.request_in("ACK")
    assert ack.cseq == (1, "ACK") and ack.via.branch == invite.via.branch
    assert ack.to.tag == call.tag
    await world.side.answers.none(lambda r: r.to.tag == call.tag and r.status >= 200, 0.2)
    assert calls_ended(world, "cancelled") == 1 and len(world.relay.dialogs) == 0


async def test_a_cancel_waits_for_the_apps_first_provisional_response(world: World) -> None:
    caller = world.caller()
    await ringing(world, caller)
    app = await world.app()
    invite = await app.request("INVITE")
    caller.cancel()
    await caller.response(200, "CANCEL")
    caller.ack_failure(await caller.response(487))
    assert (await world.provider.next()).kind is Kind.CALL_CANCELLED
    await app.requests.none(is_request("CANCEL"), 0.6)  # over Timer A: the INVITE is resent

    call = Answering(app, invite)
    call.respond(180)
    cancel = await call.request_in("CANCEL")
    assert cancel.via.branch == invite.via.branch
    app.reply(cancel, 200)
    call.respond(487)
    assert (await call.request_in("ACK")).cseq == (1, "ACK")
    await world.side.answers.none(lambda r: r.to.tag == call.tag, 0.2)


async def test_ringing_out_while_forwarded(world: World) -> None:
    caller = world.caller()
    started = time.monotonic()
    held = await ringing(world, caller)
    app = await world.app()
    call = Answering(app, await app.request("INVITE"))
    call.respond(180)
    await caller.response(180, tag=call.tag)

    timed_out = await caller.response(480, timeout=RING + 2)
    assert time.monotonic() - started >= RING - 0.1
    assert timed_out.to.tag == held.to.tag
    caller.ack_failure(timed_out)
    cancel = await call.request_in("CANCEL")
    app.reply(cancel, 200)
    call.respond(487)
    await call.request_in("ACK")
    assert (await world.provider.next()).kind is Kind.CALL_MISSED
    assert calls_ended(world, "missed") == 1


@pytest.mark.parametrize(("status", "outcome"), [(486, "declined"), (603, "declined"),
                                                 (500, "failed")])  # fmt: skip
async def test_the_apps_failure_answer_goes_upstream(
    world: World, status: int, outcome: str
) -> None:
    caller = world.caller()
    started = time.monotonic()
    await ringing(world, caller)
    app = await world.app()
    call = Answering(app, await app.request("INVITE"))
    call.respond(180)
    await caller.response(180, tag=call.tag)
    call.respond(status)

    final = await caller.response(status, tag=call.tag)
    assert len(final.vias) == 1 and final.via.branch == caller.branch
    caller.ack_failure(final)
    ack = await call.request_in("ACK")
    assert ack.cseq == (1, "ACK") and ack.to.tag == call.tag
    assert calls_ended(world, outcome) == 1
    # past the ring timeout: no 480 and no missed-call push follow
    await world.side.answers.none(
        lambda r: r.status >= 200, RING + 0.3 - (time.monotonic() - started)
    )
    assert world.provider.pushes.empty()
    assert world.relay.calls.held(world.instance_id) == []


async def test_a_200_that_crosses_the_cancel_is_acked_and_hung_up(world: World) -> None:
    caller = world.caller()
    await ringing(world, caller)
    app = await world.app()
    invite = await app.request("INVITE")
    call = Answering(app, invite)
    call.respond(180)
    await caller.response(180, tag=call.tag)
    caller.cancel()
    await caller.response(200, "CANCEL")
    caller.ack_failure(await caller.response(487))

    cancel = await call.request_in("CANCEL")
    app.reply(cancel, 200)
    call.respond(200, body=APP_SDP)  # answered before the CANCEL arrived
    call.respond(200, body=APP_SDP)  # and retransmitted
    acks = [await call.request_in("ACK"), await call.request_in("ACK")]
    assert [(a.cseq, a.to.tag, a.from_.tag) for a in acks] == [
        ((1, "ACK"), call.tag, caller.tag)
    ] * 2
    bye = await call.request_in("BYE")
    assert (bye.cseq, bye.to.tag, bye.from_.tag) == ((2, "BYE"), call.tag, caller.tag)
    assert bye.uri == invite.uri and len(bye.vias) == 1
    app.reply(bye, 200)
    await app.requests.none(is_request("BYE"), 0.3)
    await world.side.answers.none(lambda r: r.to.tag == call.tag, 0.1)
    assert len(world.relay.dialogs) == 0


# -- 7: requests within the dialog -------------------------------------------------------------


async def test_requests_within_the_dialog_go_both_ways(world: World) -> None:
    caller, app, call = await answered(world)

    # a re-INVITE from the caller
    caller.request("INVITE", body=SDP)
    reinvite = await call.request_in("INVITE")
    assert (reinvite.cseq, reinvite.to.tag, len(reinvite.vias)) == ((2, "INVITE"), call.tag, 2)
    assert "Route" not in reinvite.headers and reinvite.body == SDP
    app.reply(reinvite, 200, body=APP_SDP, extra=[("Contact", f"<{app.contact}>")])
    ok = await caller.response(200, "INVITE")
    assert ok.cseq == (2, "INVITE") and len(ok.vias) == 1 and ok.body == APP_SDP
    caller.request("ACK", cseq=2)
    assert (await call.request_in("ACK")).cseq == (2, "ACK")

    # a re-INVITE from the app
    call.request("INVITE", body=APP_SDP)
    reinvite = await caller.request_in("INVITE")
    assert (reinvite.cseq, reinvite.from_.tag, len(reinvite.vias)) == ((101, "INVITE"), call.tag, 2)
    assert [str(u) for u in route_uris(reinvite, "Route")] == [world.side.own_route]
    world.side.reply(reinvite, 200, body=SDP)
    ok = await call.response(200, "INVITE")
    assert len(ok.vias) == 1 and ok.body == SDP
    call.request("ACK", cseq=101)
    ack = await caller.request_in("ACK")
    assert ack.cseq == (101, "ACK") and len(ack.vias) == 2

    # UPDATE and INFO, each way
    for method, body, content_type in [
        ("UPDATE", SDP, "application/sdp"),
        ("INFO", b"Signal=5\r\nDuration=160\r\n", "application/dtmf-relay"),
    ]:
        caller.request(method, body=body, content_type=content_type)
        incoming = await call.request_in(method)
        assert (incoming.body, incoming.headers.get("Content-Type")) == (body, content_type)
        assert incoming.to.tag == call.tag and len(incoming.vias) == 2
        app.reply(incoming, 200, extra=[("Contact", f"<{app.contact}>")])
        assert len((await caller.response(200, method)).vias) == 1

        call.request(method, body=body, content_type=content_type)
        outgoing = await caller.request_in(method)
        assert (outgoing.body, outgoing.from_.tag, len(outgoing.vias)) == (body, call.tag, 2)
        world.side.reply(outgoing, 200)
        assert len((await call.response(200, method)).vias) == 1

    caller.request("BYE")
    app.reply(await call.request_in("BYE"), 200)
    await caller.response(200, "BYE")


async def test_the_caller_cancels_a_pending_reinvite(world: World) -> None:
    caller, app, call = await answered(world)
    branch = caller.request("INVITE", body=SDP)
    reinvite = await call.request_in("INVITE")
    app.reply(reinvite, 180)
    assert (await caller.response(180)).to.tag == call.tag
    caller.request("CANCEL", cseq=caller.cseq, branch=branch)
    assert (await caller.response(200, "CANCEL")).cseq == (2, "CANCEL")
    cancel = await call.request_in("CANCEL")
    assert cancel.cseq == (2, "CANCEL") and cancel.via.branch == reinvite.via.branch
    app.reply(cancel, 200)
    app.reply(reinvite, 487)
    ack = await call.request_in("ACK")
    assert ack.cseq == (2, "ACK") and ack.via.branch == reinvite.via.branch
    cancelled = await caller.response(487)
    assert cancelled.cseq == (2, "INVITE")
    caller.request("ACK", cseq=2, branch=branch)  # the hop-by-hop ACK for the 487
    # the dialog lives on
    caller.request("BYE")
    app.reply(await call.request_in("BYE"), 200)
    assert (await caller.response(200, "BYE")).cseq == (3, "BYE")


async def test_a_reinvite_is_cancelled_only_after_a_provisional_response(world: World) -> None:
    caller, app, call = await answered(world)
    branch = caller.request("INVITE", body=SDP)
    reinvite = await call.request_in("INVITE")
    caller.request("CANCEL", cseq=caller.cseq, branch=branch)
    assert (await caller.response(200, "CANCEL")).cseq == (2, "CANCEL")
    await app.requests.none(is_request("CANCEL"), 0.3)
    app.reply(reinvite, 100)
    cancel = await call.request_in("CANCEL")
    assert cancel.via.branch == reinvite.via.branch
    app.reply(cancel, 200)
    app.reply(reinvite, 487)
    await call.request_in("ACK")
    assert (await caller.response(487)).cseq == (2, "INVITE")
    caller.request("ACK", cseq=2, branch=branch)


async def test_reliable_provisional_responses_are_pracked_through_the_relay(
    world: World,
) -> None:
    caller = world.caller()
    caller.invite(extra=[("Supported", "100rel")])
    await caller.response(100)
    await world.provider.next()
    await caller.response(180)
    app = await world.app()
    invite = await app.request("INVITE")
    assert invite.headers.get("Supported") == "100rel"
    call = Answering(app, invite)
    call.respond(183, extra=[("Require", "100rel"), ("RSeq", "1")], body=APP_SDP)
    progress = await caller.response(183, tag=call.tag)
    assert (progress.headers.get("Require"), progress.headers.get("RSeq")) == ("100rel", "1")

    caller.dialog_from(progress)
    caller.request("PRACK", extra=[("RAck", "1 1 INVITE")])
    prack = await call.request_in("PRACK")
    assert (prack.headers.get("RAck"), prack.cseq, prack.to.tag) == (
        "1 1 INVITE",
        (2, "PRACK"),
        call.tag,
    )
    assert len(prack.vias) == 2 and "Route" not in prack.headers
    app.reply(prack, 200)
    assert len((await caller.response(200, "PRACK")).vias) == 1
    call.request("UPDATE", body=APP_SDP)  # the app's side of the early dialog is relayed too
    update = await caller.request_in("UPDATE")
    assert (update.from_.tag, update.cseq, len(update.vias)) == (call.tag, (101, "UPDATE"), 2)
    world.side.reply(update, 200, body=SDP)
    assert (await call.response(200, "UPDATE")).body == SDP

    call.respond(200, body=APP_SDP)
    caller.dialog_from(await caller.response(200, tag=call.tag))
    caller.request("ACK", cseq=1)
    await call.request_in("ACK")
    caller.request("BYE")
    app.reply(await call.request_in("BYE"), 200)
    await caller.response(200, "BYE")
    assert len(world.relay.dialogs) == 0


@pytest.mark.parametrize("ending", ["declined", "cancelled"])
async def test_an_early_dialog_ends_with_its_call(world: World, ending: str) -> None:
    caller = world.caller()
    await ringing(world, caller)
    app = await world.app()
    call = Answering(app, await app.request("INVITE"))
    call.respond(180)
    caller.dialog_from(await caller.response(180, tag=call.tag))
    caller.request("UPDATE", body=SDP)  # relayed in the early dialog
    app.reply(await call.request_in("UPDATE"), 200, body=APP_SDP)
    assert (await caller.response(200, "UPDATE")).body == APP_SDP
    assert len(world.relay.dialogs) == 0, "an early dialog is no answered call"
    if ending == "declined":
        call.respond(486)
        caller.ack_failure(await caller.response(486, tag=call.tag))
    else:
        caller.cancel()
        caller.ack_failure(await caller.response(487))
    caller.request("BYE")
    assert (await caller.response(481, "BYE")).to.tag == call.tag
    call.request("BYE")
    assert (await call.response(481, "BYE")).to.tag == caller.tag


# -- 8: several calls --------------------------------------------------------------------------


async def test_two_calls_at_once_are_relayed_independently(world: World) -> None:
    first, second = world.caller(), world.caller()
    await ringing(world, first)
    await ringing(world, second)
    app = await world.app()
    one = Answering(app, await app.request("INVITE", first.call_id))
    two = Answering(app, await app.request("INVITE", second.call_id))
    one.respond(180)
    two.respond(180)
    await first.response(180, tag=one.tag)
    await second.response(180, tag=two.tag)
    one.respond(200, body=APP_SDP)
    two.respond(486)
    first.dialog_from(await first.response(200, tag=one.tag))
    second.ack_failure(await second.response(486, tag=two.tag))
    await world.side.answers.none(is_response(200, "INVITE", second.call_id), 0.1)
    first.request("ACK", cseq=1)
    await one.request_in("ACK")
    await two.request_in("ACK")
    assert len(world.relay.dialogs) == 1

    # a third call arrives while the first is relayed: it goes to the app at once
    third = world.caller()
    third.invite()
    three = Answering(app, await app.request("INVITE", third.call_id))
    three.respond(200, body=APP_SDP)
    third.dialog_from(await third.response(200, tag=three.tag))
    third.request("ACK", cseq=1)
    await three.request_in("ACK")
    assert len(world.relay.dialogs) == 2

    first.request("BYE")
    app.reply(await one.request_in("BYE"), 200)
    await first.response(200, "BYE")
    three.request("BYE")
    world.side.reply(await third.request_in("BYE"), 200)
    await three.response(200, "BYE")
    assert len(world.relay.dialogs) == 0


async def test_each_account_of_an_instance_gets_its_own_calls(world: World) -> None:
    instance = await world.create_instance([("work", "carol"), ("home", "dave")])
    app = await world.app(instance=instance)
    work, home = world.caller("work", instance[0]), world.caller("home", instance[0])
    assert work.contact_user == world.side.contact_users["carol"]
    assert home.contact_user == world.side.contact_users["dave"]
    work.invite()
    home.invite()
    for caller, account in [(work, "work"), (home, "home")]:
        invite = await app.request("INVITE", caller.call_id)
        assert invite.headers.get_all("Sipis-Account") == [account]
        call = Answering(app, invite)
        call.respond(603)
        caller.ack_failure(await caller.response(603, tag=call.tag))


# -- 9: messages -------------------------------------------------------------------------------


def send_message(world: World, body: bytes) -> str:
    caller = world.caller()
    world.side.send(
        wire(
            f"MESSAGE sip:{caller.contact_user}@{HOST} SIP/2.0",
            [
                ("Via", world.side.via(new_branch())),
                ("Max-Forwards", "70"),
                ("From", caller.from_),
                ("To", CALLER_TO),
                ("Call-ID", caller.call_id),
                ("CSeq", "1 MESSAGE"),
                ("Content-Type", "text/plain;charset=utf-8"),
            ],
            body,
        )
    )
    return caller.call_id


async def queued_bodies(world: World) -> list[bytes]:
    return [m.body for m in await world.relay.instances.queued_messages(world.instance_id)]


async def test_a_queued_message_reaches_the_app_when_it_registers(world: World) -> None:
    call_id = send_message(world, b"call me back")
    assert (await world.side.answers.take(is_response(200, "MESSAGE", call_id))).status == 200
    assert (await world.provider.next()).kind is Kind.MESSAGE
    app = await world.app()
    message = await app.request("MESSAGE")
    assert message.from_.uri == SipUri("example.test", "bob")
    assert (message.body, message.headers.get("Content-Type")) == (b"call me back", "text/plain")
    assert message.headers.get("Sipis-Account") == "work"
    assert message.to.sip_uri.user == world.instance_id and message.uri == SipUri(
        HOST, "app", app.port, params={"transport": "udp"}
    )
    assert message.headers.get("Date") is not None
    assert await queued_bodies(world) == [b"call me back"]
    app.reply(message, 200)
    async with asyncio.timeout(WAIT):
        while await queued_bodies(world):
            await asyncio.sleep(0.02)


async def test_a_message_the_app_refuses_stays_queued(world: World) -> None:
    app = await world.app()
    call_id = send_message(world, b"while you are here")
    await world.side.answers.take(is_response(200, "MESSAGE", call_id))
    message = await app.request("MESSAGE")
    assert message.body == b"while you are here", "delivered at once"
    app.reply(message, 480)
    await asyncio.sleep(0.2)
    assert await queued_bodies(world) == [b"while you are here"]

    assert (await app.register(world.instance_id, world.secret)).status == 200
    again = await app.request("MESSAGE")
    assert again.body == b"while you are here" and again.call_id != message.call_id
    app.reply(again, 500)
    await asyncio.sleep(0.2)
    assert await queued_bodies(world) == [b"while you are here"]

    assert (await app.register(world.instance_id, world.secret)).status == 200
    app.reply(await app.request("MESSAGE"), 200)
    async with asyncio.timeout(WAIT):
        while await queued_bodies(world):
            await asyncio.sleep(0.02)


# -- 10, 11: the app's device comes and goes ---------------------------------------------------


async def test_an_app_that_reconnects_within_the_grace_period_keeps_its_call(
    world: World,
) -> None:
    caller, app, call = await answered(world, "tcp")
    app.close()
    await until(lambda: world.relay.devices.get(world.instance_id) is None)
    again = await world.app("tcp")
    await asyncio.sleep(GRACE + 0.2)
    await world.side.requests.none(is_request("BYE"), 0)
    caller.request("BYE")
    bye = await again.request("BYE", caller.call_id)
    assert (bye.to.tag, bye.cseq) == (call.tag, (2, "BYE"))
    again.reply(bye, 200)
    await caller.response(200, "BYE")
    assert len(world.relay.dialogs) == 0


async def test_an_app_that_stays_away_is_hung_up_for(world: World) -> None:
    caller, app, call = await answered(world, "tcp")
    app.close()
    lost = time.monotonic()
    bye = await caller.request_in("BYE", timeout=GRACE + 2)
    assert time.monotonic() - lost >= GRACE - 0.05
    assert bye.headers.get("Reason") == 'SIP;cause=480;text="App unreachable"'
    assert (bye.from_.tag, bye.to.tag, bye.cseq) == (call.tag, caller.tag, (1, "BYE"))
    assert bye.uri == SipUri(HOST, "bob", world.side.port)
    assert [str(u) for u in route_uris(bye, "Route")] == [world.side.own_route]
    assert len(bye.vias) == 1
    world.side.reply(bye, 200)
    assert len(world.relay.dialogs) == 0
    caller.request("BYE")
    assert (await caller.response(481, "BYE")).to.tag == call.tag


async def test_an_unregistering_app_gets_the_call_anew_when_it_returns(world: World) -> None:
    caller = world.caller()
    await ringing(world, caller)
    app = await world.app()
    first = await app.request("INVITE")
    call = Answering(app, first)
    call.respond(180)
    await caller.response(180, tag=call.tag)

    assert (await app.register(world.instance_id, world.secret, expires=0)).status == 200
    assert world.relay.devices.get(world.instance_id) is None
    assert [c.identity[0] for c in world.relay.calls.held(world.instance_id)] == [caller.call_id]
    await app.requests.none(is_request("INVITE"), 0.2)

    assert (await app.register(world.instance_id, world.secret)).status == 200
    second = await app.request("INVITE")
    assert second.call_id == caller.call_id and second.via.branch != first.via.branch
    call = Answering(app, second)
    call.respond(200, body=APP_SDP)
    caller.dialog_from(await caller.response(200, tag=call.tag))
    caller.request("ACK", cseq=1)
    await call.request_in("ACK")
    assert len(world.relay.dialogs) == 1


async def test_a_registration_refresh_does_not_forward_the_call_again(world: World) -> None:
    caller = world.caller()
    await ringing(world, caller)
    app = await world.app()
    call = Answering(app, await app.request("INVITE"))
    call.respond(180)
    await caller.response(180, tag=call.tag)
    assert (await app.register(world.instance_id, world.secret)).status == 200
    await app.requests.none(is_request("INVITE"), 0.3)
    call.respond(200, body=APP_SDP)
    assert (await caller.response(200, tag=call.tag)).body == APP_SDP


# -- 12, 13: who may speak in a dialog, and for how long ----------------------------------------


async def test_in_dialog_requests_from_elsewhere_get_481(world: World) -> None:
    caller, app, call = await answered(world)
    stranger = await world.app(register=False)
    stranger_call = Answering(stranger, call.invite)
    stranger_call.tag, stranger_call.local = call.tag, call.local
    stranger_call.request("BYE")
    refused = await stranger_call.response(481, "BYE")
    assert refused.to.tag == caller.tag
    await world.side.requests.none(is_request("BYE"), 0.2)

    # unknown dialogs, on both sides
    bogus = Answering(app, call.invite)
    bogus.request("BYE")  # a To tag no dialog has
    assert (await bogus.response(481, "BYE")).from_.tag == bogus.tag
    caller.remote = f"{CALLER_TO};tag=nobody"
    caller.request("BYE")
    assert (await caller.response(481, "BYE")).to.tag == "nobody"

    call.request("BYE")  # the app itself still can
    world.side.reply(await caller.request_in("BYE"), 200)
    await call.response(200, "BYE")


async def test_erasing_the_instance_forgets_its_dialogs(world: World) -> None:
    caller, app, call = await answered(world)
    status, _ = await world.running.client.call(
        "DELETE", f"/v1/instances/{world.instance_id}", secret=world.secret
    )
    assert status == 204
    assert len(world.relay.dialogs) == 0
    assert world.relay.devices.get(world.instance_id) is None
    caller.request("BYE")
    assert (await caller.response(481, "BYE")).to.tag == call.tag
    call.request("BYE")
    assert (await call.response(481, "BYE")).to.tag == caller.tag
    await app.requests.none(is_request("BYE"), 0.1)
