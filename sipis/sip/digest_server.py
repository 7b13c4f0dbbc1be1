"""SIP digest authentication, server side: challenges and the check of an answer.

Theory of operation
-------------------
Phone apps REGISTER to sipis with digest credentials: the username is the
app's instance id, the password its instance secret.  sipis keeps no secret,
only what digest needs: ``digest_ha1`` gives H(username ":" realm ":" password)
for each algorithm sipis offers, computed once when the secret is issued.

A request without credentials (or with wrong ones) is answered 401 with the
values of ``DigestServer.challenges``: one WWW-Authenticate field per offered
algorithm, most preferred first (RFC 8760 §2.4), all with the same nonce and
``qop="auth"``.  The client answers one of them (``parse_credentials`` reads
its Authorization value) and ``DigestServer.check`` gives a ``Verdict``:

    OK       the answer is right and fresh: accept the request
    STALE    the answer is right but its nonce has expired, or is no longer
             tracked here: challenge again with ``stale=True`` so the client
             retries with a fresh nonce and the same password (RFC 7616 §3.3)
    INVALID  anything else: challenge again without ``stale``

Nonces carry their own proof of origin, so checking one needs no table of
issued nonces (the format is this server's choice, RFC 7616 §3.3):

    nonce = base64url( issued || salt || MAC )             (48 characters)
    issued = issue time, milliseconds, 64-bit signed big-endian
    salt   = 12 random bytes (two challenges in one millisecond differ)
    MAC    = first 16 bytes of HMAC-SHA256( key, label || issued || salt || realm )

A nonce with a bad MAC, or issued in the future (beyond a small clock skew
between nodes sharing the key), is INVALID; one older than ``nonce_lifetime``
is stale.  Replay protection does need state: every issued nonce enters a
bounded LRU table with the last nonce count (``nc``) accepted for it, and an
answer is accepted only if its ``nc`` is strictly greater (RFC 7616 §3.4:
the server "SHOULD check" that the count increases).  A nonce that dropped
out of the table, or that another node issued, gives STALE: the first request
after eviction could otherwise be replayed.  A flood of challenges evicts
nonces early; their clients then get one extra 401, never a false accept.

The response is checked with the formulas in digest.py (RFC 7616 §3.4.1,
RFC 3261 §22.4), qop ``auth`` only, non-session algorithms only:

    response = KD( HA1, unq(nonce) ":" nc ":" unq(cnonce) ":" unq(qop) ":" H(A2) )
    A2       = Method ":" request-uri

An unknown username costs the same work as a known one: the response is
computed with a placeholder HA1 and compared in constant time before the
verdict, so the time taken does not tell which instance ids exist.

Nothing here performs I/O or reads a clock; ``now`` (seconds, any fixed
epoch, the same for ``challenges`` and ``check``) comes from the caller.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import math
import re
import secrets
import struct
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from .digest import _ALGORITHMS, Credentials, _Algorithm, _check_quotable, _quote
from .errors import SipError
from .uri import SipUri, parse_uri

__all__ = ["HA1_ALGORITHMS", "DigestServer", "Verdict", "digest_ha1"]

# What sipis stores an HA1 for, and by default offers, in this order.  MD5
# comes first: every phone implements it, and older stacks answer only the
# first challenge of a 401.  The order costs nothing in strength: the password
# is a random 43-character token (about 256 bits), so no hash here protects a
# weak password from offline guessing.  SHA-512-256 is left out: few SIP stacks
# answer it, and each algorithm costs a stored HA1 and a header in every 401;
# ``DigestServer(algorithms=...)`` still accepts it for a deployment that wants it.
HA1_ALGORITHMS: tuple[str, ...] = ("MD5", "SHA-256")

# Domain separation: this key signs nonces and nothing else with this label.
_NONCE_LABEL = b"sipis digest nonce v1\x00"
_ISSUED = struct.Struct(">q")
_SALT_BYTES = 12
_MAC_BYTES = 16
_NONCE_BYTES = _ISSUED.size + _SALT_BYTES + _MAC_BYTES
# 36 bytes encode to 48 base64url characters with no padding.
_NONCE = re.compile(r"[A-Za-z0-9_-]{48}")
# How far in the future a nonce's issue time may lie: clocks of nodes that share
# the key differ a little; a nonce from further ahead was not issued by them.
_MAX_FUTURE_SKEW = 2.0
_MIN_KEY_BYTES = 16
# nc-value = 8LHEX (RFC 3261 §25.1); hex digits compare case-insensitively.
_NONCE_COUNT = re.compile(r"[0-9A-Fa-f]{8}")
_REQUIRED_PARAMS = ("username", "realm", "nonce", "uri", "response", "cnonce", "nc", "qop")


class Verdict(enum.Enum):
    """The outcome of ``DigestServer.check``."""

    OK = "ok"
    STALE = "stale"
    INVALID = "invalid"


def digest_ha1(algorithm: str, username: str, realm: str, password: str) -> str:
    """Hex H(username ":" realm ":" password), the HA1 that digest needs (RFC 7616 §3.4.2).

    ``algorithm`` is "MD5", "SHA-256" or "SHA-512-256" (case-insensitive); a
    ``-sess`` variant or an unknown name raises ``ValueError``.  Text is UTF-8.
    """
    return _plain_algorithm(algorithm).hex_digest(f"{username}:{realm}:{password}".encode())


@dataclass(frozen=True, slots=True)
class _Answer:
    """The parameters of a Digest response that ``check`` needs, syntax-checked."""

    algorithm: _Algorithm
    realm: str
    nonce: str
    uri: str
    response: str
    cnonce: str
    nc: str
    qop: str


class DigestServer:
    """Issues digest challenges and checks the answers (see the module docstring).

    ``key`` signs nonces (at least 16 bytes; nodes that share it accept each
    other's nonces as authentic).  ``algorithms`` are offered in the given
    order and must be non-session names known to ``digest_ha1``.  At most
    ``tracked_nonces`` nonces are remembered for replay protection.

    Credentials with ``userhash=true`` (RFC 7616 §3.4.4) are refused as
    INVALID: the challenges never ask for them, and finding the user behind a
    hashed name would need a lookup by H(username ":" realm).
    """

    __slots__ = (
        "_algorithms",
        "_key",
        "_nonce_counts",
        "_nonce_lifetime",
        "_placeholder_ha1",
        "_tracked_nonces",
    )

    def __init__(
        self,
        key: bytes,
        *,
        nonce_lifetime: float = 300.0,
        algorithms: tuple[str, ...] = HA1_ALGORITHMS,
        tracked_nonces: int = 10_000,
    ) -> None:
        if len(key) < _MIN_KEY_BYTES:
            raise ValueError(f"nonce key must have at least {_MIN_KEY_BYTES} bytes")
        if not (math.isfinite(nonce_lifetime) and nonce_lifetime > 0):
            raise ValueError("nonce_lifetime must be a positive number of seconds")
        if tracked_nonces < 1:
            raise ValueError("tracked_nonces must be at least 1")
        offered = tuple(_plain_algorithm(name) for name in algorithms)
        if not offered:
            raise ValueError("at least one algorithm must be offered")
        if len(set(offered)) != len(offered):
            raise ValueError("an algorithm is listed twice")
        self._key = key
        self._nonce_lifetime = nonce_lifetime
        self._algorithms = offered
        # Stands in for the HA1 of a user who has none, with a real HA1's length.
        self._placeholder_ha1 = {
            algorithm: "0" * (2 * hashlib.new(algorithm.hash_name).digest_size)
            for algorithm in offered
        }
        self._tracked_nonces = tracked_nonces
        # nonce -> last nc accepted for it (0: issued, not yet used); oldest first.
        self._nonce_counts: OrderedDict[str, int] = OrderedDict()

    def __repr__(self) -> str:
        names = tuple(algorithm.name for algorithm in self._algorithms)
        return f"DigestServer(algorithms={names!r}, nonce_lifetime={self._nonce_lifetime!r})"

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The offered algorithms, canonically spelled, most preferred first."""
        return tuple(algorithm.name for algorithm in self._algorithms)

    def challenges(self, realm: str, now: float, *, stale: bool = False) -> list[str]:
        """WWW-Authenticate (or Proxy-Authenticate) values for a 401 (or 407).

        One value per offered algorithm, in order of preference, all with one
        fresh nonce (RFC 8760 §2.4)::

            Digest realm="...", nonce="...", algorithm=SHA-256, qop="auth"

        with ``, stale=true`` appended when ``stale`` is set.  A realm that a
        quoted-string cannot carry (control characters, lone surrogates)
        raises ``ValueError``.
        """
        quoted_realm = _quote_realm(realm)
        nonce = self._issue_nonce(realm, now)
        tail = ", stale=true" if stale else ""
        return [
            f'Digest realm={quoted_realm}, nonce="{nonce}", '
            f'algorithm={algorithm.name}, qop="auth"{tail}'
            for algorithm in self._algorithms
        ]

    def check(
        self,
        credentials: Credentials,
        *,
        method: str,
        uri: str,
        realm: str,
        ha1: Mapping[str, str] | None,
        now: float,
    ) -> Verdict:
        """Judge the answer to one of this server's challenges.

        ``method`` and ``uri`` are the request's method and Request-URI as
        received.  The answer's ``uri`` must name the same target (RFC 3261
        §22.4): equal as text, or the same scheme, user, host and port, for
        clients differ on whether they keep URI parameters such as
        ``transport`` there (the hash covers the ``uri`` as the client sent
        it).  ``realm`` is the realm the challenge named.  ``ha1`` holds the
        stored HA1 values of the user named by the answer's ``username``,
        keyed by algorithm as spelled in ``HA1_ALGORITHMS``, or ``None`` for
        an unknown user.  An OK raises the nonce's accepted count
        to the answer's ``nc``; nothing else changes state (an expired nonce is
        forgotten).
        """
        answer = self._read_answer(credentials)
        if answer is None or answer.realm != realm or not _same_target(answer.uri, uri):
            return Verdict.INVALID
        issued = self._nonce_issue_time(answer.nonce, realm)
        if issued is None or issued > now + _MAX_FUTURE_SKEW:
            return Verdict.INVALID

        algorithm = answer.algorithm
        stored = ha1.get(algorithm.name) if ha1 is not None else None
        # Same work for a user without an HA1 as for one with: hash and compare,
        # then decide.
        secret = stored if stored is not None else self._placeholder_ha1[algorithm]
        expected = _expected_response(algorithm, secret, answer, method)
        matches = hmac.compare_digest(expected.encode(), answer.response.lower().encode())
        if stored is None or not matches:
            return Verdict.INVALID

        if now - issued > self._nonce_lifetime:
            self._nonce_counts.pop(answer.nonce, None)
            return Verdict.STALE
        last_count = self._nonce_counts.get(answer.nonce)
        if last_count is None:
            return Verdict.STALE
        count = int(answer.nc, 16)
        if count <= last_count:
            return Verdict.INVALID
        self._nonce_counts[answer.nonce] = count
        self._nonce_counts.move_to_end(answer.nonce)
        return Verdict.OK

    def _read_answer(self, credentials: Credentials) -> _Answer | None:
        """The parameters of a Digest answer this server can check, or ``None``.

        RFC 3261 §25.1 (with RFC 7616 §3.4 and RFC 8760 algorithm names):

            dig-resp     =  username / realm / nonce / digest-uri / dresponse
                            / algorithm / cnonce / opaque / message-qop
                            / nonce-count / auth-param
            message-qop  =  "qop" EQUAL qop-value
            cnonce       =  "cnonce" EQUAL cnonce-value
            nonce-count  =  "nc" EQUAL nc-value
            nc-value     =  8LHEX

        Required here: username, realm, nonce, uri, response, a non-empty
        cnonce, nc and qop=auth (the challenges demand a qop, so its absence
        means a downgrade to RFC 2069).  A missing algorithm means MD5
        (RFC 7616 §3.3); it must be one of the offered ones.  ``userhash=true``
        is refused.
        """
        params = credentials.params
        if not credentials.is_digest or params.get("userhash", "").lower() == "true":
            return None
        algorithm = _ALGORITHMS.get(params.get("algorithm", "MD5").lower())
        if algorithm is None or algorithm not in self._algorithms:
            return None
        if any(name not in params for name in _REQUIRED_PARAMS):
            return None
        cnonce, nc, qop = params["cnonce"], params["nc"], params["qop"]
        if not cnonce or qop.lower() != "auth" or _NONCE_COUNT.fullmatch(nc) is None:
            return None
        return _Answer(
            algorithm=algorithm,
            realm=params["realm"],
            nonce=params["nonce"],
            uri=params["uri"],
            response=params["response"],
            cnonce=cnonce,
            nc=nc,
            qop=qop,
        )

    def _issue_nonce(self, realm: str, now: float) -> str:
        issued = _ISSUED.pack(math.floor(now * 1000))
        salt = secrets.token_bytes(_SALT_BYTES)
        nonce = base64.urlsafe_b64encode(issued + salt + self._mac(issued, salt, realm)).decode()
        self._nonce_counts[nonce] = 0
        if len(self._nonce_counts) > self._tracked_nonces:
            self._nonce_counts.popitem(last=False)
        return nonce

    def _nonce_issue_time(self, nonce: str, realm: str) -> float | None:
        """The issue time (seconds) of a nonce this key made for ``realm``, else ``None``."""
        if _NONCE.fullmatch(nonce) is None:
            return None
        try:
            raw = base64.urlsafe_b64decode(nonce)
        except binascii.Error:
            return None
        if len(raw) != _NONCE_BYTES:
            return None
        issued = raw[: _ISSUED.size]
        salt = raw[_ISSUED.size : _ISSUED.size + _SALT_BYTES]
        if not hmac.compare_digest(raw[-_MAC_BYTES:], self._mac(issued, salt, realm)):
            return None
        (milliseconds,) = _ISSUED.unpack(issued)
        return float(milliseconds) / 1000

    def _mac(self, issued: bytes, salt: bytes, realm: str) -> bytes:
        message = _NONCE_LABEL + issued + salt + realm.encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()[:_MAC_BYTES]


def _plain_algorithm(name: str) -> _Algorithm:
    """The non-session algorithm called ``name``; ``ValueError`` for anything else."""
    algorithm = _ALGORITHMS.get(name.lower())
    if algorithm is None or algorithm.session:
        raise ValueError(f"unsupported HA1 algorithm {name!r}")
    return algorithm


def _expected_response(algorithm: _Algorithm, ha1: str, answer: _Answer, method: str) -> str:
    h = algorithm.hex_digest
    ha2 = h(f"{method}:{answer.uri}".encode())
    return h(f"{ha1}:{answer.nonce}:{answer.nc}:{answer.cnonce}:{answer.qop}:{ha2}".encode())


def _quote_realm(realm: str) -> str:
    """``realm`` as a quoted-string; ``ValueError`` if one cannot carry it."""
    _check_quotable(realm, "realm")
    try:
        realm.encode()
    except UnicodeEncodeError:
        raise ValueError("realm is not valid Unicode text") from None
    return _quote(realm)


def _same_target(answered: str, requested: str) -> bool:
    """Whether the answer's digest-uri names the Request-URI's target."""
    if answered == requested:
        return True
    try:
        a, b = parse_uri(answered), parse_uri(requested)
    except SipError:
        return False
    if not isinstance(a, SipUri) or not isinstance(b, SipUri):
        return False
    return (a.scheme, a.user, a.host_key, a.port) == (b.scheme, b.user, b.host_key, b.port)
