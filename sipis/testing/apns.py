"""A local APNs: Apple's HTTP/2 provider API on loopback, for tests and staging.

It speaks what api.push.apple.com speaks: HTTP/2 over TLS (ALPN "h2"), one
``POST /3/device/<hex device token>`` per push with ``apns-*`` headers and
a JSON body, answered ``200`` with an ``apns-id`` header, or an error status
with ``{"reason": "<Reason>"}`` (410 adds ``"timestamp"``, milliseconds since
the epoch).  What it checks, in order, and the reason it answers:

- method POST (405 MethodNotAllowed); path ``/3/device/<token>`` (404
  BadPath; 400 MissingDeviceToken when the token is empty); no ``apns-*``
  header twice (400 DuplicateHeaders); ``apns-id``, if sent, a UUID (400
  BadMessageId);
- credentials (403): a client certificate the server's TLS context verified
  (certificate auth), or else ``authorization: bearer <JWT>`` (token auth):
  ES256, header ``kid`` naming a configured signing key, signed by it,
  claims ``iss`` = that key's team id and ``iat`` neither in the future
  (InvalidProviderToken) nor older than an hour (ExpiredProviderToken);
  none of both is MissingProviderToken;
- ``apns-topic``: present (400 MissingTopic), a configured bundle id or one
  with an Apple suffix such as ``.voip`` (400 TopicDisallowed), and the
  right one for the push type: ``<bundle>.voip`` for voip, the bare bundle
  id for alert and background (400 BadTopic);
- ``apns-push-type`` present and known (400 InvalidPushType);
  ``apns-priority`` 1, 5 or 10, and 5 for background pushes (400
  BadPriority); ``apns-expiration`` a number of seconds since the epoch or
  0 (400 BadExpirationDate); ``apns-collapse-id`` at most 64 bytes (400
  BadCollapseId);
- the device token: hex, 32 to 100 bytes (400 BadDeviceToken), and not one
  the test rejected (``reject_token``);
- the body: not empty and a JSON object (400 PayloadEmpty), at most 4096
  bytes, 5120 for voip pushes (413 PayloadTooLarge).

Tests inject what the real service does when it is unhappy: a rejected
token (410 Unregistered, 400 BadDeviceToken, ...), the next N requests
refused (429, 500, 503, with or without ``retry-after``, which Apple itself
does not send), slow answers, and connections reset mid-request.  Every
request is recorded, whatever the answer.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import ssl
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import ProtocolError

from sipis.testing import Arrivals

# Apple's reasons and the status each comes with.
REASON_STATUS: dict[str, int] = {
    "BadCollapseId": 400,
    "BadDeviceToken": 400,
    "BadExpirationDate": 400,
    "BadMessageId": 400,
    "BadPriority": 400,
    "BadTopic": 400,
    "DeviceTokenNotForTopic": 400,
    "DuplicateHeaders": 400,
    "IdleTimeout": 400,
    "InvalidPushType": 400,
    "MissingDeviceToken": 400,
    "MissingTopic": 400,
    "PayloadEmpty": 400,
    "TopicDisallowed": 400,
    "BadCertificate": 403,
    "BadCertificateEnvironment": 403,
    "ExpiredProviderToken": 403,
    "Forbidden": 403,
    "InvalidProviderToken": 403,
    "MissingProviderToken": 403,
    "BadPath": 404,
    "MethodNotAllowed": 405,
    "ExpiredToken": 410,
    "Unregistered": 410,
    "PayloadTooLarge": 413,
    "TooManyProviderTokenUpdates": 429,
    "TooManyRequests": 429,
    "InternalServerError": 500,
    "ServiceUnavailable": 503,
    "Shutdown": 503,
}

PUSH_TYPES = frozenset(
    {
        "alert",
        "background",
        "complication",
        "controls",
        "fileprovider",
        "liveactivity",
        "location",
        "mdm",
        "pushtotalk",
        "voip",
        "widgets",
    }
)
# Topic suffixes Apple appends to a bundle id for the push types that need one.
TOPIC_SUFFIXES = (
    "",
    ".voip",
    ".complication",
    ".pushkit.fileprovider",
    ".location-query",
    ".push-type.liveactivity",
    ".voip-ptt",
    ".push-type.widgets",
    ".push-type.controls",
)
PRIORITIES = frozenset({"1", "5", "10"})
MAX_PAYLOAD = 4096
MAX_VOIP_PAYLOAD = 5120
MAX_COLLAPSE_ID = 64
PROVIDER_TOKEN_LIFETIME = 3600.0
CLOCK_SKEW = 1.0

_PATH_PREFIX = "/3/device/"
_DEVICE_TOKEN = re.compile(r"(?:[0-9a-fA-F]{2}){32,100}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@dataclass(frozen=True)
class ApnsSigningKey:
    """A token-auth key as Apple issues it: a P-256 key in a .p8 file, its key id, the team id."""

    key_id: str
    team_id: str
    private_key_pem: str = field(repr=False)

    @classmethod
    def generate(cls, key_id: str | None = None, team_id: str | None = None) -> ApnsSigningKey:
        """A fresh key; ids are 10 characters like Apple's when not given."""
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return cls(
            key_id=key_id or secrets.token_hex(5).upper(),
            team_id=team_id or secrets.token_hex(5).upper(),
            private_key_pem=pem,
        )

    def write_p8(self, path: Path) -> Path:
        """Write the key as Apple's AuthKey_<key id>.p8 download looks (PKCS#8 PEM)."""
        path.write_text(self.private_key_pem)
        path.chmod(0o600)
        return path

    def public_key(self) -> ec.EllipticCurvePublicKey:
        key = serialization.load_pem_private_key(self.private_key_pem.encode(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError("an APNs signing key is an EC key")
        return key.public_key()


@dataclass(frozen=True)
class ReceivedPush:
    """One request as the server saw it, and what it answered.

    ``headers`` holds every header by lower-case name (pseudo-headers such
    as ``:path`` included); ``payload`` is the decoded JSON body, or None if
    it was not JSON; ``status`` is None for a request answered by resetting
    the connection; ``auth`` is "certificate", "token" or None.
    """

    token: str = field(repr=False)
    headers: dict[str, str] = field(repr=False)
    payload: Any = field(repr=False)
    body_size: int
    arrived: float
    apns_id: str
    status: int | None
    reason: str | None
    auth: str | None


@dataclass(frozen=True)
class _Answer:
    status: int
    apns_id: str
    reason: str | None = None
    retry_after: str | None = None
    timestamp: int | None = None


@dataclass
class _Fault:
    reason: str
    retry_after: float | None


class _Refusal(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Stream:
    headers: list[tuple[str, str]]
    body: bytearray = field(default_factory=bytearray)


class LocalApns:
    """A local APNs server: ``async with LocalApns(context, signing_keys=[key]) as apns:``.

    ``ssl_context`` is the server's TLS context (see
    ``sipis.testing.tls_server_context``); it decides whether clients may
    authenticate with a certificate.  ``signing_keys`` enable token auth.
    ``bundle_ids`` are the apps whose topics are accepted.
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        *,
        signing_keys: tuple[ApnsSigningKey, ...] | list[ApnsSigningKey] = (),
        bundle_ids: tuple[str, ...] | list[str] = ("com.example.phone",),
        host: str = "127.0.0.1",
    ) -> None:
        ssl_context.set_alpn_protocols(["h2"])
        self._ssl_context = ssl_context
        self._keys = {key.key_id: (key.team_id, key.public_key()) for key in signing_keys}
        self._bundles = frozenset(bundle_ids)
        self._topics = {bundle + suffix for bundle in bundle_ids for suffix in TOPIC_SUFFIXES}
        self.host = host
        self.port = 0
        self.pushes: Arrivals[ReceivedPush] = Arrivals()
        self.connections_made = 0
        self.delay = 0.0
        self._rejected: dict[str, str] = {}
        self._faults: deque[_Fault] = deque()
        self._resets = 0
        self._server: asyncio.Server | None = None
        self._connections: set[_ServerConnection] = set()
        self._late_answers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> LocalApns:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ServerConnection(self), self.host, 0, ssl=self._ssl_context
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self._late_answers:
            task.cancel()
        await asyncio.gather(*self._late_answers, return_exceptions=True)
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.abort()
        if self._server is not None:
            await self._server.wait_closed()

    # -- what a test injects -------------------------------------------------

    def reject_token(self, token: str, reason: str = "Unregistered") -> None:
        """Answer every push to ``token`` with ``reason`` (Unregistered, BadDeviceToken, ...)."""
        if reason not in REASON_STATUS:
            raise ValueError(f"not an APNs reason: {reason}")
        self._rejected[token] = reason

    def fail_next(
        self, count: int = 1, reason: str = "TooManyRequests", retry_after: float | None = None
    ) -> None:
        """Answer the next ``count`` requests with ``reason`` (and ``retry-after``, if given)."""
        if reason not in REASON_STATUS:
            raise ValueError(f"not an APNs reason: {reason}")
        self._faults.extend(_Fault(reason, retry_after) for _ in range(count))

    def reset_next(self, count: int = 1) -> None:
        """Answer the next ``count`` requests by dropping their connection (no TLS close)."""
        self._resets += count

    # -- serving -------------------------------------------------------------

    def _received(self, connection: _ServerConnection, stream_id: int, stream: _Stream) -> None:
        headers: dict[str, str] = {}
        for name, value in stream.headers:
            headers.setdefault(name, value)
        path = headers.get(":path", "")
        token = path[len(_PATH_PREFIX) :] if path.startswith(_PATH_PREFIX) else ""
        apns_id = headers.get("apns-id") or str(uuid.uuid4())
        payload = _json_or_none(bytes(stream.body))
        answer = self._judge(connection, stream, headers, token, apns_id, payload)
        self.pushes.append(
            ReceivedPush(
                token=token,
                headers=headers,
                payload=payload,
                body_size=len(stream.body),
                arrived=time.time(),
                apns_id=apns_id,
                status=answer.status if answer else None,
                reason=answer.reason if answer else None,
                auth=connection.auth_method(headers),
            )
        )
        if answer is None:
            connection.abort()
        elif self.delay > 0:
            task = asyncio.create_task(self._answer_later(connection, stream_id, answer))
            self._late_answers.add(task)
            task.add_done_callback(self._late_answers.discard)
        else:
            connection.answer(stream_id, answer)

    async def _answer_later(
        self, connection: _ServerConnection, stream_id: int, answer: _Answer
    ) -> None:
        await asyncio.sleep(self.delay)
        connection.answer(stream_id, answer)

    def _judge(
        self,
        connection: _ServerConnection,
        stream: _Stream,
        headers: dict[str, str],
        token: str,
        apns_id: str,
        payload: Any,
    ) -> _Answer | None:
        if self._resets:
            self._resets -= 1
            return None
        if self._faults:
            fault = self._faults.popleft()
            retry_after = None if fault.retry_after is None else f"{fault.retry_after:g}"
            return _Answer(REASON_STATUS[fault.reason], apns_id, fault.reason, retry_after)
        try:
            self._check(connection, stream, headers, token, payload)
        except _Refusal as refusal:
            status = REASON_STATUS[refusal.reason]
            timestamp = int(time.time() * 1000) if status == 410 else None
            return _Answer(status, apns_id, refusal.reason, timestamp=timestamp)
        return _Answer(200, apns_id)

    def _check(
        self,
        connection: _ServerConnection,
        stream: _Stream,
        headers: dict[str, str],
        token: str,
        payload: Any,
    ) -> None:
        if headers.get(":method") != "POST":
            raise _Refusal("MethodNotAllowed")
        if not headers.get(":path", "").startswith(_PATH_PREFIX):
            raise _Refusal("BadPath")
        if not token:
            raise _Refusal("MissingDeviceToken")
        names = [name for name, _ in stream.headers if name.startswith("apns-")]
        if len(names) != len(set(names)):
            raise _Refusal("DuplicateHeaders")
        if "apns-id" in headers and not _UUID.fullmatch(headers["apns-id"]):
            raise _Refusal("BadMessageId")
        if not connection.has_client_certificate:
            self._check_provider_token(headers.get("authorization"))
        push_type = self._check_topic_and_type(headers)
        self._check_delivery_options(headers, push_type)
        if not _DEVICE_TOKEN.fullmatch(token):
            raise _Refusal("BadDeviceToken")
        if token in self._rejected:
            raise _Refusal(self._rejected[token])
        if not isinstance(payload, dict) or not payload:
            raise _Refusal("PayloadEmpty")
        limit = MAX_VOIP_PAYLOAD if push_type == "voip" else MAX_PAYLOAD
        if len(stream.body) > limit:
            raise _Refusal("PayloadTooLarge")

    def _check_provider_token(self, authorization: str | None) -> None:
        if not authorization:
            raise _Refusal("MissingProviderToken")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise _Refusal("InvalidProviderToken")
        try:
            header = jwt.get_unverified_header(token)
            team_id, public_key = self._keys[header.get("kid", "")]
            claims = jwt.decode(
                token, public_key, algorithms=["ES256"], options={"verify_iat": False}
            )
        except (jwt.InvalidTokenError, KeyError):
            raise _Refusal("InvalidProviderToken") from None
        issued = claims.get("iat")
        if claims.get("iss") != team_id or not isinstance(issued, int | float):
            raise _Refusal("InvalidProviderToken")
        now = time.time()
        if issued > now + CLOCK_SKEW:
            raise _Refusal("InvalidProviderToken")
        if now - issued > PROVIDER_TOKEN_LIFETIME:
            raise _Refusal("ExpiredProviderToken")

    def _check_topic_and_type(self, headers: dict[str, str]) -> str:
        topic = headers.get("apns-topic")
        if not topic:
            raise _Refusal("MissingTopic")
        if topic not in self._topics:
            raise _Refusal("TopicDisallowed")
        push_type = headers.get("apns-push-type", "")
        if push_type not in PUSH_TYPES:
            raise _Refusal("InvalidPushType")
        if push_type == "voip":
            right_topic = topic.endswith(".voip") and topic[: -len(".voip")] in self._bundles
        elif push_type in ("alert", "background"):
            right_topic = topic in self._bundles
        else:
            right_topic = True
        if not right_topic:
            raise _Refusal("BadTopic")
        return push_type

    def _check_delivery_options(self, headers: dict[str, str], push_type: str) -> None:
        priority = headers.get("apns-priority", "10")
        if priority not in PRIORITIES or (push_type == "background" and priority != "5"):
            raise _Refusal("BadPriority")
        expiration = headers.get("apns-expiration", "0")
        if not expiration.isdigit():
            raise _Refusal("BadExpirationDate")
        if len(headers.get("apns-collapse-id", "").encode()) > MAX_COLLAPSE_ID:
            raise _Refusal("BadCollapseId")

    def _connected(self, connection: _ServerConnection) -> None:
        self.connections_made += 1
        self._connections.add(connection)

    def _disconnected(self, connection: _ServerConnection) -> None:
        self._connections.discard(connection)


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


class _ServerConnection(asyncio.Protocol):
    """One client connection: HTTP/2 framing by h2, requests judged by the server."""

    def __init__(self, server: LocalApns) -> None:
        self._server = server
        self._h2 = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self._streams: dict[int, _Stream] = {}
        self._transport: asyncio.Transport | None = None
        self.has_client_certificate = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's is not an asyncio.Transport subclass)
        self._transport = transport = cast(asyncio.Transport, transport)
        self.has_client_certificate = bool(transport.get_extra_info("peercert"))
        self._server._connected(self)
        self._h2.initiate_connection()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._server._disconnected(self)

    def auth_method(self, headers: dict[str, str]) -> str | None:
        if self.has_client_certificate:
            return "certificate"
        return "token" if "authorization" in headers else None

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except ProtocolError:
            self._flush()
            self.abort()
            return
        for event in events:
            if isinstance(event, RequestReceived) and event.stream_id is not None:
                headers = [(str(name), str(value)) for name, value in event.headers or []]
                self._streams[event.stream_id] = _Stream(headers)
            elif isinstance(event, DataReceived) and event.stream_id is not None:
                stream = self._streams.get(event.stream_id)
                if stream is not None and event.data is not None:
                    stream.body += event.data
                self._h2.acknowledge_received_data(
                    event.flow_controlled_length or 0, event.stream_id
                )
            elif isinstance(event, StreamEnded) and event.stream_id is not None:
                ended = self._streams.pop(event.stream_id, None)
                if ended is not None:
                    self._server._received(self, event.stream_id, ended)
            elif isinstance(event, StreamReset) and event.stream_id is not None:
                self._streams.pop(event.stream_id, None)
            elif isinstance(event, ConnectionTerminated):
                self._flush()
                if self._transport is not None:
                    self._transport.close()
                return
        self._flush()

    def answer(self, stream_id: int, answer: _Answer) -> None:
        if self._transport is None:
            return
        headers = [(":status", str(answer.status)), ("apns-id", answer.apns_id)]
        if answer.retry_after is not None:
            headers.append(("retry-after", answer.retry_after))
        try:
            if answer.reason is None:
                self._h2.send_headers(stream_id, headers, end_stream=True)
            else:
                body: dict[str, Any] = {"reason": answer.reason}
                if answer.timestamp is not None:
                    body["timestamp"] = answer.timestamp
                headers.append(("content-type", "application/json; charset=utf-8"))
                self._h2.send_headers(stream_id, headers)
                self._h2.send_data(stream_id, json.dumps(body).encode(), end_stream=True)
        except ProtocolError:
            return  # the client gave up on this stream meanwhile
        self._flush()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _flush(self) -> None:
        outgoing = self._h2.data_to_send()
        if outgoing and self._transport is not None:
            self._transport.write(outgoing)
