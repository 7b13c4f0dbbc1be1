"""The device port's registrar over real sockets: who gets in, for how long, and who does not.

Each test starts the relay on loopback, makes an instance through the HTTPS
API and speaks SIP to the device port as a woken app would, over UDP, TCP or
TLS (trusting the development certificate the relay made for itself).  The
answers are read off the wire; ``relay.devices`` shows whom the relay knows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sipis.devices import MAX_EXPIRES, Device, Devices, FailureBudget
from sipis.sip.digest import Challenge, DigestClient, parse_challenge
from sipis.sip.digest_server import HA1_ALGORITHMS, digest_ha1
from sipis.sip.message import Message, ParseError, Request, Response, StreamFramer, parse_message
from sipis.sip.uas import make_response
from sipis.sip.uri import parse_sip_uri
from tests.peers.api import RunningRelay, instance_body, relay_with_api
from tests.secrets import RECORDER, remember

TIMEOUT = 3.0
REALM = "sipis"
_numbers = itertools.count()


# -- the app's side of a flow -------------------------------------------------------------


class App:
    """An app's end of one flow to the device port: builds requests, reads the answers."""

    def __init__(self, kind: str, local: tuple[str, int], relay_port: int) -> None:
        self.kind = kind
        self.local = local
        self.relay_port = relay_port

    @property
    def relay_uri(self) -> str:
        """The Request-URI of a REGISTER, and the digest-uri that answers it."""
        return f"sip:127.0.0.1:{self.relay_port};transport={self.kind}"

    @property
    def contact(self) -> str:
        host, port = self.local
        return f"sip:app@{host}:{port};transport={self.kind}"

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    async def next_message(self) -> Message:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def response(self, timeout: float = TIMEOUT) -> Response:
        async with asyncio.timeout(timeout):
            while True:
                message = await self.next_message()
                if isinstance(message, Response):
                    return message

    def request(
        self,
        method: str,
        user: str,
        *,
        to: str | None = None,
        to_tag: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> bytes:
        number = next(_numbers)
        host, port = self.local
        to_value = to if to is not None else f"<sip:{user}@127.0.0.1>"
        lines = [
            f"{method} {self.relay_uri} SIP/2.0",
            f"Via: SIP/2.0/{self.kind.upper()} {host}:{port};branch=z9hG4bKapp{number};rport",
            "Max-Forwards: 70",
            f"From: <sip:{user}@127.0.0.1>;tag=app{number}",
            f"To: {to_value}" + (f";tag={to_tag}" if to_tag else ""),
            f"Call-ID: device-{number}",
            f"CSeq: 1 {method}",
            *(f"{name}: {value}" for name, value in headers),
            "Content-Length: 0",
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def ask(self, method: str, user: str, **options: Any) -> Response:
        self.send(self.request(method, user, **options))
        return await self.response()

    async def register(
        self,
        user: str,
        *,
        authorization: str | None = None,
        expires: int | None = 600,
        contact: str | None = None,
        to: str | None = None,
    ) -> Response:
        headers = [("Contact", contact if contact is not None else f"<{self.contact}>")]
        if expires is not None:
            headers.append(("Expires", str(expires)))
        if authorization is not None:
            headers.append(("Authorization", authorization))
        return await self.ask("REGISTER", user, to=to, headers=headers)


@dataclass
class _Datagrams(asyncio.DatagramProtocol):
    messages: asyncio.Queue[Message] = field(default_factory=asyncio.Queue)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data.strip():  # keepalives carry nothing to read
            self.messages.put_nowait(parse_message(data))


class UdpApp(App):
    def __init__(
        self, transport: asyncio.DatagramTransport, protocol: _Datagrams, relay_port: int
    ) -> None:
        super().__init__("udp", transport.get_extra_info("sockname")[:2], relay_port)
        self._transport = transport
        self._protocol = protocol

    def send(self, data: bytes) -> None:
        self._transport.sendto(data)

    async def next_message(self) -> Message:
        return await self._protocol.messages.get()

    async def close(self) -> None:
        self._transport.close()


class StreamApp(App):
    def __init__(
        self, kind: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int
    ) -> None:
        super().__init__(kind, writer.get_extra_info("sockname")[:2], port)
        self._reader = reader
        self._writer = writer
        self._framer = StreamFramer()
        self._ready: list[Message] = []

    def send(self, data: bytes) -> None:
        self._writer.write(data)

    async def next_message(self) -> Message:
        while not self._ready:
            data = await self._reader.read(65536)
            if not data:
                raise ConnectionError("the relay closed the connection")
            for item in self._framer.feed(data):
                if isinstance(item, ParseError):
                    raise item
                if isinstance(item, Message):
                    self._ready.append(item)
        return self._ready.pop(0)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            async with asyncio.timeout(TIMEOUT):
                await self._writer.wait_closed()


async def open_app(relay: RunningRelay, kind: str, host: str = "127.0.0.1") -> App:
    port = relay.relay.device_transport.listening[kind]
    if kind == "udp":
        transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
            _Datagrams, local_addr=(host, 0), remote_addr=("127.0.0.1", port)
        )
        return UdpApp(transport, protocol, port)
    context = None
    if kind == "tls":
        certificate = relay.relay.config.data_dir / "tls" / "dev-certificate.pem"
        context = ssl.create_default_context(cafile=str(certificate))
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, local_addr=(host, 0)
        )
    return StreamApp(kind, reader, writer, port)


# -- digest, as an app answers it -----------------------------------------------------------


def challenges(response: Response) -> list[Challenge]:
    return [parse_challenge(value) for value in response.headers.get_all("WWW-Authenticate")]


async def challenge(app: App, user: str, algorithm: str = "MD5") -> Challenge:
    """The 401's challenge for ``algorithm`` to a REGISTER without credentials."""
    response = await app.register(user)
    assert response.status == 401, response
    [offered] = [c for c in challenges(response) if c.algorithm == algorithm]
    return offered


async def register_as(
    app: App,
    user: str,
    password: str,
    *,
    algorithm: str = "MD5",
    username: str | None = None,
    **options: Any,
) -> Response:
    """Challenge, answer with ``username`` (default: ``user``) and ``password``, REGISTER."""
    offered = await challenge(app, user, algorithm)
    client = DigestClient(username if username is not None else user, password)
    authorization = client.authorize(offered, "REGISTER", app.relay_uri)
    return await app.register(user, authorization=authorization, **options)


async def until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


# -- the relay and an instance ---------------------------------------------------------------


class Registrar(asyncio.DatagramProtocol):
    """The provider's registrar for the instance's account: answers every REGISTER with 200."""

    transport: asyncio.DatagramTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        message = parse_message(data) if data.strip() else None
        if isinstance(message, Request) and message.method == "REGISTER":
            contact = message.headers.get("Contact") or ""
            ok = make_response(message, 200, headers=[("Contact", f"{contact};expires=600")])
            self.transport.sendto(ok.serialize(), addr)


@dataclass
class Setup:
    running: RunningRelay
    registrar_port: int
    instance_id: str = ""
    secret: str = ""
    apps: list[App] = field(default_factory=list)

    @property
    def devices(self) -> Devices:
        return self.running.relay.devices

    def device(self) -> Device | None:
        return self.devices.get(self.instance_id)

    async def app(self, kind: str = "udp", host: str = "127.0.0.1") -> App:
        app = await open_app(self.running, kind, host)
        self.apps.append(app)
        return app

    async def new_instance(self) -> tuple[str, str]:
        body = instance_body(
            f"sip:127.0.0.1:{self.registrar_port};transport=udp",
            user="alice",
            password="pw-devices",
        )
        status, created = await self.running.client.call("POST", "/v1/instances", body=body)
        assert status == 201, created
        instance_id, secret = created["id"], created["secret"]
        remember(*(digest_ha1(name, instance_id, REALM, secret) for name in HA1_ALGORITHMS))
        return instance_id, secret


@asynccontextmanager
async def device_relay(tmp_path: Path, **sections: dict[str, Any]) -> AsyncIterator[Setup]:
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        Registrar, local_addr=("127.0.0.1", 0)
    )
    try:
        port = transport.get_extra_info("sockname")[1]
        async with relay_with_api(tmp_path, lifecycle={"unregister_wait": 0.5}, **sections) as run:
            setup = Setup(run, port)
            setup.instance_id, setup.secret = await setup.new_instance()
            try:
                yield setup
            finally:
                for app in setup.apps:
                    await app.close()
    finally:
        transport.close()


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    async with device_relay(tmp_path) as started:
        yield started


# -- challenges and credentials ---------------------------------------------------------------


@pytest.mark.parametrize(
    "algorithms", [None, ["MD5", "SHA-256"], ["SHA-256"]], ids=["default", "both", "sha256"]
)
async def test_no_credentials_get_a_challenge_per_offered_algorithm(
    tmp_path: Path, algorithms: list[str] | None
) -> None:
    device = {} if algorithms is None else {"digest_algorithms": algorithms}
    async with device_relay(tmp_path, device=device) as setup:
        app = await setup.app("udp")
        response = await app.register(setup.instance_id)
        assert (response.status, response.reason) == (401, "Unauthorized")
        offered = challenges(response)
        assert [c.algorithm for c in offered] == (algorithms or ["MD5"])
        assert {c.nonce for c in offered} == {offered[0].nonce} and offered[0].nonce
        assert all(c.is_digest and c.realm == REALM and c.qop == ("auth",) for c in offered)
        assert not any(c.stale for c in offered)
        assert setup.device() is None
        client = DigestClient(setup.instance_id, setup.secret)  # one nonce, counted across
        for challenge_ in offered:
            authorization = client.authorize(challenge_, "REGISTER", app.relay_uri)
            answer = await app.register(setup.instance_id, authorization=authorization)
            assert answer.status == 200, challenge_.algorithm
        assert setup.device() is not None


async def test_an_algorithm_not_offered_is_refused(setup: Setup) -> None:
    app = await setup.app("udp")
    offered = await challenge(app, setup.instance_id, "MD5")
    unoffered = dataclasses.replace(offered, algorithm="SHA-256")
    client = DigestClient(setup.instance_id, setup.secret)
    authorization = client.authorize(unoffered, "REGISTER", app.relay_uri)
    assert "algorithm=SHA-256" in authorization
    assert (await app.register(setup.instance_id, authorization=authorization)).status == 403
    assert setup.device() is None


@pytest.mark.parametrize(
    ("kind", "algorithm"), [("udp", "MD5"), ("tcp", "MD5"), ("tls", "MD5"), ("tls", "SHA-256")]
)
async def test_right_credentials_register_the_app(
    tmp_path: Path, kind: str, algorithm: str
) -> None:
    async with device_relay(tmp_path, device={"digest_algorithms": [algorithm]}) as setup:
        app = await setup.app(kind)
        response = await register_as(app, setup.instance_id, setup.secret, algorithm=algorithm)
        assert response.status == 200, response
        [contact] = response.contacts
        assert contact.uri == parse_sip_uri(app.contact) and contact.params == {"expires": "600"}
        assert (response.headers.get("Date") or "").endswith(" GMT")
        device = setup.device()
        assert device is not None and device.instance_id == setup.instance_id
        assert device.contact == parse_sip_uri(app.contact)
        assert (device.flow.transport, device.flow.remote) == (kind, app.local)
        assert device.expires_at == pytest.approx(time.time() + 600, abs=5)
        assert setup.devices.on_flow(setup.instance_id, device.flow)


async def test_a_wrong_secret_and_an_unknown_instance_look_the_same(setup: Setup) -> None:
    app = await setup.app("tcp")
    unknown_id = "a" * len(setup.instance_id)
    known_401, unknown_401 = [await app.register(user) for user in (setup.instance_id, unknown_id)]

    def shape(response: Response) -> list[tuple[str, str, tuple[str, ...], bool]]:
        return [(c.algorithm, c.realm, c.qop, c.stale) for c in challenges(response)]

    assert (known_401.status, unknown_401.status) == (401, 401)
    assert shape(known_401) == shape(unknown_401) == [("MD5", REALM, ("auth",), False)]
    wrong = await register_as(app, setup.instance_id, setup.secret[::-1])
    unknown = await register_as(app, unknown_id, setup.secret)
    assert (wrong.status, wrong.reason) == (unknown.status, unknown.reason) == (403, "Forbidden")
    assert wrong.headers.get_all("WWW-Authenticate") == unknown.headers.get_all("WWW-Authenticate")
    assert setup.device() is None and setup.devices.get(unknown_id) is None


async def test_credentials_must_name_the_registered_instance(setup: Setup) -> None:
    other_id, other_secret = await setup.new_instance()
    app = await setup.app("udp")
    # Another instance's own, valid credentials do not register this one.
    borrowed = await register_as(app, setup.instance_id, other_secret, username=other_id)
    assert borrowed.status == 403
    # A right answer whose username is not the To user is refused as well.
    offered = await challenge(app, setup.instance_id)
    right = DigestClient(setup.instance_id, setup.secret).authorize(
        offered, "REGISTER", app.relay_uri
    )
    renamed = right.replace(f'username="{setup.instance_id}"', f'username="{other_id}"')
    assert renamed != right
    assert (await app.register(setup.instance_id, authorization=renamed)).status == 403
    assert setup.device() is None and setup.devices.get(other_id) is None


async def test_a_source_over_its_failure_budget_is_refused_until_the_window_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The budget's window is a default argument, bound to FAILURE_WINDOW when the
    # class was made: a shorter one goes in through the constructor.
    window = 1.0
    monkeypatch.setattr(
        "sipis.devices.FailureBudget", functools.partial(FailureBudget, window=window)
    )
    async with device_relay(tmp_path, device={"max_failures": 3}) as setup:
        app = await setup.app("udp")
        offered = await challenge(app, setup.instance_id)
        wrong = DigestClient(setup.instance_id, "not-the-secret")
        right = DigestClient(setup.instance_id, setup.secret)
        answers = []
        for _ in range(3):
            authorization = wrong.authorize(offered, "REGISTER", app.relay_uri)
            answers.append(await app.register(setup.instance_id, authorization=authorization))
        last_failure = time.monotonic()
        assert [(r.status, r.reason) for r in answers] == [(403, "Forbidden")] * 3
        authorization = right.authorize(offered, "REGISTER", app.relay_uri)
        refused = await app.register(setup.instance_id, authorization=authorization)
        assert (refused.status, refused.reason) == (403, "Too Many Failures")
        unchallenged = await app.register(setup.instance_id)
        assert (unchallenged.status, unchallenged.reason) == (403, "Too Many Failures")
        assert not unchallenged.headers.get_all("WWW-Authenticate")
        assert setup.device() is None
        # Another source address has its own budget.
        elsewhere = await setup.app("udp", host="127.0.0.2")
        assert (await register_as(elsewhere, setup.instance_id, setup.secret)).status == 200
        await asyncio.sleep(max(0.0, last_failure + window + 0.1 - time.monotonic()))
        assert (await register_as(app, setup.instance_id, setup.secret)).status == 200
        device = setup.device()
        assert device is not None and device.flow.remote == app.local


async def test_a_replayed_authorization_is_refused(setup: Setup) -> None:
    app = await setup.app("tcp")
    offered = await challenge(app, setup.instance_id)
    client = DigestClient(setup.instance_id, setup.secret)
    authorization = client.authorize(offered, "REGISTER", app.relay_uri)
    assert (await app.register(setup.instance_id, authorization=authorization)).status == 200
    replayed = await app.register(setup.instance_id, authorization=authorization)
    assert (replayed.status, replayed.reason) == (403, "Forbidden")
    assert not replayed.headers.get_all("WWW-Authenticate")
    assert setup.device() is not None, "a refused replay leaves the registration alone"
    # The same nonce with the next count pre-authorizes a refresh.
    refresh = client.authorize(offered, "REGISTER", app.relay_uri)
    assert (await app.register(setup.instance_id, authorization=refresh)).status == 200


# -- how long a registration lasts --------------------------------------------------------------


async def test_expires_below_the_minimum_is_too_brief(setup: Setup) -> None:
    app = await setup.app("udp")
    brief = await register_as(app, setup.instance_id, setup.secret, expires=29)
    assert (brief.status, brief.headers.get("Min-Expires")) == (423, "30")
    assert setup.device() is None
    shortest = await register_as(app, setup.instance_id, setup.secret, expires=30)
    assert shortest.status == 200 and shortest.contacts[0].params == {"expires": "30"}


@pytest.mark.parametrize(
    ("expires", "contact_param"),
    [(86400, None), (600, "4000"), (None, "99999999999"), (600, "9" * 4301)],
)
async def test_expires_above_the_maximum_is_clamped(
    setup: Setup, expires: int | None, contact_param: str | None
) -> None:
    app = await setup.app("udp")
    contact = f"<{app.contact}>" + (f";expires={contact_param}" if contact_param else "")
    response = await register_as(
        app, setup.instance_id, setup.secret, expires=expires, contact=contact
    )
    assert response.status == 200 and response.contacts[0].params == {"expires": str(MAX_EXPIRES)}
    device = setup.device()
    assert device is not None
    assert device.expires_at == pytest.approx(time.time() + MAX_EXPIRES, abs=5)


async def test_expires_zero_and_the_wildcard_unregister(setup: Setup) -> None:
    app = await setup.app("tcp")
    instance_id, secret = setup.instance_id, setup.secret
    assert (await register_as(app, instance_id, secret)).status == 200
    assert (await register_as(app, instance_id, secret, expires=0)).status == 200
    assert setup.device() is None
    assert (await register_as(app, instance_id, secret)).status == 200
    gone = await register_as(app, instance_id, secret, expires=0, contact="*")
    assert gone.status == 200 and gone.contacts == []
    assert setup.device() is None


@pytest.mark.parametrize("expires", [600, None])
async def test_a_wildcard_with_a_lifetime_is_refused(setup: Setup, expires: int | None) -> None:
    app = await setup.app("udp")
    assert (await register_as(app, setup.instance_id, setup.secret)).status == 200
    refused = await register_as(app, setup.instance_id, setup.secret, expires=expires, contact="*")
    assert refused.status == 400
    assert setup.device() is not None, "the registration stays"


async def test_a_registration_expires(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sipis.devices.MIN_EXPIRES", 1)
    app = await setup.app("udp")
    response = await register_as(app, setup.instance_id, setup.secret, expires=1)
    assert response.status == 200 and response.contacts[0].params == {"expires": "1"}
    assert setup.device() is not None
    await until(lambda: setup.device() is None)


# -- flows --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tcp", "tls"])
async def test_a_closed_connection_takes_the_device_away(setup: Setup, kind: str) -> None:
    app = await setup.app(kind)
    assert (await register_as(app, setup.instance_id, setup.secret)).status == 200
    assert setup.device() is not None
    await app.close()
    await until(lambda: setup.device() is None)


async def test_a_new_registration_from_another_flow_replaces_the_old(setup: Setup) -> None:
    first = await setup.app("tcp")
    assert (await register_as(first, setup.instance_id, setup.secret)).status == 200
    old = setup.device()
    assert old is not None
    second = await setup.app("udp")
    assert (await register_as(second, setup.instance_id, setup.secret)).status == 200
    new = setup.device()
    assert new is not None and new is not old
    assert (new.flow.transport, new.flow.remote) == ("udp", second.local)
    assert not setup.devices.on_flow(setup.instance_id, old.flow)
    # The old flow closing no longer concerns the instance.
    await first.close()
    await until(lambda: not old.flow.alive)
    assert setup.device() is new


async def test_one_flow_can_carry_several_instances(setup: Setup) -> None:
    other_id, other_secret = await setup.new_instance()
    app = await setup.app("tcp")
    assert (await register_as(app, setup.instance_id, setup.secret)).status == 200
    assert (await register_as(app, other_id, other_secret)).status == 200
    assert (await register_as(app, setup.instance_id, setup.secret, expires=0)).status == 200
    assert setup.device() is None and setup.devices.get(other_id) is not None
    await app.close()
    await until(lambda: setup.devices.get(other_id) is None)


# -- instances made before the device port kept H(A1) ---------------------------------------------


async def test_an_instance_without_digest_values_gets_them_on_its_next_api_call(
    setup: Setup,
) -> None:
    store = setup.running.relay.store
    row = await store.get(setup.instance_id)
    assert row is not None and row.digest is not None
    assert await store.replace(dataclasses.replace(row, digest=None))
    app = await setup.app("udp")
    refused = await register_as(app, setup.instance_id, setup.secret)
    assert refused.status == 403
    status, _ = await setup.running.client.call(
        "GET", f"/v1/instances/{setup.instance_id}", secret=setup.secret
    )
    assert status == 200
    backfilled = await store.get(setup.instance_id)
    assert backfilled is not None and backfilled.digest is not None
    assert (await register_as(app, setup.instance_id, setup.secret)).status == 200


# -- everything else on the device port ----------------------------------------------------------


async def test_other_requests_are_answered_without_state(setup: Setup) -> None:
    app = await setup.app("udp")
    user = setup.instance_id
    options = await app.ask("OPTIONS", user)
    assert (options.status, options.headers.get("Allow")) == (200, "REGISTER, OPTIONS")
    assert (await app.ask("INVITE", user, headers=[("Contact", f"<{app.contact}>")])).status == 403
    assert (await app.ask("MESSAGE", user)).status == 403
    assert (await app.ask("BYE", user, to_tag="no-such-dialog")).status == 481
    assert (await app.ask("BYE", user)).status == 403
    assert (await app.ask("CANCEL", user)).status == 481
    assert len(setup.running.relay.device_inbound.transactions) == 0
    assert setup.device() is None


async def test_challenges_and_refusals_leave_no_transaction(setup: Setup) -> None:
    app = await setup.app("udp")
    user = setup.instance_id
    transactions = setup.running.relay.device_inbound.transactions
    for _ in range(50):
        assert (await app.register(user)).status == 401
    assert (await register_as(app, user, setup.secret[::-1])).status == 403
    assert len(transactions) == 0
    # a retransmission is challenged anew, with a fresh nonce
    register = app.request("REGISTER", user, headers=[("Contact", f"<{app.contact}>")])
    app.send(register)
    first = await app.response()
    app.send(register)
    again = await app.response()
    assert (first.status, again.status) == (401, 401)
    assert challenges(first)[0].nonce != challenges(again)[0].nonce
    assert len(transactions) == 0
    # an app that answers the challenge still registers
    assert (await register_as(app, user, setup.secret)).status == 200


async def test_malformed_registers_get_a_4xx(setup: Setup) -> None:
    app = await setup.app("udp")
    user, secret = setup.instance_id, setup.secret
    for garbage in ("Digest ???", "Digest", 'Digest username="unterminated', "Basic dXNlcjpwdw=="):
        response = await app.register(user, authorization=garbage)
        assert response.status == 401, garbage
    offered = await challenge(app, user)
    right = DigestClient(user, secret).authorize(offered, "REGISTER", app.relay_uri)
    for broken in (
        right.replace("algorithm=MD5", "algorithm=SHA-1"),
        right.replace("nc=00000001", "nc=zz"),
        right.replace("qop=auth", "qop=auth-int"),
        ", ".join(part for part in right.split(", ") if not part.startswith("response=")),
        right.replace(f'nonce="{offered.nonce}"', f'nonce="{offered.nonce[::-1]}"'),
    ):
        assert broken != right
        assert (await app.register(user, authorization=broken)).status == 403, broken
    # No user in To: nobody to authenticate as.
    no_user = "<sip:127.0.0.1>"
    assert (await app.register(user, to=no_user)).status == 401
    assert (await register_as(app, user, secret, to=no_user)).status == 403
    # Not a SIP URI in To.
    assert (await app.register(user, to="<tel:+15551234>")).status == 416
    # After authenticating: a Contact that does not parse, is no SIP URI, or is not one.
    for contact, reason in (
        ("<sip:app@127.0.0.1", "Bad Request"),
        ("<tel:+15551234>", "One SIP Contact Expected"),
        (f"<{app.contact}>, <{app.contact}>", "One SIP Contact Expected"),
        (f"*, <{app.contact}>", "Bad Request"),
    ):
        response = await register_as(app, user, secret, contact=contact)
        assert (response.status, response.reason) == (400, reason), contact
    assert setup.device() is None
    # And the port still serves.
    assert (await register_as(app, user, secret)).status == 200


async def test_the_secret_and_its_digest_values_are_never_logged(tmp_path: Path) -> None:
    start = len(RECORDER.lines)
    async with device_relay(tmp_path, device={"digest_algorithms": list(HA1_ALGORITHMS)}) as setup:
        app = await setup.app("tls")
        assert (await register_as(app, setup.instance_id, setup.secret[:-1])).status == 403
        for algorithm in HA1_ALGORITHMS:
            response = await register_as(app, setup.instance_id, setup.secret, algorithm=algorithm)
            assert response.status == 200
        assert (await register_as(app, setup.instance_id, setup.secret, expires=0)).status == 200
    lines = RECORDER.lines[start:]
    assert any("refused: wrong credentials" in line for line in lines)
    assert any("app registered" in line for line in lines)
    assert any("app unregistered" in line for line in lines)
    forbidden = [setup.secret]
    forbidden += [digest_ha1(a, setup.instance_id, REALM, setup.secret) for a in HA1_ALGORITHMS]
    assert not [line for line in lines if any(value in line for value in forbidden)]
