"""The registration state machine against a scripted registrar, on a virtual clock."""

from __future__ import annotations

import random

import pytest

from sipis.sip.digest import parse_credentials
from sipis.sip.message import Request, parse_message
from sipis.sip.registration import (
    LocalAddress,
    RegistrationConfig,
    RegistrationSession,
    RegistrationState,
)
from sipis.sip.uas import make_response
from sipis.sip.uri import parse_sip_uri

INSTANCE = "urn:uuid:7f1c6e3a-0c1d-4f57-9a59-1f0b4c3d2e10"
LOCAL = LocalAddress("udp", "192.0.2.50", 5070)


def config(**overrides: object) -> RegistrationConfig:
    values: dict[str, object] = {
        "aor": parse_sip_uri("sip:alice@example.com"),
        "registrar": parse_sip_uri("sip:example.com"),
        "username": "alice",
        "password": "s3cret-pw",
        "contact_user": "c0ffee1234",
        "instance_id": INSTANCE,
        "expires": 600,
    }
    values.update(overrides)
    return RegistrationConfig(**values)  # type: ignore[arg-type]


class Registrar:
    """A scripted registrar: parses what the session sends and answers it."""

    def __init__(self, session: RegistrationSession) -> None:
        self.session = session
        self.received: list[Request] = []

    def take(self) -> Request:
        sent = self.session.outgoing()
        assert len(sent) == 1, sent
        msg = parse_message(sent[0])
        assert isinstance(msg, Request)
        self.received.append(msg)
        return msg

    def answer(self, request: Request, status: int, now: float, **headers: str) -> None:
        extra = [(k.replace("_", "-"), v) for k, v in headers.items()]
        if status == 200 and "Contact" not in headers:
            contact = request.headers.get("Contact") or ""
            expires = request.expires or 0
            extra.append(("Contact", f"{contact.split(';expires=')[0]};expires={expires}"))
        response = make_response(request, status, to_tag="reg", headers=extra)
        self.session.receive(parse_message(response.serialize()), now)  # type: ignore[arg-type]


def started(**overrides: object) -> tuple[RegistrationSession, Registrar]:
    session = RegistrationSession(config(**overrides), rng=random.Random(7))
    session.bind(LOCAL)
    session.start(0.0)
    session.on_timer(0.0)
    return session, Registrar(session)


CHALLENGE = 'Digest realm="example.com", nonce="abc123", qop="auth", algorithm=MD5'


def test_first_register_carries_the_rfc5626_contact() -> None:
    session, registrar = started()
    req = registrar.take()
    assert str(req.uri) == "sip:example.com"
    assert req.via.params.keys() >= {"rport", "branch"}
    assert (req.via.host, req.via.port) == ("192.0.2.50", 5070)
    [contact] = req.contacts
    assert str(contact.uri) == "sip:c0ffee1234@192.0.2.50:5070"
    assert contact.params["+sip.instance"] == f'"<{INSTANCE}>"'
    assert contact.params["reg-id"] == "1"
    assert req.expires == 600
    assert req.headers.values("Supported") == ["path", "outbound"]
    assert session.state is RegistrationState.REGISTERING


def test_registered_then_refreshed_with_jitter_same_call_id_next_cseq() -> None:
    session, registrar = started()
    first = registrar.take()
    registrar.answer(first, 200, 0.2, Service_Route="<sip:edge.example.com;lr>")
    assert session.state is RegistrationState.REGISTERED
    assert session.registered_until == pytest.approx(600.2)
    assert str(session.service_route[0].uri) == "sip:edge.example.com;lr"
    refresh_at = session.deadline
    assert refresh_at is not None and 0.2 + 450 <= refresh_at <= 0.2 + 540
    session.on_timer(refresh_at)
    second = registrar.take()
    assert second.call_id == first.call_id
    assert second.cseq.number == first.cseq.number + 1
    assert second.via.branch != first.via.branch


def test_refresh_times_spread_across_sessions() -> None:
    times = set()
    for seed in range(20):
        session = RegistrationSession(config(), rng=random.Random(seed))
        session.bind(LOCAL)
        session.start(0.0)
        session.on_timer(0.0)
        Registrar(session).answer(Registrar(session).take(), 200, 0.0)
        times.add(round(session.deadline or 0))
    assert len(times) >= 15


def test_registrar_granted_expiry_wins() -> None:
    session, registrar = started()
    req = registrar.take()
    contact = (req.headers.get("Contact") or "").split(";expires")[0]
    registrar.answer(req, 200, 1.0, Contact=f"{contact};expires=120", Expires="3600")
    assert session.registered_until == pytest.approx(121.0)


def test_digest_challenge_answered_and_refresh_preauthorized() -> None:
    session, registrar = started()
    registrar.answer(registrar.take(), 401, 0.1, WWW_Authenticate=CHALLENGE)
    authed = registrar.take()
    creds = parse_credentials(authed.headers.get("Authorization") or "")
    assert creds.params["username"] == "alice" and creds.params["nc"] == "00000001"
    assert creds.params["uri"] == "sip:example.com"
    registrar.answer(authed, 200, 0.2)
    assert session.state is RegistrationState.REGISTERED
    session.on_timer(session.deadline or 0)
    refresh = registrar.take()
    creds = parse_credentials(refresh.headers.get("Authorization") or "")
    assert creds.params["nc"] == "00000002"


def test_wrong_password_ends_in_failed_without_a_loop() -> None:
    session, registrar = started()
    registrar.answer(registrar.take(), 401, 0.1, WWW_Authenticate=CHALLENGE)
    registrar.answer(
        registrar.take(), 401, 0.2, WWW_Authenticate=CHALLENGE.replace("abc123", "def456")
    )
    assert session.state is RegistrationState.FAILED
    assert session.reason == "authentication failed"
    assert session.deadline is None and session.outgoing() == []
    assert len(registrar.received) == 2


def test_stale_nonce_is_retried() -> None:
    session, registrar = started()
    registrar.answer(registrar.take(), 401, 0.1, WWW_Authenticate=CHALLENGE)
    registrar.answer(
        registrar.take(),
        401,
        0.2,
        WWW_Authenticate=CHALLENGE.replace("abc123", "n2") + ", stale=true",
    )
    third = registrar.take()
    assert parse_credentials(third.headers.get("Authorization") or "").params["nonce"] == "n2"
    registrar.answer(third, 200, 0.3)
    assert session.state is RegistrationState.REGISTERED


def test_expired_cached_nonce_on_refresh_is_not_a_wrong_password() -> None:
    session, registrar = started()
    registrar.answer(registrar.take(), 401, 0.1, WWW_Authenticate=CHALLENGE)
    registrar.answer(registrar.take(), 200, 0.2)
    session.on_timer(session.deadline or 0)
    refresh = registrar.take()
    registrar.answer(refresh, 401, 500.0, WWW_Authenticate=CHALLENGE.replace("abc123", "fresh"))
    retry = registrar.take()
    registrar.answer(retry, 200, 500.1)
    assert session.state is RegistrationState.REGISTERED


def test_proxy_authentication() -> None:
    _, registrar = started()
    registrar.answer(registrar.take(), 407, 0.1, Proxy_Authenticate=CHALLENGE)
    retry = registrar.take()
    assert retry.headers.get("Proxy-Authorization") is not None
    assert retry.headers.get("Authorization") is None


def test_423_retries_with_min_expires() -> None:
    session, registrar = started(expires=60)
    registrar.answer(registrar.take(), 423, 0.1, Min_Expires="1800")
    retry = registrar.take()
    assert retry.expires == 1800
    registrar.answer(retry, 200, 0.2)
    assert session.registered_until == pytest.approx(1800.2)


def test_423_without_a_larger_min_expires_fails() -> None:
    session, registrar = started()
    registrar.answer(registrar.take(), 423, 0.1, Min_Expires="60")
    assert session.state is RegistrationState.FAILED


@pytest.mark.parametrize("status", [403, 404, 400, 603])
def test_permanent_failures_stop_without_retry(status: int) -> None:
    session, registrar = started()
    registrar.answer(registrar.take(), status, 0.1)
    assert session.state is RegistrationState.FAILED
    assert session.last_status == status
    assert session.deadline is None


def test_503_with_retry_after_is_honoured() -> None:
    session, registrar = started()
    registrar.answer(registrar.take(), 503, 1.0, Retry_After="120")
    assert session.state is RegistrationState.REGISTERING
    assert session.deadline == pytest.approx(121.0)


def test_500_backoff_follows_rfc5626() -> None:
    session, registrar = started()
    now = 0.0
    delays = []
    for _ in range(8):
        registrar.answer(registrar.take(), 500, now, Retry_After="")
        deadline = session.deadline
        assert deadline is not None
        delays.append(deadline - now)
        now = deadline
        session.on_timer(now)
    for n, delay in enumerate(delays, start=1):
        ceiling = min(1800.0, 90.0 * 2 ** (n - 1))
        assert 0.5 * ceiling <= delay <= ceiling
    assert session.failures == 8


def test_no_answer_backs_off_from_30s_and_asks_for_a_new_flow() -> None:
    session, registrar = started()
    registrar.take()
    session.on_timer(32.0)  # Timer F
    assert session.reason == "timeout" and session.needs_flow
    deadline = session.deadline
    assert deadline is not None and 32.0 + 15 <= deadline <= 32.0 + 30
    session.on_timer(deadline)
    assert session.outgoing() == [], "no REGISTER until a new flow is bound"
    session.bind(LOCAL)
    session.on_timer(deadline)
    assert registrar.take().method == "REGISTER"


def test_redirect_moves_the_target() -> None:
    session, registrar = started()
    registrar.answer(
        registrar.take(), 302, 0.1, Contact="<sip:reg2.example.com:5080;transport=tcp>"
    )
    assert str(session.target) == "sip:reg2.example.com:5080;transport=tcp"
    assert session.needs_flow
    session.bind(LocalAddress("tcp", "192.0.2.50", 40000))
    session.on_timer(0.1)
    assert str(registrar.take().uri) == "sip:reg2.example.com:5080;transport=tcp"


def test_dead_flow_while_registered_reregisters() -> None:
    session, registrar = started()
    registrar.answer(registrar.take(), 200, 0.1)
    session.transport_failed(50.0)
    assert session.needs_flow and session.deadline == 50.0
    session.bind(LOCAL)
    session.on_timer(50.0)
    assert registrar.take().cseq.number == 2


def test_unregister_sends_expires_zero_and_stops() -> None:
    session, registrar = started()
    registrar.answer(registrar.take(), 200, 0.1)
    session.stop(10.0)
    assert session.state is RegistrationState.UNREGISTERING
    bye = registrar.take()
    assert bye.expires == 0
    assert bye.contacts[0].params["expires"] == "0"
    registrar.answer(bye, 200, 10.1)
    assert session.state is RegistrationState.STOPPED
    assert session.deadline is None


def test_unregister_without_answer_still_stops() -> None:
    session, registrar = started()
    registrar.answer(registrar.take(), 200, 0.1)
    session.stop(10.0)
    registrar.take()
    session.on_timer(10.0 + 32.0)
    assert session.state is RegistrationState.STOPPED


def test_response_with_two_vias_is_discarded() -> None:
    session, registrar = started()
    req = registrar.take()
    req.headers.add("Via", "SIP/2.0/UDP 255.255.255.255;branch=z9hG4bK1saber23")
    registrar.answer(req, 200, 0.1)
    assert session.state is RegistrationState.REGISTERING


def test_status_reports_expiry_as_registering() -> None:
    session, registrar = started()
    registrar.answer(registrar.take(), 200, 0.0)
    assert session.status(10.0).state is RegistrationState.REGISTERED
    assert session.status(700.0).state is RegistrationState.REGISTERING


def test_password_never_in_repr_or_wire() -> None:
    session, registrar = started()
    registrar.answer(registrar.take(), 401, 0.1, WWW_Authenticate=CHALLENGE)
    sent = registrar.take().serialize()
    assert b"s3cret-pw" not in sent
    assert "s3cret-pw" not in repr(session.config)


def test_short_registrations_refresh_with_a_margin() -> None:
    """Registrars count in whole seconds: a 5 s binding is refreshed 2 s before it ends."""
    session, registrar = started(expires=5)
    registrar.answer(registrar.take(), 200, 10.0)
    assert session.deadline == pytest.approx(13.0)


def test_stop_while_a_register_is_pending_waits_for_its_answer() -> None:
    """RFC 3261 §10.2: one REGISTER in flight; the un-REGISTER follows the final answer."""
    session, registrar = started()
    pending = registrar.take()
    session.stop(0.1)
    assert session.state is RegistrationState.UNREGISTERING
    assert session.outgoing() == []
    registrar.answer(pending, 200, 0.2)
    unregister = registrar.take()
    assert unregister.expires == 0 and unregister.cseq.number == pending.cseq.number + 1
    registrar.answer(unregister, 200, 0.3)
    assert session.state is RegistrationState.STOPPED


def test_stop_while_a_register_is_pending_and_then_refused() -> None:
    session, registrar = started()
    pending = registrar.take()
    session.stop(0.1)
    registrar.answer(pending, 403, 0.2)
    assert session.state is RegistrationState.STOPPED
    assert session.outgoing() == []
