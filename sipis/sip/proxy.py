"""Relaying requests and responses as a stateful proxy (RFC 3261 §16), sans-IO.

Theory of operation
-------------------
sipis relays a call between the provider's side (where its binding lives)
and the app (which reaches it on the device port).  Both sides see it as a
proxy in the signalling path; media goes straight between the two ends.

Receiving a request (§16.4): Route entries naming this node are taken off
the top.  A request whose Request-URI names this node although Route
entries remain came from a strict router (RFC 2543): its last Route entry
is the real Request-URI.

Forwarding a request (§16.6): a copy gets the target as Request-URI,
Max-Forwards one less (``TooManyHops`` when none is left: answer 483), and
this node's Via on top.  A dialog-forming request also gets two
Record-Route entries (RFC 5658 double record-routing): the upper one names
this node as the side the request leaves by reaches it, the lower one as
the side it came from does, so each end's route set begins with an address
it can reach, and the other entry is this node's own too.

Forwarding a response (§16.7): the top Via, this node's, comes off.

Requests this node sends in a dialog on behalf of one end (a BYE for an
app that vanished) follow §12.2.1.1: the route set as Route, the remote
target as Request-URI, or for a strict first hop the other way round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from .errors import SipError
from .headers import CSeq, NameAddr, Via
from .message import Headers, Request, Response
from .uri import SipUri, Uri

DEFAULT_MAX_FORWARDS = 70
# The user part of this node's Record-Route URIs: a Request-URI carrying it
# was put there by a strict router.
RECORD_ROUTE_USER = "rr"


class TooManyHops(SipError):
    """Max-Forwards reached 0: the request must be answered 483, not forwarded."""

    def __init__(self) -> None:
        super().__init__("Max-Forwards exhausted", status=483)


def own_routes_removed(request: Request, is_own: Callable[[SipUri], bool]) -> Request:
    """``request`` with this node's Route entries taken off the top (§16.4), in place.

    ``is_own`` says whether a URI names one of this node's listeners.
    """
    headers = request.headers
    uri = request.uri
    if (
        isinstance(uri, SipUri)
        and uri.user == RECORD_ROUTE_USER
        and is_own(uri)
        and "Route" in headers
    ):
        last = request.header_name_addrs("Route")[-1]
        request.uri = last.uri
        values = headers.values("Route")[:-1]
        headers.remove("Route")
        for value in values:
            headers.add("Route", value)
    while True:
        routes = request.header_name_addrs("Route")
        if not routes or not isinstance(routes[0].uri, SipUri) or not is_own(routes[0].uri):
            return request
        headers.pop_first("Route")


def next_hop(request: Request) -> SipUri:
    """Where a request goes next: its top Route entry, or its Request-URI."""
    routes = request.header_name_addrs("Route")
    uri = routes[0].uri if routes else request.uri
    if not isinstance(uri, SipUri):
        raise SipError(f"cannot route to {uri}", status=416)
    return uri


def forwarded(
    request: Request,
    *,
    via: Via,
    target: Uri | None = None,
    record_route: Sequence[SipUri] = (),
    headers: Iterable[tuple[str, str]] = (),
) -> Request:
    """The copy of ``request`` to send on (§16.6), with ``headers`` appended.

    ``record_route`` entries are put on top in the order given (the first
    ends up topmost).  Raises ``TooManyHops`` when Max-Forwards is 0.
    """
    hops = request.max_forwards
    if hops is not None and hops <= 0:
        raise TooManyHops()
    copy = Request(
        request.method, request_uri(target or request.uri), request.headers.copy(), request.body
    )
    copy.headers.set("Max-Forwards", str(DEFAULT_MAX_FORWARDS if hops is None else hops - 1))
    for uri in reversed(record_route):
        copy.headers.prepend("Record-Route", f"<{uri}>")
    copy.headers.prepend("Via", str(via))
    for name, value in headers:
        copy.headers.add(name, value)
    return copy


def forwarded_response(response: Response) -> Response:
    """The copy of ``response`` to send back towards the requester (§16.7)."""
    copy = Response(response.status, response.reason, response.headers.copy(), response.body)
    copy.headers.pop_first("Via")
    return copy


def request_uri(uri: Uri) -> Uri:
    """``uri`` fit for a Request-URI: without the headers component, which a
    Request-URI may not carry (RFC 3261 §19.1.1 table 1; §16.6 step 2)."""
    if not isinstance(uri, SipUri) or not uri.headers:
        return uri
    return SipUri(uri.host, uri.user, uri.port, uri.scheme, uri.password, dict(uri.params))


def route_uri(host: str, port: int, transport: str) -> SipUri:
    """The loose-routing URI naming this node on one listener, for Record-Route."""
    return SipUri(
        host, user=RECORD_ROUTE_USER, port=port, params={"transport": transport.lower(), "lr": None}
    )


def in_dialog_request(
    method: str,
    *,
    call_id: str,
    local: NameAddr,
    remote: NameAddr,
    remote_target: Uri,
    route_set: Sequence[NameAddr],
    cseq: int,
    via: Via,
) -> Request:
    """A request within a dialog on behalf of one end (§12.2.1.1).

    ``local`` and ``remote`` are that end's From and To, tags included;
    ``route_set`` is the dialog's route set as that end sees it.
    """
    uri = request_uri(remote_target)
    routes = [str(r) for r in route_set]
    if route_set and isinstance(route_set[0].uri, SipUri) and "lr" not in route_set[0].uri.params:
        uri = request_uri(route_set[0].uri)
        routes = [*routes[1:], f"<{remote_target}>"]
    headers = Headers(
        [
            ("Via", str(via)),
            ("Max-Forwards", str(DEFAULT_MAX_FORWARDS)),
            *(("Route", r) for r in routes),
            ("From", str(local)),
            ("To", str(remote)),
            ("Call-ID", call_id),
            ("CSeq", str(CSeq(cseq, method))),
        ]
    )
    return Request(method, uri, headers)
