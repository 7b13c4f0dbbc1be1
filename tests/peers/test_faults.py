"""Registrations through registrar faults, against real peers, with the REGISTERs counted there.

Each test puts a binding through one fault and checks three things: the
state sipis/sip/registration.py documents for that fault, that the peer saw
no more REGISTERs (or connection attempts, or DNS questions) than the
backoff allows, and that the binding registers again once the fault clears.

The backoff (RFC 5626 §4.5, as the registration module implements it):
after the n-th failure in a row the next attempt waits
``min(cap, base * 2**(n-1))`` scaled by a random 50-100 %, where ``base`` is
``BACKOFF.no_flow`` when no answer came (timeout, no connection, no DNS
answer) and ``BACKOFF.flow_up`` when the registrar answered 5xx; a
Retry-After replaces it, capped alike.  ``most_attempts`` turns a window
into the most attempts that schedule lets start in it (every wait at its
shortest), ``fewest_attempts`` into the fewest (every wait at its longest,
plus ``SLACK``), so the bounds follow from ``BACKOFF`` and ``TIMERS``.

While a fault lasts, a binding that was never registered, or whose
registration has run out, is REGISTERING with ``failures`` counting the
failed attempts and ``reason`` saying why; one whose registration still
runs stays REGISTERED until it ends.  Only a refusal that retrying cannot
mend (403, a wrong password, ...) makes it FAILED: none of these faults is
one.

A registrar restarted with its location table lost is covered by
test_registration_kamailio.py (``test_kamailio_restart_is_survived``,
``test_connection_loss_reregisters_at_once``), and a silent registrar by
test_registration_sipp.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import re
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import pytest
import trustme

from sipis.sip.registration import Backoff, RegistrationState, RegistrationStatus
from sipis.sip.transaction import Timers
from tests.conftest import PEER_USERS
from tests.peers.dnsserver import DnsServer
from tests.peers.kamailio import Kamailio
from tests.peers.loopback import HOST
from tests.peers.relay import RelayUnderTest, account, running_relay
from tests.peers.sipp import SipMessage, SippServer
from tests.peers.tls import issue_server_certificate, write_ca_certificate

pytestmark = pytest.mark.peer

ALICE = PEER_USERS["alice"]

# Timer F (64*T1) ends an unanswered REGISTER after 1.28 s.
TIMERS = Timers(t1=0.02, t2=0.16, t4=0.2)
TIMER_F = 64 * TIMERS.t1
BACKOFF = Backoff(no_flow=1.0, flow_up=0.5, cap=2.0)
# How much later than scheduled a timer, a connect or a poll may come on a busy machine.
SLACK = 0.25
# How much two trace stamps of one sipp may understate the time between its messages.
EARLY = 0.02
# How long a fault lasts before its state and counts are checked.
FAULT = 5.0
# A backoff wait with more than this left is not a transaction in flight (Timer E <= T2).
BETWEEN_ATTEMPTS = TIMERS.t2 + 0.1

REGISTERING = RegistrationState.REGISTERING
REGISTERED = RegistrationState.REGISTERED


# -- the schedule -------------------------------------------------------------------------


def ceiling(base: float, failures: int) -> float:
    """The longest wait after ``failures`` failures in a row (before the 50-100 % jitter)."""
    return min(BACKOFF.cap, base * 2.0 ** (failures - 1))


def most_attempts(window: float, base: float, *, lasting: float = 0.0) -> int:
    """The most attempts that can start within ``window`` s of the first one.

    Each attempt takes at least ``lasting`` s to fail, and each wait is as
    short as the jitter allows: half its ceiling.
    """
    attempts, start = 0, 0.0
    while start <= window:
        attempts += 1
        start += lasting + ceiling(base, attempts) / 2
    return attempts


def fewest_attempts(window: float, base: float, *, lasting: float = 0.0) -> int:
    """The fewest attempts that start within ``window`` s of the first one.

    Each attempt fails within ``lasting`` s and each wait is its whole
    ceiling, both up to ``SLACK`` late.
    """
    attempts, start = 0, 0.0
    while start <= window:
        attempts += 1
        start += lasting + ceiling(base, attempts) + SLACK
    return attempts


def retransmissions(within: float) -> int:
    """How often Timer E fires within ``within`` s of a REGISTER over UDP (RFC 3261 §17.1.2.2)."""
    fired, interval, at = 0, TIMERS.t1, TIMERS.t1
    while at <= within:
        fired += 1
        interval = min(2 * interval, TIMERS.t2)
        at += interval
    return fired


def waiting_out_a_backoff() -> Callable[[RegistrationStatus], bool]:
    """A condition true while a binding waits out a backoff: nothing in flight, counts settled."""
    loop = asyncio.get_running_loop()
    return lambda s: (
        s.next_action_at is not None and s.next_action_at - loop.time() > BETWEEN_ATTEMPTS
    )


def registered_anew(status: RegistrationStatus) -> bool:
    """Registered by a REGISTER that succeeded after the fault (success resets ``failures``)."""
    return status.state is REGISTERED and status.failures == 0


# -- what the peers saw -------------------------------------------------------------------


def cseq(message: SipMessage) -> int:
    value = message.header("CSeq")
    assert value is not None and value.endswith(" REGISTER"), value
    return int(value.split()[0])


def first_arrivals(messages: list[SipMessage]) -> list[tuple[int, float]]:
    """(CSeq, when it first arrived) of each REGISTER transaction, retransmissions folded."""
    first: dict[int, float] = {}
    for message in messages:
        assert message.at is not None
        first.setdefault(cseq(message), message.at)
    return sorted(first.items())


def gaps(arrivals: list[tuple[int, float]]) -> list[float]:
    """Seconds between one REGISTER transaction's first arrival and the next one's."""
    return [later[1] - earlier[1] for earlier, later in itertools.pairwise(arrivals)]


class KamailioLog:
    """What Kamailio logged from a point on: its config logs every request it receives."""

    def __init__(self, kamailio: Kamailio) -> None:
        self._path = kamailio.log_path
        self._start = self._path.stat().st_size

    def text(self) -> str:
        with self._path.open("rb") as log:
            log.seek(self._start)
            return log.read().decode(errors="replace")

    def registers(self, call_id: str) -> int:
        """REGISTERs (UDP retransmissions included) received with this Call-ID."""
        return sum(
            "<script>: REGISTER " in line and f"(Call-ID {call_id})" in line
            for line in self.text().splitlines()
        )

    def refused_handshakes(self) -> int:
        """TLS handshakes a client aborted because it did not trust the certificate."""
        return self.text().count("alert unknown ca")


async def restart_with_certificate(kamailio: Kamailio, ca: trustme.CA) -> None:
    """Restart Kamailio with a TLS certificate issued by ``ca``.

    Its ``ca_certificate`` file names the issuing CA, so that its own
    readiness check verifies the new certificate; a relay started before
    keeps trusting the CA it loaded then.
    """
    names = [kamailio.tls_server_name, kamailio.domain, kamailio.host]
    issue_server_certificate(ca, kamailio.workdir, names, stem="registrar")
    write_ca_certificate(ca, kamailio.ca_certificate)
    await kamailio.restart()


def call_id(relay: RelayUnderTest, key: str) -> str:
    binding = relay.bindings.get(key)
    assert binding is not None
    return binding.session.call_id


# -- 1. registrar down --------------------------------------------------------------------


async def test_registrar_down_over_udp_then_back(kamailio: Kamailio) -> None:
    """Kamailio stopped: each REGISTER goes unanswered until Timer F, then waits its backoff.

    Every REGISTER of a binding carries the next CSeq (RFC 3261 §10.2), so
    the CSeq Kamailio stores once it is back counts every one sent while it
    was down: all but the challenged REGISTER's authorized repeat, which
    follows at once instead of after a backoff.
    """
    await kamailio.stop()
    loop = asyncio.get_running_loop()
    async with running_relay(timers=TIMERS, backoff=BACKOFF) as relay:
        added = loop.time()
        relay.bindings.add("alice", account("alice", ALICE, kamailio.uri("udp")))
        await asyncio.sleep(FAULT)
        down = relay.bindings.status("alice")
        assert (down.state, down.last_status, down.reason) == (REGISTERING, None, "timeout")
        assert down.registered_until is None
        assert down.failures >= 1

        await kamailio.start()
        back = loop.time()
        await relay.wait_for("alice", registered_anew, timeout=BACKOFF.cap + TIMER_F + 2)
        recovered = loop.time()
        # a REGISTER in flight reaches Kamailio with its next retransmission; else the
        # binding waits out at most one capped backoff
        assert recovered - back <= TIMERS.t2 + BACKOFF.cap + SLACK

        [contact] = await kamailio.contacts("alice")
        attempts = contact["cseq"] - 1
        assert attempts >= fewest_attempts(FAULT, BACKOFF.no_flow, lasting=TIMER_F)
        assert attempts <= most_attempts(recovered - added, BACKOFF.no_flow, lasting=TIMER_F)


async def test_registrar_down_over_tcp_then_back(kamailio: Kamailio) -> None:
    """Kamailio stopped: each connection is refused, and no REGISTER is spent on it."""
    await kamailio.stop()
    loop = asyncio.get_running_loop()
    async with running_relay(timers=TIMERS, backoff=BACKOFF) as relay:
        added, waiting = loop.time(), waiting_out_a_backoff()
        relay.bindings.add("alice", account("alice", ALICE, kamailio.uri("tcp")))
        down = await relay.wait_for(
            "alice",
            lambda s: loop.time() - added >= FAULT and waiting(s),
            timeout=FAULT + BACKOFF.cap + 1,
        )
        elapsed = loop.time() - added
        assert (down.state, down.last_status) == (REGISTERING, None)
        assert down.reason is not None and f"[Errno {errno.ECONNREFUSED}]" in down.reason
        assert down.registered_until is None
        # a refused connection fails at once: the attempts are the failures
        assert fewest_attempts(FAULT, BACKOFF.no_flow) <= down.failures
        assert down.failures <= most_attempts(elapsed, BACKOFF.no_flow)

        log_from_start = KamailioLog(kamailio)
        await kamailio.start()
        back = loop.time()
        await relay.wait_for("alice", registered_anew, timeout=BACKOFF.cap + 2)
        assert loop.time() - back <= BACKOFF.cap + SLACK
        # CSeq 1 challenged, CSeq 2 accepted: the refused attempts sent nothing
        [contact] = await kamailio.contacts("alice")
        assert contact["cseq"] == 2
        assert log_from_start.registers(call_id(relay, "alice")) == 2


# -- 3. 503 with Retry-After --------------------------------------------------------------

REFUSALS = 2


@pytest.mark.parametrize(
    ("retry_after", "wait"),
    [(1, 1.0), (30, BACKOFF.cap)],
    ids=["honoured", "capped"],
)
async def test_503_retry_after_sets_every_wait(
    sipp_registrar: Callable[..., SippServer], retry_after: int, wait: float
) -> None:
    """Each 503 waits exactly its Retry-After (capped), never the shorter growing backoff.

    With ``BACKOFF.flow_up`` the first wait would be at most 0.5 s: a gap of
    a whole second shows that Retry-After, not the backoff, set it.
    """
    async with (
        sipp_registrar(
            "fault_503_then_accept.xml",
            keys={"retry_after": str(retry_after)},
            variables={"refusals": str(REFUSALS)},
            max_calls=1,
        ) as registrar,
        running_relay(timers=TIMERS, backoff=BACKOFF) as relay,
    ):
        relay.bindings.add("a", account("alice", "pw", registrar.uri))
        refused = await relay.wait_for("a", lambda s: s.last_status == 503)
        assert (refused.state, refused.reason) == (REGISTERING, "Service Unavailable")
        status = await relay.registered("a", timeout=REFUSALS * wait + 2)
        assert (status.last_status, status.failures) == (200, 0)
        await asyncio.sleep(SLACK)

        arrivals = first_arrivals(registrar.received("REGISTER"))
        assert [number for number, _ in arrivals] == list(range(1, REFUSALS + 2))
        for gap in gaps(arrivals):
            assert wait - EARLY <= gap <= wait + SLACK


# -- 4. 500 forever -----------------------------------------------------------------------


async def test_500_forever_backs_off_up_to_the_cap(
    sipp_registrar: Callable[..., SippServer],
) -> None:
    """Every wait lies in its jitter range [ceiling/2, ceiling], the ceiling doubling to the cap."""
    window = 6.5  # long enough for two waits at the cap even when every wait is longest
    async with (
        sipp_registrar("fault_500_forever.xml") as registrar,
        running_relay(timers=TIMERS, backoff=BACKOFF) as relay,
    ):
        relay.bindings.add("a", account("alice", "pw", registrar.uri))
        [first] = await registrar.wait_for_requests("REGISTER", 1)
        assert first.at is not None
        started, waiting = first.at, waiting_out_a_backoff()
        status = await relay.wait_for(
            "a",
            lambda s: time.time() - started >= window and waiting(s),
            timeout=window + BACKOFF.cap + 2,
        )
        elapsed = time.time() - started

        arrivals = first_arrivals(registrar.received("REGISTER"))
        assert (status.state, status.last_status) == (REGISTERING, 500)
        assert status.reason == "Server Internal Error"
        assert status.registered_until is None
        assert status.failures == len(arrivals), "the relay's count is the registrar's"
        assert fewest_attempts(window, BACKOFF.flow_up) <= len(arrivals)
        assert len(arrivals) <= most_attempts(elapsed, BACKOFF.flow_up)
        waits = gaps(arrivals)
        for failures, gap in enumerate(waits, start=1):
            longest = ceiling(BACKOFF.flow_up, failures)
            assert longest / 2 - EARLY <= gap <= longest + SLACK, (failures, gap)
        capped = [n for n in range(1, len(waits) + 1) if ceiling(BACKOFF.flow_up, n) == BACKOFF.cap]
        assert len(capped) >= 2, "the waits reached the cap"


# -- 5. slow registrar --------------------------------------------------------------------


async def test_slow_answer_within_timer_f_registers_at_once(
    sipp_registrar: Callable[..., SippServer],
) -> None:
    """A 200 that takes half of Timer F ends the one transaction; Timer E retransmits meanwhile."""
    delay = TIMER_F / 2
    async with (
        sipp_registrar("fault_slow.xml", variables={"delay_ms": str(round(delay * 1000))}) as reg,
        running_relay(timers=TIMERS, backoff=BACKOFF) as relay,
    ):
        relay.bindings.add("a", account("alice", "pw", reg.uri))
        status = await relay.registered("a", timeout=delay + 2)
        assert (status.last_status, status.failures) == (200, 0)
        await asyncio.sleep(SLACK)
        sent = reg.received("REGISTER")
        assert {cseq(m) for m in sent} == {1}, "one transaction"
        assert 1 + retransmissions(delay - SLACK) <= len(sent)
        assert len(sent) <= 1 + retransmissions(delay + SLACK)


async def test_answer_slower_than_timer_f_is_a_timeout(
    sipp_registrar: Callable[..., SippServer],
) -> None:
    """The 200 comes after Timer F ended the transaction: ignored, and the binding backs off.

    The registrar answers a quarter of ``BACKOFF.no_flow`` after Timer F,
    before the earliest retry (half of ``no_flow`` after Timer F).
    """
    delay = TIMER_F + BACKOFF.no_flow / 4
    loop, waiting = asyncio.get_running_loop(), waiting_out_a_backoff()
    async with (
        sipp_registrar("fault_slow.xml", variables={"delay_ms": str(round(delay * 1000))}) as reg,
        running_relay(timers=TIMERS, backoff=BACKOFF) as relay,
    ):
        relay.bindings.add("a", account("alice", "pw", reg.uri))
        status = await relay.wait_for(
            "a",
            lambda s: s.failures >= 2 and waiting(s),
            timeout=2 * TIMER_F + 2 * ceiling(BACKOFF.no_flow, 1) + 2,
        )
        assert (status.state, status.last_status, status.reason) == (REGISTERING, None, "timeout")
        assert status.registered_until is None
        messages = reg.messages()
        late = {cseq(m) for m in messages if m.direction == "sent" and m.status == 200}
        assert 1 in late, "the registrar did answer the first REGISTER, too late"
        registers = [m for m in messages if m.direction == "received" and m.method == "REGISTER"]
        arrivals = first_arrivals(registers)
        assert [number for number, _ in arrivals] == [1, 2]
        for failures, gap in enumerate(gaps(arrivals), start=1):
            longest = ceiling(BACKOFF.no_flow, failures)
            assert TIMER_F + longest / 2 - EARLY <= gap <= TIMER_F + longest + SLACK
        for number, _ in arrivals:
            sends = sum(cseq(m) == number for m in registers)
            assert sends <= 1 + retransmissions(TIMER_F)

        # the late answer to the second REGISTER comes during this wait, and changes nothing
        assert status.next_action_at is not None
        await asyncio.sleep(min(delay - TIMER_F + SLACK, status.next_action_at - loop.time()))
        assert relay.bindings.status("a").registered_until is None


# -- 6. DNS failing -----------------------------------------------------------------------


async def test_dns_failure_holds_registers_then_recovers(kamailio: Kamailio) -> None:
    """While DNS answers SERVFAIL nothing reaches the registrar; lookups follow the backoff."""
    zone = [
        ("_sip._udp.example.test.", "SRV", 60, f"0 0 {kamailio.udp_port} registrar.test."),
        ("registrar.test.", "A", 60, "127.0.0.1"),
    ]
    loop = asyncio.get_running_loop()
    log = KamailioLog(kamailio)
    async with (
        DnsServer(zone) as dns,
        running_relay(nameservers=[dns.address], timers=TIMERS, backoff=BACKOFF) as relay,
    ):
        dns.fail("servfail")
        added, waiting = loop.time(), waiting_out_a_backoff()
        relay.bindings.add("alice", account("alice", ALICE, "sip:example.test;transport=udp"))
        failing = await relay.wait_for(
            "alice",
            lambda s: loop.time() - added >= FAULT and waiting(s),
            timeout=FAULT + BACKOFF.cap + 1,
        )
        elapsed = loop.time() - added
        assert (failing.state, failing.last_status) == (REGISTERING, None)
        assert failing.reason is not None and "DNS lookups failed" in failing.reason
        assert failing.registered_until is None
        lookups = dns.asked("_sip._udp.example.test", "SRV")
        assert lookups == failing.failures, "one SRV question per attempt"
        assert fewest_attempts(FAULT, BACKOFF.no_flow) <= lookups
        assert lookups <= most_attempts(elapsed, BACKOFF.no_flow)
        assert log.registers(call_id(relay, "alice")) == 0

        dns.recover()
        recovering = loop.time()
        await relay.wait_for("alice", registered_anew, timeout=BACKOFF.cap + 2)
        assert loop.time() - recovering <= BACKOFF.cap + SLACK
        [contact] = await kamailio.contacts("alice")
        assert contact["cseq"] == 2, "no REGISTER was spent while DNS failed"


# -- 7. TLS certificate no longer trusted -------------------------------------------------


async def test_untrusted_certificate_after_restart_then_trusted_again(
    kamailio: Kamailio,
) -> None:
    """Kamailio comes back with a certificate from another CA: no REGISTER goes over it.

    The registration (4 s) runs out during the fault, so the state shows it.
    Every attempt that reached Kamailio left a handshake the relay aborted
    with an "unknown ca" alert; none carried a REGISTER.
    """
    trusted = kamailio.ca
    loop = asyncio.get_running_loop()
    config = account("alice", ALICE, kamailio.uri("tls"), expires=kamailio.min_expires)
    async with running_relay(
        ca_file=str(kamailio.ca_certificate), timers=TIMERS, backoff=BACKOFF
    ) as relay:
        relay.bindings.add("alice", config)
        await relay.registered("alice")
        log, waiting = KamailioLog(kamailio), waiting_out_a_backoff()
        swapped = loop.time()
        await restart_with_certificate(kamailio, trustme.CA())
        early = await relay.wait_for("alice", lambda s: s.failures >= 1, timeout=BACKOFF.cap + 2)
        assert early.state is REGISTERED, "registered until the registration runs out"
        assert early.reason is not None and early.last_status is None

        refused = await relay.wait_for(
            "alice",
            lambda s: (
                s.state is REGISTERING
                and "certificate verify failed" in (s.reason or "")
                and waiting(s)
            ),
            timeout=kamailio.min_expires + BACKOFF.cap + 2,
        )
        elapsed = loop.time() - swapped
        assert refused.last_status is None
        handshakes = log.refused_handshakes()
        assert 1 <= handshakes <= refused.failures <= most_attempts(elapsed, BACKOFF.no_flow)
        assert log.registers(call_id(relay, "alice")) == 0

        await restart_with_certificate(kamailio, trusted)
        back = loop.time()
        await relay.wait_for("alice", registered_anew, timeout=BACKOFF.cap + 2)
        assert loop.time() - back <= BACKOFF.cap + SLACK
        [contact] = await kamailio.wait_for_contacts("alice", bool)
        assert contact["call_id"] == call_id(relay, "alice")
        assert contact["socket"] == f"tls:{HOST}:{kamailio.tls_port}"


# -- 8. connection reset mid-transaction --------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    """A REGISTER that reached the front: when (loop time), on which connection, its CSeq."""

    at: float
    connection: int
    cseq: int


_REGISTER_CSEQ = re.compile(rb"^CSeq:[ \t]*(\d+)[ \t]+REGISTER\r?$", re.IGNORECASE | re.MULTILINE)
_HEAD_END = b"\r\n\r\n"


class ResettingFront:
    """A TCP front for a registrar that resets its first ``resets`` connections mid-transaction.

    Each of those connections is read until one REGISTER has come in, then
    reset (SO_LINGER 0 sends RST) with no answer.  Later connections are
    relayed to ``registrar`` both ways.  Every REGISTER that arrives on any
    connection is recorded in ``arrivals``.  Requests are taken to have no
    body, as REGISTER has none.
    """

    def __init__(self, registrar: tuple[str, int], resets: int) -> None:
        self._registrar = registrar
        self.resets_left = resets
        self.arrivals: list[Arrival] = []
        self._numbers = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accepted, HOST, 0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        # Closing a connection ends its handler; cancelling the handler would upset asyncio.
        for writer in self._connections.values():
            writer.transport.abort()
        async with asyncio.timeout(5):
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        number = next(self._numbers)
        try:
            if self.resets_left > 0:
                self.resets_left -= 1
                await self._reset_after_register(number, reader, writer)
            else:
                await self._relay(number, reader, writer)
        finally:
            del self._connections[task]
            writer.close()

    async def _reset_after_register(
        self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        pending = bytearray()
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            async with asyncio.timeout(5):
                while not self._take_registers(number, pending):
                    pending += await reader.readuntil(_HEAD_END)
        if not writer.transport.is_closing():
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            writer.transport.abort()

    async def _relay(
        self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        async with asyncio.timeout(5):
            registrar_reader, registrar_writer = await asyncio.open_connection(*self._registrar)

        async def upstream() -> None:
            pending = bytearray()
            while chunk := await reader.read(65536):
                pending += chunk
                self._take_registers(number, pending)
                registrar_writer.write(chunk)
                await registrar_writer.drain()

        async def downstream() -> None:
            while chunk := await registrar_reader.read(65536):
                writer.write(chunk)
                await writer.drain()

        pumps = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            registrar_writer.close()

    def _take_registers(self, number: int, pending: bytearray) -> int:
        """Take the complete request heads off ``pending``; record and count the REGISTERs."""
        taken = 0
        while (end := pending.find(_HEAD_END)) >= 0:
            head = bytes(pending[: end + len(_HEAD_END)]).lstrip(b"\r\n")
            del pending[: end + len(_HEAD_END)]
            found = _REGISTER_CSEQ.search(head)
            if head.startswith(b"REGISTER ") and found is not None:
                now = asyncio.get_running_loop().time()
                self.arrivals.append(Arrival(now, number, int(found[1])))
                taken += 1
        return taken


async def test_connection_reset_mid_transaction_reconnects_per_backoff(
    kamailio: Kamailio,
) -> None:
    """Each reset ends the REGISTER unanswered; the retry waits its backoff, on a new connection."""
    resets = 2
    loop = asyncio.get_running_loop()
    async with ResettingFront(kamailio.address("tcp"), resets) as front:
        zone = [("example.test.", "A", 60, "127.0.0.1")]
        async with (
            DnsServer(zone) as dns,
            running_relay(nameservers=[dns.address], timers=TIMERS, backoff=BACKOFF) as relay,
        ):
            registrar = f"sip:example.test:{front.port};transport=tcp"
            relay.bindings.add("alice", account("alice", ALICE, registrar))
            reset = await relay.wait_for(
                "alice",
                lambda s: s.failures == resets,
                timeout=sum(ceiling(BACKOFF.no_flow, n) for n in range(1, resets)) + 2,
            )
            assert (reset.state, reset.last_status) == (REGISTERING, None)
            assert (reset.reason, reset.registered_until) == ("transport error", None)

            reset_at = loop.time()
            await relay.wait_for("alice", registered_anew, timeout=BACKOFF.cap + 2)
            assert loop.time() - reset_at <= ceiling(BACKOFF.no_flow, resets) + SLACK

        arrivals = front.arrivals
        # CSeq 1 and 2 reset; CSeq 3 challenged and CSeq 4 accepted on the third connection
        assert [(a.connection, a.cseq) for a in arrivals] == [(1, 1), (2, 2), (3, 3), (3, 4)]
        window = arrivals[resets].at - arrivals[0].at
        assert resets + 1 <= most_attempts(window, BACKOFF.no_flow)
        for failures, (earlier, later) in enumerate(itertools.pairwise(arrivals[: resets + 1]), 1):
            longest = ceiling(BACKOFF.no_flow, failures)
            assert longest / 2 <= later.at - earlier.at <= longest + SLACK
        [contact] = await kamailio.contacts("alice")
        assert contact["cseq"] == 4
