"""Digest authentication, server side: challenges, verdicts, nonces, replay, timing."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipis.sip.digest import (
    Challenge,
    Credentials,
    DigestClient,
    parse_challenge,
    parse_credentials,
    select_challenge,
)
from sipis.sip.digest_server import HA1_ALGORITHMS, DigestServer, Verdict, digest_ha1

KEY = bytes(range(32))
REALM = "sipis.example"
URI = "sip:sipis.example"
INSTANCE = "3f2a9c1e-instance"
SECRET = "hT3kQ9v_Zp2LmX8rW4yB7nC1dF6gJ0sA5eU-oIqRtYw"  # 43 characters, like a real one
NOW = 1_700_000_000.0
HASH_NAMES = {"MD5": "md5", "SHA-256": "sha256", "SHA-512-256": "sha512_256"}


def hex_hash(algorithm: str, text: str) -> str:
    return hashlib.new(HASH_NAMES[algorithm], text.encode()).hexdigest()


def stored_ha1(
    username: str = INSTANCE,
    password: str = SECRET,
    realm: str = REALM,
    algorithms: tuple[str, ...] = HA1_ALGORITHMS,
) -> dict[str, str]:
    """What sipis keeps for an instance: one HA1 per offered algorithm, computed by hand."""
    return {name: hex_hash(name, f"{username}:{realm}:{password}") for name in algorithms}


def offered(server: DigestServer, realm: str = REALM, now: float = NOW) -> list[Challenge]:
    return [parse_challenge(value) for value in server.challenges(realm, now)]


def pick(challenges: list[Challenge], algorithm: str) -> Challenge:
    (challenge,) = [c for c in challenges if c.algorithm == algorithm]
    return challenge


def client_answer(
    challenge: Challenge,
    client: DigestClient | None = None,
    *,
    method: str = "REGISTER",
    uri: str = URI,
) -> Credentials:
    client = client or DigestClient(INSTANCE, SECRET)
    return parse_credentials(client.authorize(challenge, method, uri))


def handmade(
    nonce: str,
    *,
    username: str = INSTANCE,
    realm: str = REALM,
    password: str = SECRET,
    method: str = "REGISTER",
    uri: str = URI,
    algorithm: str = "SHA-256",
    nc: str = "00000001",
    cnonce: str = "0a4f113b",
    qop: str | None = "auth",
    omit: tuple[str, ...] = (),
    extra: str = "",
) -> Credentials:
    """An Authorization value built from RFC 7616 §3.4.1 / RFC 2617 §3.2.2 by hand."""
    hash_algorithm = algorithm.removesuffix("-sess")
    ha1 = hex_hash(hash_algorithm, f"{username}:{realm}:{password}")
    if algorithm.endswith("-sess"):
        ha1 = hex_hash(hash_algorithm, f"{ha1}:{nonce}:{cnonce}")
    ha2 = hex_hash(hash_algorithm, f"{method}:{uri}")
    if qop is None:
        response = hex_hash(hash_algorithm, f"{ha1}:{nonce}:{ha2}")
    else:
        response = hex_hash(hash_algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    fields = {
        "username": f'"{username}"',
        "realm": f'"{realm}"',
        "nonce": f'"{nonce}"',
        "uri": f'"{uri}"',
        "response": f'"{response}"',
        "algorithm": algorithm,
        "cnonce": f'"{cnonce}"',
        "nc": nc,
        "qop": qop or "",
    }
    if qop is None:
        omit = (*omit, "qop", "nc", "cnonce")
    value = ", ".join(f"{name}={v}" for name, v in fields.items() if name not in omit)
    return parse_credentials(f"Digest {value}{extra}")


def verdict(
    server: DigestServer,
    credentials: Credentials,
    *,
    ha1: Mapping[str, str] | None = None,
    realm: str = REALM,
    uri: str = URI,
    method: str = "REGISTER",
    now: float = NOW,
) -> Verdict:
    return server.check(
        credentials,
        method=method,
        uri=uri,
        realm=realm,
        ha1=stored_ha1() if ha1 is None else ha1,
        now=now,
    )


# --- digest_ha1 -----------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256", "SHA-512-256"])
def test_digest_ha1_is_the_hash_of_username_realm_password(algorithm: str) -> None:
    expected = hex_hash(algorithm, f"{INSTANCE}:{REALM}:{SECRET}")
    assert digest_ha1(algorithm, INSTANCE, REALM, SECRET) == expected
    assert digest_ha1(algorithm.lower(), INSTANCE, REALM, SECRET) == expected


def test_digest_ha1_rfc7616_example() -> None:
    # RFC 7616 §3.9.1: Mufasa / http-auth@example.org / "Circle of Life".
    assert digest_ha1("MD5", "Mufasa", "http-auth@example.org", "Circle of Life") == (
        hashlib.md5(b"Mufasa:http-auth@example.org:Circle of Life").hexdigest()  # noqa: S324
    )


@pytest.mark.parametrize("algorithm", ["MD5-sess", "SHA-256-sess", "SHA-1", "", "md5 "])
def test_digest_ha1_rejects_session_and_unknown_algorithms(algorithm: str) -> None:
    with pytest.raises(ValueError, match="unsupported HA1 algorithm"):
        digest_ha1(algorithm, INSTANCE, REALM, SECRET)


def test_default_algorithms_offer_md5_then_sha256() -> None:
    assert HA1_ALGORITHMS == ("MD5", "SHA-256")
    assert DigestServer(KEY).algorithms == ("MD5", "SHA-256")


# --- construction ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"key": b"short"}, "at least 16 bytes"),
        ({"nonce_lifetime": 0.0}, "nonce_lifetime"),
        ({"nonce_lifetime": float("inf")}, "nonce_lifetime"),
        ({"nonce_lifetime": float("nan")}, "nonce_lifetime"),
        ({"tracked_nonces": 0}, "tracked_nonces"),
        ({"algorithms": ()}, "at least one algorithm"),
        ({"algorithms": ("MD5", "md5")}, "listed twice"),
        ({"algorithms": ("MD5-sess",)}, "unsupported HA1 algorithm"),
        ({"algorithms": ("SHA-1",)}, "unsupported HA1 algorithm"),
    ],
)
def test_constructor_rejects_bad_settings(kwargs: dict[str, Any], message: str) -> None:
    settings_ = {"key": KEY, **kwargs}
    with pytest.raises(ValueError, match=message):
        DigestServer(**settings_)


def test_repr_does_not_show_the_key() -> None:
    key = b"super secret nonce key 0123456789"
    text = repr(DigestServer(key))
    assert "super secret" not in text
    assert text == "DigestServer(algorithms=('MD5', 'SHA-256'), nonce_lifetime=300.0)"


# --- challenges -----------------------------------------------------------------


def test_challenges_one_per_algorithm_in_order_with_one_nonce() -> None:
    values = DigestServer(KEY).challenges(REALM, NOW)
    challenges = [parse_challenge(value) for value in values]
    assert [c.algorithm for c in challenges] == ["MD5", "SHA-256"]
    assert {c.nonce for c in challenges} == {challenges[0].nonce}
    assert len(challenges[0].nonce) == 48
    assert set(challenges[0].nonce) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )
    for challenge in challenges:
        assert challenge.is_digest
        assert challenge.realm == REALM
        assert challenge.qop == ("auth",)
        assert challenge.stale is False
        assert challenge.opaque is None
    nonce = challenges[0].nonce
    assert values[0] == f'Digest realm="{REALM}", nonce="{nonce}", algorithm=MD5, qop="auth"'
    assert values[1] == f'Digest realm="{REALM}", nonce="{nonce}", algorithm=SHA-256, qop="auth"'


def test_each_challenge_gets_a_new_nonce_even_in_the_same_millisecond() -> None:
    server = DigestServer(KEY)
    nonces = {offered(server)[0].nonce for _ in range(50)}
    assert len(nonces) == 50


def test_stale_challenges_say_so() -> None:
    values = DigestServer(KEY).challenges(REALM, NOW, stale=True)
    assert all(value.endswith(", stale=true") for value in values)
    assert all(parse_challenge(value).stale for value in values)


def test_realm_with_quote_and_backslash_is_escaped() -> None:
    realm = 'say "hi" \\ there'
    (value,) = DigestServer(KEY, algorithms=("MD5",)).challenges(realm, NOW)
    assert value.startswith('Digest realm="say \\"hi\\" \\\\ there", ')
    assert parse_challenge(value).realm == realm


@pytest.mark.parametrize("realm", ["a\r\nWWW-Authenticate: x", "nul\x00", "del\x7f", "lone\ud800"])
def test_unquotable_realm_is_refused(realm: str) -> None:
    with pytest.raises(ValueError, match="realm"):
        DigestServer(KEY).challenges(realm, NOW)


# --- round trips with sipis's own client -----------------------------------------


@pytest.mark.parametrize("algorithm", ["SHA-256", "MD5"])
def test_round_trip_with_digest_client(algorithm: str) -> None:
    server = DigestServer(KEY)
    credentials = client_answer(pick(offered(server), algorithm))
    assert credentials.params["algorithm"] == algorithm
    assert verdict(server, credentials) is Verdict.OK


def test_client_prefers_sha256_from_the_default_offer() -> None:
    server = DigestServer(KEY)
    chosen = select_challenge(offered(server))
    assert chosen is not None
    assert chosen.algorithm == "SHA-256"
    assert verdict(server, client_answer(chosen)) is Verdict.OK


def test_each_offered_algorithm_is_accepted() -> None:
    server = DigestServer(KEY)
    assert [c.algorithm for c in offered(server)] == ["MD5", "SHA-256"]
    for position in (0, 1):
        challenge = offered(server)[position]  # a fresh nonce for each answer
        credentials = client_answer(challenge)
        assert credentials.params["algorithm"] == challenge.algorithm
        assert verdict(server, credentials) is Verdict.OK


def test_sha512_256_round_trip_when_configured() -> None:
    algorithms = ("SHA-512-256", "SHA-256", "MD5")
    server = DigestServer(KEY, algorithms=algorithms)
    chosen = select_challenge(offered(server))
    assert chosen is not None
    assert chosen.algorithm == "SHA-512-256"
    ha1 = stored_ha1(algorithms=algorithms)
    assert verdict(server, client_answer(chosen), ha1=ha1) is Verdict.OK


def test_known_answer_vector() -> None:
    """Expected response written out with hashlib from RFC 2617 §3.2.2 / RFC 7616 §3.4.1."""
    server = DigestServer(KEY)
    challenge = pick(offered(server), "SHA-256")
    nonce = challenge.nonce
    cnonce = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"
    ha1 = hashlib.sha256(f"{INSTANCE}:{REALM}:{SECRET}".encode()).hexdigest()
    ha2 = hashlib.sha256(f"REGISTER:{URI}".encode()).hexdigest()
    expected = hashlib.sha256(f"{ha1}:{nonce}:00000001:{cnonce}:auth:{ha2}".encode()).hexdigest()

    client = DigestClient(INSTANCE, SECRET, cnonce_source=lambda: cnonce)
    credentials = client_answer(challenge, client)
    assert credentials.params["response"] == expected
    assert credentials.params["nc"] == "00000001"
    assert verdict(server, credentials, ha1={"SHA-256": ha1}) is Verdict.OK


def test_uppercase_response_hex_is_accepted() -> None:
    server = DigestServer(KEY)
    good = handmade(offered(server)[0].nonce)
    shouting = Credentials("Digest", {**good.params, "response": good.params["response"].upper()})
    assert shouting.params["response"] != good.params["response"]
    assert verdict(server, shouting) is Verdict.OK


def test_qop_token_is_case_insensitive_and_hashed_as_sent() -> None:
    server = DigestServer(KEY)
    nonce = offered(server)[0].nonce
    assert verdict(server, handmade(nonce, qop="AUTH", nc="0000000A")) is Verdict.OK


# --- INVALID ----------------------------------------------------------------------


def test_wrong_password_is_invalid() -> None:
    server = DigestServer(KEY)
    client = DigestClient(INSTANCE, SECRET[:-1] + "x")
    assert verdict(server, client_answer(offered(server)[0], client)) is Verdict.INVALID


def test_realm_other_than_the_challenged_one_is_invalid() -> None:
    server = DigestServer(KEY)
    credentials = client_answer(offered(server)[0])
    other = "other.example"
    assert verdict(server, credentials, realm=other, ha1=stored_ha1(realm=other)) is (
        Verdict.INVALID
    )


def test_nonce_issued_for_another_realm_is_invalid() -> None:
    server = DigestServer(KEY)
    nonce = offered(server, realm="a.example")[0].nonce
    # A correct answer for realm b.example, carrying a nonce made for a.example.
    credentials = handmade(nonce, realm="b.example")
    ha1 = stored_ha1(realm="b.example")
    assert verdict(server, credentials, realm="b.example", ha1=ha1) is Verdict.INVALID


def test_unknown_user_is_invalid() -> None:
    server = DigestServer(KEY)
    credentials = client_answer(offered(server)[0])
    assert (
        server.check(credentials, method="REGISTER", uri=URI, realm=REALM, ha1=None, now=NOW)
        is Verdict.INVALID
    )


def test_user_without_ha1_for_the_answered_algorithm_is_invalid() -> None:
    server = DigestServer(KEY)
    credentials = client_answer(pick(offered(server), "MD5"))
    only_sha256 = {"SHA-256": stored_ha1()["SHA-256"]}
    assert verdict(server, credentials, ha1=only_sha256) is Verdict.INVALID


@pytest.mark.parametrize("ha1", [None, {}])
def test_unknown_user_cannot_answer_with_any_guessable_ha1(ha1: Mapping[str, str] | None) -> None:
    """Whatever stands in for a missing HA1, matching it must not let anyone in."""
    server = DigestServer(KEY)
    nonce = offered(server)[0].nonce
    ha2 = hex_hash("SHA-256", f"REGISTER:{URI}")
    for guess in ("0" * 64, "", "f" * 64):
        response = hex_hash("SHA-256", f"{guess}:{nonce}:00000001:c:auth:{ha2}")
        credentials = parse_credentials(
            f'Digest username="nobody", realm="{REALM}", nonce="{nonce}", uri="{URI}", '
            f'response="{response}", algorithm=SHA-256, cnonce="c", nc=00000001, qop=auth'
        )
        result = server.check(
            credentials, method="REGISTER", uri=URI, realm=REALM, ha1=ha1, now=NOW
        )
        assert result is Verdict.INVALID


def record_work(
    monkeypatch: pytest.MonkeyPatch, run: Callable[[], Verdict]
) -> tuple[Verdict, list[str], list[tuple[int, int]]]:
    """Run ``run`` while counting hashlib.new calls and compare_digest argument sizes."""
    hashes: list[str] = []
    compares: list[tuple[int, int]] = []
    real_new, real_compare = hashlib.new, hmac.compare_digest

    def spy_new(name: str, *args: Any, **kwargs: Any) -> Any:
        hashes.append(name)
        return real_new(name, *args, **kwargs)

    def spy_compare(a: bytes, b: bytes) -> bool:
        compares.append((len(a), len(b)))
        return real_compare(a, b)

    with monkeypatch.context() as patch:
        patch.setattr(hashlib, "new", spy_new)
        patch.setattr(hmac, "compare_digest", spy_compare)
        result = run()
    return result, hashes, compares


@pytest.mark.parametrize("algorithm", ["SHA-256", "MD5"])
def test_unknown_user_costs_the_same_hashing_as_a_known_one(
    monkeypatch: pytest.MonkeyPatch, algorithm: str
) -> None:
    server = DigestServer(KEY)
    wrong = client_answer(pick(offered(server), algorithm), DigestClient(INSTANCE, "wrong"))
    stranger = client_answer(pick(offered(server), algorithm), DigestClient("nobody", "wrong"))

    def check(credentials: Credentials, ha1: Mapping[str, str] | None) -> Callable[[], Verdict]:
        return lambda: server.check(
            credentials, method="REGISTER", uri=URI, realm=REALM, ha1=ha1, now=NOW
        )

    known = record_work(monkeypatch, check(wrong, stored_ha1()))
    unknown = record_work(monkeypatch, check(stranger, None))
    missing = record_work(monkeypatch, check(stranger, {}))
    assert known[0] is unknown[0] is missing[0] is Verdict.INVALID
    # H(A2) and the response: two hashes of the answered algorithm on every path.
    assert known[1] == unknown[1] == missing[1] == [HASH_NAMES[algorithm]] * 2
    # Nonce MAC, then the response: the same comparisons with the same sizes.
    assert known[2] == unknown[2] == missing[2]
    assert len(known[2]) == 2


def test_tampered_nonce_is_invalid() -> None:
    server = DigestServer(KEY)
    nonce = offered(server)[0].nonce
    flipped = nonce[:20] + ("A" if nonce[20] != "A" else "B") + nonce[21:]
    assert verdict(server, handmade(flipped)) is Verdict.INVALID


@pytest.mark.parametrize(
    "nonce",
    ["", "abc", "x" * 48, "+" * 48, "A" * 47 + "=", "dcd98b7102dd2f0e8b11d0f600bfb0c093"],
)
def test_malformed_nonce_is_invalid(nonce: str) -> None:
    assert verdict(DigestServer(KEY), handmade(nonce)) is Verdict.INVALID


def test_nonce_from_another_key_is_invalid() -> None:
    other = DigestServer(b"another key, also 32 bytes long!")
    nonce = offered(other)[0].nonce
    assert verdict(DigestServer(KEY), handmade(nonce)) is Verdict.INVALID


def test_nonce_from_the_future_is_invalid_beyond_small_skew() -> None:
    server = DigestServer(KEY)
    late = offered(server, now=NOW + 10)[0].nonce
    assert verdict(server, handmade(late), now=NOW) is Verdict.INVALID
    near = offered(server, now=NOW + 1)[0].nonce
    assert verdict(server, handmade(near), now=NOW) is Verdict.OK


def test_uri_other_than_the_request_uri_is_invalid() -> None:
    server = DigestServer(KEY)
    credentials = client_answer(offered(server)[0], uri="sip:elsewhere.example")
    assert verdict(server, credentials, uri=URI) is Verdict.INVALID


def test_method_other_than_the_answered_one_is_invalid() -> None:
    server = DigestServer(KEY)
    credentials = client_answer(offered(server)[0], method="INVITE")
    assert verdict(server, credentials, method="REGISTER") is Verdict.INVALID


def test_answer_without_qop_is_invalid_even_when_correct_for_rfc2069() -> None:
    server = DigestServer(KEY)
    nonce = offered(server)[0].nonce
    assert verdict(server, handmade(nonce, qop=None)) is Verdict.INVALID
    # The same server accepts the qop form of the same answer.
    assert verdict(server, handmade(nonce)) is Verdict.OK


@pytest.mark.parametrize(
    "changes",
    [
        {"omit": ("qop",)},
        {"omit": ("nc",)},
        {"omit": ("cnonce",)},
        {"cnonce": ""},
        {"omit": ("username",)},
        {"omit": ("response",)},
        {"omit": ("uri",)},
        {"omit": ("realm",)},
        {"qop": "auth-int"},
        {"qop": "token"},
        {"nc": "1"},
        {"nc": "000000001"},
        {"nc": "0000000g"},
        {"algorithm": "SHA-512-256"},
        {"algorithm": "MD5-sess"},
        {"algorithm": "SHA-256-sess"},
        {"extra": ", userhash=true"},
    ],
)
def test_answers_this_server_does_not_accept_are_invalid(changes: dict[str, Any]) -> None:
    server = DigestServer(KEY)
    nonce = offered(server)[0].nonce
    assert verdict(server, handmade(nonce, **changes)) is Verdict.INVALID
    assert verdict(server, handmade(nonce)) is Verdict.OK


def test_userhash_answer_from_the_client_is_invalid() -> None:
    server = DigestServer(KEY)
    challenge = parse_challenge(offered(server)[0].raw + ", userhash=true")
    credentials = client_answer(challenge)
    assert credentials.params["userhash"] == "true"
    assert verdict(server, credentials) is Verdict.INVALID


def test_missing_algorithm_means_md5() -> None:
    server = DigestServer(KEY)
    nonce = offered(server)[0].nonce
    md5 = handmade(nonce, algorithm="MD5", omit=("algorithm",))
    assert "algorithm" not in md5.params
    assert verdict(server, md5) is Verdict.OK
    sha_only = DigestServer(KEY, algorithms=("SHA-256",))
    other_nonce = offered(sha_only)[0].nonce
    md5_to_sha_only = handmade(other_nonce, algorithm="MD5", omit=("algorithm",))
    assert verdict(sha_only, md5_to_sha_only) is Verdict.INVALID


def test_other_scheme_is_invalid() -> None:
    credentials = parse_credentials('Basic realm="sipis.example", token="abc"')
    assert verdict(DigestServer(KEY), credentials) is Verdict.INVALID


# --- stale nonces ---------------------------------------------------------------


def test_expired_nonce_is_stale_then_the_fresh_one_works() -> None:
    server = DigestServer(KEY, nonce_lifetime=300.0)
    client = DigestClient(INSTANCE, SECRET)
    old = pick(offered(server), "SHA-256")
    assert verdict(server, client_answer(old, client), now=NOW + 300) is Verdict.OK
    later = NOW + 301
    assert verdict(server, client_answer(old, client), now=later) is Verdict.STALE

    renewed = [parse_challenge(v) for v in server.challenges(REALM, later, stale=True)]
    chosen = select_challenge(renewed)
    assert chosen is not None
    assert chosen.stale
    assert chosen.nonce != old.nonce
    assert verdict(server, client_answer(chosen, client), now=later) is Verdict.OK


def test_expired_nonce_with_wrong_password_is_invalid_not_stale() -> None:
    server = DigestServer(KEY)
    credentials = client_answer(offered(server)[0], DigestClient(INSTANCE, "wrong"))
    assert verdict(server, credentials, now=NOW + 1000) is Verdict.INVALID


def test_expired_nonce_stays_stale() -> None:
    server = DigestServer(KEY)
    nonce = offered(server)[0].nonce
    assert verdict(server, handmade(nonce, nc="00000001"), now=NOW + 400) is Verdict.STALE
    assert verdict(server, handmade(nonce, nc="00000002"), now=NOW + 400) is Verdict.STALE


# --- nonce counts ---------------------------------------------------------------


def test_replayed_request_is_invalid() -> None:
    server = DigestServer(KEY)
    credentials = client_answer(offered(server)[0])
    assert verdict(server, credentials) is Verdict.OK
    assert verdict(server, credentials) is Verdict.INVALID


def test_increasing_nonce_counts_are_accepted() -> None:
    server = DigestServer(KEY)
    challenge = offered(server)[0]
    client = DigestClient(INSTANCE, SECRET)
    for expected_nc in ("00000001", "00000002", "00000003"):
        credentials = client_answer(challenge, client)
        assert credentials.params["nc"] == expected_nc
        assert verdict(server, credentials, now=NOW + 10) is Verdict.OK


def test_counts_may_skip_but_never_go_back() -> None:
    server = DigestServer(KEY)
    nonce = offered(server)[0].nonce
    assert verdict(server, handmade(nonce, nc="00000005")) is Verdict.OK
    assert verdict(server, handmade(nonce, nc="00000003")) is Verdict.INVALID
    assert verdict(server, handmade(nonce, nc="00000005")) is Verdict.INVALID
    assert verdict(server, handmade(nonce, nc="0000000A")) is Verdict.OK
    assert verdict(server, handmade(nonce, nc="0000000b")) is Verdict.OK


def test_wrong_answer_does_not_advance_the_count() -> None:
    server = DigestServer(KEY)
    nonce = offered(server)[0].nonce
    forged = handmade(nonce, nc="ffffffff", password="guess")
    assert verdict(server, forged) is Verdict.INVALID
    assert verdict(server, handmade(nonce, nc="00000001")) is Verdict.OK


def test_counts_are_kept_per_nonce() -> None:
    server = DigestServer(KEY)
    first, second = offered(server)[0].nonce, offered(server)[0].nonce
    assert verdict(server, handmade(first, nc="00000002")) is Verdict.OK
    assert verdict(server, handmade(second, nc="00000001")) is Verdict.OK


def test_evicted_nonce_is_stale() -> None:
    server = DigestServer(KEY, tracked_nonces=2)
    first = pick(offered(server), "MD5")
    second = pick(offered(server), "MD5")
    third = pick(offered(server), "MD5")
    assert verdict(server, client_answer(first)) is Verdict.STALE
    assert verdict(server, client_answer(second)) is Verdict.OK
    assert verdict(server, client_answer(third)) is Verdict.OK


def test_eviction_drops_the_least_recently_used_nonce() -> None:
    server = DigestServer(KEY, tracked_nonces=2)
    a = offered(server)[0].nonce
    b = offered(server)[0].nonce
    assert verdict(server, handmade(a, nc="00000001")) is Verdict.OK  # a is now the newest
    offered(server)  # a third nonce pushes out b
    assert verdict(server, handmade(b, nc="00000001")) is Verdict.STALE
    assert verdict(server, handmade(a, nc="00000002")) is Verdict.OK


def test_nonce_from_a_restarted_server_with_the_same_key_is_stale() -> None:
    nonce = offered(DigestServer(KEY))[0].nonce
    assert verdict(DigestServer(KEY), handmade(nonce)) is Verdict.STALE


# --- property ---------------------------------------------------------------------

SAFE_NAME = st.text(
    alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~"),
    min_size=1,
    max_size=40,
)
SAFE_REALM = st.text(
    alphabet=st.sampled_from('abcdefghijklmnopqrstuvwxyz0123456789-. "\\@é'),
    min_size=1,
    max_size=40,
)
SAFE_PASSWORD = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("éß€"),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(
    username=SAFE_NAME,
    realm=SAFE_REALM,
    password=SAFE_PASSWORD,
    algorithm=st.sampled_from(["SHA-256", "MD5"]),
)
def test_any_safe_identity_round_trips(
    username: str, realm: str, password: str, algorithm: str
) -> None:
    server = DigestServer(KEY)
    ha1 = {name: digest_ha1(name, username, realm, password) for name in server.algorithms}
    challenge = pick([parse_challenge(v) for v in server.challenges(realm, NOW)], algorithm)
    assert challenge.realm == realm
    client = DigestClient(username, password)
    credentials = parse_credentials(client.authorize(challenge, "REGISTER", URI))
    assert credentials.params["username"] == username
    result = server.check(credentials, method="REGISTER", uri=URI, realm=realm, ha1=ha1, now=NOW)
    assert result is Verdict.OK
    impostor = DigestClient(username, password + "!")
    wrong = server.check(
        parse_credentials(impostor.authorize(challenge, "REGISTER", URI)),
        method="REGISTER",
        uri=URI,
        realm=realm,
        ha1=ha1,
        now=NOW,
    )
    assert wrong is Verdict.INVALID


def test_a_digest_uri_without_the_request_uri_parameters_names_the_same_target() -> None:
    server = DigestServer(KEY)
    challenge = offered(server)[0]
    credentials = client_answer(challenge)  # answered for the uri the helper uses
    answered = credentials.params["uri"]
    assert verdict(server, credentials, uri=f"{answered};transport=TCP") is Verdict.OK
    other = client_answer(offered(server)[0])
    assert verdict(server, other, uri="sip:elsewhere.example;transport=TCP") is Verdict.INVALID
