"""APNs: pushes to every iOS app sipis serves, over Apple's HTTP/2 provider API.

One ``ApnsProvider`` holds one set of credentials (a token-auth signing key,
or a push certificate) and serves several apps: the topic comes from each
push.  It keeps one aioapns client per environment (production, sandbox),
made on first use.

What each kind of push becomes (API.md, "Pushes"):

    kind                 push type   priority  topic            aps
    CALL                 voip        10        <app_id>.voip    (none: PushKit gets the dict)
    MESSAGE              alert       10        <app_id>         alert, sound, mutable-content
    CALL_MISSED          alert       10        <app_id>         alert, sound, mutable-content
    ERASED               alert       10        <app_id>         alert, mutable-content
    CALL_CANCELLED       background  5         <app_id>         content-available
    ANSWERED_ELSEWHERE   background  5         <app_id>         content-available
    EXPIRING             background  5         <app_id>         content-available

Only ``CALL`` is ever a VoIP push: iOS ends an app that gets a VoIP push
without reporting a call.  Alerts the user sees go at priority 10 (shown
now); silent updates the app handles itself are background pushes, which
Apple requires at priority 5.  The alert text never carries the caller or
the message: it names localization keys the app defines
(``SIPIS_<KIND>_TITLE`` / ``SIPIS_<KIND>_BODY``, e.g.
``SIPIS_CALL_MISSED_TITLE``), so the same push works with an encrypted
payload, and ``mutable-content`` lets the app's notification service
extension decrypt the payload and show the details.  The payload itself
(the app's data, maybe sealed) travels under the top-level key ``sipis``.

A call push has ``apns-expiration: 0`` (deliver now or never); other pushes
expire ``Push.ttl`` seconds after sending, or at once when it is 0.

Outcomes: 200 is ``Delivered(apns-id)``; 410, 400 BadDeviceToken and 400
DeviceTokenNotForTopic are ``TokenInvalid``; 429, 5xx, timeouts and
connection failures are ``RetryAfter`` (with the seconds of a
``retry-after`` header, if one came); any other refusal is ``Failed``.
Retrying is the sender's job: aioapns makes one attempt per push.  A push
that times out closes its connection, because a connection that has
stopped answering (a dropped NAT mapping, say) would otherwise be reused
for every following push.  Tokens appear in logs only masked; keys,
payloads and provider tokens never.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aioapns import APNs, NotificationRequest, PushType
from aioapns.common import NotificationResult
from aioapns.connection import APNsTLSClientProtocol
from aioapns.exceptions import ConnectionClosed, MaxAttemptsExceeded
from aioapns.exceptions import ConnectionError as ApnsConnectionError
from cryptography import x509
from h2.exceptions import ProtocolError
from hpack import Encoder, HeaderTuple, NeverIndexedHeaderTuple

from sipis.push.base import (
    Delivered,
    Failed,
    Kind,
    Outcome,
    Push,
    RetryAfter,
    TokenInvalid,
    retry_after_seconds,
)
from sipis.push.logged import masked

log = logging.getLogger(__name__)

APPLE_SERVERS: dict[str, tuple[str, int]] = {
    "production": ("api.push.apple.com", 443),
    "sandbox": ("api.sandbox.push.apple.com", 443),
}
DEFAULT_TIMEOUT = 5.0
PAYLOAD_KEY = "sipis"
TOKEN_REASONS = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic"})

_ALERT_KINDS = frozenset({Kind.MESSAGE, Kind.CALL_MISSED, Kind.ERASED, Kind.TEST})
_WITH_SOUND = frozenset({Kind.MESSAGE, Kind.CALL_MISSED})


@dataclass(frozen=True)
class ApnsTokenKey:
    """Token auth: the .p8 signing key Apple issued, its key id and the team id.

    Such a key does not expire (Apple only revokes it), so the provider
    reports no credential expiry.
    """

    key_file: Path
    key_id: str
    team_id: str


@dataclass(frozen=True)
class ApnsCertificate:
    """Certificate auth: one PEM file holding the push certificate and its private key."""

    cert_file: Path


@dataclass(frozen=True)
class ApnsWire:
    """A push as APNs gets it: the headers that vary by kind, and the JSON body."""

    push_type: PushType
    priority: int
    topic: str
    expiration: int
    body: dict[str, Any] = field(repr=False)


def shape(push: Push) -> ApnsWire:
    """What ``push`` becomes on the wire: push type, priority, topic, expiration, JSON body."""
    body: dict[str, Any] = {PAYLOAD_KEY: push.payload}
    if push.kind is Kind.CALL:
        return ApnsWire(PushType.VOIP, 10, f"{push.app_id}.voip", 0, body)
    expiration = 0 if push.ttl <= 0 else int(time.time()) + push.ttl
    if push.kind in _ALERT_KINDS:
        name = push.kind.name
        aps: dict[str, Any] = {
            "alert": {"title-loc-key": f"SIPIS_{name}_TITLE", "loc-key": f"SIPIS_{name}_BODY"},
            "mutable-content": 1,
        }
        if push.kind in _WITH_SOUND:
            aps["sound"] = "default"
        return ApnsWire(PushType.ALERT, 10, push.app_id, expiration, {"aps": aps, **body})
    aps = {"content-available": 1}
    return ApnsWire(PushType.BACKGROUND, 5, push.app_id, expiration, {"aps": aps, **body})


class _Request(NotificationRequest):
    """aioapns's request, carrying the push's wire form and the answer's Retry-After."""

    __slots__ = ("retry_after", "wire")

    def __init__(self, push: Push, wire: ApnsWire) -> None:
        super().__init__(
            device_token=push.token,
            message=wire.body,
            priority=wire.priority,
            collapse_key=push.collapse_id,
            push_type=wire.push_type,
            apns_topic=wire.topic,
        )
        self.wire = wire
        self.retry_after: str | None = None


class _ApnsProtocol(APNsTLSClientProtocol):
    """aioapns's HTTP/2 connection to APNs, sending the headers sipis needs.

    Subclassed per server with its ``APNS_SERVER`` and ``APNS_PORT``
    (``_protocol_for``): that is where aioapns's pool connects.  Unlike
    aioapns's own connection it

    - sends ``apns-expiration`` as given: aioapns adds the current time to
      any value, so it cannot send 0 ("deliver now or never");
    - keeps the ``retry-after`` header of a refusal;
    - completes a request whose error answer has no JSON reason, rather
      than leaving it waiting;
    - drops the connection at once when a caller gives up on a request (a
      timeout): the late answer is ignored, and a connection that stopped
      answering is not used again;
    - takes no new request once closing;
    - encodes header blocks cheaply (``_PlainEncoder``) and keeps the
      values that differ per push (device token, ids) out of the HPACK
      table, where they would only evict the ones that repeat.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn.encoder = _PlainEncoder()
        self._in_flight: dict[str, _Request] = {}
        self._closing = False
        self.lost: asyncio.Future[None] = self.loop.create_future()

    @property
    def is_busy(self) -> bool:
        """A closing connection takes no more requests (the pool drops it once it is lost)."""
        return self._closing or super().is_busy

    def close(self) -> None:
        self._closing = True
        super().close()

    async def send_notification(self, request: NotificationRequest) -> NotificationResult:
        assert isinstance(request, _Request)
        stream_id = await self.free_channels.acquire()
        headers: list[HeaderTuple | tuple[str, str]] = [
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", self.APNS_SERVER),
            NeverIndexedHeaderTuple(":path", f"/3/device/{request.device_token}"),
            NeverIndexedHeaderTuple("apns-id", request.notification_id),
            ("apns-topic", request.wire.topic),
            ("apns-push-type", request.wire.push_type.value),
            ("apns-priority", str(request.wire.priority)),
            ("apns-expiration", str(request.wire.expiration)),
        ]
        if request.collapse_key is not None:
            headers.append(NeverIndexedHeaderTuple("apns-collapse-id", request.collapse_key))
        if self.auth_provider is not None:
            headers.append(("authorization", self.auth_provider.get_header()))
        body = json.dumps(request.wire.body, ensure_ascii=False, separators=(",", ":")).encode()
        self.conn.send_headers(stream_id, headers)
        self.conn.send_data(stream_id, body, end_stream=True)
        self.flush()
        answer: asyncio.Future[NotificationResult] = self.loop.create_future()
        self.requests[request.notification_id] = answer
        self.request_streams[stream_id] = request.notification_id
        self._in_flight[request.notification_id] = request
        try:
            return await answer
        except asyncio.CancelledError:
            self._closing = True
            if self.transport is not None:
                self.transport.abort()
            raise
        finally:
            self.requests.pop(request.notification_id, None)
            self.request_statuses.pop(request.notification_id, None)
            self._in_flight.pop(request.notification_id, None)

    def on_response_received(self, headers: dict[bytes, bytes]) -> None:
        notification_id = headers.get(b"apns-id", b"").decode()
        request = self._in_flight.get(notification_id)
        if request is None:
            return
        retry_after = headers.get(b"retry-after")
        if retry_after is not None:
            request.retry_after = retry_after.decode(errors="replace")
        super().on_response_received(headers)

    def on_data_received(self, raw_data: bytes, stream_id: int) -> None:
        if stream_id not in self.request_streams:
            return
        # A body that is not a JSON object leaves the request to on_stream_ended.
        with contextlib.suppress(ValueError, AttributeError):
            super().on_data_received(raw_data, stream_id)

    def on_stream_ended(self, stream_id: int) -> None:
        notification_id = self.request_streams.pop(stream_id, None)
        if notification_id is not None:
            answer = self.requests.get(notification_id)
            status = self.request_statuses.pop(notification_id, None)
            if answer is not None and not answer.done() and status is not None:
                answer.set_result(NotificationResult(notification_id, status))
        super().on_stream_ended(stream_id)

    def connection_lost(self, exc: Exception | None) -> None:
        for notification_id in [i for i, answer in self.requests.items() if answer.done()]:
            del self.requests[notification_id]
        super().connection_lost(exc)
        if not self.lost.done():
            self.lost.set_result(None)


class _PlainEncoder(Encoder):
    """HPACK without Huffman coding: it would save APNs about a fifth of a
    header block's ~300 bytes, for four times the encoding CPU per push."""

    def encode(self, headers: Any, huffman: bool = False) -> bytes:
        return super().encode(headers, huffman=False)


def _protocol_for(host: str, port: int) -> type[_ApnsProtocol]:
    """The connection class aioapns uses to reach ``host:port``."""

    class ServerProtocol(_ApnsProtocol):
        APNS_SERVER = host
        APNS_PORT = port

    return ServerProtocol


async def _leave_logging_to_the_provider(
    request: NotificationRequest, result: NotificationResult
) -> None:
    """aioapns logs every refusal at ERROR; the provider logs outcomes itself."""


class ApnsProvider:
    """The ``Provider`` for iOS: ``await provider.send(push)`` -> ``Outcome``.

    ``credentials``: an ``ApnsTokenKey`` or an ``ApnsCertificate``.
    ``servers``: host and port per environment (default: Apple's);
    ``ca_file``: the CAs to trust instead of the system's (a local server);
    ``timeout``: seconds one push may take, connecting included.
    """

    name = "apns"

    def __init__(
        self,
        credentials: ApnsTokenKey | ApnsCertificate,
        *,
        servers: dict[str, tuple[str, int]] | None = None,
        ca_file: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = 4,
    ) -> None:
        self._credentials = credentials
        self._servers = dict(APPLE_SERVERS if servers is None else servers)
        self._ca_file = ca_file
        self._timeout = timeout
        self._max_connections = max_connections
        self._clients: dict[str, APNs] = {}
        if isinstance(credentials, ApnsTokenKey):
            self._signing_key: str | None = credentials.key_file.read_text()
            self._expiry: float | None = None
        else:
            self._signing_key = None
            ssl.create_default_context().load_cert_chain(credentials.cert_file)
            certificate = x509.load_pem_x509_certificates(credentials.cert_file.read_bytes())[0]
            self._expiry = certificate.not_valid_after_utc.timestamp()

    def credential_expiry(self) -> float | None:
        """The push certificate's notAfter; None for a signing key, which does not expire."""
        return self._expiry

    async def send(self, push: Push) -> Outcome:
        if push.environment not in self._servers:
            return Failed(f"no APNs server for environment {push.environment!r}")
        if not push.app_id:
            return Failed("no app id, so no APNs topic")
        request = _Request(push, shape(push))
        try:
            async with asyncio.timeout(self._timeout):
                result = await self._client(push.environment, request).send_notification(request)
        except TimeoutError:
            outcome: Outcome = RetryAfter(f"no answer within {self._timeout:g} s")
        except (
            ApnsConnectionError,
            ConnectionClosed,
            MaxAttemptsExceeded,
            OSError,
            ProtocolError,
        ) as error:
            outcome = RetryAfter(f"connection failed ({type(error).__name__})")
        else:
            outcome = _outcome(result, request.retry_after)
        log.debug(
            "apns %s push for instance %s to %s (%s): %s",
            push.kind.value,
            push.instance_id,
            masked(push.token),
            push.environment,
            outcome,
        )
        return outcome

    async def close(self) -> None:
        connections = [
            connection
            for client in self._clients.values()
            for connection in client.pool.connections
            if isinstance(connection, _ApnsProtocol)
        ]
        for client in self._clients.values():
            client.pool.close()
        self._clients.clear()
        if connections:
            await asyncio.wait([connection.lost for connection in connections], timeout=1.0)

    def _client(self, environment: str, request: _Request) -> APNs:
        client = self._clients.get(environment)
        if client is None:
            client = self._new_client(request.wire.topic)
            client.pool.protocol_class = _protocol_for(*self._servers[environment])
            self._clients[environment] = client
        return client

    def _new_client(self, topic: str) -> APNs:
        """An aioapns client; every request names its own topic, ``topic`` only fills a slot."""
        context = ssl.create_default_context(
            cafile=str(self._ca_file) if self._ca_file is not None else None
        )
        context.set_alpn_protocols(["h2"])
        common: dict[str, Any] = {
            "topic": topic,
            "max_connections": self._max_connections,
            "max_connection_attempts": 1,
            "ssl_context": context,
            "err_func": _leave_logging_to_the_provider,
        }
        if isinstance(self._credentials, ApnsTokenKey):
            return APNs(
                key=self._signing_key,
                key_id=self._credentials.key_id,
                team_id=self._credentials.team_id,
                **common,
            )
        return APNs(client_cert=str(self._credentials.cert_file), **common)


def _outcome(result: NotificationResult, retry_after: str | None) -> Outcome:
    status = result.status
    reason = result.description or f"HTTP {status}"
    if status == "200":
        return Delivered(result.notification_id)
    if status == "410" or (status == "400" and reason in TOKEN_REASONS):
        return TokenInvalid(reason)
    if status == "429" or status.startswith("5"):
        return RetryAfter(reason, retry_after_seconds(retry_after))
    return Failed(f"{status} {reason}")
