"""Requests that reach the relay's SIP endpoint, answered statelessly.

The provider's servers send OPTIONS pings along registration flows; they are
answered 200.  Calls and messages cannot reach anybody yet: INVITE and
MESSAGE get 480 Temporarily Unavailable.  Requests outside a dialog that
sipis does not hold get 481, malformed ones the status their error names.
"""

from __future__ import annotations

import logging

from sipis.sip.errors import SipError
from sipis.sip.message import ParseError, Request, Response
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


def handle(request: Request | ParseError, flow: Flow) -> None:
    """Answer ``request`` over the flow it came on."""
    response = answer(request)
    if response is None:
        return
    try:
        source = request.partial if isinstance(request, ParseError) else request
        assert source is not None
        flow.reply(response.serialize(), source.via)
    except (SipError, FlowClosed) as exc:
        log.debug("no answer sent on %r: %s", flow, exc)
