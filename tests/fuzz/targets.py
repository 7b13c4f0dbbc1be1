"""Fuzz targets: the SIP message parser, the stream framer and the digest parsers.

Each target takes arbitrary bytes, hands them to the parser as the relay
does with what it receives, then uses whatever parsed the way the relay
uses it later: it reads every lazily parsed header and writes the message
back out.  A target returns a short description of what happened (tests
use it to show that a seed gets where it should) and raises only on a bug:

- any exception but ``SipError`` (``ParseError`` is one), the parsers' one
  way of refusing input;
- ``AssertionError`` for a broken invariant: what sipis parsed and writes
  back out (as is, as a response, forwarded, or as parts of a request it
  builds) parses again to the same values; framing does not depend on how
  the stream was cut; a digest answer parses back, and an accepted one is
  not accepted twice.

A written message may exceed the size limits the received one kept to (it
gains a Content-Length, a Via, Record-Route entries); a 513 on parsing it
again is that limit, not a bug.

No fuzzing engine is needed here: ``tests.fuzz.runner`` runs the targets
under atheris and the regression tests call them directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

from sipis.sip.digest import (
    Challenge,
    Credentials,
    DigestClient,
    parse_challenge,
    parse_credentials,
    select_challenge,
)
from sipis.sip.digest_server import HA1_ALGORITHMS, DigestServer, Verdict, digest_ha1
from sipis.sip.errors import SipError
from sipis.sip.grammar import unquote
from sipis.sip.headers import NameAddr, Via, parse_name_addr, parse_via
from sipis.sip.message import (
    Keepalive,
    Message,
    ParseError,
    Request,
    Response,
    StreamFramer,
    parse_message,
)
from sipis.sip.proxy import (
    forwarded,
    forwarded_response,
    in_dialog_request,
    next_hop,
    own_routes_removed,
    route_uri,
)
from sipis.sip.registration import LocalAddress, RegistrationConfig, RegistrationSession
from sipis.sip.uas import UasPolicy, make_response, preflight
from sipis.sip.uri import SipUri, Uri, parse_sip_uri, parse_uri

T = TypeVar("T")

# This node, as the proxy functions name it.
OWN_HOST = "sipis.example"
OWN_VIA = Via("UDP", "192.0.2.1", 5060, {"branch": "z9hG4bKfuzz", "rport": None})
OWN_ROUTE = route_uri("192.0.2.1", 5060, "UDP")
POLICY = UasPolicy(
    methods=("ACK", "BYE", "CANCEL", "INVITE", "MESSAGE", "OPTIONS", "REGISTER"),
    content_types=("application/sdp", "text/plain"),
    answer_types={"INVITE": ("application/sdp",)},
)
# Headers holding name-addrs that sipis reads (and a proxy writes back out).
ROUTE_HEADERS = ("Route", "Record-Route", "Path", "Service-Route")
CHALLENGE_HEADERS = ("WWW-Authenticate", "Proxy-Authenticate")
CREDENTIALS_HEADERS = ("Authorization", "Proxy-Authorization")

# The one user the digest server knows, and the placeholders a digest input may
# carry to reach past the nonce MAC and the response hash (no fuzzer guesses those).
KEY = bytes(range(32))
REALM = "sipis.example"
URI = "sip:sipis.example"
USERNAME = "alice"
PASSWORD = "wonderland"
NOW = 1_700_000_000.0
NONCE_PLACEHOLDER = "@nonce@"
EXPIRED_NONCE_PLACEHOLDER = "@expired-nonce@"
RESPONSE_PLACEHOLDER = "@response@"
HA1 = {name: digest_ha1(name, USERNAME, REALM, PASSWORD) for name in HA1_ALGORITHMS}
HASH_NAMES = {"md5": "md5", "sha-256": "sha256", "sha-512-256": "sha512_256"}

# The registration a response is fed to, as the answer to its first REGISTER.
REGISTRATION = RegistrationConfig(
    aor=parse_sip_uri("sip:alice@example.com"),
    registrar=parse_sip_uri("sip:example.com"),
    username=USERNAME,
    password=PASSWORD,
    contact_user="c0ffee",
    instance_id="urn:uuid:00000000-0000-1000-8000-000a95a0e128",
)
REGISTRATION_ADDRESS = LocalAddress("udp", "192.0.2.50", 5070)

# The framer's limit in the stream target: small enough that inputs reach it
# (the stream inputs are at most 4 kB, see ``tests.fuzz.campaign.MAX_LEN``).
STREAM_MAX_SIZE = 2048


# --- the targets ------------------------------------------------------------------


def message(data: bytes) -> str:
    """``data`` as a UDP datagram: parse it, use the message, write it back out.

    Returns "request", "response", or "rejected" (with what a malformed
    request would be answered).
    """
    try:
        msg = parse_message(data)
    except ParseError as exc:
        if exc.partial is not None:
            use_partial(exc, exc.partial)
        return f"rejected {exc.status}"
    except SipError as exc:
        return f"rejected {exc.status}"
    use(msg, datagram=True)
    relay(msg)
    return "request" if isinstance(msg, Request) else "response"


def stream(data: bytes) -> str:
    """``data`` as a TCP stream, fed to the framer in one piece and in cuts.

    The first octet's low three bits say how many octets after it give the
    cut sizes (each plus one, used in turn); the rest is the stream.  Both
    feeds must give the same messages, and fail alike.  Each message is then
    read and written out as in ``message``, each malformed one read (what the
    relay builds from them is left to that target).  Returns how many messages (and malformed ones)
    were framed and whether the stream broke.
    """
    cut_count = data[0] & 7 if data else 0
    sizes = [size + 1 for size in data[1 : 1 + cut_count]]
    payload = data[1 + cut_count :]
    whole = frame(payload, [len(payload)])
    cut = frame(payload, sizes or [len(payload)])
    assert (whole.error is None) == (cut.error is None), (
        f"one feed: {whole.error!r}, cut in {sizes}: {cut.error!r}"
    )
    if whole.error is None:
        assert whole.summary() == cut.summary(), f"framing depends on the cuts {sizes}"
    for item in cut.items:
        if isinstance(item, Message):
            use(item, datagram=False)
        elif item.partial is not None:
            read_headers(item.partial)
    broke = ", then unrecoverable" if cut.error is not None else ""
    return f"{len(cut.items)} framed{broke}"


def digest(data: bytes) -> str:
    """``data`` as a WWW-Authenticate and as an Authorization value.

    The text is decoded as header values are (UTF-8, surrogate escapes).
    Returns what became of it as a challenge and as credentials.
    """
    value = data.decode("utf-8", "surrogateescape")
    try:
        challenge = parse_challenge(value)
    except SipError:
        as_challenge = "challenge rejected"
    else:
        as_challenge = use_challenge(challenge)
    try:
        credentials = parse_credentials(value)
    except SipError:
        as_credentials = "credentials rejected"
    else:
        as_credentials = use_credentials(credentials)
    return f"{as_challenge}, {as_credentials}"


TARGETS: dict[str, Callable[[bytes], str]] = {
    "message": message,
    "stream": stream,
    "digest": digest,
}


# --- using a parsed message --------------------------------------------------------


def use(msg: Message, *, datagram: bool) -> None:
    """Read every header of a message that parsed, write it out and parse it again."""
    read_headers(msg)
    wire = msg.serialize()
    again = reparsed(wire, "the message", datagram=datagram)
    if again is not None:
        assert again.serialize() == wire, "serializing a parsed message is not a fixed point"


def relay(msg: Message) -> None:
    """What sipis makes of a message: for a request, responses to it, a BYE and
    forwarded copies; for a response, a registration's next step and a forwarded copy."""
    if isinstance(msg, Request):
        answer(msg)
        with contextlib.suppress(SipError):
            in_dialog(msg)
        with contextlib.suppress(SipError):
            forward(msg)
    elif isinstance(msg, Response):
        register(msg)
        if len(msg.vias) > 1:
            reparsed(forwarded_response(msg).serialize(), "a forwarded response")


def use_partial(error: ParseError, partial: Message) -> None:
    """What sipis does with a malformed message: answer it if it is a request."""
    read_headers(partial)
    partial.serialize()
    if isinstance(partial, Request):
        with contextlib.suppress(SipError):
            _ = partial.via
        make_response(partial, error.status, headers=[("Allow", "INVITE, ACK")]).serialize()


def read_headers(msg: Message) -> None:
    """Read each header the relay reads; each one may be malformed on its own."""
    readers: tuple[Callable[[Message], None], ...] = (
        read_vias,
        read_dialog_ids,
        read_contacts,
        read_routes,
        read_expiry,
        read_challenges,
        read_credentials,
    )
    for read in readers:
        with contextlib.suppress(SipError):
            read(msg)


def read_vias(msg: Message) -> None:
    for via in msg.vias:
        _ = (via.branch, via.received, via.rport, via.transport, via.host, via.port)
        again = parsed_again(parse_via, str(via))
        assert again == via, f"Via {via} reads back as {again}"


def read_dialog_ids(msg: Message) -> None:
    _ = (msg.call_id, msg.cseq, msg.max_forwards, msg.content_length)
    for address in (msg.from_, msg.to):
        _ = address.tag
        check_address(address)
    _ = msg.to.sip_uri.user


def read_contacts(msg: Message) -> None:
    for contact in msg.contacts:
        instance = contact.params.get("+sip.instance")
        if instance is not None:
            _ = unquote(instance)
        check_address(contact)


def read_routes(msg: Message) -> None:
    for name in ROUTE_HEADERS:
        with contextlib.suppress(SipError):
            for route in msg.header_name_addrs(name):
                check_address(route)
                if isinstance(route.uri, SipUri):
                    _ = "lr" in route.uri.params


def read_expiry(msg: Message) -> None:
    _ = msg.expires
    _ = msg.min_expires


def read_challenges(msg: Message) -> None:
    for name in CHALLENGE_HEADERS:
        challenges: list[Challenge] = []
        for value in msg.headers.get_all(name):
            with contextlib.suppress(SipError):
                challenges.append(parse_challenge(value))
        for challenge in challenges:
            use_challenge(challenge)
        select_challenge(challenges)


def read_credentials(msg: Message) -> None:
    for name in CREDENTIALS_HEADERS:
        for value in msg.headers.get_all(name):
            with contextlib.suppress(SipError):
                use_credentials(parse_credentials(value))


def check_address(address: NameAddr) -> None:
    """A name-addr and its URI read back as themselves once written out."""
    again = parsed_again(parse_name_addr, str(address))
    assert again == address, f"{address} reads back as {again}"
    check_uri(address.uri)


def check_uri(uri: Uri) -> None:
    again = parsed_again(parse_uri, str(uri))
    assert again == uri, f"URI {uri} reads back as {again}"
    assert again.equivalent(uri), f"URI {uri} is not equivalent to itself"
    if isinstance(uri, SipUri):
        _ = (uri.transport, uri.host_key, uri.secure)


def answer(request: Request) -> None:
    """Responses to a request that parsed parse too, and match it."""
    with contextlib.suppress(SipError):
        rejection = preflight(request, POLICY)
        if rejection is not None:
            reparsed(rejection.serialize(), "a preflight rejection")
    for status in (100, 200, 401):
        response = make_response(request, status, headers=[("Contact", f"<{OWN_ROUTE}>")])
        again = reparsed(response.serialize(), f"a {status} response")
        if again is not None:
            assert (again.call_id, again.cseq, again.vias) == (
                request.call_id,
                request.cseq,
                request.vias,
            ), f"the {status} response does not match its request"


def in_dialog(request: Request) -> None:
    """A BYE built from the request's dialog parts (as for a vanished app) parses."""
    contacts = request.contacts
    target = contacts[0].uri if contacts else request.from_.uri
    routes = request.header_name_addrs("Record-Route")
    bye = in_dialog_request(
        "BYE",
        call_id=request.call_id,
        local=request.to,
        remote=request.from_,
        remote_target=target,
        route_set=routes,
        cseq=request.cseq.number,
        via=OWN_VIA,
    )
    again = reparsed(bye.serialize(), "an in-dialog BYE")
    if again is not None:
        assert (again.from_, again.to) == (request.to, request.from_), "BYE From/To changed"
        assert len(again.header_name_addrs("Route")) == len(routes), "BYE route set changed"


def forward(request: Request) -> None:
    """The request forwarded to its next hop, then stripped of this node's routes."""
    contacts = [c.uri for c in request.contacts if isinstance(c.uri, SipUri)]
    copy = forwarded(
        request,
        via=OWN_VIA,
        target=contacts[0] if contacts else None,
        record_route=[OWN_ROUTE, OWN_ROUTE],
    )
    reparsed(copy.serialize(), "a forwarded request")
    next_hop(copy)
    own_routes_removed(copy, lambda uri: uri.host_key == OWN_HOST)
    reparsed(copy.serialize(), "a request stripped of its own routes")


def register(response: Response) -> None:
    """A registration takes the response as the answer to its REGISTER (with Via,
    Call-ID and CSeq set to match); what it sends next, at once or when its timer
    fires, parses."""
    session = RegistrationSession(REGISTRATION, rng=random.Random(7))
    session.bind(REGISTRATION_ADDRESS)
    session.start(0.0)
    session.on_timer(0.0)
    (sent,) = session.outgoing()
    request = parse_message(sent)
    answer = Response(response.status, response.reason, response.headers.copy(), response.body)
    for name in ("Via", "Call-ID", "CSeq"):
        answer.headers.set(name, request.headers.get(name) or "")
    session.receive(answer, 1.0)
    for data in session.outgoing():
        reparsed(data, f"a REGISTER after a {response.status}")
    session.status(1.0)
    deadline = session.deadline
    if deadline is not None:
        session.on_timer(deadline)
        for data in session.outgoing():
            reparsed(data, f"a REGISTER at its timer after a {response.status}")


def reparsed(wire: bytes, what: str, *, datagram: bool = True) -> Message | None:
    """``wire``, written by sipis, parsed again; None if only a size limit refused it."""
    try:
        return parse_message(wire, datagram=datagram)
    except SipError as exc:
        if exc.status == 513:
            return None
        raise AssertionError(f"{what} written by sipis does not parse: {exc!r}\n{wire!r}") from None


def parsed_again(parse: Callable[[str], T], text: str) -> T:
    """``text``, written by sipis from a parsed value, parsed again."""
    try:
        return parse(text)
    except SipError as exc:
        raise AssertionError(f"{text!r} written by sipis does not parse: {exc!r}") from None


# --- the stream framer -------------------------------------------------------------


@dataclass
class Framed:
    """What a framer made of a stream: messages and malformed ones, then maybe an error."""

    items: list[Message | ParseError] = field(default_factory=list)
    error: SipError | None = None

    def summary(self) -> list[tuple[object, ...]]:
        return [
            ("malformed", item.reason, item.status)
            if isinstance(item, ParseError)
            else ("message", item.serialize())
            for item in self.items
        ]


def frame(payload: bytes, sizes: list[int]) -> Framed:
    """Feed ``payload`` to a fresh framer in chunks of ``sizes``, in turn."""
    framer = StreamFramer(max_size=STREAM_MAX_SIZE)
    framed = Framed()
    position = turn = 0
    while position < len(payload):
        size = sizes[turn % len(sizes)]
        turn += 1
        try:
            items = framer.feed(payload[position : position + size])
        except SipError as exc:
            framed.error = exc
            break
        framed.items += [item for item in items if not isinstance(item, Keepalive)]
        position += size
    return framed


# --- digest -------------------------------------------------------------------------


def use_challenge(challenge: Challenge) -> str:
    """What a registration does with a challenge: answer it if it can."""
    _ = dict(challenge.params)
    if not challenge.answerable:
        assert select_challenge([challenge]) is None, "an unanswerable challenge was chosen"
        return "challenge unanswerable"
    assert select_challenge([challenge]) is challenge, (
        "the only answerable challenge was passed over"
    )
    client = DigestClient(USERNAME, PASSWORD, cnonce_source=lambda: "0a4f113b")
    value = client.authorize(challenge, "REGISTER", URI)
    params = parsed_again(parse_credentials, value).params
    assert (params["realm"], params["nonce"], params.get("opaque")) == (
        challenge.realm,
        challenge.nonce,
        challenge.opaque,
    ), f"the answer {value!r} does not carry the challenge's realm, nonce and opaque"
    return "challenge answered"


def use_credentials(credentials: Credentials) -> str:
    """What the device registrar does with credentials: check them, twice."""
    _ = credentials.is_digest
    server = DigestServer(KEY)
    nonces = {
        NONCE_PLACEHOLDER: parse_challenge(server.challenges(REALM, NOW)[0]).nonce,
        EXPIRED_NONCE_PLACEHOLDER: parse_challenge(server.challenges(REALM, NOW - 3600)[0]).nonce,
    }
    params = dict(credentials.params)
    nonce = params.get("nonce")
    if nonce in nonces:
        params["nonce"] = nonces[nonce]
    if params.get("response") == RESPONSE_PLACEHOLDER:
        params["response"] = expected_response(params)
    answer = Credentials(credentials.scheme, MappingProxyType(params))
    ha1 = HA1 if params.get("username") == USERNAME else None
    verdict = server.check(answer, method="REGISTER", uri=URI, realm=REALM, ha1=ha1, now=NOW)
    if verdict is Verdict.OK:
        replay = server.check(answer, method="REGISTER", uri=URI, realm=REALM, ha1=ha1, now=NOW)
        assert replay is Verdict.INVALID, f"a replayed answer was judged {replay}"
    return f"credentials {verdict.value}"


def expected_response(params: dict[str, str]) -> str:
    """The right qop=auth response for ``params`` (RFC 7616 §3.4.1), or "" if no hash fits."""
    hash_name = HASH_NAMES.get(params.get("algorithm", "MD5").lower())
    if hash_name is None:
        return ""

    def h(text: str) -> str:
        return hashlib.new(hash_name, text.encode()).hexdigest()

    ha1 = h(f"{USERNAME}:{REALM}:{PASSWORD}")
    ha2 = h(f"REGISTER:{params.get('uri', '')}")
    fields = [params.get(name, "") for name in ("nonce", "nc", "cnonce", "qop")]
    return h(":".join([ha1, *fields, ha2]))
