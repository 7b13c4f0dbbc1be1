"""The SQLite store: rows, the purge log, rotation support, and no trace after erasure."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from sipis.audit import AuditKeys, make_checkpoint, verify
from sipis.store import AccountRow, InstanceRow
from sipis.store.sqlite import SqliteStore


def row(
    instance_id: str, *, expires_at: float = 1000.0, marker: bytes | None = None
) -> InstanceRow:
    blob = marker or secrets.token_bytes(48)
    return InstanceRow(
        id=instance_id,
        secret_hash=secrets.token_bytes(32),
        platform="ios",
        app_id="com.example.phone",
        environment="production",
        data_key=b"WRAPPED" + blob,
        push=b"PUSH" + blob,
        payload_key=b"PAYLOAD" + blob,
        paused=False,
        created_at=1.0,
        expires_at=expires_at,
        warned_at=None,
        accounts=(AccountRow("work", b"SETTINGS" + blob, b"PASSWORD" + blob),
                  AccountRow("home", b"S2" + blob, b"P2" + blob)),
    )  # fmt: skip


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "sipis.db")
    await s.open()
    yield s
    await s.close()


async def test_insert_get_replace(store: SqliteStore) -> None:
    original = row("a")
    await store.insert(original)
    assert await store.get("a") == original
    changed = replace(original, paused=True, accounts=original.accounts[:1])
    assert await store.replace(changed)
    assert await store.get("a") == changed
    assert not await store.replace(replace(changed, id="missing"))
    assert await store.get("missing") is None


async def test_expiry_queries(store: SqliteStore) -> None:
    await store.insert(row("soon", expires_at=100.0))
    await store.insert(row("later", expires_at=500.0))
    assert await store.expired(100.0) == ["soon"]
    assert [r.id for r in await store.expiring(600.0)] == ["soon", "later"]
    await store.mark_warned("soon", 50.0)
    assert [r.id for r in await store.expiring(600.0)] == ["later"]


async def test_erase_appends_a_chained_entry(store: SqliteStore, tmp_path: Path) -> None:
    keys = AuditKeys.load_or_create(tmp_path / "keys" / "audit.json")
    for name in ("a", "b", "c"):
        await store.insert(row(name))
    for name, reason in (("a", "expired"), ("b", "disabled"), ("c", "admin")):
        entry = await store.erase(
            name, at=10.0, reason=reason, subject=keys.subject(name), erased={"accounts": 2}
        )
        assert entry is not None and entry.reason == reason
    assert await store.erase("a", at=11.0, reason="admin", subject="0" * 64, erased={}) is None
    log = await store.purge_log()
    assert [e.seq for e in log] == [1, 2, 3]
    await store.add_checkpoint(make_checkpoint(keys, log[-1], 12.0))
    report = verify(log, await store.checkpoints(), keys.public_key_b64)
    assert report.ok, report.findings
    assert (await store.counts())["purges.disabled"] == 1
    assert await store.all() == []


async def test_rewrap_is_compare_and_set(store: SqliteStore) -> None:
    original = row("a")
    await store.insert(original)
    assert await store.wrapped_keys() == [("a", original.data_key)]
    assert await store.rewrap("a", original.data_key, b"NEW")
    assert not await store.rewrap("a", original.data_key, b"NEWER")
    stored = await store.get("a")
    assert stored is not None and stored.data_key == b"NEW"


def files_of(path: Path) -> bytes:
    return b"".join(
        p.read_bytes()
        for p in path.parent.iterdir()
        if p.name.startswith(path.name) and p.is_file()
    )


async def test_nothing_of_an_erased_instance_stays_in_the_files(store: SqliteStore) -> None:
    marker = b"\xa5MARKER" + secrets.token_bytes(40)
    keep = row("keep")
    await store.insert(keep)
    await store.insert(row("gone", marker=marker))
    await store.replace(replace(row("gone", marker=marker), paused=True))
    assert marker in files_of(store.path), "the marker is really written"
    await store.erase("gone", at=1.0, reason="disabled", subject="0" * 64, erased={})
    assert await store.scrub()
    data = files_of(store.path)
    assert marker not in data
    assert keep.push in data, "the other instance is intact"
    assert os.stat(store.path).st_mode & 0o777 == 0o600
