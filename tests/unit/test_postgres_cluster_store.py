"""The PostgreSQL store as a cluster shares it: leases, fencing, change notices, errors.

Each test gets a fresh database on the session's real PostgreSQL server;
several ``PostgresStore`` objects on one database play several nodes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from sipis.audit import AuditKeys, make_checkpoint, verify
from sipis.shards import SHARDS, shard_of
from sipis.store.base import BindingStateRow, Change, Fence, Fenced, NodeRow, StoreError
from sipis.store.postgres import MIGRATIONS, PostgresStore, redacted
from tests.peers.loopback import HOST, free_port
from tests.secrets import remember
from tests.unit.test_store import row

OpenStore = Callable[[], Awaitable[PostgresStore]]
SHORT_TTL = 0.3
LONG_TTL = 60.0
WAIT = 5.0


@pytest.fixture
async def open_store(pg_url: str) -> AsyncIterator[OpenStore]:
    """Opens ``PostgresStore`` objects on one fresh database, all closed at the end."""
    opened: list[PostgresStore] = []

    async def open_one() -> PostgresStore:
        store = PostgresStore(pg_url)
        await store.open()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


async def expire() -> None:
    """Let every SHORT_TTL lease run out."""
    await asyncio.sleep(SHORT_TTL + 0.2)


def state(
    instance_id: str, account_id: str, fence: Fence, name: str = "registered"
) -> BindingStateRow:
    return BindingStateRow(instance_id, account_id, name, 200, None, 1.0, fence)


# -- schema ------------------------------------------------------------------------------


async def test_nodes_starting_together_migrate_once(pg_url: str) -> None:
    stores = [PostgresStore(pg_url) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        connection = await asyncpg.connect(pg_url, timeout=WAIT)
        try:
            assert await connection.fetchval("SELECT count(*) FROM schema_version") == len(
                MIGRATIONS
            )
            assert await connection.fetchval("SELECT count(*) FROM shards") == SHARDS
        finally:
            await connection.close()
        assert len(await stores[0].leases()) == SHARDS
    finally:
        for s in stores:
            await s.close()


# -- leases ------------------------------------------------------------------------------


async def test_concurrent_claims_never_give_a_shard_twice(open_store: OpenStore) -> None:
    a, b = await open_store(), await open_store()
    claims = await asyncio.gather(
        a.claim("a", 1400, LONG_TTL),
        b.claim("b", 1400, LONG_TTL),
        a.claim("a", 1400, LONG_TTL),
        b.claim("b", 1400, LONG_TTL),
    )
    taken = [shard for claim in claims for shard in claim]
    assert sorted(taken) == list(range(SHARDS)), "every shard exactly once"
    assert {epoch for claim in claims for epoch in claim.values()} == {1}
    leases = await a.leases()
    held_by_a = set(claims[0]) | set(claims[2])
    assert {s for s, (owner, _) in leases.items() if owner == "a"} == held_by_a
    assert {s for s, (owner, _) in leases.items() if owner == "b"} == set(range(SHARDS)) - held_by_a
    assert await b.claim("b", 10, LONG_TTL) == {}


async def test_renew_keeps_leases_nobody_claimed_and_claims_raise_epochs(
    open_store: OpenStore,
) -> None:
    a, b = await open_store(), await open_store()
    short = await a.claim("a", 5, SHORT_TTL)
    long = await a.claim("a", 5, LONG_TTL)
    assert len(short) == len(long) == 5
    await expire()
    leases = await a.leases()
    assert all(leases[s] == (None, 1) for s in short), "an expired lease has no owner"
    assert all(leases[s] == ("a", 1) for s in long)
    taken = await b.claim("b", SHARDS, LONG_TTL)
    assert len(taken) == SHARDS - 5
    assert set(taken) >= set(short)
    assert {taken[s] for s in short} == {2}, "a claim raises the epoch"
    assert not set(taken) & set(long)
    assert await a.renew("a", LONG_TTL) == long, "what another node claimed is lost"
    assert await b.renew("b", LONG_TTL) == taken

    # expired, but nobody claimed them since: renewed under the same epoch
    await b.release("b", list(short))
    mine = await a.claim("a", 5, SHORT_TTL)
    assert mine == dict.fromkeys(short, 3)
    await expire()
    assert await a.renew("a", LONG_TTL) == long | mine


async def test_release_and_leave_free_shards_at_once(open_store: OpenStore) -> None:
    a, b = await open_store(), await open_store()
    assert await a.heartbeat("a", "sip:a.example", LONG_TTL) == [NodeRow("a", "sip:a.example")]
    held = await a.claim("a", SHARDS, LONG_TTL)
    assert len(held) == SHARDS
    assert await b.claim("b", 10, LONG_TTL) == {}
    await b.release("b", [1, 2, 3])  # not b's: nothing changes
    await a.release("a", [1, 2, 3])
    assert (await a.leases())[1] == (None, 1), "a release keeps the epoch"
    assert await b.claim("b", 10, LONG_TTL) == {1: 2, 2: 2, 3: 2}
    assert await b.heartbeat("b", "sip:b.example", LONG_TTL) == [
        NodeRow("a", "sip:a.example"),
        NodeRow("b", "sip:b.example"),
    ]
    await a.leave("a")
    assert await a.renew("a", LONG_TTL) == {}
    assert len(await b.claim("b", SHARDS, LONG_TTL)) == SHARDS - 3
    assert await b.heartbeat("b", "sip:b2.example", LONG_TTL) == [NodeRow("b", "sip:b2.example")]
    assert {owner for owner, _ in (await b.leases()).values()} == {"b"}


async def test_a_node_whose_heartbeat_ran_out_is_not_live(open_store: OpenStore) -> None:
    store = await open_store()
    await store.heartbeat("a", "sip:a.example", SHORT_TTL)
    assert [n.id for n in await store.heartbeat("b", "sip:b.example", LONG_TTL)] == ["a", "b"]
    await expire()
    assert [n.id for n in await store.heartbeat("b", "sip:b.example", LONG_TTL)] == ["b"]


# -- fencing -----------------------------------------------------------------------------


async def test_writes_under_a_lost_lease_are_refused(open_store: OpenStore) -> None:
    a, b = await open_store(), await open_store()
    await a.insert(row("x"))
    shard = shard_of("x")
    epoch = (await a.claim("a", SHARDS, SHORT_TTL))[shard]
    old = Fence(shard, "a", epoch)
    await a.mark_warned("x", 5.0, fence=old)
    kept = await a.queue_message("x", "work", 1.0, b"KEPT", fence=old)
    assert await a.set_binding_states([state("x", "work", old)]) == []

    await expire()
    with pytest.raises(Fenced):  # expired, not yet claimed: no longer held either
        await a.mark_warned("x", 6.0, fence=old)
    new_epoch = (await b.claim("b", SHARDS, LONG_TTL))[shard]
    assert new_epoch == epoch + 1
    new = Fence(shard, "b", new_epoch)
    assert await b.set_binding_states([state("x", "home", new, "failed")]) == []

    with pytest.raises(Fenced):
        await a.mark_warned("x", 7.0, fence=old)
    with pytest.raises(Fenced):
        await a.queue_message("x", "work", 2.0, b"LOST", fence=old)
    late = [state("x", "home", old), state("x", "work", old, "failed")]
    assert await a.set_binding_states(late) == late

    stored = await a.get("x")
    assert stored is not None and stored.warned_at == 5.0
    assert await a.messages("x") == [(kept, "work", 1.0, b"KEPT")]
    assert await a.binding_states("x") == [
        state("x", "home", new, "failed"),
        state("x", "work", old),
    ]
    await b.mark_warned("x", 8.0, fence=new)
    assert await b.queue_message("x", "work", 3.0, b"NEW", fence=new) > kept


async def test_binding_states_mix_held_refused_and_erased(open_store: OpenStore) -> None:
    a, b = await open_store(), await open_store()
    ids = ["p", "q", "r"]
    for instance_id in ids:
        await a.insert(row(instance_id))
    shards = {instance_id: shard_of(instance_id) for instance_id in ids}
    assert len(set(shards.values())) == 3
    mine = await a.claim("a", SHARDS, LONG_TTL)
    await a.release("a", [shards["q"]])
    theirs = await b.claim("b", 1, LONG_TTL)
    assert theirs == {shards["q"]: 2}
    await a.erase("r", at=1.0, reason="admin", subject="0" * 64, erased={})
    rows = [
        state("p", "work", Fence(shards["p"], "a", mine[shards["p"]])),
        state("q", "work", Fence(shards["q"], "a", mine[shards["q"]])),
        state("r", "work", Fence(shards["r"], "a", mine[shards["r"]])),
    ]
    assert await a.set_binding_states(rows) == [rows[1]], "q's lease moved on; r is gone"
    assert await a.binding_states("p") == [rows[0]]
    assert await a.binding_states("q") == []
    assert await a.binding_states("r") == []
    updated = replace(rows[0], state="failed", last_status=403, reason="forbidden", at=2.0)
    assert await a.set_binding_states([updated]) == []
    assert await a.binding_states("p") == [updated]


async def test_replace_drops_the_states_of_removed_accounts(open_store: OpenStore) -> None:
    store = await open_store()
    original = row("x")
    await store.insert(original)
    fence = Fence(shard_of("x"), "a", (await store.claim("a", SHARDS, LONG_TTL))[shard_of("x")])
    await store.set_binding_states([state("x", "work", fence), state("x", "home", fence)])
    await store.replace(replace(original, accounts=original.accounts[:1]))
    assert await store.binding_states("x") == [state("x", "work", fence)]


async def test_a_fence_of_another_shard_is_a_caller_error(open_store: OpenStore) -> None:
    store = await open_store()
    await store.insert(row("x"))
    wrong = Fence((shard_of("x") + 1) % SHARDS, "a", 1)
    with pytest.raises(ValueError, match="not in shard"):
        await store.mark_warned("x", 1.0, fence=wrong)
    with pytest.raises(ValueError, match="not in shard"):
        await store.set_binding_states([state("x", "work", wrong)])


async def test_instances_in_shards(open_store: OpenStore) -> None:
    store = await open_store()
    rows = {f"i{n}": row(f"i{n}") for n in range(30)}
    for r in rows.values():
        await store.insert(r)
    wanted = {shard_of(name) for name in list(rows)[:10]}
    found = await store.instances_in_shards(wanted)
    assert sorted(r.id for r in found) == sorted(n for n in rows if shard_of(n) in wanted)
    assert all(r == rows[r.id] for r in found), "with their accounts"
    assert await store.instances_in_shards([]) == []


# -- the purge log -----------------------------------------------------------------------


async def test_many_erasures_at_once_through_two_nodes_make_one_chain(
    open_store: OpenStore, tmp_path: Path
) -> None:
    keys = AuditKeys.load_or_create(tmp_path / "audit.json")
    a, b = await open_store(), await open_store()
    names = [f"i{n}" for n in range(60)]
    for name in names:
        await a.insert(row(name))
    entries = await asyncio.gather(
        *(
            (a if n % 2 else b).erase(
                name, at=float(n), reason="admin", subject=keys.subject(name), erased={}
            )
            for n, name in enumerate(names)
        )
    )
    assert all(entry is not None for entry in entries)
    log = await b.purge_log()
    assert [e.seq for e in log] == list(range(1, len(names) + 1))
    await a.add_checkpoint(make_checkpoint(keys, log[-1], 100.0))
    report = verify(log, await b.checkpoints(), keys.public_key_b64)
    assert report.ok, report.findings
    assert report.signed_seq == len(names)


# -- change notices ----------------------------------------------------------------------


class Notices:
    """Collects the changes a store reports, to wait for them one by one."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Change] = asyncio.Queue()

    def __call__(self, change: Change) -> None:
        self.queue.put_nowait(change)

    async def next(self) -> Change:
        return await asyncio.wait_for(self.queue.get(), WAIT)


async def test_listen_delivers_changes_of_every_node(open_store: OpenStore) -> None:
    a, b = await open_store(), await open_store()
    notices = Notices()
    await a.listen(notices)
    original = row("x")
    await b.insert(original)
    assert await notices.next() == Change("changed", "x")
    await b.replace(replace(original, paused=True))
    assert await notices.next() == Change("changed", "x")
    assert not await b.replace(row("missing"))
    await a.insert(row("y"))
    assert await notices.next() == Change("changed", "y")
    await b.erase("x", at=1.0, reason="token_invalid", subject="0" * 64, erased={})
    assert await notices.next() == Change("erased", "x", "token_invalid")
    assert await b.erase("x", at=1.0, reason="admin", subject="0" * 64, erased={}) is None
    await b.insert(row("z"))
    assert await notices.next() == Change("changed", "z"), "nothing sent for what did not happen"


async def test_malformed_notices_are_logged_and_ignored(
    open_store: OpenStore, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = await open_store()
    notices = Notices()
    await store.listen(notices)
    connection = await asyncpg.connect(pg_url, timeout=WAIT)
    try:
        for payload in ("bogus x", "changed", "changed a b", "erased x", ""):
            await connection.execute("SELECT pg_notify('sipis_instances', $1)", payload)
        await connection.execute("SELECT pg_notify('sipis_instances', 'erased x expired')")
    finally:
        await connection.close()
    assert await notices.next() == Change("erased", "x", "expired")
    assert notices.queue.empty()
    ignored = [r for r in caplog.records if "malformed change notice" in r.getMessage()]
    assert len(ignored) == 5


async def test_listen_reconnects_when_its_connection_drops(
    open_store: OpenStore, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sipis.store.postgres")
    a, b = await open_store(), await open_store()
    notices = Notices()
    await a.listen(notices)
    admin = await asyncpg.connect(pg_url, timeout=WAIT)
    listeners = "SELECT pid FROM pg_stat_activity WHERE application_name = 'sipis-listen'"
    try:
        [old] = [r[0] for r in await admin.fetch(listeners)]
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", old)
        async with asyncio.timeout(WAIT):
            while [r[0] for r in await admin.fetch(listeners)] in ([], [old]):
                await asyncio.sleep(0.05)
    finally:
        await admin.close()
    await b.insert(row("after"))
    assert await notices.next() == Change("changed", "after")
    messages = [r.getMessage() for r in caplog.records]
    assert any("lost the connection for change notices" in m for m in messages)
    assert any("listening for change notices again" in m for m in messages)


# -- errors ------------------------------------------------------------------------------


async def test_a_password_in_the_url_never_shows(pg_url: str) -> None:
    password = "pw-" + secrets.token_hex(12)
    remember(password)
    server, database = pg_url.removeprefix("postgresql://sipis@").split("/")
    with_password = f"postgresql://sipis:{password}@{server}/{database}"
    failing = (
        f"postgresql://sipis:{password}@{HOST}:{free_port(socket.SOCK_STREAM)}/db",  # no server
        f"postgresql://sipis:{password}@{server}/no_such_database",
        f"postgresql://sipis@{server}/no_such_database?password={password}",
    )
    for url in failing:
        store = PostgresStore(url)
        assert password not in repr(store)
        with pytest.raises(StoreError) as failure:
            await store.open()
        text = "".join(traceback.format_exception(failure.value))
        assert password not in text
        assert redacted(url) in str(failure.value)
    store = PostgresStore(with_password)
    await store.open()  # the test server trusts loopback, so the password is not needed
    try:
        await store.insert(row("x"))
        with pytest.raises(StoreError) as failure:
            await store.insert(row("x"))
        assert "UniqueViolationError" in str(failure.value)
        assert password not in "".join(traceback.format_exception(failure.value))
    finally:
        await store.close()


def test_redacted_urls() -> None:
    assert redacted("postgresql://u:secret@db.example:5433/sipis?password=x&sslmode=require") == (
        "postgresql://u@db.example:5433/sipis"
    )
    assert redacted("postgres://db.example/sipis") == "postgres://db.example/sipis"
    assert redacted("postgresql://u:p@[::1/db") == "the PostgreSQL database"
