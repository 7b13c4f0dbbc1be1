"""What a cluster asks of PostgreSQL: creates, lease rounds, take-over reads, state writes,
erasures on the one purge-log chain; with the SQLite store beside it for the erasures.

    python bench/cluster.py [--instances 3000] [--nodes 3]

PostgreSQL is Debian's, started on loopback with its own fsync and
synchronous commit on (as in production), in a fresh directory.  Instances
are made by ``Instances.create`` (encryption included, no bindings: the
node owns no shard), one account each, 16 at a time.  Reported, each as a
rate or a time:

* creates per second;
* one lease round of a node (heartbeat + renew of its 4096/N leases), and
  a first claim of its fair share;
* rows per second read by a take-over (``instances_in_shards`` of a fair
  share of shards);
* registration states written per second, in batches of 1,000 fenced rows;
* erasures per second from N store objects (N nodes) at once, 32 at a time
  each, all appended to the one purge-log chain; and from one SQLite store
  the same way, with the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sipis.audit import AuditKeys
from sipis.bindings import BindingManager
from sipis.crypto import MasterKeyring
from sipis.instances import AccountSpec, Instances, InstanceSpec, PushSpec
from sipis.shards import SHARDS, fair_share, shard_of
from sipis.store.base import BindingStateRow, Fence, Store
from sipis.store.postgres import PostgresStore
from sipis.store.sqlite import SqliteStore
from sipis.transport.layer import TransportLayer, TransportSettings
from sipis.transport.resolver import Resolver
from tests.postgres import PostgresServer

LEASE = 30.0
CONCURRENCY = 16
ERASE_CONCURRENCY = 32


class _NoShards:
    """Ownership of a node holding no shard: instances are stored, never registered."""

    def owns(self, instance_id: str) -> bool:
        return False

    def fence(self, instance_id: str) -> Fence:
        return Fence(shard_of(instance_id), "bench", -1)

    async def binding_states(self, instance_id: str) -> dict[str, dict[str, Any]]:
        return {}


def spec(number: int) -> InstanceSpec:
    account = AccountSpec(
        id="work",
        aor=f"sip:u{number:06d}@example.test",
        auth_username=f"u{number:06d}",
        password="bench-password",  # noqa: S106 - a benchmark account
        registrar="sip:127.0.0.1:5060",
    )
    push = PushSpec(call_token="a1" * 32, other_token=None, environment="production")
    return InstanceSpec(app_id="com.example.phone", platform="ios", push=push, accounts=(account,))


async def create_all(instances: Instances, count: int) -> tuple[list[str], float]:
    gate = asyncio.Semaphore(CONCURRENCY)
    ids: list[str] = []

    async def one(number: int) -> None:
        async with gate:
            instance_id, _, _ = await instances.create(spec(number))
            ids.append(instance_id)

    started = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(count)))
    return ids, time.perf_counter() - started


async def erase_all(stores: list[Store], ids: list[str], keys: AuditKeys) -> float:
    gates = [asyncio.Semaphore(ERASE_CONCURRENCY) for _ in stores]

    async def one(number: int, instance_id: str) -> None:
        store = stores[number % len(stores)]
        async with gates[number % len(stores)]:
            entry = await store.erase(
                instance_id,
                at=time.time(),
                reason="expired",
                subject=keys.subject(instance_id),
                erased={"accounts": 1},
            )
            assert entry is not None

    started = time.perf_counter()
    await asyncio.gather(*(one(n, i) for n, i in enumerate(ids)))
    return time.perf_counter() - started


async def timed(work: Any, repeat: int = 5) -> float:
    """Median seconds of ``repeat`` runs of the coroutine function ``work``."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await work()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


async def run(count: int, nodes: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="sipis-bench-cluster-"))
    keyring = MasterKeyring.load_or_create(workdir / "master.json")
    audit = AuditKeys.load_or_create(workdir / "audit.json")
    # never used: the node owns no shard, so no instance is registered
    transport = TransportLayer(lambda _message, _flow: None, TransportSettings(host="127.0.0.1"))
    bindings = BindingManager(transport, Resolver(), on_request=lambda _request, _flow: None)
    with PostgresServer(durable=True) as server:
        url = await server.new_database()
        stores = [PostgresStore(url) for _ in range(nodes)]
        for store in stores:
            await store.open()
        first = stores[0]
        try:
            instances = Instances(first, keyring, audit, bindings, ownership=_NoShards())
            ids, seconds = await create_all(instances, count)
            print(f"creates: {count / seconds:,.0f}/s ({count} instances, {CONCURRENCY} at a time)")

            share = fair_share(nodes)
            started = time.perf_counter()
            held = await first.claim("n0", share, LEASE)
            print(f"first claim of {share} shards: {(time.perf_counter() - started) * 1000:.1f} ms")

            async def lease_round() -> None:
                await first.heartbeat("n0", "sip:n0.example.net", LEASE)
                await first.renew("n0", LEASE)

            print(f"lease round ({len(held)} leases): {await timed(lease_round) * 1000:.1f} ms")

            started = time.perf_counter()
            rows = await first.instances_in_shards(list(held))
            seconds = time.perf_counter() - started
            print(f"take-over read: {len(rows)} instances in {seconds * 1000:.0f} ms "
                  f"({len(rows) / seconds:,.0f} rows/s)")  # fmt: skip

            states = [
                BindingStateRow(r.id, "work", "registered", 200, "OK", time.time(),
                                Fence(shard_of(r.id), "n0", held[shard_of(r.id)]))
                for r in rows
            ]  # fmt: skip
            batches = [states[i : i + 1000] for i in range(0, len(states), 1000)]
            started = time.perf_counter()
            for batch in batches:
                refused = await first.set_binding_states(batch)
                assert not refused
            seconds = time.perf_counter() - started
            print(f"registration states: {len(states) / seconds:,.0f} rows/s (batches of 1,000)")

            seconds = await erase_all(list(stores), ids, audit)
            postgres_rate = count / seconds
            print(f"erasures, PostgreSQL, {nodes} nodes: {postgres_rate:,.0f}/s")
            assert [e.seq for e in await first.purge_log()] == list(range(1, count + 1))
        finally:
            for store in stores:
                await store.close()

    sqlite = SqliteStore(workdir / "sipis.db")
    await sqlite.open()
    try:
        instances = Instances(sqlite, keyring, audit, bindings, ownership=_NoShards())
        ids, _ = await create_all(instances, count)
        seconds = await erase_all([sqlite], ids, audit)
        sqlite_rate = count / seconds
        print(f"erasures, SQLite, one node: {sqlite_rate:,.0f}/s "
              f"(PostgreSQL / SQLite: {postgres_rate / sqlite_rate:.2f})")  # fmt: skip
    finally:
        await sqlite.close()
    print(f"shards: {SHARDS}, fair share of {nodes} nodes: {fair_share(nodes)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=3000)
    parser.add_argument("--nodes", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(run(args.instances, args.nodes))


if __name__ == "__main__":
    main()
