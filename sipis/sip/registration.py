"""One account's registration: REGISTER, refresh, retry and un-REGISTER (RFC 3261 §10).

Theory of operation
-------------------
A ``RegistrationSession`` keeps one contact registered for one address of
record.  It owns at most one client transaction at a time and is driven by
its IO adapter with ``start``/``stop``, ``receive`` (responses),
``on_timer`` (at ``deadline``) and ``transport_failed``; ``outgoing()``
gives the bytes to send over the binding's flow, and ``bind`` tells it the
local address of that flow (for Via and Contact).

States::

    STOPPED --start--> REGISTERING --2xx--> REGISTERED --refresh 2xx--> REGISTERED
                          |   ^                 |
                          |   +--transient------+ (backoff; still registered until expiry)
                          +--permanent--> FAILED (403, 404, wrong password, ...: no retry)
    any --stop--> UNREGISTERING --final or timeout--> STOPPED
    (a REGISTER still in flight when stop() comes is answered first: one at a time)

Answers and what they do:

* 2xx: the registrar's expiry for our contact (its ``expires`` parameter,
  else Expires, else what we asked) sets ``registered_until``; the refresh
  is scheduled at a random point between 75 % and 90 % of it (and at least
  ``REFRESH_MARGIN`` before it ends), so bindings created together drift
  apart instead of refreshing in bursts.
* 401/407: answered with digest credentials (the strongest challenge).  A
  refresh pre-authorizes with the cached challenge and its next nonce count.
  Credentials computed for a fresh challenge that earn another challenge
  without ``stale=true`` mean a wrong password: FAILED, no loop.
* 423: retry at once with the Min-Expires asked for.
* 3xx: retry at once at the first Contact (at most ``MAX_REDIRECTS``).
* 5xx, 408, 480, 429 and no answer at all: RFC 5626 §4.5 backoff,
  ``min(1800, base * 2**(failures-1))`` scaled by a random 50-100 %; base 30 s
  when no answer came (the flow is suspect: ``needs_flow`` asks the adapter
  for a new one), 90 s when the registrar answered.  Retry-After, when given,
  is honoured instead (capped at the same 1800 s).  ``Backoff`` holds the
  three times.
* Any other 4xx, and 6xx: FAILED with the status and reason, no retry.
"""

from __future__ import annotations

import enum
import random
import re
import secrets
import sys
from dataclasses import dataclass

from .digest import Challenge, DigestClient, parse_challenge, select_challenge
from .errors import SipError
from .grammar import quote, unquote
from .headers import NameAddr, parse_delta_seconds
from .message import Request, Response
from .transaction import DEFAULT_TIMERS, ClientNonInviteTransaction, TimedOut, Timers, new_branch
from .uri import SipUri

MAX_REDIRECTS = 5
REFRESH_MARGIN = 2.0
MAX_AUTH_ROUNDS = 3
_TRANSIENT_4XX = frozenset({408, 429, 480})
_RETRY_AFTER = re.compile(r"\s*(\d{1,10})")


@dataclass(frozen=True, slots=True)
class Backoff:
    """RFC 5626 §4.5 retry timing: base times without and with a working flow, and the cap."""

    no_flow: float = 30.0
    flow_up: float = 90.0
    cap: float = 1800.0


class RegistrationState(enum.Enum):
    STOPPED = "stopped"
    REGISTERING = "registering"
    REGISTERED = "registered"
    FAILED = "failed"
    UNREGISTERING = "unregistering"


@dataclass(frozen=True, slots=True)
class LocalAddress:
    """Where this side of the flow is: Via sent-by and the Contact host."""

    transport: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class RegistrationConfig:
    """What a session registers, and as whom.

    ``contact_user`` is the unguessable user part of our Contact: only
    requests addressed to it may reach the account.  ``instance_id`` is the
    RFC 5626 ``+sip.instance`` URN, stable across restarts and nodes so that a
    re-registration replaces the old contact instead of adding one.
    """

    aor: SipUri
    registrar: SipUri
    username: str
    password: str
    contact_user: str
    instance_id: str
    reg_id: int = 1
    expires: int = 600
    outbound_proxy: SipUri | None = None
    display_name: str | None = None
    user_agent: str = "sipis"

    def __repr__(self) -> str:
        return f"RegistrationConfig(aor={self.aor}, registrar={self.registrar})"


@dataclass(frozen=True, slots=True)
class RegistrationStatus:
    """What the session can tell about itself at a given time."""

    state: RegistrationState
    last_status: int | None
    reason: str | None
    registered_until: float | None
    next_action_at: float | None
    failures: int


class RegistrationSession:
    """Keeps one contact registered at one registrar (see the module docstring)."""

    __slots__ = (
        "_auth_rounds",
        "_backoff",
        "_challenges",
        "_cseq",
        "_digest",
        "_expires",
        "_fresh",
        "_from_tag",
        "_local",
        "_pending_expires",
        "_redirects",
        "_register_at",
        "_rng",
        "_sent_at",
        "_target",
        "_timers",
        "_txn",
        "call_id",
        "completed",
        "config",
        "failures",
        "flow_timer",
        "last_status",
        "needs_flow",
        "reason",
        "registered_until",
        "service_route",
        "state",
    )

    def __init__(
        self,
        config: RegistrationConfig,
        *,
        rng: random.Random | None = None,
        timers: Timers = DEFAULT_TIMERS,
        backoff: Backoff = Backoff(),
    ) -> None:
        self.config = config
        self._backoff = backoff
        self._rng = rng or random.Random()
        self._timers = timers
        self._digest = DigestClient(config.username, config.password)
        self.call_id = secrets.token_hex(12)
        self._from_tag = secrets.token_hex(6)
        self._cseq = 0
        self._expires = config.expires
        self._target = config.registrar
        self._redirects = 0
        # ((is_proxy, realm), challenge): the last challenge of each realm, reused to
        # pre-authorize refreshes (a tuple: nearly always one entry, rarely two)
        self._challenges: tuple[tuple[tuple[bool, str], Challenge], ...] = ()
        # the realm whose challenge arrived just before the pending request, if any
        self._fresh: tuple[bool, str] | None = None
        self._auth_rounds = 0
        self._local: LocalAddress | None = None
        self._txn: ClientNonInviteTransaction | None = None
        self._sent_at = 0.0
        # the REGISTER transaction that ended last: (final status, None if unanswered;
        # seconds it took), for whoever drives the session to read and clear
        self.completed: tuple[int | None, float] | None = None
        self._pending_expires = 0
        self._register_at: float | None = None
        self.state = RegistrationState.STOPPED
        self.last_status: int | None = None
        self.reason: str | None = None
        self.registered_until: float | None = None
        self.failures = 0
        self.needs_flow = True
        self.service_route: tuple[NameAddr, ...] = ()
        self.flow_timer: int | None = None

    # -- driving the session ------------------------------------------------------------

    @property
    def cseq(self) -> int:
        """The CSeq of the last REGISTER sent: how many this session has sent."""
        return self._cseq

    @property
    def target(self) -> SipUri:
        """Where the next REGISTER goes first: the outbound proxy, else the registrar."""
        return self.config.outbound_proxy or self._target

    def bind(self, local: LocalAddress) -> None:
        """The adapter has a (new) flow for this session, reachable at ``local``."""
        self._local = local
        self.needs_flow = False

    def start(self, now: float, delay: float = 0.0) -> None:
        if self.state in (RegistrationState.REGISTERING, RegistrationState.REGISTERED):
            return
        self.state = RegistrationState.REGISTERING
        self.failures = 0
        self._redirects = 0
        self._register_at = now + delay

    def stop(self, now: float) -> None:
        """Un-REGISTER (Expires: 0) if a contact may be registered, else just stop."""
        self._register_at = None
        if self.state in (RegistrationState.REGISTERED, RegistrationState.REGISTERING) and (
            self.registered_until is not None or self._txn is not None
        ):
            self.state = RegistrationState.UNREGISTERING
            self._auth_rounds = 0
            if self._txn is None:
                self._send(now, expires=0)
            # Otherwise the un-REGISTER waits for the final answer to the pending REGISTER:
            # RFC 3261 §10.2 allows one REGISTER in flight per Call-ID.
        elif self.state is not RegistrationState.UNREGISTERING:
            self._stopped()

    @property
    def deadline(self) -> float | None:
        txn = self._txn.deadline if self._txn is not None else None
        if txn is None:
            return self._register_at
        if self._register_at is None:
            return txn
        return min(txn, self._register_at)

    def on_timer(self, now: float) -> None:
        if self._txn is not None and self._txn.deadline is not None and now >= self._txn.deadline:
            outcome = self._txn.on_timer(now)
            if self._txn.terminated:
                self._txn = None
            if isinstance(outcome, TimedOut):
                self.completed = (None, now - self._sent_at)
                self._no_answer(now, outcome.reason)
        if self.register_due(now):
            self._register_at = None
            self._auth_rounds = 0
            self._send(now, self._expires)

    def register_due(self, now: float) -> bool:
        """Whether ``on_timer(now)`` starts a new REGISTER transaction.

        A REGISTER answering a challenge is sent by ``receive`` at once and
        is not one of these; an initial REGISTER, a refresh and a retry are.
        """
        return (
            self._register_at is not None
            and now >= self._register_at
            and self._txn is None
            and self._local is not None
            and not self.needs_flow
        )

    def flow_failed(self, now: float, reason: str) -> None:
        """No flow could be opened towards the target: back off as for an unanswered request."""
        if self._txn is None:
            self._no_answer(now, reason)

    def transport_failed(self, now: float) -> None:
        """The flow died or a send failed: the pending REGISTER will not be answered."""
        self.needs_flow = True
        if self._txn is not None:
            outcome = self._txn.transport_failed()
            self._txn = None
            if outcome is not None:
                self.completed = (None, now - self._sent_at)
                self._no_answer(now, outcome.reason)
        elif self.state is RegistrationState.REGISTERED:
            # RFC 5626 §4.4.1: a dead flow means re-registering through a new one.
            self._register_at = now

    def outgoing(self) -> list[bytes]:
        return self._txn.outgoing() if self._txn is not None else []

    def status(self, now: float) -> RegistrationStatus:
        state = self.state
        if (
            state is RegistrationState.REGISTERED
            and self.registered_until is not None
            and now >= self.registered_until
        ):
            state = RegistrationState.REGISTERING
        return RegistrationStatus(
            state,
            self.last_status,
            self.reason,
            self.registered_until,
            self.deadline,
            self.failures,
        )

    def matches(self, response: Response) -> bool:
        txn = self._txn
        return (
            txn is not None
            and response.via.branch == txn.key[0]
            and response.cseq.method == "REGISTER"
            and response.call_id == self.call_id
        )

    # -- answers ---------------------------------------------------------------------

    def receive(self, response: Response, now: float) -> None:
        """Feed a response; one that is not for the pending REGISTER is ignored."""
        if not self.matches(response) or self._txn is None:
            return
        if len(response.vias) != 1:
            return  # RFC 3261 §8.1.3.3: a response with more than one Via is discarded
        final = self._txn.receive(response, now)
        if final is None or final.status < 200:
            return
        self._txn = None
        self.completed = (final.status, now - self._sent_at)
        self.last_status = final.status
        self.reason = sys.intern(final.reason)
        status = final.status
        if status in (401, 407):
            self._challenged(final, now)
        elif self.state is RegistrationState.UNREGISTERING:
            if self._pending_expires and 200 <= status < 300:
                self._send(now, expires=0)  # the REGISTER sent before stop() took effect
            else:
                self._stopped()
        elif 200 <= status < 300:
            self._registered(final, now)
        elif status == 423:
            self._interval_too_brief(final, now)
        elif 300 <= status < 400:
            self._redirected(final, now)
        elif 500 <= status < 600 or status in _TRANSIENT_4XX:
            self._retry_later(now, self._backoff.flow_up, _retry_after(final))
        else:
            self._fail(f"{status} {final.reason}")

    def _registered(self, response: Response, now: float) -> None:
        granted = self._granted_expiry(response)
        if granted <= 0:
            self._retry_later(now, self._backoff.flow_up, None)
            self.reason = "registrar kept no binding for our contact"
            return
        self.state = RegistrationState.REGISTERED
        self.failures = 0
        self._redirects = 0
        self.registered_until = now + granted
        try:
            self.service_route = tuple(response.header_name_addrs("Service-Route"))
        except SipError:  # malformed: ignored, as a malformed Contact is
            self.service_route = ()
        flow_timer = response.headers.get("Flow-Timer")
        self.flow_timer = parse_delta_seconds(flow_timer) if flow_timer else None
        # Registrars count expiry in whole seconds, so keep a margin of at least
        # REFRESH_MARGIN even when the jittered fraction would leave less.
        fraction = self._rng.uniform(0.75, 0.9)
        self._register_at = now + max(1.0, min(granted * fraction, granted - REFRESH_MARGIN))

    def _granted_expiry(self, response: Response) -> int:
        """Our contact's expiry as the registrar stated it (RFC 3261 §10.2.4)."""
        try:
            contacts = response.contacts
        except SipError:
            contacts = []
        for contact in contacts:
            if self._is_ours(contact):
                value = contact.params.get("expires")
                seconds = None if value is None else parse_delta_seconds(value)
                if seconds is not None:
                    return seconds
                break
        header = response.expires
        return header if header is not None else self._expires

    def _is_ours(self, contact: NameAddr) -> bool:
        instance = contact.params.get("+sip.instance")
        if instance is not None:
            return unquote(instance) == f"<{self.config.instance_id}>"
        uri = contact.uri
        return isinstance(uri, SipUri) and uri.user == self.config.contact_user

    def _challenged(self, response: Response, now: float) -> None:
        is_proxy = response.status == 407
        header = "Proxy-Authenticate" if is_proxy else "WWW-Authenticate"
        challenges = []
        for value in response.headers.get_all(header):
            try:
                challenges.append(parse_challenge(value))
            except SipError:
                continue
        challenge = select_challenge(challenges)
        if challenge is None:
            self._fail("no usable authentication challenge")
            return
        key = (is_proxy, challenge.realm)
        self._auth_rounds += 1
        if (key == self._fresh and not challenge.stale) or (self._auth_rounds > MAX_AUTH_ROUNDS):
            self._challenges = tuple(c for c in self._challenges if c[0] != key)
            if self.state is RegistrationState.UNREGISTERING:
                self._stopped()
            else:
                self._fail("authentication failed")
            return
        self._challenges = (*(c for c in self._challenges if c[0] != key), (key, challenge))
        self._fresh = key
        expires = 0 if self.state is RegistrationState.UNREGISTERING else self._expires
        self._send(now, expires, keep_fresh=True)

    def _interval_too_brief(self, response: Response, now: float) -> None:
        try:
            minimum = response.min_expires
        except SipError:
            minimum = None
        if minimum is None or minimum <= self._expires:
            self._fail("423 without a usable Min-Expires")
            return
        self._expires = minimum
        self._send(now, self._expires)

    def _redirected(self, response: Response, now: float) -> None:
        self._redirects += 1
        try:
            targets = [c.uri for c in response.contacts if isinstance(c.uri, SipUri)]
        except SipError:
            targets = []
        if not targets or self._redirects > MAX_REDIRECTS:
            self._fail(f"{response.status} without a usable redirect")
            return
        first = targets[0]
        self._target = SipUri(
            host=first.host,
            port=first.port,
            scheme=first.scheme,
            params={k: v for k, v in first.params.items() if k == "transport"},
        )
        self.needs_flow = True
        self._register_at = now

    def _no_answer(self, now: float, reason: str) -> None:
        self.last_status = None
        if self.state is RegistrationState.UNREGISTERING:
            self._stopped()
            return
        self.needs_flow = True
        self._retry_later(now, self._backoff.no_flow, None)
        self.reason = reason

    def _retry_later(self, now: float, base: float, retry_after: float | None) -> None:
        self.failures += 1
        if self.state is not RegistrationState.REGISTERED:
            self.state = RegistrationState.REGISTERING
        cap = self._backoff.cap
        if retry_after is not None:
            delay = min(retry_after, cap)
        else:
            ceiling = min(cap, base * 2 ** (self.failures - 1))
            delay = ceiling * self._rng.uniform(0.5, 1.0)
        self._register_at = now + delay

    def _fail(self, reason: str) -> None:
        self.state = RegistrationState.FAILED
        self.reason = reason
        self.registered_until = None
        self._register_at = None

    def _stopped(self) -> None:
        self.state = RegistrationState.STOPPED
        self.registered_until = None
        self._register_at = None
        self._txn = None

    # -- building REGISTER -----------------------------------------------------------

    def _send(self, now: float, expires: int, *, keep_fresh: bool = False) -> None:
        local = self._local
        if local is None:
            raise RuntimeError("REGISTER before the session was bound to a flow")
        if not keep_fresh:
            self._fresh = None
        self._cseq += 1
        self._sent_at = now
        self._pending_expires = expires
        branch = new_branch()
        self._txn = ClientNonInviteTransaction(
            self._build(local, expires, branch),
            now,
            reliable=local.transport != "udp",
            timers=self._timers,
            branch=branch,
        )

    def _build(self, local: LocalAddress, expires: int, branch: str) -> Request:
        config = self.config
        aor = str(config.aor)
        shown = "" if config.display_name is None else quote(config.display_name) + " "
        transport = local.transport.upper()
        contact_uri = SipUri(
            host=local.host,
            port=local.port,
            user=config.contact_user,
            params={} if local.transport == "udp" else {"transport": local.transport},
        )
        fields = [
            ("Via", f"SIP/2.0/{transport} {local.host}:{local.port};rport;branch={branch}"),
            ("Max-Forwards", "70"),
        ]
        if config.outbound_proxy is not None:
            fields.append(("Route", f"<{config.outbound_proxy};lr>"))
        fields += [
            ("From", f"{shown}<{aor}>;tag={self._from_tag}"),
            ("To", f"{shown}<{aor}>"),
            ("Call-ID", self.call_id),
            ("CSeq", f"{self._cseq} REGISTER"),
            (
                "Contact",
                f'<{contact_uri}>;+sip.instance="<{config.instance_id}>";reg-id={config.reg_id}'
                + (";expires=0" if expires == 0 else ""),
            ),
            ("Expires", str(expires)),
            ("Supported", "path, outbound"),
            ("User-Agent", config.user_agent),
        ]
        request = Request("REGISTER", self._target, fields)
        for (is_proxy, _realm), challenge in self._challenges:
            name = "Proxy-Authorization" if is_proxy else "Authorization"
            request.headers.add(
                name, self._digest.authorize(challenge, "REGISTER", str(self._target))
            )
        return request


def _retry_after(response: Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    m = _RETRY_AFTER.match(value)
    return float(m.group(1)) if m else None
