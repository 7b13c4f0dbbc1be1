"""Message, header and URI parsing and serialization."""

from __future__ import annotations

import pytest

from sipis.sip.errors import SipError
from sipis.sip.headers import parse_name_addr, parse_via
from sipis.sip.message import (
    MAX_HEADER_FIELDS,
    MAX_MESSAGE_SIZE,
    Headers,
    Keepalive,
    ParseError,
    Request,
    Response,
    StreamBroken,
    StreamFramer,
    parse_message,
)
from sipis.sip.uri import AbsoluteUri, SipUri, TelUri, parse_uri

REGISTER = (
    b"REGISTER sip:example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK74bf9;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: <sip:alice@example.com>;tag=9fxced76sl\r\n"
    b"To: <sip:alice@example.com>\r\n"
    b"Call-ID: 843817637684230@998sdasdh09\r\n"
    b"CSeq: 1826 REGISTER\r\n"
    b'Contact: <sip:a1b2@192.0.2.10:5060>;+sip.instance="<urn:uuid:00000000-0000-1000-8000'
    b'-000A95A0E128>";reg-id=1\r\n'
    b"Expires: 600\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def reg(**replace: str) -> bytes:
    text = REGISTER.decode()
    for old, new in replace.items():
        text = text.replace(old.replace("_", "-"), new)
    return text.encode()


def test_register_fields() -> None:
    msg = parse_message(REGISTER)
    assert isinstance(msg, Request) and msg.method == "REGISTER"
    assert msg.via.branch == "z9hG4bK74bf9" and msg.via.port == 5060 and msg.via.rport is None
    assert "rport" in msg.via.params
    assert msg.from_.tag == "9fxced76sl" and msg.to.tag is None
    assert msg.cseq.number == 1826 and msg.expires == 600
    [contact] = msg.contacts
    assert contact.params["+sip.instance"] == '"<urn:uuid:00000000-0000-1000-8000-000A95A0E128>"'
    assert contact.params["reg-id"] == "1"


def test_serialize_round_trip_is_byte_identical_for_canonical_input() -> None:
    assert parse_message(REGISTER).serialize() == REGISTER


def test_compact_forms_and_case_insensitive_names() -> None:
    data = (
        b"OPTIONS sip:bob@example.com SIP/2.0\r\nv: SIP/2.0/TCP h;branch=z9hG4bKx\r\n"
        b"f: <sip:a@example.com>;tag=1\r\nt: sip:bob@example.com\r\ni: cid\r\n"
        b"cSeQ: 1 OPTIONS\r\nm: <sip:a@h>\r\nk: path, outbound\r\nl: 0\r\n\r\n"
    )
    msg = parse_message(data)
    assert msg.call_id == "cid" and msg.headers.values("Supported") == ["path", "outbound"]
    assert (
        b"Call-ID: cid\r\n" in msg.serialize() and b"Supported: path, outbound" in msg.serialize()
    )
    assert msg.headers.get("call-id") == msg.headers.get("I") == "cid"


def test_folded_header_lines_are_unfolded() -> None:
    msg = parse_message(reg(Expires="Subject: a\r\n\t b\r\n  c\r\nExpires"))
    assert msg.headers.get("Subject") == "a b c"


def test_multi_value_headers_split_outside_quotes_and_brackets() -> None:
    value = '"Doe, John" <sip:j,k@h;x=a>;p="q,r", <sip:k@h>'
    msg = parse_message(reg(**{"Expires: 600": f"Route: {value}\r\nRoute: <sip:z@h>"}))
    routes = msg.header_name_addrs("Route")
    assert [r.display_name for r in routes] == ["Doe, John", None, None]
    assert [str(r.uri) for r in routes] == ["sip:j,k@h;x=a", "sip:k@h", "sip:z@h"]
    assert routes[0].params == {"p": '"q,r"'}


def test_contact_star() -> None:
    start = REGISTER.index(b"Contact:")
    end = REGISTER.index(b"\r\n", start)
    msg = parse_message(REGISTER[:start] + b"Contact: *" + REGISTER[end:])
    assert msg.headers.get("Contact") == "*" and msg.contacts == []


@pytest.mark.parametrize(
    ("text", "display", "uri", "params"),
    [
        ("<sip:a@b>", None, "sip:a@b", {}),
        ("sip:a@b;tag=x", None, "sip:a@b", {"tag": "x"}),
        ("<sip:a@b;lr>;tag=x", None, "sip:a@b;lr", {"tag": "x"}),
        ('"A \\"B\\"" <sip:a@b>', 'A "B"', "sip:a@b", {}),
        ("Alice Smith <sips:a@b:5061>", "Alice Smith", "sips:a@b:5061", {}),
        ("<tel:+1-555-0100>;tag=1", None, "tel:+1-555-0100", {"tag": "1"}),
        (
            "<sip:[2001:db8::1]:5070;transport=tcp>",
            None,
            "sip:[2001:db8::1]:5070;transport=tcp",
            {},
        ),
    ],
)
def test_name_addr_and_addr_spec(
    text: str, display: str | None, uri: str, params: dict[str, str]
) -> None:
    parsed = parse_name_addr(text)
    assert (parsed.display_name, str(parsed.uri), parsed.params) == (display, uri, params)
    assert parse_name_addr(str(parsed)) == parsed


@pytest.mark.parametrize(
    "text",
    [
        "sip:a@b?X=y",  # headers need name-addr form
        "<sip:a@b",
        '"unterminated <sip:a@b>',
        "< sip:a@b>",
        "Bell, Alexander <sip:a@b>",
        "<sip:a@b>;;",
        "",
    ],
)
def test_malformed_addresses(text: str) -> None:
    with pytest.raises(SipError) as caught:
        parse_name_addr(text)
    assert caught.value.status == 400


def test_repeated_header_parameter_keeps_the_last_value() -> None:
    assert parse_name_addr("<sip:a@b>;tag=1;tag=2").tag == "2"


def test_via_fields() -> None:
    via = parse_via(
        "SIP / 2.0 / tcp [2001:db8::9]:5061 ;branch=z9hG4bKa;received=192.0.2.1;rport=5099"
    )
    assert (via.transport, via.host, via.port) == ("TCP", "[2001:db8::9]", 5061)
    assert (via.branch, via.received, via.rport) == ("z9hG4bKa", "192.0.2.1", 5099)
    assert (
        str(via) == "SIP/2.0/TCP [2001:db8::9]:5061;branch=z9hG4bKa;received=192.0.2.1;rport=5099"
    )


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("SIP/2.0/UDP", 400),
        ("SIP/3.0/UDP h", 505),
        ("SIP/2.0/UDP h:99999", 400),
        ("SIP/2.0/UDP h;rport=x", 400),
        ("SIP/2.0/UDP h junk", 400),
    ],
)
def test_malformed_via(text: str, status: int) -> None:
    with pytest.raises(SipError) as caught:
        parse_via(text)
    assert caught.value.status == status


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sip:alice@example.com", SipUri(host="example.com", user="alice")),
        (
            "SIPS:alice:pw@EXAMPLE.com:5061;transport=TLS;lr?subject=hi&priority=urgent",
            SipUri(
                host="EXAMPLE.com",
                user="alice",
                port=5061,
                scheme="sips",
                password="pw",
                params={"transport": "TLS", "lr": None},
                headers=(("subject", "hi"), ("priority", "urgent")),
            ),
        ),
        ("sip:192.0.2.1", SipUri(host="192.0.2.1")),
        ("sip:[::1]:5060", SipUri(host="[::1]", port=5060)),
        ("tel:+1-201-555-0123;phone-context=x", TelUri("+1-201-555-0123", {"phone-context": "x"})),
        ("urn:uuid:f81d4fae", AbsoluteUri("urn", "uuid:f81d4fae")),
    ],
)
def test_uri_parse_and_serialize(text: str, expected: object) -> None:
    uri = parse_uri(text)
    assert uri == expected
    assert parse_uri(str(uri)) == uri


@pytest.mark.parametrize(
    "text",
    [
        "sip:",
        "sip:a@",
        "sip:a@b:70000",
        "sip:a@-b",
        "sip:a@b..c",
        "sip:a b@c",
        "sip:%zz@b",
        "tel:",
        "nocolon",
    ],
)
def test_malformed_uris(text: str) -> None:
    with pytest.raises(SipError):
        parse_uri(text)


def test_uri_comparison_rules_of_rfc3261() -> None:
    def same(a: str, b: str) -> bool:
        return parse_uri(a).equivalent(parse_uri(b))

    assert same("sip:%61lice@atlanta.com;transport=TCP", "sip:alice@AtLanTa.CoM;Transport=tcp")
    assert same("sip:carol@chicago.com", "sip:carol@chicago.com;newparam=5")
    assert same(
        "sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
        "sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com",
    )
    assert not same("SIP:ALICE@AtLanTa.CoM;Transport=udp", "sip:alice@AtLanTa.CoM;Transport=UDP")
    assert not same("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060")
    assert not same("sip:bob@biloxi.com", "sip:bob@biloxi.com;transport=udp")
    assert not same("sip:carol@chicago.com;security=on", "sip:carol@chicago.com;security=off")
    assert not same("sip:alice@a.com", "sips:alice@a.com")


def test_status_line_and_response_fields() -> None:
    data = (
        b"SIP/2.0 401 Unauthorized\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKa\r\n"
        b"From: <sip:a@b>;tag=1\r\nTo: <sip:a@b>;tag=2\r\nCall-ID: c\r\nCSeq: 2 REGISTER\r\n"
        b'WWW-Authenticate: Digest realm="b", nonce="n"\r\nContent-Length: 0\r\n\r\n'
    )
    msg = parse_message(data)
    assert isinstance(msg, Response) and (msg.status, msg.reason) == (401, "Unauthorized")
    assert msg.headers.get("www-authenticate") == 'Digest realm="b", nonce="n"'
    assert msg.serialize() == data


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"INVITE sip:a@b SIP/2.0\r\nContent-Length: 0\r\n\r\n", 400),  # no Via
        (REGISTER.replace(b"CSeq: 1826 REGISTER", b"CSeq: 1826 INVITE"), 400),
        (REGISTER.replace(b"CSeq: 1826", b"CSeq: 99999999999"), 400),
        (REGISTER.replace(b"Max-Forwards: 70", b"Max-Forwards: 256"), 400),
        (REGISTER.replace(b"Call-ID: ", b"Call-ID: a b "), 400),
        (REGISTER.replace(b"Expires: 600\r\n", b"Bad Name: x\r\n"), 400),
        (REGISTER.replace(b"Expires: 600\r\n", b"NoColon\r\n"), 400),
        (REGISTER.replace(b"Expires: 600\r\n", b"To: <sip:b@c>\r\n"), 400),
        (REGISTER.replace(b"SIP/2.0\r\n", b"SIP/2.1\r\n", 1), 505),
        (REGISTER.replace(b"Content-Length: 0", b"Content-Length: 1"), 400),
        (REGISTER.replace(b"\r\n\r\n", b"\r\n" + b"X: y\r\n" * MAX_HEADER_FIELDS + b"\r\n"), 513),
        (REGISTER + b"x" * MAX_MESSAGE_SIZE, 513),
    ],
)
def test_rejections_carry_a_status(data: bytes, status: int) -> None:
    with pytest.raises(SipError) as caught:
        parse_message(data)
    assert caught.value.status == status


def test_rejected_request_keeps_what_was_read() -> None:
    with pytest.raises(ParseError) as caught:
        parse_message(REGISTER.replace(b"To: <sip:alice@example.com>", b"To: <sip:alice@"))
    assert isinstance(caught.value.partial, Request)
    assert caught.value.partial.headers.get("Call-ID") == "843817637684230@998sdasdh09"


def test_headers_editing_drops_cached_values() -> None:
    msg = parse_message(REGISTER)
    assert msg.via.branch == "z9hG4bK74bf9"
    msg.headers.add("Via", "SIP/2.0/TCP proxy;branch=z9hG4bKlast")
    assert [v.branch for v in msg.vias] == ["z9hG4bK74bf9", "z9hG4bKlast"]
    msg.headers.set("Via", "SIP/2.0/TCP proxy;branch=z9hG4bKonly")
    assert msg.via.branch == "z9hG4bKonly"
    assert len(msg.vias) == 1
    msg.headers.set("Expires", "30")
    assert msg.expires == 30
    msg.headers.remove("Expires")
    assert msg.expires is None and "Expires" not in msg.headers


def test_expires_is_lenient() -> None:
    assert parse_message(REGISTER.replace(b"Expires: 600", b"Expires: soon")).expires is None
    huge = parse_message(REGISTER.replace(b"Expires: 600", b"Expires: 99999999999999"))
    assert huge.expires == 2**32 - 1


def test_build_request_and_serialize() -> None:
    req = Request(
        "OPTIONS",
        SipUri(host="example.com"),
        Headers([("v", "SIP/2.0/UDP h;branch=z9hG4bK1"), ("Call-ID", "x")]),
        body=b"hi",
    )
    assert req.serialize() == (
        b"OPTIONS sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
        b"Call-ID: x\r\nContent-Length: 2\r\n\r\nhi"
    )


class TestStreamFramer:
    def test_messages_split_anywhere(self) -> None:
        stream = REGISTER * 3
        for size in (1, 7, 64, len(stream)):
            framer = StreamFramer()
            out = [
                e for i in range(0, len(stream), size) for e in framer.feed(stream[i : i + size])
            ]
            assert [m.serialize() for m in out if isinstance(m, Request)] == [REGISTER] * 3

    def test_keepalives(self) -> None:
        framer = StreamFramer()
        assert framer.feed(b"\r\n\r\n") == [Keepalive(ping=True)]
        assert framer.feed(b"\r\n") == [Keepalive(ping=False)]
        events = framer.feed(b"\r\n\r\n" + REGISTER + b"\r\n")
        assert events[0] == Keepalive(ping=True) and isinstance(events[1], Request)
        assert events[2] == Keepalive(ping=False)

    def test_body_waits_for_content_length(self) -> None:
        msg = REGISTER.replace(b"Content-Length: 0\r\n\r\n", b"Content-Length: 5\r\n\r\n")
        framer = StreamFramer()
        assert framer.feed(msg + b"abc") == []
        [done] = framer.feed(b"de")
        assert isinstance(done, Request) and done.body == b"abcde"

    def test_malformed_message_with_known_length_keeps_the_stream(self) -> None:
        bad = REGISTER.replace(b"CSeq: 1826 REGISTER", b"CSeq: x REGISTER")
        bad_error, good = StreamFramer().feed(bad + REGISTER)
        assert isinstance(bad_error, ParseError) and isinstance(bad_error.partial, Request)
        assert isinstance(good, Request)

    def test_missing_content_length_is_fatal_with_the_request_to_answer(self) -> None:
        with pytest.raises(StreamBroken) as caught:
            StreamFramer().feed(REGISTER.replace(b"Content-Length: 0\r\n", b""))
        assert caught.value.status == 400
        assert isinstance(caught.value.partial, Request)
        assert caught.value.partial.call_id == parse_message(REGISTER).call_id

    def test_a_body_past_the_cap_is_fatal_after_what_came_before(self) -> None:
        framer = StreamFramer(max_size=1000)
        too_long = REGISTER.replace(b"Content-Length: 0", b"Content-Length: 900")
        with pytest.raises(StreamBroken) as caught:
            framer.feed(b"\r\n\r\n" + REGISTER + too_long)
        assert caught.value.status == 513
        assert isinstance(caught.value.partial, Request)
        ping, first = caught.value.framed
        assert ping == Keepalive(ping=True) and isinstance(first, Request)

    def test_endless_headers_are_refused(self) -> None:
        framer = StreamFramer(max_size=1000)
        with pytest.raises(StreamBroken) as caught:
            framer.feed(b"INVITE sip:a@b SIP/2.0\r\n" + b"X: " + b"y" * 2000)
        assert caught.value.status == 513 and caught.value.partial is None


def test_prepend_and_pop_first_keep_list_elements_in_order() -> None:
    headers = Headers([("Via", "SIP/2.0/UDP b;branch=z9hG4bKb, SIP/2.0/UDP c;branch=z9hG4bKc")])
    headers.add("Call-ID", "x")
    headers.prepend("Via", "SIP/2.0/TLS a;branch=z9hG4bKa")
    assert headers.values("Via") == [
        "SIP/2.0/TLS a;branch=z9hG4bKa",
        "SIP/2.0/UDP b;branch=z9hG4bKb",
        "SIP/2.0/UDP c;branch=z9hG4bKc",
    ]
    assert headers.pop_first("Via") == "SIP/2.0/TLS a;branch=z9hG4bKa"
    assert headers.pop_first("v") == "SIP/2.0/UDP b;branch=z9hG4bKb"
    assert list(headers) == [("Via", "SIP/2.0/UDP c;branch=z9hG4bKc"), ("Call-ID", "x")]
    assert headers.pop_first("Via") == "SIP/2.0/UDP c;branch=z9hG4bKc"
    assert headers.pop_first("Via") is None and list(headers) == [("Call-ID", "x")]


def test_a_copy_is_independent() -> None:
    original = Headers([("Route", "<sip:a;lr>"), ("Call-ID", "x")])
    assert original.get("Route") == "<sip:a;lr>"  # index built before copying
    copy = original.copy()
    copy.pop_first("Route")
    copy.set("Call-ID", "y")
    assert original.get("Route") == "<sip:a;lr>" and original.get("Call-ID") == "x"
    assert copy.get("Route") is None and copy.get("Call-ID") == "y"
