"""What every push provider shares: the push, its outcome, and the provider interface.

A provider turns one ``Push`` into one HTTP request to Apple or Google and
reports one ``Outcome``; it never raises for anything the service or the
network did.  Deciding to retry, to give up, or to erase an instance whose
token was rejected belongs to the caller (``sipis.push.sender``).
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol


class Kind(enum.Enum):
    """Why a push is sent; it decides the push type (VoIP only for ``CALL``) and priority."""

    CALL = "call"
    CALL_CANCELLED = "call_cancelled"
    CALL_MISSED = "call_missed"
    ANSWERED_ELSEWHERE = "answered_elsewhere"
    MESSAGE = "message"
    EXPIRING = "expiring"
    ERASED = "erased"
    TEST = "test"  # ``sipis push test``: an operator checking that pushes reach the app


@dataclass(frozen=True, slots=True)
class Routing:
    """Where an instance's pushes go, decrypted; held in memory while the instance lives."""

    instance_id: str
    platform: str
    app_id: str
    environment: str
    call_token: str = field(repr=False)
    other_token: str | None = field(repr=False)
    payload_key: bytes | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class Push:
    """One push to one device token.

    ``payload`` is the JSON object the app receives (already encrypted when
    the instance has a payload key); ``collapse_id`` groups pushes about one
    call; ``ttl`` is how long the service may hold the push for a device
    that is offline (0: deliver now or never).  ``app_id`` is the iOS bundle
    id (APNs topic, ``<app_id>.voip`` for calls) or the Android package.
    """

    kind: Kind
    platform: str
    app_id: str
    token: str = field(repr=False)
    environment: str
    payload: dict[str, Any] = field(repr=False)
    instance_id: str
    collapse_id: str | None = None
    ttl: int = 0

    @property
    def urgent(self) -> bool:
        """Calls and messages must wake the device now (APNs priority 10, FCM high)."""
        return self.kind in (Kind.CALL, Kind.MESSAGE)


@dataclass(frozen=True, slots=True)
class Delivered:
    """The service accepted the push (``id``: its apns-id or FCM message name, if given)."""

    id: str | None = None


@dataclass(frozen=True, slots=True)
class TokenInvalid:
    """The token will never work again (APNs 410/BadDeviceToken/DeviceTokenNotForTopic,
    FCM UNREGISTERED): the instance is to be erased."""

    reason: str


@dataclass(frozen=True, slots=True)
class RetryAfter:
    """A temporary refusal (429, 5xx, a network failure); ``seconds`` if the service said."""

    reason: str
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    """A refusal that retrying will not cure (a malformed push, bad credentials, ...)."""

    reason: str


Outcome = Delivered | TokenInvalid | RetryAfter | Failed

_DELAY_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def retry_after_seconds(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """The wait a ``Retry-After`` header asks for, or None if absent or unreadable.

    RFC 9110, 10.2.3: ``Retry-After = HTTP-date / delay-seconds`` with
    ``delay-seconds = 1*DIGIT``; a fraction after the digits is taken as
    well.  A date in the past is no wait at all.
    """
    if value is None:
        return None
    text = value.strip()
    if _DELAY_SECONDS.fullmatch(text):
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        return None
    return max(0.0, when.timestamp() - now())


def outcome_name(outcome: Outcome) -> str:
    """The metric label of an outcome: delivered, token_invalid, retry_after, failed."""
    return {
        Delivered: "delivered",
        TokenInvalid: "token_invalid",
        RetryAfter: "retry_after",
        Failed: "failed",
    }[type(outcome)]


class Provider(Protocol):
    """One push service (APNs, FCM) or the logging stand-in."""

    name: str

    async def send(self, push: Push) -> Outcome: ...

    async def close(self) -> None: ...

    def credential_expiry(self) -> float | None:
        """When the credentials stop working (epoch seconds; None if they do not expire)."""
