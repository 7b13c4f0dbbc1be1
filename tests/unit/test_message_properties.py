"""Property and fuzz tests: round trips are stable, bad bytes only ever raise SipError."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sipis.sip.errors import SipError
from sipis.sip.grammar import quote
from sipis.sip.message import Message, Request, Response, StreamFramer, parse_message
from sipis.sip.uri import SipUri, parse_uri

DATA = Path(__file__).parent.parent / "data" / "rfc4475"
SEEDS = [p.read_bytes() for p in sorted(DATA.glob("*.dat"))]

TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"
token = st.text(TOKEN_CHARS, min_size=1, max_size=12)
label = st.from_regex(r"[a-z0-9]([a-z0-9\-]{0,8}[a-z0-9])?", fullmatch=True)
hostname = st.lists(label, min_size=1, max_size=4).map(".".join)
ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
host = st.one_of(hostname, ipv4, st.just("[2001:db8::1]"))
escaped = st.sampled_from(["%41", "%2F", "%40", "%00", "%e2%82%ac"])
user = st.lists(
    st.one_of(st.text("abcXYZ019-_.!~*'()&=+$,;?/", min_size=1, max_size=4), escaped),
    min_size=1,
    max_size=4,
).map("".join)
paramchar = st.text("abcXYZ019-_.!~*'()[]/:&+$", min_size=1, max_size=6)
uri_params = st.dictionaries(paramchar.map(str.lower), st.none() | paramchar, max_size=3)
sip_uri = st.builds(
    SipUri,
    host=host,
    user=st.none() | user,
    port=st.none() | st.integers(1, 65535),
    scheme=st.sampled_from(["sip", "sips"]),
    params=uri_params,
)
display = st.none() | st.text(
    st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=10
).filter(lambda s: s.strip() == s)
header_params = st.dictionaries(token.map(str.lower), st.none() | token, max_size=3)
word_chars = TOKEN_CHARS + '()<>:\\"/[]?{}'
call_id = st.tuples(st.text(word_chars, min_size=1, max_size=20), st.none() | hostname).map(
    lambda t: t[0] if t[1] is None else f"{t[0]}@{t[1]}"
)
header_value = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=30
).map(lambda s: s.strip(" \t\u00a0\u1680\u2000\u3000\x85"))


def name_addr(uri: SipUri, name: str | None, params: dict[str, str | None]) -> str:
    shown = "" if name is None else quote(name) + " "
    rendered = "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())
    return f"{shown}<{uri}>{rendered}"


@st.composite
def requests(draw: st.DrawFn) -> Request:
    method = draw(st.sampled_from(["INVITE", "REGISTER", "OPTIONS", "MESSAGE"]) | token)
    fields: list[tuple[str, str]] = []
    for _ in range(draw(st.integers(1, 3))):
        branch = "z9hG4bK" + draw(token)
        fields.append(
            (
                "Via",
                f"SIP/2.0/{draw(st.sampled_from(['UDP', 'TCP', 'TLS']))} "
                f"{draw(host)};branch={branch}",
            )
        )
    fields.append(("From", name_addr(draw(sip_uri), draw(display), {"tag": draw(token)})))
    fields.append(("To", name_addr(draw(sip_uri), draw(display), draw(header_params))))
    fields.append(("Call-ID", draw(call_id)))
    fields.append(("CSeq", f"{draw(st.integers(0, 2**31 - 1))} {method}"))
    fields.append(("Max-Forwards", str(draw(st.integers(0, 255)))))
    for _ in range(draw(st.integers(0, 3))):
        fields.append((f"X-{draw(token)}", draw(header_value)))
    body = draw(st.binary(max_size=64))
    return Request(method, draw(sip_uri), fields, body)


def reparsed(msg: Message) -> Message:
    return parse_message(msg.serialize())


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_built_requests_survive_serialize_parse(req: Request) -> None:
    parsed = reparsed(req)
    assert isinstance(parsed, Request)
    assert (parsed.method, str(parsed.uri)) == (req.method, str(req.uri))
    assert parsed.body == req.body
    assert [str(v) for v in parsed.vias] == req.headers.get_all("Via")
    assert str(parsed.from_) == req.headers.get("From")
    assert parsed.call_id == req.headers.get("Call-ID")
    assert reparsed(parsed).serialize() == parsed.serialize()


@settings(max_examples=300)
@given(sip_uri)
def test_uri_round_trip(uri: SipUri) -> None:
    again = parse_uri(str(uri))
    assert again == uri
    assert again.equivalent(uri)


def mutate(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    out = bytearray(data)
    for kind, position, chunk in edits:
        at = position % (len(out) + 1)
        if kind == 0:
            out[at : at + len(chunk)] = chunk
        elif kind == 1:
            out[at:at] = chunk
        else:
            del out[at : at + len(chunk)]
    return bytes(out)


edits = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 4000), st.binary(min_size=1, max_size=4)),
    min_size=1,
    max_size=6,
)
interesting = st.sampled_from(
    [b"\r\n", b":", b";", b",", b"<", b">", b'"', b"\\", b" ", b"%", b"@", b"\x00", b"\xff"]
)
spliced = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 4000), interesting), min_size=1, max_size=6
)


def parse_is_stable_or_rejected(data: bytes) -> None:
    """Only SipError escapes; what parses serializes to a fixed point."""
    try:
        msg = parse_message(data)
    except SipError:
        return
    once = msg.serialize()
    twice = parse_message(once).serialize()
    assert twice == once
    assert isinstance(msg, Request | Response)


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(SEEDS), edits | spliced)
def test_mutated_torture_messages(seed: bytes, changes: list[tuple[int, int, bytes]]) -> None:
    parse_is_stable_or_rejected(mutate(seed, changes))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2048))
@example(b"SIP/2.0 200 \r\n\r\n")
@example(b"INVITE sip:a@b SIP/2.0\r\n\r\n")
@example(b"\r\n\r\n\r\n")
def test_random_bytes(data: bytes) -> None:
    parse_is_stable_or_rejected(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SEEDS), edits | spliced, st.lists(st.integers(1, 300), max_size=8))
def test_stream_framer_on_mutated_streams(
    seed: bytes, changes: list[tuple[int, int, bytes]], cuts: list[int]
) -> None:
    stream = mutate(seed, changes) * 2
    framer = StreamFramer()
    position = 0
    try:
        for size in [*cuts, len(stream)]:
            framer.feed(stream[position : position + size])
            position += size
    except SipError:
        return
