"""The purge log: a tamper-evident record of every erasure, with signed checkpoints.

Every erasure of an instance appends one :class:`PurgeEntry`: when, why (one
of :data:`REASONS`), what was erased (counts by kind), and a ``subject`` that
is HMAC-SHA256 of the instance id under a secret audit key.  The log holds no
instance id and no personal data: the operator, who holds the audit key, can
find an instance's entry (``sipis audit show``), while an auditor, who holds
only the public key, can check the log without learning whom an entry
concerned.  Each entry carries the previous entry's hash; at least every
:data:`CHECKPOINT_EVERY` entries and on shutdown a :class:`Checkpoint` signs
the head of the chain with Ed25519 (RFC 8032).  :func:`verify` checks all of
it with the public key alone and reports every problem it finds.

This module computes and checks rows; a store persists them.

Encoding
--------
Hashes and signatures cover *canonical JSON*: one object, members sorted by
name, no whitespace, integers in plain decimal, ASCII.  Every string in it is
restricted to characters JSON writes unescaped, so the bytes follow from the
values alone.  A time is seconds since the epoch at whole microseconds,
written as a string with exactly six decimals (``"1700000000.250000"``).

The entry hash is the lowercase hex SHA-256 of::

    {"at":"<time>","domain":"sipis/purge-entry/1","erased":{"<kind>":<count>,...},
     "prev_hash":"<hex>","reason":"<reason>","seq":<seq>,"subject":"<hex>"}

A checkpoint's signature is Ed25519 over::

    {"at":"<time>","domain":"sipis/purge-checkpoint/1","head_hash":"<hex>",
     "key_id":"<hex>","seq":<seq>}

(shown wrapped; the real bytes are one line).  Field rules: ``seq`` is an
integer from 1 to 2^53-1 and entries are numbered 1, 2, 3, ... without gaps;
``reason`` is one of :data:`REASONS`; ``subject``, ``prev_hash``, ``hash`` and
``head_hash`` are 64 lowercase hex digits; entry 1's ``prev_hash`` is 64
zeros; each erased kind matches ``[a-z][a-z0-9_]{0,31}`` and each count is an
integer from 0 to 2^53-1; ``key_id`` is the first 16 hex digits of the SHA-256
of the raw 32-byte public key; signatures and public keys are standard base64
with padding.  ``subject`` is HMAC-SHA256 of the instance id's UTF-8 bytes.

Export
------
:func:`export_lines` writes JSON lines: first a header
``{"format":"sipis-purge-log/1","key_id":...,"public_key":...,"type":"header"}``,
then every entry (``"type":"entry"``, the :class:`PurgeEntry` fields, ``at``
as a JSON number) with each checkpoint (``"type":"checkpoint"``, the
:class:`Checkpoint` fields) right after the entry it covers.  The header's
key only says which key the operator claims; an auditor checks its key id
against the one the operator published before trusting a verification.

What it proves
--------------
An entry edited, removed, inserted or moved anywhere up to the last
checkpoint is reported, even if the chain was rewritten around it, as long as
the private key stayed private.  Entries after the last checkpoint are held
only by the chain: removing them leaves no trace, which is why :func:`verify`
warns about them and why a checkpoint is also written on shutdown.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from sipis.keyfiles import write_private

REASONS: Final = ("expired", "disabled", "token_invalid", "admin")
"""Why an instance was erased: lifetime ended, app disabled it, push token rejected, operator."""

CHECKPOINT_EVERY: Final = 100
"""Sign a checkpoint at least once per this many entries (and on shutdown)."""

GENESIS_HASH: Final = "0" * 64
"""The ``prev_hash`` of entry 1."""

ENTRY_DOMAIN: Final = "sipis/purge-entry/1"
CHECKPOINT_DOMAIN: Final = "sipis/purge-checkpoint/1"
EXPORT_FORMAT: Final = "sipis-purge-log/1"
KEY_FILE_FORMAT: Final = "sipis-audit-keys/1"

MAX_INTEGER: Final = 2**53 - 1
"""The largest sequence number or count: every JSON reader holds it exactly."""

_HMAC_KEY_BYTES = 32
_ED25519_KEY_BYTES = 32
_ED25519_SIGNATURE_BYTES = 64
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_ERASED_KIND = re.compile(r"[a-z][a-z0-9_]{0,31}")


class AuditKeyError(Exception):
    """The audit key file cannot be used; the message names the file, never key material."""


class AuditFormatError(ValueError):
    """An exported purge log (or one of its records) is not well formed."""


# --- entries and checkpoints -------------------------------------------------------------


@dataclass(frozen=True)
class PurgeEntry:
    """One erasure.  ``erased`` is the entry's own copy; it takes no part in ``hash()``."""

    seq: int
    at: float
    reason: str
    subject: str
    erased: dict[str, int] = field(hash=False)
    prev_hash: str
    hash: str

    def __post_init__(self) -> None:
        if isinstance(self.erased, Mapping):
            object.__setattr__(self, "erased", dict(self.erased))


@dataclass(frozen=True)
class Checkpoint:
    """A signature over the chain's head: entry ``seq`` had hash ``head_hash``."""

    seq: int
    at: float
    head_hash: str
    key_id: str
    signature: str


def entry_hash(
    *,
    seq: int,
    at: float,
    reason: str,
    subject: str,
    erased: Mapping[str, int],
    prev_hash: str,
) -> str:
    """The hex SHA-256 of the entry's canonical encoding; ValueError names any invalid field."""
    problems = _entry_problems(seq, at, reason, subject, erased, prev_hash)
    if problems:
        raise ValueError("; ".join(problems))
    return _entry_digest(seq, at, reason, subject, erased, prev_hash)


def checkpoint_message(*, seq: int, at: float, head_hash: str, key_id: str) -> bytes:
    """The bytes a checkpoint's signature covers; ValueError names any invalid field."""
    problems = _checkpoint_field_problems(seq, at, head_hash, key_id)
    if problems:
        raise ValueError("; ".join(problems))
    return _checkpoint_message(seq, at, head_hash, key_id)


def new_entry(
    previous: PurgeEntry | None,
    *,
    at: float,
    reason: str,
    subject: str,
    erased: Mapping[str, int],
) -> PurgeEntry:
    """The entry that follows ``previous`` (or the first one); ``at`` is kept to the microsecond."""
    seq = 1 if previous is None else previous.seq + 1
    prev_hash = GENESIS_HASH if previous is None else previous.hash
    at = _whole_microseconds(at)
    erased = dict(erased)
    digest = entry_hash(
        seq=seq, at=at, reason=reason, subject=subject, erased=erased, prev_hash=prev_hash
    )
    return PurgeEntry(seq, at, reason, subject, erased, prev_hash, digest)


def make_checkpoint(keys: AuditKeys, head: PurgeEntry, at: float) -> Checkpoint:
    """Sign the chain up to and including ``head``."""
    at = _whole_microseconds(at)
    message = checkpoint_message(seq=head.seq, at=at, head_hash=head.hash, key_id=keys.key_id)
    signature = base64.b64encode(keys.sign(message)).decode("ascii")
    return Checkpoint(head.seq, at, head.hash, keys.key_id, signature)


def checkpoint_due(
    head_seq: int, last_checkpoint_seq: int, *, closing: bool = False, every: int = CHECKPOINT_EVERY
) -> bool:
    """Whether to sign now: ``every`` entries since the last checkpoint, or any unsigned on close.

    Sequence numbers are 0 when there is no entry or no checkpoint yet.
    """
    unsigned = head_seq - last_checkpoint_seq
    return unsigned > 0 if closing else unsigned >= every


def _whole_microseconds(at: float) -> float:
    if not _is_number(at) or not math.isfinite(at) or at < 0:
        raise ValueError("time must be a finite, non-negative number of seconds")
    return round(float(at), 6)


def _entry_digest(
    seq: int, at: float, reason: str, subject: str, erased: Mapping[str, int], prev_hash: str
) -> str:
    document = {
        "at": _format_time(at),
        "domain": ENTRY_DOMAIN,
        "erased": dict(erased),
        "prev_hash": prev_hash,
        "reason": reason,
        "seq": seq,
        "subject": subject,
    }
    return hashlib.sha256(_canonical_json(document)).hexdigest()


def _checkpoint_message(seq: int, at: float, head_hash: str, key_id: str) -> bytes:
    document = {
        "at": _format_time(at),
        "domain": CHECKPOINT_DOMAIN,
        "head_hash": head_hash,
        "key_id": key_id,
        "seq": seq,
    }
    return _canonical_json(document)


def _canonical_json(document: Mapping[str, object]) -> bytes:
    text = json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return text.encode("ascii")


def _format_time(at: float) -> str:
    return f"{at:.6f}"


def _entry_problems(
    seq: object, at: object, reason: object, subject: object, erased: object, prev_hash: object
) -> list[str]:
    problems = [
        problem
        for problem in (
            _seq_problem(seq),
            _time_problem(at),
            None if reason in REASONS else f"unknown reason {_shown(reason)}",
            _hex64_problem("subject", subject),
            _hex64_problem("previous hash", prev_hash),
        )
        if problem is not None
    ]
    problems.extend(_erased_problems(erased))
    return problems


def _checkpoint_field_problems(
    seq: object, at: object, head_hash: object, key_id: object
) -> list[str]:
    key_id_problem = (
        None
        if isinstance(key_id, str) and _KEY_ID.fullmatch(key_id)
        else "key id is not 16 lowercase hex digits"
    )
    return [
        problem
        for problem in (
            _seq_problem(seq),
            _time_problem(at),
            _hex64_problem("head hash", head_hash),
            key_id_problem,
        )
        if problem is not None
    ]


def _seq_problem(seq: object) -> str | None:
    if isinstance(seq, int) and not isinstance(seq, bool) and 1 <= seq <= MAX_INTEGER:
        return None
    return f"sequence number {_shown(seq)} is not an integer from 1 to 2^53-1"


def _time_problem(at: object) -> str | None:
    if isinstance(at, bool) or not isinstance(at, int | float):
        return "time is not a finite, non-negative number"
    if not math.isfinite(at) or at < 0:
        return "time is not a finite, non-negative number"
    if float(_format_time(at)) != at:
        return "time is not a whole number of microseconds"
    return None


def _hex64_problem(name: str, value: object) -> str | None:
    if isinstance(value, str) and _HEX64.fullmatch(value):
        return None
    return f"{name} is not 64 lowercase hex digits"


def _erased_problems(erased: object) -> list[str]:
    if not isinstance(erased, Mapping):
        return ["erased is not a mapping of kinds to counts"]
    problems = []
    for kind, count in erased.items():
        if not isinstance(kind, str) or not _ERASED_KIND.fullmatch(kind):
            problems.append(f"erased kind {_shown(kind)} is not [a-z][a-z0-9_]{{0,31}}")
        elif isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_INTEGER:
            problems.append(f"erased count of {kind} is not an integer from 0 to 2^53-1")
    return problems


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _shown(value: object) -> str:
    """A value read from the log, quoted and cut short for a message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- keys --------------------------------------------------------------------------------


def _b64decode_exact(text: object, length: int) -> bytes | None:
    """The bytes of canonical standard base64 ``text`` if they are ``length`` long, else None."""
    if not isinstance(text, str) or not text.isascii():
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        return None
    if len(raw) != length or base64.b64encode(raw).decode("ascii") != text:
        return None
    return raw


def _key_id(public_key_raw: bytes) -> str:
    return hashlib.sha256(public_key_raw).hexdigest()[:16]


class AuditVerifier:
    """Checks signatures with the public key alone."""

    __slots__ = ("_public_key", "key_id", "public_key_b64")

    def __init__(self, public_key_b64: str) -> None:
        raw = _b64decode_exact(public_key_b64, _ED25519_KEY_BYTES)
        if raw is None:
            raise ValueError("public key is not base64 of a raw 32-byte Ed25519 key")
        try:
            self._public_key = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError:
            raise ValueError("public key is not a valid Ed25519 key") from None
        self.public_key_b64 = public_key_b64
        self.key_id = _key_id(raw)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """Whether ``signature`` is this key's Ed25519 signature of ``data``."""
        try:
            self._public_key.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def __repr__(self) -> str:
        return f"AuditVerifier(key_id={self.key_id!r})"


class AuditKeys:
    """The audit HMAC key and Ed25519 signing key, kept in one JSON file.

    The file (mode 0600; its directory is created mode 0700) holds
    ``{"format": "sipis-audit-keys/1", "hmac_key": <base64 of 32 bytes>,
    "key_id": <hex>, "signing_key": <base64 of the raw 32-byte Ed25519
    private key>}``.  It is created once and never rewritten.  Key material
    appears in no repr, str or error message.
    """

    __slots__ = ("_hmac_key", "_signing_key", "key_id", "path", "public_key_b64")

    def __init__(self, path: Path, hmac_key: bytes, signing_key: Ed25519PrivateKey) -> None:
        """Use :meth:`load` or :meth:`load_or_create`."""
        public_raw = signing_key.public_key().public_bytes_raw()
        self.path = path
        self._hmac_key = hmac_key
        self._signing_key = signing_key
        self.public_key_b64 = base64.b64encode(public_raw).decode("ascii")
        self.key_id = _key_id(public_raw)

    @classmethod
    def load_or_create(cls, path: Path | str) -> AuditKeys:
        """Load the key file, creating it with fresh keys if it does not exist."""
        path = Path(path)
        if not path.exists():
            cls._create(path)
        return cls.load(path)

    @classmethod
    def load(cls, path: Path | str) -> AuditKeys:
        """Load an existing key file; refuses one that group or others can access."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise AuditKeyError(f"{path}: cannot open audit key file: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as handle:
            mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
            if mode & 0o077:
                raise AuditKeyError(
                    f"{path}: audit key file is accessible by group or others "
                    f"(mode {mode:04o}); expected 0600"
                )
            raw = handle.read()
        return cls._parse(path, raw)

    @classmethod
    def _parse(cls, path: Path, raw: bytes) -> AuditKeys:
        def malformed(what: str) -> AuditKeyError:
            return AuditKeyError(f"{path}: audit key file is malformed: {what}")

        # Raised outside the handler: a JSON error holds the whole document, key material included.
        try:
            document: object = json.loads(raw)
            parsed = True
        except ValueError:
            parsed = False
        if not parsed:
            raise malformed("not valid JSON")
        members = {"format", "hmac_key", "key_id", "signing_key"}
        if not isinstance(document, dict) or set(document) != members:
            raise malformed(f"expected exactly the members {', '.join(sorted(members))}")
        if document["format"] != KEY_FILE_FORMAT:
            raise malformed(f"format is not {KEY_FILE_FORMAT}")
        hmac_key = _b64decode_exact(document["hmac_key"], _HMAC_KEY_BYTES)
        if hmac_key is None:
            raise malformed("hmac_key is not base64 of 32 bytes")
        signing_raw = _b64decode_exact(document["signing_key"], _ED25519_KEY_BYTES)
        if signing_raw is None:
            raise malformed("signing_key is not base64 of a raw 32-byte Ed25519 key")
        keys = cls(path, hmac_key, Ed25519PrivateKey.from_private_bytes(signing_raw))
        if document["key_id"] != keys.key_id:
            raise malformed("key_id does not match the signing key")
        return keys

    @staticmethod
    def _create(path: Path) -> None:
        """Write fresh keys atomically; if another process won the race, keep its file."""
        signing_key = Ed25519PrivateKey.generate()
        public_raw = signing_key.public_key().public_bytes_raw()
        document = {
            "format": KEY_FILE_FORMAT,
            "hmac_key": base64.b64encode(secrets.token_bytes(_HMAC_KEY_BYTES)).decode("ascii"),
            "key_id": _key_id(public_raw),
            "signing_key": base64.b64encode(signing_key.private_bytes_raw()).decode("ascii"),
        }
        data = json.dumps(document, indent=2).encode("ascii") + b"\n"
        write_private(path, data, replace=False)

    def subject(self, instance_id: str) -> str:
        """The hex HMAC-SHA256 of the instance id: stable under this key, reveals nothing else."""
        if not isinstance(instance_id, str) or not instance_id:
            raise ValueError("instance id must be a non-empty string")
        return hmac.new(self._hmac_key, instance_id.encode("utf-8"), hashlib.sha256).hexdigest()

    def sign(self, data: bytes) -> bytes:
        """The Ed25519 signature of ``data``."""
        return self._signing_key.sign(data)

    def verifier(self) -> AuditVerifier:
        """A verifier holding only the public key."""
        return AuditVerifier(self.public_key_b64)

    def __repr__(self) -> str:
        return f"AuditKeys(key_id={self.key_id!r}, path={str(self.path)!r})"


# --- verification ------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One problem; ``message`` names the entry or checkpoint by its sequence number."""

    severity: Literal["error", "warning"]
    seq: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.message}"


@dataclass(frozen=True)
class VerifyReport:
    """Everything :func:`verify` found, ordered by sequence number."""

    findings: tuple[Finding, ...]
    entries: int
    checkpoints: int
    head_seq: int
    """The highest entry sequence number in the chain (0 for an empty log)."""
    signed_seq: int
    """The highest sequence number a valid checkpoint covers (0 if none)."""

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(finding for finding in self.findings if finding.severity == "error")

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(finding for finding in self.findings if finding.severity == "warning")

    @property
    def ok(self) -> bool:
        """True when nothing is wrong; warnings (entries not yet signed) do not count."""
        return not self.errors


def verify(
    entries: Iterable[PurgeEntry], checkpoints: Iterable[Checkpoint], public_key_b64: str
) -> VerifyReport:
    """Check the whole log with the public key alone; never stops at the first problem.

    ``entries`` are read once, in stored order (which must be sequence order),
    and are not kept, so a long log can stream from its store; checkpoints
    are held in memory.  ValueError if ``public_key_b64`` is not a key.
    """
    verification = _Verification(AuditVerifier(public_key_b64))
    verification.add_checkpoints(checkpoints)
    for position, entry in enumerate(entries, 1):
        verification.add_entry(position, entry)
    return verification.report()


class _Verification:
    def __init__(self, verifier: AuditVerifier) -> None:
        self._verifier = verifier
        self._findings: list[Finding] = []
        self._entry_count = 0
        self._checkpoint_count = 0
        self._head: tuple[int, str] | None = None  # (seq, hash) of the chain's last entry
        self._gaps: list[tuple[int, int]] = []  # missing seq ranges, sorted, inclusive
        self._unmatched: dict[int, list[Checkpoint]] = {}  # signed, awaiting their entry
        self._signed_seq = 0

    def _error(self, seq: int | None, message: str) -> None:
        self._findings.append(Finding("error", seq, message))

    def add_checkpoints(self, checkpoints: Iterable[Checkpoint]) -> None:
        latest = 0
        for position, checkpoint in enumerate(checkpoints, 1):
            self._checkpoint_count += 1
            seq_valid = _seq_problem(checkpoint.seq) is None
            seq = checkpoint.seq if seq_valid else None
            label = f"checkpoint at {seq}" if seq_valid else f"checkpoint at position {position}"
            problems = _checkpoint_field_problems(
                checkpoint.seq, checkpoint.at, checkpoint.head_hash, checkpoint.key_id
            )
            signature = _b64decode_exact(checkpoint.signature, _ED25519_SIGNATURE_BYTES)
            if signature is None:
                problems.append("signature is not canonical base64 of 64 bytes")
            for problem in problems:
                self._error(seq, f"{label}: {problem}")
            if problems or signature is None:
                continue
            if checkpoint.seq < latest:
                self._error(seq, f"{label}: out of order (follows checkpoint at {latest})")
            latest = max(latest, checkpoint.seq)
            if checkpoint.key_id != self._verifier.key_id:
                self._error(
                    seq,
                    f"{label}: signed by key {checkpoint.key_id}, "
                    f"not the given public key {self._verifier.key_id}",
                )
                continue
            message = _checkpoint_message(
                checkpoint.seq, checkpoint.at, checkpoint.head_hash, checkpoint.key_id
            )
            if not self._verifier.verify(signature, message):
                self._error(seq, f"{label}: bad signature")
                continue
            self._unmatched.setdefault(checkpoint.seq, []).append(checkpoint)

    def add_entry(self, position: int, entry: PurgeEntry) -> None:
        self._entry_count += 1
        seq_valid = _seq_problem(entry.seq) is None
        label = f"entry {entry.seq}" if seq_valid else f"entry at position {position}"
        problems = _entry_problems(
            entry.seq, entry.at, entry.reason, entry.subject, entry.erased, entry.prev_hash
        )
        hash_problem = _hex64_problem("hash", entry.hash)
        if hash_problem is not None:
            problems.append(hash_problem)
        for problem in problems:
            self._error(entry.seq if seq_valid else None, f"{label}: {problem}")
        if not problems:
            content_hash = _entry_digest(
                entry.seq, entry.at, entry.reason, entry.subject, entry.erased, entry.prev_hash
            )
            if content_hash != entry.hash:
                self._error(entry.seq, f"{label}: hash does not match its content (edited?)")
        if seq_valid:
            self._place(entry)

    def _place(self, entry: PurgeEntry) -> None:
        seq = entry.seq
        if self._head is None or seq > self._head[0]:
            expected = 1 if self._head is None else self._head[0] + 1
            if seq > expected:
                self._gaps.append((expected, seq - 1))
            elif self._head is None:
                if entry.prev_hash != GENESIS_HASH:
                    self._error(seq, "entry 1: previous hash is not 64 zeros (the first entry's)")
            elif entry.prev_hash != self._head[1]:
                self._error(
                    seq,
                    f"entry {seq}: previous hash does not match entry {self._head[0]} "
                    "(reordered or removed?)",
                )
            self._head = (seq, entry.hash)
            self._match_checkpoints(entry)
        elif self._take_from_gap(seq):
            self._error(seq, f"entry {seq}: out of order (found after entry {self._head[0]})")
            self._match_checkpoints(entry)
        else:
            self._error(seq, f"entry {seq}: appears more than once")

    def _take_from_gap(self, seq: int) -> bool:
        """Remove ``seq`` from the missing ranges; False if it was not missing."""
        index = bisect.bisect_right(self._gaps, (seq, MAX_INTEGER)) - 1
        if index < 0 or self._gaps[index][1] < seq:
            return False
        start, end = self._gaps[index]
        self._gaps[index : index + 1] = [
            (low, high) for low, high in ((start, seq - 1), (seq + 1, end)) if low <= high
        ]
        return True

    def _match_checkpoints(self, entry: PurgeEntry) -> None:
        for checkpoint in self._unmatched.pop(entry.seq, []):
            if checkpoint.head_hash == entry.hash:
                self._signed_seq = max(self._signed_seq, entry.seq)
            else:
                self._error(
                    entry.seq,
                    f"checkpoint at {entry.seq}: head hash does not match entry {entry.seq}",
                )

    def report(self) -> VerifyReport:
        head_seq = 0 if self._head is None else self._head[0]
        for start, end in self._gaps:
            if start == 1:
                message = f"{_entries(1, end)} missing (log starts at {end + 1})"
            else:
                message = f"{_entries(start, end)} missing (gap after {start - 1})"
            self._error(start, message)
        for seq, checkpoints in self._unmatched.items():
            for _ in checkpoints:
                if seq > head_seq:
                    missing = f"{_entries(head_seq + 1, seq)} missing (log truncated?)"
                else:
                    missing = f"entry {seq} missing"
                self._error(seq, f"checkpoint at {seq}: {missing}")
        if head_seq > self._signed_seq:
            first = self._signed_seq + 1
            span = str(head_seq) if first == head_seq else f"{first}-{head_seq}"
            if self._signed_seq == 0:
                unsigned = _entries(first, head_seq)
                verb = "is" if first == head_seq else "are"
                message = f"no checkpoint yet: {unsigned} {verb} not yet signed"
            else:
                message = f"entries after the last checkpoint ({span}) are not yet signed"
            self._findings.append(Finding("warning", first, message))
        ordered = sorted(
            enumerate(self._findings),
            key=lambda item: (item[1].seq is None, item[1].seq or 0, item[0]),
        )
        return VerifyReport(
            findings=tuple(finding for _, finding in ordered),
            entries=self._entry_count,
            checkpoints=self._checkpoint_count,
            head_seq=head_seq,
            signed_seq=self._signed_seq,
        )


def _entries(first: int, last: int) -> str:
    return f"entry {first}" if first == last else f"entries {first}-{last}"


# --- JSON lines export -------------------------------------------------------------------

_ENTRY_MEMBERS = frozenset(
    {"type", "seq", "at", "reason", "subject", "erased", "prev_hash", "hash"}
)
_CHECKPOINT_MEMBERS = frozenset({"type", "seq", "at", "head_hash", "key_id", "signature"})
_HEADER_MEMBERS = frozenset({"type", "format", "key_id", "public_key"})


@dataclass(frozen=True)
class PurgeLogExport:
    """An exported log as read back: the key it names, its entries and checkpoints in file order."""

    public_key_b64: str
    key_id: str
    entries: tuple[PurgeEntry, ...]
    checkpoints: tuple[Checkpoint, ...]


def entry_to_json(entry: PurgeEntry) -> dict[str, Any]:
    """The entry as a JSON object (``"type": "entry"``)."""
    return {
        "type": "entry",
        "seq": entry.seq,
        "at": entry.at,
        "reason": entry.reason,
        "subject": entry.subject,
        "erased": dict(entry.erased),
        "prev_hash": entry.prev_hash,
        "hash": entry.hash,
    }


def entry_from_json(document: object) -> PurgeEntry:
    """An entry from :func:`entry_to_json`'s shape; AuditFormatError on a wrong member or type.

    Values are not judged here: :func:`verify` reports them against the entry.
    """
    members = _members(document, "entry", _ENTRY_MEMBERS)
    erased = members["erased"]
    if not isinstance(erased, dict) or not all(_is_integer(count) for count in erased.values()):
        raise AuditFormatError('entry: "erased" is not an object of integer counts')
    return PurgeEntry(
        seq=_integer(members, "seq"),
        at=_number(members, "at"),
        reason=_string(members, "reason"),
        subject=_string(members, "subject"),
        erased=erased,
        prev_hash=_string(members, "prev_hash"),
        hash=_string(members, "hash"),
    )


def checkpoint_to_json(checkpoint: Checkpoint) -> dict[str, Any]:
    """The checkpoint as a JSON object (``"type": "checkpoint"``)."""
    return {
        "type": "checkpoint",
        "seq": checkpoint.seq,
        "at": checkpoint.at,
        "head_hash": checkpoint.head_hash,
        "key_id": checkpoint.key_id,
        "signature": checkpoint.signature,
    }


def checkpoint_from_json(document: object) -> Checkpoint:
    """A checkpoint from :func:`checkpoint_to_json`'s shape; AuditFormatError if malformed."""
    members = _members(document, "checkpoint", _CHECKPOINT_MEMBERS)
    return Checkpoint(
        seq=_integer(members, "seq"),
        at=_number(members, "at"),
        head_hash=_string(members, "head_hash"),
        key_id=_string(members, "key_id"),
        signature=_string(members, "signature"),
    )


def export_lines(
    entries: Iterable[PurgeEntry], checkpoints: Iterable[Checkpoint], public_key_b64: str
) -> Iterator[str]:
    """The log as JSON lines (each ending in a newline): header, then entries and checkpoints.

    Each checkpoint follows the entry it covers.  ValueError if the key is not a key.
    """
    verifier = AuditVerifier(public_key_b64)
    yield _json_line(
        {
            "type": "header",
            "format": EXPORT_FORMAT,
            "key_id": verifier.key_id,
            "public_key": public_key_b64,
        }
    )
    pending = list(checkpoints)
    index = 0
    for entry in entries:
        yield _json_line(entry_to_json(entry))
        while index < len(pending) and pending[index].seq <= entry.seq:
            yield _json_line(checkpoint_to_json(pending[index]))
            index += 1
    for checkpoint in pending[index:]:
        yield _json_line(checkpoint_to_json(checkpoint))


def import_lines(lines: Iterable[str]) -> PurgeLogExport:
    """Read :func:`export_lines` output back; AuditFormatError names the first bad line.

    Blank lines are skipped.  The header must come first and its key id must
    match its public key.
    """
    header: tuple[str, str] | None = None
    entries: list[PurgeEntry] = []
    checkpoints: list[Checkpoint] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            document = _parse_json(line)
            kind = document.get("type") if isinstance(document, dict) else None
            if kind == "header":
                if header is not None:
                    raise AuditFormatError("a second header")
                header = _header_from_json(document)
            elif header is None:
                raise AuditFormatError("the first record is not the header")
            elif kind == "entry":
                entries.append(entry_from_json(document))
            elif kind == "checkpoint":
                checkpoints.append(checkpoint_from_json(document))
            else:
                raise AuditFormatError(f"unknown record type {_shown(kind)}")
        except AuditFormatError as exc:
            raise AuditFormatError(f"line {number}: {exc}") from None
    if header is None:
        raise AuditFormatError("no header line")
    public_key_b64, key_id = header
    return PurgeLogExport(public_key_b64, key_id, tuple(entries), tuple(checkpoints))


def _json_line(document: Mapping[str, Any]) -> str:
    text = json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return text + "\n"


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _parse_json(line: str) -> object:
    try:
        return json.loads(line, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise AuditFormatError("not valid JSON") from None


def _header_from_json(document: object) -> tuple[str, str]:
    members = _members(document, "header", _HEADER_MEMBERS)
    if members["format"] != EXPORT_FORMAT:
        raise AuditFormatError(f"header: format is not {EXPORT_FORMAT}")
    public_key_b64 = _string(members, "public_key")
    try:
        verifier = AuditVerifier(public_key_b64)
    except ValueError as exc:
        raise AuditFormatError(f"header: {exc}") from None
    if members["key_id"] != verifier.key_id:
        raise AuditFormatError("header: key_id does not match the public key")
    return public_key_b64, verifier.key_id


def _members(document: object, kind: str, names: frozenset[str]) -> dict[str, Any]:
    if not isinstance(document, dict):
        raise AuditFormatError(f"{kind}: not a JSON object")
    if document.get("type") != kind:
        raise AuditFormatError(f'{kind}: "type" is not "{kind}"')
    if set(document) != names:
        raise AuditFormatError(f"{kind}: expected exactly the members {', '.join(sorted(names))}")
    return document


def _integer(members: Mapping[str, Any], name: str) -> int:
    value = members[name]
    if not _is_integer(value):
        raise AuditFormatError(f"{members['type']}: {name!r} is not an integer")
    return int(value)


def _number(members: Mapping[str, Any], name: str) -> float:
    value = members[name]
    if not _is_number(value):
        raise AuditFormatError(f"{members['type']}: {name!r} is not a number")
    try:
        return float(value)
    except OverflowError:
        raise AuditFormatError(f"{members['type']}: {name!r} is out of range") from None


def _string(members: Mapping[str, Any], name: str) -> str:
    value = members[name]
    if not isinstance(value, str):
        raise AuditFormatError(f"{members['type']}: {name!r} is not a string")
    return value
