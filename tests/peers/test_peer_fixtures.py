"""The real-peer fixtures: Kamailio registers, routes and restarts; sipp misbehaves on cue.

REGISTERs come from sipp (its built-in digest answers Kamailio's challenge)
or from a hand-driven socket, so every assertion rests on what a real peer
said on the wire or stored in its location table.
"""

import asyncio
import hashlib
import re
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from tests.peers import kamailio as kamailio_module
from tests.peers.kamailio import Kamailio, KamailioError
from tests.peers.loopback import HOST
from tests.peers.sipp import SipMessage, SippServer, SippTransport, run_sipp_client
from tests.peers.tls import TlsRelay, client_context

pytestmark = pytest.mark.peer

USERS = {"alice": "wonderland", "bob": "builder"}
REPLY_TIMEOUT = 2.0


def register_arguments(user: str, password: str | None = None) -> list[str]:
    """sipp arguments for the uac_register_* scenarios: answer the challenge as `user`.

    An unexpected response (a second 401, a 423) fails the run at once, and
    "-bye" keeps sipp from "aborting the call" with a BYE: a registration
    has no dialog to end.
    """
    secret = USERS[user] if password is None else password
    return [
        "-au",
        user,
        "-ap",
        secret,
        "-auth_uri",
        "sip:example.test",
        "-default_behaviors",
        "all,-bye",
    ]


@pytest.fixture
async def kamailio(tmp_path: Path) -> AsyncIterator[Kamailio]:
    async with Kamailio(USERS, workdir=tmp_path / "kamailio") as server:
        yield server


# A hand-driven SIP endpoint ----------------------------------------------------


class UdpEndpoint:
    """A UDP socket on 127.0.0.1 that sends hand-written SIP and reads what comes back."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind((HOST, 0))
        self._socket.setblocking(False)
        self.port: int = self._socket.getsockname()[1]

    async def send(self, text: str, destination: tuple[str, int]) -> None:
        await asyncio.get_running_loop().sock_sendto(self._socket, text.encode(), destination)

    async def receive(self) -> SipMessage:
        return await self._receive_within(REPLY_TIMEOUT)

    async def final_response(self) -> SipMessage:
        """Skip provisional responses and return the first final one."""
        while True:
            message = await self.receive()
            if message.status is not None and message.status >= 200:
                return message

    async def assert_silence(self, seconds: float) -> None:
        with pytest.raises(TimeoutError):
            await self._receive_within(seconds)

    async def _receive_within(self, seconds: float) -> SipMessage:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self._socket, 65535), seconds)
        return SipMessage(direction="received", transport="UDP", text=data.decode())

    async def close(self) -> None:
        self._socket.close()


class TcpEndpoint:
    """A TCP connection that sends hand-written SIP and reads bodiless responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.port: int = writer.get_extra_info("sockname")[1]

    async def send(self, text: str, destination: tuple[str, int]) -> None:
        """Send on the connection, which already leads to `destination`."""
        self._writer.write(text.encode())
        await self._writer.drain()

    async def receive(self) -> SipMessage:
        data = await asyncio.wait_for(self._reader.readuntil(b"\r\n\r\n"), REPLY_TIMEOUT)
        return SipMessage(direction="received", transport="TCP", text=data.decode())

    async def close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()


class Endpoints:
    """Opens hand-driven endpoints for a test and closes them all at its end."""

    def __init__(self) -> None:
        self._opened: list[UdpEndpoint | TcpEndpoint] = []

    def udp(self) -> UdpEndpoint:
        endpoint = UdpEndpoint()
        self._opened.append(endpoint)
        return endpoint

    async def tcp(self, destination: tuple[str, int]) -> TcpEndpoint:
        endpoint = TcpEndpoint(*await asyncio.open_connection(*destination))
        self._opened.append(endpoint)
        return endpoint

    async def close(self) -> None:
        for endpoint in self._opened:
            await endpoint.close()


@pytest.fixture
async def endpoints() -> AsyncIterator[Endpoints]:
    opened = Endpoints()
    yield opened
    await opened.close()


def register_request(
    endpoint_port: int,
    *,
    transport: str = "UDP",
    user: str = "alice",
    call_id: str = "reg-1@test",
    cseq: int = 1,
    contact_params: str = "",
    extra_headers: str = "",
) -> str:
    branch = f"z9hG4bK-reg-{call_id}-{cseq}"
    contact_uri = f"sip:{user}@{HOST}:{endpoint_port};transport={transport.lower()}"
    return (
        "REGISTER sip:example.test SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {HOST}:{endpoint_port};branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:{user}@example.test>;tag=from-{call_id}\r\n"
        f"To: <sip:{user}@example.test>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} REGISTER\r\n"
        f"Contact: <{contact_uri}>{contact_params}\r\n"
        f"{extra_headers}"
        "Content-Length: 0\r\n\r\n"
    )


def out_of_dialog_request(
    method: str, endpoint_port: int, *, call_id: str, body: str = "", content_type: str = ""
) -> str:
    content = f"Content-Type: {content_type}\r\n" if content_type else ""
    return (
        f"{method} sip:alice@example.test SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {HOST}:{endpoint_port};branch=z9hG4bK-{call_id};rport\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:bob@example.test>;tag=caller\r\n"
        "To: <sip:alice@example.test>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: 1 {method}\r\n"
        f"Contact: <sip:bob@{HOST}:{endpoint_port}>\r\n"
        f"{content}Content-Length: {len(body.encode())}\r\n\r\n{body}"
    )


def reply_to(request: SipMessage, status: int, reason: str, to_tag: str = "callee") -> str:
    """Build a bodiless response that copies Via, From, To, Call-ID and CSeq (RFC 3261 8.2.6.2)."""
    vias = "".join(f"Via: {via}\r\n" for via in request.headers("Via"))
    return (
        f"SIP/2.0 {status} {reason}\r\n"
        f"{vias}"
        f"From: {request.header('From')}\r\n"
        f"To: {request.header('To')};tag={to_tag}\r\n"
        f"Call-ID: {request.header('Call-ID')}\r\n"
        f"CSeq: {request.header('CSeq')}\r\n"
        "Content-Length: 0\r\n\r\n"
    )


def digest_authorization(challenge: str, *, method: str, uri: str, user: str, password: str) -> str:
    """Answer a Digest challenge with qop=auth (RFC 7616 3.4.1), for MD5 and SHA-256."""
    params = dict(re.findall(r'(\w+)="?([^",]*)"?', challenge.removeprefix("Digest ")))
    algorithm = params.get("algorithm", "MD5")
    hash_name = {"MD5": "md5", "SHA-256": "sha256"}[algorithm]

    def digest(text: str) -> str:
        return hashlib.new(hash_name, text.encode()).hexdigest()

    nc, cnonce = "00000001", "0a4f113b"
    ha1 = digest(f"{user}:{params['realm']}:{password}")
    ha2 = digest(f"{method}:{uri}")
    response = digest(f"{ha1}:{params['nonce']}:{nc}:{cnonce}:auth:{ha2}")
    opaque = f', opaque="{params["opaque"]}"' if "opaque" in params else ""
    return (
        f'Digest username="{user}", realm="{params["realm"]}", nonce="{params["nonce"]}", '
        f'uri="{uri}", response="{response}", algorithm={algorithm}, qop=auth, nc={nc}, '
        f'cnonce="{cnonce}"{opaque}'
    )


async def register_by_hand(
    endpoint: UdpEndpoint, kamailio: Kamailio, user: str = "alice"
) -> SipMessage:
    """REGISTER, answer the 401, and return the final response."""
    await endpoint.send(register_request(endpoint.port, user=user), kamailio.address("udp"))
    challenge = await endpoint.receive()
    assert challenge.status == 401
    www_authenticate = challenge.header("WWW-Authenticate")
    assert www_authenticate is not None
    authorization = digest_authorization(
        www_authenticate, method="REGISTER", uri="sip:example.test", user=user, password=USERS[user]
    )
    await endpoint.send(
        register_request(
            endpoint.port, user=user, cseq=2, extra_headers=f"Authorization: {authorization}\r\n"
        ),
        kamailio.address("udp"),
    )
    return await endpoint.receive()


# Kamailio --------------------------------------------------------------------


async def test_udp_register_with_digest_is_stored_in_location(kamailio: Kamailio) -> None:
    result = await run_sipp_client(
        "uac_register_digest.xml",
        kamailio.address("udp"),
        service="alice",
        arguments=register_arguments("alice"),
    )

    assert result.returncode == 0
    assert (result.stats.successful_calls, result.stats.failed_calls) == (1, 0)
    responses = [message for message in result.messages if message.status is not None]
    assert [response.status for response in responses] == [401, 200]
    challenge = responses[0].header("WWW-Authenticate")
    assert challenge is not None
    assert 'realm="example.test"' in challenge
    assert 'qop="auth"' in challenge
    sent_contact = [m for m in result.messages if m.direction == "sent"][-1].header("Contact")
    sipp_port = re.fullmatch(rf"<sip:alice@{HOST}:(\d+);transport=UDP>", sent_contact or "")
    assert sipp_port is not None
    contacts = await kamailio.contacts("alice@example.test")
    assert len(contacts) == 1
    [contact] = contacts
    assert f"<{contact['uri']}>" == sent_contact
    assert contact["socket"] == f"udp:{HOST}:{kamailio.udp_port}"
    assert contact["received"] == f"sip:{HOST}:{sipp_port[1]}"
    assert contact["expires"] is not None
    assert 590 <= contact["expires"] <= 600
    assert contact["user_agent"] == "sipp-register-digest"
    assert (contact["path"], contact["instance"], contact["reg_id"]) == (None, None, None)
    assert await kamailio.contacts("bob") == []


async def test_tls_register_through_relay_is_stored_with_tls_socket(kamailio: Kamailio) -> None:
    context = client_context(kamailio.ca_certificate)
    async with TlsRelay(kamailio.address("tls"), context, kamailio.tls_server_name) as relay:
        result = await run_sipp_client(
            "uac_register_digest.xml",
            relay.address,
            transport="tcp",
            service="bob",
            arguments=register_arguments("bob"),
        )

    assert relay.failures == []
    assert (result.returncode, result.stats.successful_calls) == (0, 1)
    [contact] = await kamailio.contacts("bob@example.test")
    assert contact["socket"] == f"tls:{HOST}:{kamailio.tls_port}"
    assert contact["received"] is not None
    assert contact["received"].endswith(";transport=tls")


@pytest.mark.parametrize("server_hostname", ["registrar.test", "127.0.0.1"])
async def test_tls_certificate_verifies_against_ca_for_name_and_address(
    kamailio: Kamailio, server_hostname: str
) -> None:
    context = client_context(kamailio.ca_certificate)
    _reader, writer = await asyncio.open_connection(
        *kamailio.address("tls"), ssl=context, server_hostname=server_hostname
    )
    try:
        assert writer.get_extra_info("ssl_object").version() in {"TLSv1.2", "TLSv1.3"}
    finally:
        writer.close()
        await writer.wait_closed()


async def test_tls_certificate_is_refused_by_a_client_trusting_another_ca(
    kamailio: Kamailio, tmp_path: Path
) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection(
            *kamailio.address("tls"),
            ssl=client_context(other_ca),
            server_hostname=kamailio.tls_server_name,
        )


async def test_outbound_register_with_path_keeps_instance_reg_id_and_path(
    kamailio: Kamailio,
) -> None:
    result = await run_sipp_client(
        "uac_register_outbound.xml",
        kamailio.address("tcp"),
        transport="tcp",
        service="alice",
        arguments=register_arguments("alice"),
    )

    assert (result.returncode, result.stats.successful_calls) == (0, 1)
    ok = result.messages[-1]
    assert ok.status == 200
    assert ok.header("Path") == "<sip:edge.example.test;lr;ob>"
    assert ok.header("Require") == "outbound"
    [contact] = await kamailio.contacts("alice")
    assert contact["path"] == "<sip:edge.example.test;lr;ob>"
    assert contact["instance"] == "<urn:uuid:6c5a2a7e-0f5c-4d8e-9a51-000000000001>"
    assert contact["reg_id"] == 1
    assert contact["socket"] == f"tcp:{HOST}:{kamailio.tcp_port}"


async def test_wrong_password_is_challenged_again_and_nothing_is_stored(kamailio: Kamailio) -> None:
    result = await run_sipp_client(
        "uac_register_digest.xml",
        kamailio.address("udp"),
        service="alice",
        arguments=register_arguments("alice", password="not-the-password"),
        timeout=5.0,
    )

    assert result.returncode == 1
    assert result.stats.failed_calls == 1
    assert [m.status for m in result.messages if m.status is not None] == [401, 401]
    assert await kamailio.contacts("alice") == []


async def test_register_below_min_expires_gets_423(tmp_path: Path) -> None:
    async with Kamailio(USERS, min_expires=900, workdir=tmp_path / "kamailio") as kamailio:
        result = await run_sipp_client(
            "uac_register_digest.xml",
            kamailio.address("udp"),
            service="alice",
            arguments=register_arguments("alice"),
            timeout=5.0,
        )
        contacts = await kamailio.contacts("alice")

    assert [m.status for m in result.messages if m.direction == "received"] == [401, 423]
    refused = result.messages[-1]
    assert (refused.status, refused.header("Min-Expires")) == (423, "900")
    assert result.returncode == 1
    assert contacts == []


async def test_failed_start_raises_with_the_log_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind((HOST, 0))
        taken = squatter.getsockname()[1]
        monkeypatch.setattr(kamailio_module, "free_port", lambda kind: taken)
        with pytest.raises(KamailioError, match="exited with status") as failure:
            async with Kamailio(USERS, workdir=tmp_path / "kamailio"):
                pass

    assert re.search(
        r"udp_init\(\): bind\(.*\) on 127\.0\.0\.1: Address already in use", str(failure.value)
    )


async def test_restart_loses_bindings_and_keeps_ports(kamailio: Kamailio) -> None:
    arguments = register_arguments("alice")
    udp_address = kamailio.address("udp")
    first = await run_sipp_client(
        "uac_register_digest.xml", udp_address, service="alice", arguments=arguments
    )
    assert first.returncode == 0
    assert len(await kamailio.contacts("alice")) == 1

    await kamailio.restart()

    assert await kamailio.contacts("alice") == []
    again = await run_sipp_client(
        "uac_register_digest.xml", udp_address, service="alice", arguments=arguments
    )
    assert again.returncode == 0
    [contact] = await kamailio.wait_for_contacts("alice", lambda found: len(found) == 1)
    assert contact["call_id"] == again.messages[0].header("Call-ID")
    assert contact["socket"] == f"udp:{HOST}:{udp_address[1]}"


async def test_message_and_invite_are_routed_to_the_registered_contact(
    kamailio: Kamailio, endpoints: Endpoints
) -> None:
    phone, caller = endpoints.udp(), endpoints.udp()
    registered = await register_by_hand(phone, kamailio)
    assert registered.status == 200
    [contact] = await kamailio.contacts("alice")
    assert contact["received"] == f"sip:{HOST}:{phone.port}"

    await caller.send(
        out_of_dialog_request(
            "MESSAGE", caller.port, call_id="msg-1@test", body="hello", content_type="text/plain"
        ),
        kamailio.address("udp"),
    )
    message = await phone.receive()
    assert message.start_line == f"MESSAGE {contact['uri']} SIP/2.0"
    assert message.text.endswith("\r\n\r\nhello")
    assert message.headers("Record-Route") == []
    await phone.send(reply_to(message, 200, "OK"), kamailio.address("udp"))
    delivered = await caller.final_response()
    assert (delivered.status, delivered.header("CSeq")) == (200, "1 MESSAGE")

    await caller.send(
        out_of_dialog_request("INVITE", caller.port, call_id="inv-1@test"), kamailio.address("udp")
    )
    invite = await phone.receive()
    assert invite.start_line == f"INVITE {contact['uri']} SIP/2.0"
    [record_route] = invite.headers("Record-Route")
    assert record_route.startswith(f"<sip:{HOST}:{kamailio.udp_port};lr")
    await phone.send(reply_to(invite, 486, "Busy Here"), kamailio.address("udp"))
    refused = await caller.final_response()
    assert (refused.status, refused.header("CSeq")) == (486, "1 INVITE")


async def test_request_for_user_without_binding_gets_480(
    kamailio: Kamailio, endpoints: Endpoints
) -> None:
    caller = endpoints.udp()
    await caller.send(
        out_of_dialog_request(
            "MESSAGE", caller.port, call_id="msg-2@test", body="hi", content_type="text/plain"
        ),
        kamailio.address("udp"),
    )
    assert (await caller.final_response()).status == 480


async def test_sha256_digest_challenge_is_issued_and_accepted(
    tmp_path: Path, endpoints: Endpoints
) -> None:
    phone = endpoints.udp()
    async with Kamailio(
        USERS, digest_algorithm="SHA-256", workdir=tmp_path / "kamailio"
    ) as kamailio:
        await phone.send(register_request(phone.port, call_id="sha@test"), kamailio.address("udp"))
        challenge = await phone.receive()
        assert "algorithm=SHA-256" in (challenge.header("WWW-Authenticate") or "")
        registered = await register_by_hand(phone, kamailio)
        contacts = await kamailio.contacts("alice")

    assert registered.status == 200
    assert len(contacts) == 1


# sipp as a misbehaving registrar -------------------------------------------------


@pytest.fixture(params=["udp", "tcp"])
def sipp_transport(request: pytest.FixtureRequest) -> SippTransport:
    transport: SippTransport = request.param
    return transport


async def test_reg_423_refuses_once_with_min_expires_then_accepts(
    sipp_transport: SippTransport, endpoints: Endpoints
) -> None:
    transport = sipp_transport.upper()
    async with SippServer("reg_423.xml", transport=sipp_transport, max_calls=1) as server:
        client = endpoints.udp() if sipp_transport == "udp" else await endpoints.tcp(server.address)
        await client.send(
            register_request(client.port, transport=transport, extra_headers="Expires: 600\r\n"),
            server.address,
        )
        refused = await client.receive()
        await client.send(
            register_request(
                client.port, transport=transport, cseq=2, extra_headers="Expires: 1800\r\n"
            ),
            server.address,
        )
        accepted = await client.receive()
        result = await server.finished()

    assert refused.start_line == "SIP/2.0 423 Interval Too Brief"
    assert refused.header("Min-Expires") == "1800"
    assert refused.header("Via") == (
        f"SIP/2.0/{transport} {HOST}:{client.port};branch=z9hG4bK-reg-reg-1@test-1;rport"
    )
    assert (refused.header("Call-ID"), refused.header("CSeq")) == ("reg-1@test", "1 REGISTER")
    assert re.fullmatch(r"<sip:alice@example\.test>;tag=\S+", refused.header("To") or "")
    assert (accepted.status, accepted.header("CSeq")) == (200, "2 REGISTER")
    assert accepted.header("To") == refused.header("To")
    assert accepted.header("Contact") == (
        f"<sip:alice@{HOST}:{client.port};transport={sipp_transport}>;expires=1800"
    )
    assert result.returncode == 0
    assert (result.stats.successful_calls, result.stats.failed_calls) == (1, 0)
    assert len(result.received("REGISTER")) == 2


async def test_reg_503_sends_retry_after_from_key_then_accepts(endpoints: Endpoints) -> None:
    client = endpoints.udp()
    async with SippServer(
        "reg_503_retry_after.xml", keys={"retry_after": "7"}, max_calls=1
    ) as server:
        await client.send(register_request(client.port), server.address)
        unavailable = await client.receive()
        await client.send(
            register_request(client.port, cseq=2, contact_params=";expires=300"), server.address
        )
        accepted = await client.receive()
        result = await server.finished()

    assert unavailable.start_line == "SIP/2.0 503 Service Unavailable"
    assert unavailable.header("Retry-After") == "7"
    assert accepted.status == 200
    assert (
        accepted.header("Contact") == f"<sip:alice@{HOST}:{client.port};transport=udp>;expires=300"
    )
    assert (result.returncode, result.stats.successful_calls) == (0, 1)


async def test_reg_401_forever_challenges_each_request_with_a_new_nonce_up_to_the_bound(
    endpoints: Endpoints,
) -> None:
    client = endpoints.udp()
    async with SippServer("reg_401_forever.xml", variables={"max_requests": "3"}) as server:
        challenges = []
        for cseq in (1, 2, 3):
            await client.send(register_request(client.port, cseq=cseq), server.address)
            challenges.append(await client.receive())
        await client.send(register_request(client.port, cseq=4), server.address)
        await client.assert_silence(0.3)

    assert [challenge.status for challenge in challenges] == [401, 401, 401]
    headers = [challenge.header("WWW-Authenticate") or "" for challenge in challenges]
    assert all(
        h.startswith('Digest realm="example.test", nonce="') and 'qop="auth"' in h for h in headers
    )
    nonces = {re.findall(r'nonce="([^"]+)"', header)[0] for header in headers}
    assert len(nonces) == 3
    assert len(server.result.received("REGISTER")) == 4


async def test_reg_silent_receives_registers_and_never_answers(endpoints: Endpoints) -> None:
    client = endpoints.udp()
    async with SippServer("reg_silent.xml") as server:
        for cseq in (1, 2):
            await client.send(register_request(client.port, cseq=cseq), server.address)
        received = await server.wait_for_requests("REGISTER", 2)
        await client.assert_silence(0.3)

    assert [message.header("CSeq") for message in received] == ["1 REGISTER", "2 REGISTER"]
    assert [message for message in server.result.messages if message.direction == "sent"] == []
