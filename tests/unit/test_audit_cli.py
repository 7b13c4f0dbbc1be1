"""``sipis audit`` on a purge log written by a real relay, and on tampered copies of it.

A relay (in-process, HTTPS API) creates and deletes five instances whose
registrar is never reached, then closes, which signs a checkpoint over the
head of the log.  Each test works on its own copy of the data directory
(database and keys) and runs the ``sipis`` command as a separate process,
as an auditor would.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from sipis.audit import AuditKeys, import_lines, verify
from tests.peers.api import instance_body, relay_with_api
from tests.peers.relay import relay_config

REGISTRAR = "sip:192.0.2.1:5060;transport=udp"  # never reached: TEST-NET-1, and DNS is not asked
DELETED = 5
CLI_TIMEOUT = 30.0
ERASED = '{"accounts": 1, "data_key": 1, "payload_key": 1, "push_tokens": 2, "queued_messages": 0}'


@dataclass(frozen=True)
class PurgeLog:
    """A data directory whose purge log holds one entry per deleted instance, in order."""

    data_dir: Path
    deleted: tuple[str, ...]  # entry n (1-based) is deleted[n - 1]
    kept: str  # an instance that was never erased


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def purge_log(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PurgeLog]:
    tmp_path = tmp_path_factory.mktemp("relay")
    async with asyncio.timeout(30):
        async with relay_with_api(
            tmp_path, lifecycle={"unregister_wait": 0.2}, api={"create_burst": 50}
        ) as running:
            api = running.client
            created = []
            for n in range(DELETED + 1):
                body = instance_body(REGISTRAR, user=f"user{n}", password=f"pw-{n}-secret")
                status, answer = await api.call("POST", "/v1/instances", body=body)
                assert status == 201, answer
                created.append((answer["id"], answer["secret"]))
            for instance_id, secret in created[:DELETED]:
                status, _ = await api.call("DELETE", f"/v1/instances/{instance_id}", secret=secret)
                assert status == 204
            data_dir = running.relay.config.data_dir
    with sqlite3.connect(data_dir / "sipis.db") as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    yield PurgeLog(data_dir, tuple(i for i, _ in created[:DELETED]), created[DELETED][0])


def copy_of(log: PurgeLog, directory: Path) -> Path:
    """A config whose data directory is a fresh copy of the log's (database and keys)."""
    _, config_path = relay_config(directory)
    shutil.copytree(log.data_dir, directory / "data")
    return config_path


async def sipis(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sipis", *args, "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error: ")]


# --- tampering, each on a fresh copy --------------------------------------------------


def edit_reason(db: sqlite3.Connection) -> None:
    db.execute("UPDATE purge_log SET reason = 'expired' WHERE seq = 2")


def delete_entry(db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM purge_log WHERE seq = 3")


def swap_entries(db: sqlite3.Connection) -> None:
    """Entries 2 and 4 trade places: each keeps its number, takes the other's content."""
    columns = "at, reason, subject, erased, prev_hash, hash"
    second, fourth = (
        db.execute(f"SELECT {columns} FROM purge_log WHERE seq = ?", (seq,)).fetchone()  # noqa: S608
        for seq in (2, 4)
    )
    assignments = ", ".join(f"{name} = ?" for name in columns.split(", "))
    update = f"UPDATE purge_log SET {assignments} WHERE seq = ?"  # noqa: S608
    db.execute(update, (*fourth, 2))
    db.execute(update, (*second, 4))


def forge_signature(db: sqlite3.Connection) -> None:
    """One bit of the checkpoint's signature flipped; still well-formed base64 of 64 bytes."""
    (signature,) = db.execute(
        "SELECT signature FROM checkpoints WHERE seq = ?", (DELETED,)
    ).fetchone()
    raw = bytearray(base64.b64decode(signature))
    raw[10] ^= 0x01
    db.execute(
        "UPDATE checkpoints SET signature = ? WHERE seq = ?",
        (base64.b64encode(bytes(raw)).decode(), DELETED),
    )


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (edit_reason, ["error: entry 2: hash does not match its content (edited?)"]),
        (delete_entry, ["error: entry 3 missing (gap after 2)"]),
        (
            swap_entries,
            [
                "error: entry 2: hash does not match its content (edited?)",
                "error: entry 2: previous hash does not match entry 1 (reordered or removed?)",
                "error: entry 3: previous hash does not match entry 2 (reordered or removed?)",
                "error: entry 4: hash does not match its content (edited?)",
                "error: entry 4: previous hash does not match entry 3 (reordered or removed?)",
                "error: entry 5: previous hash does not match entry 4 (reordered or removed?)",
            ],
        ),
        (forge_signature, [f"error: checkpoint at {DELETED}: bad signature"]),
    ],
    ids=["edited", "deleted", "reordered", "forged-checkpoint"],
)
async def test_verify_names_the_tampered_entry(
    purge_log: PurgeLog,
    tmp_path: Path,
    tamper: Callable[[sqlite3.Connection], None],
    expected: list[str],
) -> None:
    config_path = copy_of(purge_log, tmp_path)
    db = sqlite3.connect(tmp_path / "data" / "sipis.db")
    try:
        with db:
            tamper(db)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    result = await sipis(config_path, "audit", "verify")
    assert result.returncode == 1, result.stdout + result.stderr
    assert errors(result.stdout) == expected, result.stdout
    assert "purge log NOT intact" in result.stdout


async def test_untouched_log_verifies(purge_log: PurgeLog, tmp_path: Path) -> None:
    result = await sipis(copy_of(purge_log, tmp_path), "audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [f"purge log intact: {DELETED} entries, 1 checkpoints"], (
        "the checkpoint written on close covers every entry: no warning either"
    )


async def test_show_finds_each_erased_instance(purge_log: PurgeLog, tmp_path: Path) -> None:
    config_path = copy_of(purge_log, tmp_path)
    results = await asyncio.gather(
        *(sipis(config_path, "audit", "show", i) for i in (*purge_log.deleted, purge_log.kept))
    )
    for seq, (instance_id, result) in enumerate(zip(purge_log.deleted, results, strict=False), 1):
        assert result.returncode == 0, result.stdout + result.stderr
        [line] = result.stdout.splitlines()
        assert line.startswith(f"entry {seq}: erased "), (instance_id, line)
        assert line.endswith(f" UTC, reason disabled, erased {ERASED}"), line
    kept = results[-1]
    assert kept.returncode == 1
    assert kept.stdout.splitlines() == ["no purge-log entry for that instance"]


async def test_export_is_accepted_by_import_and_verify(purge_log: PurgeLog, tmp_path: Path) -> None:
    config_path = copy_of(purge_log, tmp_path)
    output = tmp_path / "purge-log.jsonl"
    result = await sipis(config_path, "audit", "export", "--output", str(output))
    assert result.returncode == 0, result.stderr
    exported = import_lines(output.read_text().splitlines())
    keys = AuditKeys.load(tmp_path / "data" / "keys" / "audit.json")
    assert (exported.key_id, exported.public_key_b64) == (keys.key_id, keys.public_key_b64)
    assert [e.seq for e in exported.entries] == list(range(1, DELETED + 1))
    assert [e.subject for e in exported.entries] == [keys.subject(i) for i in purge_log.deleted]
    assert [c.seq for c in exported.checkpoints] == [DELETED]
    report = verify(exported.entries, exported.checkpoints, exported.public_key_b64)
    assert report.ok and report.findings == (), report.findings
    assert (report.entries, report.head_seq, report.signed_seq) == (DELETED, DELETED, DELETED)
