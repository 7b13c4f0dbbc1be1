"""Proxy helpers: Route processing, forwarding, responses, requests within a dialog."""

from __future__ import annotations

import pytest

from sipis.sip.headers import NameAddr, Via, parse_name_addr
from sipis.sip.message import Request, Response, parse_message
from sipis.sip.proxy import (
    TooManyHops,
    forwarded,
    forwarded_response,
    in_dialog_request,
    next_hop,
    own_routes_removed,
    route_uri,
)
from sipis.sip.uri import SipUri, parse_sip_uri

INVITE = (
    b"INVITE sip:c0ntact@192.0.2.10:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKkam,"
    b" SIP/2.0/UDP 192.0.2.99:5090;branch=z9hG4bKcaller\r\n"
    b"Record-Route: <sip:192.0.2.1;lr>\r\n"
    b"Max-Forwards: 69\r\n"
    b'From: "Bob" <sip:bob@example.test>;tag=caller\r\n'
    b"To: <sip:alice@example.test>\r\n"
    b"Call-ID: call-1\r\n"
    b"CSeq: 7 INVITE\r\n"
    b"Contact: <sip:bob@192.0.2.99:5090>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 4\r\n\r\n"
    b"v=0\n"
)

OURS = {("relay.test", 5061), ("192.0.2.10", 5060)}


def is_own(uri: SipUri) -> bool:
    return (uri.host, uri.port) in OURS


def invite() -> Request:
    request = parse_message(INVITE)
    assert isinstance(request, Request)
    return request


def test_forwarding_adds_via_and_double_record_route_and_keeps_the_rest() -> None:
    app = parse_sip_uri("sip:app@10.0.0.5:40000;transport=tls")
    out = forwarded(
        invite(),
        via=Via("TLS", "relay.test", 5061, {"branch": "z9hG4bKrelay", "rport": None}),
        target=app,
        record_route=[
            route_uri("relay.test", 5061, "TLS"),
            route_uri("192.0.2.10", 5060, "UDP"),
        ],
        headers=[("Sipis-Account", "work")],
    )
    wire = parse_message(out.serialize())
    assert isinstance(wire, Request)
    assert str(wire.uri) == "sip:app@10.0.0.5:40000;transport=tls"
    assert wire.headers.values("Via") == [
        "SIP/2.0/TLS relay.test:5061;branch=z9hG4bKrelay;rport",
        "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKkam",
        "SIP/2.0/UDP 192.0.2.99:5090;branch=z9hG4bKcaller",
    ]
    assert wire.headers.values("Record-Route") == [
        "<sip:rr@relay.test:5061;transport=tls;lr>",
        "<sip:rr@192.0.2.10:5060;transport=udp;lr>",
        "<sip:192.0.2.1;lr>",
    ]
    assert wire.max_forwards == 68
    assert wire.headers.get("Sipis-Account") == "work"
    assert (wire.from_.tag, wire.call_id, wire.cseq, wire.body) == (
        "caller",
        "call-1",
        (7, "INVITE"),
        b"v=0\n",
    )
    # the original is untouched
    original = invite()
    assert original.max_forwards == 69 and len(original.vias) == 2


def test_no_hops_left_is_483() -> None:
    request = invite()
    request.headers.set("Max-Forwards", "0")
    with pytest.raises(TooManyHops) as raised:
        forwarded(request, via=Via("UDP", "relay.test", 5060, {"branch": "z9hG4bKx"}))
    assert raised.value.status == 483


def test_own_routes_come_off_the_top_only() -> None:
    request = invite()
    request.headers.add("Route", "<sip:192.0.2.10:5060;transport=udp;lr>, <sip:relay.test:5061;lr>")
    request.headers.add("Route", "<sip:192.0.2.1;lr>")
    own_routes_removed(request, is_own)
    assert request.headers.values("Route") == ["<sip:192.0.2.1;lr>"]
    assert str(next_hop(request)) == "sip:192.0.2.1;lr"
    request.headers.remove("Route")
    assert str(next_hop(request)) == "sip:c0ntact@192.0.2.10:5060"


def test_a_strict_router_request_gets_its_request_uri_back() -> None:
    request = invite()
    request.uri = parse_sip_uri("sip:rr@relay.test:5061")
    request.headers.add("Route", "<sip:192.0.2.1;lr>")
    request.headers.add("Route", "<sip:app@10.0.0.5:40000>")
    own_routes_removed(request, is_own)
    assert str(request.uri) == "sip:app@10.0.0.5:40000"
    assert request.headers.values("Route") == ["<sip:192.0.2.1;lr>"]


def test_a_forwarded_response_loses_the_top_via() -> None:
    response = Response(
        180,
        "Ringing",
        [
            ("Via", "SIP/2.0/TLS relay.test:5061;branch=z9hG4bKrelay"),
            ("Via", "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKkam"),
            ("To", "<sip:alice@example.test>;tag=app"),
        ],
    )
    out = forwarded_response(response)
    assert out.headers.values("Via") == ["SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKkam"]
    assert len(response.vias) == 2 and out.to.tag == "app"


def test_in_dialog_request_with_a_loose_route_set() -> None:
    request = in_dialog_request(
        "BYE",
        call_id="call-1",
        local=parse_name_addr("<sip:alice@example.test>;tag=app"),
        remote=parse_name_addr('"Bob" <sip:bob@example.test>;tag=caller'),
        remote_target=parse_sip_uri("sip:bob@192.0.2.99:5090"),
        route_set=[parse_name_addr("<sip:192.0.2.1;lr>")],
        cseq=3,
        via=Via("UDP", "192.0.2.10", 5060, {"branch": "z9hG4bKbye"}),
    )
    wire = parse_message(request.serialize())
    assert isinstance(wire, Request)
    assert (wire.method, str(wire.uri)) == ("BYE", "sip:bob@192.0.2.99:5090")
    assert wire.headers.values("Route") == ["<sip:192.0.2.1;lr>"]
    assert (wire.from_.tag, wire.to.tag, wire.cseq) == ("app", "caller", (3, "BYE"))


def test_in_dialog_request_through_a_strict_router() -> None:
    request = in_dialog_request(
        "BYE",
        call_id="call-1",
        local=NameAddr(parse_sip_uri("sip:alice@example.test"), params={"tag": "app"}),
        remote=NameAddr(parse_sip_uri("sip:bob@example.test"), params={"tag": "caller"}),
        remote_target=parse_sip_uri("sip:bob@192.0.2.99:5090"),
        route_set=[parse_name_addr("<sip:192.0.2.1>"), parse_name_addr("<sip:192.0.2.2;lr>")],
        cseq=1,
        via=Via("UDP", "192.0.2.10", 5060, {"branch": "z9hG4bKbye"}),
    )
    assert str(request.uri) == "sip:192.0.2.1"
    assert request.headers.values("Route") == ["<sip:192.0.2.2;lr>", "<sip:bob@192.0.2.99:5090>"]
    assert isinstance(request.uri, SipUri)
