"""RFC 3261 §17 transactions, driven by an explicit clock: no sleeping."""

from __future__ import annotations

import itertools

import pytest

from sipis.sip.message import Request, parse_message
from sipis.sip.transaction import (
    ClientNonInviteTransaction,
    ServerInviteTransaction,
    ServerNonInviteTransaction,
    State,
    TimedOut,
    server_key,
)
from sipis.sip.uas import make_response
from sipis.sip.uri import SipUri

T1, T2, T4 = 0.5, 4.0, 5.0


def request(method: str = "REGISTER", branch: str = "z9hG4bKabc") -> Request:
    return Request(
        method,
        SipUri(host="example.com"),
        [
            ("Via", f"SIP/2.0/UDP 192.0.2.1:5060;branch={branch}"),
            ("From", "<sip:a@example.com>;tag=1"),
            ("To", "<sip:a@example.com>"),
            ("Call-ID", "cid"),
            ("CSeq", f"1 {method}"),
            ("Max-Forwards", "70"),
        ],
    )


def run_until(txn: ClientNonInviteTransaction, end: float) -> list[float]:
    """Fire every timer up to ``end``; return when the request was (re)sent."""
    sent: list[float] = []
    now = 0.0
    if txn.outgoing():
        sent.append(now)
    while (deadline := txn.deadline) is not None and deadline <= end:
        now = deadline
        txn.on_timer(now)
        if txn.outgoing():
            sent.append(now)
    return sent


class TestClientNonInvite:
    def test_timer_e_doubles_to_t2_then_timer_f_fires_at_64_t1(self) -> None:
        txn = ClientNonInviteTransaction(request(), 0.0, reliable=False)
        sent = run_until(txn, 31.0)
        assert sent[:6] == [0.0, 0.5, 1.5, 3.5, 7.5, 11.5]
        assert all(b - a == T2 for a, b in itertools.pairwise(sent[4:]))
        assert txn.state is State.TRYING
        assert txn.on_timer(32.0) == TimedOut("timeout")
        assert txn.terminated and txn.deadline is None

    def test_reliable_transport_never_retransmits(self) -> None:
        txn = ClientNonInviteTransaction(request(), 0.0, reliable=True)
        assert run_until(txn, 31.0) == [0.0]
        assert txn.deadline == 64 * T1

    def test_provisional_moves_to_proceeding_and_retransmits_every_t2(self) -> None:
        txn = ClientNonInviteTransaction(request(), 0.0, reliable=False)
        txn.outgoing()
        txn.on_timer(0.5)
        trying = make_response(txn.request, 100)
        assert txn.receive(trying, 0.6) is trying
        assert txn.state is State.PROCEEDING
        assert txn.deadline == pytest.approx(1.5)  # the pending E is not pushed back
        txn.on_timer(1.5)
        assert txn.deadline == pytest.approx(1.5 + T2)

    def test_final_response_completes_then_timer_k(self) -> None:
        txn = ClientNonInviteTransaction(request(), 0.0, reliable=False)
        ok = make_response(txn.request, 200)
        assert txn.receive(ok, 1.0) is ok
        assert txn.state is State.COMPLETED and txn.deadline == 1.0 + T4
        assert txn.receive(ok, 2.0) is None, "a retransmitted final response is absorbed"
        txn.on_timer(1.0 + T4)
        assert txn.terminated

    def test_reliable_completion_is_immediate(self) -> None:
        txn = ClientNonInviteTransaction(request(), 0.0, reliable=True)
        txn.receive(make_response(txn.request, 401), 0.2)
        txn.on_timer(0.2)
        assert txn.terminated

    def test_transport_error_reports_once(self) -> None:
        txn = ClientNonInviteTransaction(request(), 0.0, reliable=True)
        assert txn.transport_failed() == TimedOut("transport error")
        assert txn.transport_failed() is None and txn.terminated

    def test_key_is_branch_and_method(self) -> None:
        txn = ClientNonInviteTransaction(request(branch="z9hG4bKq"), 0.0, reliable=True)
        assert txn.key == ("z9hG4bKq", "REGISTER")


class TestServerNonInvite:
    def test_retransmissions_get_the_last_response_until_timer_j(self) -> None:
        req = request("OPTIONS")
        txn = ServerNonInviteTransaction(req, reliable=False)
        txn.receive_retransmission()
        assert txn.outgoing() == [], "nothing to repeat while trying"
        txn.respond(make_response(req, 100), 0.1)
        assert txn.state is State.PROCEEDING
        ok = make_response(req, 200, to_tag="t")
        txn.respond(ok, 0.2)
        assert txn.outgoing()[-1] == ok.serialize()
        txn.receive_retransmission()
        assert txn.outgoing() == [ok.serialize()]
        txn.respond(make_response(req, 500), 0.3)
        assert txn.outgoing() == [], "a second final response is never sent"
        assert txn.deadline == 0.2 + 64 * T1
        txn.on_timer(txn.deadline)
        assert txn.terminated


class TestServerInvite:
    def test_non_2xx_is_retransmitted_with_timer_g_until_ack(self) -> None:
        req = request("INVITE")
        txn = ServerInviteTransaction(req, reliable=False)
        txn.respond(make_response(req, 100), 0.0)
        txn.respond(make_response(req, 180, to_tag="t"), 0.0)
        txn.receive_retransmission()
        assert txn.outgoing()[-1] == make_response(req, 180, to_tag="t").serialize()
        busy = make_response(req, 486, to_tag="t")
        txn.respond(busy, 1.0)
        txn.outgoing()
        resent = []
        for _ in range(4):
            now = txn.deadline
            assert now is not None
            txn.on_timer(now)
            resent.append(now)
            assert txn.outgoing() == [busy.serialize()]
        assert resent == [1.5, 2.5, 4.5, 8.5]
        assert txn.receive_ack(9.0)
        assert txn.state is State.CONFIRMED and txn.deadline == 9.0 + T4
        txn.receive_retransmission()
        assert txn.outgoing() == [], "retransmitted INVITEs are absorbed once confirmed"
        txn.on_timer(9.0 + T4)
        assert txn.terminated

    def test_timer_h_reports_a_missing_ack(self) -> None:
        req = request("INVITE")
        txn = ServerInviteTransaction(req, reliable=True)
        txn.respond(make_response(req, 480, to_tag="t"), 0.0)
        assert txn.deadline == 64 * T1
        assert txn.on_timer(64 * T1) == TimedOut("no ACK")
        assert txn.terminated

    def test_2xx_enters_accepted_and_absorbs_invite_retransmissions(self) -> None:
        req = request("INVITE")
        txn = ServerInviteTransaction(req, reliable=False)
        ok = make_response(req, 200, to_tag="t")
        txn.respond(ok, 0.0)
        assert txn.state is State.ACCEPTED
        txn.outgoing()
        txn.receive_retransmission()
        assert txn.outgoing() == []
        txn.respond(ok, 1.0)
        assert txn.outgoing() == [ok.serialize()], "2xx retransmissions from the TU go out"
        assert not txn.receive_ack(1.0)
        txn.on_timer(64 * T1)
        assert txn.terminated


class TestMatching:
    def test_server_key_uses_branch_sent_by_and_method(self) -> None:
        invite = request("INVITE", branch="z9hG4bK1")
        ack = request("ACK", branch="z9hG4bK1")
        assert server_key(invite) == server_key(ack)
        assert server_key(invite) != server_key(request("INVITE", branch="z9hG4bK2"))
        assert server_key(invite) != server_key(request("OPTIONS", branch="z9hG4bK1"))

    @pytest.mark.parametrize("branch", ["z9hG4bK", "390skdjuw"])
    def test_rfc2543_fallback_for_branches_without_the_cookie(self, branch: str) -> None:
        one, two = request("OPTIONS", branch=branch), request("OPTIONS", branch=branch)
        assert server_key(one)[0] == "rfc2543"
        assert server_key(one) == server_key(two)
        two.headers.set("CSeq", "2 OPTIONS")
        assert server_key(one) != server_key(two)

    def test_rfc2543_request_without_branch(self) -> None:
        data = (
            b"INVITE sip:UserB@example.com SIP/2.0\r\nVia: SIP/2.0/UDP iftgw.example.com\r\n"
            b"From: <sip:a@example.net>\r\nTo: sip:b@example.net\r\nCall-ID: x\r\n"
            b"CSeq: 56 INVITE\r\n\r\n"
        )
        msg = parse_message(data)
        assert isinstance(msg, Request)
        assert server_key(msg)[0] == "rfc2543"
