"""sipis against sipp playing a misbehaving registrar: 423, 503, endless 401, silence."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from sipis.sip.message import Request, parse_message
from sipis.sip.registration import Backoff, RegistrationState
from sipis.sip.transaction import Timers
from tests.peers.relay import account, running_relay
from tests.peers.sipp import SipMessage, SippServer

pytestmark = pytest.mark.peer


def parsed(message: SipMessage) -> Request:
    request = parse_message(message.text.encode())
    assert isinstance(request, Request)
    return request


def transactions(messages: list[SipMessage]) -> list[int]:
    """The CSeq numbers of the distinct REGISTERs (retransmissions folded)."""
    return sorted({parsed(m).cseq.number for m in messages})


async def test_423_is_answered_with_the_min_expires(
    sipp_registrar: Callable[..., SippServer],
) -> None:
    async with (
        sipp_registrar("reg_423.xml", max_calls=1) as registrar,
        running_relay() as relay,
    ):
        relay.bindings.add("a", account("alice", "pw", registrar.uri, expires=60))
        status = await relay.registered("a")
        first, second = [parsed(m) for m in registrar.received("REGISTER")]
        assert (first.expires, second.expires) == (60, 1800)
        assert second.call_id == first.call_id and second.cseq.number == first.cseq.number + 1
        assert status.registered_until is not None
        assert status.registered_until - asyncio.get_running_loop().time() > 1700


async def test_503_retry_after_is_honoured(sipp_registrar: Callable[..., SippServer]) -> None:
    async with (
        sipp_registrar("reg_503_retry_after.xml", keys={"retry_after": "2"}, max_calls=1) as reg,
        running_relay() as relay,
    ):
        relay.bindings.add("a", account("alice", "pw", reg.uri))
        refused = await relay.wait_for("a", lambda s: s.last_status == 503)
        assert refused.state is RegistrationState.REGISTERING
        now = asyncio.get_running_loop().time()
        assert refused.next_action_at is not None
        assert 1.5 <= refused.next_action_at - now <= 2.0
        await relay.registered("a", timeout=5)
        assert len(transactions(reg.received("REGISTER"))) == 2


async def test_endless_401_ends_in_failed(sipp_registrar: Callable[..., SippServer]) -> None:
    async with (
        sipp_registrar("reg_401_forever.xml", variables={"max_requests": "10"}) as registrar,
        running_relay() as relay,
    ):
        relay.bindings.add("a", account("alice", "wrong", registrar.uri))
        status = await relay.wait_for("a", lambda s: s.state is RegistrationState.FAILED)
        assert status.reason == "authentication failed"
        await asyncio.sleep(2.0)
        assert transactions(registrar.received("REGISTER")) == [1, 2], "no loop"


async def test_silent_registrar_times_out_and_backs_off(
    sipp_registrar: Callable[..., SippServer],
) -> None:
    """Timer F ends the REGISTER; the RFC 5626 backoff (15-30 s) then holds the next one."""
    timers = Timers(t1=0.1, t2=0.8, t4=1.0)
    async with (
        sipp_registrar("reg_silent.xml") as registrar,
        running_relay(timers=timers, backoff=Backoff()) as relay,
    ):
        relay.bindings.add("a", account("alice", "pw", registrar.uri))
        status = await relay.wait_for("a", lambda s: s.failures == 1, timeout=10)
        assert (status.state, status.reason) == (RegistrationState.REGISTERING, "timeout")
        now = asyncio.get_running_loop().time()
        assert status.next_action_at is not None
        assert 15.0 <= status.next_action_at - now <= 30.0
        sent = registrar.received("REGISTER")
        assert transactions(sent) == [1], "one transaction, retransmitted"
        # Timer E: T1, 2T1, 4T1, then T2 for the rest of Timer F's 64*T1.
        assert 8 <= len(sent) <= 12
        await asyncio.sleep(1.0)
        assert len(registrar.received("REGISTER")) == len(sent), "nothing sent while backing off"
