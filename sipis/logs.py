"""Logging for operators: text, JSON lines or logfmt, with secrets redacted and identities masked.

The code takes care never to log a secret; this module is the safety net
behind that care.  Every line it writes has passed two steps:

- redaction, always: credentials (Authorization headers, digest responses,
  passwords, secrets, tokens, bearer tokens, URI passwords) and anything
  shaped like a key (long hex or base64 runs) become ``[redacted]``;
- masking, unless the record is about the one instance being debugged:
  SIP/tel user parts, peer IP addresses and E.164 numbers are shortened so
  that they identify no one (``sip:alice@example.com`` -> ``sip:a…@example.com``).

Both steps read the finished text (message after %-formatting, traceback,
stack) and leave the record itself untouched: other handlers, pytest's
``caplog`` and the test suite's log recorder still see what the code asked
to log, so a test catches a secret the code logged even though this module
would have hidden it.  The handler sits on the root logger and runs only for
records that passed their logger's level, so a record below the level costs
nothing beyond the ``isEnabledFor`` check logging always makes.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import TextIO

FORMATS = ("text", "json", "keyvalue")
MARKER = "[redacted]"
ELLIPSIS = "…"

# An instance id: 26 lowercase base32 characters (RFC 4648 section 6 alphabet).
INSTANCE_ID = re.compile(r"[a-z2-7]{26}")

# A base64 run this long is taken for key material, unless it is an identifier path.
_RUN_LENGTH = 40

_REDACT = re.compile(
    r"""
    # Kept as is: a traceback frame line.  Its source path may be long enough to
    # look like base64, and it holds no value from the running program.
      (?P<frame>^[ ]{2}File[ ]"[^"\n]*",[ ]line[ ]\d+)

    # Kept as is: a labelled Call-ID (RFC 3261 20.8), public by nature and what
    # an operator looks for in a peer's logs, even when it is 32 hex digits.
    | (?P<call_id>\bcall-id[ \t]*[:=][ \t]*[^\s;,"']+)

    # Authorization and Proxy-Authorization (RFC 3261 20.7, 20.28; RFC 9110 11.6.2):
    # the whole credentials, up to the closing quote of a quoted value (as in a
    # repr of a header dict) or else to the end of the line.
    | (?P<auth_name>\b(?:proxy-)?authorization["']?[ \t]*[:=][ \t]*)
      (?P<auth_value>"[^"\n]*"?|'[^'\n]*'?|[^\r\n]*)

    # name=value, name: value, "name": "value" where the name says the value is
    # secret (password, admin_token, client_secret, private_key ...), and the
    # digest parameters that prove knowledge of a password (RFC 7616 3.4:
    #   response = "response" EQUAL request-digest,  cnonce = "cnonce" EQUAL cnonce-value;
    # RFC 2617 3.2.3: response-auth = "rspauth" "=" response-digest).
    # The match starts at the telling word (admin_token -> token) and the name is
    # at most 23 characters, so it can never swallow a base64 run.  The lookahead
    # lets every other character fail at once.
    | (?P<name>(?=[pstcar])
               (?:(?:pass(?:word|wd|phrase)|secret|token|credential
                    |(?:api|private|signing)[_-]?key)[\w-]{0,12}
                 |\b(?:response|cnonce|rspauth)\b)
               ["']?[ \t]*[:=][ \t]*)
      (?P<value>"(?:[^"\\\n]|\\.)*"?|'(?:[^'\\\n]|\\.)*'?|[^\s"',;&)\]}]+)

    # Bearer credentials (RFC 6750 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." /
    # "_" / "~" / "+" / "/" ) *"=").
    | (?P<bearer>\bbearer[ \t]+)(?P<bearer_token>[a-z0-9._~+/-]+=*)

    # The password of a URI's userinfo (RFC 3261 19.1.1:
    #   userinfo = ( user / telephone-subscriber ) [ ":" password ] "@";
    # RFC 3986 3.2.1: userinfo = *( unreserved / pct-encoded / sub-delims / ":" )).
    | (?P<userinfo>\b(?:sips?|https?|wss?):(?://)?[^:@\s/;<>"']+:)
      (?P<password>[^@\s/;<>"']+)(?=@)

    # A whole run of 40 or more base64 or base64url characters (RFC 4648 4, 5):
    # instance secrets, keys, ciphertexts.  Identifier paths are kept (see
    # _identifier_path).  UUIDs (36) and instance ids (26) are shorter.
    | (?P<run>(?<![a-z0-9+/_-])[a-z0-9+/_-]{40,}=*)

    # 32 or more hex digits anywhere: push tokens (64), H(A1) (32 or 64), raw keys.
    # Call-IDs sipis makes (24) and the hex groups of a UUID (at most 12) are shorter.
    | (?P<hex>[0-9a-f]{32,})
    """,
    re.ASCII | re.IGNORECASE | re.MULTILINE | re.VERBOSE,
)

_HEX = re.compile(r"[0-9a-f]{32,}", re.IGNORECASE)

# The quick check before _REDACT's full scan, which most lines do not need:
# every text _REDACT changes holds a run of 32 or more base64 characters or,
# in lower case, one of these words (the names it looks for, "@" of a userinfo).
_REDACT_WORDS = (
    "authorization", "pass", "secret", "token", "credential", "key",
    "response", "cnonce", "rspauth", "bearer", "@",
)  # fmt: skip
_LONG_RUN = re.compile(r"[A-Za-z0-9+/_-]{32,}")

_MASK = re.compile(
    r"""
    # The user part of a SIP or SIPS URI (RFC 3261 19.1.1:
    #   SIP-URI = "sip:" [ userinfo ] hostport uri-parameters [ headers ]),
    # the password after it, if any, being redacted already.
      (?P<sip>\bsips?:)(?P<user>[^@\s:;<>"',]+)(?=(?::[^@\s]*)?@)

    # A tel URI's number (RFC 3966 3: telephone-uri = "tel:" telephone-subscriber).
    | (?P<tel>\btel:)(?P<number>[^\s;<>"',]+)

    # An E.164 number written with its "+": up to 15 digits (ITU-T E.164 6.1),
    # single spaces or hyphens allowed between them.
    | (?P<e164>(?<![\w+])\+\d(?:[ -]?\d){6,14}(?!\d))

    # Something shaped like an IPv6 address (RFC 4291 2.2), the last form with
    # an IPv4 tail; ipaddress decides whether it is one.
    | (?P<ipv6>(?<![\w:.])(?:[0-9a-f]{0,4}:){2,7}
               (?:\d{1,3}(?:\.\d{1,3}){3}|[0-9a-f]{1,4})?(?![\w:]))

    # A dotted-quad IPv4 address, not part of a longer dotted number.
    | (?P<ipv4>(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?!\w|\.\d))
    """,
    re.ASCII | re.IGNORECASE | re.VERBOSE,
)

# The quick check before _MASK's full scan: every text _MASK changes holds a
# URI scheme it knows, a "+", two colons (IPv6) or a digit, dot, digit (IPv4).
_MASK_SCHEMES = ("sip:", "sips:", "tel:")
_DOTTED_DIGITS = re.compile(r"\d\.\d", re.ASCII)


def redact(text: str) -> str:
    """``text`` with every credential and every key-shaped value replaced by ``[redacted]``."""
    lower = text.lower()
    if _LONG_RUN.search(text) is None and not any(word in lower for word in _REDACT_WORDS):
        return text
    return _REDACT.sub(_redacted, text)


def mask_identities(text: str) -> str:
    """``text`` with SIP/tel users, peer addresses and E.164 numbers shortened.

    Loopback and unspecified addresses (127.0.0.0/8, ::1, 0.0.0.0, ::) stay:
    they identify no one, and the listening lines an operator reads at start-up
    name them.  Every other address keeps its network part: an IPv4 address
    its /24 (``203.0.113.x``), an IPv6 address its /48 (``2001:db8:85a3::x``),
    the prefix a provider hands one site.  A URI whose user part is an instance
    id keeps it: that id names an instance, not a person.
    """
    lower = text.lower()
    if (
        "+" not in text
        and text.count(":") < 2
        and not any(scheme in lower for scheme in _MASK_SCHEMES)
        and _DOTTED_DIGITS.search(text) is None
    ):
        return text
    return _MASK.sub(_masked, text)


def _quoted_marker(value: str) -> str:
    quote = value[:1]
    return f"{quote}{MARKER}{quote}" if quote in ("'", '"') else MARKER


def _identifier_path(run: str) -> bool:
    """A binding key ``<instance>/<account>`` or an API path ``/v1/instances/<instance>``.

    Such a run has an instance id as one of its ``/``-separated parts and no
    part that alone would be long enough to be taken for key material.  A
    base64 key with an instance id as a whole part is too unlikely to matter.
    """
    parts = run.split("/")
    return any(INSTANCE_ID.fullmatch(part) for part in parts) and all(
        len(part) < _RUN_LENGTH for part in parts
    )


def _redacted(match: re.Match[str]) -> str:
    kind = match.lastgroup
    if kind == "auth_value":
        return match["auth_name"] + _quoted_marker(match["auth_value"])
    if kind == "value":
        return match["name"] + _quoted_marker(match["value"])
    if kind == "bearer_token":
        return match["bearer"] + MARKER
    if kind == "password":
        # The user part before the password is looked at on its own, so that a
        # key in that place is redacted too.
        return redact(match["userinfo"]) + MARKER
    if kind == "run":
        run = match["run"]
        return _HEX.sub(MARKER, run) if _identifier_path(run) else MARKER
    if kind == "hex":
        return MARKER
    return match[0]


def _initial(identity: str) -> str:
    """The first character of an identity (with a leading "+"), then an ellipsis."""
    keep = 2 if identity.startswith("+") else 1
    return identity[:keep] + ELLIPSIS


def _masked(match: re.Match[str]) -> str:
    kind = match.lastgroup
    if kind == "user":
        user = match["user"]
        return match["sip"] + (user if INSTANCE_ID.fullmatch(user) else _initial(user))
    if kind == "number":
        return match["tel"] + _initial(match["number"])
    if kind == "e164":
        return _initial(match["e164"])
    text = match[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return text
    return _masked_address(address) or text


def _masked_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """The masked form of a peer's address, or None for one that identifies no one."""
    if address.is_loopback or address.is_unspecified:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            masked = _masked_address(address.ipv4_mapped)
            return None if masked is None else f"::ffff:{masked}"
        groups = address.exploded.split(":")[:3]
        return ":".join(f"{int(group, 16):x}" for group in groups) + "::x"
    return str(address).rsplit(".", 1)[0] + ".x"


class _CleaningFormatter(logging.Formatter):
    """Formats a record's text through redaction (and masking) without changing the record."""

    def __init__(self, debug_instance: str | None = None) -> None:
        super().__init__()
        self._debug_instance = debug_instance

    def format(self, record: logging.LogRecord) -> str:
        message = _message(record)
        if self._debug_instance is not None and self._debug_instance in message:
            clean: Callable[[str], str] = redact
        else:
            clean = _redacted_and_masked
        exception = self.formatException(record.exc_info) if record.exc_info else None
        stack = self.formatStack(record.stack_info) if record.stack_info else None
        return self.render(
            record,
            clean(message),
            None if exception is None else clean(exception),
            None if stack is None else clean(stack),
        )

    def render(
        self, record: logging.LogRecord, message: str, exception: str | None, stack: str | None
    ) -> str:
        raise NotImplementedError


def _redacted_and_masked(text: str) -> str:
    return mask_identities(redact(text))


def _message(record: logging.LogRecord) -> str:
    """The %-formatted message; a call whose arguments do not fit its format still logs."""
    try:
        return record.getMessage()
    except Exception:
        return f"unformattable log call: {record.msg!r} % {record.args!r}"


def _exception_type(record: logging.LogRecord) -> str | None:
    if not record.exc_info or record.exc_info[0] is None:
        return None
    kind = record.exc_info[0]
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


def _utc_timestamp(record: logging.LogRecord) -> str:
    """ISO 8601 in UTC with milliseconds: ``2024-05-01T12:00:00.123Z``."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class TextFormatter(_CleaningFormatter):
    """``2024-05-01 14:00:00,123 INFO sipis.devices: message``, traceback on the lines after."""

    def render(
        self, record: logging.LogRecord, message: str, exception: str | None, stack: str | None
    ) -> str:
        lines = [f"{self.formatTime(record)} {record.levelname} {record.name}: {message}"]
        lines.extend(text for text in (exception, stack) if text)
        return "\n".join(lines)


def _fields(
    record: logging.LogRecord, message: str, exception: str | None, stack: str | None
) -> dict[str, str]:
    """The fields of one structured line, in the order they are written."""
    fields = {
        "ts": _utc_timestamp(record),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": message,
    }
    exception_type = _exception_type(record)
    if exception_type is not None:
        fields["exc_type"] = exception_type
    if exception:
        fields["traceback"] = exception
    if stack:
        fields["stack"] = stack
    return fields


class JsonFormatter(_CleaningFormatter):
    """One JSON object per line: ts, level, logger, msg, then exc_type, traceback, stack."""

    def render(
        self, record: logging.LogRecord, message: str, exception: str | None, stack: str | None
    ) -> str:
        return json.dumps(_fields(record, message, exception, stack), ensure_ascii=False)


# A logfmt value written bare: no space, quote, equals sign or backslash.
_BARE = re.compile(r'[^\s"=\\]+')


def _logfmt_value(value: str) -> str:
    """Bare when it can be; else double-quoted with JSON's escapes (\\" \\\\ \\n \\uXXXX)."""
    if _BARE.fullmatch(value) and value.isprintable():
        return value
    return json.dumps(value, ensure_ascii=False)


class KeyValueFormatter(_CleaningFormatter):
    """logfmt: ``ts=... level=info logger=sipis.x msg="..."``, one line per record."""

    def render(
        self, record: logging.LogRecord, message: str, exception: str | None, stack: str | None
    ) -> str:
        fields = _fields(record, message, exception, stack)
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in fields.items())


_FORMATTERS: dict[str, type[_CleaningFormatter]] = {
    "text": TextFormatter,
    "json": JsonFormatter,
    "keyvalue": KeyValueFormatter,
}


def _from_sipis_or_serious(record: logging.LogRecord) -> bool:
    """sipis's records at its level; other libraries' only from WARNING up.

    The root logger's level already holds back libraries that leave their
    own level unset; this also holds back one that sets it lower.
    """
    name = record.name
    return record.levelno >= logging.WARNING or name == "sipis" or name.startswith("sipis.")


class SipisHandler(logging.StreamHandler[TextIO]):
    """The stream handler ``configure`` installs on the root logger (one at a time)."""

    def handleError(self, record: logging.LogRecord) -> None:
        """Report a failed write without the record's raw message and arguments.

        logging's own report prints both, which would bypass redaction.
        """
        withheld = logging.makeLogRecord(
            {"name": record.name, "levelno": record.levelno, "msg": "(message withheld)"}
        )
        super().handleError(withheld)


def configure(
    level: str,
    fmt: str = "text",
    debug_instance: str | None = None,
    stream: TextIO | None = None,
) -> None:
    """Log sipis at ``level`` and other libraries at WARNING, in format ``fmt``, to ``stream``.

    Other libraries' debug output is not for operators, and some of it is
    dangerous: aiosqlite logs every statement with its parameters, ciphertexts
    and wrapped keys included.  ``fmt`` is one of FORMATS; ``debug_instance``
    (an instance id) leaves unmasked the records that mention it; ``stream``
    defaults to standard error as it is at the time of the call.

    Calling again replaces the handler installed before; handlers installed by
    others (pytest's, a test suite's) stay and keep receiving every record.
    """
    if fmt not in _FORMATTERS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if debug_instance is not None and not INSTANCE_ID.fullmatch(debug_instance):
        raise ValueError(f"debug instance {debug_instance!r}: not an instance id")
    sipis_level = logging.getLevelName(level.upper())
    if not isinstance(sipis_level, int):
        raise ValueError(f"log level {level!r}: expected debug, info, warning or error")
    handler = SipisHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(_FORMATTERS[fmt](debug_instance))
    handler.addFilter(_from_sipis_or_serious)
    root = logging.getLogger()
    for installed in [h for h in root.handlers if isinstance(h, SipisHandler)]:
        root.removeHandler(installed)
        installed.close()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("sipis").setLevel(sipis_level)
