"""The device registrar: apps woken by a push REGISTER here to pick up calls and messages.

Theory of operation
-------------------
An app REGISTERs ``sip:<instance id>@<relay>`` on the device port (TLS,
TCP or UDP), digest-authenticated with its instance id as username and its
instance secret as password.  Only the H(A1) values made from the secret
are stored (``Instances.device_digest``); nonces are stateless
(``DigestServer``).

    REGISTER --no or stale credentials--> 401 + challenges (stale=true if so)
        |------wrong credentials, unknown instance----------> 403
        |------source over its failure budget---------------> 403, nothing checked
        +--right--> 200: the instance's device is (flow, Contact, expiry)

An instance has at most one device; a new registration replaces the old
one (the newest flow wins).  The device is gone when its registration
expires, when the app sends Expires: 0, or when its flow closes; whoever
relays to it hears ``on_registered(instance id)`` and ``on_gone(instance
id)``.  Devices live in memory only: after a restart the next push brings
the app back.

Failed checks are counted per source address; an address that failed
``max_failures`` times in the last minute gets 403 without any check until
its failures age out.  Unknown instance ids get the same challenge and the
same 403 as a wrong secret, after the same work.  The 401s and 403s are
answered statelessly (a retransmission is answered anew), so REGISTERs
that never authenticate leave no transaction behind.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from sipis.crypto import CryptoError
from sipis.instances import Instances
from sipis.server_transactions import ServerTransaction
from sipis.sip.digest import Credentials, parse_credentials
from sipis.sip.digest_server import DigestServer, Verdict
from sipis.sip.errors import SipError
from sipis.sip.headers import NameAddr, parse_delta_seconds
from sipis.sip.message import Request
from sipis.sip.uas import make_response
from sipis.sip.uri import SipUri
from sipis.store import StoreError
from sipis.transport.flow import Flow
from sipis.transport.udp import UdpEndpoint, UdpFlow

log = logging.getLogger(__name__)

MIN_EXPIRES = 30
MAX_EXPIRES = 3600
DEFAULT_EXPIRES = 600
FAILURE_WINDOW = 60.0
# Source addresses whose failures are remembered; the oldest is forgotten first.
TRACKED_SOURCES = 10_000


@dataclass(eq=False)
class Device:
    """An app connected to the relay: where requests for its instance go."""

    instance_id: str
    flow: Flow
    contact: SipUri
    expires_at: float
    timer: asyncio.TimerHandle | None = None


class FailureBudget:
    """Failed authentications per source address in a sliding window."""

    def __init__(self, limit: int, window: float = FAILURE_WINDOW) -> None:
        self._limit = limit
        self._window = window
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def exhausted(self, source: str, now: float) -> bool:
        failures = self._failures.get(source)
        if failures is None:
            return False
        while failures and failures[0] <= now - self._window:
            failures.popleft()
        if not failures:
            del self._failures[source]
            return False
        return len(failures) >= self._limit

    def failed(self, source: str, now: float) -> None:
        failures = self._failures.pop(source, None) or deque()
        failures.append(now)
        self._failures[source] = failures
        if len(self._failures) > TRACKED_SOURCES:
            self._failures.popitem(last=False)


class Devices:
    """Registers apps on the device port and keeps track of where each instance is."""

    def __init__(
        self,
        instances: Instances,
        *,
        realm: str,
        algorithms: tuple[str, ...],
        max_failures: int,
        udp: UdpEndpoint | None,
        on_registered: Callable[[str], None],
        on_gone: Callable[[str], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._instances = instances
        self._realm = realm
        self._udp = udp
        self._on_registered = on_registered
        self._on_gone = on_gone
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        self._digest = DigestServer(secrets.token_bytes(32), algorithms=algorithms)
        self._budget = FailureBudget(max_failures)
        self._devices: dict[str, Device] = {}
        self._by_flow: dict[Flow, set[str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, instance_id: str) -> Device | None:
        return self._devices.get(instance_id)

    def on_flow(self, instance_id: str, flow: Flow) -> bool:
        """Whether ``flow`` is the one the instance's device registered over."""
        device = self._devices.get(instance_id)
        return device is not None and device.flow is flow

    def __len__(self) -> int:
        return len(self._devices)

    def register(self, transaction: ServerTransaction) -> None:
        task = asyncio.ensure_future(self._register(transaction))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def drop(self, instance_id: str) -> None:
        """Forget the instance's device (its instance was erased)."""
        device = self._devices.pop(instance_id, None)
        if device is not None:
            self._release(device)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for device in list(self._devices.values()):
            self._release(device)
        self._devices.clear()

    # -- REGISTER -------------------------------------------------------------------------

    async def _register(self, transaction: ServerTransaction) -> None:
        request = transaction.request
        source = transaction.flow.remote[0]
        now = self._clock()
        if self._budget.exhausted(source, now):
            transaction.respond_statelessly(make_response(request, 403, "Too Many Failures"))
            return
        try:
            instance_id = request.to.sip_uri.user or ""
        except SipError as exc:  # a To that is no SIP URI names no instance
            transaction.respond(make_response(request, exc.status))
            return
        try:
            stored = await self._instances.device_digest(instance_id)
        except (StoreError, CryptoError) as exc:
            log.warning("instance %s: digest data unreadable (%s)", instance_id, type(exc).__name__)
            transaction.respond(make_response(request, 500))
            return
        realm = stored.realm if stored is not None else self._realm
        answer = _authorization(request)
        if answer is None:
            self._challenge(transaction, realm, stale=False)
            return
        verdict = self._digest.check(
            answer,
            method="REGISTER",
            uri=str(request.uri),
            realm=realm,
            ha1=None if stored is None else stored.ha1,
            now=now,
        )
        if verdict is Verdict.STALE:
            self._challenge(transaction, realm, stale=True)
            return
        if verdict is not Verdict.OK or answer.params.get("username") != instance_id:
            self._budget.failed(source, now)
            log.info("device REGISTER from %s refused: wrong credentials", source)
            transaction.respond_statelessly(make_response(request, 403))
            return
        self._registered(transaction, instance_id)

    def _challenge(self, transaction: ServerTransaction, realm: str, *, stale: bool) -> None:
        values = self._digest.challenges(realm, self._clock(), stale=stale)
        headers = [("WWW-Authenticate", value) for value in values]
        transaction.respond_statelessly(make_response(transaction.request, 401, headers=headers))

    def _registered(self, transaction: ServerTransaction, instance_id: str) -> None:
        request = transaction.request
        try:
            contacts = request.contacts
        except SipError as exc:
            transaction.respond(make_response(request, exc.status))
            return
        wildcard = request.headers.get("Contact") == "*"
        expires = _requested_expires(request, contacts)
        if wildcard or expires == 0:
            if wildcard and (contacts or expires != 0):
                transaction.respond(make_response(request, 400, "Bad Wildcard"))
                return
            self._unregister(instance_id)
            transaction.respond(make_response(request, 200, headers=_date()))
            return
        if len(contacts) != 1 or not isinstance(contacts[0].uri, SipUri):
            transaction.respond(make_response(request, 400, "One SIP Contact Expected"))
            return
        if expires < MIN_EXPIRES:
            transaction.respond(
                make_response(request, 423, headers=[("Min-Expires", str(MIN_EXPIRES))])
            )
            return
        expires = min(expires, MAX_EXPIRES)
        flow = self._kept(transaction.flow)
        contact = contacts[0]
        self._set(instance_id, flow, contact, expires)
        reply = NameAddr(contact.uri, params={"expires": str(expires)})
        transaction.respond(
            make_response(request, 200, headers=[("Contact", str(reply)), *_date()])
        )
        log.info("instance %s: app registered over %s", instance_id, flow.transport)
        self._on_registered(instance_id)

    def _kept(self, flow: Flow) -> Flow:
        """The flow to keep for the device: a UDP source gets a flow of its own."""
        if isinstance(flow, UdpFlow) and self._udp is not None:
            return self._udp.flow(flow.remote, keepalive=None)
        return flow

    def _set(self, instance_id: str, flow: Flow, contact: NameAddr, expires: int) -> None:
        previous = self._devices.get(instance_id)
        if previous is not None:
            self._release(previous)
        assert isinstance(contact.uri, SipUri)
        device = Device(instance_id, flow, contact.uri, self._clock() + expires)
        device.timer = self._loop.call_later(expires, self._expired, device)
        self._devices[instance_id] = device
        self._by_flow.setdefault(flow, set()).add(instance_id)
        flow.on_close(self._flow_closed)

    def _unregister(self, instance_id: str) -> None:
        device = self._devices.pop(instance_id, None)
        if device is not None:
            self._release(device)
            log.info("instance %s: app unregistered", instance_id)
            self._on_gone(instance_id)

    def _expired(self, device: Device) -> None:
        if self._devices.get(device.instance_id) is device:
            log.info("instance %s: app registration expired", device.instance_id)
            self._unregister(device.instance_id)

    def _flow_closed(self, flow: Flow) -> None:
        for instance_id in list(self._by_flow.get(flow, ())):
            log.info("instance %s: app flow closed", instance_id)
            self._unregister(instance_id)

    def _release(self, device: Device) -> None:
        if device.timer is not None:
            device.timer.cancel()
        sharing = self._by_flow.get(device.flow)
        if sharing is not None:
            sharing.discard(device.instance_id)
            if not sharing:
                del self._by_flow[device.flow]
                device.flow.forget(self._flow_closed)


def _authorization(request: Request) -> Credentials | None:
    """The first digest Authorization value, parsed; None if there is none usable."""
    for value in request.headers.get_all("Authorization"):
        try:
            credentials = parse_credentials(value)
        except SipError:
            continue
        if credentials.is_digest:
            return credentials
    return None


def _requested_expires(request: Request, contacts: list[NameAddr]) -> int:
    for contact in contacts:
        value = contact.params.get("expires")
        seconds = None if value is None else parse_delta_seconds(value)
        if seconds is not None:
            return seconds
    header = request.expires
    return DEFAULT_EXPIRES if header is None else header


def _date() -> list[tuple[str, str]]:
    return [("Date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()))]
