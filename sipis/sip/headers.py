"""Header names and the structured header values the SIP core interprets.

Every header value arrives unfolded and stripped.  The parsers here read one
list element (the message splits comma-separated lists first) and raise
``SipError`` with status 400 on anything the grammar does not allow.

    Via          =  ( "Via" / "v" ) HCOLON via-parm *(COMMA via-parm)
    via-parm     =  sent-protocol LWS sent-by *( SEMI via-params )
    sent-protocol = protocol-name SLASH protocol-version SLASH transport
    sent-by      =  host [ COLON port ]
    from-spec    =  ( name-addr / addr-spec ) *( SEMI from-param )
    name-addr    =  [ display-name ] LAQUOT addr-spec RAQUOT
    display-name =  *(token LWS)/ quoted-string
    CSeq         =  "CSeq" HCOLON 1*DIGIT LWS Method
"""

from __future__ import annotations

import re
from typing import NamedTuple

from .errors import SipError
from .grammar import (
    HOST,
    PARAMS_TAIL,
    QUOTED_STRING,
    TOKEN,
    Params,
    format_params,
    parse_params,
    quote,
)
from .grammar import unquote as unquote_string
from .uri import SipUri, Uri, parse_uri

# RFC 3261 §7.3.3 and later RFCs: the compact forms.
COMPACT_FORMS = {
    "a": "Accept-Contact",
    "b": "Referred-By",
    "c": "Content-Type",
    "d": "Request-Disposition",
    "e": "Content-Encoding",
    "f": "From",
    "i": "Call-ID",
    "j": "Reject-Contact",
    "k": "Supported",
    "l": "Content-Length",
    "m": "Contact",
    "o": "Event",
    "r": "Refer-To",
    "s": "Subject",
    "t": "To",
    "u": "Allow-Events",
    "v": "Via",
    "x": "Session-Expires",
    "y": "Identity",
}
CANONICAL_NAMES = [
    "Accept",
    "Accept-Contact",
    "Accept-Encoding",
    "Accept-Language",
    "Alert-Info",
    "Allow",
    "Allow-Events",
    "Authentication-Info",
    "Authorization",
    "Call-ID",
    "Call-Info",
    "Contact",
    "Content-Disposition",
    "Content-Encoding",
    "Content-Language",
    "Content-Length",
    "Content-Type",
    "CSeq",
    "Date",
    "Error-Info",
    "Event",
    "Expires",
    "Flow-Timer",
    "From",
    "Identity",
    "In-Reply-To",
    "Max-Forwards",
    "MIME-Version",
    "Min-Expires",
    "Min-SE",
    "Organization",
    "P-Asserted-Identity",
    "P-Preferred-Identity",
    "Path",
    "Priority",
    "Privacy",
    "Proxy-Authenticate",
    "Proxy-Authorization",
    "Proxy-Require",
    "RAck",
    "Reason",
    "Record-Route",
    "Refer-To",
    "Referred-By",
    "Reject-Contact",
    "Replaces",
    "Reply-To",
    "Request-Disposition",
    "Require",
    "Retry-After",
    "Route",
    "RSeq",
    "Server",
    "Service-Route",
    "Session-Expires",
    "Subject",
    "Subscription-State",
    "Supported",
    "Timestamp",
    "To",
    "Unsupported",
    "User-Agent",
    "Via",
    "Warning",
    "WWW-Authenticate",
]
_CANONICAL = {name.lower(): name for name in CANONICAL_NAMES} | COMPACT_FORMS
# The key and written form of each canonical name as spelled: what this side writes.
_AS_WRITTEN = {name: (name, name) for name in CANONICAL_NAMES}

# Headers whose value is a comma-separated list (RFC 3261 §7.3.1).
LIST_HEADERS = frozenset(
    [
        "Accept",
        "Accept-Encoding",
        "Accept-Language",
        "Alert-Info",
        "Allow",
        "Allow-Events",
        "Call-Info",
        "Contact",
        "Content-Encoding",
        "Content-Language",
        "Error-Info",
        "In-Reply-To",
        "P-Asserted-Identity",
        "Path",
        "Proxy-Require",
        "Reason",
        "Record-Route",
        "Require",
        "Route",
        "Service-Route",
        "Supported",
        "Unsupported",
        "Via",
        "Warning",
    ]
)
# Headers a message may carry at most once (a second one is a 400).
SINGLE_HEADERS = frozenset(
    [
        "Call-ID",
        "CSeq",
        "Content-Length",
        "Content-Type",
        "Expires",
        "From",
        "Max-Forwards",
        "Min-Expires",
        "To",
    ]
)


def header_key(name: str) -> str:
    """The key a header is stored and looked up by: canonical form, or lowercase if unknown."""
    lowered = name.lower()
    return _CANONICAL.get(lowered, lowered)


def key_and_name(name: str) -> tuple[str, str]:
    """The lookup key and the written form of a header name (as given, if unknown)."""
    known = _AS_WRITTEN.get(name)
    if known is not None:
        return known
    lowered = name.lower()
    canonical = _CANONICAL.get(lowered)
    return (canonical, canonical) if canonical is not None else (lowered, name)


_VIA_RE = re.compile(
    rf"({TOKEN})[ \t]*/[ \t]*({TOKEN})[ \t]*/[ \t]*({TOKEN})[ \t]+({HOST})"
    r"(?:[ \t]*:[ \t]*(\d{1,5}))?" + PARAMS_TAIL
)
# The value of an rport parameter, if it has one (RFC 3581: rport = "rport" [EQUAL 1*DIGIT]).
_RPORT_RE = re.compile(r";[ \t]*rport[ \t]*=[ \t]*([^ \t;,]*)", re.IGNORECASE)


class _Parameterised:
    """Header parameters, read from the text only when first asked for.

    The grammar of the whole parameter tail is checked when the header is
    parsed; splitting it into a dict waits until somebody reads ``params``.
    """

    __slots__ = ("_params", "_tail")

    _params: Params | None
    _tail: str

    @property
    def params(self) -> Params:
        params = self._params
        if params is None:
            params = self._params = parse_params(self._tail)
        return params


class Via(_Parameterised):
    """One via-parm: where responses to this hop go, and the branch naming its transaction."""

    __slots__ = ("host", "port", "transport")

    def __init__(
        self,
        transport: str,
        host: str,
        port: int | None = None,
        params: Params | None = None,
        *,
        tail: str = "",
    ) -> None:
        self._params = params if params is not None or tail else {}
        self._tail = tail
        self.transport = transport
        self.host = host
        self.port = port

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        return self.params.get("received")

    @property
    def rport(self) -> int | None:
        value = self.params.get("rport")
        return int(value) if value else None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Via) and (self.transport, self.host, self.port, self.params) == (
            other.transport,
            other.host,
            other.port,
            other.params,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Via({str(self)!r})"

    def __str__(self) -> str:
        port = "" if self.port is None else f":{self.port}"
        return f"SIP/2.0/{self.transport} {self.host}{port}{format_params(self.params)}"


def parse_via(text: str) -> Via:
    m = _VIA_RE.match(text)
    if m is None:
        raise SipError(f"malformed Via {text!r}")
    name, version, transport, host, port, tail = m.groups()
    if version != "2.0" or (name != "SIP" and name.upper() != "SIP"):
        raise SipError(f"unsupported protocol {name}/{version} in Via", status=505)
    # Every rport is checked: of a repeated parameter the last one counts.
    for rport in _RPORT_RE.findall(tail) if tail else ():
        if not (rport.isdigit() and len(rport) <= 5 and int(rport) <= 65535):
            raise SipError(f"malformed rport in Via {text!r}")
    number = None if port is None else int(port)
    if number is not None and number > 65535:
        raise SipError(f"port {number} out of range in Via")
    return Via(_TRANSPORTS.get(transport) or transport.upper(), host, number, tail=tail)


_TRANSPORTS = {name: name.upper() for name in ("UDP", "TCP", "TLS", "udp", "tcp", "tls")}


# name-addr with a quoted or a token display name, or a bare addr-spec, each then params.
_NAME_ADDR_RE = re.compile(
    rf"(?:({QUOTED_STRING})[ \t]*|({TOKEN}(?:[ \t]++{TOKEN})*+)?[ \t]*)<([^<>\s]*)>" + PARAMS_TAIL
)
_ADDR_SPEC_RE = re.compile(r"([^\s;,?<>\"]+)" + PARAMS_TAIL)


class NameAddr(_Parameterised):
    """An address with optional display name and header parameters (From, To, Contact, Route...)."""

    __slots__ = ("display_name", "uri")

    def __init__(
        self,
        uri: Uri,
        display_name: str | None = None,
        params: Params | None = None,
        *,
        tail: str = "",
    ) -> None:
        self._params = params if params is not None or tail else {}
        self._tail = tail
        self.uri = uri
        self.display_name = display_name

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    @property
    def sip_uri(self) -> SipUri:
        if not isinstance(self.uri, SipUri):
            raise SipError(f"not a sip or sips URI: {self.uri}", status=416)
        return self.uri

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NameAddr) and (self.uri, self.display_name, self.params) == (
            other.uri,
            other.display_name,
            other.params,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"NameAddr({str(self)!r})"

    def __str__(self) -> str:
        name = "" if self.display_name is None else quote(self.display_name) + " "
        return f"{name}<{self.uri}>{format_params(self.params)}"


def parse_name_addr(text: str) -> NameAddr:
    """Parse ``( name-addr / addr-spec ) *( SEMI generic-param )``.

    In addr-spec form the URI cannot carry ``;``, ``?`` or ``,`` (RFC 3261
    §20.10): parameters after it belong to the header, and a URI with
    headers must be enclosed in angle brackets.
    """
    m = _NAME_ADDR_RE.match(text)
    if m is not None:
        quoted, tokens, uri_text, tail = m.groups()
        display = unquote_string(quoted) if quoted is not None else tokens
    else:
        m = _ADDR_SPEC_RE.match(text)
        if m is None:
            raise SipError(f"malformed address {text!r}")
        uri_text, tail = m.groups()
        display = None
    return NameAddr(parse_uri(uri_text), display, tail=tail)


_CSEQ_RE = re.compile(rf"(\d{{1,10}})[ \t]+({TOKEN})\Z")
MAX_CSEQ = 2**31 - 1


class CSeq(NamedTuple):
    number: int
    method: str

    def __str__(self) -> str:
        return f"{self.number} {self.method}"


def parse_cseq(text: str) -> CSeq:
    m = _CSEQ_RE.match(text)
    if m is None:
        raise SipError(f"malformed CSeq {text!r}")
    number = int(m.group(1))
    if number > MAX_CSEQ:
        raise SipError("CSeq number out of range")
    return CSeq(number, m.group(2))


MAX_DELTA_SECONDS = 2**32 - 1


def parse_delta_seconds(text: str) -> int | None:
    """``delta-seconds = 1*DIGIT``, capped at ``MAX_DELTA_SECONDS``; None for anything else.

    At most ten significant digits are converted: a value of thousands of
    digits is capped like any other too large one, instead of tripping
    Python's limit on ``int()`` of long strings.
    """
    if not text.isascii() or not text.isdigit():
        return None
    digits = text.lstrip("0")
    if len(digits) > 10:
        return MAX_DELTA_SECONDS
    return min(int(digits or "0"), MAX_DELTA_SECONDS)


def parse_uint(text: str, name: str, maximum: int) -> int:
    """A ``1*DIGIT`` header value bounded by ``maximum``."""
    if not text.isascii() or not text.isdigit() or len(text) > 10:
        raise SipError(f"malformed {name} {text!r}")
    value = int(text)
    if value > maximum:
        raise SipError(f"{name} {value} out of range")
    return value
