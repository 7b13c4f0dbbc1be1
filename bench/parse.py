"""Parse and serialize throughput of typical SIP messages on one core.

    python bench/parse.py [--seconds 2]

"parse" is what the receive path does with every message: framing, start
line, header split and validation of Via, CSeq, Call-ID, From, To,
Max-Forwards and Content-Length.  "parse+fields" then reads what a
transaction and dialog layer use (top Via branch, tags, CSeq, Contact).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from sipis.sip.message import Message, parse_message

INVITE = (
    b"INVITE sip:c0ffee1234@192.0.2.50:5070;transport=udp SIP/2.0\r\n"
    b"Record-Route: <sip:192.0.2.10;lr;ftag=1928301774>\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bKcydzigwkX\r\n"
    b"Via: SIP/2.0/UDP 198.51.100.7:5060;received=198.51.100.7;rport=5060;"
    b"branch=z9hG4bK776asdhds\r\n"
    b"Max-Forwards: 69\r\n"
    b"To: Bob <sip:bob@example.com>\r\n"
    b'From: "Alice Liddell" <sip:alice@example.org>;tag=1928301774\r\n'
    b"Call-ID: a84b4c76e66710@pc33.example.org\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:alice@198.51.100.7:5060>\r\n"
    b"Allow: INVITE, ACK, CANCEL, OPTIONS, BYE, REFER, NOTIFY, MESSAGE, UPDATE\r\n"
    b"Supported: replaces, timer, 100rel\r\n"
    b"User-Agent: Example Phone 4.2\r\n"
    b"Content-Type: application/sdp\r\n"
)
SDP = (
    b"v=0\r\no=alice 2890844526 2890844526 IN IP4 198.51.100.7\r\ns=-\r\n"
    b"c=IN IP4 198.51.100.7\r\nt=0 0\r\nm=audio 49172 RTP/AVP 0 8\r\n"
    b"a=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
)
INVITE += b"Content-Length: %d\r\n\r\n" % len(SDP) + SDP
REGISTER = (
    b"REGISTER sip:example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.50:5070;rport;branch=z9hG4bK5d6fe1a2b3c4d5e6\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: <sip:alice@example.com>;tag=a73kszlfl\r\n"
    b"To: <sip:alice@example.com>\r\n"
    b"Call-ID: 1j9FpLxk3uxtm8tn@192.0.2.50\r\n"
    b"CSeq: 7 REGISTER\r\n"
    b'Contact: <sip:c0ffee1234@192.0.2.50:5070>;+sip.instance="<urn:uuid:00000000-0000-1000-'
    b'8000-000A95A0E128>";reg-id=1\r\n'
    b"Expires: 600\r\n"
    b"Supported: path, outbound\r\n"
    b"User-Agent: sipis\r\n"
    b'Authorization: Digest username="alice", realm="example.com", nonce="ZWQ0ZjE5MzQ", '
    b'uri="sip:example.com", response="6629fae49393a05397450978507c4ef1", algorithm=MD5, '
    b'cnonce="0a4f113b", nc=00000002, qop=auth\r\n'
    b"Content-Length: 0\r\n\r\n"
)
UNAUTHORIZED = (
    b"SIP/2.0 401 Unauthorized\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.50:5070;rport=5070;branch=z9hG4bK5d6fe1a2b3c4d5e6;"
    b"received=192.0.2.50\r\n"
    b"From: <sip:alice@example.com>;tag=a73kszlfl\r\n"
    b"To: <sip:alice@example.com>;tag=b27e1a1d33761e85846fc98f5f3a7e58.8d7a\r\n"
    b"Call-ID: 1j9FpLxk3uxtm8tn@192.0.2.50\r\n"
    b"CSeq: 7 REGISTER\r\n"
    b'WWW-Authenticate: Digest realm="example.com", nonce="ZWQ0ZjE5MzQ", qop="auth", '
    b"algorithm=SHA-256\r\n"
    b'WWW-Authenticate: Digest realm="example.com", nonce="ZWQ0ZjE5MzQ", qop="auth", '
    b"algorithm=MD5\r\n"
    b"Server: kamailio (5.6.3 (x86_64/linux))\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def read_fields(msg: Message) -> None:
    _ = (msg.via.branch, msg.from_.tag, msg.to.tag, msg.cseq, msg.call_id, msg.contacts)


def rate(work: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``work``, measured over about ``seconds``."""
    batch = 1000
    done = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(batch):
            work()
        done += batch
    return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    print(f"{'message':<14}{'parse/s':>12}{'parse+fields/s':>17}{'serialize/s':>14}{'bytes':>8}")
    for name, data in (("INVITE", INVITE), ("REGISTER", REGISTER), ("401", UNAUTHORIZED)):
        parsed = parse_message(data)
        assert parsed.serialize() == data, name

        def parse_only(data: bytes = data) -> None:
            parse_message(data)

        def parse_and_read(data: bytes = data) -> None:
            read_fields(parse_message(data))

        p = rate(parse_only, args.seconds)
        pf = rate(parse_and_read, args.seconds)
        s = rate(parsed.serialize, args.seconds)
        print(f"{name:<14}{p:>12,.0f}{pf:>17,.0f}{s:>14,.0f}{len(data):>8}")


if __name__ == "__main__":
    main()
