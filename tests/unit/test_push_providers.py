"""The APNs and FCM providers against local servers that speak Apple's and Google's protocols."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import secrets
import time
import warnings
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import firebase_admin  # type: ignore[import-untyped]
import pytest
import trustme

from sipis.push.apns import ApnsCertificate, ApnsProvider, ApnsTokenKey, shape
from sipis.push.base import Delivered, Failed, Kind, Push, RetryAfter, TokenInvalid
from sipis.push.fcm import FcmProvider, message_for
from sipis.push.logged import masked
from sipis.testing import tls_server_context
from sipis.testing.apns import ApnsSigningKey, LocalApns
from sipis.testing.fcm import LocalFcm
from tests.secrets import remember

APP = "com.example.phone"
PAYLOAD = {
    "type": "call",
    "instance": "inst-1",
    "call": "3f2a9c0d1e7b4a6c8d5e9f01",
    "caller": "sip:carol@example.org",
    "caller_name": "Carol Caller",
}
TIMEOUT = 0.5


def remember_pem(pem: str) -> None:
    """Register the base64 lines of a PEM key as secrets for the session's log check."""
    remember(*(line for line in pem.splitlines() if not line.startswith("-----")))


def apns_token() -> str:
    token = secrets.token_hex(32)
    remember(token)
    return token


def fcm_token() -> str:
    token = f"{secrets.token_urlsafe(16)}:APA91b{secrets.token_urlsafe(100)}"
    remember(token)
    return token


def push(
    kind: Kind = Kind.CALL,
    token: str | None = None,
    *,
    platform: str = "ios",
    environment: str = "production",
    payload: Mapping[str, object] | None = None,
    ttl: int | None = None,
) -> Push:
    return Push(
        kind=kind,
        platform=platform,
        app_id=APP,
        token=token or (apns_token() if platform == "ios" else fcm_token()),
        environment=environment,
        payload=dict(PAYLOAD, type=kind.value) if payload is None else dict(payload),
        instance_id="inst-1",
        collapse_id=PAYLOAD["call"],
        ttl=(0 if kind is Kind.CALL else 86400) if ttl is None else ttl,
    )


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


# -- APNs ------------------------------------------------------------------------------


@pytest.fixture
def signing_key() -> ApnsSigningKey:
    key = ApnsSigningKey.generate()
    remember_pem(key.private_key_pem)
    return key


@pytest.fixture
async def apns(ca: trustme.CA, signing_key: ApnsSigningKey) -> AsyncIterator[LocalApns]:
    async with LocalApns(tls_server_context(ca), signing_keys=[signing_key]) as server:
        yield server


def apns_provider(
    server: LocalApns, credentials: ApnsTokenKey | ApnsCertificate, ca_file: Path
) -> ApnsProvider:
    address = (server.host, server.port)
    return ApnsProvider(
        credentials,
        servers={"production": address, "sandbox": address},
        ca_file=ca_file,
        timeout=TIMEOUT,
    )


@pytest.fixture
async def apns_sender(
    apns: LocalApns, signing_key: ApnsSigningKey, ca_file: Path, tmp_path: Path
) -> AsyncIterator[ApnsProvider]:
    key_file = signing_key.write_p8(tmp_path / f"AuthKey_{signing_key.key_id}.p8")
    provider = apns_provider(
        apns, ApnsTokenKey(key_file, signing_key.key_id, signing_key.team_id), ca_file
    )
    yield provider
    await provider.close()


async def test_call_is_a_voip_push_to_the_voip_topic(
    apns: LocalApns, apns_sender: ApnsProvider
) -> None:
    call = push(Kind.CALL)
    outcome = await apns_sender.send(call)
    received = await apns.pushes.next()
    assert outcome == Delivered(received.apns_id)
    assert received.status == 200
    assert received.token == call.token
    assert received.headers[":path"] == f"/3/device/{call.token}"
    assert received.headers["apns-push-type"] == "voip"
    assert received.headers["apns-topic"] == "com.example.phone.voip"
    assert received.headers["apns-priority"] == "10"
    assert received.headers["apns-expiration"] == "0"
    assert received.headers["apns-collapse-id"] == PAYLOAD["call"]
    assert received.auth == "token"
    assert received.payload == {"sipis": call.payload}


@pytest.mark.parametrize("kind", [Kind.MESSAGE, Kind.CALL_MISSED, Kind.ERASED])
async def test_visible_notices_are_alerts_without_caller_details(
    apns: LocalApns, apns_sender: ApnsProvider, kind: Kind
) -> None:
    notice = push(kind)
    sent = time.time()
    outcome = await apns_sender.send(notice)
    received = await apns.pushes.next()
    assert isinstance(outcome, Delivered)
    assert received.headers["apns-push-type"] == "alert"
    assert received.headers["apns-topic"] == APP
    assert received.headers["apns-priority"] == "10"
    expiration = int(received.headers["apns-expiration"])
    assert int(sent) + 86400 <= expiration <= int(time.time()) + 86400
    aps = received.payload["aps"]
    assert aps["mutable-content"] == 1
    assert aps["alert"] == {
        "title-loc-key": f"SIPIS_{kind.name}_TITLE",
        "loc-key": f"SIPIS_{kind.name}_BODY",
    }
    assert "carol" not in json.dumps(aps).lower()
    assert received.payload["sipis"] == notice.payload


@pytest.mark.parametrize("kind", [Kind.CALL_CANCELLED, Kind.ANSWERED_ELSEWHERE, Kind.EXPIRING])
async def test_silent_updates_are_background_pushes_at_priority_5(
    apns: LocalApns, apns_sender: ApnsProvider, kind: Kind
) -> None:
    outcome = await apns_sender.send(push(kind, ttl=0))
    received = await apns.pushes.next()
    assert isinstance(outcome, Delivered)
    assert received.headers["apns-push-type"] == "background"
    assert received.headers["apns-topic"] == APP
    assert received.headers["apns-priority"] == "5"
    assert received.headers["apns-expiration"] == "0"
    assert received.payload["aps"] == {"content-available": 1}


def test_only_a_call_is_ever_a_voip_push() -> None:
    for kind in Kind:
        wire = shape(push(kind))
        assert (wire.push_type.value == "voip") == (kind is Kind.CALL)
        assert wire.topic.endswith(".voip") == (kind is Kind.CALL)


async def test_pushes_share_one_connection(apns: LocalApns, apns_sender: ApnsProvider) -> None:
    outcomes = await asyncio.gather(*(apns_sender.send(push(Kind.CALL)) for _ in range(20)))
    assert all(isinstance(outcome, Delivered) for outcome in outcomes)
    assert len({outcome.id for outcome in outcomes if isinstance(outcome, Delivered)}) == 20
    assert apns.connections_made == 1


async def test_sandbox_and_production_go_to_their_own_servers(
    ca: trustme.CA, signing_key: ApnsSigningKey, ca_file: Path, tmp_path: Path
) -> None:
    key = ApnsTokenKey(
        signing_key.write_p8(tmp_path / "key.p8"), signing_key.key_id, signing_key.team_id
    )
    context = tls_server_context(ca)
    async with (
        LocalApns(context, signing_keys=[signing_key]) as production,
        LocalApns(tls_server_context(ca), signing_keys=[signing_key]) as sandbox,
    ):
        provider = ApnsProvider(
            key,
            servers={
                "production": (production.host, production.port),
                "sandbox": (sandbox.host, sandbox.port),
            },
            ca_file=ca_file,
            timeout=TIMEOUT,
        )
        try:
            to_sandbox = push(Kind.CALL, environment="sandbox")
            to_production = push(Kind.CALL, environment="production")
            assert isinstance(await provider.send(to_sandbox), Delivered)
            assert isinstance(await provider.send(to_production), Delivered)
            unknown = await provider.send(push(Kind.CALL, environment="staging"))
        finally:
            await provider.close()
    assert [p.token for p in sandbox.pushes.items] == [to_sandbox.token]
    assert [p.token for p in production.pushes.items] == [to_production.token]
    assert isinstance(unknown, Failed)


async def test_the_server_checks_the_provider_token(
    apns: LocalApns, signing_key: ApnsSigningKey, ca_file: Path, tmp_path: Path
) -> None:
    impostor = ApnsSigningKey.generate(signing_key.key_id, signing_key.team_id)
    remember_pem(impostor.private_key_pem)
    wrong_key = ApnsTokenKey(
        impostor.write_p8(tmp_path / "impostor.p8"), signing_key.key_id, signing_key.team_id
    )
    wrong_team = ApnsTokenKey(
        signing_key.write_p8(tmp_path / "real.p8"), signing_key.key_id, "TEAM000000"
    )
    for credentials in (wrong_key, wrong_team):
        provider = apns_provider(apns, credentials, ca_file)
        try:
            assert await provider.send(push(Kind.CALL)) == Failed("403 InvalidProviderToken")
        finally:
            await provider.close()
    assert [p.auth for p in apns.pushes.items] == ["token", "token"]


async def test_certificate_auth(ca: trustme.CA, ca_file: Path, tmp_path: Path) -> None:
    apple = trustme.CA()
    not_after = datetime.datetime(2031, 5, 17, 12, 0, tzinfo=datetime.UTC)
    certificate = apple.issue_cert(
        APP, common_name=f"Apple VoIP Services: {APP}", not_after=not_after
    )
    remember_pem(certificate.private_key_pem.bytes().decode())
    cert_file = tmp_path / "voip.pem"
    certificate.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    credentials = ApnsCertificate(cert_file)

    async with LocalApns(tls_server_context(ca, client_ca=apple)) as server:
        provider = apns_provider(server, credentials, ca_file)
        try:
            outcome = await provider.send(push(Kind.CALL))
        finally:
            await provider.close()
        received = await server.pushes.next()
    assert isinstance(outcome, Delivered)
    assert received.auth == "certificate"
    assert "authorization" not in received.headers
    assert received.headers["apns-topic"] == "com.example.phone.voip"
    assert provider.credential_expiry() == not_after.timestamp()

    async with LocalApns(tls_server_context(ca)) as not_trusting_the_certificate:
        provider = apns_provider(not_trusting_the_certificate, credentials, ca_file)
        try:
            assert await provider.send(push(Kind.CALL)) == Failed("403 MissingProviderToken")
        finally:
            await provider.close()


def test_a_signing_key_does_not_expire(signing_key: ApnsSigningKey, tmp_path: Path) -> None:
    key_file = signing_key.write_p8(tmp_path / "key.p8")
    provider = ApnsProvider(ApnsTokenKey(key_file, signing_key.key_id, signing_key.team_id))
    assert provider.credential_expiry() is None


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("Unregistered", TokenInvalid("Unregistered")),
        ("ExpiredToken", TokenInvalid("ExpiredToken")),
        ("BadDeviceToken", TokenInvalid("BadDeviceToken")),
        ("DeviceTokenNotForTopic", TokenInvalid("DeviceTokenNotForTopic")),
    ],
)
async def test_rejected_tokens_are_invalid(
    apns: LocalApns, apns_sender: ApnsProvider, reason: str, expected: TokenInvalid
) -> None:
    call = push(Kind.CALL)
    apns.reject_token(call.token, reason)
    assert await apns_sender.send(call) == expected
    assert isinstance(await apns_sender.send(push(Kind.CALL)), Delivered)


async def test_server_checks_reach_the_outcome(apns: LocalApns, apns_sender: ApnsProvider) -> None:
    stranger = Push(
        kind=Kind.MESSAGE,
        platform="ios",
        app_id="org.example.other",
        token=apns_token(),
        environment="production",
        payload={"type": "message"},
        instance_id="inst-2",
    )
    assert await apns_sender.send(stranger) == Failed("400 TopicDisallowed")
    assert await apns_sender.send(push(Kind.CALL, token="not-hex")) == TokenInvalid(
        "BadDeviceToken"
    )
    assert [p.reason for p in apns.pushes.items] == ["TopicDisallowed", "BadDeviceToken"]


@pytest.mark.parametrize(
    ("reason", "retry_after", "expected"),
    [
        ("TooManyRequests", None, RetryAfter("TooManyRequests")),
        ("TooManyRequests", 7, RetryAfter("TooManyRequests", 7.0)),
        ("InternalServerError", None, RetryAfter("InternalServerError")),
        ("ServiceUnavailable", 2.5, RetryAfter("ServiceUnavailable", 2.5)),
        ("Shutdown", None, RetryAfter("Shutdown")),
        ("BadCollapseId", None, Failed("400 BadCollapseId")),
        ("Forbidden", None, Failed("403 Forbidden")),
        ("PayloadTooLarge", None, Failed("413 PayloadTooLarge")),
    ],
)
async def test_refusals_map_to_outcomes(
    apns: LocalApns,
    apns_sender: ApnsProvider,
    reason: str,
    retry_after: float | None,
    expected: RetryAfter | Failed,
) -> None:
    apns.fail_next(1, reason, retry_after)
    assert await apns_sender.send(push(Kind.CALL)) == expected
    assert isinstance(await apns_sender.send(push(Kind.CALL)), Delivered)
    assert [p.status for p in apns.pushes.items][1:] == [200]


async def test_payload_limits_differ_for_voip(apns: LocalApns, apns_sender: ApnsProvider) -> None:
    big = {"blob": "x" * 4500}
    assert isinstance(await apns_sender.send(push(Kind.CALL, payload=big)), Delivered)
    assert await apns_sender.send(push(Kind.MESSAGE, payload=big)) == Failed("413 PayloadTooLarge")


async def test_slow_server_gives_retry_after_at_the_timeout(
    apns: LocalApns, apns_sender: ApnsProvider
) -> None:
    apns.delay = 3 * TIMEOUT
    started = time.monotonic()
    outcome = await apns_sender.send(push(Kind.CALL))
    elapsed = time.monotonic() - started
    assert isinstance(outcome, RetryAfter)
    assert outcome.seconds is None
    assert TIMEOUT - 0.05 <= elapsed < 2 * TIMEOUT
    apns.delay = 0
    assert isinstance(await apns_sender.send(push(Kind.CALL)), Delivered)
    assert apns.connections_made == 2


async def test_connection_reset_gives_retry_after_then_a_new_connection(
    apns: LocalApns, apns_sender: ApnsProvider
) -> None:
    assert isinstance(await apns_sender.send(push(Kind.CALL)), Delivered)
    apns.reset_next()
    outcome = await apns_sender.send(push(Kind.CALL))
    assert isinstance(outcome, RetryAfter)
    assert isinstance(await apns_sender.send(push(Kind.CALL)), Delivered)
    assert [p.status for p in apns.pushes.items] == [200, None, 200]
    assert apns.connections_made == 2


async def test_unreachable_server_gives_retry_after(
    signing_key: ApnsSigningKey, ca_file: Path, tmp_path: Path, unused_tcp_port: int
) -> None:
    key_file = signing_key.write_p8(tmp_path / "key.p8")
    provider = ApnsProvider(
        ApnsTokenKey(key_file, signing_key.key_id, signing_key.team_id),
        servers={"production": ("127.0.0.1", unused_tcp_port)},
        ca_file=ca_file,
        timeout=TIMEOUT,
    )
    try:
        assert isinstance(await provider.send(push(Kind.CALL)), RetryAfter)
    finally:
        await provider.close()


async def test_apns_logs_hold_no_tokens_keys_or_payloads(
    apns: LocalApns,
    apns_sender: ApnsProvider,
    signing_key: ApnsSigningKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    call = push(Kind.CALL)
    await apns_sender.send(call)
    apns.reject_token(call.token)
    await apns_sender.send(call)
    apns.reset_next()
    await apns_sender.send(call)
    bearer = apns.pushes[0].headers["authorization"].split()[1]
    remember(bearer)
    assert masked(call.token) in caplog.text
    for secret in (call.token, bearer, "Carol", *signing_key.private_key_pem.splitlines()[1:-1]):
        assert secret not in caplog.text


# -- FCM -------------------------------------------------------------------------------


@pytest.fixture
async def fcm(ca: trustme.CA) -> AsyncIterator[LocalFcm]:
    async with LocalFcm(tls_server_context(ca)) as server:
        yield server


def service_account(server: LocalFcm, path: Path, project_id: str = "sipis-test") -> Path:
    server.service_account_file(path, project_id=project_id)
    remember_pem(json.loads(path.read_text())["private_key"])
    return path


@pytest.fixture
async def fcm_sender(fcm: LocalFcm, ca_file: Path, tmp_path: Path) -> AsyncIterator[FcmProvider]:
    provider = FcmProvider(
        service_account(fcm, tmp_path / "service-account.json"),
        send_url_base=fcm.base_url,
        ca_file=ca_file,
        timeout=TIMEOUT,
    )
    yield provider
    await provider.close()


async def test_call_is_a_high_priority_data_message(fcm: LocalFcm, fcm_sender: FcmProvider) -> None:
    call = push(Kind.CALL, platform="android")
    outcome = await fcm_sender.send(call)
    received = await fcm.messages.next()
    assert received.status == 200
    assert received.project == "sipis-test"
    assert received.message == {
        "token": call.token,
        "data": call.payload,
        "android": {"priority": "high", "ttl": "30s", "collapse_key": PAYLOAD["call"]},
    }
    assert isinstance(outcome, Delivered)
    assert outcome.id is not None
    assert outcome.id.startswith("projects/sipis-test/messages/")


@pytest.mark.parametrize(
    ("kind", "priority"),
    [
        (Kind.MESSAGE, "high"),
        (Kind.CALL_MISSED, "normal"),
        (Kind.CALL_CANCELLED, "normal"),
        (Kind.ANSWERED_ELSEWHERE, "normal"),
        (Kind.EXPIRING, "normal"),
        (Kind.ERASED, "normal"),
    ],
)
async def test_other_kinds_keep_their_ttl(
    fcm: LocalFcm, fcm_sender: FcmProvider, kind: Kind, priority: str
) -> None:
    assert isinstance(await fcm_sender.send(push(kind, platform="android")), Delivered)
    android = (await fcm.messages.next()).message["android"]
    assert android == {"priority": priority, "ttl": "86400s", "collapse_key": PAYLOAD["call"]}


async def test_data_values_are_strings(fcm: LocalFcm, fcm_sender: FcmProvider) -> None:
    payload = {"type": "message", "count": 3, "parts": ["a", "b"]}
    assert isinstance(
        await fcm_sender.send(push(Kind.MESSAGE, platform="android", payload=payload)), Delivered
    )
    data = (await fcm.messages.next()).message["data"]
    assert data == {"type": "message", "count": "3", "parts": '["a","b"]'}


async def test_fcm_checks_reach_the_outcome(fcm: LocalFcm, fcm_sender: FcmProvider) -> None:
    reserved = push(Kind.MESSAGE, platform="android", payload={"from": "someone"})
    assert await fcm_sender.send(reserved) == Failed("400 INVALID_ARGUMENT")
    assert (await fcm.messages.next()).error == "INVALID_ARGUMENT"


def test_messages_carry_the_registration_token_without_a_warning() -> None:
    call = push(Kind.CALL, platform="android")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        message = message_for(call)
    assert caught == []
    assert message.token == call.token
    assert message.fid is None


async def test_access_token_is_fetched_once_and_cached(
    fcm: LocalFcm, fcm_sender: FcmProvider, tmp_path: Path
) -> None:
    for _ in range(3):
        assert isinstance(await fcm_sender.send(push(Kind.CALL, platform="android")), Delivered)
    account = json.loads((tmp_path / "service-account.json").read_text())
    [token_request] = fcm.token_requests.items
    assert token_request.status == 200
    assert token_request.client_email == account["client_email"]
    assert "https://www.googleapis.com/auth/cloud-platform" in token_request.scopes
    bearers = {m.headers["Authorization"] for m in fcm.messages.items}
    assert len(bearers) == 1
    remember(bearers.pop().split()[1])


async def test_refused_access_token_is_replaced(fcm: LocalFcm, fcm_sender: FcmProvider) -> None:
    assert isinstance(await fcm_sender.send(push(Kind.CALL, platform="android")), Delivered)
    fcm.revoke_access_tokens()
    assert await fcm_sender.send(push(Kind.CALL, platform="android")) == RetryAfter(
        "UNAUTHENTICATED"
    )
    assert isinstance(await fcm_sender.send(push(Kind.CALL, platform="android")), Delivered)
    assert len(fcm.token_requests) == 2


async def test_unknown_service_account_fails(
    ca: trustme.CA, fcm: LocalFcm, ca_file: Path, tmp_path: Path
) -> None:
    stranger = service_account(LocalFcm(tls_server_context(ca)), tmp_path / "stranger.json")
    provider = FcmProvider(
        stranger,
        send_url_base=fcm.base_url,
        token_uri=fcm.token_uri,
        ca_file=ca_file,
        timeout=TIMEOUT,
    )
    try:
        outcome = await provider.send(push(Kind.CALL, platform="android"))
    finally:
        await provider.close()
    assert outcome == Failed("token endpoint refused the service account (invalid_grant)")
    assert [r.status for r in fcm.token_requests.items] == [400]
    assert len(fcm.messages) == 0


async def test_unregistered_token_is_invalid(fcm: LocalFcm, fcm_sender: FcmProvider) -> None:
    call = push(Kind.CALL, platform="android")
    fcm.reject_token(call.token)
    assert await fcm_sender.send(call) == TokenInvalid("UNREGISTERED")
    assert isinstance(await fcm_sender.send(push(Kind.CALL, platform="android")), Delivered)


@pytest.mark.parametrize(
    ("error", "retry_after", "expected"),
    [
        ("QUOTA_EXCEEDED", 7, RetryAfter("QUOTA_EXCEEDED", 7.0)),
        ("QUOTA_EXCEEDED", None, RetryAfter("QUOTA_EXCEEDED")),
        ("UNAVAILABLE", 2.5, RetryAfter("UNAVAILABLE", 2.5)),
        ("INTERNAL", None, RetryAfter("INTERNAL")),
        ("INVALID_ARGUMENT", None, Failed("400 INVALID_ARGUMENT")),
        ("SENDER_ID_MISMATCH", None, Failed("403 SENDER_ID_MISMATCH")),
    ],
)
async def test_fcm_errors_map_to_outcomes(
    fcm: LocalFcm,
    fcm_sender: FcmProvider,
    error: str,
    retry_after: float | None,
    expected: RetryAfter | Failed,
) -> None:
    fcm.fail_next(1, error, retry_after)
    assert await fcm_sender.send(push(Kind.CALL, platform="android")) == expected
    assert isinstance(await fcm_sender.send(push(Kind.CALL, platform="android")), Delivered)
    assert [m.status for m in fcm.messages.items][1:] == [200]


async def test_fcm_slow_server_gives_retry_after_at_the_timeout(
    fcm: LocalFcm, fcm_sender: FcmProvider
) -> None:
    assert isinstance(await fcm_sender.send(push(Kind.CALL, platform="android")), Delivered)
    fcm.delay = 3 * TIMEOUT
    started = time.monotonic()
    outcome = await fcm_sender.send(push(Kind.CALL, platform="android"))
    elapsed = time.monotonic() - started
    assert isinstance(outcome, RetryAfter)
    assert TIMEOUT - 0.05 <= elapsed < 2 * TIMEOUT
    fcm.delay = 0
    assert isinstance(await fcm_sender.send(push(Kind.CALL, platform="android")), Delivered)


async def test_fcm_connection_reset_gives_retry_after(
    fcm: LocalFcm, fcm_sender: FcmProvider
) -> None:
    fcm.reset_next()
    outcome = await fcm_sender.send(push(Kind.CALL, platform="android"))
    assert isinstance(outcome, RetryAfter)
    assert isinstance(await fcm_sender.send(push(Kind.CALL, platform="android")), Delivered)
    assert [m.status for m in fcm.messages.items] == [None, 200]


async def test_providers_for_two_projects_coexist(
    fcm: LocalFcm, ca_file: Path, tmp_path: Path
) -> None:
    providers = [
        FcmProvider(
            service_account(fcm, tmp_path / f"{project}.json", project),
            send_url_base=fcm.base_url,
            ca_file=ca_file,
            timeout=TIMEOUT,
        )
        for project in ("alpha", "beta")
    ]
    alpha, beta = providers
    try:
        assert isinstance(await alpha.send(push(Kind.CALL, platform="android")), Delivered)
        assert isinstance(await beta.send(push(Kind.CALL, platform="android")), Delivered)
        await alpha.close()
        assert isinstance(await beta.send(push(Kind.CALL, platform="android")), Delivered)
    finally:
        await beta.close()
    assert [m.project for m in fcm.messages.items] == ["alpha", "beta", "beta"]
    for provider in providers:
        with pytest.raises(ValueError, match="does not exist"):
            firebase_admin.get_app(provider.app_name)


async def test_fcm_logs_hold_no_tokens_keys_or_payloads(
    fcm: LocalFcm,
    fcm_sender: FcmProvider,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    call = push(Kind.CALL, platform="android")
    await fcm_sender.send(call)
    fcm.reject_token(call.token)
    await fcm_sender.send(call)
    fcm.fail_next(1, "INVALID_ARGUMENT")
    await fcm_sender.send(call)
    access_token = fcm.messages[0].headers["Authorization"].split()[1]
    remember(access_token)
    key = json.loads((tmp_path / "service-account.json").read_text())["private_key"]
    assert masked(call.token) in caplog.text
    for secret in (call.token, access_token, "Carol", *key.splitlines()[1:-1]):
        assert secret not in caplog.text
