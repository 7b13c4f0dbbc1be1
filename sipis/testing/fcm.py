"""A local FCM: the HTTP v1 send API and Google's OAuth token endpoint, over HTTPS on loopback.

``POST /token`` takes the JWT-bearer grant a service account makes
(RFC 7523: ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`` and
``assertion=<JWT>``).  The JWT must be RS256, signed by the key of a service
account this server issued (``service_account_file``; header ``kid`` = its
``private_key_id``), with ``iss`` = its ``client_email``, ``aud`` = this
token URI or Google's (google-auth always writes Google's), a scope list
that includes firebase.messaging (or the cloud-platform scope that covers
it), and ``iat``/``exp`` in force.  The
answer is ``{"access_token", "expires_in", "token_type": "Bearer"}``;
refusals are 400 with ``{"error": "invalid_grant" | "invalid_scope" |
"unsupported_grant_type", "error_description"}``.

``POST /v1/projects/<project>/messages:send`` needs ``Authorization: Bearer
<access token>`` issued here for that project (401 UNAUTHENTICATED, 403
PERMISSION_DENIED) and checks the message as FCM does (400
INVALID_ARGUMENT): only known fields, exactly one target (``token``,
``fid``, ``topic`` or ``condition``), ``data`` a map of strings to strings
without reserved keys, at most 4096 bytes, ``android.priority`` high or
normal, ``android.ttl`` a duration such as ``"30s"``.  It answers ``{"name":
"projects/<project>/messages/<id>"}``, or FCM's error body::

    {"error": {"code": 404, "message": "...", "status": "NOT_FOUND",
               "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                            "errorCode": "UNREGISTERED"}]}}

Tests inject rejected tokens, the next N requests refused (QUOTA_EXCEEDED
with or without Retry-After, UNAVAILABLE, INTERNAL, ...), slow answers and
connections reset mid-request.  Every token request and message is recorded.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sipis.testing import Arrivals

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# google-auth puts Google's token endpoint in ``aud`` whatever the file's token_uri says.
GOOGLE_OAUTH_AUDIENCE = "https://oauth2.googleapis.com/token"
MESSAGING_SCOPES = frozenset(
    {
        "https://www.googleapis.com/auth/firebase.messaging",
        "https://www.googleapis.com/auth/cloud-platform",
    }
)
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
# FCM's error codes with the HTTP status and canonical status they come with.
FCM_ERRORS: dict[str, tuple[int, str, str]] = {
    "INVALID_ARGUMENT": (400, "INVALID_ARGUMENT", "Request contains an invalid argument."),
    "THIRD_PARTY_AUTH_ERROR": (401, "UNAUTHENTICATED", "Auth error from APNS or Web Push."),
    "SENDER_ID_MISMATCH": (403, "PERMISSION_DENIED", "SenderId mismatch"),
    "UNREGISTERED": (404, "NOT_FOUND", "Requested entity was not found."),
    "QUOTA_EXCEEDED": (429, "RESOURCE_EXHAUSTED", "Quota exceeded for sending messages."),
    "INTERNAL": (500, "INTERNAL", "Internal error encountered."),
    "UNAVAILABLE": (503, "UNAVAILABLE", "The service is currently unavailable."),
}
MESSAGE_FIELDS = frozenset(
    {
        "name",
        "data",
        "notification",
        "android",
        "webpush",
        "apns",
        "fcm_options",
        "token",
        "fid",
        "topic",
        "condition",
    }
)
TARGET_FIELDS = ("token", "fid", "topic", "condition")
ANDROID_FIELDS = frozenset(
    {
        "collapse_key",
        "priority",
        "ttl",
        "restricted_package_name",
        "data",
        "notification",
        "fcm_options",
        "direct_boot_ok",
        "bandwidth_constrained_ok",
        "restricted_satellite_ok",
    }
)
MAX_DATA_BYTES = 4096
RESERVED_DATA_KEYS = frozenset({"from", "notification", "message_type"})
RESERVED_DATA_PREFIXES = ("google.", "gcm.")

_DURATION = re.compile(r"\d+(\.\d{1,9})?s")


@dataclass(frozen=True)
class ReceivedMessage:
    """One send request as the server saw it, and what it answered.

    ``message`` is the request's ``message`` object (None if the body was
    not JSON); ``status`` is None for a request answered by resetting the
    connection; ``error`` is the FCM error code of a refusal.
    """

    project: str
    message: Any = field(repr=False)
    headers: dict[str, str] = field(repr=False)
    arrived: float
    status: int | None
    error: str | None

    @property
    def target(self) -> str | None:
        """The token or FID the message was addressed to."""
        if not isinstance(self.message, dict):
            return None
        target = self.message.get("token") or self.message.get("fid")
        return target if isinstance(target, str) else None


@dataclass(frozen=True)
class TokenRequest:
    """One request to the token endpoint: who asked, for what, and the answer's status."""

    client_email: str | None
    scopes: tuple[str, ...]
    arrived: float
    status: int


@dataclass(frozen=True)
class _Account:
    client_email: str
    project_id: str
    public_key: rsa.RSAPublicKey


@dataclass(frozen=True)
class _AccessToken:
    project_id: str
    expires: float


@dataclass
class _Fault:
    error: str
    retry_after: float | None


class _Refusal(Exception):
    def __init__(self, error: str, detail: str | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.detail = detail


class LocalFcm:
    """A local FCM server: ``async with LocalFcm(context) as fcm:``.

    ``ssl_context`` is the server's TLS context (see
    ``sipis.testing.tls_server_context``).  ``service_account_file`` makes
    the credentials a client uses; access tokens live ``token_lifetime`` s.
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        *,
        host: str = "127.0.0.1",
        token_lifetime: int = 3600,
    ) -> None:
        self._ssl_context = ssl_context
        self.host = host
        self.port = 0
        self.token_lifetime = token_lifetime
        self.messages: Arrivals[ReceivedMessage] = Arrivals()
        self.token_requests: Arrivals[TokenRequest] = Arrivals()
        self.delay = 0.0
        self._accounts: dict[str, _Account] = {}
        self._access_tokens: dict[str, _AccessToken] = {}
        self._rejected: dict[str, str] = {}
        self._faults: deque[_Fault] = deque()
        self._resets = 0
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    @property
    def token_uri(self) -> str:
        return f"{self.base_url}/token"

    async def __aenter__(self) -> LocalFcm:
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_post("/v1/projects/{project}/messages:send", self._send)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0, ssl_context=self._ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def service_account_file(
        self, path: Path, *, project_id: str = "sipis-test", client_email: str | None = None
    ) -> Path:
        """Write a service-account JSON file (new RSA key) that this server accepts."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_id = secrets.token_hex(20)
        email = client_email or f"sipis-{secrets.token_hex(4)}@{project_id}.iam.gserviceaccount.com"
        self._accounts[key_id] = _Account(email, project_id, key.public_key())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        account = {
            "type": "service_account",
            "project_id": project_id,
            "private_key_id": key_id,
            "private_key": pem,
            "client_email": email,
            "client_id": str(secrets.randbelow(10**20)),
            "auth_uri": f"{self.base_url}/auth",
            "token_uri": self.token_uri,
            "universe_domain": "googleapis.com",
        }
        path.write_text(json.dumps(account, indent=2))
        path.chmod(0o600)
        return path

    # -- what a test injects -------------------------------------------------

    def reject_token(self, token: str, error: str = "UNREGISTERED") -> None:
        """Refuse every message to ``token`` with FCM error ``error``."""
        if error not in FCM_ERRORS:
            raise ValueError(f"not an FCM error code: {error}")
        self._rejected[token] = error

    def fail_next(
        self, count: int = 1, error: str = "QUOTA_EXCEEDED", retry_after: float | None = None
    ) -> None:
        """Refuse the next ``count`` messages with ``error`` (and Retry-After, if given)."""
        if error not in FCM_ERRORS:
            raise ValueError(f"not an FCM error code: {error}")
        self._faults.extend(_Fault(error, retry_after) for _ in range(count))

    def reset_next(self, count: int = 1) -> None:
        """Answer the next ``count`` messages by dropping their connection."""
        self._resets += count

    def revoke_access_tokens(self) -> None:
        """Forget every access token issued, as if they had expired early."""
        self._access_tokens.clear()

    # -- the token endpoint --------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        grant_type, assertion = form.get("grant_type"), form.get("assertion")
        record: dict[str, Any] = {"client_email": None, "scopes": ()}
        try:
            if grant_type != JWT_BEARER_GRANT:
                raise _Refusal("unsupported_grant_type", f"Invalid grant_type: {grant_type!r}")
            if not isinstance(assertion, str):
                raise _Refusal("invalid_request", "Missing required parameter: assertion")
            account, scopes = self._verify_assertion(assertion, record)
        except _Refusal as refusal:
            self._record_token_request(record, 400)
            body = {"error": refusal.error, "error_description": refusal.detail}
            return web.json_response(body, status=400)
        access_token = f"ya29.{secrets.token_urlsafe(32)}"
        self._access_tokens[access_token] = _AccessToken(
            account.project_id, time.time() + self.token_lifetime
        )
        self._record_token_request(record, 200)
        return web.json_response(
            {
                "access_token": access_token,
                "expires_in": self.token_lifetime,
                "token_type": "Bearer",
                "scope": " ".join(scopes),
            }
        )

    def _verify_assertion(
        self, assertion: str, record: dict[str, Any]
    ) -> tuple[_Account, tuple[str, ...]]:
        try:
            header = jwt.get_unverified_header(assertion)
            account = self._accounts[header.get("kid", "")]
            claims = jwt.decode(
                assertion,
                account.public_key,
                algorithms=["RS256"],
                audience=[self.token_uri, GOOGLE_OAUTH_AUDIENCE],
                options={"require": ["iss", "aud", "iat", "exp"]},
            )
        except KeyError:
            raise _Refusal("invalid_grant", "Invalid grant: account not found") from None
        except jwt.InvalidTokenError as error:
            raise _Refusal("invalid_grant", f"Invalid JWT: {type(error).__name__}") from None
        record["client_email"] = claims.get("iss")
        scopes = tuple(str(claims.get("scope", "")).split())
        record["scopes"] = scopes
        if claims["iss"] != account.client_email:
            raise _Refusal("invalid_grant", "Invalid JWT: iss is not the key's account")
        if not MESSAGING_SCOPES.intersection(scopes):
            raise _Refusal("invalid_scope", "No messaging scope requested")
        return account, scopes

    def _record_token_request(self, record: dict[str, Any], status: int) -> None:
        self.token_requests.append(
            TokenRequest(record["client_email"], record["scopes"], time.time(), status)
        )

    # -- the send API ----------------------------------------------------------

    async def _send(self, request: web.Request) -> web.StreamResponse:
        project = request.match_info["project"]
        raw = await request.read()
        body = _json_or_none(raw)
        message = body.get("message") if isinstance(body, dict) else None
        if self._resets:
            self._resets -= 1
            self._record(project, message, request, None, None)
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        status, error, payload, headers = self._judge(project, body, message, request)
        self._record(project, message, request, status, error)
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        return web.json_response(payload, status=status, headers=headers)

    def _judge(
        self, project: str, body: Any, message: Any, request: web.Request
    ) -> tuple[int, str | None, dict[str, Any], dict[str, str]]:
        if self._faults:
            fault = self._faults.popleft()
            headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
            return (*_fcm_error(fault.error), headers)
        unauthorized = self._check_access(project, request.headers.get("Authorization", ""))
        if unauthorized is not None:
            return unauthorized
        try:
            target = _check_message(body, message)
        except _Refusal as refusal:
            status, _, error_body = _fcm_error(refusal.error, refusal.detail)
            return status, refusal.error, error_body, {}
        if target in self._rejected:
            return (*_fcm_error(self._rejected[target]), {})
        name = f"projects/{project}/messages/0:{time.time_ns()}%{secrets.token_hex(8)}"
        return 200, None, {"name": name}, {}

    def _check_access(
        self, project: str, authorization: str
    ) -> tuple[int, str | None, dict[str, Any], dict[str, str]] | None:
        scheme, _, value = authorization.partition(" ")
        issued = self._access_tokens.get(value) if scheme.lower() == "bearer" else None
        if issued is None or issued.expires < time.time():
            body = _google_error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. "
                "Expected OAuth 2 access token, login cookie or other valid authentication "
                "credential.",
            )
            return (
                401,
                None,
                body,
                {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'},
            )
        if issued.project_id != project:
            body = _google_error(
                403,
                "PERMISSION_DENIED",
                "Permission 'cloudmessaging.messages.create' denied on resource",
            )
            return 403, None, body, {}
        return None

    def _record(
        self,
        project: str,
        message: Any,
        request: web.Request,
        status: int | None,
        error: str | None,
    ) -> None:
        self.messages.append(
            ReceivedMessage(
                project=project,
                message=message,
                headers=dict(request.headers),
                arrived=time.time(),
                status=status,
                error=error,
            )
        )


def _check_message(body: Any, message: Any) -> str:
    """The message's target, if FCM would accept the message; else a _Refusal."""
    if not isinstance(body, dict) or not isinstance(message, dict):
        raise _Refusal("INVALID_ARGUMENT", "Invalid JSON payload received.")
    unknown = set(body) - {"message", "validate_only"} | set(message) - MESSAGE_FIELDS
    if unknown:
        raise _Refusal("INVALID_ARGUMENT", f"Unknown name {sorted(unknown)[0]!r}")
    targets = [name for name in TARGET_FIELDS if name in message]
    if len(targets) != 1:
        raise _Refusal("INVALID_ARGUMENT", "Exactly one of token, fid, topic or condition")
    target = message[targets[0]]
    if not isinstance(target, str) or not target:
        raise _Refusal("INVALID_ARGUMENT", f"Invalid value at 'message.{targets[0]}'")
    _check_data(message.get("data", {}))
    _check_android(message.get("android", {}))
    return target


def _check_data(data: Any) -> None:
    if not isinstance(data, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in data.items()
    ):
        raise _Refusal("INVALID_ARGUMENT", "Invalid value at 'message.data': strings only")
    for key in data:
        if key in RESERVED_DATA_KEYS or key.startswith(RESERVED_DATA_PREFIXES):
            raise _Refusal("INVALID_ARGUMENT", f"Invalid data payload key: {key}")
    size = sum(len(key.encode()) + len(value.encode()) for key, value in data.items())
    if size > MAX_DATA_BYTES:
        raise _Refusal("INVALID_ARGUMENT", "Android message is too big")


def _check_android(android: Any) -> None:
    if not isinstance(android, dict) or set(android) - ANDROID_FIELDS:
        raise _Refusal("INVALID_ARGUMENT", "Invalid value at 'message.android'")
    if "priority" in android and str(android["priority"]).lower() not in ("high", "normal"):
        raise _Refusal("INVALID_ARGUMENT", "Invalid value at 'message.android.priority'")
    if "ttl" in android and not (
        isinstance(android["ttl"], str) and _DURATION.fullmatch(android["ttl"])
    ):
        raise _Refusal("INVALID_ARGUMENT", "Invalid value at 'message.android.ttl'")
    if "collapse_key" in android and not isinstance(android["collapse_key"], str):
        raise _Refusal("INVALID_ARGUMENT", "Invalid value at 'message.android.collapse_key'")
    _check_data(android.get("data", {}))


def _fcm_error(error: str, detail: str | None = None) -> tuple[int, str, dict[str, Any]]:
    status, canonical, text = FCM_ERRORS[error]
    body = _google_error(status, canonical, detail or text)
    body["error"]["details"] = [{"@type": FCM_ERROR_TYPE, "errorCode": error}]
    return status, error, body


def _google_error(code: int, status: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status}}


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None
