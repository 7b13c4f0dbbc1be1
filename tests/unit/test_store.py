"""Both stores, SQLite and PostgreSQL: rows, the purge log, rotation support, messages.

Every test taking ``store`` or ``open_store`` runs once against each store
(PostgreSQL: a real server, a fresh database per test).  The test that reads
the database files for leftovers of an erasure is SQLite's alone.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from sipis.audit import AuditKeys, make_checkpoint, verify
from sipis.store import AccountRow, InstanceRow, Store, StoreError
from sipis.store.base import Fence
from sipis.store.postgres import PostgresStore
from sipis.store.sqlite import SqliteStore
from tests.postgres import PostgresServer

OpenStore = Callable[[], Awaitable[Store]]


def row(
    instance_id: str,
    *,
    expires_at: float = 1000.0,
    marker: bytes | None = None,
    created_at: float = 1.0,
    platform: str = "ios",
) -> InstanceRow:
    blob = marker or secrets.token_bytes(48)
    return InstanceRow(
        id=instance_id,
        secret_hash=secrets.token_bytes(32),
        platform=platform,
        app_id="com.example.phone",
        environment="production",
        data_key=b"WRAPPED" + blob,
        push=b"PUSH" + blob,
        payload_key=b"PAYLOAD" + blob,
        paused=False,
        created_at=created_at,
        expires_at=expires_at,
        warned_at=None,
        accounts=(AccountRow("work", b"SETTINGS" + blob, b"PASSWORD" + blob),
                  AccountRow("home", b"S2" + blob, b"P2" + blob)),
    )  # fmt: skip


@pytest.fixture(params=["sqlite", "postgres"])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Opens store objects on one database (each call a new object, all closed at the end)."""
    make: Callable[[], Store]
    if request.param == "sqlite":
        make = lambda: SqliteStore(tmp_path / "sipis.db")  # noqa: E731
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = await server.new_database()
        make = lambda: PostgresStore(url)  # noqa: E731
    opened: list[Store] = []

    async def open_one() -> Store:
        store = make()
        await store.open()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_store: OpenStore) -> Store:
    return await open_store()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "sipis.db")
    await s.open()
    yield s
    await s.close()


async def test_insert_get_replace(store: Store) -> None:
    original = row("a")
    await store.insert(original)
    assert await store.get("a") == original
    changed = replace(original, paused=True, accounts=original.accounts[:1], warned_at=5.0)
    assert await store.replace(changed)
    assert await store.get("a") == changed
    assert not await store.replace(replace(changed, id="missing"))
    assert await store.get("missing") is None


async def test_replace_keeps_the_wrapped_data_key(store: Store) -> None:
    original = row("a")
    await store.insert(original)
    assert await store.replace(replace(original, data_key=b"OTHER", push=b"NEW PUSH"))
    stored = await store.get("a")
    assert stored is not None
    assert stored.data_key == original.data_key
    assert stored.push == b"NEW PUSH"


async def test_an_instance_without_accounts_or_optional_fields(store: Store) -> None:
    bare = replace(row("bare"), accounts=(), payload_key=None, digest=None)
    await store.insert(bare)
    assert await store.get("bare") == bare
    await store.set_digest("bare", b"DIGEST")
    assert await store.get("bare") == replace(bare, digest=b"DIGEST")


async def test_inserting_an_existing_id_fails_without_showing_the_row(store: Store) -> None:
    first = row("a", marker=b"ROWMARKER" + secrets.token_bytes(8))
    await store.insert(first)
    with pytest.raises(StoreError) as failure:
        await store.insert(first)
    assert "ROWMARKER" not in str(failure.value)
    assert await store.get("a") == first


async def test_all_in_creation_order(store: Store) -> None:
    await store.insert(row("late", created_at=30.0))
    await store.insert(row("early", created_at=10.0))
    await store.insert(row("middle", created_at=20.0))
    assert [r.id for r in await store.all()] == ["early", "middle", "late"]


async def test_expiry_queries(store: Store) -> None:
    await store.insert(row("soon", expires_at=100.0))
    await store.insert(row("later", expires_at=500.0))
    assert await store.expired(100.0) == ["soon"]
    assert await store.expired(99.0) == []
    assert [r.id for r in await store.expiring(600.0)] == ["soon", "later"]
    await store.mark_warned("soon", 50.0)
    assert [r.id for r in await store.expiring(600.0)] == ["later"]
    soon = await store.get("soon")
    assert soon is not None and soon.warned_at == 50.0


async def test_erase_appends_a_chained_entry(store: Store, tmp_path: Path) -> None:
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
    assert [e.seq for e in await store.purge_log(after=2)] == [3]
    assert log[0].erased == {"accounts": 2, "queued_messages": 0}
    assert await store.purge_status() == (3, None)
    await store.add_checkpoint(make_checkpoint(keys, log[-1], 12.0))
    await store.add_checkpoint(make_checkpoint(keys, log[-1], 13.0))  # the first one stays
    assert [c.at for c in await store.checkpoints()] == [12.0]
    assert await store.purge_status() == (3, 12.0)
    report = verify(log, await store.checkpoints(), keys.public_key_b64)
    assert report.ok, report.findings
    assert report.signed_seq == 3
    assert (await store.counts())["purges.disabled"] == 1
    assert await store.all() == []
    assert await store.scrub()


async def test_two_store_objects_append_one_chain(open_store: OpenStore, tmp_path: Path) -> None:
    """Two objects on one database (two nodes) erasing at the same time, each many at once,
    never fork the chain."""
    keys = AuditKeys.load_or_create(tmp_path / "keys" / "audit.json")
    first, second = await open_store(), await open_store()
    names = [f"i{n}" for n in range(40)]
    for name in names:
        await first.insert(row(name))

    async def erase(store: Store, name: str) -> None:
        entry = await store.erase(
            name, at=1.0, reason="admin", subject=keys.subject(name), erased={}
        )
        assert entry is not None

    # every erasure at once, each object running many transactions concurrently
    await asyncio.gather(*(erase(first if n % 2 else second, name) for n, name in enumerate(names)))
    log = await first.purge_log()
    assert [e.seq for e in log] == list(range(1, len(names) + 1))
    assert sorted(e.subject for e in log) == sorted(keys.subject(name) for name in names)
    await second.add_checkpoint(make_checkpoint(keys, log[-1], 100.0))
    report = verify(log, await first.checkpoints(), keys.public_key_b64)
    assert report.ok, report.findings
    assert report.signed_seq == len(names)


async def test_rewrap_is_compare_and_set(store: Store) -> None:
    original = row("a")
    await store.insert(original)
    assert await store.wrapped_keys() == [("a", original.data_key)]
    assert await store.rewrap("a", original.data_key, b"NEW")
    assert not await store.rewrap("a", original.data_key, b"NEWER")
    assert not await store.rewrap("missing", b"NEW", b"NEWER")
    stored = await store.get("a")
    assert stored is not None and stored.data_key == b"NEW"


async def test_messages_wait_in_order_and_go_with_their_instance(store: Store) -> None:
    await store.insert(row("a"))
    await store.insert(row("b"))
    one = await store.queue_message("a", "work", 5.0, b"ONE")
    two = await store.queue_message("a", "home", 6.0, b"TWO")
    other = await store.queue_message("b", "work", 7.0, b"OTHER")
    assert len({one, two, other}) == 3
    assert await store.messages("a") == [(one, "work", 5.0, b"ONE"), (two, "home", 6.0, b"TWO")]
    await store.delete_message(one)
    assert await store.messages("a") == [(two, "home", 6.0, b"TWO")]
    entry = await store.erase("a", at=8.0, reason="admin", subject="0" * 64, erased={"x": 1})
    assert entry is not None
    # counted in the erasure's own transaction: what was there when the rows went
    assert entry.erased == {"x": 1, "queued_messages": 1}
    assert await store.messages("a") == []
    assert await store.messages("b") == [(other, "work", 7.0, b"OTHER")]


async def test_the_same_request_is_queued_once(store: Store) -> None:
    await store.insert(row("a"))
    await store.insert(row("b"))
    first = await store.queue_message("a", "work", 5.0, b"ONE", key="k1")
    again = await store.queue_message("a", "work", 6.0, b"ONE AGAIN", key="k1")
    assert again == first
    elsewhere = await store.queue_message("b", "work", 5.0, b"ONE", key="k1")
    unkeyed = [await store.queue_message("a", "work", 7.0, b"N") for _ in range(2)]
    assert len({first, elsewhere, *unkeyed}) == 4
    assert [m[3] for m in await store.messages("a")] == [b"ONE", b"N", b"N"]
    await store.delete_message(first)
    assert await store.queue_message("a", "work", 8.0, b"LATER", key="k2") not in (first,)


async def test_a_message_for_an_unknown_instance_is_refused(store: Store) -> None:
    with pytest.raises(StoreError):
        await store.queue_message("missing", "work", 1.0, b"LOST")


async def test_counts(store: Store) -> None:
    await store.insert(row("a"))
    await store.insert(replace(row("b", platform="android"), paused=True))
    await store.insert(replace(row("c"), paused=True))
    await store.erase("c", at=1.0, reason="expired", subject="0" * 64, erased={})
    assert await store.counts() == {
        "instances.ios": 1,
        "instances.android": 1,
        "instances.paused": 1,
        "purges.expired": 1,
    }


async def test_a_closed_store_raises_store_error(open_store: OpenStore) -> None:
    store = await open_store()
    await store.close()
    with pytest.raises(StoreError):
        await store.get("a")


async def test_sqlite_ignores_fences(sqlite_store: SqliteStore) -> None:
    """One SQLite node owns every shard, so any fence passes."""
    await sqlite_store.insert(row("a"))
    stale = Fence(shard=0, node="elsewhere", epoch=99)
    await sqlite_store.mark_warned("a", 7.0, fence=stale)
    message = await sqlite_store.queue_message("a", "work", 1.0, b"M", fence=stale)
    assert await sqlite_store.messages("a") == [(message, "work", 1.0, b"M")]
    stored = await sqlite_store.get("a")
    assert stored is not None and stored.warned_at == 7.0


def files_of(path: Path) -> bytes:
    return b"".join(
        p.read_bytes()
        for p in path.parent.iterdir()
        if p.name.startswith(path.name) and p.is_file()
    )


async def test_sqlite_keeps_nothing_of_an_erased_instance_in_its_files(
    sqlite_store: SqliteStore,
) -> None:
    store = sqlite_store
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
