"""Incoming calls and messages: what arrives on a binding becomes a push.

Theory of operation
-------------------
Only a request that arrives on a live binding's flow (so from its
registrar), addressed to that binding's unguessable contact user, can reach
an instance; anything else (a scanner, a spoofed packet from another
address, a stale contact) gets one stateless 404 and never a push.

INVITE::

    arrives --100 Trying--> pushing --push outcome--> ringing (180, Push-Status: sent|failed)
        |                      |                         |
        |                      +--------- CANCEL --------+--> 487 + "cancelled" push
        |                      |                         |    ("answered elsewhere" if the
        |                      |                         |     CANCEL says Reason: SIP;cause=200)
        |                      +------ ring timeout -----+--> 480 + "missed call" push
        +-- same Call-ID and From tag as a call already held (a forked copy): 482, no push

The call push must beat the ring timeout: its retries stop at the call's
end.  The INVITE's server transaction holds it meanwhile; the device
hand-off takes held calls from here.  A call's (Call-ID, From tag) is
remembered for a while after it ends, so a late forked copy does not push
again.

MESSAGE: the body is stored encrypted in the instance's queue, then 200,
then a message push; typing notifications are answered and dropped,
delivery receipts stored without a push; bodies over the limit get 413.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

from sipis.bindings import Binding, BindingManager
from sipis.inbound import answer
from sipis.instances import InstanceGone, Instances
from sipis.metrics import Metrics
from sipis.push.base import Delivered, Kind, Routing
from sipis.push.compose import compose
from sipis.push.payload import call_reference
from sipis.push.sender import PushSender
from sipis.server_transactions import ServerTransaction, ServerTransactions
from sipis.sip.message import Request, Response
from sipis.sip.registration import RegistrationState
from sipis.sip.uas import UasPolicy, make_response, new_tag, preflight
from sipis.sip.uri import SipUri
from sipis.store import StoreError
from sipis.transport.flow import Flow

log = logging.getLogger(__name__)

INVITE_POLICY = UasPolicy(
    methods=("INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "MESSAGE"),
    content_types=("application/sdp",),
    answer_types={"INVITE": ("application/sdp",)},
)
MESSAGE_POLICY = UasPolicy(methods=INVITE_POLICY.methods, content_types=None)
TYPING = "application/im-iscomposing+xml"
RECEIPT = "message/imdn+xml"
PUSH_STATUS = "Push-Status"
# How long an ended call's identity is remembered against late forked copies (Timer H).
REMEMBER_ENDED = 32.0


@dataclass(eq=False)
class HeldCall:
    """An INVITE held while the app is woken."""

    identity: tuple[str, str]
    binding: Binding
    instance_id: str
    account_id: str
    transaction: ServerTransaction
    to_tag: str
    reference: str
    caller: str
    caller_name: str | None
    ends_at: float
    ringing: bool = True
    timer: asyncio.TimerHandle | None = None


class Handoff(Protocol):
    """Who takes held calls and queued messages to the app once it is connected."""

    def call_held(self, call: HeldCall) -> None: ...

    def call_ended(self, call: HeldCall) -> None:
        """The call ended upstream (CANCEL, ring timeout): whatever went to the app stops."""

    def message_queued(self, instance_id: str) -> None: ...


class Calls:
    """Turns INVITE, CANCEL and MESSAGE on bindings into held calls, queued messages and pushes."""

    def __init__(
        self,
        bindings: BindingManager,
        instances: Instances,
        sender: PushSender,
        metrics: Metrics,
        *,
        ring_timeout: float,
        relay_uri: str,
        max_message: int,
    ) -> None:
        self._bindings = bindings
        self._instances = instances
        self._sender = sender
        self._metrics = metrics
        self._ring_timeout = ring_timeout
        self._relay_uri = relay_uri
        self._max_message = max_message
        self._loop = asyncio.get_running_loop()
        self._held: dict[tuple[str, str], HeldCall] = {}
        # calls ended in the last REMEMBER_ENDED seconds, oldest first, with when to forget them
        self._ended: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._background: set[asyncio.Task[None]] = set()
        self.transactions: ServerTransactions | None = None
        self.handoff: Handoff | None = None

    def held(self, instance_id: str) -> list[HeldCall]:
        """The calls ringing for an instance, oldest first."""
        return [c for c in self._held.values() if c.instance_id == instance_id and c.ringing]

    # -- requests ------------------------------------------------------------------

    def admit(self, request: Request, flow: Flow) -> Response | None:
        """Refuse, statelessly, what may not open a transaction: anything for an instance
        that is not on a live binding's flow (404), and what needs no state at all."""
        if request.method in ("INVITE", "CANCEL", "MESSAGE"):
            if self._binding_for(request, flow) is None:
                kind = (
                    self._metrics.messages if request.method == "MESSAGE" else self._metrics.calls
                )
                kind.labels("refused").inc()
                return make_response(request, 404)
            return None
        return answer(request)

    def on_request(self, transaction: ServerTransaction) -> None:
        """An admitted INVITE, CANCEL or MESSAGE, in its transaction."""
        method = transaction.request.method
        if method == "INVITE":
            self._invite(transaction)
        elif method == "CANCEL":
            self._cancel(transaction)
        else:
            self._later(self._message(transaction))

    def _binding_for(self, request: Request, flow: Flow) -> Binding | None:
        """The live binding this request may reach, or None."""
        uri = request.uri
        if not isinstance(uri, SipUri) or not uri.user:
            return None
        binding = self._bindings.by_contact_user(uri.user)
        if binding is None or binding.flow is not flow:
            return None
        if binding.session.state is not RegistrationState.REGISTERED:
            return None
        return binding

    def _refuse(self, transaction: ServerTransaction, status: int = 404) -> None:
        transaction.respond(make_response(transaction.request, status))

    def _invite(self, transaction: ServerTransaction) -> None:
        request = transaction.request
        binding = self._binding_for(request, transaction.flow)
        if binding is None:  # the binding went away since the request was admitted
            self._refuse(transaction)
            return
        rejection = preflight(request, INVITE_POLICY)
        if rejection is not None:
            transaction.respond(rejection)
            return
        if request.to.tag is not None:
            self._refuse(transaction, 481)  # a re-INVITE for a dialog that does not exist
            return
        identity = (request.call_id, request.from_.tag or "")
        self._forget_ended()
        if identity in self._held or identity in self._ended:
            self._refuse(transaction, 482)  # RFC 3261 §8.2.2.2: a merged (forked) request
            return
        instance_id, account_id = binding.key.split("/", 1)
        to_tag = new_tag()
        transaction.respond(make_response(request, 100))
        call = HeldCall(
            identity=identity,
            binding=binding,
            instance_id=instance_id,
            account_id=account_id,
            transaction=transaction,
            to_tag=to_tag,
            reference=call_reference(*identity),
            caller=str(request.from_.uri),
            caller_name=request.from_.display_name,
            ends_at=self._loop.time() + self._ring_timeout,
        )
        self._held[identity] = call
        call.timer = self._loop.call_at(call.ends_at, self._ring_out, call)
        self._later(self._push_call(call))
        if self.handoff is not None:
            self.handoff.call_held(call)

    async def _push_call(self, call: HeldCall) -> None:
        routing = self._instances.routing(call.instance_id)
        push = (
            None
            if routing is None
            else compose(
                Kind.CALL,
                routing,
                relay=self._relay_uri,
                account=call.account_id,
                call=call.reference,
                caller=call.caller,
                caller_name=call.caller_name,
            )
        )
        status = "failed"
        if push is not None:
            self._metrics.invite_to_push.observe(self._loop.time() - call.transaction.arrived)
            outcome = await self._sender.send(
                push, deadline=call.ends_at, wanted=lambda: call.ringing
            )
            status = "sent" if isinstance(outcome, Delivered) else "failed"
        if call.ringing:
            call.transaction.respond(
                make_response(
                    call.transaction.request,
                    180,
                    to_tag=call.to_tag,
                    headers=[(PUSH_STATUS, status)],
                )
            )

    def _ring_out(self, call: HeldCall) -> None:
        if not call.ringing:
            return
        self._end(call, 480, "missed")
        self._notify(call, Kind.CALL_MISSED)

    def _cancel(self, transaction: ServerTransaction) -> None:
        request = transaction.request
        invite = self.transactions.invite_cancelled_by(request) if self.transactions else None
        call = self._held.get((request.call_id, request.from_.tag or ""))
        if call is None or invite is None or call.transaction is not invite or not call.ringing:
            self._refuse(transaction, 481)
            return
        # RFC 3261 §9.2: the To tag of the 200 to the CANCEL is the 487's
        transaction.respond(make_response(request, 200, to_tag=call.to_tag))
        elsewhere = _answered_elsewhere(request)
        self._end(call, 487, "answered_elsewhere" if elsewhere else "cancelled")
        self._notify(call, Kind.ANSWERED_ELSEWHERE if elsewhere else Kind.CALL_CANCELLED)

    def _end(self, call: HeldCall, status: int, outcome: str) -> None:
        """End a ringing call from here: the final answer upstream, the app's leg cancelled."""
        call.transaction.respond(
            make_response(call.transaction.request, status, to_tag=call.to_tag)
        )
        self._over(call, outcome)
        if self.handoff is not None:
            self.handoff.call_ended(call)

    def answered(self, call: HeldCall) -> None:
        """The app answered the call (its 2xx went upstream through the relay)."""
        self._over(call, "relayed")

    def finish(self, call: HeldCall, response: Response, outcome: str) -> None:
        """End a ringing call with the app's own final answer."""
        call.transaction.respond(response)
        self._over(call, outcome)

    def _over(self, call: HeldCall, outcome: str) -> None:
        call.ringing = False
        if call.timer is not None:
            call.timer.cancel()
        self._held.pop(call.identity, None)
        self._ended[call.identity] = self._loop.time() + REMEMBER_ENDED
        self._metrics.calls.labels(outcome).inc()

    def _notify(self, call: HeldCall, kind: Kind) -> None:
        routing = self._instances.routing(call.instance_id)
        push = (
            None
            if routing is None
            else compose(
                kind,
                routing,
                account=call.account_id,
                call=call.reference,
                caller=call.caller,
                caller_name=call.caller_name,
            )
        )
        if push is not None:
            self._later(self._sender.send(push))

    def _forget_ended(self) -> None:
        now = self._loop.time()
        while self._ended and next(iter(self._ended.values())) <= now:
            self._ended.popitem(last=False)

    # -- messages ------------------------------------------------------------------

    async def _message(self, transaction: ServerTransaction) -> None:
        request = transaction.request
        binding = self._binding_for(request, transaction.flow)
        if binding is None:  # the binding went away since the request was admitted
            self._refuse(transaction)
            return
        rejection = preflight(request, MESSAGE_POLICY)
        if rejection is not None:
            transaction.respond(rejection)
            return
        if len(request.body) > self._max_message:
            self._metrics.messages.labels("too_large").inc()
            self._refuse(transaction, 413)
            return
        content_type = (request.headers.get("Content-Type") or "text/plain").split(";")[0].strip()
        if content_type.lower() == TYPING:
            self._metrics.messages.labels("typing").inc()
            transaction.respond(make_response(request, 200))
            return
        instance_id, account_id = binding.key.split("/", 1)
        try:
            await self._instances.queue_message(
                instance_id,
                account_id,
                str(request.from_.uri),
                content_type,
                request.body,
                request_key=_request_key(request),
            )
        except (StoreError, InstanceGone) as exc:
            log.warning("message for instance %s not stored: %s", instance_id, type(exc).__name__)
            self._refuse(transaction, 500 if isinstance(exc, StoreError) else 404)
            return
        transaction.respond(make_response(request, 200))
        if self.handoff is not None:
            self.handoff.message_queued(instance_id)
        if content_type.lower() == RECEIPT or _carries_receipt(request):
            self._metrics.messages.labels("receipt").inc()
            return
        self._metrics.messages.labels("queued").inc()
        routing = self._instances.routing(instance_id)
        push = (
            None
            if routing is None
            else compose(
                Kind.MESSAGE,
                routing,
                relay=self._relay_uri,
                account=account_id,
                caller=str(request.from_.uri),
                caller_name=request.from_.display_name,
            )
        )
        if push is not None:
            await self._sender.send(push)

    # -- lifetime notices ------------------------------------------------------------

    async def notify_expiring(self, routing: Routing) -> None:
        push = compose(Kind.EXPIRING, routing)
        if push is not None:
            await self._sender.send(push)

    async def notify_erased(self, routing: Routing, reason: str) -> None:
        """Tell the app its instance is gone, unless its token is what failed."""
        if reason == "token_invalid":
            return
        push = compose(Kind.ERASED, routing)
        if push is not None:
            await self._sender.send(push)

    # -- tasks ---------------------------------------------------------------------------

    def _later(self, work: Awaitable[object]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(_discard(work))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)

    async def close(self) -> None:
        for call in list(self._held.values()):
            if call.ringing:
                self._end(call, 480, "missed")
        # every push in flight, those of the calls just ended included
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


async def _discard(work: Awaitable[object]) -> None:
    await work


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("call handling failed", exc_info=task.exception())


def _answered_elsewhere(cancel: Request) -> bool:
    """RFC 3326: ``Reason: SIP;cause=200`` on a CANCEL means another device answered."""
    for value in cancel.headers.values("Reason"):
        protocol, _, params = value.partition(";")
        if protocol.strip().upper() == "SIP" and "cause=200" in params.replace(" ", ""):
            return True
    return False


def _carries_receipt(request: Request) -> bool:
    """A CPIM-wrapped IMDN delivery or display notification (RFC 5438)."""
    content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    return content_type == "message/cpim" and RECEIPT.encode() in request.body.lower()


def _request_key(request: Request) -> str:
    """What identifies a request across retransmissions (RFC 3261 §17.2.3 without the
    branch, which a proxy may change): Call-ID, From tag and CSeq, hashed."""
    cseq = request.cseq
    identity = f"{request.call_id}\n{request.from_.tag}\n{cseq.number} {cseq.method}"
    return hashlib.sha256(identity.encode()).hexdigest()[:32]
