"""Coverage-guided fuzzing of the SIP parsers, bounded for CI, and what it once found.

Each target in tests/fuzz/targets.py ("message", "stream", "digest") runs
under atheris in a child process for SIPIS_FUZZ_SECONDS seconds (default
8; the three run at once), from the seed corpus in a temporary directory.
A crash fails its test and prints the reproducer file.  Every file in
tests/fuzz/regressions/<target>/ is an input that once broke that target;
it is fed to the target directly, where only ``SipError`` may be raised
inside.  ``python bench/fuzz.py --target message --seconds 600`` fuzzes
longer.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from sipis.sip.errors import SipError
from sipis.sip.headers import parse_delta_seconds, parse_via
from sipis.sip.message import Request, Response, parse_message
from sipis.sip.proxy import forwarded, forwarded_response, in_dialog_request, own_routes_removed
from sipis.sip.registration import RegistrationSession, RegistrationState
from sipis.sip.uas import make_response
from sipis.sip.uri import SipUri, TelUri, parse_uri
from tests.fuzz import campaign, seeds
from tests.fuzz.targets import (
    OWN_VIA,
    REGISTRATION,
    REGISTRATION_ADDRESS,
    TARGETS,
    digest,
    message,
    stream,
)

SECONDS = float(os.environ.get("SIPIS_FUZZ_SECONDS", "8"))
REGRESSIONS = Path(__file__).resolve().parent.parent / "fuzz" / "regressions"
REGRESSION_FILES = sorted(p for p in REGRESSIONS.glob("*/*") if p.is_file())


# --- fuzzing --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, campaign.Run]]:
    """All targets fuzzing at once, each in its own process and directory."""
    runs = {
        target: campaign.start(target, SECONDS, tmp_path_factory.mktemp(f"fuzz-{target}"))
        for target in TARGETS
    }
    yield runs
    for run in runs.values():
        campaign.stop(run)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzzing_finds_no_crash(target: str, fuzz_runs: dict[str, campaign.Run]) -> None:
    report = campaign.finish(fuzz_runs[target])
    assert report.crashes == (), report.describe()
    assert report.returncode == 0, report.describe()
    # It ran past the seeds, and coverage guided it: inputs that reached new code were kept.
    assert report.executions > len(seeds.corpus(target)), report.describe()
    assert report.new_units > 0, report.describe()


# --- inputs that once broke a target ------------------------------------------------------


def test_every_regression_input_names_a_target() -> None:
    assert REGRESSION_FILES, "no regression inputs found"
    assert {path.parent.name for path in REGRESSION_FILES} <= set(TARGETS)


@pytest.mark.parametrize("path", REGRESSION_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_regression_input_raises_only_protocol_errors(path: Path) -> None:
    outcome = TARGETS[path.parent.name](path.read_bytes())
    assert outcome


def request(*lines: str) -> Request:
    head = [
        "OPTIONS sip:sipis.example SIP/2.0",
        "Via: SIP/2.0/UDP 192.0.2.7;branch=z9hG4bK1",
        "From: <sip:alice@example.com>;tag=1",
        "To: <sip:bob@example.com>",
        "Call-ID: fuzz-regression",
        "CSeq: 1 OPTIONS",
        *lines,
    ]
    msg = parse_message(("\r\n".join(head) + "\r\n\r\n").encode())
    assert isinstance(msg, Request)
    return msg


def test_a_repeated_rport_is_checked_in_every_copy() -> None:
    """Once: the first rport was checked, the last one read; ``Via.rport`` raised ValueError."""
    with pytest.raises(SipError, match="malformed rport"):
        parse_via("SIP/2.0/UDP 192.0.2.7;rport=5060;rport=x;branch=z9hG4bK1")
    assert parse_via("SIP/2.0/UDP 192.0.2.7;rport=5060;rport=5062").rport == 5062
    assert parse_via("SIP/2.0/UDP 192.0.2.7;rport=5060;rport").rport is None


def test_a_rport_of_thousands_of_digits_is_malformed() -> None:
    """Once: ``int()`` of 4301 digits raised ValueError (Python's limit is 4300)."""
    with pytest.raises(SipError, match="malformed rport"):
        parse_via(f"SIP/2.0/UDP 192.0.2.7;rport={'9' * 4301}")
    with pytest.raises(SipError, match="malformed rport"):
        parse_via("SIP/2.0/UDP 192.0.2.7;rport=000005060")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("3600", 3600),
        ("0", 0),
        ("000120", 120),
        ("4294967295", 2**32 - 1),
        ("4294967296", 2**32 - 1),
        ("9" * 4301, 2**32 - 1),
        ("0" * 4400 + "7", 7),
        ("\u00b2", None),  # a digit to str.isdigit(), not to int()
        ("\u0663", None),  # ARABIC-INDIC DIGIT THREE: not a SIP DIGIT
        ("", None),
        ("12a", None),
    ],
)
def test_delta_seconds_never_trip_int(text: str, seconds: int | None) -> None:
    assert parse_delta_seconds(text) == seconds


def answered(status: int, headers: dict[str, str]) -> RegistrationSession:
    """A registration whose first REGISTER was answered ``status`` with ``headers``."""
    session = RegistrationSession(REGISTRATION, rng=random.Random(7))
    session.bind(REGISTRATION_ADDRESS)
    session.start(0.0)
    session.on_timer(0.0)
    (sent,) = session.outgoing()
    register = parse_message(sent)
    assert isinstance(register, Request)
    answer = parse_message(make_response(register, status, headers=headers.items()).serialize())
    assert isinstance(answer, Response)
    session.receive(answer, 1.0)
    return session


MANY_DIGITS = "9" * 4301
OUR_CONTACT = f"<sip:{REGISTRATION.contact_user}@192.0.2.50:5070>"


@pytest.mark.parametrize(
    ("headers", "flow_timer", "registered_until"),
    [
        ({"Flow-Timer": "120", "Expires": "300"}, 120, 301.0),
        ({"Flow-Timer": "\u00b2", "Expires": MANY_DIGITS}, None, 1.0 + 2**32 - 1),
        (
            {"Flow-Timer": MANY_DIGITS, "Contact": f"{OUR_CONTACT};expires={MANY_DIGITS}"},
            2**32 - 1,
            1.0 + 2**32 - 1,
        ),
    ],
)
def test_registration_reads_odd_numbers_without_raising(
    headers: dict[str, str], flow_timer: int | None, registered_until: float
) -> None:
    """Once: ``Flow-Timer: ²`` (a digit to ``str.isdigit``, not to ``int``) and expiries
    of 4301 digits made ``RegistrationSession.receive`` raise ValueError."""
    session = answered(200, headers)
    assert session.state is RegistrationState.REGISTERED
    assert session.flow_timer == flow_timer
    assert session.registered_until == registered_until


def test_a_malformed_service_route_is_ignored_and_the_refresh_still_scheduled() -> None:
    """Once: it raised SipError out of ``receive`` halfway through, leaving a session
    REGISTERED with no refresh scheduled."""
    session = answered(200, {"Expires": "600", "Service-Route": "<sip:edge@s s.example;lr>"})
    assert session.state is RegistrationState.REGISTERED
    assert session.service_route == ()
    assert session.deadline is not None and 1.0 + 450 <= session.deadline <= 1.0 + 540


def test_a_malformed_min_expires_fails_the_registration() -> None:
    """Once: a 423 with ``Min-Expires: soon`` raised SipError out of ``receive``."""
    session = answered(423, {"Min-Expires": "soon"})
    assert session.state is RegistrationState.FAILED
    assert session.reason == "423 without a usable Min-Expires"


@pytest.mark.parametrize(
    ("text", "written", "names"),
    [
        ("sip:a@b;n%60me=v%61", "sip:a@b;n%60me=v%61", ["n`me"]),
        ("sip:a@b;%3Bx=1;%6C%72", "sip:a@b;%3Bx=1;lr", [";x", "lr"]),
        ("sip:a@b;%2541", "sip:a@b;%2541", ["%41"]),
        ("sip:a@b;%C3%A9", "sip:a@b;%C3%A9", ["\u00e9"]),
        ("tel:+1555;%3B=2", "tel:+1555;%3B=2", [";"]),
    ],
)
def test_uri_parameter_names_are_escaped_again_when_written(
    text: str, written: str, names: list[str]
) -> None:
    """Once: names were unescaped when read and written raw, so ``n%60me`` came out as a
    URI no parser accepts."""
    uri = parse_uri(text)
    assert isinstance(uri, SipUri | TelUri)
    assert list(uri.params) == names
    assert str(uri) == written
    assert parse_uri(str(uri)) == uri


def test_an_empty_via_or_route_field_is_passed_over_when_popping() -> None:
    """Once: ``Via:`` with no value above real Vias made forwarding the response raise
    IndexError (and ``Route:`` so when stripping this node's routes)."""
    response = parse_message(
        b"SIP/2.0 200 OK\r\nVia: \r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKown\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.7;branch=z9hG4bK1\r\nFrom: <sip:a@example.com>;tag=1\r\n"
        b"To: <sip:b@example.com>;tag=2\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\n\r\n"
    )
    assert isinstance(response, Response)
    assert [via.branch for via in response.vias] == ["z9hG4bKown", "z9hG4bK1"]
    out = forwarded_response(response)
    assert [via.branch for via in parse_message(out.serialize()).vias] == ["z9hG4bK1"]

    routed = request("Route: ", "Route: <sip:rr@sipis.example;lr>, <sip:next.example;lr>")
    own_routes_removed(routed, lambda uri: uri.host == "sipis.example")
    assert [str(r.uri) for r in routed.header_name_addrs("Route")] == ["sip:next.example;lr"]


def test_uri_headers_stay_out_of_a_request_uri() -> None:
    """Once: a Contact's ``?Route=...`` went into the Request-URI of a forwarded request
    and of an in-dialog BYE, which no parser (sipis's included) accepts."""
    original = request("Contact: <sip:app@192.0.2.9;ob?Route=%3Csip:x.example%3E>")
    (contact,) = original.contacts
    assert isinstance(contact.uri, SipUri) and contact.uri.headers
    out = forwarded(original, via=OWN_VIA, target=contact.uri)
    bye = in_dialog_request(
        "BYE",
        call_id=original.call_id,
        local=original.to,
        remote=original.from_,
        remote_target=contact.uri,
        route_set=[],
        cseq=2,
        via=OWN_VIA,
    )
    for built in (out, bye):
        again = parse_message(built.serialize())
        assert isinstance(again, Request)
        assert str(again.uri) == "sip:app@192.0.2.9;ob"


# --- the targets reach what they are meant to ------------------------------------------


@pytest.mark.parametrize("name", sorted(seeds.MESSAGES))
def test_message_seeds_parse_and_survive_every_use(name: str) -> None:
    kind = "response" if seeds.MESSAGES[name].startswith(b"SIP/2.0 ") else "request"
    assert message(seeds.MESSAGES[name]) == kind


def test_torture_messages_raise_only_protocol_errors_in_every_target() -> None:
    outcomes = [message(data) for data in seeds.corpus("message").values()]
    assert outcomes.count("request") + outcomes.count("response") > len(seeds.MESSAGES)
    assert "rejected 400" in outcomes  # RFC 4475 §3.1.2 messages are refused
    for data in seeds.corpus("stream").values():
        stream(data)


@pytest.mark.parametrize("cut", sorted(seeds.STREAM_CUTS))
def test_a_conversation_frames_alike_however_cut(cut: str) -> None:
    data = seeds.corpus("stream")[f"conversation-{cut}"]
    assert stream(data) == f"{len(seeds.CONVERSATION)} framed"


@pytest.mark.parametrize(
    ("name", "outcome"),
    [
        ("challenge-sha256", "challenge answered, credentials invalid"),
        ("challenge-other-scheme", "challenge unanswerable, credentials invalid"),
        ("credentials-md5", "challenge answered, credentials ok"),
        ("credentials-sha256", "challenge answered, credentials ok"),
        ("credentials-expired", "challenge answered, credentials stale"),
        ("credentials-wrong-response", "challenge answered, credentials invalid"),
        ("credentials-bad-nc", "challenge answered, credentials invalid"),
    ],
)
def test_digest_seeds_reach_each_verdict(name: str, outcome: str) -> None:
    assert digest(seeds.corpus("digest")[name]) == outcome


def test_digest_rejects_what_is_no_auth_value() -> None:
    assert digest(b"\xff\x00") == "challenge rejected, credentials rejected"
