"""The HTTPS API (aiohttp): routes, authentication, rate limiting and JSON errors.

Every answer is JSON; every rejection is ``{"error": code, "detail": text}``
(plus ``field`` when one field is at fault) with a 4xx status.  A failure of
the store is a 503; an exception nobody foresaw is logged and answered 500,
which the API's fuzz test holds at zero.  No response, log line or error
ever carries a password, secret, token or payload key.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST as METRICS_TYPE
from pydantic import ValidationError

from sipis import __version__
from sipis.crypto import CryptoError, HpkeKeyring
from sipis.instances import (
    AccountSpec,
    InstanceChange,
    InstanceGone,
    Instances,
    InstanceSpec,
    KeepPassword,
    PushSpec,
)
from sipis.sip.uri import parse_sip_uri
from sipis.store import StoreError
from sipis.transport.policy import TargetPolicy

from .openapi import document
from .schemas import (
    AccountIn,
    InstanceIn,
    InstancePatch,
    PushIn,
    check_tokens,
    decode_base64,
    describe,
)

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class ApiSettings:
    admin_token: str | None = None
    max_body: int = 64 * 1024
    create_rate: float = 10.0
    create_burst: int = 20
    # addresses registrars and outbound proxies may not have
    servers: TargetPolicy = field(default_factory=TargetPolicy)


class Rejected(Exception):
    """A request refused with a 4xx and a JSON reason."""

    def __init__(self, status: int, error: str, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.field = field


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers, dumps=_dumps)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _error(exc: Rejected) -> web.Response:
    body: dict[str, Any] = {"error": exc.error, "detail": exc.detail}
    if exc.field is not None:
        body["field"] = exc.field
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    if exc.status == 429:
        headers = {"Retry-After": "60"}
    return _json(exc.status, body, headers)


class CreateLimiter:
    """A token bucket per client address, for instance creation."""

    def __init__(self, rate_per_minute: float, burst: int, *, capacity: int = 10000) -> None:
        self._rate = rate_per_minute / 60.0
        self._burst = float(burst)
        self._capacity = capacity
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, client: str, now: float) -> bool:
        tokens, last = self._buckets.pop(client, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        allowed = tokens >= 1.0
        self._buckets[client] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self._capacity:
            self._buckets.popitem(last=False)
        return allowed


class Api:
    """The handlers, with what they need."""

    def __init__(
        self,
        instances: Instances,
        hpke: HpkeKeyring,
        settings: ApiSettings,
        *,
        info: Callable[[], dict[str, Any]],
        stats: Callable[[], Awaitable[dict[str, Any]]],
        metrics: Callable[[], bytes],
    ) -> None:
        self._instances = instances
        self._hpke = hpke
        self._settings = settings
        self._info = info
        self._stats = stats
        self._metrics = metrics
        self._limiter = CreateLimiter(settings.create_rate, settings.create_burst)
        self._openapi = document()

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self._settings.max_body, middlewares=[self._errors])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get("/v1/info", self.info)
        app.router.add_get("/v1/stats", self.stats)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/instances", self.create)
        app.router.add_get("/v1/instances/{instance_id}", self.get)
        app.router.add_patch("/v1/instances/{instance_id}", self.patch)
        app.router.add_delete("/v1/instances/{instance_id}", self.delete)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Rejected as exc:
            return _error(exc)
        except web.HTTPRequestEntityTooLarge:
            return _error(
                Rejected(413, "body_too_large", f"at most {self._settings.max_body} bytes")
            )
        except web.HTTPNotFound:
            return _error(Rejected(404, "not_found", "no such resource"))
        except web.HTTPMethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.allowed_methods))
            return _json(405, {"error": "method_not_allowed", "detail": f"allowed: {allowed}"},
                         {"Allow": allowed})  # fmt: skip
        except web.HTTPException as exc:
            return _json(exc.status, {"error": "http_error", "detail": exc.reason})
        except StoreError:
            log.exception("store unavailable")
            detail = "storage is unavailable, retry later"
            return _json(503, {"error": "unavailable", "detail": detail}, {"Retry-After": "5"})
        except Exception:
            log.exception("unexpected failure answering %s %s", request.method, request.path)
            return _json(500, {"error": "internal", "detail": "internal error"})

    # -- public ----------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return _json(200, {"status": "ok"})

    async def openapi(self, request: web.Request) -> web.Response:
        return _json(200, self._openapi)

    async def info(self, request: web.Request) -> web.Response:
        bounds = self._instances.bounds
        return _json(
            200,
            {
                "version": __version__,
                "lifetime": {"min": bounds.minimum, "max": bounds.maximum},
                **self._info(),
                "hpke_keys": self._hpke.public_keys(),
            },
        )

    async def stats(self, request: web.Request) -> web.Response:
        self._require_admin(request)
        return _json(200, await self._stats())

    async def metrics(self, request: web.Request) -> web.Response:
        self._require_admin(request)
        return web.Response(body=self._metrics(), headers={"Content-Type": METRICS_TYPE})

    def _require_admin(self, request: web.Request) -> None:
        token = self._settings.admin_token
        if token is None or not hmac.compare_digest(_bearer(request).encode(), token.encode()):
            raise Rejected(401, "unauthorized", "admin token required")

    # -- instances -------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        client = request.remote or "unknown"
        if not self._limiter.allow(client, time.monotonic()):
            raise Rejected(429, "rate_limited", "too many instances created from this address")
        body = await _read_json(request, InstanceIn)
        spec = InstanceSpec(
            app_id=body.app_id,
            platform=body.platform,
            push=_push(body.push),
            accounts=tuple(self._account(i, a) for i, a in enumerate(body.accounts)),
            payload_key=decode_base64(body.payload_key),
            lifetime=None if body.lifetime is None else float(body.lifetime),
        )
        _, secret, row = await self._instances.create(spec)
        view = await self._instances.view(row)
        return _json(201, {**view, "secret": secret})

    async def get(self, request: web.Request) -> web.Response:
        row = await self._authenticated(request)
        return _json(200, await self._instances.view(row))

    async def patch(self, request: web.Request) -> web.Response:
        row = await self._authenticated(request)
        body = await _read_json(request, InstancePatch)
        if body.push is not None:
            _check_push(row.platform, body.push)
        change = InstanceChange(
            push=None if body.push is None else _push(body.push),
            payload_key=decode_base64(body.payload_key),
            lifetime=None if body.lifetime is None else float(body.lifetime),
            paused=body.paused,
            accounts=None
            if body.accounts is None
            else tuple(self._account_change(i, a) for i, a in enumerate(body.accounts)),
        )
        try:
            updated = await self._instances.update(row, change)
        except InstanceGone:
            raise Rejected(401, "unauthorized", "unknown instance or wrong secret") from None
        except ValueError as exc:
            raise Rejected(400, "invalid_field", str(exc), "accounts") from None
        return _json(200, await self._instances.view(updated))

    async def delete(self, request: web.Request) -> web.Response:
        row = await self._authenticated(request)
        await self._instances.erase(row.id, "disabled")
        return web.Response(status=204)

    # -- helpers -----------------------------------------------------------------------

    async def _authenticated(self, request: web.Request) -> Any:
        secret = _bearer(request)
        instance_id = request.match_info["instance_id"]
        row = await self._instances.authenticate(instance_id, secret) if secret else None
        if row is None:
            raise Rejected(401, "unauthorized", "unknown instance or wrong secret")
        return row

    def _account(self, index: int, account: AccountIn) -> AccountSpec:
        password = account.password
        if account.password_sealed is not None and account.hpke_key_id is not None:
            sealed = decode_base64(account.password_sealed) or b""
            try:
                opened = self._hpke.open(sealed, account.hpke_key_id, account.aor)
            except CryptoError as exc:
                raise Rejected(
                    400,
                    "invalid_field",
                    f"sealed password cannot be opened: {exc}",
                    f"accounts.{index}.password_sealed",
                ) from None
            try:
                password = opened.decode()
            except UnicodeDecodeError:
                raise Rejected(400, "invalid_field", "sealed password is not UTF-8",
                               f"accounts.{index}.password_sealed") from None  # fmt: skip
        return self._checked(index, account, _spec(account, password or ""))

    def _account_change(self, index: int, account: AccountIn) -> AccountSpec | KeepPassword:
        if not account.has_password:
            return KeepPassword(self._checked(index, account, _spec(account, "")))
        return self._account(index, account)

    def _checked(self, index: int, account: AccountIn, spec: AccountSpec) -> AccountSpec:
        """The account, unless its registrar or outbound proxy is at an address the relay
        does not send to (loopback, private, link-local, itself: sipis.transport.policy)."""
        for name, uri in (("registrar", spec.registrar), ("outbound_proxy", spec.outbound_proxy)):
            if uri is None:
                continue
            server = parse_sip_uri(uri)
            port = server.port or (5061 if server.secure else 5060)
            refusal = self._settings.servers.refusal(server.host, port)
            if refusal is not None:
                given = name if getattr(account, name) is not None else "aor"
                raise Rejected(400, "invalid_field",
                               f"{name} is {refusal}, where this relay does not send requests",
                               f"accounts.{index}.{given}")  # fmt: skip
        return spec


def _spec(account: AccountIn, password: str) -> AccountSpec:
    aor = parse_sip_uri(account.aor)
    return AccountSpec(
        id=account.id,
        aor=account.aor,
        auth_username=account.auth_username or aor.user or "",
        password=password,
        registrar=account.registrar
        or f"{aor.scheme}:{aor.host}" + (f":{aor.port}" if aor.port else ""),
        outbound_proxy=account.outbound_proxy,
        transport=account.transport,
        expires=account.expires,
        display_name=account.display_name,
        verify_tls=account.verify_tls,
    )


def _push(push: PushIn) -> PushSpec:
    return PushSpec(push.call_token, push.other_token, push.environment)


def _check_push(platform: str, push: PushIn) -> None:
    try:
        check_tokens(platform, push)
    except ValueError as exc:
        raise Rejected(400, "invalid_field", str(exc), "push") from None


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


Model = TypeVar("Model", InstanceIn, InstancePatch)


async def _read_json(request: web.Request, model: type[Model]) -> Model:
    if request.content_type != "application/json":
        raise Rejected(415, "unsupported_media_type", "send the body as application/json")
    raw = await request.read()
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        field, message = describe(exc)
        if exc.errors()[0]["type"] == "json_invalid":
            raise Rejected(400, "invalid_json", "the body is not valid JSON") from None
        error = "unknown_field" if message == "unknown field" else "invalid_field"
        if message == "required":
            error = "missing_field"
        raise Rejected(400, error, f"{field}: {message}", field) from None
