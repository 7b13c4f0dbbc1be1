"""Client transactions over a flow: matching, failure reports, CANCEL timing and Timer C."""

from __future__ import annotations

import asyncio
import gc
import weakref

from sipis.client_transactions import ClientTransactions
from sipis.sip.message import Request, Response, parse_message
from sipis.sip.registration import LocalAddress
from sipis.sip.transaction import TimedOut, Timers
from sipis.sip.uas import make_response
from sipis.transport.flow import Flow, FlowClosed

TIMERS = Timers(t1=0.02, t2=0.08, t4=0.1, d=0.1)


class RecordingFlow(Flow):
    """A reliable flow that keeps what is sent over it."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        super().__init__()
        self.local = LocalAddress("tcp", "127.0.0.1", 5062)
        self.remote = ("127.0.0.1", 40000)
        self.server_name = None
        self.sent: list[Request] = []

    def send(self, data: bytes) -> None:
        if not self.alive:
            raise FlowClosed(repr(self))
        message = parse_message(data, datagram=False)
        assert isinstance(message, Request)
        self.sent.append(message)

    def methods(self) -> list[str]:
        return [r.method for r in self.sent]


def invite(branch: str = "z9hG4bKinv1") -> Request:
    message = parse_message(
        (
            "INVITE sip:app@10.0.0.5 SIP/2.0\r\n"
            f"Via: SIP/2.0/TCP 127.0.0.1:5062;branch={branch}\r\n"
            "From: <sip:bob@example.test>;tag=caller\r\nTo: <sip:alice@example.test>\r\n"
            "Call-ID: c1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
            "Contact: <sip:bob@127.0.0.1>\r\nContent-Length: 0\r\n\r\n"
        ).encode()
    )
    assert isinstance(message, Request)
    return message


def answer(request: Request, status: int) -> Response:
    return make_response(request, status, to_tag="app")


async def test_responses_go_to_their_transaction_and_failures_are_told_once() -> None:
    clients = ClientTransactions(timers=TIMERS)
    flow = RecordingFlow()
    seen: list[int] = []
    failures: list[TimedOut] = []
    entry = clients.send(invite(), flow, lambda r: seen.append(r.status), failures.append)
    other = answer(invite("z9hG4bKother"), 180)
    assert not clients.receive(other)  # another branch: not this transaction's
    assert clients.receive(answer(entry.request, 180))
    assert clients.receive(answer(entry.request, 486))
    assert seen == [180, 486] and failures == []
    assert flow.methods() == ["INVITE", "ACK"]  # the non-2xx is ACKed by the transaction
    closed = RecordingFlow()
    closed.close()
    clients.send(invite("z9hG4bKdead"), closed, seen.append, failures.append)
    assert [f.reason for f in failures] == ["transport error"]
    clients.close()


async def test_cancel_waits_for_a_provisional_response() -> None:
    clients = ClientTransactions(timers=TIMERS)
    flow = RecordingFlow()
    entry = clients.send(invite(), flow, lambda r: None)
    clients.cancel(entry)
    assert flow.methods() == ["INVITE"]  # RFC 3261 §9.1: nothing to cancel yet
    clients.receive(answer(entry.request, 100))
    assert flow.methods() == ["INVITE", "CANCEL"]
    cancel = flow.sent[1]
    assert cancel.via.branch == "z9hG4bKinv1" and cancel.cseq == (1, "CANCEL")
    clients.cancel(entry)
    clients.receive(answer(entry.request, 180))
    assert flow.methods() == ["INVITE", "CANCEL"]  # once
    clients.close()


async def test_an_invite_without_an_answer_to_its_cancel_is_given_up() -> None:
    clients = ClientTransactions(timers=TIMERS)
    flow = RecordingFlow()
    failures: list[TimedOut] = []
    entry = clients.send(invite(), flow, lambda r: None, failures.append)
    clients.receive(answer(entry.request, 180))
    clients.cancel(entry)
    await asyncio.sleep(64 * TIMERS.t1 + 0.3)
    assert [f.reason for f in failures] == ["no answer to the CANCEL"]
    assert len(clients) == 0
    assert not clients.receive(answer(entry.request, 487))  # forgotten
    clients.close()


async def test_timer_c_cancels_a_ringing_invite_and_restarts_on_provisionals() -> None:
    clients = ClientTransactions(timers=TIMERS)
    flow = RecordingFlow()
    entry = clients.send(invite(), flow, lambda r: None, timer_c=0.3)
    clients.receive(answer(entry.request, 180))
    await asyncio.sleep(0.2)
    clients.receive(answer(entry.request, 180))  # Timer C starts again
    await asyncio.sleep(0.2)
    assert flow.methods() == ["INVITE"]
    await asyncio.sleep(0.25)
    assert flow.methods() == ["INVITE", "CANCEL"]
    clients.receive(answer(entry.request, 487))
    assert flow.methods() == ["INVITE", "CANCEL", "ACK"]
    clients.close()


async def test_a_final_answer_stops_timer_c() -> None:
    clients = ClientTransactions(timers=TIMERS)
    flow = RecordingFlow()
    entry = clients.send(invite(), flow, lambda r: None, timer_c=0.1)
    clients.receive(answer(entry.request, 180))
    clients.receive(answer(entry.request, 200))
    await asyncio.sleep(0.2)
    assert flow.methods() == ["INVITE"]
    clients.close()


async def test_a_finished_transaction_lets_go_of_its_sender() -> None:
    """What a callback refers to is freed by reference counting once the transaction ends."""

    class Sender:
        def __init__(self) -> None:
            self.client: object = None

        def answered(self, response: Response) -> None:
            return None

    clients = ClientTransactions(timers=TIMERS)
    flow = RecordingFlow()
    sender = Sender()
    sender.client = clients.send(invite(), flow, sender.answered)  # a cycle while it lives
    gone = weakref.ref(sender)
    clients.receive(answer(invite(), 486))
    await asyncio.sleep(0.05)  # Timer D is 0 on a reliable flow
    assert len(clients) == 0
    gc.disable()
    try:
        del sender
        assert gone() is None
    finally:
        gc.enable()
    clients.close()
