"""The 49 RFC 4475 torture messages: parse results, rejections and UAS answers.

Each valid message is checked against the values the RFC says a parser must
extract; each invalid one against the status the RFC says an element answers
with; the application-layer ones against the response of a user agent that
implements what a sipis binding implements (INVITE, ACK, BYE, CANCEL,
OPTIONS, MESSAGE; SDP and text bodies; no extensions).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from sipis.sip.errors import SipError
from sipis.sip.message import (
    Keepalive,
    Message,
    ParseError,
    Request,
    Response,
    StreamFramer,
    parse_message,
)
from sipis.sip.uas import UasPolicy, make_response, preflight
from sipis.sip.uri import AbsoluteUri, SipUri, unescape

DATA = Path(__file__).parent.parent / "data" / "rfc4475"
ALL_FILES = sorted(p.stem for p in DATA.glob("*.dat"))

UA = UasPolicy(
    methods={"INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "MESSAGE"},
    content_types=("application/sdp", "text/plain", "multipart/mixed"),
    answer_types={"INVITE": ("application/sdp",)},
)


def load(name: str) -> bytes:
    return (DATA / f"{name}.dat").read_bytes()


def parse(name: str) -> Message:
    return parse_message(load(name))


def request(name: str) -> Request:
    msg = parse(name)
    assert isinstance(msg, Request)
    return msg


def test_all_49_messages_are_present() -> None:
    assert len(ALL_FILES) == 49


@pytest.mark.parametrize("name", ALL_FILES)
def test_only_protocol_errors_escape_the_parser(name: str) -> None:
    data = load(name)
    for attempt in (lambda: parse_message(data), lambda: StreamFramer().feed(data)):
        with contextlib.suppress(SipError):
            attempt()


# 3.1.1 valid messages


def test_wsinv_short_tortuous_invite() -> None:
    msg = request("wsinv")
    assert msg.method == "INVITE"
    assert isinstance(msg.uri, SipUri)
    assert (msg.uri.user, msg.uri.host, msg.uri.params) == (
        "vivekg",
        "chair-dnrc.example.com",
        {"unknownparam": None},
    )
    assert str(msg.to.uri) == "sip:vivekg@chair-dnrc.example.com"
    assert msg.to.display_name is None and msg.to.tag == "1918181833n"
    assert msg.from_.display_name == 'J Rosenberg \\"'
    assert str(msg.from_.uri) == "sip:jdrosen@example.com" and msg.from_.tag == "98asjd8"
    assert msg.max_forwards == 68
    assert msg.call_id == "wsinv.ndaksdj@192.0.2.1"
    assert msg.content_length == 150 == len(msg.body)
    assert msg.cseq == (9, "INVITE")
    assert [str(v) for v in msg.vias] == [
        "SIP/2.0/UDP 192.0.2.2;branch=390skdjuw",
        "SIP/2.0/TCP spindle.example.com;branch=z9hG4bK9ikj8",
        "SIP/2.0/UDP 192.168.255.111;branch=z9hG4bK30239",
    ]
    assert msg.headers.get("Subject") == ""
    assert msg.headers.get("NewFangledHeader") == "newfangled value continued newfangled value"
    assert msg.headers.values("UnknownHeaderWithUnusualValue") == [";;,,;;,;"]
    assert msg.headers.get("Content-Type") == "application/sdp"
    [route] = msg.header_name_addrs("Route")
    assert str(route.uri) == "sip:services.example.com;lr;unknownwith=value;unknown-no-value"
    [contact] = msg.contacts
    assert contact.display_name == 'Quoted string ""'
    assert contact.params == {"newparam": "newvalue", "secondparam": None, "q": "0.33"}


def test_intmeth_wide_range_of_valid_characters() -> None:
    msg = request("intmeth")
    method = "!interesting-Method0123456789_*+`.%indeed'~"
    assert msg.method == method and msg.cseq == (139122385, method)
    uri = msg.uri
    assert isinstance(uri, SipUri)
    assert uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert uri.host == "example.com" and uri.params == {}
    assert msg.via.branch == "z9hG4bK-.!%66*_+`'~"
    assert msg.to.display_name == "BEL:\x07 NUL:\x00 DEL:\x7f"
    assert isinstance(msg.to.uri, SipUri) and msg.to.uri.user == uri.user
    assert msg.to.uri.password is None
    assert msg.from_.display_name == "token1~` token2'+_ token3*%!.-"
    assert msg.from_.params["fromparam''~+*_!.-%"] == '"работающий"'
    assert msg.from_.tag == "_token~1'+`*%!-."
    assert msg.call_id == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
    assert msg.max_forwards == 255
    assert msg.headers.get("extensionHeader-!.%*+_`'~") == "\ufeff大停電"


def test_intmeth_unknown_method_gets_501_with_allow() -> None:
    response = preflight(request("intmeth"), UA)
    assert response is not None and response.status == 501
    assert response.headers.get("Allow") == "ACK, BYE, CANCEL, INVITE, MESSAGE, OPTIONS"


def test_esc01_escapes_are_equivalent_to_their_characters() -> None:
    msg = request("esc01")
    assert isinstance(msg.uri, SipUri) and msg.uri.host == "example.net"
    assert unescape(msg.uri.user or "") == "sips:user@example.com"
    assert msg.to.uri.equivalent(SipUri(host="example.com", user="user"))
    assert isinstance(msg.from_.uri, SipUri)
    assert unescape(msg.from_.uri.user or "") == "I have spaces"
    [contact] = msg.contacts
    assert isinstance(contact.uri, SipUri) and unescape(contact.uri.user or "") == "caller"
    # Parameter names unescape; "value%41" stays distinct from "valueA" (no double unescaping).
    assert contact.uri.params == {"lr": None, "name": "v%61lue%25%34%31"}
    assert unescape(contact.uri.params["name"] or "") == "value%41"
    assert msg.call_id == "esc01.239409asdfakjkn23onasd0-3234"
    assert msg.headers.get("Content-Type") == "application/sdp"
    assert msg.cseq == (234234, "INVITE") and msg.max_forwards == 87


def test_escnull_escaped_nulls_register_two_distinct_contacts() -> None:
    msg = request("escnull")
    assert isinstance(msg.to.uri, SipUri)
    assert unescape(msg.to.uri.user or "") == "null-\x00-null"
    first, second = msg.contacts
    assert unescape(first.sip_uri.user or "") == "\x00"
    assert unescape(second.sip_uri.user or "") == "\x00\x00"
    assert not first.uri.equivalent(second.uri)
    assert msg.content_length == 0


def test_esc02_percent_that_is_not_an_escape() -> None:
    msg = request("esc02")
    assert msg.method == "RE%47IST%45R" != "REGISTER"
    assert msg.to.display_name == "%Z%45" and msg.from_.display_name == "%Z%45"
    assert msg.via.branch == "z9hG4bK209%fzsnel234"
    assert [str(c.uri) for c in msg.contacts] == [
        "sip:alias1@host1.example.com",
        "sip:alias3@host3.example.com",
    ]
    assert msg.headers.get("C%6Fntact") == "<sip:alias2@host2.example.com>"
    response = preflight(msg, UA)
    assert response is not None and response.status == 501


def test_lwsdisp_no_space_before_angle_bracket() -> None:
    msg = request("lwsdisp")
    assert msg.from_.display_name == "caller"
    assert str(msg.from_.uri) == "sip:caller@example.com" and msg.from_.tag == "323"
    assert preflight(msg, UA) is None


def test_longreq_long_values() -> None:
    msg = request("longreq")
    assert msg.to.display_name is not None and len(msg.to.display_name) == 103
    assert isinstance(msg.to.uri, SipUri) and msg.to.uri.port == 6000
    assert len(msg.to.uri.params) == 3
    assert msg.from_.tag is not None and len(msg.from_.tag) == 155
    assert len(msg.from_.params) == 3
    assert len(msg.call_id) == 141
    assert len(msg.vias) == 34
    assert msg.vias[0].host == "sip33.example.com" and msg.vias[0].branch is None
    last = msg.vias[-1]
    assert last.received == "192.0.2.5" and len(last.branch or "") == 215
    assert msg.content_length == 150 == len(msg.body)


def test_dblreq_trailing_octets_of_a_datagram_are_ignored() -> None:
    data = load("dblreq")
    msg = parse_message(data)
    assert isinstance(msg, Request) and msg.method == "REGISTER"
    assert msg.body == b""
    assert msg.call_id == "dblreq.0ha0isndaksdj99sdfafnl3lk233412"
    assert b"INVITE" in data and b"INVITE" not in msg.serialize()


def test_semiuri_semicolons_in_the_user_part() -> None:
    msg = request("semiuri")
    assert isinstance(msg.uri, SipUri)
    assert unescape(msg.uri.user or "") == "user;par=u@example.net"
    assert msg.uri.host == "example.com" and msg.uri.params == {}
    assert msg.headers.values("Accept") == [
        "application/sdp",
        "application/pkcs7-mime",
        "multipart/mixed",
        "multipart/signed",
        "message/sip",
        "message/sipfrag",
    ]


def test_transports_unknown_transports_are_kept() -> None:
    msg = request("transports")
    assert [v.transport for v in msg.vias] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]
    assert msg.call_id == "transports.kijh4akdnaqjkwendsasfdj"


def test_mpart01_binary_multipart_body_is_framed_exactly() -> None:
    data = load("mpart01")
    msg = parse_message(data)
    assert msg.content_length == 553 == len(msg.body)
    assert b"\x00" in msg.body and data.endswith(msg.body)
    assert msg.via.rport is None and "rport" in msg.via.params
    assert msg.via.port == 5070


def test_unreason_utf8_reason_phrase() -> None:
    msg = parse("unreason")
    assert isinstance(msg, Response) and msg.status == 200
    assert msg.reason == "= 2**3 * 5**2 но сто девяносто девять - простое"
    assert len(msg.body) == 154


def test_noreason_empty_reason_phrase() -> None:
    msg = parse("noreason")
    assert isinstance(msg, Response) and (msg.status, msg.reason) == (100, "")


# 3.1.2 invalid messages: the status an element answers with, or None for a dropped response.

INVALID = {
    "badinv01": 400,
    "clerr": 400,
    "ncl": 400,
    "scalar02": 400,
    "scalarlg": None,
    "quotbal": 400,
    "ltgtruri": 400,
    "lwsruri": 400,
    "lwsstart": 400,
    "trws": 400,
    "escruri": 400,
    "regbadct": 400,
    "badaspec": 400,
    "baddn": 400,
    "badvers": 505,
    "mismatch01": 400,
    "mismatch02": 501,
    "bigcode": None,
    "insuf": 400,
    "multi01": 400,
    "mcl01": 400,
}


def received(name: str) -> Request:
    """The request as a UA holds it: parsed, or as far as parsing got."""
    try:
        return request(name)
    except ParseError as exc:
        assert isinstance(exc.partial, Request)
        return exc.partial


def answer(name: str) -> Response | None:
    """What a UA answers to a request file (None: the request goes ahead)."""
    try:
        msg = request(name)
        msg.contacts  # noqa: B018 - a UA reads the Contact of what it accepts
    except ParseError as exc:
        assert isinstance(exc.partial, Request)
        return make_response(exc.partial, exc.status)
    except SipError as exc:
        return make_response(msg, exc.status)
    return preflight(msg, UA)


@pytest.mark.parametrize(("name", "status"), sorted(INVALID.items()))
def test_invalid_message_is_rejected_with_the_rfc_status(name: str, status: int | None) -> None:
    if status is None:
        with pytest.raises(ParseError) as caught:
            parse(name)
        assert not isinstance(caught.value.partial, Request), "a bad response is only dropped"
        return
    response = answer(name)
    assert response is not None and response.status == status
    # The answer copies what the request had of Via, Call-ID and CSeq.
    got = received(name).headers
    assert response.headers.get_all("Via") == got.get_all("Via") != []
    assert response.headers.get("CSeq") == got.get("CSeq")
    assert response.headers.get("Call-ID") == got.get("Call-ID")


def test_clerr_on_a_stream_waits_for_the_rest_of_the_body() -> None:
    framer = StreamFramer()
    assert framer.feed(load("clerr")) == []


def test_ncl_on_a_stream_is_unrecoverable() -> None:
    with pytest.raises(SipError):
        StreamFramer().feed(load("ncl"))


def test_mcl01_on_a_stream_is_unrecoverable() -> None:
    with pytest.raises(SipError):
        StreamFramer().feed(load("mcl01"))


def test_baddate_is_accepted_and_the_date_ignored() -> None:
    msg = request("baddate")
    assert msg.headers.get("Date") == "Fri, 01 Jan 2010 16:00:00 EST"
    assert preflight(msg, UA) is None


def test_insuf_answer_carries_only_what_the_request_had() -> None:
    response = answer("insuf")
    assert response is not None and response.status == 400
    assert response.headers.get("CSeq") == "193942 INVITE"
    assert response.headers.get("Via") == "SIP/2.0/UDP 192.0.2.95;branch=z9hG4bKkdj.insuf"
    assert response.headers.get("Call-ID") is None and response.headers.get("To") is None


# 3.2 and 3.4: the transaction layer falls back to RFC 2543 matching.


def test_badbranch_and_inv2543_are_accepted() -> None:
    assert request("badbranch").via.branch == "z9hG4bK"
    msg = request("inv2543")
    assert msg.via.branch is None and msg.max_forwards is None and msg.from_.tag is None
    assert msg.content_length is None and msg.body.startswith(b"v=0")
    assert preflight(msg, UA) is None


# 3.3 application layer


@pytest.mark.parametrize(
    ("name", "status", "header", "value"),
    [
        ("unkscm", 416, None, None),
        ("novelsc", 416, None, None),
        ("unksm2", 405, "Allow", "ACK, BYE, CANCEL, INVITE, MESSAGE, OPTIONS"),
        ("bext01", 420, "Unsupported", "nothingSupportsThis, nothingSupportsThisEither"),
        ("invut", 415, "Accept", "application/sdp, text/plain, multipart/mixed"),
        ("regaut01", 405, "Allow", "ACK, BYE, CANCEL, INVITE, MESSAGE, OPTIONS"),
        ("cparam01", 405, None, None),
        ("cparam02", 405, None, None),
        ("regescrt", 405, None, None),
        ("escnull", 405, None, None),
        ("dblreq", 405, None, None),
        ("sdp01", 406, "Warning", '399 - "no acceptable answer content type"'),
    ],
)
def test_application_layer_answer(
    name: str, status: int, header: str | None, value: str | None
) -> None:
    response = answer(name)
    assert response is not None and response.status == status
    if header is not None:
        assert response.headers.get(header) == value
    to = response.headers.get("To") or ""
    assert ";tag=" in to


def test_unkscm_and_novelsc_uris_parse_opaquely() -> None:
    assert request("unkscm").uri == AbsoluteUri("nobodyknowsthisscheme", "totallyopaquecontent")
    assert request("novelsc").uri == AbsoluteUri("soap.beep", "//192.0.2.103:3002")


def test_unksm2_unknown_schemes_in_headers_parse() -> None:
    msg = request("unksm2")
    assert str(msg.to.uri) == "isbn:2983792873"
    assert str(msg.from_.uri) == "http://www.example.com"
    assert [str(c.uri) for c in msg.contacts] == ["name:John_Smith"]


def test_zeromf_is_processed_by_the_endpoint() -> None:
    msg = request("zeromf")
    assert msg.max_forwards == 0
    assert preflight(msg, UA) is None


def test_cparam_contact_parameters_belong_where_the_brackets_say() -> None:
    [addr_spec] = request("cparam01").contacts
    assert addr_spec.params == {"unknownparam": None}
    assert isinstance(addr_spec.uri, SipUri) and addr_spec.uri.params == {}
    [name_addr] = request("cparam02").contacts
    assert name_addr.params == {}
    assert isinstance(name_addr.uri, SipUri) and name_addr.uri.params == {"unknownparam": None}


def test_regescrt_escaped_header_stays_in_the_contact_uri() -> None:
    [contact] = request("regescrt").contacts
    assert isinstance(contact.uri, SipUri)
    assert contact.uri.headers == (("Route", "%3Csip:sip.example.com%3E"),)


def test_bcast_response_parses_with_both_vias() -> None:
    msg = parse("bcast")
    assert isinstance(msg, Response) and [v.host for v in msg.vias][1] == "255.255.255.255"


def test_stream_framing_of_every_valid_request_back_to_back() -> None:
    names = ["wsinv", "esc01", "longreq", "mpart01", "lwsdisp"]
    stream = b"\r\n\r\n".join(parse(n).serialize() for n in names) + b"\r\n"
    framer = StreamFramer()
    events = [e for i in range(0, len(stream), 97) for e in framer.feed(stream[i : i + 97])]
    messages = [e for e in events if isinstance(e, Message)]
    assert [m.call_id for m in messages] == [parse(n).call_id for n in names]
    assert [m.body for m in messages] == [parse(n).body for n in names]
    assert sum(isinstance(e, Keepalive) for e in events) == len(names)
