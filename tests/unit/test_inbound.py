"""What the SIP endpoint answers to requests it receives."""

from __future__ import annotations

import pytest

from sipis.inbound import answer
from sipis.sip.message import ParseError, Request, parse_message


def request(method: str, extra: str = "", cseq_method: str | None = None) -> bytes:
    return (
        f"{method} sip:c0ffee@192.0.2.50:5070 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bKq\r\n"
        "From: <sip:bob@example.com>;tag=9\r\nTo: <sip:alice@example.com>\r\n"
        f"Call-ID: x1\r\nCSeq: 5 {cseq_method or method}\r\nMax-Forwards: 70\r\n{extra}"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def answer_to(data: bytes) -> tuple[int, dict[str, str | None]] | None:
    try:
        msg: Request | ParseError = parse_message(data)  # type: ignore[assignment]
    except ParseError as exc:
        msg = exc
    response = answer(msg)
    if response is None:
        return None
    return response.status, {n: response.headers.get(n) for n in ("Allow", "To")}


def test_options_ping_gets_200_with_allow() -> None:
    result = answer_to(request("OPTIONS"))
    assert result is not None
    status, headers = result
    assert status == 200
    assert headers["Allow"] == "ACK, BYE, CANCEL, INVITE, MESSAGE, OPTIONS"
    assert ";tag=" in (headers["To"] or "")


@pytest.mark.parametrize(("method", "status"), [("INVITE", 480), ("MESSAGE", 480), ("BYE", 481)])
def test_calls_and_messages_are_unavailable_for_now(method: str, status: int) -> None:
    result = answer_to(request(method))
    assert result is not None
    assert result[0] == status


@pytest.mark.parametrize("method", ["BYE", "UPDATE", "INFO", "PRACK", "INVITE", "FROB"])
def test_any_request_in_a_dialog_nobody_holds_gets_481(method: str) -> None:
    data = request(method).replace(
        b"To: <sip:alice@example.com>", b"To: <sip:alice@example.com>;tag=gone"
    )
    result = answer_to(data)
    assert result is not None and result[0] == 481


def test_ack_is_never_answered() -> None:
    assert answer_to(request("ACK")) is None


def test_register_is_not_allowed_here() -> None:
    result = answer_to(request("REGISTER"))
    assert result is not None and result[0] == 405


def test_malformed_request_gets_its_status_and_unknown_method_an_allow() -> None:
    bad = answer_to(request("INVITE", cseq_method="BYE"))
    assert bad is not None and bad[0] == 400
    unknown = answer_to(request("FROB", cseq_method="INVITE"))
    assert unknown is not None and unknown[0] == 501 and unknown[1]["Allow"] is not None


def test_malformed_response_is_dropped() -> None:
    assert answer_to(b"SIP/2.0 200 OK\r\nVia: x\r\n\r\n") is None
