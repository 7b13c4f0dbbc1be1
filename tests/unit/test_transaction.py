"""RFC 3261 §17 transactions, driven by an explicit clock: no sleeping."""

from __future__ import annotations

import itertools

import pytest

from sipis.sip.message import Request, Response, parse_message
from sipis.sip.transaction import (
    ClientInviteTransaction,
    ClientNonInviteTransaction,
    ServerInviteTransaction,
    ServerNonInviteTransaction,
    State,
    TimedOut,
    Timers,
    ack_for_failure,
    cancel_for,
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


def run_until(txn: ClientNonInviteTransaction | ClientInviteTransaction, end: float) -> list[float]:
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


def routed_invite() -> Request:
    """An INVITE as a UAC sends it through an outbound proxy, with an offer."""
    return Request(
        "INVITE",
        SipUri(host="198.51.100.7", user="bob", port=5070, params={"transport": "udp"}),
        [
            ("Via", "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKinv1;rport"),
            ("Via", "SIP/2.0/UDP 192.0.2.9:5060;branch=z9hG4bKupstream"),
            ("Route", "<sip:proxy1.example.com;lr>"),
            ("Route", "<sip:proxy2.example.com;lr>"),
            ("Max-Forwards", "69"),
            ("From", '"Alice" <sip:alice@example.com>;tag=from1'),
            ("To", "<sip:bob@example.com>"),
            ("Call-ID", "call-1@192.0.2.1"),
            ("CSeq", "314 INVITE"),
            ("Contact", "<sip:alice@192.0.2.1:5060>"),
            ("Content-Type", "application/sdp"),
        ],
        b"v=0\r\n",
    )


def reparsed(message: Request) -> Request:
    parsed = parse_message(message.serialize())
    assert isinstance(parsed, Request)
    return parsed


def sent_ack(txn: ClientInviteTransaction) -> Request:
    (ack_bytes,) = txn.outgoing()
    ack = parse_message(ack_bytes)
    assert isinstance(ack, Request)
    return ack


class TestClientInvite:
    def test_timer_a_doubles_without_a_cap_until_timer_b_fires_at_64_t1(self) -> None:
        txn = ClientInviteTransaction(request("INVITE"), 0.0, reliable=False)
        assert txn.state is State.CALLING
        sent = run_until(txn, 31.9)
        assert sent == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
        assert txn.deadline == 64 * T1
        assert txn.on_timer(64 * T1) == TimedOut("timeout")
        assert txn.outgoing() == []
        assert txn.terminated and txn.deadline is None

    def test_every_retransmission_is_the_invite_itself(self) -> None:
        invite = request("INVITE")
        txn = ClientInviteTransaction(invite, 0.0, reliable=False)
        assert txn.outgoing() == [invite.serialize()]
        txn.on_timer(0.5)
        assert txn.outgoing() == [invite.serialize()]
        assert txn.request is invite

    def test_timer_b_wins_over_a_late_timer_a(self) -> None:
        txn = ClientInviteTransaction(request("INVITE"), 0.0, reliable=False)
        txn.outgoing()
        assert txn.on_timer(40.0) == TimedOut("timeout")
        assert txn.outgoing() == [], "a timed-out INVITE is not sent again"

    def test_reliable_transport_never_retransmits(self) -> None:
        txn = ClientInviteTransaction(request("INVITE"), 0.0, reliable=True)
        assert run_until(txn, 31.9) == [0.0]
        assert txn.deadline == 64 * T1
        assert txn.on_timer(64 * T1) == TimedOut("timeout")

    def test_provisional_moves_to_proceeding_and_stops_timers_a_and_b(self) -> None:
        txn = ClientInviteTransaction(request("INVITE"), 0.0, reliable=False)
        txn.outgoing()
        txn.on_timer(0.5)
        txn.outgoing()
        trying = make_response(txn.request, 100)
        assert txn.receive(trying, 0.6) is trying
        assert txn.state is State.PROCEEDING
        assert txn.deadline is None
        ringing = make_response(txn.request, 180, to_tag="t")
        assert txn.receive(ringing, 1.0) is ringing, "every provisional goes to the TU"
        assert txn.state is State.PROCEEDING
        assert txn.on_timer(64 * T1) is None, "timer B only runs in Calling"
        assert txn.outgoing() == []
        assert txn.state is State.PROCEEDING

    @pytest.mark.parametrize("provisional", [False, True])
    def test_failure_is_acked_by_the_transaction_then_timer_d(self, provisional: bool) -> None:
        txn = ClientInviteTransaction(request("INVITE"), 0.0, reliable=False)
        txn.outgoing()
        if provisional:
            txn.receive(make_response(txn.request, 180, to_tag="t"), 0.2)
        busy = make_response(txn.request, 486, to_tag="t")
        assert txn.receive(busy, 1.0) is busy
        assert txn.state is State.COMPLETED
        ack = sent_ack(txn)
        assert ack.method == "ACK" and ack.cseq.method == "ACK"
        assert ack.to.tag == "t"
        assert ack.via.branch == "z9hG4bKabc"
        assert txn.deadline == 1.0 + 32.0, "timer D replaces timers A and B"
        assert txn.on_timer(20.0) is None and txn.state is State.COMPLETED
        txn.on_timer(33.0)
        assert txn.terminated and txn.deadline is None

    def test_a_retransmitted_failure_resends_the_same_ack_and_is_not_passed_up(self) -> None:
        txn = ClientInviteTransaction(request("INVITE"), 0.0, reliable=False)
        txn.outgoing()
        busy = make_response(txn.request, 486, to_tag="t")
        txn.receive(busy, 1.0)
        first = txn.outgoing()
        assert len(first) == 1
        assert txn.receive(busy, 2.0) is None
        assert txn.outgoing() == first
        assert txn.receive(busy, 3.0) is None
        assert txn.outgoing() == first
        assert txn.deadline == 1.0 + 32.0, "retransmissions do not restart timer D"

    def test_the_ack_sent_is_the_one_ack_for_failure_builds(self) -> None:
        invite = routed_invite()
        txn = ClientInviteTransaction(invite, 0.0, reliable=True)
        txn.outgoing()
        response = make_response(invite, 503, to_tag="u")
        txn.receive(response, 0.1)
        assert txn.outgoing() == [ack_for_failure(invite, response).serialize()]

    def test_responses_after_a_failure_are_absorbed_without_an_ack(self) -> None:
        txn = ClientInviteTransaction(request("INVITE"), 0.0, reliable=False)
        txn.receive(make_response(txn.request, 404, to_tag="t"), 1.0)
        txn.outgoing()
        assert txn.receive(make_response(txn.request, 180, to_tag="t"), 2.0) is None
        assert txn.receive(make_response(txn.request, 200, to_tag="t"), 2.0) is None
        assert txn.outgoing() == []
        assert txn.state is State.COMPLETED

    def test_reliable_failure_still_sends_an_ack_and_ends_at_once(self) -> None:
        txn = ClientInviteTransaction(request("INVITE"), 0.0, reliable=True)
        txn.outgoing()
        txn.receive(make_response(txn.request, 603, to_tag="t"), 2.0)
        assert sent_ack(txn).method == "ACK"
        assert txn.deadline == 2.0
        txn.on_timer(2.0)
        assert txn.terminated

    def test_timers_follow_the_configured_values(self) -> None:
        timers = Timers(t1=0.05, t2=0.4, t4=0.5, d=1.5)
        failed = ClientInviteTransaction(request("INVITE"), 0.0, reliable=False, timers=timers)
        assert failed.deadline == 0.05
        failed.receive(make_response(failed.request, 486, to_tag="t"), 0.2)
        assert failed.deadline == 0.2 + 1.5
        accepted = ClientInviteTransaction(request("INVITE"), 0.0, reliable=True, timers=timers)
        assert accepted.deadline == pytest.approx(64 * 0.05)
        accepted.receive(make_response(accepted.request, 200, to_tag="a"), 0.2)
        assert accepted.deadline == pytest.approx(0.2 + 64 * 0.05)

    @pytest.mark.parametrize("provisional", [False, True])
    def test_2xx_enters_accepted_and_sends_no_ack(self, provisional: bool) -> None:
        txn = ClientInviteTransaction(request("INVITE"), 0.0, reliable=False)
        txn.outgoing()
        if provisional:
            txn.receive(make_response(txn.request, 183, to_tag="a"), 0.3)
        ok = make_response(txn.request, 200, to_tag="a")
        assert txn.receive(ok, 1.0) is ok
        assert txn.state is State.ACCEPTED
        assert txn.outgoing() == [], "the TU ACKs a 2xx"
        assert txn.deadline == 1.0 + 64 * T1, "timer M replaces timers A and B"

    def test_accepted_passes_every_2xx_until_timer_m(self) -> None:
        txn = ClientInviteTransaction(request("INVITE"), 0.0, reliable=False)
        ok = make_response(txn.request, 200, to_tag="a")
        txn.receive(ok, 1.0)
        txn.outgoing()
        assert txn.receive(ok, 1.5) is ok, "a retransmitted 2xx goes to the TU"
        forked = make_response(txn.request, 200, to_tag="b")
        assert txn.receive(forked, 2.0) is forked, "a 2xx from another fork goes to the TU"
        assert txn.receive(make_response(txn.request, 180, to_tag="c"), 2.0) is None
        assert txn.receive(make_response(txn.request, 486, to_tag="c"), 2.0) is None
        assert txn.outgoing() == []
        assert txn.state is State.ACCEPTED
        assert txn.on_timer(1.0 + 64 * T1) is None
        assert txn.terminated and txn.deadline is None
        assert txn.receive(ok, 40.0) is None

    @pytest.mark.parametrize("provisional", [False, True])
    def test_transport_error_while_waiting_reports_once(self, provisional: bool) -> None:
        txn = ClientInviteTransaction(request("INVITE"), 0.0, reliable=False)
        if provisional:
            txn.receive(make_response(txn.request, 100), 0.1)
        assert txn.transport_failed() == TimedOut("transport error")
        assert txn.terminated and txn.deadline is None
        assert txn.transport_failed() is None

    def test_transport_error_sending_the_ack_ends_quietly(self) -> None:
        txn = ClientInviteTransaction(request("INVITE"), 0.0, reliable=False)
        txn.receive(make_response(txn.request, 486, to_tag="t"), 1.0)
        assert txn.transport_failed() is None
        assert txn.terminated and txn.deadline is None

    def test_transport_error_in_accepted_changes_nothing(self) -> None:
        txn = ClientInviteTransaction(request("INVITE"), 0.0, reliable=False)
        txn.receive(make_response(txn.request, 200, to_tag="a"), 1.0)
        assert txn.transport_failed() is None
        assert txn.state is State.ACCEPTED and txn.deadline == 1.0 + 64 * T1

    def test_key_is_branch_and_invite(self) -> None:
        txn = ClientInviteTransaction(request("INVITE", branch="z9hG4bKq"), 0.0, reliable=True)
        assert txn.key == ("z9hG4bKq", "INVITE")


class TestInviteRequestBuilders:
    def test_ack_for_failure_headers(self) -> None:
        invite = routed_invite()
        response: Response = make_response(invite, 486, to_tag="callee9")
        ack = reparsed(ack_for_failure(invite, response))
        assert ack.method == "ACK"
        assert str(ack.uri) == "sip:bob@198.51.100.7:5070;transport=udp"
        assert list(ack.headers) == [
            ("Via", "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKinv1;rport"),
            ("Route", "<sip:proxy1.example.com;lr>"),
            ("Route", "<sip:proxy2.example.com;lr>"),
            ("Max-Forwards", "70"),
            ("From", '"Alice" <sip:alice@example.com>;tag=from1'),
            ("To", "<sip:bob@example.com>;tag=callee9"),
            ("Call-ID", "call-1@192.0.2.1"),
            ("CSeq", "314 ACK"),
            ("Content-Length", "0"),
        ]
        assert ack.body == b""

    def test_ack_takes_to_from_the_response_not_the_invite(self) -> None:
        invite = routed_invite()
        one = ack_for_failure(invite, make_response(invite, 480, to_tag="x"))
        two = ack_for_failure(invite, make_response(invite, 480, to_tag="y"))
        assert (one.to.tag, two.to.tag) == ("x", "y")

    def test_cancel_for_headers(self) -> None:
        invite = routed_invite()
        cancel = reparsed(cancel_for(invite))
        assert cancel.method == "CANCEL"
        assert str(cancel.uri) == str(invite.uri)
        assert list(cancel.headers) == [
            ("Via", "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKinv1;rport"),
            ("Route", "<sip:proxy1.example.com;lr>"),
            ("Route", "<sip:proxy2.example.com;lr>"),
            ("Max-Forwards", "70"),
            ("From", '"Alice" <sip:alice@example.com>;tag=from1'),
            ("To", "<sip:bob@example.com>"),
            ("Call-ID", "call-1@192.0.2.1"),
            ("CSeq", "314 CANCEL"),
            ("Content-Length", "0"),
        ]
        assert cancel.body == b""

    def test_cancel_matches_the_invite_at_the_server_but_not_at_the_client(self) -> None:
        invite = routed_invite()
        cancel = cancel_for(invite)
        assert cancel.via.branch == invite.via.branch == "z9hG4bKinv1"
        assert server_key(cancel, "INVITE") == server_key(invite)
        cancel_txn = ClientNonInviteTransaction(cancel, 0.0, reliable=True)
        invite_txn = ClientInviteTransaction(invite, 0.0, reliable=True)
        assert cancel_txn.key == ("z9hG4bKinv1", "CANCEL")
        assert cancel_txn.key != invite_txn.key

    def test_builders_without_routes_carry_none(self) -> None:
        invite = request("INVITE")
        assert "Route" not in reparsed(cancel_for(invite)).headers
        ack = ack_for_failure(invite, make_response(invite, 486, to_tag="t"))
        assert "Route" not in reparsed(ack).headers
