"""SIP requests and responses: parsing, framing and serialization (RFC 3261 §7, §18.3).

    generic-message  =  start-line *message-header CRLF [ message-body ]
    Request-Line     =  Method SP Request-URI SP SIP-Version CRLF
    Status-Line      =  SIP-Version SP Status-Code SP Reason-Phrase CRLF
    message-header   =  field-name HCOLON field-value CRLF   (HCOLON = *( SP / HTAB ) ":" SWS)

Parsing is eager for what every message must get right to be handled at all
(start line, Via, CSeq, Call-ID, From, To, Max-Forwards, Content-Length) and
lazy, with caching, for the rest: a header that is never read costs nothing.
Any violation raises ``SipError``; when the start line and headers could be
split, the error carries the half-parsed message as ``partial`` so that a
request can still be answered with the error's status.

Header text is decoded as UTF-8 with surrogate escapes, so arbitrary octets
survive a parse/serialize round trip; bodies stay bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import SipError
from .grammar import TOKEN, WORD, split_list
from .headers import (
    CANONICAL_NAMES,
    COMPACT_FORMS,
    LIST_HEADERS,
    SINGLE_HEADERS,
    CSeq,
    NameAddr,
    Via,
    header_key,
    key_and_name,
    parse_cseq,
    parse_delta_seconds,
    parse_name_addr,
    parse_uint,
    parse_via,
)
from .uri import SipUri, Uri, parse_uri

MAX_MESSAGE_SIZE = 65535
MAX_HEADER_FIELDS = 128
MAX_FORWARDS_LIMIT = 255

_REQUEST_LINE = re.compile(rf"({TOKEN}) ([^ ]+) SIP/(\d+\.\d+)\Z")
_STATUS_LINE = re.compile(r"SIP/(\d+\.\d+) (\d{3}) ([^\r\n]*)\Z")
_CALL_ID = re.compile(rf"{WORD}(?:@{WORD})?\Z")
_FIELD_NAME = re.compile(rf"{TOKEN}\Z")
# LWS that spans a line break: a folded header line (RFC 3261 §7.3.1).
_FOLD = re.compile(r"[ \t]*\r\n[ \t]+")

T = TypeVar("T")

# Methods of RFC 3261 and its extensions; any other method is "not implemented" (501).
KNOWN_METHODS = frozenset(
    [
        "INVITE",
        "ACK",
        "BYE",
        "CANCEL",
        "OPTIONS",
        "REGISTER",
        "PRACK",
        "SUBSCRIBE",
        "NOTIFY",
        "PUBLISH",
        "INFO",
        "REFER",
        "MESSAGE",
        "UPDATE",
    ]
)

# The usual spellings of known header names, mapped straight to their canonical form.
_SPELLINGS = (
    {
        spelling: canonical
        for canonical in CANONICAL_NAMES
        for spelling in (canonical, canonical.lower(), canonical.upper())
    }
    | {compact: full for compact, full in COMPACT_FORMS.items()}
    | {compact.upper(): full for compact, full in COMPACT_FORMS.items()}
)


class Headers:
    """The header fields of a message, in order, with cached parsed values.

    Each field is kept as ``(key, name, value)``: ``key`` is what lookups
    use (canonical name, or lowercase for unknown headers), ``name`` is
    written back out.  An index from key to values and a cache of parsed
    values make repeated lookups free; any change drops both.
    """

    __slots__ = ("_cache", "_fields", "_index")

    def __init__(self, fields: Iterable[tuple[str, str]] = ()) -> None:
        self._fields: list[tuple[str, str, str]] = [
            (*key_and_name(name), value) for name, value in fields
        ]
        self._index: dict[str, list[str]] | None = None
        self._cache: dict[str, Any] = {}

    @classmethod
    def _from_parsed(
        cls, fields: list[tuple[str, str, str]], index: dict[str, list[str]]
    ) -> Headers:
        headers = cls.__new__(cls)
        headers._fields = fields
        headers._index = index
        headers._cache = {}
        return headers

    def _lookup(self, key: str) -> list[str]:
        index = self._index
        if index is None:
            index = self._index = {}
            for k, _, value in self._fields:
                index.setdefault(k, []).append(value)
        return index.get(key, _NONE)

    def _changed(self) -> None:
        self._index = None
        self._cache.clear()

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return ((name, value) for _, name, value in self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __contains__(self, name: str) -> bool:
        return bool(self._lookup(header_key(name)))

    def get(self, name: str) -> str | None:
        """The first field value of ``name``, or None."""
        values = self._lookup(header_key(name))
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        """Every field value of ``name``, as written (lists not split)."""
        return list(self._lookup(header_key(name)))

    def values(self, name: str) -> list[str]:
        """Every element of ``name``: comma-separated lists split, in order."""
        return self._elements(header_key(name))

    def _elements(self, key: str) -> list[str]:
        raw = self._lookup(key)
        if key not in LIST_HEADERS:
            return list(raw)
        if len(raw) == 1:
            return split_list(raw[0])
        out: list[str] = []
        for value in raw:
            out.extend(split_list(value))
        return out

    def parsed(self, key: str, parser: Callable[[list[str]], T]) -> T:
        """``parser(elements of key)`` for a canonical header name, computed once
        until the headers change."""
        try:
            return self._cache[key]  # type: ignore[no-any-return]
        except KeyError:
            result = self._cache[key] = parser(self._elements(key))
            return result

    def add(self, name: str, value: str) -> None:
        self._fields.append((*key_and_name(name), value))
        self._changed()

    def prepend(self, name: str, value: str) -> None:
        """Add a field before all others (a proxy's Via and Record-Route go on top)."""
        self._fields.insert(0, (*key_and_name(name), value))
        self._changed()

    def pop_first(self, name: str) -> str | None:
        """Remove the first element of ``name`` and return it; None if there is none.

        A field holding a comma-separated list keeps its other elements; an
        empty list field (``Via:`` with no value) holds none and is passed over.
        """
        key = header_key(name)
        for position, (k, written, value) in enumerate(self._fields):
            if k != key:
                continue
            elements = split_list(value) if key in LIST_HEADERS else [value]
            if not elements:
                continue
            first, rest = elements[0], elements[1:]
            if rest:
                self._fields[position] = (k, written, ", ".join(rest))
            else:
                del self._fields[position]
            self._changed()
            return first
        return None

    def copy(self) -> Headers:
        """An independent copy, for a message forwarded with changes."""
        headers = Headers.__new__(Headers)
        headers._fields = list(self._fields)
        headers._index = None
        headers._cache = {}
        return headers

    def remove(self, name: str) -> None:
        key = header_key(name)
        self._fields = [f for f in self._fields if f[0] != key]
        self._changed()

    def set(self, name: str, value: str) -> None:
        """Replace every field of ``name`` by one, where the first one stood."""
        key, written = key_and_name(name)
        new = (key, written, value)
        fields: list[tuple[str, str, str]] = []
        placed = False
        for field in self._fields:
            if field[0] != key:
                fields.append(field)
            elif not placed:
                fields.append(new)
                placed = True
        if not placed:
            fields.append(new)
        self._fields = fields
        self._changed()


_NONE: list[str] = []


def _one(name: str, parser: Callable[[str], T]) -> Callable[[list[str]], T | None]:
    def parse(values: list[str]) -> T | None:
        if not values:
            return None
        if len(values) > 1:
            raise SipError(f"more than one {name} value")
        return parser(values[0])

    return parse


def _call_id(text: str) -> str:
    if _CALL_ID.match(text) is None:
        raise SipError(f"malformed Call-ID {text!r}")
    return text


def _vias(values: list[str]) -> list[Via]:
    return [parse_via(v) for v in values]


def _name_addrs(values: list[str]) -> list[NameAddr]:
    return [parse_name_addr(v) for v in values]


def _contacts(values: list[str]) -> list[NameAddr]:
    if values == ["*"]:
        return []
    if "*" in values:
        raise SipError("Contact: * mixed with addresses")
    return _name_addrs(values)


_parse_from = _one("From", parse_name_addr)
_parse_to = _one("To", parse_name_addr)
_parse_call_id = _one("Call-ID", _call_id)
_parse_cseq = _one("CSeq", parse_cseq)
_parse_max_forwards = _one(
    "Max-Forwards", lambda v: parse_uint(v, "Max-Forwards", MAX_FORWARDS_LIMIT)
)
_parse_content_length = _one(
    # any 32-bit length reads; one past the cap makes a 513 (a stream) or a 400 (a datagram)
    "Content-Length",
    lambda v: parse_uint(v, "Content-Length", 2**32 - 1),
)
_REQUIRED = (("Call-ID", _parse_call_id), ("From", _parse_from), ("To", _parse_to))
_parse_min_expires = _one("Min-Expires", lambda v: parse_uint(v, "Min-Expires", 2**32 - 1))


def _lenient_delta_seconds(values: list[str]) -> int | None:
    """Expires: a malformed or repeated value reads as absent (RFC 3261 §20.19)."""
    return parse_delta_seconds(values[0]) if len(values) == 1 else None


class Message:
    """What requests and responses share: header fields and a body."""

    __slots__ = ("body", "headers")

    def __init__(
        self, headers: Headers | Iterable[tuple[str, str]] = (), body: bytes = b""
    ) -> None:
        self.headers = headers if isinstance(headers, Headers) else Headers(headers)
        self.body = body

    @property
    def vias(self) -> list[Via]:
        return self.headers.parsed("Via", _vias)

    @property
    def via(self) -> Via:
        vias = self.vias
        if not vias:
            raise SipError("missing Via")
        return vias[0]

    @property
    def from_(self) -> NameAddr:
        value = self.headers.parsed("From", _parse_from)
        if value is None:
            raise SipError("missing From")
        return value

    @property
    def to(self) -> NameAddr:
        value = self.headers.parsed("To", _parse_to)
        if value is None:
            raise SipError("missing To")
        return value

    @property
    def call_id(self) -> str:
        value = self.headers.parsed("Call-ID", _parse_call_id)
        if value is None:
            raise SipError("missing Call-ID")
        return value

    @property
    def cseq(self) -> CSeq:
        value = self.headers.parsed("CSeq", _parse_cseq)
        if value is None:
            raise SipError("missing CSeq")
        return value

    @property
    def max_forwards(self) -> int | None:
        return self.headers.parsed("Max-Forwards", _parse_max_forwards)

    @property
    def content_length(self) -> int | None:
        return self.headers.parsed("Content-Length", _parse_content_length)

    @property
    def contacts(self) -> list[NameAddr]:
        """The Contact addresses; empty for none and for ``Contact: *``."""
        return self.headers.parsed("Contact", _contacts)

    @property
    def expires(self) -> int | None:
        return self.headers.parsed("Expires", _lenient_delta_seconds)

    @property
    def min_expires(self) -> int | None:
        return self.headers.parsed("Min-Expires", _parse_min_expires)

    def forget_parsed(self) -> None:
        """Drop the parsed header values kept so far (they are parsed again if read).

        A message held for long only to be matched or resent costs the
        garbage collector a few objects instead of a few dozen.
        """
        self.headers._changed()

    def header_name_addrs(self, name: str) -> list[NameAddr]:
        """Route, Record-Route, Path, Service-Route and the like."""
        return self.headers.parsed(header_key(name), _name_addrs)

    def _start_line(self) -> str:
        raise NotImplementedError

    def serialize(self) -> bytes:
        """The message on the wire; Content-Length always written, from the body."""
        lines = [self._start_line()]
        lines += [
            f"{name}: {value}"
            for key, name, value in self.headers._fields
            if key != "Content-Length"
        ]
        lines.append(f"Content-Length: {len(self.body)}\r\n\r\n")
        return "\r\n".join(lines).encode("utf-8", "surrogateescape") + self.body

    def __bytes__(self) -> bytes:
        return self.serialize()


class Request(Message):
    __slots__ = ("method", "uri")

    def __init__(
        self,
        method: str,
        uri: Uri,
        headers: Headers | Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> None:
        super().__init__(headers, body)
        self.method = method
        self.uri = uri

    def _start_line(self) -> str:
        return f"{self.method} {self.uri} SIP/2.0"

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri}>"


class Response(Message):
    __slots__ = ("reason", "status")

    def __init__(
        self,
        status: int,
        reason: str,
        headers: Headers | Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> None:
        super().__init__(headers, body)
        self.status = status
        self.reason = reason

    def _start_line(self) -> str:
        return f"SIP/2.0 {self.status} {self.reason}"

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"


class ParseError(SipError):
    """A SipError raised while parsing, with what could be read of the message."""

    def __init__(self, error: SipError, partial: Message | None) -> None:
        super().__init__(error.reason, error.status)
        self.partial = partial


def _read_head(head: bytes) -> Message:
    """Split the start line and header fields; no header value is interpreted yet."""
    text = head.decode("utf-8", "surrogateescape")
    if "\r\n " in text or "\r\n\t" in text:
        text = _FOLD.sub(" ", text)
    lines = text.split("\r\n")
    if len(lines) > MAX_HEADER_FIELDS + 1:
        raise SipError(f"more than {MAX_HEADER_FIELDS} header lines", status=513)
    start = lines[0]
    fields: list[tuple[str, str, str]] = []
    index: dict[str, list[str]] = {}
    duplicate: str | None = None
    spellings = _SPELLINGS
    for i in range(1, len(lines)):
        name, colon, value = lines[i].partition(":")
        if not colon:
            raise SipError(f"header line without a colon: {lines[i][:40]!r}")
        key = spellings.get(name)
        if key is None:
            key, name = key_and_name(name.rstrip(" \t"))
            if _FIELD_NAME.match(name) is None:
                raise SipError(f"malformed header name {name[:40]!r}")
        else:
            name = key
        value = value.strip(" \t")
        fields.append((key, name, value))
        values = index.get(key)
        if values is None:
            index[key] = [value]
        else:
            values.append(value)
            if key in SINGLE_HEADERS:
                duplicate = key
    headers = Headers._from_parsed(fields, index)
    msg = (
        _status_line(start, headers) if start.startswith("SIP/") else _request_line(start, headers)
    )
    if duplicate is not None:
        raise ParseError(SipError(f"more than one {duplicate} header"), msg)
    return msg


def _status_line(start: str, headers: Headers) -> Response:
    m = _STATUS_LINE.match(start)
    if m is None:
        raise SipError(f"malformed status line {start[:80]!r}")
    if m.group(1) != "2.0":
        raise SipError(f"unsupported version SIP/{m.group(1)}", status=505)
    status = int(m.group(2))
    if status < 100:
        raise SipError(f"status code {status} out of range")
    return Response(status, m.group(3), headers)


def _request_line(start: str, headers: Headers) -> Request:
    m = _REQUEST_LINE.match(start)
    if m is None:
        method = start.partition(" ")[0]
        partial = Request(method if _FIELD_NAME.match(method) else "UNKNOWN", _ANY_URI, headers)
        raise ParseError(SipError(f"malformed request line {start[:80]!r}"), partial)
    method, uri_text, version = m.groups()
    request = Request(method, _ANY_URI, headers)
    if version != "2.0":
        raise ParseError(SipError(f"unsupported version SIP/{version}", 505), request)
    try:
        request.uri = parse_uri(uri_text)
    except SipError as exc:
        raise ParseError(exc, request) from None
    if isinstance(request.uri, SipUri) and request.uri.headers:
        raise ParseError(SipError("headers are not allowed in a Request-URI"), request)
    return request


# Stands in for the Request-URI of a request whose URI failed to parse.
_ANY_URI: Uri = SipUri(host="invalid")


def _validate(msg: Message) -> None:
    """Eager checks of the headers every message relies on.

    Calls the same parsers as the properties, straight on the index, and
    leaves their results in the cache where the properties find them.
    """
    headers = msg.headers
    index = headers._index or {}
    cache = headers._cache
    via_fields = index.get("Via")
    vias = cache["Via"] = _vias(
        [v for field in via_fields for v in split_list(field)] if via_fields else []
    )
    if not vias:
        raise SipError("missing Via")
    cseq = cache["CSeq"] = _parse_cseq(index.get("CSeq", _NONE))
    if cseq is None:
        raise SipError("missing CSeq")
    if isinstance(msg, Request) and cseq.method != msg.method:
        # RFC 4475 §3.1.2.18: an unknown method is better answered "not implemented".
        status = 400 if msg.method in KNOWN_METHODS else 501
        raise SipError(f"CSeq method {cseq.method} does not match {msg.method}", status)
    for key, parser in _REQUIRED:
        if (cache.setdefault(key, parser(index.get(key, _NONE)))) is None:
            raise SipError(f"missing {key}")
    cache["Max-Forwards"] = _parse_max_forwards(index.get("Max-Forwards", _NONE))


def parse_message(data: bytes, *, datagram: bool = True) -> Message:
    """Parse one complete message (a UDP datagram, or a frame cut by ``StreamFramer``).

    A datagram's octets past Content-Length are ignored (RFC 3261 §18.3);
    a Content-Length that exceeds the datagram is an error.  Without
    Content-Length, a datagram's body runs to its end.
    """
    if len(data) > MAX_MESSAGE_SIZE:
        raise SipError("message too large", status=513)
    data = data.lstrip(b"\r\n")
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if not datagram:
            raise SipError("incomplete message")
        head, rest = data.rstrip(b"\r\n"), b""
    else:
        head, rest = data[:end], data[end + 4 :]
    try:
        msg = _read_head(head)
    except ParseError:
        raise
    except SipError as exc:
        raise ParseError(exc, None) from None
    try:
        length = msg.content_length
        if length is None:
            if not datagram:
                raise SipError("missing Content-Length on a stream")
            length = len(rest)
        elif length > len(rest):
            raise SipError("Content-Length larger than the message")
        msg.body = rest[:length]
        _validate(msg)
    except SipError as exc:
        raise ParseError(exc, msg) from None
    return msg


@dataclass(slots=True, frozen=True)
class Keepalive:
    """A CRLF keepalive on a stream (RFC 5626 §3.5.1): a ping (double CRLF) or a pong (one)."""

    ping: bool


class StreamBroken(SipError):
    """A stream that cannot be framed any further.

    ``partial`` is the message whose head was read when framing broke (a
    request with a Content-Length past the cap, missing or unreadable can
    still be answered: 513, 400), or None; ``framed`` is what the same
    ``feed`` call completed before it.
    """

    def __init__(self, error: SipError, partial: Message | None = None) -> None:
        super().__init__(error.reason, error.status)
        self.partial = partial
        self.framed: list[Message | Keepalive | ParseError] = []


def _unrecoverable(error: SipError, partial: Message | None = None) -> StreamBroken:
    return StreamBroken(SipError(f"unrecoverable stream: {error.reason}", error.status), partial)


class StreamFramer:
    """Cuts a TCP/TLS byte stream into messages and keepalives.

    ``feed`` returns what became complete.  A message whose headers are
    malformed but whose length is known comes back as a ``ParseError`` item
    and framing goes on; when the length itself cannot be known, or passes
    the cap, the stream cannot be resynchronised and ``feed`` raises
    ``StreamBroken``: answer what can be answered, and close it.
    """

    __slots__ = ("_buffer", "_max_size", "_pending", "_pending_length")

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._buffer = bytearray()
        self._max_size = max_size
        self._pending: Message | ParseError | None = None
        self._pending_length = 0

    def feed(self, data: bytes) -> list[Message | Keepalive | ParseError]:
        out: list[Message | Keepalive | ParseError] = []
        try:
            self._frame(data, out)
        except StreamBroken as exc:
            exc.framed = out
            raise
        return out

    def _frame(self, data: bytes, out: list[Message | Keepalive | ParseError]) -> None:
        buf = self._buffer
        buf += data
        while True:
            if self._pending is not None:
                if len(buf) < self._pending_length:
                    break
                body = bytes(buf[: self._pending_length])
                del buf[: self._pending_length]
                pending, self._pending = self._pending, None
                if isinstance(pending, Message):
                    pending.body = body
                out.append(pending)
                continue
            if buf[:2] == b"\r\n":
                ping = buf[:4] == b"\r\n\r\n"
                del buf[: 4 if ping else 2]
                out.append(Keepalive(ping=ping))
                continue
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self._max_size:
                    raise StreamBroken(SipError("message headers too large", status=513))
                break
            head = bytes(buf[:end])
            del buf[: end + 4]
            self._start(head)

    def _start(self, head: bytes) -> None:
        try:
            msg = _read_head(head)
        except ParseError as exc:
            msg = exc.partial or Message()
            pending: Message | ParseError = exc
        except SipError as exc:
            raise _unrecoverable(exc) from None
        else:
            pending = msg
        try:
            length = msg.content_length
        except SipError as exc:
            raise _unrecoverable(exc, msg) from None
        if length is None:
            raise StreamBroken(SipError("missing Content-Length on a stream"), msg)
        if length + len(head) > self._max_size:
            raise StreamBroken(SipError("message too large", status=513), msg)
        if isinstance(pending, Message):
            try:
                _validate(pending)
            except SipError as exc:
                pending = ParseError(exc, msg)
        self._pending = pending
        self._pending_length = length
