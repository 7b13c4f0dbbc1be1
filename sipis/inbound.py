"""Requests that reach the relay's SIP endpoint.

The provider's servers send OPTIONS pings along registration flows; they are
answered 200.  What nobody else takes gets a stateless answer here: INVITE
and MESSAGE 480 Temporarily Unavailable, any request within a dialog sipis
does not hold 481, malformed ones the status their error names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sipis.server_transactions import ServerTransaction, ServerTransactions
from sipis.sip.errors import SipError
from sipis.sip.message import ParseError, Request, Response
from sipis.sip.transaction import DEFAULT_TIMERS, Timers
from sipis.sip.uas import UasPolicy, make_response, preflight
from sipis.transport.flow import Flow, FlowClosed

log = logging.getLogger(__name__)

METHODS = ("ACK", "BYE", "CANCEL", "INVITE", "MESSAGE", "OPTIONS")
POLICY = UasPolicy(
    methods=METHODS,
    content_types=("application/sdp", "text/plain", "message/cpim"),
    answer_types={"INVITE": ("application/sdp",)},
)
_ALLOW = ("Allow", ", ".join(METHODS))


def answer(request: Request | ParseError) -> Response | None:
    """The stateless answer to ``request``, or None when none is due (ACK)."""
    if isinstance(request, ParseError):
        partial = request.partial
        if not isinstance(partial, Request) or partial.method == "ACK":
            return None
        extra = [_ALLOW] if request.status in (405, 501) else []
        return make_response(partial, request.status, headers=extra)
    if request.method == "ACK":
        return None
    if request.to.tag is not None:
        return make_response(request, 481)  # RFC 3261 §12.2.2: no such dialog here
    rejection = preflight(request, POLICY)
    if rejection is not None:
        return rejection
    if request.method == "OPTIONS":
        return make_response(
            request, 200, headers=[_ALLOW, ("Accept", "application/sdp"), ("Supported", "")]
        )
    if request.method in ("INVITE", "MESSAGE"):
        return make_response(request, 480)
    return make_response(request, 481)


class Inbound:
    """Gives each request that reaches the SIP endpoint its server transaction.

    ``on_request`` answers it (by default: ``answer``); ``admit`` may refuse
    it first, statelessly.  A malformed request
    cannot have a transaction (its keys may be what is broken) and is
    answered statelessly, once per copy.
    """

    def __init__(
        self,
        on_request: Callable[[ServerTransaction], None] | None = None,
        *,
        admit: Callable[[Request, Flow], Response | None] | None = None,
        on_ack: Callable[[Request, Flow], None] | None = None,
        timers: Timers = DEFAULT_TIMERS,
    ) -> None:
        self.transactions = ServerTransactions(
            on_request or self._answer, admit=admit, on_ack=on_ack, timers=timers
        )

    def handle(self, request: Request | ParseError, flow: Flow) -> None:
        if isinstance(request, Request):
            self.transactions.receive(request, flow)
            return
        response = answer(request)
        partial = request.partial
        if response is None or partial is None:
            return
        try:
            flow.reply(response.serialize(), partial.via)
        except (SipError, FlowClosed) as exc:
            log.debug("no answer sent on %r: %s", flow, exc)

    def _answer(self, transaction: ServerTransaction) -> None:
        response = answer(transaction.request)
        if response is not None:
            transaction.respond(response)

    def close(self) -> None:
        self.transactions.close()
