"""Operator logs: the three formats, redaction of secrets, masking of identities, configure()."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import string
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipis import logs
from sipis.logs import (
    FORMATS,
    MARKER,
    JsonFormatter,
    KeyValueFormatter,
    SipisHandler,
    TextFormatter,
    configure,
    mask_identities,
    redact,
)
from tests.secrets import RECORDER

INSTANCE = "k5tq3vxhd2m7w4ajpzbn6cye4f"
OTHER_INSTANCE = "a2b3c4d5e6f7g2h3i4j5k6l7mn"
# Values shaped like what sipis holds: an instance secret (token_urlsafe(32)),
# a base64 key, an APNs token, an MD5 H(A1).
URLSAFE_SECRET = "q9ZrXb3Lw0-Tn5Yv_Kc8Hs2Jd7Gf4Mp1Rx6Ea0Ub9Qo"
BASE64_KEY = base64.b64encode(bytes(range(162, 194))).decode()  # holds '+' and '/'
APNS_TOKEN = "9f2c" * 16
HA1 = "5f4dcc3b5aa765d61d8327deb882cf99"
FORMATTERS = {"text": TextFormatter, "json": JsonFormatter, "keyvalue": KeyValueFormatter}
LOGFMT_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"=]+)(?: |$)')


def record(
    message: str, *args: object, level: int = logging.INFO, name: str = "sipis.devices"
) -> logging.LogRecord:
    """A record created at 2024-05-01T12:51:30.123Z."""
    made = logging.LogRecord(name, level, __file__, 1, message, args or None, None)
    made.created, made.msecs = 1714567890.123, 123.0
    return made


def parse_logfmt(line: str) -> dict[str, str]:
    """The pairs of one logfmt line; the whole line must be pairs."""
    assert "\n" not in line
    pairs = list(LOGFMT_PAIR.finditer(line))
    assert "".join(pair[0] for pair in pairs) == line
    return {pair[1]: json.loads(pair[2]) if pair[2].startswith('"') else pair[2] for pair in pairs}


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    """A stream for configure(); the logging setup of the session is restored afterwards."""
    root, sipis = logging.getLogger(), logging.getLogger("sipis")
    levels = (root.level, sipis.level)
    yield io.StringIO()
    for handler in [h for h in root.handlers if isinstance(h, SipisHandler)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(levels[0])
    sipis.setLevel(levels[1])


def written(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


# The three formats.


def test_text_keeps_the_human_format(output: io.StringIO) -> None:
    configure("info", stream=output)
    logging.getLogger("sipis.devices").info("instance %s: app registered over %s", INSTANCE, "tls")
    [line] = written(output)
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO sipis\.devices: "
        f"instance {INSTANCE}: app registered over tls",
        line,
    )


def test_json_is_one_object_per_line(output: io.StringIO) -> None:
    configure("debug", "json", stream=output)
    log = logging.getLogger("sipis.relay")
    log.debug("first")
    log.warning('second\nline with a "quote" and é')
    lines = written(output)
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert list(first) == ["ts", "level", "logger", "msg"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert (first["level"], first["logger"], first["msg"]) == ("debug", "sipis.relay", "first")
    assert (second["level"], second["msg"]) == ("warning", 'second\nline with a "quote" and é')


def test_json_exact_fields() -> None:
    line = JsonFormatter().format(record("instance %s: app registered", INSTANCE))
    assert line == (
        '{"ts": "2024-05-01T12:51:30.123Z", "level": "info", "logger": "sipis.devices", '
        f'"msg": "instance {INSTANCE}: app registered"}}'
    )


def test_keyvalue_exact_line() -> None:
    line = KeyValueFormatter().format(record("instance %s: app registered", INSTANCE))
    assert line == (
        "ts=2024-05-01T12:51:30.123Z level=info logger=sipis.devices "
        f'msg="instance {INSTANCE}: app registered"'
    )


@pytest.mark.parametrize(
    ("message", "written_as"),
    [
        ("shutting-down", "msg=shutting-down"),
        ("", 'msg=""'),
        ("a=b", 'msg="a=b"'),
        ('say "hi"', 'msg="say \\"hi\\""'),
        ("back\\slash", 'msg="back\\\\slash"'),
        ("two\nlines\ttab", 'msg="two\\nlines\\ttab"'),
        ("bell\x07", 'msg="bell\\u0007"'),
        ("café", "msg=café"),
    ],
)
def test_keyvalue_quotes_what_needs_quoting(message: str, written_as: str) -> None:
    line = KeyValueFormatter().format(record("%s", message))
    assert line.endswith(" " + written_as)
    assert parse_logfmt(line)["msg"] == message


def test_keyvalue_through_configure_parses(output: io.StringIO) -> None:
    configure("info", "keyvalue", stream=output)
    logging.getLogger("sipis.app").info("API listening on %s://%s:%s", "https", "127.0.0.1", 8443)
    [line] = written(output)
    pairs = parse_logfmt(line)
    assert list(pairs) == ["ts", "level", "logger", "msg"]
    assert (pairs["level"], pairs["logger"]) == ("info", "sipis.app")
    assert pairs["msg"] == "API listening on https://127.0.0.1:8443"


def fail_with_secret() -> None:
    try:
        raise KeyError(f"no key {BASE64_KEY}")
    except KeyError as exc:
        raise ValueError(f"unwrap failed: instance_secret={URLSAFE_SECRET}") from exc


@pytest.mark.parametrize("fmt", ["json", "keyvalue"])
def test_structured_exception_fields_are_redacted(output: io.StringIO, fmt: str) -> None:
    configure("info", fmt, stream=output)
    try:
        fail_with_secret()
    except ValueError:
        logging.getLogger("sipis.instances").exception("instance %s cannot be read", INSTANCE)
    [line] = written(output)
    fields = json.loads(line) if fmt == "json" else parse_logfmt(line)
    assert list(fields) == ["ts", "level", "logger", "msg", "exc_type", "traceback"]
    assert (fields["level"], fields["exc_type"]) == ("error", "ValueError")
    assert fields["msg"] == f"instance {INSTANCE} cannot be read"
    trace = fields["traceback"]
    assert trace.startswith("Traceback (most recent call last):\n")
    assert 'File "' in trace and ", in fail_with_secret" in trace
    assert f"KeyError: 'no key {MARKER}'" in trace
    assert trace.endswith(f"ValueError: unwrap failed: instance_secret={MARKER}")
    assert URLSAFE_SECRET not in line and BASE64_KEY not in line


def test_text_exception_is_redacted(output: io.StringIO) -> None:
    configure("info", stream=output)
    try:
        fail_with_secret()
    except ValueError:
        logging.getLogger("sipis.instances").exception("hook failed")
    text = output.getvalue()
    assert " ERROR sipis.instances: hook failed\nTraceback (most recent call last):\n" in text
    assert f"ValueError: unwrap failed: instance_secret={MARKER}\n" in text
    assert URLSAFE_SECRET not in text and BASE64_KEY not in text


def test_exception_type_names_its_module() -> None:
    class StoreTrouble(Exception):
        pass

    try:
        raise StoreTrouble("down")
    except StoreTrouble as exc:
        made = record("sweep failed")
        made.exc_info = (type(exc), exc, exc.__traceback__)
    fields = json.loads(JsonFormatter().format(made))
    assert (
        fields["exc_type"]
        == f"{__name__}.test_exception_type_names_its_module.<locals>.StoreTrouble"
    )


def test_stack_info_is_written_and_redacted() -> None:
    made = record("where")
    made.stack_info = f"Stack (most recent call last):\n  token={APNS_TOKEN}"
    fields = json.loads(JsonFormatter().format(made))
    assert fields["stack"] == f"Stack (most recent call last):\n  token={MARKER}"


def test_an_unformattable_call_still_logs_redacted() -> None:
    made = record("secret %s and %s", f"password={URLSAFE_SECRET}")
    line = TextFormatter().format(made)
    assert line.endswith(f"unformattable log call: 'secret %s and %s' % ('password={MARKER}',)")


# Redaction: every form, and what it leaves.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'Authorization: Digest username="alice", realm="sipis", nonce="ab12", '
            f'uri="sip:sipis", response="{HA1}"\r\nMax-Forwards: 70',
            f"Authorization: {MARKER}\r\nMax-Forwards: 70",
        ),
        (
            "proxy-authorization: Digest username=bob, response=0a1b",
            f"proxy-authorization: {MARKER}",
        ),
        (
            "headers {'Authorization': 'Bearer abc.def.ghi', 'Accept': '*/*'}",
            f"headers {{'Authorization': '{MARKER}', 'Accept': '*/*'}}",
        ),
        (
            '{"authorization": "Basic YWxpY2U6c2VjcmV0", "id": "work"}',
            f'{{"authorization": "{MARKER}", "id": "work"}}',
        ),
        (
            'WWW-Authenticate: Digest realm="sipis", nonce="Zm9vYmFyYmF6", qop="auth"',
            'WWW-Authenticate: Digest realm="sipis", nonce="Zm9vYmFyYmF6", qop="auth"',
        ),
        (
            'digest response="6629fae49393a05397450978507c4ef1", cnonce="0a4f113b", nc=00000001',
            f'digest response="{MARKER}", cnonce="{MARKER}", nc=00000001',
        ),
        ("cnonce=0a4f113b, qop=auth", f"cnonce={MARKER}, qop=auth"),
        ("answer response=6629fae4", f"answer response={MARKER}"),
        ("passphrase: open", f"passphrase: {MARKER}"),
        ("credentials=svc.json", f"credentials={MARKER}"),
        ("signing-key = k1", f"signing-key = {MARKER}"),
        ("ApiKey: k2", f"ApiKey: {MARKER}"),
        (
            'Authentication-Info: rspauth="d3ad", qop=auth',
            f'Authentication-Info: rspauth="{MARKER}", qop=auth',
        ),
        ("login password=hunter2 failed", f"login password={MARKER} failed"),
        (
            'body {"password": "hun\\"ter2", "id": "x"}',
            f'body {{"password": "{MARKER}", "id": "x"}}',
        ),
        ("{'passwd': 'hunter2'}", f"{{'passwd': '{MARKER}'}}"),
        ("client_secret=abc123&grant=x", f"client_secret={MARKER}&grant=x"),
        ("api.admin_token: let-me-in now", f"api.admin_token: {MARKER} now"),
        ("SECRET = xyzzy", f"SECRET = {MARKER}"),
        ("private_key=/etc/key.pem", f"private_key={MARKER}"),
        ("Bearer eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJ0In0.c2ln== sent", f"Bearer {MARKER} sent"),
        (
            "uri sip:alice:wonderful@example.com;transport=tls",
            f"uri sip:alice:{MARKER}@example.com;transport=tls",
        ),
        ("https://svc:p4ss@fcm.example/v1", f"https://svc:{MARKER}@fcm.example/v1"),
        (f"apns token {APNS_TOKEN} rejected", f"apns token {MARKER} rejected"),
        (f"ha1 {HA1}.", f"ha1 {MARKER}."),
        (f"H(A1)={HA1.upper()}", f"H(A1)={MARKER}"),
        (f"key {BASE64_KEY} loaded", f"key {MARKER} loaded"),
        (f"secret of {INSTANCE} is {URLSAFE_SECRET}", f"secret of {INSTANCE} is {MARKER}"),
        (f"wrapped:{'A' * 60}==", f"wrapped:{MARKER}"),
    ],
)
def test_redaction(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_a_long_run_that_merely_contains_an_instance_id_is_redacted() -> None:
    assert redact(f"{INSTANCE}/{URLSAFE_SECRET}") == MARKER
    assert redact(f"https://{URLSAFE_SECRET}:x@host") == f"https:{MARKER}:{MARKER}@host"


@pytest.mark.parametrize(
    "text",
    [
        f"instance {INSTANCE} created with 2 account(s)",
        f"binding {INSTANCE}/office-line-primary-2: 200 OK",
        f"binding {INSTANCE}/550e8400-e29b-41d4-a716-446655440000: no answer",
        f"unexpected failure answering PATCH /v1/instances/{INSTANCE}",
        "apns push for instance x: Failed(apns-id=EC1BF194-B3B2-424A-A04D-7B4F7A6A2A1E)",
        "contact urn:uuid:550e8400-e29b-41d4-a716-446655440000",
        "Call-ID: 0123456789abcdef01234567",
        f"Call-ID: {HA1}",
        "call-id=YjNhMjQ4ZjRjNDI3ZTY1ZTQ4ZmFhNTk0ZTYzMjcxYzg.",
        "push not sent (no apns credentials): call for instance x to token 9f2c…9f2c",
        "push token of instance x rejected: BadDeviceToken",
        "master key 3f2a9b1c: 12 data key(s) re-wrapped",
        '  File "/opt/VoiceRelay/venv/lib/python3.11/site-packages/Firebase_Admin/'
        'MessagingEncoderForProviders/x.py", line 12, in encode',
        "response not sent: <udp flow 127.0.0.1:5062 -> 127.0.0.1:40000> is closed",
    ],
)
def test_useful_text_survives(text: str) -> None:
    assert TextFormatter().format(record("%s", text)).endswith(f"sipis.devices: {text}")


# Masking identities, and the instance being debugged.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("from sip:alice@example.com", "from sip:a…@example.com"),
        ("to <SIPS:bob.smith@example.org;transport=tls>", "to <SIPS:b…@example.org;transport=tls>"),
        ("sip:+15551234567@gw.example", "sip:+1…@gw.example"),
        ("tel:+4930123456;phone-context=x", "tel:+4…;phone-context=x"),
        (f"sip:{INSTANCE}@relay.example", f"sip:{INSTANCE}@relay.example"),
        ("sip:gw.example:5060;transport=udp", "sip:gw.example:5060;transport=udp"),
        ("call from +49 30 1234567 ended", "call from +4… ended"),
        ("+447700900123", "+4…"),
        (
            "device REGISTER from 203.0.113.7:5062 refused",
            "device REGISTER from 203.0.113.x:5062 refused",
        ),
        (
            "<tls flow 0.0.0.0:5061 -> 198.51.100.23:49152>",
            "<tls flow 0.0.0.0:5061 -> 198.51.100.x:49152>",
        ),
        ("[2001:db8:85a3:1:2:3:4:5]:5062", "[2001:db8:85a3::x]:5062"),
        ("peer fe80::1ff:fe23:4567:890a.", "peer fe80:0:0::x."),
        ("mapped ::ffff:203.0.113.9", "mapped ::ffff:203.0.113.x"),
        (
            "loopback 127.0.0.1 127.8.9.10 ::1 ::ffff:127.0.0.1",
            "loopback 127.0.0.1 127.8.9.10 ::1 ::ffff:127.0.0.1",
        ),
        ("listening on 0.0.0.0 and ::", "listening on 0.0.0.0 and ::"),
        (
            "at 12:34:56, version 1.2.3.4.5, 999.1.1.1, 20 ms",
            "at 12:34:56, version 1.2.3.4.5, 999.1.1.1, 20 ms",
        ),
    ],
)
def test_masking(text: str, expected: str) -> None:
    assert mask_identities(text) == expected


def test_only_the_debugged_instance_is_unmasked(output: io.StringIO) -> None:
    configure("debug", "json", debug_instance=INSTANCE, stream=output)
    log = logging.getLogger("sipis.bindings")
    log.debug("binding %s/work: REGISTER sip:alice@example.com from 203.0.113.7", INSTANCE)
    log.debug("binding %s/work: REGISTER sip:alice@example.com from 203.0.113.7", OTHER_INSTANCE)
    log.debug("REGISTER sip:alice@example.com from 203.0.113.7")
    log.debug("instance %s: password=%s", INSTANCE, URLSAFE_SECRET)
    messages = [json.loads(line)["msg"] for line in written(output)]
    assert messages == [
        f"binding {INSTANCE}/work: REGISTER sip:alice@example.com from 203.0.113.7",
        f"binding {OTHER_INSTANCE}/work: REGISTER sip:a…@example.com from 203.0.113.x",
        "REGISTER sip:a…@example.com from 203.0.113.x",
        f"instance {INSTANCE}: password={MARKER}",
    ]


def test_masking_reaches_tracebacks(output: io.StringIO) -> None:
    configure("info", "json", stream=output)
    try:
        raise ConnectionError("no route to sip:carol@203.0.113.50")
    except ConnectionError:
        logging.getLogger("sipis.bindings").exception("flow failed")
    trace = json.loads(output.getvalue())["traceback"]
    assert trace.endswith("ConnectionError: no route to sip:c…@203.0.113.x")


# configure(): idempotent, other handlers unharmed, libraries held back.


def test_configure_twice_keeps_one_handler(output: io.StringIO) -> None:
    earlier = io.StringIO()
    configure("info", "json", stream=earlier)
    configure("info", "keyvalue", stream=output)
    root = logging.getLogger()
    assert len([h for h in root.handlers if isinstance(h, SipisHandler)]) == 1
    assert RECORDER in root.handlers
    logging.getLogger("sipis.app").info("once")
    assert earlier.getvalue() == ""
    [line] = written(output)
    assert parse_logfmt(line)["msg"] == "once"
    assert (root.level, logging.getLogger("sipis").level) == (logging.WARNING, logging.INFO)


def test_other_handlers_see_the_record_as_logged(
    output: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    """caplog and the suite's recorder get the raw record: a logged secret is still caught."""
    configure("debug", stream=output)
    before = len(RECORDER.lines)
    logging.getLogger("sipis.devices").info("password=%s from sip:dave@203.0.113.4", "opensesame")
    try:
        assert RECORDER.lines[before:] == [
            "sipis.devices: password=opensesame from sip:dave@203.0.113.4"
        ]
    finally:
        del RECORDER.lines[before:]
    assert caplog.messages == ["password=opensesame from sip:dave@203.0.113.4"]
    assert written(output)[0].endswith(f"password={MARKER} from sip:d…@203.0.113.x")


def test_libraries_below_warning_are_not_written(output: io.StringIO) -> None:
    configure("debug", stream=output)
    quiet = logging.getLogger("aiosqlite")
    chatty = logging.getLogger("some.library")
    chatty.setLevel(logging.DEBUG)
    try:
        quiet.debug("executing INSERT ... with parameters")
        chatty.debug("debug detail")
        chatty.info("info detail")
        chatty.warning("a warning")
        quiet.error("an error")
        logging.getLogger("sipis.store").debug("sipis detail")
    finally:
        chatty.setLevel(logging.NOTSET)
    tails = [line.split(" ", 2)[2] for line in written(output)]
    assert tails == [
        "WARNING some.library: a warning",
        "ERROR aiosqlite: an error",
        "DEBUG sipis.store: sipis detail",
    ]


def test_a_record_below_the_level_is_never_formatted(output: io.StringIO) -> None:
    configure("info", stream=output)

    class Probe:
        formatted = 0

        def __str__(self) -> str:
            Probe.formatted += 1
            return "probe"

    log = logging.getLogger("sipis.relay")
    log.debug("%s", Probe())
    assert (Probe.formatted, output.getvalue()) == (0, "")
    log.info("%s", Probe())
    assert Probe.formatted > 0
    assert written(output)[0].endswith("INFO sipis.relay: probe")


@pytest.mark.parametrize(
    ("level", "fmt", "debug_instance", "problem"),
    [
        ("info", "xml", None, "log format 'xml'"),
        ("loud", "text", None, "log level 'loud'"),
        ("info", "text", "short", "debug instance 'short'"),
        ("info", "text", INSTANCE.upper(), "not an instance id"),
    ],
)
def test_configure_refuses_bad_settings(
    output: io.StringIO, level: str, fmt: str, debug_instance: str | None, problem: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        configure(level, fmt, debug_instance, stream=output)
    assert not [h for h in logging.getLogger().handlers if isinstance(h, SipisHandler)]


def test_a_failed_write_reports_no_message(
    output: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError("disk full")

    configure("info", stream=Broken())
    logging.getLogger("sipis.api").info("admin token %s", URLSAFE_SECRET)
    report = capsys.readouterr().err
    assert "OSError: disk full" in report
    assert "Message: '(message withheld)'" in report
    assert URLSAFE_SECRET not in report


# Properties.

BASE64URL = string.ascii_letters + string.digits + "-_"


SECRETS = st.one_of(
    st.text(alphabet=BASE64URL, min_size=43, max_size=43),
    st.binary(min_size=32, max_size=64).map(lambda key: base64.b64encode(key).decode()),
)


@given(before=st.text(), secret=SECRETS, after=st.text(), fmt=st.sampled_from(FORMATS))
def test_a_key_shaped_secret_never_reaches_the_output(
    before: str, secret: str, after: str, fmt: str
) -> None:
    """A 43-character base64url secret, or a 32-64 byte key in base64, anywhere in a message."""
    line = FORMATTERS[fmt]().format(record("%s", before + secret + after))
    assert secret not in line


FRAGMENTS = st.sampled_from(
    [
        "password", "Token", "secret", "api_key", "Authorization", "response", "cnonce",
        "rspauth", "bearer ", "@", ":", "=", '"', "'", " ", "\n", "sip:", "SIPS:", "tel:",
        "+", "4", "203.0.113.7", "::", "f", "Zz", "/", "-", "_", "é", "\u212a", "\u017f", "\u0130",
        INSTANCE, HA1,
    ]
)  # fmt: skip


@given(st.lists(st.one_of(FRAGMENTS, st.text(max_size=3)), max_size=24).map("".join))
def test_the_quick_checks_never_skip_a_text_the_full_scans_change(text: str) -> None:
    assert redact(text) == logs._REDACT.sub(logs._redacted, text)
    assert mask_identities(text) == logs._MASK.sub(logs._masked, text)
