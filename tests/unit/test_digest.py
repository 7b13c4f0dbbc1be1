"""Digest authentication: RFC test vectors, challenge handling, parser robustness."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipis.sip.digest import (
    MAX_AUTH_PARAMS,
    Challenge,
    DigestClient,
    parse_challenge,
    parse_credentials,
    select_challenge,
)
from sipis.sip.errors import SipError

# RFC 7616 §3.9.1: one document, challenged with SHA-256 and with MD5.
RFC7616_NONCE = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
RFC7616_OPAQUE = "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"
RFC7616_CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"

# RFC 7616 §3.9.2: SHA-512-256 with userhash.
RFC7616_USERHASH_NONCE = "5TsQWLVdgBdmrQ0XsxbDODV+57QdFR34I9HAbC/RVvkK"
RFC7616_USERHASH_OPAQUE = "HRPCssKJSGjCrkzDg8OhwpzCiGPChXYjwrI2QmXDnsOS"
RFC7616_USERHASH_CNONCE = "NTg6RKcb9boFIAS3KrFK9BGeh+iDa/sm6jUMp2wds69v"

# RFC 2069 §2.4 / RFC 2617 §3.5 share realm, nonce and opaque.
RFC2617_NONCE = "dcd98b7102dd2f0e8b11d0f600bfb0c093"
RFC2617_OPAQUE = "5ccc069c403ebaf9f0171e9517f40e41"


def fixed(*values: str) -> Callable[[], str]:
    """A cnonce source handing out ``values`` in order, failing when they run out."""
    remaining: Iterator[str] = iter(values)
    return lambda: next(remaining)


def hex_hash(hash_name: str, data: str | bytes) -> str:
    return hashlib.new(hash_name, data.encode() if isinstance(data, str) else data).hexdigest()


def expected_response(
    hash_name: str,
    *,
    username: str,
    realm: str,
    password: str,
    nonce: str,
    method: str,
    uri: str,
    qop: str | None = None,
    nc: str = "",
    cnonce: str = "",
    session: bool = False,
    body: bytes = b"",
) -> str:
    """RFC 7616 §3.4 / RFC 2617 §3.2.2 written out step by step, as an oracle."""

    def h(data: str | bytes) -> str:
        return hex_hash(hash_name, data)

    ha1 = h(f"{username}:{realm}:{password}")
    if session:
        ha1 = h(f"{ha1}:{nonce}:{cnonce}")
    a2 = f"{method}:{uri}:{h(body)}" if qop == "auth-int" else f"{method}:{uri}"
    if qop is None:
        return h(f"{ha1}:{nonce}:{h(a2)}")
    return h(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{h(a2)}")


def answer_params(header_value: str) -> dict[str, str]:
    credentials = parse_credentials(header_value)
    assert credentials.scheme == "Digest"
    return dict(credentials.params)


# --- RFC test vectors ---------------------------------------------------------------------------


def rfc7616_challenge(algorithm: str) -> Challenge:
    return parse_challenge(
        'Digest realm="http-auth@example.org", qop="auth, auth-int", '
        f'algorithm={algorithm}, nonce="{RFC7616_NONCE}", opaque="{RFC7616_OPAQUE}"'
    )


def test_rfc7616_md5_vector() -> None:
    client = DigestClient("Mufasa", "Circle of Life", cnonce_source=fixed(RFC7616_CNONCE))
    value = client.authorize(rfc7616_challenge("MD5"), "GET", "/dir/index.html")
    assert value == (
        'Digest username="Mufasa", realm="http-auth@example.org", '
        f'nonce="{RFC7616_NONCE}", uri="/dir/index.html", '
        'response="8ca523f5e9506fed4657c9700eebdbec", algorithm=MD5, '
        f'cnonce="{RFC7616_CNONCE}", nc=00000001, qop=auth, opaque="{RFC7616_OPAQUE}"'
    )


def test_rfc7616_sha256_vector() -> None:
    client = DigestClient("Mufasa", "Circle of Life", cnonce_source=fixed(RFC7616_CNONCE))
    value = client.authorize(rfc7616_challenge("SHA-256"), "GET", "/dir/index.html")
    assert answer_params(value) == {
        "username": "Mufasa",
        "realm": "http-auth@example.org",
        "nonce": RFC7616_NONCE,
        "uri": "/dir/index.html",
        "response": "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
        "algorithm": "SHA-256",
        "cnonce": RFC7616_CNONCE,
        "nc": "00000001",
        "qop": "auth",
        "opaque": RFC7616_OPAQUE,
    }


def rfc7616_userhash_challenge() -> Challenge:
    return parse_challenge(
        'Digest realm="api@example.org", qop="auth", algorithm=SHA-512-256, '
        f'nonce="{RFC7616_USERHASH_NONCE}", opaque="{RFC7616_USERHASH_OPAQUE}", '
        "charset=UTF-8, userhash=true"
    )


def test_rfc7616_sha512_256_userhash_vector() -> None:
    """RFC 7616 §3.9.2 inputs; the expected values are true SHA-512/256.

    The RFC prints username 488869... and response ae66e67d..., which are a
    SHA-512 digest cut to 256 bits (erratum 4897); see the next test.
    """
    challenge = rfc7616_userhash_challenge()
    assert challenge.userhash is True
    assert challenge.params["charset"] == "UTF-8"
    client = DigestClient(
        "J\u00e4s\u00f8n Doe", "Secret, or not?", cnonce_source=fixed(RFC7616_USERHASH_CNONCE)
    )
    value = client.authorize(challenge, "GET", "/doe.json")
    assert answer_params(value) == {
        "username": "793263caabb707a56211940d90411ea4a575adeccb7e360aeb624ed06ece9b0b",
        "realm": "api@example.org",
        "nonce": RFC7616_USERHASH_NONCE,
        "uri": "/doe.json",
        "response": "3798d4131c277846293534c3edc11bd8a5e4cdcbff78b05db9d95eeb1cec68a5",
        "algorithm": "SHA-512-256",
        "cnonce": RFC7616_USERHASH_CNONCE,
        "nc": "00000001",
        "qop": "auth",
        "opaque": RFC7616_USERHASH_OPAQUE,
        "userhash": "true",
    }


def test_rfc7616_printed_userhash_values_are_truncated_sha512() -> None:
    """Why the vector above differs from the RFC text: it used SHA-512, cut short."""
    user_realm = "J\u00e4s\u00f8n Doe:api@example.org".encode()
    assert hashlib.sha512(user_realm).hexdigest()[:64] == (
        "488869477bf257147b804c45308cd62ac4e25eb717b12b298c79e62dcea254ec"
    )
    assert hashlib.new("sha512_256", user_realm).hexdigest() == (
        "793263caabb707a56211940d90411ea4a575adeccb7e360aeb624ed06ece9b0b"
    )


def test_sha512_256_is_the_fips_function_not_truncated_sha512() -> None:
    # FIPS 180-4 example: SHA-512/256("abc").
    assert hashlib.new("sha512_256", b"abc").hexdigest() == (
        "53048e2681941ef99b2e29b76b4c7dabe4c2d0c634fc6d46e0e2f13107e7af23"
    )


def test_rfc2069_md5_without_qop() -> None:
    """RFC 2069 §2.4 (response value as corrected by its erratum)."""
    challenge = parse_challenge(
        f'Digest realm="testrealm@host.com", nonce="{RFC2617_NONCE}", opaque="{RFC2617_OPAQUE}"'
    )
    assert challenge.algorithm == "MD5"
    assert challenge.qop == ()
    client = DigestClient("Mufasa", "CircleOfLife", cnonce_source=fixed())
    value = client.authorize(challenge, "GET", "/dir/index.html")
    assert answer_params(value) == {
        "username": "Mufasa",
        "realm": "testrealm@host.com",
        "nonce": RFC2617_NONCE,
        "uri": "/dir/index.html",
        "response": "1949323746fe6a43ef61f9606e7febea",
        "algorithm": "MD5",
        "opaque": RFC2617_OPAQUE,
    }


def test_rfc2617_md5_with_qop_auth() -> None:
    challenge = parse_challenge(
        'Digest realm="testrealm@host.com", qop="auth,auth-int", '
        f'nonce="{RFC2617_NONCE}", opaque="{RFC2617_OPAQUE}"'
    )
    client = DigestClient("Mufasa", "Circle Of Life", cnonce_source=fixed("0a4f113b"))
    params = answer_params(client.authorize(challenge, "GET", "/dir/index.html"))
    assert params["response"] == "6629fae49393a05397450978507c4ef1"
    assert (params["qop"], params["nc"], params["cnonce"]) == ("auth", "00000001", "0a4f113b")


# --- SIP use ------------------------------------------------------------------------------------

RFC3261_CHALLENGE = (
    'Digest realm="atlanta.com", domain="sip:boxesbybob.com", qop="auth", '
    'nonce="f84f1cec41e6cbe5aea9c8e88d359", opaque="", stale=FALSE, algorithm=MD5'
)


def test_rfc3261_challenge_fields() -> None:
    challenge = parse_challenge(RFC3261_CHALLENGE)
    assert challenge == Challenge(
        scheme="Digest",
        realm="atlanta.com",
        nonce="f84f1cec41e6cbe5aea9c8e88d359",
        algorithm="MD5",
        qop=("auth",),
        opaque="",
        stale=False,
        userhash=False,
        domain=("sip:boxesbybob.com",),
    )
    assert challenge.raw == RFC3261_CHALLENGE
    assert challenge.params == {
        "realm": "atlanta.com",
        "domain": "sip:boxesbybob.com",
        "qop": "auth",
        "nonce": "f84f1cec41e6cbe5aea9c8e88d359",
        "opaque": "",
        "stale": "FALSE",
        "algorithm": "MD5",
    }


def test_register_answer_echoes_empty_opaque() -> None:
    client = DigestClient("bob", "zanzibar", cnonce_source=fixed("c0ffee"))
    params = answer_params(
        client.authorize(parse_challenge(RFC3261_CHALLENGE), "REGISTER", "sip:atlanta.com")
    )
    assert params["opaque"] == ""
    assert params["uri"] == "sip:atlanta.com"
    assert params["response"] == expected_response(
        "md5",
        username="bob",
        realm="atlanta.com",
        password="zanzibar",
        nonce="f84f1cec41e6cbe5aea9c8e88d359",
        method="REGISTER",
        uri="sip:atlanta.com",
        qop="auth",
        nc="00000001",
        cnonce="c0ffee",
    )


def test_no_opaque_means_none_echoed() -> None:
    challenge = parse_challenge('Digest realm="r", nonce="n"')
    assert challenge.opaque is None
    value = DigestClient("u", "p").authorize(challenge, "REGISTER", "sip:r")
    assert "opaque" not in answer_params(value)


def test_proxy_authenticate_is_answered_the_same_way() -> None:
    challenge = parse_challenge(
        'Digest realm="biloxi.com", qop="auth", nonce="b7c9036dbf357f7683f054aea940e", '
        'algorithm=SHA-256, opaque="a1b2"'
    )
    client = DigestClient("alice", "wonderland", cnonce_source=fixed("9d2a"))
    params = answer_params(client.authorize(challenge, "INVITE", "sip:bob@biloxi.com"))
    assert params["algorithm"] == "SHA-256"
    assert params["opaque"] == "a1b2"
    assert params["response"] == expected_response(
        "sha256",
        username="alice",
        realm="biloxi.com",
        password="wonderland",
        nonce="b7c9036dbf357f7683f054aea940e",
        method="INVITE",
        uri="sip:bob@biloxi.com",
        qop="auth",
        nc="00000001",
        cnonce="9d2a",
    )


@pytest.mark.parametrize(
    ("algorithm", "hash_name"), [("MD5-sess", "md5"), ("SHA-256-sess", "sha256")]
)
def test_sess_keeps_the_cnonce_for_the_life_of_the_nonce(algorithm: str, hash_name: str) -> None:
    challenge = parse_challenge(
        f'Digest realm="atlanta.com", nonce="n0nce", qop="auth", algorithm={algorithm.lower()}'
    )
    assert challenge.algorithm == algorithm
    client = DigestClient("bob", "zanzibar", cnonce_source=fixed("first", "second"))
    first = answer_params(client.authorize(challenge, "REGISTER", "sip:atlanta.com"))
    again = answer_params(client.authorize(challenge, "REGISTER", "sip:atlanta.com"))
    assert (first["cnonce"], first["nc"]) == ("first", "00000001")
    assert (again["cnonce"], again["nc"]) == ("first", "00000002")
    for params in (first, again):
        assert params["algorithm"] == algorithm
        assert params["response"] == expected_response(
            hash_name,
            username="bob",
            realm="atlanta.com",
            password="zanzibar",
            nonce="n0nce",
            method="REGISTER",
            uri="sip:atlanta.com",
            qop="auth",
            nc=params["nc"],
            cnonce="first",
            session=True,
        )
    plain = expected_response(
        hash_name,
        username="bob",
        realm="atlanta.com",
        password="zanzibar",
        nonce="n0nce",
        method="REGISTER",
        uri="sip:atlanta.com",
        qop="auth",
        nc="00000001",
        cnonce="first",
    )
    assert first["response"] != plain


def test_sess_gets_a_new_cnonce_with_a_new_nonce() -> None:
    client = DigestClient("bob", "zanzibar", cnonce_source=fixed("c1", "c2"))
    sess = 'Digest realm="r", qop="auth", algorithm=MD5-sess, nonce='
    first = answer_params(client.authorize(parse_challenge(sess + "n1"), "REGISTER", "sip:r"))
    second = answer_params(client.authorize(parse_challenge(sess + "n2"), "REGISTER", "sip:r"))
    assert (first["cnonce"], second["cnonce"]) == ("c1", "c2")
    assert second["nc"] == "00000001"


def test_auth_int_hashes_the_body() -> None:
    body = b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\n"
    challenge = parse_challenge('Digest realm="atlanta.com", nonce="abc", qop="auth-int"')
    client = DigestClient("bob", "zanzibar", cnonce_source=fixed("c1", "c2"))
    params = answer_params(client.authorize(challenge, "INVITE", "sip:bob@atlanta.com", body))
    assert params["qop"] == "auth-int"

    def oracle(nc: str, cnonce: str, body: bytes) -> str:
        return expected_response(
            "md5",
            username="bob",
            realm="atlanta.com",
            password="zanzibar",
            nonce="abc",
            method="INVITE",
            uri="sip:bob@atlanta.com",
            qop="auth-int",
            nc=nc,
            cnonce=cnonce,
            body=body,
        )

    assert params["response"] == oracle("00000001", "c1", body)
    empty = answer_params(client.authorize(challenge, "INVITE", "sip:bob@atlanta.com"))
    assert empty["response"] == oracle("00000002", "c2", b"")
    assert empty["response"] != oracle("00000002", "c2", body)


def test_auth_is_preferred_over_auth_int() -> None:
    challenge = parse_challenge('Digest realm="r", nonce="n", qop="auth-int, auth"')
    assert challenge.qop == ("auth-int", "auth")
    params = answer_params(DigestClient("u", "p").authorize(challenge, "REGISTER", "sip:r", b"x"))
    assert params["qop"] == "auth"


def test_nc_counts_per_nonce_and_restarts_on_a_new_one() -> None:
    client = DigestClient("bob", "zanzibar")
    first = parse_challenge('Digest realm="atlanta.com", nonce="one", qop="auth"')
    second = parse_challenge('Digest realm="atlanta.com", nonce="two", qop="auth", stale=true')

    def nc_of(challenge: Challenge) -> str:
        return answer_params(client.authorize(challenge, "REGISTER", "sip:atlanta.com"))["nc"]

    assert [nc_of(first) for _ in range(3)] == ["00000001", "00000002", "00000003"]
    assert [nc_of(second) for _ in range(2)] == ["00000001", "00000002"]
    assert nc_of(first) == "00000004"


def test_nc_is_hexadecimal() -> None:
    client = DigestClient("u", "p")
    challenge = parse_challenge('Digest realm="r", nonce="n", qop=auth')
    ncs = [answer_params(client.authorize(challenge, "REGISTER", "sip:r"))["nc"] for _ in range(16)]
    assert ncs[9:11] == ["0000000a", "0000000b"]
    assert ncs[-1] == "00000010"


def test_only_a_few_nonces_are_remembered() -> None:
    client = DigestClient("u", "p")

    def nc_for(nonce: str) -> str:
        challenge = parse_challenge(f'Digest realm="r", nonce="{nonce}", qop=auth')
        return answer_params(client.authorize(challenge, "REGISTER", "sip:r"))["nc"]

    assert nc_for("old") == "00000001"
    assert nc_for("old") == "00000002"
    for index in range(7):
        nc_for(f"other-{index}")
    assert nc_for("old") == "00000003"
    nc_for("newest")  # evicts the least recently used, other-0, not "old"
    assert nc_for("old") == "00000004"
    assert nc_for("other-0") == "00000001"
    for index in range(8):
        nc_for(f"newer-{index}")
    assert nc_for("old") == "00000001"


def test_plain_algorithms_use_a_fresh_cnonce_per_request() -> None:
    client = DigestClient("u", "p", cnonce_source=fixed("c1", "c2"))
    challenge = parse_challenge('Digest realm="r", nonce="n", qop="auth"')
    cnonces = [
        answer_params(client.authorize(challenge, "REGISTER", "sip:r"))["cnonce"] for _ in range(2)
    ]
    assert cnonces == ["c1", "c2"]


def test_default_cnonce_is_random_hex() -> None:
    client = DigestClient("u", "p")
    challenge = parse_challenge('Digest realm="r", nonce="n", qop="auth"')
    cnonces = [
        answer_params(client.authorize(challenge, "REGISTER", "sip:r"))["cnonce"] for _ in range(2)
    ]
    for cnonce in cnonces:
        assert len(cnonce) == 32
        assert set(cnonce) <= set("0123456789abcdef")
    assert cnonces[0] != cnonces[1]


@pytest.mark.parametrize(
    ("text", "stale"),
    [("stale=true", True), ('stale="TRUE"', True), ("stale=FALSE", False), ("stale=yes", False)],
)
def test_stale_flag(text: str, stale: bool) -> None:
    assert parse_challenge(f'Digest realm="r", nonce="n", {text}').stale is stale


def test_stale_defaults_to_false() -> None:
    assert parse_challenge('Digest realm="r", nonce="n"').stale is False


def test_quoted_values_round_trip_through_the_answer() -> None:
    challenge = parse_challenge(r'Digest realm="a \"b\" \\c", nonce="n\\1", qop="auth"')
    assert (challenge.realm, challenge.nonce) == ('a "b" \\c', "n\\1")
    client = DigestClient('us"er', "p", cnonce_source=fixed("c"))
    value = client.authorize(challenge, "REGISTER", "sip:r")
    assert r'realm="a \"b\" \\c"' in value
    params = answer_params(value)
    assert (params["realm"], params["nonce"], params["username"]) == ('a "b" \\c', "n\\1", 'us"er')
    assert params["response"] == expected_response(
        "md5",
        username='us"er',
        realm='a "b" \\c',
        password="p",
        nonce="n\\1",
        method="REGISTER",
        uri="sip:r",
        qop="auth",
        nc="00000001",
        cnonce="c",
    )


def test_unanswerable_challenge_is_refused() -> None:
    client = DigestClient("u", "p")
    for value in (
        'Digest realm="r", nonce="n", algorithm=AKAv1-MD5',
        'Digest realm="r", nonce="n", qop="auth-conf"',
        'Digest realm="r", nonce="n", algorithm=MD5-sess',
        'Bearer realm="r"',
    ):
        challenge = parse_challenge(value)
        assert challenge.answerable is False
        with pytest.raises(SipError, match="cannot answer"):
            client.authorize(challenge, "REGISTER", "sip:r")


# --- choosing among challenges -----------------------------------------------------------------


def digest(algorithm: str, *, qop: str = "auth", realm: str = "r") -> Challenge:
    return parse_challenge(f'Digest realm="{realm}", nonce="n", qop="{qop}", algorithm={algorithm}')


def test_strongest_challenge_wins_whatever_the_order() -> None:
    offered = [digest("MD5"), digest("SHA-512-256"), digest("SHA-256")]
    for rotation in range(3):
        ordered = offered[rotation:] + offered[:rotation]
        chosen = select_challenge(ordered)
        assert chosen is not None
        assert chosen.algorithm == "SHA-512-256"
    assert select_challenge([digest("MD5"), digest("SHA-256")]) == digest("SHA-256")


def test_sess_variants_rank_with_their_hash_and_ties_keep_server_order() -> None:
    chosen = select_challenge([digest("MD5"), digest("SHA-256-sess"), digest("SHA-256")])
    assert chosen is not None
    assert chosen.algorithm == "SHA-256-sess"
    chosen = select_challenge([digest("SHA-256", realm="first"), digest("SHA-256-sess")])
    assert chosen is not None
    assert chosen.realm == "first"


def test_unsupported_challenges_are_passed_over() -> None:
    unusable = [
        parse_challenge('Basic realm="r"'),
        digest("SHA-1"),
        digest("SHA-512-256", qop="auth-conf"),
        parse_challenge('Digest realm="r", nonce="n", algorithm=SHA-256-sess'),
    ]
    assert select_challenge(unusable) is None
    assert select_challenge([*unusable, digest("MD5")]) == digest("MD5")
    assert select_challenge([]) is None


def test_non_digest_scheme_parses_but_is_never_chosen() -> None:
    challenge = parse_challenge('Bearer realm="sip.example.com", scope="reg"')
    assert challenge.scheme == "Bearer"
    assert challenge.is_digest is False
    assert challenge.realm == "sip.example.com"
    assert challenge.nonce == ""
    assert challenge.params == {"realm": "sip.example.com", "scope": "reg"}
    assert select_challenge([challenge]) is None


# --- parsing ------------------------------------------------------------------------------------


def test_lws_around_equals_and_commas() -> None:
    challenge = parse_challenge(
        ' digest  realm = "atlanta.com" ,\tnonce=\t"x" ,qop = auth ,  ALGORITHM = sha-512-256-SESS '
    )
    assert challenge.scheme == "Digest", "the scheme is case-insensitive"
    assert challenge.is_digest
    assert (challenge.realm, challenge.nonce, challenge.qop) == ("atlanta.com", "x", ("auth",))
    assert challenge.algorithm == "SHA-512-256-sess"


def test_unknown_params_are_kept_and_names_lowercased() -> None:
    challenge = parse_challenge(
        'Digest Realm="r", NONCE="n", x-vendor="a, b", charset=UTF-8, QOP="Auth"'
    )
    assert challenge.realm == "r"
    assert challenge.qop == ("auth",)
    assert challenge.params == {
        "realm": "r",
        "nonce": "n",
        "x-vendor": "a, b",
        "charset": "UTF-8",
        "qop": "Auth",
    }


def test_unknown_algorithm_is_kept_as_sent() -> None:
    challenge = parse_challenge('Digest realm="r", nonce="n", algorithm=AKAv1-MD5')
    assert challenge.algorithm == "AKAv1-MD5"
    assert challenge.answerable is False


def test_domain_lists_uris() -> None:
    challenge = parse_challenge(
        'Digest realm="r", nonce="n", domain="sip:a.example.com  sip:b.example.com"'
    )
    assert challenge.domain == ("sip:a.example.com", "sip:b.example.com")


def test_params_are_read_only() -> None:
    challenge = parse_challenge('Digest realm="r", nonce="n"')
    with pytest.raises(TypeError):
        challenge.params["realm"] = "other"  # type: ignore[index]


def test_non_ascii_quoted_text() -> None:
    challenge = parse_challenge('Digest realm="caf\u00e9 \u4e2d", nonce="n"')
    assert challenge.realm == "caf\u00e9 \u4e2d"


def test_max_params() -> None:
    extra = ", ".join(f"p{index}=v" for index in range(MAX_AUTH_PARAMS - 2))
    assert len(parse_challenge(f'Digest realm="r", nonce="n", {extra}').params) == MAX_AUTH_PARAMS
    with pytest.raises(SipError, match="more than"):
        parse_challenge(f'Digest realm="r", nonce="n", {extra}, one=more')


MALFORMED = [
    "",
    "   ",
    "Digest",
    "Digest   ",
    '"Digest" realm="r"',
    'Digestrealm="r"',
    "Digest realm",
    "Digest realm=",
    "Digest realm= ,nonce=n",
    'Digest realm="r" nonce="n"',
    'Digest realm="r",',
    'Digest realm="r",, nonce="n"',
    'Digest , realm="r"',
    'Digest realm="r", realm="s"',
    'Digest realm="r", REALM="s"',
    'Digest realm="r',
    'Digest realm="r\\"',
    'Digest realm="r", nonce="n',
    'Digest realm="r"x',
    'Digest realm="a\x00b", nonce="n"',
    'Digest realm="a\rb", nonce="n"',
    'Digest realm="a\nb", nonce="n"',
    'Digest realm="a\\\x01b", nonce="n"',
    'Digest realm="a\\\u00e9", nonce="n"',
    'Digest realm="a\x7f", nonce="n"',
    "Digest realm=r\u00e9",
    "Digest realm=<r>",
    "Digest r\u00e9alm=r",
    "Digest realm=r;nonce=n",
    "Digest\r\n realm=r",
]


@pytest.mark.parametrize("value", MALFORMED)
def test_malformed_values_raise_sip_error(value: str) -> None:
    with pytest.raises(SipError):
        parse_challenge(value)
    with pytest.raises(SipError):
        parse_credentials(value)


@pytest.mark.parametrize(
    "value", ['Digest nonce="n"', 'Digest realm="r"', 'Digest realm="r", opaque="o"']
)
def test_digest_challenge_needs_realm_and_nonce(value: str) -> None:
    with pytest.raises(SipError, match="without"):
        parse_challenge(value)


def test_parse_credentials() -> None:
    credentials = parse_credentials(
        'Digest username="bob", realm="atlanta.com", nonce="ea9c8e88df84f1cec4341ae6cbe5a359", '
        'opaque="", uri="sips:ss2.biloxi.example.com", '
        'response="dfe56131d1958046689d83306477ecc", qop=auth, nc=00000001, cnonce="x\\"y"'
    )
    assert credentials.scheme == "Digest"
    assert credentials.is_digest
    assert credentials.params == {
        "username": "bob",
        "realm": "atlanta.com",
        "nonce": "ea9c8e88df84f1cec4341ae6cbe5a359",
        "opaque": "",
        "uri": "sips:ss2.biloxi.example.com",
        "response": "dfe56131d1958046689d83306477ecc",
        "qop": "auth",
        "nc": "00000001",
        "cnonce": 'x"y',
    }


def test_parse_credentials_of_another_scheme() -> None:
    credentials = parse_credentials('NTLM realm="r", targetname="x", gssapi-data="abc=="')
    assert credentials.scheme == "NTLM"
    assert credentials.is_digest is False
    assert credentials.params == {"realm": "r", "targetname": "x", "gssapi-data": "abc=="}


def test_token68_credentials_are_not_sip_syntax() -> None:
    # other-response = auth-scheme LWS auth-param *(COMMA auth-param): no bare token68.
    with pytest.raises(SipError):
        parse_credentials("Basic dXNlcjpwYXNz")


# --- secrets stay secret ------------------------------------------------------------------------


def test_password_never_leaves_the_client() -> None:
    password = "Pa55-w0rd-that-is-unique"
    client = DigestClient("alice", password)
    assert password not in repr(client)
    assert password not in str(client)
    assert repr(client) == "DigestClient(username='alice')"
    for value in (
        'Digest realm="r", nonce="n", qop="auth"',
        'Digest realm="r", nonce="n"',
        'Digest realm="r", nonce="n", qop="auth-int", algorithm=SHA-256-sess, userhash=true',
    ):
        assert password not in client.authorize(parse_challenge(value), "REGISTER", "sip:r")


def test_userhash_hides_the_username() -> None:
    challenge = parse_challenge('Digest realm="r", nonce="n", qop=auth, userhash=TRUE')
    value = DigestClient("alice", "p").authorize(challenge, "REGISTER", "sip:r")
    params = answer_params(value)
    assert "alice" not in value
    assert params["username"] == hex_hash("md5", "alice:r")
    assert params["userhash"] == "true"


@pytest.mark.parametrize("username", ["a\r\nVia: x", "a\x00", "a\nb"])
def test_username_that_cannot_be_quoted_is_refused(username: str) -> None:
    with pytest.raises(ValueError, match="control character"):
        DigestClient(username, "p")


def test_uri_that_cannot_be_quoted_is_refused() -> None:
    challenge = parse_challenge('Digest realm="r", nonce="n"')
    with pytest.raises(ValueError, match="control character"):
        DigestClient("u", "p").authorize(challenge, "REGISTER", "sip:r\r\nX: y")


# --- fuzzing ------------------------------------------------------------------------------------

FRAGMENTS = st.sampled_from(
    [
        "Digest",
        "digest",
        "Basic",
        " ",
        "\t",
        ",",
        "=",
        '"',
        "\\",
        "realm",
        "nonce",
        "qop",
        "algorithm",
        "opaque",
        "stale",
        "userhash",
        "domain",
        "auth",
        "auth-int",
        "MD5-sess",
        "SHA-512-256",
        "true",
        "\u00e9",
        "\x00",
        "\r\n",
        "\ud7ff",
    ]
)
AUTH_LIKE_TEXT = st.lists(FRAGMENTS, max_size=30).map("".join)


def parses_or_sip_error(parse: Callable[[str], object], value: str) -> None:
    with contextlib.suppress(SipError):
        parse(value)


@given(st.text(max_size=200) | AUTH_LIKE_TEXT)
def test_challenge_parser_raises_only_sip_error(value: str) -> None:
    parses_or_sip_error(parse_challenge, value)


@given(st.text(max_size=200) | AUTH_LIKE_TEXT)
def test_credentials_parser_raises_only_sip_error(value: str) -> None:
    parses_or_sip_error(parse_credentials, value)


QUOTABLE = st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=20)


@given(
    realm=QUOTABLE,
    nonce=QUOTABLE,
    opaque=st.none() | QUOTABLE,
    algorithm=st.sampled_from(["MD5", "MD5-sess", "SHA-256", "SHA-256-sess", "SHA-512-256"]),
    userhash=st.booleans(),
)
def test_answers_parse_back(
    realm: str, nonce: str, opaque: str | None, algorithm: str, userhash: bool
) -> None:
    def quote(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    value = f"Digest realm={quote(realm)}, nonce={quote(nonce)}, qop=auth, algorithm={algorithm}"
    if opaque is not None:
        value += f", opaque={quote(opaque)}"
    if userhash:
        value += ", userhash=true"
    challenge = parse_challenge(value)
    assert (challenge.realm, challenge.nonce, challenge.opaque) == (realm, nonce, opaque)
    params = answer_params(DigestClient("u", "p").authorize(challenge, "REGISTER", "sip:r"))
    assert (params["realm"], params["nonce"], params.get("opaque")) == (realm, nonce, opaque)
    assert params["algorithm"] == algorithm
