"""SIP transactions (RFC 3261 §17, with the RFC 6026 "Accepted" state).

Theory of operation
-------------------
A transaction is a state machine fed with messages and with ``now``; it puts
the bytes it wants sent in an outbox (``outgoing()`` drains it) and exposes
``deadline``, the next time its ``on_timer`` must be called.  Nothing here
sleeps or reads a clock, so every timer is a unit test.

Client INVITE (§17.1.1, RFC 6026 §8.4)::

    Calling --1xx--> Proceeding
       |                 |
       +-----------------+--300-699, ACK sent--> Completed --D--> Terminated
       +-----------------+--2xx----------------> Accepted  --M--> Terminated
       +--B (or transport error, also in Proceeding)--> Terminated, TU told TimedOut

    Timer A retransmits the INVITE over unreliable transports: T1, doubling
    without a cap, until any response arrives.  B = 64*T1 bounds Calling
    only: once a provisional response has come, how long to ring is the
    TU's choice (it ends it with a CANCEL built by ``cancel_for``).  The
    transaction ACKs a 300-699 itself (``ack_for_failure``) and resends that
    ACK for every retransmission of the response, which the TU never sees;
    D = ``Timers.d``, 32 s by default (0 if reliable).  A 2xx is ACKed end
    to end by the TU, so every 2xx, retransmitted or from another fork,
    goes to the TU until M = 64*T1.

Client non-INVITE (§17.1.2)::

    Trying --1xx--> Proceeding --final--> Completed --K--> Terminated
      |  \\___________________________final___________/^
      +--F (or transport error)--> Terminated, TU told TimedOut

    Timer E retransmits over unreliable transports: T1, doubling to T2 in
    Trying, every T2 in Proceeding.  F = 64*T1.  K = T4 (0 if reliable).

Server non-INVITE (§17.2.2)::

    Trying --TU 1xx--> Proceeding --TU final--> Completed --J--> Terminated

    A retransmitted request is absorbed in Trying and answered with the last
    response afterwards.  J = 64*T1 (0 if reliable).

Server INVITE (§17.2.1, RFC 6026 §7.1)::

    Proceeding --TU 300-699--> Completed --ACK--> Confirmed --I--> Terminated
        |                          +--H--> Terminated, TU told TimedOut
        +--TU 2xx--> Accepted --L--> Terminated

    Timer G retransmits a final non-2xx over unreliable transports (T1
    doubling to T2); H = 64*T1 bounds the wait for the ACK; I = T4 (0 if
    reliable).  In Accepted, retransmitted INVITEs are absorbed and 2xx
    retransmissions from the TU go out; L = 64*T1.

Matching (§17.1.3, §17.2.3): responses match a client transaction by top
Via branch and CSeq method.  Requests match a server transaction by branch,
sent-by and method (ACK and CANCEL matched by the caller), or, when the
branch lacks the RFC 3261 magic cookie, by the RFC 2543 rules.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass

from .errors import SipError
from .message import Message, Request, Response

MAGIC_COOKIE = "z9hG4bK"


@dataclass(frozen=True, slots=True)
class Timers:
    """RFC 3261 §17.1.1.1 / Table 4 base values, in seconds.

    ``d`` is Timer D, how long a client INVITE transaction waits for
    retransmissions of a failure response over an unreliable transport
    (Table 4: at least 32 s).
    """

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    d: float = 32.0


DEFAULT_TIMERS = Timers()


@dataclass(frozen=True, slots=True)
class TimedOut:
    """What a transaction reports to its TU when no answer will come."""

    reason: str


class State(enum.Enum):
    CALLING = "calling"
    TRYING = "trying"
    PROCEEDING = "proceeding"
    COMPLETED = "completed"
    CONFIRMED = "confirmed"
    ACCEPTED = "accepted"
    TERMINATED = "terminated"


def new_branch() -> str:
    return MAGIC_COOKIE + secrets.token_hex(8)


def client_key(branch: str, method: str) -> tuple[str, str]:
    """How a response finds its client transaction (§17.1.3)."""
    return (branch, method)


def server_key(request: Request, method: str | None = None) -> tuple[str, ...]:
    """How a request finds its server transaction (§17.2.3).

    ACK is keyed as the INVITE it acknowledges; ``method`` overrides the
    request's (a CANCEL looks for its INVITE this way).  Without a
    magic-cookie branch, the RFC 2543 identity is used: Request-URI, From
    tag, Call-ID, CSeq number and the whole top Via.
    """
    via = request.via
    method = method or ("INVITE" if request.method == "ACK" else request.method)
    branch = via.branch or ""
    if branch.startswith(MAGIC_COOKIE) and len(branch) > len(MAGIC_COOKIE):
        return (branch, via.host.lower(), str(via.port or ""), method)
    return (
        "rfc2543",
        str(request.uri),
        request.from_.tag or "",
        request.call_id,
        str(request.cseq.number),
        str(via),
        method,
    )


class _Transaction:
    __slots__ = ("_outbox", "reliable", "state", "timers")

    def __init__(self, reliable: bool, timers: Timers) -> None:
        self.reliable = reliable
        self.timers = timers
        self.state = State.TRYING
        self._outbox: list[bytes] = []

    def outgoing(self) -> list[bytes]:
        """The datagrams or stream writes due now, in order."""
        out, self._outbox = self._outbox, []
        return out

    @property
    def terminated(self) -> bool:
        return self.state is State.TERMINATED


class ClientNonInviteTransaction(_Transaction):
    """Sends one non-INVITE request and waits for its final response."""

    __slots__ = ("_e_at", "_e_interval", "_f_at", "_k_at", "_wire", "key", "request")

    def __init__(
        self,
        request: Request,
        now: float,
        *,
        reliable: bool,
        timers: Timers = DEFAULT_TIMERS,
        branch: str | None = None,
    ) -> None:
        """``branch``, when given, is that of the request's top Via (spares parsing it)."""
        super().__init__(reliable, timers)
        self.request = request
        self.key = client_key(branch or request.via.branch or "", request.method)
        self._wire = request.serialize()
        self._outbox.append(self._wire)
        self._e_interval = timers.t1
        self._e_at: float | None = None if reliable else now + timers.t1
        self._f_at: float | None = now + 64 * timers.t1
        self._k_at: float | None = None

    @property
    def deadline(self) -> float | None:
        times = [t for t in (self._e_at, self._f_at, self._k_at) if t is not None]
        return min(times) if times else None

    def receive(self, response: Response, now: float) -> Response | None:
        """Feed a matching response; returns it if the TU should see it."""
        if self.state in (State.TRYING, State.PROCEEDING):
            if response.status < 200:
                if self.state is State.TRYING:
                    self.state = State.PROCEEDING
                    if self._e_at is not None:
                        self._e_interval = self.timers.t2
                        self._e_at = min(self._e_at, now + self.timers.t2)
                return response
            self.state = State.COMPLETED
            self._e_at = self._f_at = None
            self._k_at = now + (0 if self.reliable else self.timers.t4)
            return response
        return None

    def on_timer(self, now: float) -> TimedOut | None:
        if self._k_at is not None and now >= self._k_at:
            self._k_at = None
            self.state = State.TERMINATED
            return None
        if self._f_at is not None and now >= self._f_at:
            return self._fail("timeout")
        if self._e_at is not None and now >= self._e_at:
            self._outbox.append(self._wire)
            if self.state is State.TRYING:
                self._e_interval = min(2 * self._e_interval, self.timers.t2)
            else:
                self._e_interval = self.timers.t2
            self._e_at = now + self._e_interval
        return None

    def transport_failed(self) -> TimedOut | None:
        """The transport could not send (§17.1.4): the TU sees a failure once."""
        if self.state in (State.TRYING, State.PROCEEDING):
            return self._fail("transport error")
        return None

    def _fail(self, reason: str) -> TimedOut:
        self.state = State.TERMINATED
        self._e_at = self._f_at = self._k_at = None
        return TimedOut(reason)


class ClientInviteTransaction(_Transaction):
    """Sends one INVITE: ACKs a failure itself, hands every 2xx to the TU."""

    __slots__ = (
        "_a_at",
        "_a_interval",
        "_ack",
        "_b_at",
        "_d_at",
        "_m_at",
        "_wire",
        "key",
        "request",
    )

    def __init__(
        self,
        request: Request,
        now: float,
        *,
        reliable: bool,
        timers: Timers = DEFAULT_TIMERS,
    ) -> None:
        super().__init__(reliable, timers)
        self.state = State.CALLING
        self.request = request
        self.key = client_key(request.via.branch or "", "INVITE")
        self._wire = request.serialize()
        self._outbox.append(self._wire)
        self._ack: bytes | None = None
        self._a_interval = timers.t1
        self._a_at: float | None = None if reliable else now + timers.t1
        self._b_at: float | None = now + 64 * timers.t1
        self._d_at: float | None = None
        self._m_at: float | None = None

    @property
    def deadline(self) -> float | None:
        times = [t for t in (self._a_at, self._b_at, self._d_at, self._m_at) if t is not None]
        return min(times) if times else None

    def receive(self, response: Response, now: float) -> Response | None:
        """Feed a matching response; returns it if the TU should see it."""
        status = response.status
        if self.state in (State.CALLING, State.PROCEEDING):
            self._a_at = self._b_at = None
            if status < 200:
                self.state = State.PROCEEDING
            elif status < 300:
                self.state = State.ACCEPTED
                self._m_at = now + 64 * self.timers.t1
            else:
                self.state = State.COMPLETED
                self._ack = ack_for_failure(self.request, response).serialize()
                self._outbox.append(self._ack)
                self._d_at = now + (0 if self.reliable else self.timers.d)
            return response
        if self.state is State.ACCEPTED and 200 <= status < 300:
            return response
        if self.state is State.COMPLETED and status >= 300 and self._ack is not None:
            self._outbox.append(self._ack)
        return None

    def on_timer(self, now: float) -> TimedOut | None:
        if self._d_at is not None and now >= self._d_at:
            self._d_at = None
            self.state = State.TERMINATED
        if self._m_at is not None and now >= self._m_at:
            self._m_at = None
            self.state = State.TERMINATED
        if self._b_at is not None and now >= self._b_at:
            return self._fail("timeout")
        if self._a_at is not None and now >= self._a_at:
            self._outbox.append(self._wire)
            self._a_interval *= 2
            self._a_at = now + self._a_interval
        return None

    def transport_failed(self) -> TimedOut | None:
        """The transport could not send (§17.1.4).

        The TU sees a failure once while it still waits for a final
        response; a lost ACK in Completed only ends the transaction.
        """
        if self.state in (State.CALLING, State.PROCEEDING):
            return self._fail("transport error")
        if self.state is State.COMPLETED:
            self.state = State.TERMINATED
            self._d_at = None
        return None

    def _fail(self, reason: str) -> TimedOut:
        self.state = State.TERMINATED
        self._a_at = self._b_at = None
        return TimedOut(reason)


def ack_for_failure(invite: Request, response: Response) -> Request:
    """The ACK for a 300-699 answer to ``invite`` (§17.1.1.3).

    Request-URI, Call-ID, From and the CSeq number are the INVITE's, To is
    the response's (with the tag it added), the only Via is the INVITE's
    top one, and the INVITE's Route header fields come along.
    """
    return _same_hop_request("ACK", invite, to=_field(response, "To"))


def cancel_for(invite: Request) -> Request:
    """The CANCEL for a pending ``invite`` (§9.1).

    Request-URI, Call-ID, To, From (tags included) and the CSeq number are
    the INVITE's, the only Via is the INVITE's top one (same branch, so the
    UAS matches it to the INVITE), and the INVITE's Route header fields come
    along.  It is sent in a client non-INVITE transaction of its own, and
    only once a provisional response has arrived.
    """
    return _same_hop_request("CANCEL", invite, to=_field(invite, "To"))


def _same_hop_request(method: str, invite: Request, *, to: str) -> Request:
    """A request that follows ``invite`` hop by hop: same top Via, same route."""
    vias = invite.headers.values("Via")
    if not vias:
        raise SipError("missing Via")
    fields = [("Via", vias[0])]
    fields += [("Route", route) for route in invite.headers.get_all("Route")]
    fields += [
        ("Max-Forwards", "70"),
        ("From", _field(invite, "From")),
        ("To", to),
        ("Call-ID", _field(invite, "Call-ID")),
        ("CSeq", f"{invite.cseq.number} {method}"),
    ]
    return Request(method, invite.uri, fields)


def _field(message: Message, name: str) -> str:
    value = message.headers.get(name)
    if value is None:
        raise SipError(f"missing {name}")
    return value


class _ServerTransaction(_Transaction):
    """What both server transactions keep: the request and the last response sent."""

    __slots__ = ("_last", "request")

    def __init__(
        self,
        request: Request,
        *,
        reliable: bool,
        timers: Timers = DEFAULT_TIMERS,
    ) -> None:
        super().__init__(reliable, timers)
        self.request = request
        self._last: bytes | None = None


class ServerNonInviteTransaction(_ServerTransaction):
    """Answers one non-INVITE request, absorbing its retransmissions."""

    __slots__ = ("_j_at",)

    def __init__(
        self,
        request: Request,
        *,
        reliable: bool,
        timers: Timers = DEFAULT_TIMERS,
    ) -> None:
        super().__init__(request, reliable=reliable, timers=timers)
        self._j_at: float | None = None

    @property
    def deadline(self) -> float | None:
        return self._j_at

    def receive_retransmission(self) -> None:
        if self._last is not None and self.state is not State.TERMINATED:
            self._outbox.append(self._last)

    def respond(self, response: Response, now: float) -> None:
        if self.state in (State.COMPLETED, State.TERMINATED):
            return
        self._last = response.serialize()
        self._outbox.append(self._last)
        if response.status < 200:
            self.state = State.PROCEEDING
        else:
            self.state = State.COMPLETED
            self._j_at = now + (0 if self.reliable else 64 * self.timers.t1)

    def on_timer(self, now: float) -> None:
        if self._j_at is not None and now >= self._j_at:
            self._j_at = None
            self.state = State.TERMINATED


class ServerInviteTransaction(_ServerTransaction):
    """Answers one INVITE: provisional responses, then a final one until ACKed."""

    __slots__ = ("_g_at", "_g_interval", "_h_at", "_i_at", "_l_at")

    def __init__(
        self,
        request: Request,
        *,
        reliable: bool,
        timers: Timers = DEFAULT_TIMERS,
    ) -> None:
        super().__init__(request, reliable=reliable, timers=timers)
        self.state = State.PROCEEDING
        self._g_interval = timers.t1
        self._g_at: float | None = None
        self._h_at: float | None = None
        self._i_at: float | None = None
        self._l_at: float | None = None

    @property
    def deadline(self) -> float | None:
        times = [t for t in (self._g_at, self._h_at, self._i_at, self._l_at) if t is not None]
        return min(times) if times else None

    def receive_retransmission(self) -> None:
        """A retransmitted INVITE: repeat the last provisional or final non-2xx response."""
        if self._last is not None and self.state in (State.PROCEEDING, State.COMPLETED):
            self._outbox.append(self._last)

    def receive_ack(self, now: float) -> bool:
        """An ACK for a non-2xx final response; True if it confirmed the transaction."""
        if self.state is not State.COMPLETED:
            return False
        self.state = State.CONFIRMED
        self._g_at = self._h_at = None
        self._i_at = now + (0 if self.reliable else self.timers.t4)
        return True

    def respond(self, response: Response, now: float) -> None:
        status = response.status
        if self.state is State.ACCEPTED and 200 <= status < 300:
            self._outbox.append(response.serialize())
            return
        if self.state is not State.PROCEEDING:
            return
        self._last = response.serialize()
        self._outbox.append(self._last)
        if status < 200:
            return
        if status < 300:
            self.state = State.ACCEPTED
            self._l_at = now + 64 * self.timers.t1
            return
        self.state = State.COMPLETED
        self._h_at = now + 64 * self.timers.t1
        if not self.reliable:
            self._g_at = now + self.timers.t1

    def on_timer(self, now: float) -> TimedOut | None:
        if self._l_at is not None and now >= self._l_at:
            self._l_at = None
            self.state = State.TERMINATED
        if self._i_at is not None and now >= self._i_at:
            self._i_at = None
            self.state = State.TERMINATED
        if self._h_at is not None and now >= self._h_at:
            self.state = State.TERMINATED
            self._g_at = self._h_at = None
            return TimedOut("no ACK")
        if self._g_at is not None and now >= self._g_at and self._last is not None:
            self._outbox.append(self._last)
            self._g_interval = min(2 * self._g_interval, self.timers.t2)
            self._g_at = now + self._g_interval
        return None
