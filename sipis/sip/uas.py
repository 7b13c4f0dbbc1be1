"""What a user agent server does with a request before its application sees it.

Responses are built per RFC 3261 §8.2.6: Via, From, Call-ID and CSeq are
copied as received (raw values, so a half-parsed request can still be
answered), To gets a tag on anything but 100.  ``preflight`` applies the
checks of §8.2.1-§8.2.3 (method, URI scheme, Require, Content-Type, Accept)
in that order and returns the rejection, if any.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from .errors import SipError
from .headers import parse_name_addr
from .message import KNOWN_METHODS, Headers, Request, Response
from .uri import AbsoluteUri

REASON_PHRASES = {
    100: "Trying",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    182: "Queued",
    183: "Session Progress",
    200: "OK",
    202: "Accepted",
    300: "Multiple Choices",
    301: "Moved Permanently",
    302: "Moved Temporarily",
    305: "Use Proxy",
    380: "Alternative Service",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    410: "Gone",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    421: "Extension Required",
    423: "Interval Too Brief",
    429: "Too Many Requests",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    484: "Address Incomplete",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    491: "Request Pending",
    500: "Server Internal Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    600: "Busy Everywhere",
    603: "Decline",
    604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
}


def reason_phrase(status: int) -> str:
    return REASON_PHRASES.get(status) or REASON_PHRASES.get(status - status % 100, "Unknown")


def new_tag() -> str:
    return secrets.token_hex(8)


def make_response(
    request: Request,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> Response:
    """A response to ``request`` (RFC 3261 §8.2.6.2), with ``headers`` appended.

    The To tag is kept if the request had one, else ``to_tag`` (or a fresh
    one) is added to every response but 100.
    """
    source = request.headers
    fields: list[tuple[str, str]] = [("Via", v) for v in source.get_all("Via")]
    for name in ("From", "To", "Call-ID", "CSeq"):
        value = source.get(name)
        if value is None:
            continue
        if name == "To" and status != 100 and not _has_tag(value):
            value = f"{value};tag={to_tag or new_tag()}"
        fields.append((name, value))
    response = Response(status, reason or reason_phrase(status), Headers(fields), body)
    for name, value in headers:
        response.headers.add(name, value)
    return response


def _has_tag(to_value: str) -> bool:
    try:
        return parse_name_addr(to_value).tag is not None
    except SipError:
        return ";tag=" in to_value.replace(" ", "").lower()


@dataclass(frozen=True, slots=True)
class UasPolicy:
    """What this user agent implements, for the checks of RFC 3261 §8.2.

    ``content_types`` are the bodies accepted (None: any); ``answer_types``
    are the content types a successful answer to a method may carry (an
    INVITE's answer carries SDP); an Accept header that admits none of them
    earns a 406.
    """

    methods: Collection[str]
    extensions: Collection[str] = ()
    content_types: Collection[str] | None = ("application/sdp",)
    uri_schemes: Collection[str] = ("sip", "sips")
    answer_types: dict[str, tuple[str, ...]] | None = None


def preflight(request: Request, policy: UasPolicy) -> Response | None:
    """The rejection RFC 3261 §8.2.1-§8.2.3 calls for, or None to go ahead."""
    method = request.method
    allow = ("Allow", ", ".join(sorted(policy.methods)))
    if method not in policy.methods:
        status = 405 if method in KNOWN_METHODS else 501
        return make_response(request, status, headers=[allow])
    if isinstance(request.uri, AbsoluteUri) or request.uri.scheme not in policy.uri_schemes:
        return make_response(request, 416)
    if method not in ("ACK", "CANCEL"):
        unsupported = [
            tag for tag in request.headers.values("Require") if tag not in policy.extensions
        ]
        if unsupported:
            return make_response(request, 420, headers=[("Unsupported", ", ".join(unsupported))])
    if request.body:
        content_type = _media_type(request.headers.get("Content-Type") or "")
        encodings = [e.lower() for e in request.headers.values("Content-Encoding")]
        types = policy.content_types
        if (types is not None and content_type not in types) or any(
            e != "identity" for e in encodings
        ):
            return make_response(request, 415, headers=[("Accept", ", ".join(types or ("*/*",)))])
    answers = (policy.answer_types or {}).get(method)
    accept = request.headers.values("Accept")
    if answers and accept and not any(_accepts(accept, t) for t in answers):
        return make_response(
            request, 406, headers=[("Warning", '399 - "no acceptable answer content type"')]
        )
    return None


def _media_type(value: str) -> str:
    return value.partition(";")[0].strip(" \t").lower()


def _accepts(accept: list[str], content_type: str) -> bool:
    kind = content_type.partition("/")[0]
    for item in accept:
        media = _media_type(item)
        if media in (content_type, "*/*", f"{kind}/*"):
            return True
    return False
