"""The relay: a held call goes to the app once it is connected, and its dialog runs through sipis.

Theory of operation
-------------------
``sipis.calls`` holds an INVITE while the app is woken.  Once the app's
device is registered (``sipis.devices``), the relay forwards the held
INVITE to it over the device flow as a stateful proxy (``sipis.sip.proxy``):
its Via on top, two Record-Route entries (one naming each side), the
account in a ``Sipis-Account`` header; the caller's identity and the SDP
pass untouched, so media goes straight between caller and app.

A forwarded INVITE (a "leg")::

    forwarded --1xx--> relayed upstream (not 100); one with the app's tag opens an early dialog
        |--2xx--> relayed upstream; the call is answered and a dialog kept
        |--3xx-6xx--> relayed upstream (the client transaction ACKs it)
        |--the call ends upstream (CANCEL, ring timeout)--> CANCEL to the app once
        |      a 1xx allows it; a 2xx that still comes is ACKed and BYEd
        +--no answer in time, or the device goes away--> the call is held again
           (cancelled towards the old flow; a new registration within the ring
           timeout forwards it anew)

A dialog is keyed by Call-ID, the caller's tag and the app's tag.  It is
early from the app's first provisional response with that tag (so PRACK
and UPDATE reach the app while it rings) and confirmed by its 2xx; an early
dialog ends with its leg, whichever way that ends.  Every request in it
(BYE, re-INVITE, UPDATE, INFO, PRACK, CANCEL of a re-INVITE, ACK) is
relayed from either side to the other: the relay's Route entries come off,
its Via goes on, answers come back the same way; an ACK for a 2xx travels
alone.  Towards the app a request goes over the instance's current device
flow; towards the caller to the next Route entry, or the caller's Contact,
over the provider side.  CANCELs go out through ``ClientTransactions.cancel``
(after the INVITE's first provisional response), and a relayed re-INVITE
left without a final answer for ``TIMER_C`` seconds is cancelled.

When the device goes away (un-REGISTER, flow lost, expiry), each of its
dialogs has ``grace`` seconds for the app to register again; otherwise the
relay sends a BYE upstream on the app's behalf and forgets the dialog.  A
dialog nobody speaks in for ``IDLE_DIALOG`` seconds is forgotten too (only
a lost BYE leaves one behind).

Queued MESSAGEs go to the app when it registers and whenever one is queued
while it is registered; the app's 2xx erases each from the queue.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

from sipis.bindings import Binding
from sipis.calls import Calls, HeldCall
from sipis.client_transactions import ClientTransaction, ClientTransactions
from sipis.devices import Device, Devices
from sipis.instances import Instances, QueuedMessage
from sipis.metrics import Metrics
from sipis.server_transactions import ServerTransaction, ServerTransactions
from sipis.sip.errors import SipError
from sipis.sip.headers import NameAddr, Via, parse_name_addr
from sipis.sip.message import Headers, Request, Response
from sipis.sip.proxy import (
    RECORD_ROUTE_USER,
    TooManyHops,
    forwarded,
    forwarded_response,
    in_dialog_request,
    next_hop,
    own_routes_removed,
    route_uri,
)
from sipis.sip.transaction import TimedOut, new_branch
from sipis.sip.uas import make_response, new_tag
from sipis.sip.uri import SipUri, Uri
from sipis.store import StoreError
from sipis.transport.flow import Flow, FlowClosed
from sipis.transport.layer import TransportLayer
from sipis.transport.resolver import ResolveError, Resolver

log = logging.getLogger(__name__)

ACCOUNT_HEADER = "Sipis-Account"
# RFC 3261 §16.8: how long a relayed re-INVITE may go without a final answer
TIMER_C = 180.0
IDLE_DIALOG = 24 * 3600.0
_DECLINED = frozenset({486, 600, 603})

DialogKey = tuple[str, str, str]  # Call-ID, caller's tag, app's tag


@dataclass(eq=False)
class Leg:
    """A held call's INVITE as forwarded to the app."""

    call: HeldCall
    flow: Flow
    invite: Request
    cancelling: bool = False
    client: ClientTransaction | None = None
    done: bool = False
    late_tags: set[str] = field(default_factory=set)
    early: list[Dialog] = field(default_factory=list)


@dataclass(eq=False)
class Dialog:
    """An answered call relayed between the caller's side and the app."""

    key: DialogKey
    instance_id: str
    binding: Binding
    caller: str  # the INVITE's From, the caller's tag included
    app: str  # the 2xx's To, the app's tag included
    caller_target: Uri
    caller_routes: tuple[NameAddr, ...]  # the app's route set towards the caller, minus sipis
    app_cseq: int
    grace: asyncio.TimerHandle | None = None
    idle: asyncio.TimerHandle | None = None


class DialogRelay:
    """Forwards held calls to connected apps and relays their dialogs."""

    def __init__(
        self,
        calls: Calls,
        instances: Instances,
        metrics: Metrics,
        clients: ClientTransactions,
        transport: TransportLayer,
        resolver: Resolver,
        *,
        upstream: ServerTransactions,
        device_side: ServerTransactions,
        device_host: str | None,
        grace: float,
    ) -> None:
        self._calls = calls
        self._instances = instances
        self._metrics = metrics
        self._clients = clients
        self._transport = transport
        self._resolver = resolver
        self._upstream = upstream
        self._device_side = device_side
        self._device_host = device_host
        self._grace = grace
        self._loop = asyncio.get_running_loop()
        self.devices: Devices | None = None
        self._legs: dict[HeldCall, Leg] = {}
        self._dialogs: dict[DialogKey, Dialog] = {}
        self._by_instance: dict[str, set[Dialog]] = {}
        self._reinvites: dict[ServerTransaction, ClientTransaction] = {}
        self._own: set[tuple[str, int | None]] = set()
        self._sending: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        """The answered calls being relayed (early dialogs do not count)."""
        return sum(len(dialogs) for dialogs in self._by_instance.values())

    # -- the provider's side ----------------------------------------------------------

    def claims(self, request: Request) -> bool:
        """Whether a request from the provider's side belongs to a relayed dialog."""
        tag = request.to.tag
        return tag is not None and (request.call_id, request.from_.tag or "", tag) in self._dialogs

    def upstream_request(self, transaction: ServerTransaction) -> None:
        request = transaction.request
        dialog = self._dialogs.get((request.call_id, request.from_.tag or "", request.to.tag or ""))
        if dialog is None:
            transaction.respond(make_response(request, 481))
            return
        if request.method == "CANCEL":
            self._cancel_reinvite(transaction, self._upstream)
            return
        self._touch(dialog)
        device = self._device(dialog.instance_id)
        if device is None:
            transaction.respond(make_response(request, 480))
            if request.method == "BYE":
                self._forget(dialog)
            return
        if request.method in ("INVITE", "UPDATE"):
            _refresh_target(dialog, request.contacts)
        out = self._toward_app(transaction, request, device)
        if out is not None:
            self._relay(transaction, out, device.flow, dialog, toward_caller=False)

    def upstream_ack(self, request: Request, flow: Flow) -> None:
        """An ACK that matched no server transaction: a 2xx ACK from the caller."""
        tag = request.to.tag
        dialog = self._dialogs.get((request.call_id, request.from_.tag or "", tag or ""))
        device = None if dialog is None else self._device(dialog.instance_id)
        if dialog is None or device is None:
            return
        self._touch(dialog)
        out = self._toward_app(None, request, device)
        if out is not None:
            _send_quietly(device.flow, out)

    def _toward_app(
        self, transaction: ServerTransaction | None, request: Request, device: Device
    ) -> Request | None:
        try:
            out = forwarded(request, via=self._via(device.flow, self._device_host))
        except TooManyHops:
            if transaction is not None:
                transaction.respond(make_response(request, 483))
            return None
        return own_routes_removed(out, self._is_own)

    # -- the app's side -----------------------------------------------------------------

    def device_admit(self, request: Request, flow: Flow) -> Response | None:
        """What the device port answers statelessly; None lets the request in."""
        method = request.method
        if method == "REGISTER":
            return None
        if method == "OPTIONS":
            return make_response(request, 200, headers=[("Allow", "REGISTER, OPTIONS")])
        tag = request.to.tag
        if tag is None:
            status = 481 if method == "CANCEL" else 403
            return make_response(request, status)
        dialog = self._dialogs.get((request.call_id, tag, request.from_.tag or ""))
        devices = self.devices
        if dialog is None or devices is None or not devices.on_flow(dialog.instance_id, flow):
            return make_response(request, 481)
        return None

    def device_request(self, transaction: ServerTransaction) -> None:
        """An admitted in-dialog request from the app."""
        request = transaction.request
        dialog = self._dialogs.get((request.call_id, request.to.tag or "", request.from_.tag or ""))
        if dialog is None:
            transaction.respond(make_response(request, 481))
            return
        if request.method == "CANCEL":
            self._cancel_reinvite(transaction, self._device_side)
            return
        self._touch(dialog)
        dialog.app_cseq = max(dialog.app_cseq, request.cseq.number)
        self._later(self._toward_caller(transaction, request, dialog))

    def device_ack(self, request: Request, flow: Flow) -> None:
        """A 2xx ACK from the app, for a re-INVITE it sent."""
        dialog = self._dialogs.get((request.call_id, request.to.tag or "", request.from_.tag or ""))
        devices = self.devices
        if dialog is None or devices is None or not devices.on_flow(dialog.instance_id, flow):
            return
        self._touch(dialog)
        self._later(self._toward_caller(None, request, dialog))

    async def _toward_caller(
        self, transaction: ServerTransaction | None, request: Request, dialog: Dialog
    ) -> None:
        stripped = own_routes_removed(
            Request(request.method, request.uri, request.headers.copy(), request.body), self._is_own
        )
        try:
            flow = await self._upstream_flow(next_hop(stripped), dialog.binding)
            out = forwarded(stripped, via=self._via(flow))
        except TooManyHops:
            if transaction is not None:
                transaction.respond(make_response(request, 483))
            return
        except (SipError, ResolveError, ConnectionError, OSError, TimeoutError) as exc:
            log.info("request towards the caller not sent: %s", exc)
            if transaction is not None:
                transaction.respond(make_response(request, 503))
            return
        if transaction is None:
            _send_quietly(flow, out)
        else:
            self._relay(transaction, out, flow, dialog, toward_caller=True)

    async def _upstream_flow(self, hop: SipUri, binding: Binding) -> Flow:
        targets = await self._resolver.resolve(hop.host, hop.port, hop.transport, hop.secure)
        failure: Exception = ConnectionError(f"no flow to {hop}")
        for target in targets:
            try:
                return await self._transport.flow_to(target, verify_tls=binding.verify_tls)
            except (ConnectionError, OSError, TimeoutError) as exc:
                failure = exc
        raise failure

    # -- relaying within a dialog ---------------------------------------------------------

    def _relay(
        self,
        transaction: ServerTransaction,
        out: Request,
        flow: Flow,
        dialog: Dialog,
        *,
        toward_caller: bool,
    ) -> None:
        method = out.method

        def answered(response: Response) -> None:
            if response.status >= 200:
                self._reinvites.pop(transaction, None)
                if toward_caller and method in ("INVITE", "UPDATE") and response.status < 300:
                    _refresh_target(dialog, response.contacts)
                if method == "BYE":
                    self._forget(dialog)
            if response.status != 100:
                transaction.respond(forwarded_response(response))

        def failed(failure: TimedOut) -> None:
            self._reinvites.pop(transaction, None)
            transaction.respond(make_response(transaction.request, 408))
            if method == "BYE":
                self._forget(dialog)

        if method == "INVITE":
            client = self._clients.send(out, flow, answered, failed, timer_c=TIMER_C)
            self._reinvites[transaction] = client
        else:
            self._clients.send(out, flow, answered, failed)

    def _cancel_reinvite(self, cancel: ServerTransaction, side: ServerTransactions) -> None:
        invite = side.invite_cancelled_by(cancel.request)
        client = None if invite is None else self._reinvites.get(invite)
        if invite is None or client is None or client.terminated:
            cancel.respond(make_response(cancel.request, 481))
            return
        cancel.respond(make_response(cancel.request, 200))
        self._clients.cancel(client)

    # -- held calls (``calls.Handoff``) -----------------------------------------------------

    def call_held(self, call: HeldCall) -> None:
        device = self._device(call.instance_id)
        if device is not None:
            self._forward(call, device)

    def call_ended(self, call: HeldCall) -> None:
        leg = self._legs.get(call)
        if leg is None or leg.done:
            return
        self._leg_over(leg)
        self._cancel(leg)

    def message_queued(self, instance_id: str) -> None:
        device = self._device(instance_id)
        if device is not None:
            self._later(self._deliver(instance_id, device))

    def _forward(self, call: HeldCall, device: Device) -> None:
        request = call.transaction.request
        try:
            invite = forwarded(
                request,
                via=self._via(device.flow, self._device_host),
                target=device.contact,
                record_route=[
                    self._route(device.flow, self._device_host),
                    self._route(call.transaction.flow),
                ],
                headers=[(ACCOUNT_HEADER, call.account_id)],
            )
        except TooManyHops:
            response = make_response(request, 483, to_tag=call.to_tag)
            self._calls.finish(call, response, "failed")
            return
        own_routes_removed(invite, self._is_own)
        leg = Leg(call, device.flow, invite)
        self._legs[call] = leg
        log.info("instance %s: call forwarded to the app", call.instance_id)
        leg.client = self._clients.send(
            invite,
            device.flow,
            lambda response: self._leg_answered(leg, response),
            lambda failure: self._leg_failed(leg, failure),
        )

    def _leg_answered(self, leg: Leg, response: Response) -> None:
        call, status = leg.call, response.status
        if status < 200:
            if status > 100 and not leg.cancelling and call.ringing and not leg.done:
                if response.to.tag and (*call.identity, response.to.tag) not in self._dialogs:
                    dialog = self._new_dialog(leg, response)
                    if dialog is not None:
                        leg.early.append(dialog)
                call.transaction.respond(forwarded_response(response))
            return
        if status >= 300:
            if not leg.done:
                self._leg_over(leg)
                if call.ringing and not leg.cancelling:
                    outcome = "declined" if status in _DECLINED else "failed"
                    self._calls.finish(call, forwarded_response(response), outcome)
            return
        dialog = self._dialogs.get((*call.identity, response.to.tag or ""))
        if dialog is not None and dialog not in leg.early:
            call.transaction.respond(forwarded_response(response))  # a 2xx retransmission
        elif call.ringing and not leg.cancelling and not leg.done:
            self._leg_over(leg)
            self._calls.answered(call)
            call.transaction.respond(forwarded_response(response))
            self._keep_dialog(leg, response)
        else:
            self._hang_up_late(leg, response)

    def _leg_failed(self, leg: Leg, failure: TimedOut) -> None:
        if leg.done:
            return
        self._leg_over(leg)
        log.info("instance %s: the app did not take the call (%s)", leg.call.instance_id,
                 failure.reason)  # fmt: skip

    def _leg_over(self, leg: Leg) -> None:
        """The leg will not be answered for its call any more: forget it and its early dialogs."""
        leg.done = True
        if self._legs.get(leg.call) is leg:
            del self._legs[leg.call]
        for dialog in leg.early:
            self._forget(dialog)
        leg.early.clear()

    def _cancel(self, leg: Leg) -> None:
        leg.cancelling = True
        if leg.client is not None:
            self._clients.cancel(leg.client)

    def _hang_up_late(self, leg: Leg, response: Response) -> None:
        """ACK (every copy of) a 2xx for a call that ended meanwhile, and BYE it once."""
        tag = response.to.tag or ""
        contacts = response.contacts
        target = contacts[0].uri if contacts else leg.invite.uri
        number = leg.invite.cseq.number
        host = self._device_host

        def request(method: str, cseq: int) -> Request:
            return in_dialog_request(
                method,
                call_id=leg.invite.call_id,
                local=leg.invite.from_,
                remote=response.to,
                remote_target=target,
                route_set=(),
                cseq=cseq,
                via=self._via(leg.flow, host),
            )

        _send_quietly(leg.flow, request("ACK", number))
        if tag not in leg.late_tags:
            leg.late_tags.add(tag)
            self._clients.send(request("BYE", number + 1), leg.flow, _ignore)

    def _keep_dialog(self, leg: Leg, response: Response) -> None:
        dialog = self._new_dialog(leg, response)
        if dialog is not None:
            self._by_instance.setdefault(dialog.instance_id, set()).add(dialog)

    def _new_dialog(self, leg: Leg, response: Response) -> Dialog | None:
        """The dialog a response from the app makes with the caller, now relayed."""
        call = leg.call
        invite = call.transaction.request
        contacts = invite.contacts
        if not contacts:
            return None
        dialog = Dialog(
            key=(*call.identity, response.to.tag or ""),
            instance_id=call.instance_id,
            binding=call.binding,
            caller=invite.headers.get("From") or "",
            app=response.headers.get("To") or "",
            caller_target=contacts[0].uri,
            caller_routes=tuple(invite.header_name_addrs("Record-Route")),
            app_cseq=0,
        )
        self._dialogs[dialog.key] = dialog
        self._touch(dialog)
        return dialog

    # -- the app's device comes and goes ----------------------------------------------------

    def device_registered(self, instance_id: str) -> None:
        device = self._device(instance_id)
        if device is None:
            return
        for dialog in self._by_instance.get(instance_id, ()):
            if dialog.grace is not None:
                dialog.grace.cancel()
                dialog.grace = None
        for call in self._calls.held(instance_id):
            leg = self._legs.get(call)
            if leg is None or leg.flow is not device.flow:
                if leg is not None:
                    self._leg_over(leg)
                    self._cancel(leg)
                self._forward(call, device)
        self._later(self._deliver(instance_id, device))

    def device_gone(self, instance_id: str) -> None:
        for call in self._calls.held(instance_id):
            leg = self._legs.get(call)
            if leg is not None:
                self._leg_over(leg)
                self._cancel(leg)  # the app may still be there, over a flow it no longer registers
        for dialog in self._by_instance.get(instance_id, ()):
            if dialog.grace is None:
                dialog.grace = self._loop.call_later(self._grace, self._grace_over, dialog)

    def instance_erased(self, instance_id: str) -> None:
        for dialog in list(self._by_instance.get(instance_id, ())):
            self._forget(dialog)
        if self.devices is not None:
            self.devices.drop(instance_id)

    def _grace_over(self, dialog: Dialog) -> None:
        dialog.grace = None
        if self._device(dialog.instance_id) is None and self._dialogs.get(dialog.key) is dialog:
            log.info("instance %s: the app did not come back; ending its call", dialog.instance_id)
            self._forget(dialog)
            self._later(self._bye_upstream(dialog))

    async def _bye_upstream(self, dialog: Dialog) -> None:
        hop = dialog.caller_routes[0].uri if dialog.caller_routes else dialog.caller_target
        if not isinstance(hop, SipUri):
            return
        try:
            flow = await self._upstream_flow(hop, dialog.binding)
        except (SipError, ResolveError, ConnectionError, OSError, TimeoutError) as exc:
            log.info("BYE towards the caller not sent: %s", exc)
            return
        bye = in_dialog_request(
            "BYE",
            call_id=dialog.key[0],
            local=parse_name_addr(dialog.app),
            remote=parse_name_addr(dialog.caller),
            remote_target=dialog.caller_target,
            route_set=dialog.caller_routes,
            cseq=dialog.app_cseq + 1,
            via=self._via(flow),
        )
        bye.headers.add("Reason", 'SIP;cause=480;text="App unreachable"')
        self._clients.send(bye, flow, _ignore)

    def _touch(self, dialog: Dialog) -> None:
        if dialog.idle is not None:
            dialog.idle.cancel()
        dialog.idle = self._loop.call_later(IDLE_DIALOG, self._forget, dialog)

    def _forget(self, dialog: Dialog) -> None:
        for timer in (dialog.grace, dialog.idle):
            if timer is not None:
                timer.cancel()
        dialog.grace = dialog.idle = None
        if self._dialogs.get(dialog.key) is dialog:
            del self._dialogs[dialog.key]
        same = self._by_instance.get(dialog.instance_id)
        if same is not None:
            same.discard(dialog)
            if not same:
                del self._by_instance[dialog.instance_id]

    # -- queued messages -----------------------------------------------------------------

    async def _deliver(self, instance_id: str, device: Device) -> None:
        try:
            messages = await self._instances.queued_messages(instance_id)
        except StoreError as exc:
            log.warning("queued messages for %s not read: %s", instance_id, exc)
            return
        if self._device(instance_id) is not device:
            return
        for message in messages:
            if message.id not in self._sending:
                self._sending.add(message.id)
                self._send_message(instance_id, device, message)

    def _send_message(self, instance_id: str, device: Device, message: QueuedMessage) -> None:
        host = self._device_host or device.flow.local.host
        headers = Headers(
            [
                ("Via", str(self._via(device.flow, self._device_host))),
                ("Max-Forwards", "70"),
                ("From", f"<{message.sender}>;tag={new_tag()}"),
                ("To", f"<sip:{instance_id}@{host}>"),
                ("Call-ID", secrets.token_hex(12)),
                ("CSeq", "1 MESSAGE"),
                ("Date", _http_date(message.received_at)),
                (ACCOUNT_HEADER, message.account_id),
                ("Content-Type", message.content_type),
            ]
        )
        request = Request("MESSAGE", device.contact, headers, message.body)

        def answered(response: Response) -> None:
            if response.status < 200:
                return
            self._sending.discard(message.id)
            if response.status < 300:
                self._metrics.messages.labels("delivered").inc()
                self._later(self._instances.delivered(instance_id, message.id))

        def failed(failure: TimedOut) -> None:
            self._sending.discard(message.id)

        self._clients.send(request, device.flow, answered, failed)

    # -- addresses ------------------------------------------------------------------------

    def _device(self, instance_id: str) -> Device | None:
        return None if self.devices is None else self.devices.get(instance_id)

    def _via(self, flow: Flow, host: str | None = None) -> Via:
        local = flow.local
        params: dict[str, str | None] = {"branch": new_branch(), "rport": None}
        return Via(local.transport.upper(), host or local.host, local.port, params)

    def _route(self, flow: Flow, host: str | None = None) -> SipUri:
        local = flow.local
        uri = route_uri(host or local.host, local.port, local.transport)
        self._own.add((uri.host_key, uri.port))
        return uri

    def _is_own(self, uri: SipUri) -> bool:
        return uri.user == RECORD_ROUTE_USER and (uri.host_key, uri.port) in self._own

    # -- tasks ------------------------------------------------------------------------------

    def _later(self, work: Awaitable[object]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(_discard(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    async def close(self) -> None:
        for dialog in list(self._dialogs.values()):
            self._forget(dialog)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _refresh_target(dialog: Dialog, contacts: list[NameAddr]) -> None:
    """A target refresh from the caller (RFC 3261 §12.2.2): its new Contact."""
    if contacts:
        dialog.caller_target = contacts[0].uri


def _send_quietly(flow: Flow, request: Request) -> None:
    try:
        flow.send(request.serialize())
    except FlowClosed:
        log.debug("%s not sent: %r is closed", request.method, flow)


def _ignore(_: object) -> None:
    return None


def _http_date(at: float) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(at))


async def _discard(work: Awaitable[object]) -> None:
    await work


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("relaying failed", exc_info=task.exception())
