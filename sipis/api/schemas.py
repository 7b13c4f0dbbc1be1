"""The request bodies of the HTTPS API, validated field by field.

Pydantic does the type checking and produces the JSON Schema that the
OpenAPI document serves; every model forbids unknown fields and coerces
nothing (``"600"`` is not an integer).  What pydantic cannot know — URI
syntax, token formats per platform, base64 lengths, one of password or
password_sealed — is checked here too, so that every rejection names the
field it is about.  Error details never include the submitted value.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sipis.sip.errors import SipError
from sipis.sip.uri import SipUri, parse_uri

MAX_ACCOUNTS = 8

_APNS_TOKEN = re.compile(r"(?:[0-9a-fA-F]{2}){32,100}\Z")
_FCM_TOKEN = re.compile(r"[A-Za-z0-9_:\-]{32,4096}\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Text = Annotated[str, Field(min_length=1, max_length=256)]


def _whole_number(value: object) -> object:
    """JSON has one number type: 600.0 is the integer 600 (JSON Schema agrees); 600.5 is not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Expires = Annotated[int, BeforeValidator(_whole_number), Field(ge=60, le=86400)]
Lifetime = Annotated[int, BeforeValidator(_whole_number), Field(ge=1, le=10 * 86400)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, hide_input_in_errors=True)


def _plain_text(value: str | None) -> str | None:
    if value is not None and _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


def _sip_uri(value: str | None, *, user: bool) -> str | None:
    if value is None:
        return None
    try:
        uri = parse_uri(value)
    except SipError:
        raise ValueError("not a valid SIP URI") from None
    if not isinstance(uri, SipUri):
        raise ValueError("must be a sip: or sips: URI")
    if user and not uri.user:
        raise ValueError("must name a user (sip:user@domain)")
    if uri.headers:
        raise ValueError("must not carry URI headers")
    return value


def _base64(value: str | None, *, size: int | None = None, limit: int = 8192) -> bytes | None:
    if value is None:
        return None
    if len(value) > limit:
        raise ValueError("too long")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
    if size is not None and len(raw) != size:
        raise ValueError(f"must decode to exactly {size} bytes")
    return raw


class PushIn(_Strict):
    call_token: Annotated[str, Field(min_length=1, max_length=4096)]
    other_token: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    environment: Literal["production", "sandbox"] = "production"


class AccountIn(_Strict):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    aor: Text
    auth_username: Text | None = None
    password: Text | None = None
    password_sealed: Annotated[str, Field(min_length=1, max_length=8192)] | None = None
    hpke_key_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    registrar: Text | None = None
    outbound_proxy: Text | None = None
    transport: Literal["udp", "tcp", "tls"] | None = None
    expires: Expires = 600
    display_name: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    verify_tls: bool = True

    @field_validator("aor")
    @classmethod
    def _aor(cls, value: str) -> str:
        _sip_uri(value, user=True)
        return value

    @field_validator("registrar", "outbound_proxy")
    @classmethod
    def _server(cls, value: str | None) -> str | None:
        return _sip_uri(value, user=False)

    @field_validator("auth_username", "password", "display_name")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        return _plain_text(value)

    @field_validator("password_sealed")
    @classmethod
    def _sealed(cls, value: str | None) -> str | None:
        _base64(value)
        return value

    @model_validator(mode="after")
    def _one_password(self) -> AccountIn:
        if self.password is not None and self.password_sealed is not None:
            raise ValueError("give password or password_sealed, not both")
        if self.password_sealed is not None and self.hpke_key_id is None:
            raise ValueError("password_sealed needs hpke_key_id")
        if self.hpke_key_id is not None and self.password_sealed is None:
            raise ValueError("hpke_key_id without password_sealed")
        return self

    @property
    def has_password(self) -> bool:
        return self.password is not None or self.password_sealed is not None


def _unique_ids(accounts: list[AccountIn]) -> list[AccountIn]:
    ids = [a.id for a in accounts]
    if len(set(ids)) != len(ids):
        raise ValueError("account ids must be unique")
    return accounts


def _payload_key(value: str) -> str:
    _base64(value, size=32)
    return value


PayloadKey = Annotated[str, Field(max_length=64), AfterValidator(_payload_key)]
Accounts = Annotated[
    list[AccountIn], Field(min_length=1, max_length=MAX_ACCOUNTS), AfterValidator(_unique_ids)
]


class InstanceIn(_Strict):
    app_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$", max_length=155)]
    platform: Literal["ios", "android"]
    push: PushIn
    payload_key: PayloadKey | None = None
    lifetime: Lifetime | None = None
    accounts: Accounts

    @model_validator(mode="after")
    def _tokens_fit_platform(self) -> InstanceIn:
        check_tokens(self.platform, self.push)
        for index, account in enumerate(self.accounts):
            if not account.has_password:
                raise ValueError(
                    f"accounts.{index}.password: password or password_sealed is required"
                )
        return self


class InstancePatch(_Strict):
    push: PushIn | None = None
    payload_key: PayloadKey | None = None
    lifetime: Lifetime | None = None
    paused: bool | None = None
    accounts: Accounts | None = None


def check_tokens(platform: str, push: PushIn) -> None:
    """iOS tokens are APNs hex tokens (and only iOS has an other_token); Android's are FCM."""
    if platform == "ios":
        for name in ("call_token", "other_token"):
            token = getattr(push, name)
            if token is not None and not _APNS_TOKEN.match(token):
                raise ValueError(f"push.{name}: not an APNs device token (hex)")
    else:
        if not _FCM_TOKEN.match(push.call_token):
            raise ValueError("push.call_token: not an FCM registration token")
        if push.other_token is not None:
            raise ValueError("push.other_token: only iOS instances have one")


_NAMED = re.compile(r"([a-z_]+(?:\.[a-z0-9_]+)*): (.+)\Z", re.DOTALL)


def describe(error: ValidationError) -> tuple[str, str]:
    """The first problem of a validation error as (field path, message), input never included.

    Checks that span several fields name the one at fault at the start of
    their message ("push.call_token: ..."); that name becomes the path.
    """
    first = error.errors(include_input=False, include_url=False)[0]
    location = ".".join(str(part) for part in first["loc"])
    kind = first["type"]
    message = first["msg"].removeprefix("Value error, ")
    named = _NAMED.match(message)
    if named is not None:
        location = ".".join(p for p in (location, named.group(1)) if p)
        message = named.group(2)
    location = location or "body"
    if kind == "extra_forbidden":
        return location, "unknown field"
    if kind == "missing":
        return location, "required"
    return location, message


def decode_base64(value: str | None) -> bytes | None:
    return _base64(value)
