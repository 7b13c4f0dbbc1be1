"""The purge log: hashes, chain, signed checkpoints, verification, export, key file."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import math
import re
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipis.audit import (
    CHECKPOINT_EVERY,
    GENESIS_HASH,
    REASONS,
    AuditFormatError,
    AuditKeyError,
    AuditKeys,
    AuditVerifier,
    Checkpoint,
    PurgeEntry,
    checkpoint_due,
    checkpoint_from_json,
    checkpoint_message,
    checkpoint_to_json,
    entry_from_json,
    entry_hash,
    entry_to_json,
    export_lines,
    import_lines,
    make_checkpoint,
    new_entry,
    verify,
)

T0 = 1_700_000_000.0
ERASED = {"accounts": 2, "tokens": 2, "queued_messages": 0, "data_key": 1}


@dataclasses.dataclass(frozen=True)
class Log:
    keys: AuditKeys
    entries: tuple[PurgeEntry, ...]
    checkpoints: tuple[Checkpoint, ...]


def build_log(keys: AuditKeys, count: int, every: int, *, close: bool = True) -> Log:
    """``count`` entries, a checkpoint whenever one is due, and one on close."""
    entries: list[PurgeEntry] = []
    checkpoints: list[Checkpoint] = []
    previous = None
    for number in range(1, count + 1):
        previous = new_entry(
            previous,
            at=T0 + number * 1.25,
            reason=REASONS[number % len(REASONS)],
            subject=keys.subject(f"instance-{number}"),
            erased={**ERASED, "accounts": number % 3},
        )
        entries.append(previous)
        last_signed = checkpoints[-1].seq if checkpoints else 0
        if checkpoint_due(previous.seq, last_signed, every=every):
            checkpoints.append(make_checkpoint(keys, previous, T0 + number * 1.25 + 0.5))
    if (
        close
        and previous is not None
        and checkpoint_due(previous.seq, checkpoints[-1].seq, closing=True)
    ):
        checkpoints.append(make_checkpoint(keys, previous, T0 + count * 2.0))
    return Log(keys, tuple(entries), tuple(checkpoints))


def messages(report_findings: Sequence[object]) -> list[str]:
    return [finding.message for finding in report_findings]  # type: ignore[attr-defined]


def errors_of(
    entries: Sequence[PurgeEntry], checkpoints: Sequence[Checkpoint], key: str
) -> list[str]:
    return messages(verify(entries, checkpoints, key).errors)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> AuditKeys:
    return AuditKeys.load_or_create(tmp_path_factory.mktemp("audit") / "keys" / "audit.json")


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> AuditKeys:
    return AuditKeys.load_or_create(tmp_path_factory.mktemp("other") / "audit.json")


@pytest.fixture(scope="module")
def log(keys: AuditKeys) -> Log:
    return build_log(keys, 250, CHECKPOINT_EVERY)


# --- a valid log -------------------------------------------------------------------------


def test_valid_chain_of_250_verifies(log: Log) -> None:
    assert [checkpoint.seq for checkpoint in log.checkpoints] == [100, 200, 250]
    assert [entry.seq for entry in log.entries] == list(range(1, 251))
    assert log.entries[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in zip(log.entries, log.entries[1:], strict=False))
    report = verify(log.entries, log.checkpoints, log.keys.public_key_b64)
    assert report.findings == ()
    assert report.ok
    assert (report.entries, report.checkpoints, report.head_seq, report.signed_seq) == (
        250,
        3,
        250,
        250,
    )


def test_empty_log_verifies(keys: AuditKeys) -> None:
    report = verify([], [], keys.public_key_b64)
    assert (report.ok, report.findings, report.head_seq, report.signed_seq) == (True, (), 0, 0)


def test_entry_hash_follows_the_documented_encoding() -> None:
    subject = "ab" * 32
    canonical = (
        '{"at":"1700000000.250000","domain":"sipis/purge-entry/1",'
        '"erased":{"accounts":2,"data_key":1,"queued_messages":0,"tokens":2},'
        f'"prev_hash":"{GENESIS_HASH}","reason":"expired","seq":1,"subject":"{subject}"}}'
    )
    expected = hashlib.sha256(canonical.encode("ascii")).hexdigest()
    entry = new_entry(None, at=1_700_000_000.25, reason="expired", subject=subject, erased=ERASED)
    assert entry.hash == expected
    assert (
        entry_hash(
            seq=1,
            at=1_700_000_000.25,
            reason="expired",
            subject=subject,
            erased=ERASED,
            prev_hash=GENESIS_HASH,
        )
        == expected
    )
    with pytest.raises(ValueError, match=r"^previous hash is not 64 lowercase hex digits$"):
        entry_hash(seq=1, at=T0, reason="expired", subject=subject, erased={}, prev_hash="0")
    assert (entry.seq, entry.at, entry.prev_hash) == (1, 1_700_000_000.25, GENESIS_HASH)
    assert entry.erased == ERASED and type(entry.erased) is dict
    assert entry.erased is not ERASED
    assert json.loads(json.dumps(entry.erased)) == ERASED
    assert hash(entry) == hash(dataclasses.replace(entry))


def test_checkpoint_signs_the_documented_encoding(keys: AuditKeys) -> None:
    head = new_entry(None, at=T0, reason="admin", subject="cd" * 32, erased={"data_key": 1})
    checkpoint = make_checkpoint(keys, head, T0 + 0.1234567)
    assert checkpoint.at == 1_700_000_000.123457
    signed = (
        '{"at":"1700000000.123457","domain":"sipis/purge-checkpoint/1",'
        f'"head_hash":"{head.hash}","key_id":"{keys.key_id}","seq":1}}'
    ).encode("ascii")
    assert (
        checkpoint_message(seq=1, at=checkpoint.at, head_hash=head.hash, key_id=keys.key_id)
        == signed
    )
    assert keys.verifier().verify(base64.b64decode(checkpoint.signature), signed)
    assert not keys.verifier().verify(base64.b64decode(checkpoint.signature), signed + b" ")
    assert keys.key_id == hashlib.sha256(base64.b64decode(keys.public_key_b64)).hexdigest()[:16]


def test_new_entry_keeps_time_to_the_microsecond() -> None:
    entry = new_entry(None, at=T0 + 0.0000004, reason="expired", subject="00" * 32, erased={})
    assert entry.at == T0


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"reason": "forgotten"}, "unknown reason 'forgotten'"),
        ({"subject": "instance-1"}, "subject is not 64 lowercase hex digits"),
        ({"subject": "AB" * 32}, "subject is not 64 lowercase hex digits"),
        (
            {"erased": {"accounts": -1}},
            "erased count of accounts is not an integer from 0 to 2^53-1",
        ),
        ({"erased": {"Accounts": 1}}, "erased kind 'Accounts' is not [a-z][a-z0-9_]{0,31}"),
        (
            {"erased": {"accounts": True}},
            "erased count of accounts is not an integer from 0 to 2^53-1",
        ),
    ],
)
def test_new_entry_rejects_invalid_fields(changes: dict[str, object], problem: str) -> None:
    arguments: dict[str, object] = {
        "at": T0,
        "reason": "expired",
        "subject": "00" * 32,
        "erased": {},
    }
    arguments.update(changes)
    with pytest.raises(ValueError, match="^" + re.escape(problem) + "$"):
        new_entry(None, **arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize("at", [float("nan"), float("inf"), -1.0])
def test_new_entry_rejects_impossible_times(at: float) -> None:
    with pytest.raises(ValueError, match="finite, non-negative"):
        new_entry(None, at=at, reason="expired", subject="00" * 32, erased={})


def test_checkpoint_due() -> None:
    assert not checkpoint_due(0, 0)
    assert not checkpoint_due(99, 0)
    assert checkpoint_due(100, 0)
    assert checkpoint_due(205, 100)
    assert not checkpoint_due(3, 0, every=4)
    assert checkpoint_due(4, 0, every=4)
    assert checkpoint_due(201, 200, closing=True)
    assert not checkpoint_due(200, 200, closing=True)
    assert not checkpoint_due(0, 0, closing=True)


# --- tampering ---------------------------------------------------------------------------


@pytest.mark.parametrize("seq", [1, 57, 100, 201, 250])
@pytest.mark.parametrize(
    "change",
    [
        {"reason": "admin"},
        {"erased": {**ERASED, "accounts": 7}},
        {"at": T0 + 12345.5},
        {"subject": "0f" * 32},
    ],
    ids=["reason", "erased", "at", "subject"],
)
def test_edited_entry_is_reported_at_its_seq(log: Log, seq: int, change: dict[str, object]) -> None:
    entries = list(log.entries)
    original = entries[seq - 1]
    entries[seq - 1] = dataclasses.replace(original, **change)  # type: ignore[arg-type]
    assert entries[seq - 1] != original
    report = verify(entries, log.checkpoints, log.keys.public_key_b64)
    assert messages(report.findings) == [f"entry {seq}: hash does not match its content (edited?)"]
    assert report.errors[0].seq == seq
    assert not report.ok


def test_edited_entry_with_its_hash_recomputed_breaks_the_link_to_the_next(log: Log) -> None:
    entries = list(log.entries)
    edited = new_entry(
        entries[40], at=entries[41].at, reason="admin", subject=entries[41].subject, erased={}
    )
    entries[41] = edited
    assert errors_of(entries, log.checkpoints, log.keys.public_key_b64) == [
        "entry 43: previous hash does not match entry 42 (reordered or removed?)"
    ]


def test_rewritten_chain_is_caught_by_the_checkpoints(log: Log) -> None:
    """Entry 42 removed and everything after it renumbered and rehashed."""
    kept = [entry for entry in log.entries if entry.seq != 42]
    rewritten: list[PurgeEntry] = []
    for entry in kept:
        previous = rewritten[-1] if rewritten else None
        rewritten.append(
            new_entry(
                previous,
                at=entry.at,
                reason=entry.reason,
                subject=entry.subject,
                erased=entry.erased,
            )
        )
    assert errors_of(rewritten, log.checkpoints, log.keys.public_key_b64) == [
        "checkpoint at 100: head hash does not match entry 100",
        "checkpoint at 200: head hash does not match entry 200",
        "checkpoint at 250: entry 250 missing (log truncated?)",
    ]


@pytest.mark.parametrize(
    ("removed", "expected"),
    [
        ({137}, ["entry 137 missing (gap after 136)"]),
        ({12, 13, 14}, ["entries 12-14 missing (gap after 11)"]),
        ({1}, ["entry 1 missing (log starts at 2)"]),
        ({1, 2, 3}, ["entries 1-3 missing (log starts at 4)"]),
        ({100}, ["entry 100 missing (gap after 99)", "checkpoint at 100: entry 100 missing"]),
        ({30, 60}, ["entry 30 missing (gap after 29)", "entry 60 missing (gap after 59)"]),
        ({250}, ["checkpoint at 250: entry 250 missing (log truncated?)"]),
    ],
)
def test_deleted_entry_is_reported_as_a_gap(
    log: Log, removed: set[int], expected: list[str]
) -> None:
    entries = [entry for entry in log.entries if entry.seq not in removed]
    report = verify(entries, log.checkpoints, log.keys.public_key_b64)
    assert messages(report.errors) == expected
    assert not report.ok


def test_swapped_entries_are_reported(log: Log) -> None:
    entries = list(log.entries)
    entries[5], entries[6] = entries[6], entries[5]
    assert errors_of(entries, log.checkpoints, log.keys.public_key_b64) == [
        "entry 6: out of order (found after entry 7)"
    ]


def test_swapped_entry_contents_are_reported(log: Log) -> None:
    """The rows for 6 and 7 trade everything but their sequence numbers."""
    entries = list(log.entries)
    sixth, seventh = entries[5], entries[6]
    entries[5] = dataclasses.replace(seventh, seq=6)
    entries[6] = dataclasses.replace(sixth, seq=7)
    assert errors_of(entries, log.checkpoints, log.keys.public_key_b64) == [
        "entry 6: hash does not match its content (edited?)",
        "entry 6: previous hash does not match entry 5 (reordered or removed?)",
        "entry 7: hash does not match its content (edited?)",
        "entry 7: previous hash does not match entry 6 (reordered or removed?)",
        "entry 8: previous hash does not match entry 7 (reordered or removed?)",
    ]


def test_duplicated_entry_is_reported(log: Log) -> None:
    entries = list(log.entries)
    entries.insert(20, entries[19])
    assert errors_of(entries, log.checkpoints, log.keys.public_key_b64) == [
        "entry 20: appears more than once"
    ]


def test_every_problem_is_reported_not_only_the_first(log: Log) -> None:
    entries = [entry for entry in log.entries if entry.seq != 10]
    assert entries[30].seq == 32 and entries[30].reason != "admin"
    entries[30] = dataclasses.replace(entries[30], reason="admin")
    first, second, _ = log.checkpoints
    checkpoints = [first, dataclasses.replace(second, at=second.at + 1)]
    report = verify(entries, checkpoints, log.keys.public_key_b64)
    assert messages(report.findings) == [
        "entry 10 missing (gap after 9)",
        "entry 32: hash does not match its content (edited?)",
        "entries after the last checkpoint (101-250) are not yet signed",
        "checkpoint at 200: bad signature",
    ]
    severities = [finding.severity for finding in report.findings]
    assert severities == ["error", "error", "warning", "error"]
    assert (report.head_seq, report.signed_seq) == (250, 100)


def test_checkpoint_forged_with_another_key_fails(log: Log, other_keys: AuditKeys) -> None:
    entries = list(log.entries)
    entries[149] = dataclasses.replace(entries[149], reason="admin")
    rehashed = entries[:149]
    for entry in entries[149:]:
        rehashed.append(
            new_entry(
                rehashed[-1],
                at=entry.at,
                reason=entry.reason,
                subject=entry.subject,
                erased=entry.erased,
            )
        )
    forged_own_id = [
        log.checkpoints[0],
        *(make_checkpoint(other_keys, rehashed[s - 1], T0) for s in (200, 250)),
    ]
    wrong_key = f"signed by key {other_keys.key_id}, not the given public key {log.keys.key_id}"
    assert errors_of(rehashed, forged_own_id, log.keys.public_key_b64) == [
        f"checkpoint at 200: {wrong_key}",
        f"checkpoint at 250: {wrong_key}",
    ]
    forged_our_id = [
        log.checkpoints[0],
        *(
            dataclasses.replace(checkpoint, key_id=log.keys.key_id)
            for checkpoint in forged_own_id[1:]
        ),
    ]
    assert errors_of(rehashed, forged_our_id, log.keys.public_key_b64) == [
        "checkpoint at 200: bad signature",
        "checkpoint at 250: bad signature",
    ]


def test_verifying_with_the_wrong_public_key_fails_every_checkpoint(
    log: Log, other_keys: AuditKeys
) -> None:
    report = verify(log.entries, log.checkpoints, other_keys.public_key_b64)
    assert len(report.errors) == 3
    assert all("not the given public key" in finding.message for finding in report.errors)
    assert report.signed_seq == 0


def test_truncated_tail_after_the_last_checkpoint_is_a_warning(log: Log) -> None:
    entries = log.entries[:230]
    report = verify(entries, log.checkpoints[:2], log.keys.public_key_b64)
    assert report.ok
    assert report.errors == ()
    assert messages(report.warnings) == [
        "entries after the last checkpoint (201-230) are not yet signed"
    ]
    assert (report.head_seq, report.signed_seq) == (230, 200)
    assert (
        str(report.warnings[0])
        == "warning: entries after the last checkpoint (201-230) are not yet signed"
    )


def test_log_without_a_checkpoint_warns(keys: AuditKeys) -> None:
    small = build_log(keys, 3, 100, close=False)
    report = verify(small.entries, [], keys.public_key_b64)
    assert report.ok
    assert messages(report.warnings) == ["no checkpoint yet: entries 1-3 are not yet signed"]


def test_checkpoint_whose_head_hash_does_not_match_is_an_error(log: Log) -> None:
    wrong_head = dataclasses.replace(log.entries[99], hash=log.entries[98].hash)
    checkpoints = [make_checkpoint(log.keys, wrong_head, T0 + 500), *log.checkpoints[1:]]
    report = verify(log.entries, checkpoints, log.keys.public_key_b64)
    assert messages(report.errors) == ["checkpoint at 100: head hash does not match entry 100"]
    assert not report.ok


def test_checkpoints_out_of_order_are_reported(log: Log) -> None:
    checkpoints = [log.checkpoints[1], log.checkpoints[0], log.checkpoints[2]]
    assert errors_of(log.entries, checkpoints, log.keys.public_key_b64) == [
        "checkpoint at 100: out of order (follows checkpoint at 200)"
    ]


def test_checkpoint_beyond_the_log_reports_truncation(log: Log) -> None:
    assert errors_of(log.entries[:240], log.checkpoints, log.keys.public_key_b64) == [
        "checkpoint at 250: entries 241-250 missing (log truncated?)"
    ]


def next_float(at: float) -> float:
    return math.nextafter(at, math.inf)


def last_base64_digit_changed(text: str) -> str:
    """The same bytes spelled differently: flips an unused low bit of the last digit."""
    stripped = text.rstrip("=")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    digit = alphabet[alphabet.index(stripped[-1]) ^ 1]
    changed = stripped[:-1] + digit + text[len(stripped) :]
    assert changed != text and base64.b64decode(changed) == base64.b64decode(text)
    return changed


@pytest.mark.parametrize(
    ("where", "change", "expected"),
    [
        (
            "entry",
            {"at": next_float},
            "entry 5: time is not a whole number of microseconds",
        ),
        ("entry", {"at": float("nan")}, "entry 5: time is not a finite, non-negative number"),
        ("entry", {"seq": 0}, "entry at position 5: sequence number 0 is not an integer"),
        ("entry", {"hash": "AB" * 32}, "entry 5: hash is not 64 lowercase hex digits"),
        ("entry", {"reason": "expired "}, "entry 5: unknown reason 'expired '"),
        ("entry", {"erased": {"data key": 1}}, "entry 5: erased kind 'data key' is not [a-z]"),
        ("entry", {"prev_hash": "0" * 63}, "entry 5: previous hash is not 64 lowercase hex digits"),
        (
            "checkpoint",
            {"signature": last_base64_digit_changed},
            "checkpoint at 5: signature is not canonical base64 of 64 bytes",
        ),
        ("checkpoint", {"at": next_float}, "checkpoint at 5: time is not a whole number of"),
        ("checkpoint", {"key_id": "KEY"}, "checkpoint at 5: key id is not 16 lowercase hex digits"),
        ("checkpoint", {"seq": True}, "checkpoint at position 1: sequence number True is not an"),
    ],
)
def test_malformed_values_are_reported(
    keys: AuditKeys, where: str, change: dict[str, Any], expected: str
) -> None:
    small = build_log(keys, 6, 5, close=False)
    entries: list[Any] = list(small.entries)
    checkpoints: list[Any] = list(small.checkpoints)
    records, index = (entries, 4) if where == "entry" else (checkpoints, 0)
    values = {
        name: value(getattr(records[index], name)) if callable(value) else value
        for name, value in change.items()
    }
    records[index] = dataclasses.replace(records[index], **values)
    report = verify(entries, checkpoints, keys.public_key_b64)
    assert not report.ok
    assert any(finding.message.startswith(expected) for finding in report.errors), report.errors


def test_import_rejects_a_public_key_in_non_canonical_base64(log: Log) -> None:
    lines = list(export_lines(log.entries[:2], [], log.keys.public_key_b64))
    header = json.loads(lines[0])
    header["public_key"] = last_base64_digit_changed(header["public_key"])
    lines[0] = json.dumps(header) + "\n"
    with pytest.raises(AuditFormatError, match=r"^line 1: header: public key is not base64"):
        import_lines(lines)


def test_verify_rejects_a_malformed_public_key(log: Log) -> None:
    with pytest.raises(ValueError, match="public key is not base64"):
        verify(log.entries, log.checkpoints, "not a key")


# --- subjects ----------------------------------------------------------------------------


def test_subject_is_a_stable_keyed_hash_that_hides_the_id(
    keys: AuditKeys, other_keys: AuditKeys
) -> None:
    instance_id = "3f2b9c1e-instance-id"
    subject = keys.subject(instance_id)
    assert subject == keys.subject(instance_id)
    assert subject != other_keys.subject(instance_id)
    assert subject != keys.subject(instance_id + "x")
    assert len(subject) == 64 and int(subject, 16) >= 0
    assert instance_id not in subject
    assert subject != hashlib.sha256(instance_id.encode()).hexdigest()
    with pytest.raises(ValueError, match="non-empty string"):
        keys.subject("")


def test_subject_survives_reloading_the_key_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.json"
    first = AuditKeys.load_or_create(path)
    again = AuditKeys.load_or_create(path)
    assert again.subject("abc") == first.subject("abc")
    assert (again.key_id, again.public_key_b64) == (first.key_id, first.public_key_b64)


# --- export and import -------------------------------------------------------------------


def test_export_import_round_trip_verifies(log: Log, tmp_path: Path) -> None:
    path = tmp_path / "purge-log.jsonl"
    path.write_text("".join(export_lines(log.entries, log.checkpoints, log.keys.public_key_b64)))
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + 250 + 3
    assert json.loads(lines[0]) == {
        "type": "header",
        "format": "sipis-purge-log/1",
        "key_id": log.keys.key_id,
        "public_key": log.keys.public_key_b64,
    }
    assert json.loads(lines[101])["type"] == "checkpoint" and json.loads(lines[101])["seq"] == 100
    with path.open() as handle:
        imported = import_lines(handle)
    assert imported.entries == log.entries
    assert imported.checkpoints == log.checkpoints
    assert (imported.public_key_b64, imported.key_id) == (log.keys.public_key_b64, log.keys.key_id)
    report = verify(imported.entries, imported.checkpoints, imported.public_key_b64)
    assert report.ok and report.findings == ()


def test_record_json_round_trip(log: Log) -> None:
    entry, checkpoint = log.entries[99], log.checkpoints[0]
    assert entry_from_json(json.loads(json.dumps(entry_to_json(entry)))) == entry
    assert (
        checkpoint_from_json(json.loads(json.dumps(checkpoint_to_json(checkpoint)))) == checkpoint
    )
    assert entry_to_json(entry)["erased"] == dict(entry.erased)


@pytest.mark.parametrize(
    ("member", "value", "message"),
    [
        ("seq", True, "entry: 'seq' is not an integer"),
        ("seq", 1.0, "entry: 'seq' is not an integer"),
        ("at", "1700000000", "entry: 'at' is not a number"),
        ("at", 10**400, "entry: 'at' is out of range"),
        ("erased", {"accounts": 1.5}, 'entry: "erased" is not an object of integer counts'),
        ("erased", [1], 'entry: "erased" is not an object of integer counts'),
        ("hash", None, "entry: 'hash' is not a string"),
        ("type", "checkpoint", 'entry: "type" is not "entry"'),
        ("extra", 1, "entry: expected exactly the members at, erased, hash, prev_hash, reason,"),
    ],
)
def test_entry_from_json_rejects_wrong_shapes(
    log: Log, member: str, value: object, message: str
) -> None:
    document = entry_to_json(log.entries[0])
    document[member] = value
    with pytest.raises(AuditFormatError, match="^" + re.escape(message)):
        entry_from_json(document)
    with pytest.raises(AuditFormatError, match=r"^entry: not a JSON object$"):
        entry_from_json([document])


def test_checkpoint_from_json_rejects_wrong_shapes(log: Log) -> None:
    document = checkpoint_to_json(log.checkpoints[0])
    document["signature"] = 7
    with pytest.raises(AuditFormatError, match=r"^checkpoint: 'signature' is not a string$"):
        checkpoint_from_json(document)
    del document["signature"]
    with pytest.raises(AuditFormatError, match=r"^checkpoint: expected exactly the members"):
        checkpoint_from_json(document)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no header line"),
        ('{"type":"entry"}\n', "line 1: the first record is not the header"),
        ("{nope\n", "line 1: not valid JSON"),
        (
            '{"type":"header","format":"sipis-purge-log/2","key_id":"","public_key":""}\n',
            "line 1: header: format is not sipis-purge-log/1",
        ),
    ],
)
def test_import_rejects_malformed_files(text: str, message: str) -> None:
    with pytest.raises(AuditFormatError, match="^" + re.escape(message)):
        import_lines(io.StringIO(text))


def test_import_rejects_a_header_whose_key_id_does_not_match(
    log: Log, other_keys: AuditKeys
) -> None:
    lines = list(export_lines(log.entries[:2], [], log.keys.public_key_b64))
    header = json.loads(lines[0])
    header["key_id"] = other_keys.key_id
    lines[0] = json.dumps(header) + "\n"
    with pytest.raises(
        AuditFormatError, match=r"^line 1: header: key_id does not match the public key$"
    ):
        import_lines(lines)


def test_import_rejects_non_finite_numbers(log: Log) -> None:
    lines = list(export_lines(log.entries[:1], [], log.keys.public_key_b64))
    lines[1] = lines[1].replace(json.dumps(log.entries[0].at), "NaN")
    with pytest.raises(AuditFormatError, match=r"^line 2: not valid JSON$"):
        import_lines(lines)


# --- key file ----------------------------------------------------------------------------


def key_material(path: Path) -> list[str]:
    """Every spelling of the secrets in the key file that could leak."""
    document = json.loads(path.read_text())
    spelled = []
    for name in ("hmac_key", "signing_key"):
        raw = base64.b64decode(document[name])
        spelled += [document[name], raw.hex(), repr(raw), base64.urlsafe_b64encode(raw).decode()]
    return spelled


def test_key_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "audit" / "keys.json"
    keys = AuditKeys.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["keys.json"]
    document = json.loads(path.read_text())
    assert sorted(document) == ["format", "hmac_key", "key_id", "signing_key"]
    assert document["key_id"] == keys.key_id
    assert len(base64.b64decode(document["hmac_key"])) == 32
    assert len(base64.b64decode(document["signing_key"])) == 32


def test_key_material_never_appears_in_repr_or_str(tmp_path: Path) -> None:
    path = tmp_path / "audit.json"
    keys = AuditKeys.load_or_create(path)
    shown = [repr(keys), str(keys), repr(keys.verifier()), f"{keys}", f"{keys!r}"]
    assert repr(keys) == f"AuditKeys(key_id={keys.key_id!r}, path={str(path)!r})"
    for secret in key_material(path):
        assert all(secret not in text for text in shown)
    assert not hasattr(keys, "__dict__")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda d: d.update(hmac_key=d["hmac_key"][:-4]), "hmac_key is not base64 of 32 bytes"),
        (
            lambda d: d.update(signing_key=d["signing_key"] + "AAAA"),
            "signing_key is not base64 of a raw",
        ),
        (lambda d: d.update(key_id="0" * 16), "key_id does not match the signing key"),
        (lambda d: d.update(extra=d["signing_key"]), "expected exactly the members"),
        (lambda d: d.update(format="other"), "format is not sipis-audit-keys/1"),
    ],
)
def test_key_file_errors_carry_no_key_material(
    tmp_path: Path, corrupt: Callable[[dict[str, Any]], None], message: str
) -> None:
    path = tmp_path / "audit.json"
    AuditKeys.load_or_create(path)
    secrets = key_material(path)
    document = json.loads(path.read_text())
    corrupt(document)
    path.write_text(json.dumps(document))
    with pytest.raises(AuditKeyError) as caught:
        AuditKeys.load(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__context__ is None
    for secret in secrets:
        assert secret not in str(caught.value) and secret not in repr(caught.value)


def test_key_file_that_is_not_json_reports_no_content(tmp_path: Path) -> None:
    path = tmp_path / "audit.json"
    AuditKeys.load_or_create(path)
    secrets = key_material(path)
    text = path.read_text()
    path.write_text(text[:-5])
    with pytest.raises(AuditKeyError, match=r"malformed: not valid JSON$") as caught:
        AuditKeys.load(path)
    assert caught.value.__cause__ is None and caught.value.__context__ is None
    assert all(secret not in str(caught.value) for secret in secrets)


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.json"
    AuditKeys.load_or_create(path)
    path.chmod(0o644)
    with pytest.raises(
        AuditKeyError, match=r"accessible by group or others \(mode 0644\); expected 0600"
    ):
        AuditKeys.load_or_create(path)


def test_missing_key_file_is_reported_by_load(tmp_path: Path) -> None:
    with pytest.raises(AuditKeyError, match="cannot open audit key file: No such file"):
        AuditKeys.load(tmp_path / "absent.json")
    assert not (tmp_path / "absent.json").exists()


def test_verifier_holds_only_the_public_key(keys: AuditKeys) -> None:
    verifier = keys.verifier()
    assert isinstance(verifier, AuditVerifier)
    assert (verifier.key_id, verifier.public_key_b64) == (keys.key_id, keys.public_key_b64)
    assert verifier.verify(keys.sign(b"data"), b"data")
    assert not verifier.verify(keys.sign(b"data"), b"date")
    assert set(AuditVerifier.__slots__) == {"_public_key", "key_id", "public_key_b64"}


# --- every mutation of an exported log is detected ---------------------------------------


@pytest.fixture(scope="module")
def small_export(keys: AuditKeys) -> tuple[Log, bytes]:
    small = build_log(keys, 12, 5)
    assert [checkpoint.seq for checkpoint in small.checkpoints] == [5, 10, 12]
    text = "".join(export_lines(small.entries, small.checkpoints, keys.public_key_b64))
    return small, text.encode("ascii")


def detected(small: Log, exported: bytes) -> bool:
    """True when the import fails or verification reports an error."""
    try:
        imported = import_lines(exported.decode("utf-8").splitlines(keepends=True))
        return not verify(imported.entries, imported.checkpoints, imported.public_key_b64).ok
    except (UnicodeDecodeError, AuditFormatError):
        return True


def same_log(small: Log, exported: bytes) -> bool:
    imported = import_lines(exported.decode("utf-8").splitlines(keepends=True))
    return (imported.entries, imported.checkpoints, imported.public_key_b64) == (
        small.entries,
        small.checkpoints,
        small.keys.public_key_b64,
    )


def test_unchanged_export_is_not_detected(small_export: tuple[Log, bytes]) -> None:
    small, exported = small_export
    assert not detected(small, exported)


@settings(max_examples=300)
@given(data=st.data())
def test_any_single_byte_change_is_detected(
    small_export: tuple[Log, bytes], data: st.DataObject
) -> None:
    small, exported = small_export
    position = data.draw(st.integers(0, len(exported) - 1), label="position")
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != exported[position]), label="byte")
    mutated = exported[:position] + bytes([byte]) + exported[position + 1 :]
    # Spelling a value differently (1700000001.0 as 1700000001e0) changes nothing.
    assert detected(small, mutated) or same_log(small, mutated)


hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)
entry_fields = {
    "seq": st.integers(-5, 2**60),
    "at": st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(0, 2**40).map(lambda us: us / 1e6),
    "reason": st.sampled_from(REASONS) | st.text(max_size=20),
    "subject": hex64 | st.text(max_size=70),
    "erased": st.dictionaries(st.text(max_size=8), st.integers(-2, 5), max_size=5),
    "prev_hash": hex64,
    "hash": hex64,
}
checkpoint_fields = {
    "seq": st.integers(-5, 2**60),
    "at": st.floats(allow_nan=False) | st.integers(0, 2**40).map(lambda us: us / 1e6),
    "head_hash": hex64,
    "key_id": st.text("0123456789abcdef", min_size=16, max_size=16),
    "signature": st.binary(min_size=64, max_size=64).map(lambda b: base64.b64encode(b).decode()),
}


@settings(max_examples=300)
@given(data=st.data())
def test_any_field_change_is_detected(small_export: tuple[Log, bytes], data: st.DataObject) -> None:
    small, _ = small_export
    entries: list[Any] = list(small.entries)
    checkpoints: list[Any] = list(small.checkpoints)
    if data.draw(st.booleans(), label="mutate a checkpoint"):
        records, fields = checkpoints, checkpoint_fields
    else:
        records, fields = entries, entry_fields
    index = data.draw(st.integers(0, len(records) - 1), label="index")
    name = data.draw(st.sampled_from(sorted(fields)), label="field")
    seq, old = records[index].seq, getattr(records[index], name)
    new = data.draw(fields[name].filter(lambda value: value != old), label="value")
    records[index] = dataclasses.replace(records[index], **{name: new})
    report = verify(entries, checkpoints, small.keys.public_key_b64)
    assert not report.ok
    named = {seq, new if name == "seq" else None, None}
    assert any(finding.seq in named for finding in report.errors), report.errors
