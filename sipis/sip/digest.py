"""SIP digest authentication: challenges, credentials and the client's answer.

Theory of operation
-------------------
A 401 carries one or more WWW-Authenticate fields, a 407 one or more
Proxy-Authenticate fields, each holding one challenge.  ``parse_challenge``
turns one field value into a ``Challenge``; ``select_challenge`` picks the
strongest one this module can answer (RFC 8760: a server may offer the same
realm with several algorithms; SHA-512-256 > SHA-256 > MD5 here);
``DigestClient.authorize`` computes the field value for Authorization or
Proxy-Authorization.  ``parse_credentials`` reads such a value back, which is
what a UAS needs to check a request.

The client counts its uses of every nonce (``nc``), so a cached challenge can
pre-authorize later requests such as registration refreshes (RFC 3261 §22).
Nothing here performs I/O or reads a clock; the only randomness is the client
nonce, which comes from an injectable source.

Hashes (RFC 7616 §3.4, RFC 2617 §3.2.2, RFC 3261 §22.4), all text UTF-8:

    A1       = unq(username) ":" unq(realm) ":" passwd
    A1       = H( unq(username) ":" unq(realm) ":" passwd )
               ":" unq(nonce) ":" unq(cnonce)                  (-sess algorithms)
    A2       = Method ":" request-uri                          (qop auth, or none)
    A2       = Method ":" request-uri ":" H(entity-body)       (qop auth-int)
    response = KD( H(A1), unq(nonce) ":" nc ":" unq(cnonce) ":" unq(qop) ":" H(A2) )
    response = KD( H(A1), unq(nonce) ":" H(A2) )               (no qop: RFC 2069)
    KD(secret, data) = H( secret ":" data )
    username = H( unq(username) ":" unq(realm) )               (userhash=true, §3.4.4)

With ``userhash=true`` only the ``username`` parameter carries the hash; A1
keeps the real username (RFC 7616 §3.4.4: the hash is computed "after any
other hash calculation").
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .errors import SipError
from .grammar import TOKEN

__all__ = [
    "MAX_AUTH_PARAMS",
    "Challenge",
    "Credentials",
    "DigestClient",
    "parse_challenge",
    "parse_credentials",
    "select_challenge",
]

# Challenges and responses carry about a dozen parameters; anything far beyond
# that is an attack on the parser, not a peer.
MAX_AUTH_PARAMS = 32

# Nonces whose use count is remembered.  A client talks to a registrar and
# perhaps a proxy, so a handful is plenty; the least recently used goes first.
_MAX_TRACKED_NONCES = 8

# The qop offers nearly every server makes, shared rather than built per challenge.
_COMMON_QOP = {"auth": ("auth",), "auth,auth-int": ("auth", "auth-int")}
# quoted-string = SWS DQUOTE *(qdtext / quoted-pair ) DQUOTE
# qdtext        = LWS / %x21 / %x23-5B / %x5D-7E / UTF8-NONASCII
# quoted-pair   = "\" (%x00-09 / %x0B-0C / %x0E-7F)
# Stricter than the ABNF in one respect: a quoted-pair may not carry a control
# character, so every value parsed here can be quoted again unchanged.
_QUOTED = r'"((?:[\t !#-\[\]-~\x80-\ud7ff\ue000-\U0010ffff]|\\[\t -~])*)"'
_AUTH_SCHEME = re.compile(rf"({TOKEN})([ \t]+)?")
# One auth-param and the COMMA after it, if any: (name, quoted value, token value, comma).
_AUTH_PARAM = re.compile(rf"({TOKEN})[ \t]*=[ \t]*(?:{_QUOTED}|({TOKEN}))[ \t]*(,[ \t]*)?")
_QUOTED_PAIR = re.compile(r"\\(.)")
_UNQUOTABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True)
class _Algorithm:
    name: str
    hash_name: str
    session: bool
    strength: int

    def hex_digest(self, data: bytes) -> str:
        return hashlib.new(self.hash_name, data).hexdigest()


# Names from RFC 7616 §6.1 and RFC 8760.  SHA-512-256 is SHA-512/256 of FIPS 180-4
# (its own initial values), not a truncated SHA-512.
_ALGORITHMS: dict[str, _Algorithm] = {
    spec.name.lower(): spec
    for spec in (
        _Algorithm("MD5", "md5", session=False, strength=1),
        _Algorithm("MD5-sess", "md5", session=True, strength=1),
        _Algorithm("SHA-256", "sha256", session=False, strength=2),
        _Algorithm("SHA-256-sess", "sha256", session=True, strength=2),
        _Algorithm("SHA-512-256", "sha512_256", session=False, strength=3),
        _Algorithm("SHA-512-256-sess", "sha512_256", session=True, strength=3),
    )
    if spec.hash_name in hashlib.algorithms_available
}


@dataclass(frozen=True, slots=True)
class Challenge:
    """One WWW-Authenticate or Proxy-Authenticate value (RFC 3261 §20.27, §20.44).

    ``algorithm`` is spelled canonically when known (``"SHA-256"`` for
    ``sha-256``) and as sent otherwise; ``qop`` holds the offered qop-values in
    lower case.  ``opaque`` is ``None`` when absent (an empty ``opaque=""``
    must still be echoed).  ``raw`` is the field value as received;
    ``params`` gives every parameter in it, known or not, under its lower-cased
    name with quotes and escapes removed (parsed again when asked for, so a
    cached challenge holds no dict).  A challenge of another scheme parses too
    (``realm`` and ``nonce`` empty unless sent) and is never answered.
    """

    scheme: str
    realm: str
    nonce: str
    algorithm: str = "MD5"
    qop: tuple[str, ...] = ()
    opaque: str | None = None
    stale: bool = False
    userhash: bool = False
    domain: tuple[str, ...] = ()
    raw: str = field(default="", compare=False)

    @property
    def params(self) -> Mapping[str, str]:
        return MappingProxyType(_parse_auth_value(self.raw, "challenge")[1] if self.raw else {})

    @property
    def is_digest(self) -> bool:
        return self.scheme.lower() == "digest"

    @property
    def answerable(self) -> bool:
        """Whether ``DigestClient.authorize`` can answer this challenge."""
        return _answer_plan(self) is not None


@dataclass(frozen=True, slots=True)
class Credentials:
    """One Authorization or Proxy-Authorization value (RFC 3261 §20.7, §20.28).

    ``params`` maps lower-cased parameter names to their values with quotes and
    escapes removed.  The scheme is kept as sent; a UAS that knows only Digest
    answers any other scheme with a fresh challenge.
    """

    scheme: str
    params: Mapping[str, str] = field(hash=False)

    @property
    def is_digest(self) -> bool:
        return self.scheme.lower() == "digest"


def parse_challenge(value: str) -> Challenge:
    """Parse one WWW-Authenticate / Proxy-Authenticate field value.

    RFC 3261 §25.1:

        challenge        =  ("Digest" LWS digest-cln *(COMMA digest-cln))
                            / other-challenge
        other-challenge  =  auth-scheme LWS auth-param *(COMMA auth-param)
        digest-cln       =  realm / domain / nonce / opaque / stale / algorithm
                            / qop-options / auth-param
        realm            =  "realm" EQUAL realm-value
        domain           =  "domain" EQUAL LDQUOT URI *( 1*SP URI ) RDQUOT
        nonce            =  "nonce" EQUAL nonce-value
        opaque           =  "opaque" EQUAL quoted-string
        stale            =  "stale" EQUAL ( "true" / "false" )
        algorithm        =  "algorithm" EQUAL ( "MD5" / "MD5-sess" / token )
        qop-options      =  "qop" EQUAL LDQUOT qop-value *("," qop-value) RDQUOT
        qop-value        =  "auth" / "auth-int" / token

    RFC 7616 §3.3 adds ``userhash = "userhash" EQUAL ( "true" / "false" )``.
    A Digest challenge without realm or nonce cannot be answered and is an
    error.  As RFC 2617 §3.2.1 says of ``stale``, any value but a
    case-insensitive ``true`` counts as false; the same goes for ``userhash``.
    """
    scheme, params = _parse_auth_value(value, "challenge")
    if scheme.lower() == "digest":
        for required in ("realm", "nonce"):
            if required not in params:
                raise SipError(f"Digest challenge without {required}")
    algorithm = params.get("algorithm", "MD5")
    known = _ALGORITHMS.get(algorithm.lower())
    qop = params.get("qop", "").lower()
    return Challenge(
        scheme="Digest" if scheme.lower() == "digest" else scheme,
        realm=params.get("realm", ""),
        nonce=params.get("nonce", ""),
        algorithm=known.name if known is not None else algorithm,
        qop=_COMMON_QOP.get(qop)
        or tuple(option for option in (part.strip(" \t") for part in qop.split(",")) if option),
        opaque=params.get("opaque"),
        stale=params.get("stale", "").lower() == "true",
        userhash=params.get("userhash", "").lower() == "true",
        domain=tuple(params.get("domain", "").split()),
        raw=value,
    )


def parse_credentials(value: str) -> Credentials:
    """Parse one Authorization / Proxy-Authorization field value.

    RFC 3261 §25.1:

        credentials      =  ("Digest" LWS digest-response) / other-response
        digest-response  =  dig-resp *(COMMA dig-resp)
        dig-resp         =  username / realm / nonce / digest-uri / dresponse
                            / algorithm / cnonce / opaque / message-qop
                            / nonce-count / auth-param
        other-response   =  auth-scheme LWS auth-param *(COMMA auth-param)

    Only the shared auth-param syntax is checked; which parameters a Digest
    response must carry is for the verifier to decide.
    """
    scheme, params = _parse_auth_value(value, "credentials")
    return Credentials(scheme=scheme, params=MappingProxyType(params))


def select_challenge(challenges: Iterable[Challenge]) -> Challenge | None:
    """The strongest challenge ``DigestClient`` can answer, or ``None``.

    Strength is that of the hash: SHA-512-256 > SHA-256 > MD5, each with or
    without ``-sess``.  Among equally strong challenges the first one wins, so
    the server's order decides.  Other schemes, unknown algorithms, and qop
    lists without ``auth`` or ``auth-int`` are passed over.
    """
    best: Challenge | None = None
    best_strength = 0
    for challenge in challenges:
        plan = _answer_plan(challenge)
        if plan is not None and plan.algorithm.strength > best_strength:
            best, best_strength = challenge, plan.algorithm.strength
    return best


class DigestClient:
    """Answers digest challenges for one username and password.

    The password only ever enters hash inputs; it is not part of ``repr()``.
    ``cnonce_source`` makes the client nonce predictable in tests; by default
    it is 16 random bytes in hex.  For ``-sess`` algorithms the client nonce is
    fixed for the life of a server nonce (it is part of the session key A1);
    otherwise every request gets a fresh one.
    """

    __slots__ = ("_cnonce_source", "_nonce_uses", "_password", "_username")

    def __init__(
        self,
        username: str,
        password: str,
        *,
        cnonce_source: Callable[[], str] | None = None,
    ) -> None:
        _check_quotable(username, "username")
        self._username = username
        self._password = password
        self._cnonce_source = cnonce_source or _random_cnonce
        self._nonce_uses: list[_NonceUse] = []

    def __repr__(self) -> str:
        return f"DigestClient(username={self._username!r})"

    def authorize(self, challenge: Challenge, method: str, uri: str, body: bytes = b"") -> str:
        """The Authorization / Proxy-Authorization value answering ``challenge``.

        ``uri`` is the Request-URI as sent (RFC 3261 §22.4: the digest-uri is
        the Request-URI); ``body`` matters only when qop is auth-int.  qop is
        "auth" when offered, else "auth-int", else absent (RFC 2069 style).
        Raises ``SipError`` for a challenge that ``answerable`` rejects.
        """
        plan = _answer_plan(challenge)
        if plan is None:
            raise SipError(
                f"cannot answer {challenge.scheme} challenge with algorithm "
                f"{challenge.algorithm!r} and qop {list(challenge.qop)!r}"
            )
        algorithm, qop = plan.algorithm, plan.qop
        h = algorithm.hex_digest
        realm, nonce = challenge.realm, challenge.nonce
        secret = h(f"{self._username}:{realm}:{self._password}".encode())

        fields: list[tuple[str, str]] = [
            (
                "username",
                _quote(h(f"{self._username}:{realm}".encode()))
                if challenge.userhash
                else _quote(self._username),
            ),
            ("realm", _quote(realm)),
            ("nonce", _quote(nonce)),
            ("uri", _quote(uri)),
        ]
        if qop is None:
            ha2 = h(f"{method}:{uri}".encode())
            response = h(f"{secret}:{nonce}:{ha2}".encode())
            fields += [("response", _quote(response)), ("algorithm", algorithm.name)]
        else:
            nc, cnonce = self._next_use(realm, nonce, session=algorithm.session)
            ha1 = h(f"{secret}:{nonce}:{cnonce}".encode()) if algorithm.session else secret
            a2 = f"{method}:{uri}" if qop == "auth" else f"{method}:{uri}:{h(body)}"
            ha2 = h(a2.encode())
            response = h(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}".encode())
            fields += [
                ("response", _quote(response)),
                ("algorithm", algorithm.name),
                ("cnonce", _quote(cnonce)),
                ("nc", nc),
                ("qop", qop),
            ]
        if challenge.opaque is not None:
            fields.append(("opaque", _quote(challenge.opaque)))
        if challenge.userhash:
            fields.append(("userhash", "true"))
        return "Digest " + ", ".join(f"{name}={value}" for name, value in fields)

    def _next_use(self, realm: str, nonce: str, *, session: bool) -> tuple[str, str]:
        """Count one more use of ``nonce``; return ``(nc, cnonce)`` for it."""
        uses = self._nonce_uses
        for i, use in enumerate(uses):
            if use.nonce == nonce and use.realm == realm:
                del uses[i]
                break
        else:
            use = _NonceUse(realm, nonce)
        use.count += 1
        if not session:
            cnonce = self._cnonce_source()
        else:
            if use.session_cnonce is None:
                use.session_cnonce = self._cnonce_source()
            cnonce = use.session_cnonce
        uses.append(use)
        if len(uses) > _MAX_TRACKED_NONCES:
            del uses[0]
        return f"{use.count:08x}", cnonce


@dataclass(slots=True)
class _NonceUse:
    realm: str
    nonce: str
    count: int = 0
    session_cnonce: str | None = None


@dataclass(frozen=True)
class _AnswerPlan:
    algorithm: _Algorithm
    qop: str | None


def _answer_plan(challenge: Challenge) -> _AnswerPlan | None:
    """How ``DigestClient`` would answer ``challenge``, or ``None`` if it cannot."""
    if not challenge.is_digest:
        return None
    algorithm = _ALGORITHMS.get(challenge.algorithm.lower())
    if algorithm is None:
        return None
    qop: str | None
    if "auth" in challenge.qop:
        qop = "auth"
    elif "auth-int" in challenge.qop:
        qop = "auth-int"
    elif challenge.qop:
        return None
    else:
        qop = None
    # -sess mixes a cnonce into A1, and a cnonce is sent only with a qop
    # (RFC 2617 §3.2.2): without one the server could not follow.
    if algorithm.session and qop is None:
        return None
    return _AnswerPlan(algorithm, qop)


def _parse_auth_value(value: str, what: str) -> tuple[str, dict[str, str]]:
    """Split ``auth-scheme LWS auth-param *(COMMA auth-param)`` into its parts.

        auth-scheme      =  token
        auth-param       =  auth-param-name EQUAL ( token / quoted-string )
        auth-param-name  =  token
        EQUAL = SWS "=" SWS    COMMA = SWS "," SWS

    The value arrives unfolded, so LWS is ``1*(SP / HTAB)``.  Parameter names
    are lower-cased (RFC 3261 §7.3.1: they compare case-insensitively); a name
    given twice is an error.
    """
    text = value.strip(" \t")
    scheme_match = _AUTH_SCHEME.match(text)
    if scheme_match is None:
        raise SipError(f"{what}: missing auth-scheme")
    if scheme_match.group(2) is None or scheme_match.end() == len(text):
        raise SipError(f"{what}: auth-scheme must be followed by LWS and parameters")
    scheme = scheme_match.group(1)
    params: dict[str, str] = {}
    pos = scheme_match.end()
    end = len(text)
    while True:
        param = _AUTH_PARAM.match(text, pos)
        if param is None:
            raise SipError(f"{what}: malformed parameter at offset {pos}")
        name, quoted, token, comma = param.groups()
        name = name.lower()
        if name in params:
            raise SipError(f"{what}: duplicate parameter {name!r}")
        if len(params) == MAX_AUTH_PARAMS:
            raise SipError(f"{what}: more than {MAX_AUTH_PARAMS} parameters")
        if token is not None:
            params[name] = token
        elif "\\" in quoted:
            params[name] = _QUOTED_PAIR.sub(lambda pair: pair.group(1), quoted)
        else:
            params[name] = quoted
        pos = param.end()
        if comma is None:
            if pos == end:
                return scheme, params
            raise SipError(f"{what}: expected ',' at offset {pos}")


def _check_quotable(value: str, what: str) -> None:
    """Refuse text that a quoted-string cannot carry (CR, LF and other controls)."""
    if _UNQUOTABLE.search(value):
        raise ValueError(f"{what} contains a control character")


def _quote(value: str) -> str:
    if value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'  # nearly every value: nothing to refuse or escape
    _check_quotable(value, "quoted value")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _random_cnonce() -> str:
    return secrets.token_hex(16)
