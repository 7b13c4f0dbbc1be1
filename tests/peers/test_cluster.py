"""Several sipis nodes share the bindings through PostgreSQL and survive the loss of a node.

One cluster serves the whole module: a PostgreSQL database, Kamailio with
3,000 users (u0000..u2999) as the registrar of every account, a local APNs
and FCM, and three ``sipis serve`` processes with 6 s leases (a round every
2 s) that register the accounts of shards they take over within 2 s.
3,000 instances, one account each, are created through the APIs of all
three nodes.  The tests then change the cluster one step at a time, each
starting from a settled cluster (every shard held by a live node, each
node's share fair, every account registered once, by its shard's owner):

1. three nodes: every account registered exactly once, from the SIP port of
   the node that owns its instance's shard;
2. a fourth node joins: the shards rebalance to a quarter each and no
   address-of-record is ever without its one contact meanwhile;
3. a node is killed: the survivors register its accounts again within
   lease + 30 s, never leaving an AOR with other than one contact, and a
   call to one of its accounts is pushed by the survivor that took it,
   naming that survivor's device URI;
4. a node joins and is frozen while it registers the accounts of the shards
   it took, until its leases expire and the others took them back; resumed,
   it sends nothing for the shards it lost, counts them as lost, and no
   registration state it wrote under an old lease survives;
5. instances created on one node and deleted at once on another: none is
   left behind anywhere, and the purge log verifies.

Finally the nodes stop on SIGTERM with status 0, and no node's log holds a
password, secret, token or key the tests handed over, or an error.

Kamailio's location table is read whole (``all_contacts``), and a
contact's "received" port names the node that registered it.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import itertools
import re
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import pytest
import pytest_asyncio
import trustme

from sipis.shards import SHARDS, shard_of
from tests.peers.cluster import Cluster, ClusterNode, push_content
from tests.peers.kamailio import Kamailio, LocationContact
from tests.peers.sipp import run_sipp_client
from tests.postgres import PostgresServer
from tests.secrets import remember

pytestmark = [pytest.mark.peer, pytest.mark.asyncio(loop_scope="module")]

USERS = 3000
RACE_USERS = 300
NODES = 3
LEASE = 6.0
TAKEOVER_SPREAD = 2.0
RING = 2.0
ACCOUNT_EXPIRES = 600
APP_ID = "com.example.phone"

CREATE_CONCURRENCY = 24
SETTLE_TIMEOUT = 60.0
TAKEOVER_TIMEOUT = LEASE + 30.0
# A fair share, here, is within 10 % of the shards divided by the live nodes.
FAIR_TOLERANCE = 0.10
SAMPLE_INTERVAL = 0.2
CLI_TIMEOUT = 30.0
_RECEIVED = re.compile(r"sip:127\.0\.0\.1:(\d+)")
T = TypeVar("T")


@dataclass(frozen=True)
class Subscriber:
    """One Kamailio user and what its app hands over: every value but the user is secret."""

    user: str
    password: str
    platform: str
    call_token: str
    other_token: str | None
    payload_key: bytes | None

    @classmethod
    def make(cls, user: str, platform: str) -> Subscriber:
        ios = platform == "ios"
        subscriber = cls(
            user=user,
            password=f"pw-{secrets.token_urlsafe(12)}",
            platform=platform,
            call_token=secrets.token_hex(32) if ios else f"fcm-{secrets.token_urlsafe(40)}",
            other_token=secrets.token_hex(32) if ios else None,
            payload_key=secrets.token_bytes(32) if ios else None,
        )
        remember(*subscriber.secrets())
        return subscriber

    def body(self, registrar: str) -> dict[str, Any]:
        push: dict[str, Any] = {"call_token": self.call_token}
        if self.other_token is not None:
            push.update(other_token=self.other_token, environment="sandbox")
        body: dict[str, Any] = {
            "app_id": APP_ID,
            "platform": self.platform,
            "push": push,
            "accounts": [
                {
                    "id": "work",
                    "aor": f"sip:{self.user}@example.test",
                    "password": self.password,
                    "registrar": registrar,
                    "expires": ACCOUNT_EXPIRES,
                }
            ],
        }
        if self.payload_key is not None:
            body["payload_key"] = base64.b64encode(self.payload_key).decode()
        return body

    def secrets(self) -> list[str]:
        values = [self.password, self.call_token, self.other_token]
        if self.payload_key is not None:
            values.append(base64.b64encode(self.payload_key).decode())
        return [v for v in values if v]


@dataclass(frozen=True)
class Snapshot:
    """The shard leases and Kamailio's location table, read one right after the other."""

    leases: dict[int, tuple[str | None, int]]
    contacts: dict[str, list[LocationContact]]

    def owner(self, instance_id: str) -> str | None:
        return self.leases[shard_of(instance_id)][0]

    def held(self) -> Counter[str | None]:
        return Counter(owner for owner, _ in self.leases.values())


@dataclass
class World:
    """The module's cluster, its registrar and the 3,000 instances."""

    cluster: Cluster
    kamailio: Kamailio
    workdir: Path
    subscribers: dict[str, Subscriber]  # by user
    instance_of: dict[str, str] = field(default_factory=dict)  # user -> instance id
    secret_of: dict[str, str] = field(default_factory=dict)  # instance id -> secret
    created_by: Counter[str] = field(default_factory=Counter)  # node name -> creations
    race_subscribers: dict[str, Subscriber] = field(default_factory=dict)
    race_secrets: list[str] = field(default_factory=list)  # of instances created and deleted

    def node_ports(self) -> dict[str, int]:
        return {node.name: node.sip_port for node in self.cluster.nodes}

    async def snapshot(self) -> Snapshot:
        contacts = await self.kamailio.all_contacts()
        leases = await self.cluster.leases()
        return Snapshot(leases, contacts)

    def users_owned_by(self, snapshot: Snapshot, node: ClusterNode) -> list[str]:
        return [u for u, i in self.instance_of.items() if snapshot.owner(i) == node.name]

    def registration_problems(self, snapshot: Snapshot, users: Collection[str]) -> list[str]:
        """Users not registered exactly once, from the SIP port of their shard's owner."""
        ports = self.node_ports()
        problems = []
        for user in users:
            owner = snapshot.owner(self.instance_of[user])
            received = [received_port(c) for c in snapshot.contacts.get(user, [])]
            expected = ports.get(owner) if owner is not None else None
            if received != [expected] or expected is None:
                problems.append(
                    f"{user}: owner {owner} (port {expected}), contacts from {received}"
                )
        return problems

    def lease_problems(self, snapshot: Snapshot) -> list[str]:
        """Shards held by no live node, and live nodes whose share is not fair."""
        live = {node.name for node in self.cluster.live()}
        held = snapshot.held()
        problems = []
        orphans = sum(count for owner, count in held.items() if owner not in live)
        if orphans:
            problems.append(f"{orphans} shard(s) held by no live node: {dict(held)}")
        fair = SHARDS / len(live)
        for name in sorted(live):
            if abs(held[name] - fair) > FAIR_TOLERANCE * fair:
                problems.append(f"{name} holds {held[name]} shards, fair is {fair:.0f}")
        return problems

    async def settled(self, timeout: float = SETTLE_TIMEOUT) -> Snapshot:
        """Wait until the live nodes hold every shard, each a fair share, and every account
        is registered exactly once, from its shard owner's SIP port."""
        problems = ["not checked yet"]
        try:
            async with asyncio.timeout(timeout):
                while True:
                    snapshot = await self.snapshot()
                    problems = self.lease_problems(snapshot) + self.registration_problems(
                        snapshot, self.instance_of
                    )
                    if not problems:
                        return snapshot
                    await asyncio.sleep(SAMPLE_INTERVAL)
        except TimeoutError:
            raise AssertionError(
                f"cluster not settled after {timeout} s, {len(problems)} problem(s): "
                f"{problems[:10]}"
            ) from None

    async def call(self, user: str, name: str) -> None:
        """sipp calls ``user`` through Kamailio: 180 with a push sent, then 480 at the ring
        timeout (uac_call_ring_out.xml)."""
        result = await run_sipp_client(
            "uac_call_ring_out.xml",
            self.kamailio.address("udp"),
            service=user,
            timeout=RING + 8,
            workdir=self.workdir / f"sipp-{name}",
        )
        assert result.returncode == 0, f"{result.errors}\n{result.screen}"


class ContactWatch:
    """Reads Kamailio's whole location table again and again in the background and notes
    every sample in which a watched user had other than exactly one contact."""

    def __init__(self, kamailio: Kamailio, users: Collection[str]) -> None:
        self._kamailio = kamailio
        self._users = list(users)
        self.samples = 0
        self.problems: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._task is not None
        if self._task.done():
            self._task.result()  # a failed sample is the test's failure
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        started = time.monotonic()
        while True:
            contacts = await self._kamailio.all_contacts()
            self.samples += 1
            at = time.monotonic() - started
            for user in self._users:
                count = len(contacts.get(user, []))
                if count != 1:
                    self.problems.append(f"{at:.1f} s: {user} had {count} contact(s)")
            await asyncio.sleep(SAMPLE_INTERVAL)


def received_port(contact: LocationContact) -> int | None:
    found = _RECEIVED.fullmatch(contact["received"] or "")
    return int(found.group(1)) if found else None


async def bounded(
    what: str,
    timeout: float,
    check: Callable[[], Awaitable[T | None]],
    interval: float = SAMPLE_INTERVAL,
) -> T:
    """Call ``await check()`` until it returns something true, and return that; fail with
    ``what`` after ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not (result := await check()):
                await asyncio.sleep(interval)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {timeout} s") from None
    return result


async def create_all(
    nodes: Sequence[ClusterNode], subscribers: Sequence[Subscriber], registrar: str
) -> list[tuple[ClusterNode, Subscriber, str, str]]:
    """Create an instance per subscriber, round robin over ``nodes``, a bounded number at
    a time; (node, subscriber, instance id, secret) each."""
    gate = asyncio.Semaphore(CREATE_CONCURRENCY)

    async def create(node: ClusterNode, subscriber: Subscriber) -> tuple[str, str]:
        async with gate:
            status, answer = await node.api(
                "POST", "/v1/instances", body=subscriber.body(registrar)
            )
        assert status == 201, f"{node.name}: {status} {answer} {node.error_lines()[-1:]}"
        return answer["id"], answer["secret"]

    plan = list(zip(itertools.cycle(nodes), subscribers, strict=False))
    made = await asyncio.gather(*(create(node, subscriber) for node, subscriber in plan))
    return [(node, sub, i, s) for (node, sub), (i, s) in zip(plan, made, strict=True)]


async def sipis_cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sipis", *args, "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


async def bindings_held(nodes: Sequence[ClusterNode]) -> dict[str, float]:
    """Bindings each node holds, in any state, per its metrics."""
    scrapes = await asyncio.gather(*(node.metrics() for node in nodes))
    return {n.name: s.value("sipis_bindings") for n, s in zip(nodes, scrapes, strict=True)}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(
    postgres_server: PostgresServer,
    peer_ca: trustme.CA,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[World]:
    workdir = tmp_path_factory.mktemp("cluster")
    subscribers = {
        f"u{n:04d}": Subscriber.make(f"u{n:04d}", "ios" if n % 2 == 0 else "android")
        for n in range(USERS)
    }
    race_subscribers = {
        f"r{n:04d}": Subscriber.make(f"r{n:04d}", "ios" if n % 2 == 0 else "android")
        for n in range(RACE_USERS)
    }
    passwords = {s.user: s.password for s in [*subscribers.values(), *race_subscribers.values()]}
    database_url = await postgres_server.new_database()
    async with (
        Kamailio(passwords, ca=peer_ca, workdir=workdir / "kamailio") as kamailio,
        Cluster(
            workdir / "nodes",
            database_url,
            kamailio,
            peer_ca,
            lease=LEASE,
            takeover_spread=TAKEOVER_SPREAD,
            ring_timeout=RING,
        ) as cluster,
    ):
        started = time.monotonic()
        nodes = await cluster.start_nodes(NODES)
        print(f"{NODES} nodes started in {time.monotonic() - started:.1f} s")
        world = World(cluster, kamailio, workdir, subscribers, race_subscribers=race_subscribers)
        started = time.monotonic()
        for node, subscriber, instance_id, secret in await create_all(
            nodes, list(subscribers.values()), cluster.registrar
        ):
            world.instance_of[subscriber.user] = instance_id
            world.secret_of[instance_id] = secret
            world.created_by[node.name] += 1
        print(f"{USERS} instances created in {time.monotonic() - started:.1f} s")
        yield world


async def test_three_nodes_register_every_account_once_from_its_shard_owner(world: World) -> None:
    cluster = world.cluster
    live = cluster.live()
    assert len(live) == NODES
    assert len(world.instance_of) == USERS == len(set(world.instance_of.values()))
    # Created through every node's API, an equal part each.
    assert world.created_by == {node.name: USERS // NODES for node in live}

    started = time.monotonic()
    snapshot = await world.settled()
    print(f"all {USERS} accounts registered {time.monotonic() - started:.1f} s after creation")

    # Exactly one contact per AOR, none missing, none for anyone else.
    assert sorted(snapshot.contacts) == sorted(world.subscribers)
    assert all(len(c) == 1 for c in snapshot.contacts.values())
    assert world.registration_problems(snapshot, world.subscribers) == []
    # Every node registered the accounts of its shards, so each has some.
    ports = Counter(received_port(c[0]) for c in snapshot.contacts.values())
    assert set(ports) == {node.sip_port for node in live}

    held = snapshot.held()
    assert None not in held and sum(held.values()) == SHARDS
    scrapes = {node.name: await node.metrics() for node in live}
    assert {name: s.value("sipis_cluster_shards") for name, s in scrapes.items()} == held
    assert all(s.value("sipis_cluster_nodes") == NODES for s in scrapes.values())
    assert sum(s.value("sipis_bindings") for s in scrapes.values()) == USERS

    # Each node's bindings are those of its shards' instances; a 200 OK Kamailio sent may
    # still be on its way to the node.
    owned = Counter(snapshot.owner(i) for i in world.instance_of.values())

    async def registered_by_owner() -> bool:
        scrapes = {node.name: await node.metrics() for node in live}
        registered = {n: s.value("sipis_bindings", state="registered") for n, s in scrapes.items()}
        return registered == owned

    await bounded("every node's bindings registered, one per instance it owns", 5.0,
                  registered_by_owner)  # fmt: skip


async def test_a_fourth_node_joins_and_no_aor_is_ever_left_without_its_contact(
    world: World,
) -> None:
    cluster = world.cluster
    await world.settled()
    before = len(cluster.live())
    async with ContactWatch(world.kamailio, world.subscribers) as watch:
        started = time.monotonic()
        joined = await cluster.add_node()
        snapshot = await world.settled()
        print(
            f"node {joined.name} joined and the cluster settled in "
            f"{time.monotonic() - started:.1f} s ({watch.samples} samples)"
        )
    live = cluster.live()
    assert len(live) == before + 1
    quarter = SHARDS / len(live)
    held = snapshot.held()
    assert all(abs(held[node.name] - quarter) <= FAIR_TOLERANCE * quarter for node in live), held
    assert sum(held[node.name] for node in live) == SHARDS
    assert world.users_owned_by(snapshot, joined), "the new node took over some accounts"
    moves = await joined.metrics()
    assert moves.value("sipis_cluster_shard_moves_total", direction="claimed") == held[joined.name]
    assert watch.samples >= 5
    assert watch.problems == [], watch.problems[:20]
    assert world.registration_problems(snapshot, world.subscribers) == []


async def test_a_killed_node_is_replaced_and_its_calls_are_pushed_by_a_survivor(
    world: World,
) -> None:
    cluster = world.cluster
    before = await world.settled()
    victim = cluster.live()[-1]
    survivors = [node for node in cluster.live() if node is not victim]
    orphaned = world.users_owned_by(before, victim)
    assert orphaned
    survivor_ports = {node.sip_port for node in survivors}

    async def moved() -> Snapshot | None:
        snapshot = await world.snapshot()
        if snapshot.held()[victim.name] or world.registration_problems(snapshot, orphaned):
            return None
        return snapshot

    async with ContactWatch(world.kamailio, world.subscribers) as watch:
        killed_at = time.monotonic()
        assert await victim.kill() == -9
        after: Snapshot = await bounded(
            f"the {len(orphaned)} accounts of {victim.name} registered again",
            TAKEOVER_TIMEOUT,
            moved,
        )
        took = time.monotonic() - killed_at
    print(f"{len(orphaned)} accounts of {victim.name} registered again {took:.1f} s after SIGKILL")
    assert watch.problems == [], watch.problems[:20]
    assert watch.samples >= 5
    assert all(received_port(after.contacts[user][0]) in survivor_ports for user in orphaned), (
        "every orphaned contact now comes from a survivor"
    )

    # A call to an account that lived on the dead node: pushed by its new owner.
    settled = await world.settled()
    by_name = {node.name: node for node in survivors}
    ios = next(u for u in orphaned if world.subscribers[u].platform == "ios")
    android = next(u for u in orphaned if world.subscribers[u].platform == "android")
    owner_names = {user: settled.owner(world.instance_of[user]) for user in (ios, android)}
    assert set(owner_names.values()) <= set(by_name), owner_names
    owners = {user: by_name[str(name)] for user, name in owner_names.items()}
    pushes_before = {
        node.name: (await node.metrics()).value("sipis_pushes_total", kind="call")
        for node in survivors
    }
    await asyncio.gather(world.call(ios, "ios"), world.call(android, "android"))

    for user in (ios, android):
        subscriber = world.subscribers[user]
        owner = owners[user]
        what = f"a call push for {user}"
        pushes = await bounded(what, 10.0, functools.partial(call_pushes, world, subscriber))
        assert len(pushes) == 1, f"{len(pushes)} call pushes for {user}"
        [content] = pushes
        assert content["instance"] == world.instance_of[user]
        assert content["account"] == "work"
        assert content["relay"] == owner.device_uri, f"{user}'s push names its new owner"
    pushed = {
        node.name: (await node.metrics()).value("sipis_pushes_total", kind="call")
        - pushes_before[node.name]
        for node in survivors
    }
    expected = Counter(owner.name for owner in owners.values())
    assert {name: count for name, count in pushed.items() if count} == expected


async def call_pushes(world: World, subscriber: Subscriber) -> list[dict[str, str]]:
    """What the app reads in each push of type "call" that reached ``subscriber``'s call
    token (on Android the missed-call push goes to the same token)."""
    payloads: list[Any]
    if subscriber.platform == "ios":
        pushes = [p for p in world.cluster.apns.pushes.items if p.token == subscriber.call_token]
        assert all(p.headers["apns-push-type"] == "voip" for p in pushes)
        payloads = [p.payload for p in pushes if p.status == 200]
    else:
        messages = world.cluster.fcm.messages.items
        payloads = [m.message["data"] for m in messages
                    if m.target == subscriber.call_token and m.status == 200]  # fmt: skip
    contents = [push_content(payload, subscriber.payload_key) for payload in payloads]
    return [content for content in contents if content["type"] == "call"]


async def test_a_node_frozen_past_its_lease_sends_nothing_stale_when_resumed(
    world: World,
) -> None:
    cluster = world.cluster
    await world.settled()
    # Frozen while it takes shards over: most of their REGISTERs are still to go.
    victim = await cluster.add_node()

    async def registering() -> Snapshot | None:
        snapshot = await world.snapshot()
        ports = (received_port(c) for cs in snapshot.contacts.values() for c in cs)
        return snapshot if victim.sip_port in ports else None

    what = f"{victim.name} registering the accounts of the shards it took"
    seen: Snapshot = await bounded(what, SETTLE_TIMEOUT, registering, interval=0.05)
    victim.freeze()
    frozen_at = time.monotonic()
    owned = world.users_owned_by(seen, victim)
    pending = world.registration_problems(seen, owned)
    print(f"{victim.name} frozen holding {len(owned)} accounts, {len(pending)} not registered yet")
    assert pending, "frozen with REGISTERs still to send"

    # The others hold every shard and registered every account, none from the frozen node.
    await world.settled(TAKEOVER_TIMEOUT)
    print(f"{victim.name} frozen: taken over after {time.monotonic() - frozen_at:.1f} s")
    await asyncio.sleep(max(0.0, frozen_at + LEASE + 1.0 - time.monotonic()))
    assert victim.name not in {owner for owner, _ in (await cluster.leases()).values()}

    # After the resume: a contact from its port must be for a shard it holds again.
    victim.resume()
    stale: list[str] = []
    samples = 0
    observe_until = time.monotonic() + LEASE
    while time.monotonic() < observe_until:
        snapshot = await world.snapshot()  # contacts first: a later lease explains them
        samples += 1
        for user, contacts in snapshot.contacts.items():
            if user not in world.instance_of:
                continue
            owner = snapshot.owner(world.instance_of[user])
            stale += [
                f"{user} from {victim.name}, shard owned by {owner}"
                for c in contacts
                if received_port(c) == victim.sip_port and owner != victim.name
            ]
        await asyncio.sleep(SAMPLE_INTERVAL)
    assert samples >= 5
    assert stale == [], stale[:20]

    async def lost_counted() -> float:
        return (await victim.metrics()).value("sipis_cluster_shard_moves_total", direction="lost")

    assert await bounded(f"{victim.name} counting its lost shards", LEASE, lost_counted) > 0
    fenced = (await victim.metrics()).value("sipis_cluster_fenced_writes_total")
    print(f"{victim.name} resumed: {len(stale)} stale contacts in {samples} samples, "
          f"{fenced:.0f} registration state write(s) refused")  # fmt: skip

    # Back in the cluster, and every registration state written under a current lease.
    settled = await world.settled()
    assert settled.held()[victim.name] > 0, "the resumed node took a share again"
    ids = sorted(world.instance_of.values())

    async def states_current() -> bool:
        leases = await cluster.leases()
        states = await cluster.binding_states(ids)
        return all(
            [(r.account_id, r.fence.node, r.fence.epoch) for r in rows]
            == [("work", *leases[shard_of(i)])]
            for i, rows in states.items()
        )

    await bounded("every binding state written under its shard's current lease", 15.0,
                  states_current)  # fmt: skip
    snapshot = await world.settled()
    assert world.registration_problems(snapshot, world.subscribers) == []


async def test_instances_deleted_on_another_node_while_created_leave_nothing(
    world: World,
) -> None:
    cluster = world.cluster
    await world.settled()
    live = cluster.live()
    pairs = [(a, b) for a in live for b in live if a is not b]
    gate = asyncio.Semaphore(CREATE_CONCURRENCY)
    race = list(world.race_subscribers.values())

    async def create_then_delete(
        creator: ClusterNode, deleter: ClusterNode, subscriber: Subscriber
    ) -> tuple[str, str]:
        async with gate:
            status, created = await creator.api(
                "POST", "/v1/instances", body=subscriber.body(cluster.registrar)
            )
            assert status == 201, f"{creator.name}: {status} {created} {creator.error_lines()[-1:]}"
            status, answer = await deleter.api(
                "DELETE", f"/v1/instances/{created['id']}", secret=created["secret"]
            )
            assert status == 204, f"{deleter.name}: {status} {answer} {deleter.error_lines()[-1:]}"
        return created["id"], created["secret"]

    started = time.monotonic()
    erased = await asyncio.gather(
        *(
            create_then_delete(*pair, subscriber)
            for pair, subscriber in zip(itertools.cycle(pairs), race, strict=False)
        )
    )
    print(f"{len(erased)} instances created and deleted in {time.monotonic() - started:.1f} s")
    world.race_secrets += [secret for _, secret in erased]

    # Gone on every node: an unknown instance answers like a wrong secret, 401 (API.md).
    for node in live:
        for instance_id, secret in erased:
            path = f"/v1/instances/{instance_id}"
            assert (await node.api("GET", path, secret=secret))[0] == 401
            assert (await node.api("DELETE", path, secret=secret))[0] == 401

    async def unregistered() -> bool:
        contacts = await world.kamailio.all_contacts()
        return not any(s.user in contacts for s in race)

    await bounded("no contact left for a deleted instance", 10.0, unregistered)
    # ... and none comes back from a registration still under way somewhere.
    await asyncio.sleep(LEASE / 2)
    contacts = await world.kamailio.all_contacts()
    assert [s.user for s in race if s.user in contacts] == []

    async def only_live_bindings() -> dict[str, float] | None:
        held = await bindings_held(live)
        return held if sum(held.values()) == USERS else None

    await bounded(f"bindings adding up to the {USERS} live instances", 10.0, only_live_bindings)
    stats = [await node.stats() for node in live]
    assert sum(sum(s["bindings"].values()) for s in stats) == USERS
    assert sum(n for s in stats for by_state in s["instances"].values()
               for n in by_state.values()) == USERS  # fmt: skip
    assert all(s["purges"] == {"disabled": len(erased)} for s in stats), stats[0]["purges"]
    snapshot = await world.settled()
    assert world.registration_problems(snapshot, world.subscribers) == []

    verified = await sipis_cli(live[0].config_path, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


async def test_a_node_stopped_hands_its_shards_over_before_any_lease_runs_out(
    world: World,
) -> None:
    cluster = world.cluster
    before = await world.settled()
    leaving = cluster.live()[0]
    staying = [node for node in cluster.live() if node is not leaving]
    handed = world.users_owned_by(before, leaving)
    assert handed
    staying_ports = {node.sip_port for node in staying}

    async def moved() -> Snapshot | None:
        snapshot = await world.snapshot()
        if snapshot.held()[leaving.name] or world.lease_problems(snapshot):
            return None
        if world.registration_problems(snapshot, handed):
            return None
        return snapshot

    async with ContactWatch(world.kamailio, world.subscribers) as watch:
        stopped_at = time.monotonic()
        assert await leaving.stop() == 0
        # A crashed node's shards wait for its leases to run out; a stopped node's do not.
        after: Snapshot = await bounded(f"{leaving.name}'s accounts handed over", LEASE, moved)
        took = time.monotonic() - stopped_at
    print(f"{len(handed)} accounts of {leaving.name} handed over {took:.1f} s after SIGTERM")
    assert watch.problems == [], watch.problems[:20]
    assert all(received_port(after.contacts[user][0]) in staying_ports for user in handed)
    assert (await world.settled()).held()[leaving.name] == 0


async def test_nodes_stop_cleanly_having_logged_no_secret_and_no_error(world: World) -> None:
    live = world.cluster.live()
    assert await asyncio.gather(*(node.stop() for node in live)) == [0] * len(live)
    handed_over = [
        value
        for subscriber in [*world.subscribers.values(), *world.race_subscribers.values()]
        for value in subscriber.secrets()
    ]
    handed_over += [*world.secret_of.values(), *world.race_secrets]
    logs = world.cluster.log_texts()
    assert len(logs) >= NODES and all(" level=debug " in text for text in logs.values())
    leaked = {name: sum(1 for value in handed_over if value in text) for name, text in logs.items()}
    assert all(count == 0 for count in leaked.values()), f"secrets in node logs: {leaked}"
    errors = {node.name: node.error_lines() for node in world.cluster.nodes}
    assert all(lines == [] for lines in errors.values()), errors
