"""SIP, SIPS and tel URIs, and opaque absolute URIs of any other scheme.

RFC 3261 §25.1:

    SIP-URI          =  "sip:" [ userinfo ] hostport uri-parameters [ headers ]
    SIPS-URI         =  "sips:" [ userinfo ] hostport uri-parameters [ headers ]
    userinfo         =  ( user / telephone-subscriber ) [ ":" password ] "@"
    user             =  1*( unreserved / escaped / user-unreserved )
    user-unreserved  =  "&" / "=" / "+" / "$" / "," / ";" / "?" / "/"
    password         =  *( unreserved / escaped / "&" / "=" / "+" / "$" / "," )
    hostport         =  host [ ":" port ]
    uri-parameter    =  transport-param / user-param / method-param
                        / ttl-param / maddr-param / lr-param / other-param
    other-param      =  pname [ "=" pvalue ]
    paramchar        =  param-unreserved / unreserved / escaped
    param-unreserved =  "[" / "]" / "/" / ":" / "&" / "+" / "$"
    headers          =  "?" header *( "&" header )
    header           =  hname "=" hvalue
    hnv-unreserved   =  "[" / "]" / "/" / "?" / ":" / "+" / "$"
    absoluteURI      =  scheme ":" ( hier-part / opaque-part )

RFC 3966: ``telephone-uri = "tel:" telephone-subscriber``.

Components are kept exactly as sent (escapes included) so that a parsed URI
serializes to the same text; comparisons follow RFC 3261 §19.1.4.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import quote as _percent_encode
from urllib.parse import unquote as _percent_decode

from .errors import SipError
from .grammar import Params

# Character classes match '%' freely; escapes are checked once per URI by _BAD_ESCAPE.
_UNRESERVED = r"A-Za-z0-9\-_.!~*'()%"
_USER = rf"[{_UNRESERVED}&=+$,;?/]++"
_PASSWORD = rf"[{_UNRESERVED}&=+$,]*+"
_PARAMCHAR = rf"[{_UNRESERVED}\[\]/:&+$]"
_HNV = rf"[{_UNRESERVED}\[\]/?:+$]"
_IPV6 = r"\[[0-9A-Fa-f:.]++\]"
_HOSTNAME = r"[A-Za-z0-9][A-Za-z0-9\-.]*+"

_SIP_URI = re.compile(
    rf"(?P<scheme>[Ss][Ii][Pp][Ss]?):"
    rf"(?:(?P<user>{_USER})(?::(?P<password>{_PASSWORD}))?@)?"
    rf"(?P<host>{_IPV6}|{_HOSTNAME})"
    r"(?::(?P<port>\d{1,5}))?"
    rf"(?P<params>(?:;{_PARAMCHAR}++(?:={_PARAMCHAR}++)?)*+)"
    rf"(?:\?(?P<headers>{_HNV}++={_HNV}*+(?:&{_HNV}++={_HNV}*+)*+))?\Z"
)
# hostname = *( domainlabel "." ) toplabel [ "." ], labels of alphanumerics and inner hyphens
_STRICT_HOSTNAME = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.?\Z"
)
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# paramchar without escaped: unreserved / param-unreserved
_PARAM_NAME_SAFE = "-_.!~*'()[]/:&+$"
_PLAIN_PARAM_NAME = re.compile(r"[A-Za-z0-9\-_.!~*'()\[\]/:&+$]++\Z")
_URI_PARAM_PAIRS = re.compile(rf";({_PARAMCHAR}+)(?:=({_PARAMCHAR}+))?")
_TEL_URI = re.compile(
    r"(?P<scheme>[Tt][Ee][Ll]):(?P<number>\+?[0-9A-Fa-f*#.\-()]+)"
    rf"(?P<params>(?:;{_PARAMCHAR}+(?:={_PARAMCHAR}+)?)*)\Z"
)
_ABSOLUTE_URI = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+\-.]*):(?P<rest>[^\s<>\"]+)\Z")

# §19.1.4: these URI parameters must match when either URI carries them.
_SIGNIFICANT_PARAMS = ("user", "ttl", "method", "maddr", "transport")


def unescape(text: str) -> str:
    """Percent-decode ``text`` (invalid UTF-8 survives as surrogate escapes)."""
    return _percent_decode(text, errors="surrogateescape") if "%" in text else text


def _escape_param_name(name: str) -> str:
    """A parameter name read by ``_parse_uri_params`` (unescaped) as a ``1*paramchar``
    again: anything but unreserved and param-unreserved characters escaped, ``%`` too."""
    if _PLAIN_PARAM_NAME.match(name):
        return name
    return _percent_encode(name, safe=_PARAM_NAME_SAFE, errors="surrogateescape")


def _parse_uri_params(text: str) -> Params:
    """``*( ";" uri-parameter )``, names unescaped and lowercased; a repeated name keeps
    its last value."""
    return {unescape(name).lower(): value or None for name, value in _URI_PARAM_PAIRS.findall(text)}


class SipUri:
    """A ``sip:`` or ``sips:`` URI.

    Its parameters are split into a dict only when first read: the grammar
    of the whole parameter string was checked when the URI was parsed.
    """

    __slots__ = ("_params", "_tail", "headers", "host", "password", "port", "scheme", "user")

    def __init__(
        self,
        host: str,
        user: str | None = None,
        port: int | None = None,
        scheme: str = "sip",
        password: str | None = None,
        params: Params | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        *,
        tail: str = "",
    ) -> None:
        self.host = host
        self.user = user
        self.port = port
        self.scheme = scheme
        self.password = password
        self._params = params if params is not None or tail else {}
        self._tail = tail
        self.headers = headers

    @property
    def params(self) -> Params:
        params = self._params
        if params is None:
            params = self._params = _parse_uri_params(self._tail)
        return params

    def _key(self) -> tuple[object, ...]:
        return (
            self.host,
            self.user,
            self.port,
            self.scheme,
            self.password,
            self.params,
            self.headers,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SipUri) and self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SipUri({str(self)!r})"

    @property
    def secure(self) -> bool:
        return self.scheme == "sips"

    @property
    def transport(self) -> str | None:
        value = self.params.get("transport")
        return value.lower() if value else None

    @property
    def host_key(self) -> str:
        """The host as compared: case-insensitive, IPv6 brackets kept."""
        return self.host.lower()

    def equivalent(self, other: object) -> bool:
        """URI equality as defined in RFC 3261 §19.1.4."""
        if not isinstance(other, SipUri) or self.scheme != other.scheme:
            return False
        if (self.user is None) != (other.user is None):
            return False
        if self.user is not None and unescape(self.user) != unescape(other.user or ""):
            return False
        if unescape(self.password or "") != unescape(other.password or ""):
            return False
        if self.host_key != other.host_key or self.port != other.port:
            return False
        for name in _SIGNIFICANT_PARAMS:
            if _param_key(self.params, name) != _param_key(other.params, name):
                return False
        for name in self.params.keys() & other.params.keys():
            if _param_key(self.params, name) != _param_key(other.params, name):
                return False
        mine = sorted((unescape(k).lower(), unescape(v)) for k, v in self.headers)
        theirs = sorted((unescape(k).lower(), unescape(v)) for k, v in other.headers)
        return mine == theirs

    def __str__(self) -> str:
        parts = [self.scheme, ":"]
        if self.user is not None:
            parts.append(self.user)
            if self.password is not None:
                parts += [":", self.password]
            parts.append("@")
        parts.append(self.host)
        if self.port is not None:
            parts += [":", str(self.port)]
        for name, value in self.params.items():
            if not (name.isascii() and name.isalnum()):  # the common names need no look
                name = _escape_param_name(name)
            parts += [";", name] if value is None else [";", name, "=", value]
        if self.headers:
            parts += ["?", "&".join(f"{k}={v}" for k, v in self.headers)]
        return "".join(parts)


def _param_key(params: Params, name: str) -> str | None:
    """A parameter's comparison form: None when absent, "" when it has no value."""
    if name not in params:
        return None
    value = params[name]
    return "" if value is None else unescape(value).lower()


@dataclass(slots=True)
class TelUri:
    """A ``tel:`` URI (RFC 3966)."""

    number: str
    params: Params = field(default_factory=dict)
    scheme: str = "tel"

    def equivalent(self, other: object) -> bool:
        return (
            isinstance(other, TelUri)
            and _digits(self.number) == _digits(other.number)
            and {k: (v or "").lower() for k, v in self.params.items()}
            == {k: (v or "").lower() for k, v in other.params.items()}
        )

    def __str__(self) -> str:
        return (
            "tel:"
            + self.number
            + "".join(
                f";{_escape_param_name(k)}" + ("" if v is None else f"={v}")
                for k, v in self.params.items()
            )
        )


def _digits(number: str) -> str:
    return "".join(ch for ch in number if ch not in ".-()").lower()


@dataclass(slots=True)
class AbsoluteUri:
    """A URI of a scheme this core does not interpret (``http:``, ``urn:``, ...)."""

    scheme: str
    rest: str

    def equivalent(self, other: object) -> bool:
        return isinstance(other, AbsoluteUri) and str(self) == str(other)

    def __str__(self) -> str:
        return f"{self.scheme}:{self.rest}"


Uri = SipUri | TelUri | AbsoluteUri


def parse_uri(text: str) -> Uri:
    """Parse a URI; ``sip``/``sips``/``tel`` strictly, any other scheme opaquely."""
    m = _SIP_URI.match(text)
    if m is not None:
        scheme, user, password, host, port, params, headers = m.groups()
        if "%" in text and _BAD_ESCAPE.search(text) is not None:
            raise SipError(f"malformed escape in URI {text!r}")
        if ("-" in host or ".." in host) and _STRICT_HOSTNAME.match(host) is None:
            raise SipError(f"malformed host in URI {text!r}")
        if port is not None and int(port) > 65535:
            raise SipError(f"port out of range in URI {text!r}")
        return SipUri(
            host,
            user,
            None if port is None else int(port),
            "sip" if len(scheme) == 3 else "sips",
            password,
            None,
            tuple(_split_uri_header(h) for h in headers.split("&")) if headers else (),
            tail=params,
        )
    scheme = text.partition(":")[0].lower()
    if scheme in ("sip", "sips"):
        raise SipError(f"malformed {scheme} URI {text!r}")
    m = _TEL_URI.match(text)
    if m is not None:
        return TelUri(number=m.group("number"), params=_parse_uri_params(m.group("params")))
    if scheme == "tel":
        raise SipError(f"malformed tel URI {text!r}")
    m = _ABSOLUTE_URI.match(text)
    if m is None:
        raise SipError(f"malformed URI {text!r}")
    return AbsoluteUri(scheme=m.group("scheme").lower(), rest=m.group("rest"))


def parse_sip_uri(text: str) -> SipUri:
    uri = parse_uri(text)
    if not isinstance(uri, SipUri):
        raise SipError(f"not a sip or sips URI: {text!r}", status=416)
    return uri


def _split_uri_header(item: str) -> tuple[str, str]:
    name, _, value = item.partition("=")
    return name, value
