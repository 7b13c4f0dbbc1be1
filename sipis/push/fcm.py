"""FCM: pushes to Android apps as data messages, through firebase-admin's async API.

One ``FcmProvider`` per service account (its JSON file names the project).
Each provider has its own named firebase App, so several coexist in one
process; ``close()`` deletes it.

What each push becomes: a data message only (no ``notification``: the app
decides what to show), its ``data`` the push payload (string values as they
are, anything else as JSON text), addressed to the registration token:

    kind       android.priority   android.ttl
    CALL       high               call_ttl (default 30 s: a call rings about that long)
    MESSAGE    high               Push.ttl
    others     normal             Push.ttl

and ``android.collapse_key`` = ``Push.collapse_id``.

The registration token goes in ``message.token``.  firebase-admin 7.7 marks
``Message(token=...)`` deprecated in favour of ``fid``, but a Firebase
installation ID is another identifier that only apps opted in to FID
registration hand out; the token an app registers with sipis is a
registration token, which FCM still takes in ``token``.  The SDK's
DeprecationWarning for exactly that argument is silenced where the message
is made, so nothing is emitted.

How firebase-admin is driven: ``messaging.send_each_async([message])``
encodes and checks the message, posts it, and turns FCM's error body into
typed errors.  The HTTP client its messaging service posts through is
replaced by ``_FcmHttp`` because firebase-admin's own cannot be given a CA
other than through the process-wide ``SSL_CERT_FILE``, refreshes the OAuth
token with a blocking ``requests`` call inside the event loop, retries 500
and 503 by itself for seconds, and is closed with ``asyncio.run()`` (which
fails inside a running loop).  ``_FcmHttp`` trusts the configured CA, sends
to the configured base URL, refreshes the token (at the service account's
``token_uri``, or the one configured) in a worker thread, caches it until
shortly before it expires, and makes one attempt per push: retrying is the
sender's job.  Its connections close themselves when a push's timeout
cancels their TLS handshake (``_ClosingTlsStream``).

Outcomes: success is ``Delivered(<message name>)``; UNREGISTERED is
``TokenInvalid``; 429 (QUOTA_EXCEEDED), 5xx (UNAVAILABLE, INTERNAL), 401
(the access token was refused: the next push fetches a new one), timeouts
and network failures are ``RetryAfter`` (with Retry-After's seconds if
sent); everything else (INVALID_ARGUMENT, SENDER_ID_MISMATCH, a token
endpoint refusing the service account) is ``Failed``.  Tokens appear in logs
only masked; keys, access tokens and payloads never.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import uuid
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import firebase_admin  # type: ignore[import-untyped]
import httpcore
import httpx
import requests
from firebase_admin import credentials, exceptions, messaging
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import Credentials, TokenState
from google.auth.transport import Request as AuthRequest
from google.auth.transport import Response as AuthResponse
from google.auth.transport.requests import Request as RequestsAuthRequest

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

FCM_ORIGIN = "https://fcm.googleapis.com"
DEFAULT_TIMEOUT = 5.0
DEFAULT_CALL_TTL = 30.0
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"


def message_for(push: Push, call_ttl: float = DEFAULT_CALL_TTL) -> messaging.Message:
    """The FCM data message for ``push``."""
    data = {
        key: value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        for key, value in push.payload.items()
    }
    android = messaging.AndroidConfig(
        collapse_key=push.collapse_id,
        priority="high" if push.urgent else "normal",
        ttl=call_ttl if push.kind is Kind.CALL else push.ttl,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"Message\.token is deprecated", category=DeprecationWarning
        )
        return messaging.Message(data=data, android=android, token=push.token)


class _TokenEndpointRequest(AuthRequest):
    """google-auth's requests transport with a bounded timeout and the CA to trust.

    The CA goes with each request, not on the session: requests lets
    ``REQUESTS_CA_BUNDLE`` from the environment override a session's own.
    """

    def __init__(self, session: requests.Session, timeout: float, verify: str | bool) -> None:
        self._request = RequestsAuthRequest(session)
        self._timeout = timeout
        self._verify = verify

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: Any = None,
        headers: Any = None,
        timeout: Any = None,
        **kwargs: Any,
    ) -> AuthResponse:
        response: AuthResponse = self._request(
            url,
            method=method,
            body=body,
            headers=headers,
            timeout=self._timeout,
            verify=self._verify,
            **kwargs,
        )
        return response


class _ClosingTlsBackend(httpcore.AsyncNetworkBackend):
    """httpcore's AnyIO network backend, whose connections are ``_ClosingTlsStream``s."""

    def __init__(self) -> None:
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._backend.connect_tcp(host, port, timeout, local_address, socket_options)
        return _ClosingTlsStream(stream)

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class _ClosingTlsStream(httpcore.AsyncNetworkStream):
    """A TCP connection that is closed when its TLS handshake is cancelled.

    A push that runs out of time cancels its request wherever it is.
    httpcore 1.0 closes the TCP connection of a TLS handshake that fails,
    but not of one that is cancelled: its socket stays open until the
    garbage collector finds it, one socket per timed-out push for as long
    as FCM (or a middlebox) accepts connections and never completes the
    handshake.
    """

    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._stream.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._stream.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            return await self._stream.start_tls(ssl_context, server_hostname, timeout)
        except asyncio.CancelledError:
            await self._stream.aclose()
            raise

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


def _close_cancelled_handshakes(client: httpx.AsyncClient) -> None:
    """Make the connection pools of ``client`` (the direct one, and that of any proxy
    named in the environment) connect through ``_ClosingTlsBackend``: httpx has no
    setting for a network backend."""
    for transport in (client._transport, *client._mounts.values()):
        if isinstance(transport, httpx.AsyncHTTPTransport):
            transport._pool._network_backend = _ClosingTlsBackend()


class _FcmHttp:
    """The HTTP client firebase-admin's messaging service posts through (its
    ``HttpxAsyncClient``'s part: ``request`` and ``aclose``), made by sipis."""

    def __init__(
        self,
        google_credentials: Credentials,
        *,
        send_url_base: str | None,
        ca_file: Path | None,
        timeout: float,
    ) -> None:
        self._credentials = google_credentials
        self._send_url_base = send_url_base.rstrip("/") if send_url_base else None
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else True
        )
        self._client = httpx.AsyncClient(http2=True, verify=verify, timeout=timeout)
        _close_cancelled_handshakes(self._client)
        self._session = requests.Session()
        self._token_request = _TokenEndpointRequest(
            self._session, timeout, str(ca_file) if ca_file is not None else True
        )
        self._refreshing = asyncio.Lock()
        self._token_refused = False
        self._closed = False

    async def ensure_token(self) -> None:
        """Fetch an access token unless the cached one is fresh (refresh off the event loop)."""
        async with self._refreshing:
            if self._token_refused or self._credentials.token_state is not TokenState.FRESH:
                await asyncio.to_thread(self._credentials.refresh, self._token_request)
                self._token_refused = False

    def forget_token(self) -> None:
        """FCM refused the access token: fetch a new one before the next push."""
        self._token_refused = True

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", None) or {})
        headers["Authorization"] = f"Bearer {self._credentials.token}"
        if self._send_url_base is not None and url.startswith(FCM_ORIGIN):
            url = self._send_url_base + url[len(FCM_ORIGIN) :]
        response = await self._client.request(method, url, headers=headers, **kwargs)
        return response.raise_for_status()

    async def aclose(self) -> None:
        """Close once; firebase-admin calls this again from ``delete_app``, in another loop."""
        if not self._closed:
            self._closed = True
            await self._client.aclose()
            self._session.close()


class FcmProvider:
    """The ``Provider`` for Android: ``await provider.send(push)`` -> ``Outcome``.

    ``service_account_file``: the service account's JSON key file (its
    ``project_id`` is the FCM project).  ``send_url_base`` replaces
    ``https://fcm.googleapis.com``; ``token_uri`` replaces the file's
    ``token_uri``; ``ca_file``: the CAs to trust instead of the default ones
    (a local server).  ``timeout``: seconds one push may take, token
    refresh included; ``call_ttl``: how long FCM may hold a call push.
    """

    name = "fcm"

    def __init__(
        self,
        service_account_file: Path,
        *,
        send_url_base: str | None = None,
        token_uri: str | None = None,
        ca_file: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        call_ttl: float = DEFAULT_CALL_TTL,
    ) -> None:
        account = json.loads(service_account_file.read_text())
        if not account.get("project_id"):
            raise ValueError("the service account file names no project_id")
        if token_uri is not None:
            account["token_uri"] = token_uri
        certificate = credentials.Certificate(account)
        self.app_name = f"sipis-fcm-{uuid.uuid4().hex}"
        self._app = firebase_admin.initialize_app(
            certificate,
            options={"projectId": account["project_id"], "httpTimeout": timeout},
            name=self.app_name,
        )
        self._http = _FcmHttp(
            certificate.get_credential(),
            send_url_base=send_url_base,
            ca_file=ca_file,
            timeout=timeout,
        )
        self._installed = False
        self._closed = False
        self._timeout = timeout
        self._call_ttl = call_ttl

    def credential_expiry(self) -> float | None:
        """None: a service-account key carries no expiry of its own."""
        return None

    async def send(self, push: Push) -> Outcome:
        try:
            async with asyncio.timeout(self._timeout):
                await self._install()
                await self._http.ensure_token()
                message = message_for(push, self._call_ttl)
                batch = await messaging.send_each_async([message], app=self._app)
        except ValueError as error:
            outcome: Outcome = Failed(f"invalid message: {error}")
        except TimeoutError:
            outcome = RetryAfter(f"no answer within {self._timeout:g} s")
        except auth_exceptions.RefreshError as error:
            outcome = (
                RetryAfter("token endpoint unavailable")
                if error.retryable
                else Failed(f"token endpoint refused the service account ({_oauth_error(error)})")
            )
        except auth_exceptions.TransportError:
            outcome = RetryAfter("token endpoint unreachable")
        except exceptions.FirebaseError as error:
            outcome = self._refusal(error)
        else:
            response = batch.responses[0]
            if response.success:
                outcome = Delivered(response.message_id)
            else:
                outcome = self._refusal(response.exception)
        return self._logged(push, outcome)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._http.aclose()
            await asyncio.to_thread(firebase_admin.delete_app, self._app)

    async def _install(self) -> None:
        """Make the messaging service post through ``_FcmHttp`` (see the module docstring)."""
        if self._installed:
            return
        service = messaging._get_messaging_service(self._app)
        replaced = service._async_client
        service._async_client = self._http
        self._installed = True
        await replaced.aclose()

    def _refusal(self, error: exceptions.FirebaseError) -> Outcome:
        response = error.http_response
        if isinstance(error, messaging.UnregisteredError):
            return TokenInvalid("UNREGISTERED")
        if not isinstance(response, httpx.Response):
            return RetryAfter(f"no answer ({error.code})")
        reason = _fcm_error_code(response) or error.code
        status = response.status_code
        if status == 401:
            self._http.forget_token()
            return RetryAfter(reason)
        if status == 429 or status >= 500:
            return RetryAfter(reason, retry_after_seconds(response.headers.get("Retry-After")))
        return Failed(f"{status} {reason}")

    def _logged(self, push: Push, outcome: Outcome) -> Outcome:
        log.debug(
            "fcm %s push for instance %s to %s: %s",
            push.kind.value,
            push.instance_id,
            masked(push.token),
            outcome,
        )
        return outcome


def _fcm_error_code(response: httpx.Response) -> str | None:
    """The ``errorCode`` of FCM's error body (``error.details[]``), else its ``error.status``."""
    try:
        error = response.json().get("error", {})
        details = error.get("details", [])
        codes = [d.get("errorCode") for d in details if d.get("@type") == FCM_ERROR_TYPE]
        code = codes[0] if codes else error.get("status")
    except (ValueError, AttributeError):
        return None
    return code if isinstance(code, str) else None


def _oauth_error(error: auth_exceptions.RefreshError) -> str:
    """The OAuth error code at the head of google-auth's message (e.g. invalid_grant)."""
    text = str(error.args[0]) if error.args else ""
    return text.split(":", 1)[0].strip() or "unknown"
