"""Lexical building blocks of the SIP grammar (RFC 3261 §25.1).

Header values reach these helpers already unfolded (the message parser turns
every ``CRLF 1*WSP`` into a single space), so "LWS" below means ``[ \\t]*``.

    token          =  1*(alphanum / "-" / "." / "!" / "%" / "*"
                      / "_" / "+" / "`" / "'" / "~" )
    quoted-string  =  SWS DQUOTE *(qdtext / quoted-pair ) DQUOTE
    qdtext         =  LWS / %x21 / %x23-5B / %x5D-7E / UTF8-NONASCII
    quoted-pair    =  "\\" (%x00-09 / %x0B-0C / %x0E-7F)
    generic-param  =  token [ EQUAL gen-value ]
    gen-value      =  token / host / quoted-string
    SEMI = SWS ";" SWS    EQUAL = SWS "=" SWS    COMMA = SWS "," SWS
"""

from __future__ import annotations

import re

from .errors import SipError

# Possessive: tokens are maximal munches, and no input can make the regexes backtrack.
TOKEN = r"[A-Za-z0-9\-.!%*_+`'~]++"  # noqa: S105 (the RFC 3261 token rule)
QUOTED_STRING = r'"(?:[^"\\]++|\\[\x00-\x09\x0b\x0c\x0e-\x7f])*+"'
IPV6_REFERENCE = r"\[[0-9A-Fa-f:.]+\]"
HOST = r"(?:[A-Za-z0-9\-.]++|" + IPV6_REFERENCE + ")"
# word = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~" /
#           "(" / ")" / "<" / ">" / ":" / "\" / DQUOTE / "/" / "[" / "]" / "?" / "{" / "}" )
WORD = r"[A-Za-z0-9\-.!%*_+`'~()<>:\\\"/\[\]?{}]++"

_TOKEN_FULL = re.compile(TOKEN + r"\Z")
_GEN_VALUE = TOKEN + "|" + IPV6_REFERENCE + "|" + QUOTED_STRING
_PARAM_RE = re.compile(r"[ \t]*;[ \t]*(" + TOKEN + r")(?:[ \t]*=[ \t]*(" + _GEN_VALUE + "))?")
# The whole ``*( SEMI generic-param )`` tail of a header value, up to its end.
PARAMS_TAIL = (
    r"((?:[ \t]*;[ \t]*" + TOKEN + r"(?:[ \t]*=[ \t]*(?:" + _GEN_VALUE + r"))?)*+)[ \t]*\Z"
)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_NEEDS_ESCAPE = re.compile(r'(["\\])')

Params = dict[str, str | None]


def parse_params(tail: str) -> Params:
    """Read a ``*( SEMI generic-param )`` tail already matched by ``PARAMS_TAIL``.

    Names are lowercased (they compare case-insensitively); values are kept
    exactly as sent, quotes included, so serializing gives the same bytes.
    Of a repeated parameter the last value counts.
    """
    if not tail:
        return {}
    return {name.lower(): value or None for name, value in _PARAM_RE.findall(tail)}


def format_params(params: Params) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


def unquote(value: str) -> str:
    """The content of a quoted-string with quoted-pairs resolved, or ``value`` itself."""
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        inner = value[1:-1]
        return _QUOTED_PAIR.sub(r"\1", inner) if "\\" in inner else inner
    return value


def quote(value: str) -> str:
    return '"' + _NEEDS_ESCAPE.sub(r"\\\1", value) + '"'


def split_list(value: str) -> list[str]:
    """Split a header value at the commas that separate list elements.

    Commas inside quoted strings and inside ``<...>`` belong to the element.
    An empty value is an empty list; empty elements (``a,,b``) are an error.
    """
    if "," not in value:
        return [value] if value else []
    if '"' not in value and "<" not in value:
        parts = value.split(",")
    else:
        parts = []
        start = 0
        in_quote = in_angle = escaped = False
        for i, ch in enumerate(value):
            if in_quote:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_quote = False
            elif ch == '"':
                in_quote = True
            elif ch == "<":
                in_angle = True
            elif ch == ">":
                in_angle = False
            elif ch == "," and not in_angle:
                parts.append(value[start:i])
                start = i + 1
        if in_quote:
            raise SipError("unterminated quoted string")
        parts.append(value[start:])
    out = [p.strip(" \t") for p in parts]
    if any(not p for p in out):
        raise SipError("empty element in a comma-separated list")
    return out
