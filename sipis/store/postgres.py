"""The cluster store: PostgreSQL through asyncpg, shared by every node.

Theory of operation
-------------------
``PostgresStore(url)`` takes a ``postgresql://user[:password]@host:port/database``
URL.  ``open`` makes a pool of up to ``POOL_SIZE`` connections and brings
the schema up to date; ``listen`` opens one more connection of its own for
change notices; ``close`` closes both.  Every statement runs in autocommit
or in one explicit transaction, so each change is committed before its
method returns.

Migrations are numbered SQL scripts applied in order, each in its own
transaction under a transaction-scoped advisory lock (several nodes may
start at once), and recorded in ``schema_version``.

Every instance row carries its shard (``sipis.shards.shard_of``).  The
``shards`` table holds one lease per shard: owner, expiry and epoch, all
timed by the database's clock (``now()``).  A claim takes free or expired
shards with ``FOR UPDATE SKIP LOCKED``, so two nodes never take the same
shard and never wait on each other, and raises each epoch it takes.  A
write made under a lease (``Fence``) first reads the shard's row ``FOR
SHARE`` in the same transaction and is refused unless the lease is still
that node's, with that epoch, unexpired; a claim of that shard cannot
commit in between.  Renewals and releases lock their rows in shard order,
so that they never deadlock with a fenced write.

Erasures of all nodes append to one purge-log chain: each takes the same
advisory lock before it reads the last entry and appends the next, so
the chain never forks.  ``insert``, ``replace`` and ``erase`` send a notice
on the ``sipis_instances`` channel inside their transaction, delivered at
commit: ``changed <instance id>`` or ``erased <instance id> <reason>``.
The listening connection is watched and opened again when it drops;
notices sent while it was down are lost.

Erasure and the files
---------------------
PostgreSQL cannot overwrite deleted rows in place.  ``scrub`` runs
``VACUUM`` on the tables that hold personal data, which makes the space of
deleted rows reusable; until it is reused, and until the write-ahead log
that recorded the instance is recycled, the wrapped data key of an erased
instance (and its encrypted rows) survive in dead tuples and WAL segments.
What survives is encrypted under a data key that itself is wrapped under
the master key; run the database on an encrypted disk all the same.

Errors
------
Every database or network failure becomes ``StoreError``.  Its message names
the operation and the kind of failure (asyncpg's exception class and the
SQLSTATE), never the contents of a row, and never the URL's password.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import urlsplit

import asyncpg

from sipis.audit import Checkpoint, PurgeEntry, new_entry
from sipis.shards import SHARDS, shard_of

from .base import (
    AccountRow,
    BindingStateRow,
    Change,
    Fence,
    Fenced,
    InstanceRow,
    NodeRow,
    StoreError,
)

log = logging.getLogger(__name__)

POOL_SIZE = 8
CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 30.0
SCRUB_TIMEOUT = 600.0
CLOSE_TIMEOUT = 10.0
CHANNEL = "sipis_instances"
# The listening connection is probed when it has been quiet this long.
LISTEN_PROBE_INTERVAL = 30.0
LISTEN_RETRY_FIRST = 0.2
LISTEN_RETRY_MAX = 10.0
APPLICATION_NAME = "sipis"
# A transaction of a node that stops between two statements (paused, frozen, cut off) is
# ended by the server after this many milliseconds, so its locks (a shard's lease read
# FOR SHARE, the purge log's lock) do not outlive it and block the other nodes.
IDLE_IN_TRANSACTION_MS = 5000
LISTEN_APPLICATION_NAME = "sipis-listen"

# Keys of the advisory locks (pg_advisory_xact_lock takes any bigint).
_MIGRATION_LOCK = 0x5349_5049_535F_0001
_PURGE_LOCK = 0x5349_5049_535F_0002

MIGRATIONS: tuple[str, ...] = (
    f"""
    CREATE TABLE instances (
        id text PRIMARY KEY,
        shard integer NOT NULL,
        secret_hash bytea NOT NULL,
        platform text NOT NULL,
        app_id text NOT NULL,
        environment text NOT NULL,
        data_key bytea NOT NULL,
        push bytea NOT NULL,
        payload_key bytea,
        paused boolean NOT NULL,
        created_at double precision NOT NULL,
        expires_at double precision NOT NULL,
        warned_at double precision,
        digest bytea
    );
    CREATE INDEX instances_by_expiry ON instances (expires_at);
    CREATE INDEX instances_by_shard ON instances (shard);
    CREATE TABLE accounts (
        instance_id text NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
        position integer NOT NULL,
        account_id text NOT NULL,
        settings bytea NOT NULL,
        password bytea NOT NULL,
        PRIMARY KEY (instance_id, position)
    );
    CREATE TABLE messages (
        id bigserial PRIMARY KEY,
        instance_id text NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
        account_id text NOT NULL,
        received_at double precision NOT NULL,
        content bytea NOT NULL
    );
    CREATE INDEX messages_by_instance ON messages (instance_id, id);
    CREATE TABLE purge_log (
        seq bigint PRIMARY KEY,
        at double precision NOT NULL,
        reason text NOT NULL,
        subject text NOT NULL,
        erased text NOT NULL,
        prev_hash text NOT NULL,
        hash text NOT NULL
    );
    CREATE TABLE checkpoints (
        seq bigint PRIMARY KEY,
        at double precision NOT NULL,
        head_hash text NOT NULL,
        key_id text NOT NULL,
        signature text NOT NULL
    );
    CREATE TABLE nodes (
        id text PRIMARY KEY,
        device_uri text NOT NULL,
        expires_at timestamptz NOT NULL
    );
    CREATE TABLE shards (
        shard integer PRIMARY KEY,
        owner text,
        expires_at timestamptz,
        epoch bigint NOT NULL DEFAULT 0
    );
    INSERT INTO shards (shard) SELECT generate_series(0, {SHARDS - 1});
    CREATE TABLE binding_states (
        instance_id text NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
        account_id text NOT NULL,
        state text NOT NULL,
        last_status integer,
        reason text,
        at double precision NOT NULL,
        node text NOT NULL,
        epoch bigint NOT NULL,
        PRIMARY KEY (instance_id, account_id)
    );
    """,
    """
    ALTER TABLE messages ADD COLUMN request_key text;
    CREATE UNIQUE INDEX messages_by_request ON messages (instance_id, request_key);
    """,
)

_INSTANCE_SELECT = (
    "SELECT i.id, i.secret_hash, i.platform, i.app_id, i.environment, i.data_key, i.push, "
    "i.payload_key, i.paused, i.created_at, i.expires_at, i.warned_at, i.digest, "
    "ARRAY(SELECT ROW(a.account_id, a.settings, a.password) FROM accounts a "
    "WHERE a.instance_id = i.id ORDER BY a.position) FROM instances i"
)
_INSERT_ACCOUNT = (
    "INSERT INTO accounts (instance_id, position, account_id, settings, password) "
    "VALUES ($1, $2, $3, $4, $5)"
)
# Each lease-changing statement locks its rows in shard order first.
_RENEW = """
    WITH mine AS (
        SELECT shard FROM shards WHERE owner = $1
        ORDER BY shard FOR UPDATE
    )
    UPDATE shards s SET expires_at = now() + make_interval(secs => $2)
    FROM mine WHERE s.shard = mine.shard
    RETURNING s.shard, s.epoch
"""
_CLAIM = """
    WITH free AS (
        SELECT shard FROM shards WHERE owner IS NULL OR expires_at <= now()
        ORDER BY random() LIMIT $3 FOR UPDATE SKIP LOCKED
    )
    UPDATE shards s SET owner = $1, epoch = s.epoch + 1,
        expires_at = now() + make_interval(secs => $2)
    FROM free WHERE s.shard = free.shard
    RETURNING s.shard, s.epoch
"""
_RELEASE = """
    WITH mine AS (
        SELECT shard FROM shards WHERE owner = $1 AND ($2::integer[] IS NULL OR shard = ANY($2))
        ORDER BY shard FOR UPDATE
    )
    UPDATE shards s SET owner = NULL, expires_at = now() FROM mine WHERE s.shard = mine.shard
"""
_HOLDERS = """
    SELECT shard, owner, epoch FROM shards
    WHERE shard = ANY($1::integer[]) AND expires_at > now()
    ORDER BY shard FOR SHARE
"""
_UPSERT_BINDING_STATE = """
    INSERT INTO binding_states
        (instance_id, account_id, state, last_status, reason, at, node, epoch)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
    ON CONFLICT (instance_id, account_id) DO UPDATE SET
        state = excluded.state, last_status = excluded.last_status, reason = excluded.reason,
        at = excluded.at, node = excluded.node, epoch = excluded.epoch
"""

_DATABASE_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record]
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]
    Pooled: TypeAlias = PoolConnectionProxy[asyncpg.Record]


class PostgresStore:
    """``ClusterStore`` over one PostgreSQL database that every node of a cluster shares."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.target = redacted(url)
        self._pool: Pool | None = None
        self._subscribers: list[Callable[[Change], None]] = []
        self._gap_subscribers: list[Callable[[], None]] = []
        self._listener: Connection | None = None
        self._listening: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"PostgresStore({self.target!r})"

    @property
    def pool(self) -> Pool:
        if self._pool is None:
            raise StoreError("the store is not open")
        return self._pool

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=1,
                max_size=POOL_SIZE,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                server_settings={
                    "application_name": APPLICATION_NAME,
                    "idle_in_transaction_session_timeout": str(IDLE_IN_TRANSACTION_MS),
                },
            )
        except (*_DATABASE_ERRORS, ValueError) as exc:
            raise StoreError(f"cannot open {self.target}: {_describe(exc)}") from None
        try:
            await self._migrate()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        self._subscribers.clear()
        self._gap_subscribers.clear()
        if self._listening is not None:
            self._listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listening
            self._listening = None
        if self._listener is not None:
            await _close_connection(self._listener)
            self._listener = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT)
            except _DATABASE_ERRORS:
                pool.terminate()

    async def _migrate(self) -> None:
        while True:
            async with self._transaction("migration") as db:
                await db.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                await db.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)"
                )
                current = await db.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
                if current >= len(MIGRATIONS):
                    return
                await db.execute(MIGRATIONS[current])
                await db.execute("INSERT INTO schema_version (version) VALUES ($1)", current + 1)

    @contextlib.asynccontextmanager
    async def _connection(self, action: str) -> AsyncIterator[Pooled]:
        """A pooled connection in autocommit; database errors become StoreError."""
        try:
            async with self.pool.acquire(timeout=CONNECT_TIMEOUT) as db:
                yield db
        except _DATABASE_ERRORS as exc:
            raise StoreError(f"database {action} failed: {_describe(exc)}") from None

    @contextlib.asynccontextmanager
    async def _transaction(self, action: str) -> AsyncIterator[Pooled]:
        """A pooled connection in one transaction, rolled back on any exception."""
        async with self._connection(action) as db, db.transaction():
            yield db

    async def _fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        async with self._connection("read") as db:
            return await db.fetch(sql, *args)

    async def _execute(self, sql: str, *args: object) -> int:
        """Run one statement in autocommit; the number of rows it changed."""
        async with self._connection("write") as db:
            return _rows_changed(await db.execute(sql, *args))

    # -- instances -------------------------------------------------------------------------

    async def insert(self, row: InstanceRow) -> None:
        async with self._transaction("write") as db:
            await db.execute(
                "INSERT INTO instances (id, shard, secret_hash, platform, app_id, environment, "
                "data_key, push, payload_key, paused, created_at, expires_at, warned_at, digest) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                row.id, shard_of(row.id), row.secret_hash, row.platform, row.app_id,
                row.environment, row.data_key, row.push, row.payload_key, row.paused,
                row.created_at, row.expires_at, row.warned_at, row.digest,
            )  # fmt: skip
            await db.executemany(_INSERT_ACCOUNT, _account_values(row))
            await _notify(db, f"changed {row.id}")

    async def replace(self, row: InstanceRow) -> bool:
        # The wrapped data key is not written: only a rotation changes it (``rewrap``), and
        # a change racing with one must not put back a wrapping under a retired master key.
        async with self._transaction("write") as db:
            status = await db.execute(
                "UPDATE instances SET secret_hash=$1, platform=$2, app_id=$3, environment=$4, "
                "push=$5, payload_key=$6, paused=$7, created_at=$8, expires_at=$9, "
                "warned_at=$10, digest=$11 WHERE id=$12",
                row.secret_hash, row.platform, row.app_id, row.environment, row.push,
                row.payload_key, row.paused, row.created_at, row.expires_at, row.warned_at,
                row.digest, row.id,
            )  # fmt: skip
            if _rows_changed(status) != 1:
                return False
            await db.execute("DELETE FROM accounts WHERE instance_id=$1", row.id)
            await db.executemany(_INSERT_ACCOUNT, _account_values(row))
            # the registration states of accounts the instance no longer has go with them
            await db.execute(
                "DELETE FROM binding_states WHERE instance_id=$1 AND account_id <> ALL($2::text[])",
                row.id, [account.account_id for account in row.accounts],
            )  # fmt: skip
            await _notify(db, f"changed {row.id}")
        return True

    async def set_digest(self, instance_id: str, digest: bytes) -> None:
        await self._execute("UPDATE instances SET digest=$1 WHERE id=$2", digest, instance_id)

    async def get(self, instance_id: str) -> InstanceRow | None:
        rows = await self._instances("WHERE i.id = $1", instance_id)
        return rows[0] if rows else None

    async def all(self) -> list[InstanceRow]:
        return await self._instances("ORDER BY i.created_at, i.id")

    async def expired(self, now: float) -> list[str]:
        rows = await self._fetch(
            "SELECT id FROM instances WHERE expires_at <= $1 ORDER BY expires_at, id", now
        )
        return [r[0] for r in rows]

    async def expiring(self, before: float) -> list[InstanceRow]:
        return await self._instances(
            "WHERE i.expires_at < $1 AND i.warned_at IS NULL ORDER BY i.expires_at, i.id", before
        )

    async def mark_warned(self, instance_id: str, at: float, *, fence: Fence | None = None) -> None:
        async with self._transaction("write") as db:
            if fence is not None:
                await _hold(db, instance_id, fence)
            await db.execute("UPDATE instances SET warned_at=$1 WHERE id=$2", at, instance_id)

    async def instances_in_shards(self, shards: Collection[int]) -> list[InstanceRow]:
        return await self._instances(
            "WHERE i.shard = ANY($1::integer[]) ORDER BY i.id", sorted(shards)
        )

    async def _instances(self, where: str, *args: object) -> list[InstanceRow]:
        """Instances selected by ``where`` (a constant over alias ``i``), with their accounts."""
        rows = await self._fetch(f"{_INSTANCE_SELECT} {where}", *args)
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
                paused=r[8],
                created_at=r[9],
                expires_at=r[10],
                warned_at=r[11],
                accounts=tuple(AccountRow(a[0], a[1], a[2]) for a in r[13]),
                digest=r[12],
            )
            for r in rows
        ]

    # -- erasure and the purge log ---------------------------------------------------------

    async def erase(
        self, instance_id: str, *, at: float, reason: str, subject: str, erased: Mapping[str, int]
    ) -> PurgeEntry | None:
        async with self._transaction("erasure") as db:
            await db.execute("SELECT pg_advisory_xact_lock($1)", _PURGE_LOCK)
            queued = await db.fetchval(
                "SELECT count(*) FROM messages WHERE instance_id=$1", instance_id
            )
            deleted = await db.execute("DELETE FROM instances WHERE id=$1", instance_id)
            if _rows_changed(deleted) != 1:
                return None
            erased = {**erased, "queued_messages": queued}
            last = await db.fetchrow(
                "SELECT seq, at, reason, subject, erased, prev_hash, hash FROM purge_log "
                "ORDER BY seq DESC LIMIT 1"
            )
            previous = _entry(last) if last is not None else None
            entry = new_entry(previous, at=at, reason=reason, subject=subject, erased=erased)
            await db.execute(
                "INSERT INTO purge_log (seq, at, reason, subject, erased, prev_hash, hash) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7)",
                entry.seq, entry.at, entry.reason, entry.subject,
                json.dumps(entry.erased, sort_keys=True), entry.prev_hash, entry.hash,
            )  # fmt: skip
            await _notify(db, f"erased {instance_id} {reason}")
        return entry

    async def purge_log(self, after: int = 0) -> list[PurgeEntry]:
        rows = await self._fetch(
            "SELECT seq, at, reason, subject, erased, prev_hash, hash FROM purge_log "
            "WHERE seq > $1 ORDER BY seq",
            after,
        )
        return [_entry(r) for r in rows]

    async def purge_status(self) -> tuple[int, float | None]:
        [row] = await self._fetch(
            "SELECT (SELECT count(*) FROM purge_log), (SELECT max(at) FROM checkpoints)"
        )
        return row[0], row[1]

    async def checkpoints(self) -> list[Checkpoint]:
        rows = await self._fetch(
            "SELECT seq, at, head_hash, key_id, signature FROM checkpoints ORDER BY seq"
        )
        return [
            Checkpoint(seq=r[0], at=r[1], head_hash=r[2], key_id=r[3], signature=r[4]) for r in rows
        ]

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        c = checkpoint
        await self._execute(
            "INSERT INTO checkpoints (seq, at, head_hash, key_id, signature) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (seq) DO NOTHING",
            c.seq, c.at, c.head_hash, c.key_id, c.signature,
        )  # fmt: skip

    async def scrub(self) -> bool:
        """VACUUM the tables that held personal data: see "Erasure and the files" above."""
        async with self._connection("vacuum") as db:
            await db.execute(
                "VACUUM instances, accounts, messages, binding_states", timeout=SCRUB_TIMEOUT
            )
        return True

    # -- key rotation ----------------------------------------------------------------------

    async def wrapped_keys(self) -> list[tuple[str, bytes]]:
        rows = await self._fetch("SELECT id, data_key FROM instances ORDER BY id")
        return [(r[0], r[1]) for r in rows]

    async def rewrap(self, instance_id: str, old: bytes, new: bytes) -> bool:
        changed = await self._execute(
            "UPDATE instances SET data_key=$1 WHERE id=$2 AND data_key=$3", new, instance_id, old
        )
        return changed == 1

    # -- messages --------------------------------------------------------------------------

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
        async with self._transaction("write") as db:
            if fence is not None:
                await _hold(db, instance_id, fence)
            message_id: int | None = await db.fetchval(
                "INSERT INTO messages (instance_id, account_id, received_at, content, "
                "request_key) VALUES ($1, $2, $3, $4, $5) "
                "ON CONFLICT (instance_id, request_key) DO NOTHING RETURNING id",
                instance_id, account_id, received_at, content, key,
            )  # fmt: skip
            if message_id is None:  # the same request, stored before
                message_id = await db.fetchval(
                    "SELECT id FROM messages WHERE instance_id=$1 AND request_key=$2",
                    instance_id, key,
                )  # fmt: skip
        assert message_id is not None
        return message_id

    async def messages(self, instance_id: str) -> list[tuple[int, str, float, bytes]]:
        rows = await self._fetch(
            "SELECT id, account_id, received_at, content FROM messages WHERE instance_id=$1 "
            "ORDER BY id",
            instance_id,
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    async def delete_message(self, message_id: int) -> None:
        await self._execute("DELETE FROM messages WHERE id=$1", message_id)

    async def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for platform, paused, n in await self._fetch(
            "SELECT platform, paused, count(*) FROM instances GROUP BY platform, paused"
        ):
            counts[f"instances.{platform}"] = counts.get(f"instances.{platform}", 0) + n
            if paused:
                counts["instances.paused"] = counts.get("instances.paused", 0) + n
        for reason, n in await self._fetch(
            "SELECT reason, count(*) FROM purge_log GROUP BY reason"
        ):
            counts[f"purges.{reason}"] = n
        return counts

    # -- nodes and shard leases ------------------------------------------------------------

    async def heartbeat(self, node: str, device_uri: str, ttl: float) -> list[NodeRow]:
        async with self._transaction("heartbeat") as db:
            await db.execute(
                "INSERT INTO nodes (id, device_uri, expires_at) "
                "VALUES ($1, $2, now() + make_interval(secs => $3)) "
                "ON CONFLICT (id) DO UPDATE SET "
                "device_uri = excluded.device_uri, expires_at = excluded.expires_at",
                node, device_uri, float(ttl),
            )  # fmt: skip
            # nodes gone for more than an hour are forgotten
            await db.execute("DELETE FROM nodes WHERE expires_at < now() - interval '1 hour'")
            rows = await db.fetch(
                "SELECT id, device_uri FROM nodes WHERE expires_at > now() ORDER BY id"
            )
        return [NodeRow(r[0], r[1]) for r in rows]

    async def leave(self, node: str) -> None:
        async with self._transaction("lease release") as db:
            await db.execute(_RELEASE, node, None)
            await db.execute("DELETE FROM nodes WHERE id=$1", node)

    async def renew(self, node: str, ttl: float) -> dict[int, int]:
        async with self._connection("lease renewal") as db:
            rows = await db.fetch(_RENEW, node, float(ttl))
        return {r[0]: r[1] for r in rows}

    async def claim(self, node: str, count: int, ttl: float) -> dict[int, int]:
        if count <= 0:
            return {}
        async with self._connection("lease claim") as db:
            rows = await db.fetch(_CLAIM, node, float(ttl), count)
        return {r[0]: r[1] for r in rows}

    async def release(self, node: str, shards: Collection[int]) -> None:
        if shards:
            await self._execute(_RELEASE, node, sorted(shards))

    async def leases(self) -> dict[int, tuple[str | None, int]]:
        rows = await self._fetch(
            "SELECT shard, CASE WHEN expires_at > now() THEN owner END, epoch FROM shards"
        )
        return {r[0]: (r[1], r[2]) for r in rows}

    # -- registration states ---------------------------------------------------------------

    async def set_binding_states(self, rows: Sequence[BindingStateRow]) -> list[BindingStateRow]:
        """Rows under a lost lease are refused; rows of instances erased meanwhile are dropped."""
        if not rows:
            return []
        for row in rows:
            _check_shard(row.instance_id, row.fence)
        async with self._transaction("write") as db:
            held = await _holding(db, {row.fence for row in rows})
            accepted = [row for row in rows if row.fence in held]
            existing = {
                r[0]
                for r in await db.fetch(
                    "SELECT id FROM instances WHERE id = ANY($1::text[]) ORDER BY id FOR KEY SHARE",
                    sorted({row.instance_id for row in accepted}),
                )
            }
            await db.executemany(
                _UPSERT_BINDING_STATE,
                [
                    (r.instance_id, r.account_id, r.state, r.last_status, r.reason, r.at,
                     r.fence.node, r.fence.epoch)
                    for r in accepted
                    if r.instance_id in existing
                ],
            )  # fmt: skip
        return [row for row in rows if row.fence not in held]

    async def binding_states(self, instance_id: str) -> list[BindingStateRow]:
        rows = await self._fetch(
            "SELECT account_id, state, last_status, reason, at, node, epoch FROM binding_states "
            "WHERE instance_id=$1 ORDER BY account_id",
            instance_id,
        )
        shard = shard_of(instance_id)
        return [
            BindingStateRow(instance_id, r[0], r[1], r[2], r[3], r[4], Fence(shard, r[5], r[6]))
            for r in rows
        ]

    # -- change notices --------------------------------------------------------------------

    async def listen(
        self, on_change: Callable[[Change], None], on_gap: Callable[[], None] | None = None
    ) -> None:
        """Also call ``on_change`` for every notice, and ``on_gap`` after a reconnection (the
        notices sent meanwhile are lost); the first call opens the connection."""
        self._subscribers.append(on_change)
        if on_gap is not None:
            self._gap_subscribers.append(on_gap)
        if self._listening is None:
            lost = await self._listen_connection()
            self._listening = asyncio.ensure_future(self._keep_listening(lost))

    async def _listen_connection(self) -> asyncio.Event:
        """Open the listening connection; the event is set when it closes."""
        lost = asyncio.Event()
        try:
            connection: Connection = await asyncpg.connect(
                self._url,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                server_settings={"application_name": LISTEN_APPLICATION_NAME},
            )
        except (*_DATABASE_ERRORS, ValueError) as exc:
            raise StoreError(f"cannot listen on {self.target}: {_describe(exc)}") from None
        connection.add_termination_listener(lambda _connection: lost.set())
        try:
            await connection.add_listener(CHANNEL, self._notified)
        except _DATABASE_ERRORS as exc:
            connection.terminate()
            raise StoreError(f"cannot listen on {self.target}: {_describe(exc)}") from None
        self._listener = connection
        return lost

    async def _keep_listening(self, lost: asyncio.Event) -> None:
        """Watch the listening connection (probing it when quiet) and open it again if lost."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), LISTEN_PROBE_INTERVAL)
            if not lost.is_set() and await self._listener_answers():
                continue
            log.warning("store: lost the connection for change notices to %s; reconnecting",
                        self.target)  # fmt: skip
            if self._listener is not None:
                self._listener.terminate()
                self._listener = None
            lost = await self._reconnect()
            log.info("store: listening for change notices again")
            for on_gap in list(self._gap_subscribers):
                try:
                    on_gap()
                except Exception:
                    log.exception("store: a reconnection could not be handled")

    async def _listener_answers(self) -> bool:
        assert self._listener is not None
        try:
            await self._listener.execute("SELECT 1")
        except _DATABASE_ERRORS:
            return False
        return True

    async def _reconnect(self) -> asyncio.Event:
        delay = LISTEN_RETRY_FIRST
        while True:
            await asyncio.sleep(delay)
            try:
                return await self._listen_connection()
            except StoreError as exc:
                delay = min(delay * 2, LISTEN_RETRY_MAX)
                log.warning("store: %s; trying again in %.1f s", exc, delay)

    def _notified(self, _connection: object, _pid: int, _channel: str, payload: object) -> None:
        change = parse_change(payload) if isinstance(payload, str) else None
        if change is None:
            log.warning("store: ignored a malformed change notice %.80r", payload)
            return
        for on_change in list(self._subscribers):
            try:
                on_change(change)
            except Exception:
                log.exception("store: a change notice could not be handled")


def parse_change(payload: str) -> Change | None:
    """``changed <instance id>`` or ``erased <instance id> <reason>``; None if neither."""
    kind, _, rest = payload.partition(" ")
    if kind == "changed" and rest and " " not in rest:
        return Change("changed", rest)
    instance_id, _, reason = rest.partition(" ")
    if kind == "erased" and instance_id and reason:
        return Change("erased", instance_id, reason)
    return None


def redacted(url: str) -> str:
    """The URL without password or query (which may carry one), for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "the PostgreSQL database"
    address = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}@" if parts.username else ""
    return f"{parts.scheme}://{user}{address}{parts.path}"


async def _notify(db: Pooled, payload: str) -> None:
    """Send a change notice; it is delivered when the transaction commits."""
    await db.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)


def _check_shard(instance_id: str, fence: Fence) -> None:
    if fence.shard != shard_of(instance_id):
        raise ValueError(f"instance {instance_id} is not in shard {fence.shard}")


async def _holding(db: Pooled, fences: Collection[Fence]) -> set[Fence]:
    """The fences whose leases still hold, share-locked until the transaction ends."""
    rows = await db.fetch(_HOLDERS, sorted({fence.shard for fence in fences}))
    current = {r[0]: (r[1], r[2]) for r in rows}
    return {f for f in fences if current.get(f.shard) == (f.node, f.epoch)}


async def _hold(db: Pooled, instance_id: str, fence: Fence) -> None:
    """Raise ``Fenced`` unless the lease holds (and keep it held until the transaction ends)."""
    _check_shard(instance_id, fence)
    if not await _holding(db, [fence]):
        raise Fenced(
            f"shard {fence.shard} is no longer held by {fence.node} at epoch {fence.epoch}"
        )


async def _close_connection(connection: Connection) -> None:
    try:
        await connection.close(timeout=CLOSE_TIMEOUT)
    except _DATABASE_ERRORS:
        connection.terminate()


def _rows_changed(status: str) -> int:
    """The row count at the end of a command tag such as ``UPDATE 1`` or ``DELETE 0``."""
    return int(status.rsplit(" ", 1)[-1])


def _describe(exc: BaseException) -> str:
    """The kind of a failure, without anything the failing statement carried."""
    if isinstance(exc, asyncpg.PostgresError):
        return f"{type(exc).__name__} (SQLSTATE {exc.sqlstate})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def _account_values(row: InstanceRow) -> list[tuple[Any, ...]]:
    return [
        (row.id, position, account.account_id, account.settings, account.password)
        for position, account in enumerate(row.accounts)
    ]


def _entry(row: asyncpg.Record) -> PurgeEntry:
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
