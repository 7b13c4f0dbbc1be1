"""The embedded store: SQLite through aiosqlite.

The database runs in WAL mode with ``synchronous=FULL`` (a change is on disk
before the API answers) and ``secure_delete=ON`` (deleted rows are
overwritten with zeros in the pages that held them).  WAL frames still hold
old page images until a checkpoint; ``scrub`` runs ``wal_checkpoint(TRUNCATE)``
so that after an erasure nothing of the instance is left in either file.

Migrations are numbered SQL scripts applied in order, each in its own
transaction, and recorded in ``schema_version``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiosqlite

from sipis.audit import Checkpoint, PurgeEntry, new_entry

from .base import AccountRow, Fence, InstanceRow, StoreError

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE instances (
        id TEXT PRIMARY KEY,
        secret_hash BLOB NOT NULL,
        platform TEXT NOT NULL,
        app_id TEXT NOT NULL,
        environment TEXT NOT NULL,
        data_key BLOB NOT NULL,
        push BLOB NOT NULL,
        payload_key BLOB,
        paused INTEGER NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        warned_at REAL
    );
    CREATE INDEX instances_by_expiry ON instances (expires_at);
    CREATE TABLE accounts (
        instance_id TEXT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        account_id TEXT NOT NULL,
        settings BLOB NOT NULL,
        password BLOB NOT NULL,
        PRIMARY KEY (instance_id, position)
    );
    CREATE TABLE purge_log (
        seq INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        reason TEXT NOT NULL,
        subject TEXT NOT NULL,
        erased TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE TABLE checkpoints (
        seq INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        head_hash TEXT NOT NULL,
        key_id TEXT NOT NULL,
        signature TEXT NOT NULL
    );
    """,
    """
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        instance_id TEXT NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
        account_id TEXT NOT NULL,
        received_at REAL NOT NULL,
        content BLOB NOT NULL
    );
    CREATE INDEX messages_by_instance ON messages (instance_id, id);
    """,
    """
    ALTER TABLE instances ADD COLUMN digest BLOB;
    """,
    """
    ALTER TABLE messages ADD COLUMN request_key TEXT;
    CREATE UNIQUE INDEX messages_by_request ON messages (instance_id, request_key);
    """,
)

_INSTANCE_COLUMNS = (
    "i.id, i.secret_hash, i.platform, i.app_id, i.environment, i.data_key, i.push, "
    "i.payload_key, i.paused, i.created_at, i.expires_at, i.warned_at, i.digest"
)
_INSERT_INSTANCE = (
    "INSERT INTO instances (id, secret_hash, platform, app_id, environment, data_key, push, "
    "payload_key, paused, created_at, expires_at, warned_at, digest) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
)


class _RolledBack(Exception):
    """Raised inside a transaction that the body already rolled back."""


class SqliteStore:
    """``Store`` over one SQLite database file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        # one connection runs one transaction at a time: concurrent writers take turns
        self._writing = asyncio.Lock()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("the store is not open")
        return self._db

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            for pragma in (
                "journal_mode = WAL",
                "synchronous = FULL",
                "secure_delete = ON",
                "foreign_keys = ON",
                "busy_timeout = 5000",
            ):
                await self._db.execute(f"PRAGMA {pragma}")
            await self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from None
        self.path.chmod(0o600)

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def _migrate(self) -> None:
        db = self.db
        await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        async with db.execute("SELECT max(version) FROM schema_version") as cursor:
            row = await cursor.fetchone()
        current = (row[0] if row else None) or 0
        for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
            await db.execute("BEGIN IMMEDIATE")
            try:
                for statement in filter(str.strip, script.split(";")):
                    await db.execute(statement)
                await db.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception; sqlite errors become
        StoreError.  The body may roll back itself and raise ``_RolledBack``."""
        db = self.db
        async with self._writing:
            try:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    await db.execute("COMMIT")
                except _RolledBack:
                    pass
                except BaseException:
                    if db.in_transaction:  # SQLite rolls back by itself after SQLITE_FULL
                        await db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StoreError(f"database write failed: {exc}") from None

    async def _write(
        self, statements: list[tuple[str, tuple[object, ...]]], *, guard: bool = False
    ) -> int:
        """Run statements in one transaction; return the rows changed by the first.

        With ``guard``, a first statement that changes nothing rolls everything back.
        """
        first = -1
        async with self._transaction() as db:
            for sql, args in statements:
                cursor = await db.execute(sql, args)
                if first < 0:
                    first = cursor.rowcount
                    if guard and first == 0:
                        await db.execute("ROLLBACK")
                        raise _RolledBack
        return first

    async def insert(self, row: InstanceRow) -> None:
        await self._write(
            [
                (_INSERT_INSTANCE, _instance_values(row)),
                *_account_inserts(row),
            ]
        )

    async def replace(self, row: InstanceRow) -> bool:
        # The wrapped data key is not written: only a rotation changes it (``rewrap``), and
        # a change racing with one must not put back a wrapping under a retired master key.
        update = (
            "UPDATE instances SET secret_hash=?, platform=?, app_id=?, environment=?, push=?, "
            "payload_key=?, paused=?, created_at=?, expires_at=?, warned_at=?, digest=? WHERE id=?",
            (row.secret_hash, row.platform, row.app_id, row.environment, row.push,
             row.payload_key, int(row.paused), row.created_at, row.expires_at, row.warned_at,
             row.digest, row.id),
        )  # fmt: skip
        rest = [("DELETE FROM accounts WHERE instance_id=?", (row.id,)), *_account_inserts(row)]
        return await self._write([update, *rest], guard=True) == 1

    async def set_digest(self, instance_id: str, digest: bytes) -> None:
        await self._write([("UPDATE instances SET digest=? WHERE id=?", (digest, instance_id))])

    async def get(self, instance_id: str) -> InstanceRow | None:
        rows = await self._instances("WHERE i.id=?", (instance_id,))
        return rows[0] if rows else None

    async def all(self) -> list[InstanceRow]:
        return await self._instances("", (), "ORDER BY i.created_at")

    async def expired(self, now: float) -> list[str]:
        return [
            r[0]
            for r in await self._query("SELECT id FROM instances WHERE expires_at <= ?", (now,))
        ]

    async def expiring(self, before: float) -> list[InstanceRow]:
        return await self._instances("WHERE i.expires_at < ? AND i.warned_at IS NULL", (before,))

    async def mark_warned(self, instance_id: str, at: float, *, fence: Fence | None = None) -> None:
        """``fence`` is ignored: one SQLite node owns every shard."""
        await self._write([("UPDATE instances SET warned_at=? WHERE id=?", (at, instance_id))])

    async def erase(
        self, instance_id: str, *, at: float, reason: str, subject: str, erased: Mapping[str, int]
    ) -> PurgeEntry | None:
        entry: PurgeEntry | None = None
        async with self._transaction() as db:
            async with db.execute(
                "SELECT count(*) FROM messages WHERE instance_id=?", (instance_id,)
            ) as counting:
                [queued] = await counting.fetchone() or (0,)
            cursor = await db.execute("DELETE FROM instances WHERE id=?", (instance_id,))
            if cursor.rowcount != 1:
                await db.execute("ROLLBACK")
                raise _RolledBack
            last = await self._last_entry()
            counts = {**erased, "queued_messages": queued}
            entry = new_entry(last, at=at, reason=reason, subject=subject, erased=counts)
            await db.execute(
                "INSERT INTO purge_log (seq, at, reason, subject, erased, prev_hash, hash) "
                "VALUES (?,?,?,?,?,?,?)",
                (entry.seq, entry.at, entry.reason, entry.subject,
                 json.dumps(entry.erased, sort_keys=True), entry.prev_hash, entry.hash),
            )  # fmt: skip
        return entry

    async def _last_entry(self) -> PurgeEntry | None:
        rows = await self._query(
            "SELECT seq, at, reason, subject, erased, prev_hash, hash FROM purge_log "
            "ORDER BY seq DESC LIMIT 1",
            (),
        )
        return _entry(rows[0]) if rows else None

    async def purge_log(self, after: int = 0) -> list[PurgeEntry]:
        rows = await self._query(
            "SELECT seq, at, reason, subject, erased, prev_hash, hash FROM purge_log "
            "WHERE seq > ? ORDER BY seq",
            (after,),
        )
        return [_entry(r) for r in rows]

    async def purge_status(self) -> tuple[int, float | None]:
        [(entries,)] = await self._query("SELECT count(*) FROM purge_log", ())
        [(last,)] = await self._query("SELECT max(at) FROM checkpoints", ())
        return entries, last

    async def checkpoints(self) -> list[Checkpoint]:
        rows = await self._query(
            "SELECT seq, at, head_hash, key_id, signature FROM checkpoints ORDER BY seq", ()
        )
        return [
            Checkpoint(seq=r[0], at=r[1], head_hash=r[2], key_id=r[3], signature=r[4]) for r in rows
        ]

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        c = checkpoint
        await self._write(
            [
                (
                    "INSERT OR IGNORE INTO checkpoints (seq, at, head_hash, key_id, signature) "
                    "VALUES (?,?,?,?,?)",
                    (c.seq, c.at, c.head_hash, c.key_id, c.signature),
                )
            ]
        )

    async def scrub(self) -> bool:
        rows = await self._query("PRAGMA wal_checkpoint(TRUNCATE)", ())
        return bool(rows) and rows[0][0] == 0

    async def wrapped_keys(self) -> list[tuple[str, bytes]]:
        return [(r[0], r[1]) for r in await self._query("SELECT id, data_key FROM instances", ())]

    async def rewrap(self, instance_id: str, old: bytes, new: bytes) -> bool:
        changed = await self._write(
            [("UPDATE instances SET data_key=? WHERE id=? AND data_key=?", (new, instance_id, old))]
        )
        return changed == 1

    async def queue_message(
        self,
        instance_id: str,
        account_id: str,
        received_at: float,
        content: bytes,
        *,
        key: str | None = None,
        fence: Fence | None = None,
    ) -> int:
        """``fence`` is ignored: one SQLite node owns every shard."""
        async with self._transaction() as db:
            cursor = await db.execute(
                "INSERT INTO messages (instance_id, account_id, received_at, content, "
                "request_key) VALUES (?,?,?,?,?) "
                "ON CONFLICT (instance_id, request_key) DO NOTHING",
                (instance_id, account_id, received_at, content, key),
            )
            message_id = cursor.lastrowid if cursor.rowcount == 1 else None
            if message_id is None:  # the same request, stored before
                async with db.execute(
                    "SELECT id FROM messages WHERE instance_id=? AND request_key=?",
                    (instance_id, key),
                ) as found:
                    row = await found.fetchone()
                message_id = None if row is None else row[0]
        assert message_id is not None
        return message_id

    async def messages(self, instance_id: str) -> list[tuple[int, str, float, bytes]]:
        rows = await self._query(
            "SELECT id, account_id, received_at, content FROM messages WHERE instance_id=? "
            "ORDER BY id",
            (instance_id,),
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    async def delete_message(self, message_id: int) -> None:
        await self._write([("DELETE FROM messages WHERE id=?", (message_id,))])

    async def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for platform, paused, n in await self._query(
            "SELECT platform, paused, count(*) FROM instances GROUP BY platform, paused", ()
        ):
            counts[f"instances.{platform}"] = counts.get(f"instances.{platform}", 0) + n
            if paused:
                counts["instances.paused"] = counts.get("instances.paused", 0) + n
        for reason, n in await self._query(
            "SELECT reason, count(*) FROM purge_log GROUP BY reason", ()
        ):
            counts[f"purges.{reason}"] = n
        return counts

    async def _query(self, sql: str, args: tuple[object, ...]) -> list[tuple[Any, ...]]:
        try:
            async with self.db.execute(sql, args) as cursor:
                return [tuple(row) for row in await cursor.fetchall()]
        except sqlite3.Error as exc:
            raise StoreError(f"database read failed: {exc}") from None

    async def _instances(
        self, where: str, args: tuple[object, ...], order: str = ""
    ) -> list[InstanceRow]:
        """Instances selected by ``where`` (a constant over alias ``i``), with their accounts."""
        select = f"SELECT {_INSTANCE_COLUMNS} FROM instances i {where} {order}"  # noqa: S608
        rows = await self._query(select, args)
        if not rows:
            return []
        accounts: dict[str, list[AccountRow]] = {r[0]: [] for r in rows}
        select_accounts = (
            "SELECT a.instance_id, a.account_id, a.settings, a.password FROM accounts a "  # noqa: S608
            f"JOIN instances i ON i.id = a.instance_id {where} ORDER BY a.instance_id, a.position"
        )
        for instance_id, account_id, settings, password in await self._query(select_accounts, args):
            accounts[instance_id].append(AccountRow(account_id, settings, password))
        return [
            InstanceRow(
                id=r[0],
                secret_hash=r[1],
                platform=r[2],
                app_id=r[3],
                environment=r[4],
                data_key=r[5],
                push=r[6],
                payload_key=r[7],
                paused=bool(r[8]),
                created_at=r[9],
                expires_at=r[10],
                warned_at=r[11],
                accounts=tuple(accounts[r[0]]),
                digest=r[12],
            )
            for r in rows
        ]


def _instance_values(row: InstanceRow) -> tuple[object, ...]:
    return (
        row.id, row.secret_hash, row.platform, row.app_id, row.environment, row.data_key,
        row.push, row.payload_key, int(row.paused), row.created_at, row.expires_at, row.warned_at,
        row.digest,
    )  # fmt: skip


def _account_inserts(row: InstanceRow) -> list[tuple[str, tuple[object, ...]]]:
    return [
        (
            "INSERT INTO accounts (instance_id, position, account_id, settings, password) "
            "VALUES (?,?,?,?,?)",
            (row.id, position, account.account_id, account.settings, account.password),
        )
        for position, account in enumerate(row.accounts)
    ]


def _entry(row: tuple[Any, ...]) -> PurgeEntry:
    seq, at, reason, subject, erased, prev_hash, hash_ = row
    return PurgeEntry(
        seq=seq,
        at=at,
        reason=reason,
        subject=subject,
        erased=json.loads(erased),
        prev_hash=prev_hash,
        hash=hash_,
    )
