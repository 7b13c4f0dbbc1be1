"""Seed corpus and dictionaries for the fuzz targets.

The message seeds are the 49 RFC 4475 torture messages in tests/data/rfc4475
plus the messages a registration and a relayed call exchange (REGISTER with
and without credentials, 401, 407, 200 with bindings, 423, 302, INVITE with
routes, 200 with Record-Route, ACK, BYE).  The stream seeds are those
messages framed on a stream, some cut in pieces.  The digest seeds are the
challenges registrars send and the answers phones give, including answers
with the placeholders ``tests.fuzz.targets`` fills with a valid nonce and
response.  The dictionaries give the fuzzer the grammar's literals.
"""

from __future__ import annotations

from pathlib import Path

RFC4475 = Path(__file__).resolve().parent.parent / "data" / "rfc4475"


def sip(*lines: str, body: bytes = b"") -> bytes:
    """A message from its start line and header lines, with the right Content-Length."""
    head = "\r\n".join([*lines, f"Content-Length: {len(body)}", "", ""])
    return head.encode() + body


VIA = "Via: SIP/2.0/UDP 192.0.2.50:5070;rport;branch=z9hG4bK5d6fe1a2b3c4d5e6"
VIA_ANSWERED = (
    "Via: SIP/2.0/UDP 192.0.2.50:5070;rport=5070;received=198.51.100.9;"
    "branch=z9hG4bK5d6fe1a2b3c4d5e6"
)
FROM = "From: <sip:alice@example.com>;tag=a73kszlfl"
TO = "To: <sip:alice@example.com>"
TO_TAGGED = "To: <sip:alice@example.com>;tag=8d7a33761e"
CALL_ID = "Call-ID: 1j9FpLxk3uxtm8tn@192.0.2.50"
CONTACT = (
    'Contact: <sip:c0ffee@192.0.2.50:5070;transport=tcp>;+sip.instance="<urn:uuid:'
    '00000000-0000-1000-8000-000A95A0E128>";reg-id=1;expires=600'
)
CHALLENGE = 'Digest realm="example.com", nonce="ZWQ0ZjE5MzQ", qop="auth", algorithm=SHA-256'
CREDENTIALS = (
    'Digest username="alice", realm="sipis.example", nonce="@nonce@", uri="sip:sipis.example",'
    ' response="@response@", algorithm=MD5, cnonce="0a4f113b", nc=00000001, qop=auth'
)
SDP = (
    b"v=0\r\no=alice 2890844526 2890844526 IN IP4 198.51.100.7\r\ns=-\r\n"
    b"c=IN IP4 198.51.100.7\r\nt=0 0\r\nm=audio 49172 RTP/AVP 0 8\r\n"
)

MESSAGES: dict[str, bytes] = {
    "register": sip(
        "REGISTER sip:example.com SIP/2.0",
        VIA,
        "Max-Forwards: 70",
        FROM,
        TO,
        CALL_ID,
        "CSeq: 7 REGISTER",
        CONTACT,
        "Expires: 600",
        "Supported: path, outbound",
    ),
    "register-authorized": sip(
        "REGISTER sip:sipis.example SIP/2.0",
        VIA,
        "Max-Forwards: 70",
        FROM,
        TO,
        CALL_ID,
        "CSeq: 8 REGISTER",
        CONTACT,
        f"Authorization: {CREDENTIALS}",
        'Proxy-Authorization: Digest username="alice", realm="proxy.example", '
        'nonce="bm9uY2U", uri="sip:sipis.example", response="0123456789abcdef", algorithm=MD5',
    ),
    "unauthorized": sip(
        "SIP/2.0 401 Unauthorized",
        VIA_ANSWERED,
        FROM,
        TO_TAGGED,
        CALL_ID,
        "CSeq: 7 REGISTER",
        f"WWW-Authenticate: {CHALLENGE}",
        'WWW-Authenticate: Digest realm="example.com", nonce="ZWQ0ZjE5MzQ", qop="auth", '
        'algorithm=MD5, opaque="", stale=FALSE',
    ),
    "proxy-auth-required": sip(
        "SIP/2.0 407 Proxy Authentication Required",
        VIA_ANSWERED,
        FROM,
        TO_TAGGED,
        CALL_ID,
        "CSeq: 1 INVITE",
        'Proxy-Authenticate: Digest realm="proxy.example", nonce="a1b2c3", '
        'qop="auth,auth-int", algorithm=SHA-512-256-sess, userhash=true, '
        'domain="sip:proxy.example sip:other.example"',
    ),
    "registered": sip(
        "SIP/2.0 200 OK",
        VIA_ANSWERED,
        FROM,
        TO_TAGGED,
        CALL_ID,
        "CSeq: 8 REGISTER",
        CONTACT,
        "Contact: <sip:old@192.0.2.50:5070>;expires=30, <sip:other@[2001:db8::1]:5061>;q=0.5",
        "Service-Route: <sip:orig@scscf.example.com;lr>",
        "Path: <sip:edge.example.com;lr;ob>",
        "Expires: 3600",
        "Flow-Timer: 120",
    ),
    "interval-too-brief": sip(
        "SIP/2.0 423 Interval Too Brief",
        VIA_ANSWERED,
        FROM,
        TO_TAGGED,
        CALL_ID,
        "CSeq: 9 REGISTER",
        "Min-Expires: 1800",
    ),
    "moved": sip(
        "SIP/2.0 302 Moved Temporarily",
        VIA_ANSWERED,
        FROM,
        TO_TAGGED,
        CALL_ID,
        "CSeq: 10 REGISTER",
        "m: <sips:registrar2.example.com:5061;transport=tls>, tel:+15551234567;phone-context=x",
    ),
    "invite": sip(
        "INVITE sip:c0ffee@192.0.2.50:5070;transport=tcp SIP/2.0",
        "Record-Route: <sip:192.0.2.10;lr;ftag=1928301774>",
        "Via: SIP/2.0/TCP 192.0.2.10;branch=z9hG4bKcydzigwkX",
        "v: SIP/2.0/UDP 198.51.100.7:5060;received=198.51.100.7;rport=5060;branch=z9hG4bK776asdhds",
        "Route: <sip:rr@sipis.example:5060;transport=udp;lr>, <sip:edge.example.com;lr>",
        "Max-Forwards: 69",
        "To: Bob <sip:bob@example.com>",
        'From: "Alice \\"A\\" Liddell" <sip:alice@example.org>;tag=1928301774',
        "Call-ID: a84b4c76e66710@pc33.example.org",
        "CSeq: 314159 INVITE",
        "Contact: <sip:alice@198.51.100.7:5060;ob>",
        "Require: outbound",
        "Accept: application/sdp, text/plain",
        "Content-Type: application/sdp",
        body=SDP,
    ),
    "answered": sip(
        "SIP/2.0 200 OK",
        "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKfuzz;rport=5060",
        "Via: SIP/2.0/UDP 198.51.100.7:5060;received=198.51.100.7;branch=z9hG4bK776asdhds",
        "Record-Route: <sip:rr@192.0.2.1:5060;transport=udp;lr>, <sip:192.0.2.10;lr>",
        "To: Bob <sip:bob@example.com>;tag=a6c85cf",
        "From: Alice <sip:alice@example.org>;tag=1928301774",
        "Call-ID: a84b4c76e66710@pc33.example.org",
        "CSeq: 314159 INVITE",
        "Contact: <sip:bob@192.0.2.4>",
        "c: application/sdp",
        body=SDP,
    ),
    "ack": sip(
        "ACK sip:bob@192.0.2.4 SIP/2.0",
        "Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKnashds9",
        "Route: <sip:192.0.2.10;lr>",
        "Max-Forwards: 70",
        "To: Bob <sip:bob@example.com>;tag=a6c85cf",
        "From: Alice <sip:alice@example.org>;tag=1928301774",
        "Call-ID: a84b4c76e66710@pc33.example.org",
        "CSeq: 314159 ACK",
    ),
    "bye": sip(
        "BYE sip:rr@sipis.example SIP/2.0",
        "Via: SIP/2.0/TLS [2001:db8::9]:5061;branch=z9hG4bKbye1",
        "Route: <sip:bob@192.0.2.4>",
        "Max-Forwards: 0",
        "t: Alice <sip:alice@example.org>;tag=1928301774",
        "f: Bob <sip:bob@example.com>;tag=a6c85cf",
        "i: a84b4c76e66710@pc33.example.org",
        "CSeq: 231 BYE",
    ),
}

# Messages of one registration and call, framed on one stream with keepalives between.
CONVERSATION = ("register", "unauthorized", "register-authorized", "registered", "invite", "bye")

# How the stream target reads its first octets: a count of cut sizes, then the sizes.
STREAM_CUTS: dict[str, bytes] = {
    "whole": b"\x00",
    "bytewise": b"\x01\x00",
    "mixed": b"\x03\x05\x30\xff",
}

CHALLENGES: dict[str, str] = {
    "sha256": CHALLENGE,
    "md5-opaque": 'Digest realm="example.com", nonce="ZWQ0ZjE5MzQ", opaque="", algorithm=md5',
    "sess-auth-int": (
        'Digest realm="a\\"b", nonce="n\\\\1", qop="auth-int", algorithm=SHA-256-sess, stale=TRUE'
    ),
    "userhash": (
        'Digest realm="api@example.org", qop="auth", algorithm=SHA-512-256, '
        'nonce="5TsQWLVdgBdmrQ0XsxbDODV+57QdFR34I9HAbC/RVvkK", '
        'opaque="HRPCssKJSGjCrkzDg8OhwpzCiGPChXYjwrI2QmXDnsOS", charset=UTF-8, userhash=true'
    ),
    "domain": (
        'Digest realm="proxy.example", domain="sip:a.example sip:b.example", '
        'nonce="x", qop="auth,auth-int"'
    ),
    "other-scheme": 'Basic realm="example.com"',
}
CREDENTIALS_SEEDS: dict[str, str] = {
    "md5": CREDENTIALS,
    "sha256": CREDENTIALS.replace("algorithm=MD5", "algorithm=SHA-256"),
    "expired": CREDENTIALS.replace("@nonce@", "@expired-nonce@"),
    "wrong-response": CREDENTIALS.replace("@response@", "0123456789abcdef0123456789abcdef"),
    "other-uri": CREDENTIALS.replace('uri="sip:sipis.example"', 'uri="sip:sipis.example:5060"'),
    "bad-nc": CREDENTIALS.replace("nc=00000001", "nc=1"),
    "userhash": CREDENTIALS + ", userhash=true",
    "rfc2069": (
        'Digest username="alice", realm="sipis.example", nonce="@nonce@", '
        'uri="sip:sipis.example", response="@response@"'
    ),
}

MESSAGE_WORDS = [
    "SIP/2.0", "\r\n", "\r\n\r\n", "\r\n ", " ", "\t", ":", ";", ",", "=", "@", "<", ">",
    '"', "\\", "%", "%00", "%41", "?", "&", "*", "[2001:db8::1]", ":5060", ":65536",
    "INVITE", "REGISTER", "ACK", "BYE", "CANCEL", "OPTIONS", "MESSAGE",
    "SIP/2.0 200 OK", "SIP/2.0 401 Unauthorized",
    "Via:", "v:", "SIP/2.0/UDP ", "SIP/2.0/TCP ", "SIP/2.0/TLS ", ";branch=z9hG4bK",
    ";rport", ";rport=5060", ";received=", ";maddr=", ";ttl=",
    "From:", "f:", "To:", "t:", ";tag=", "Call-ID:", "i:", "CSeq:", "Max-Forwards:",
    "Content-Length:", "l:", "Content-Type:", "c:", "Contact:", "m:", ";expires=", ";q=",
    ";+sip.instance=", "Expires:", "Min-Expires:", "Route:", "Record-Route:", "Path:",
    "Service-Route:", "Flow-Timer:", ";lr", ";transport=tcp", ";user=phone", ";method=INVITE",
    "sip:", "sips:", "tel:", "urn:", "WWW-Authenticate:", "Proxy-Authenticate:",
    "Authorization:", "Proxy-Authorization:", "Require:", "Accept:", "Content-Encoding:",
    "Digest ", "realm=", "nonce=", "qop=", "algorithm=", "response=", "uri=",
]  # fmt: skip
DIGEST_WORDS = [
    "Digest ", "digest ", "Basic ", ", ", ",", "=", '"', '\\"', "\\\\", " ", "\t",
    "realm=", "nonce=", "qop=", '"auth"', '"auth,auth-int"', "auth-int", "algorithm=",
    "MD5", "MD5-sess", "SHA-256", "SHA-256-sess", "SHA-512-256", "SHA-512-256-sess",
    "opaque=", "stale=true", "userhash=true", "domain=", "username=", "uri=",
    "response=", "cnonce=", "nc=", "00000001", "ffffffff", '"@nonce@"',
    '"@expired-nonce@"', '"@response@"', '"alice"', '"sipis.example"',
    '"sip:sipis.example"',
]  # fmt: skip


def corpus(target: str) -> dict[str, bytes]:
    """The seed inputs of ``target``, by file name."""
    messages = {f"rfc4475-{p.stem}": p.read_bytes() for p in sorted(RFC4475.glob("*.dat"))}
    messages |= MESSAGES
    if target == "message":
        return messages
    if target == "stream":
        seeds = {f"{name}-whole": STREAM_CUTS["whole"] + data for name, data in messages.items()}
        conversation = b"\r\n\r\n".join(MESSAGES[name] for name in CONVERSATION)
        seeds |= {
            f"conversation-{cut}": prefix + conversation for cut, prefix in STREAM_CUTS.items()
        }
        return seeds
    if target == "digest":
        values = {f"challenge-{k}": v for k, v in CHALLENGES.items()}
        values |= {f"credentials-{k}": v for k, v in CREDENTIALS_SEEDS.items()}
        return {name: value.encode() for name, value in values.items()}
    raise ValueError(f"no fuzz target {target!r}")


def dictionary(target: str) -> str:
    """The libFuzzer dictionary of ``target``: one quoted literal a line."""
    words = DIGEST_WORDS if target == "digest" else MESSAGE_WORDS
    return "".join(f'"{_escaped(word)}"\n' for word in words)


def _escaped(word: str) -> str:
    return "".join(
        ch if " " <= ch <= "~" and ch not in '"\\' else f"\\x{ord(ch):02x}" for ch in word
    )


def write(target: str, corpus_dir: Path, dictionary_path: Path) -> None:
    """Put the seed corpus of ``target`` in ``corpus_dir`` and its dictionary at
    ``dictionary_path``."""
    corpus_dir.mkdir(parents=True, exist_ok=True)
    for name, data in corpus(target).items():
        (corpus_dir / name).write_bytes(data)
    dictionary_path.write_text(dictionary(target))
