"""A node of a cluster: holds shard leases in PostgreSQL and the instances they cover.

Theory of operation
-------------------
Each round (every third of the lease) the node says it is alive, renews
all its leases in one statement, and then follows ``shards.plan``: it
claims shards up to its fair share or releases those beyond it.  Shards
gained bring their instances in (``Instances.adopt``, registrations spread
over ``takeover_spread`` seconds, with the accounts' own ``+sip.instance``
and ``reg-id`` so the registrar replaces the previous owner's contacts);
shards released or lost take them out without an un-REGISTER.

The node trusts its leases for a little less than their length, counted
from before the renewal was sent.  Past that (the node was paused, or the
database did not answer), ``may_send`` says no and the bindings manager
sends no REGISTER until a round has found out what the node still holds:
a node resumed after its leases expired learns that it lost them before
it can replace the new owner's contacts.  Its late writes carry the old
epochs and the database refuses them (``Fenced``).

Changes made on any node arrive as notices and go to ``Instances.apply``;
registration state changes of owned bindings are written in batches, each
row fenced by its shard's lease, so that every node's API can show them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

from sipis.bindings import Binding, BindingManager
from sipis.instances import STATE_NAMES, Instances
from sipis.metrics import Metrics
from sipis.shards import plan, shard_of
from sipis.store.base import BindingStateRow, Change, ClusterStore, Fence, StoreError

log = logging.getLogger(__name__)

# Leases are trusted for this part of their length after the renewal was sent.
TRUSTED_PART = 0.8
# How often registration state changes are written.
STATE_FLUSH_INTERVAL = 1.0


class ClusterNode:
    """One node's share of the cluster: its leases, and the instances they cover."""

    def __init__(
        self,
        store: ClusterStore,
        node: str,
        device_uri: str,
        bindings: BindingManager,
        metrics: Metrics,
        *,
        lease: float = 30.0,
        takeover_spread: float = 10.0,
    ) -> None:
        self._store = store
        self.node = node
        self._device_uri = device_uri
        self._bindings = bindings
        self._metrics = metrics
        self._lease = lease
        self._takeover_spread = max(0.0, takeover_spread)
        self._loop = asyncio.get_running_loop()
        self.held: dict[int, int] = {}  # shard -> epoch of the lease held
        self.nodes: list[str] = []
        self._trusted_until = 0.0
        self._pending: dict[str, BindingStateRow] = {}
        self._instances: Instances | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._changes: set[asyncio.Task[None]] = set()
        bindings.may_send = self.may_send

    # -- what the other parts ask ----------------------------------------------------------

    def owns(self, instance_id: str) -> bool:
        return shard_of(instance_id) in self.held

    def fence(self, instance_id: str) -> Fence:
        """The lease a write about the instance is made under (epoch -1: not held)."""
        shard = shard_of(instance_id)
        return Fence(shard, self.node, self.held.get(shard, -1))

    def may_send(self) -> bool:
        """Whether the leases are known to be held now, so REGISTERs may leave."""
        return self._loop.time() < self._trusted_until

    def binding_changed(self, binding: Binding) -> None:
        """A binding's registration state changed: write it with the next batch."""
        instance_id, _, account_id = binding.key.partition("/")
        status = binding.session.status(self._loop.time())
        self._pending[binding.key] = BindingStateRow(
            instance_id,
            account_id,
            STATE_NAMES[status.state],
            status.last_status,
            status.reason,
            time.time(),
            self.fence(instance_id),
        )

    async def binding_states(self, instance_id: str) -> dict[str, dict[str, Any]]:
        """The registration states of an instance's accounts as their owner last wrote them."""
        return {
            row.account_id: {
                "state": row.state,
                "last_status": row.last_status,
                "reason": row.reason,
            }
            for row in await self._store.binding_states(instance_id)
        }

    # -- running -------------------------------------------------------------------------

    async def start(self, instances: Instances, *, settle: float = 1.0) -> None:
        """Join: listen for changes, take a first share of the shards, and keep at it.

        ``settle`` gives nodes started together the time to see each other
        before the first claim, so that they do not claim everything and
        hand most of it over again.
        """
        self._instances = instances
        await self._store.listen(self._on_change, self._on_gap)
        self.nodes = [n.id for n in await self._store.heartbeat(
            self.node, self._device_uri, self._lease)]  # fmt: skip
        await asyncio.sleep(settle)
        await self._round()
        log.info("cluster: node %s holds %d shard(s) of %d node(s)",
                 self.node, len(self.held), len(self.nodes))  # fmt: skip
        self._tasks = [
            asyncio.ensure_future(self._every(self._lease / 3, self._round)),
            asyncio.ensure_future(self._every(STATE_FLUSH_INTERVAL, self._flush_states)),
        ]

    async def leave(self) -> None:
        """Stop, and hand every shard over at once (the registrations stay in place)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._trusted_until = 0.0
        await self._flush_states()
        try:
            await self._store.leave(self.node)
        except StoreError as exc:
            log.warning("cluster: could not hand the shards over (%s): they move at expiry", exc)
        self.held = {}

    async def _every(self, interval: float, work: Any) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await work()
            except StoreError as exc:
                log.warning("cluster: %s", exc)
            except Exception:
                log.exception("cluster: a round failed")

    async def _round(self) -> None:
        """Heartbeat, renew, then claim or release according to the plan."""
        instances = self._instances
        assert instances is not None
        sent = self._loop.time()
        self.nodes = [n.id for n in await self._store.heartbeat(
            self.node, self._device_uri, self._lease)]  # fmt: skip
        renewed = await self._store.renew(self.node, self._lease)
        lost = [s for s, epoch in self.held.items() if renewed.get(s) != epoch]
        self.held = renewed
        self._trusted_until = sent + self._lease * TRUSTED_PART
        if lost:
            log.warning("cluster: lost the lease of %d shard(s)", len(lost))
            self._metrics.shard_moves.labels("lost").inc(len(lost))
            await self._drop(instances, set(lost))
        step = plan(set(self.held), len(self.nodes))
        if step.release:
            await self._drop(instances, set(step.release))
            for shard in step.release:
                del self.held[shard]
            await self._store.release(self.node, step.release)
            self._metrics.shard_moves.labels("released").inc(len(step.release))
            log.info("cluster: handed %d shard(s) over", len(step.release))
        if step.claim:
            sent = self._loop.time()
            gained = await self._store.claim(self.node, step.claim, self._lease)
            if gained:
                self.held.update(gained)
                self._trusted_until = min(self._trusted_until, sent + self._lease * TRUSTED_PART)
                rows = await self._store.instances_in_shards(list(gained))
                started = instances.adopt(rows, spread=self._takeover_spread)
                self._metrics.shard_moves.labels("claimed").inc(len(gained))
                log.info("cluster: took %d shard(s), %d account(s) to register",
                         len(gained), started)  # fmt: skip
        self._metrics.cluster_shards.set(len(self.held))
        self._metrics.cluster_nodes.set(len(self.nodes))

    async def _drop(self, instances: Instances, shards: set[int]) -> None:
        await instances.release([i for i in instances.live_ids() if shard_of(i) in shards])

    async def _flush_states(self) -> None:
        if not self._pending:
            return
        rows, self._pending = list(self._pending.values()), {}
        refused = await self._store.set_binding_states(rows)
        if refused:
            self._metrics.fenced_writes.inc(len(refused))
            log.info("cluster: %d registration state(s) refused: their shard moved on",
                     len(refused))  # fmt: skip

    def _on_change(self, change: Change) -> None:
        instances = self._instances
        if instances is None or not self.owns(change.instance_id):
            return
        task = asyncio.ensure_future(self._apply(instances.apply(change)))
        self._changes.add(task)
        task.add_done_callback(self._changes.discard)

    def _on_gap(self) -> None:
        """Notices were missed: follow every instance of the held shards again."""
        task = asyncio.ensure_future(self._apply(self._resync()))
        self._changes.add(task)
        task.add_done_callback(self._changes.discard)

    async def _resync(self) -> None:
        instances = self._instances
        assert instances is not None
        rows = await self._store.instances_in_shards(list(self.held))
        present = {row.id for row in rows}
        changes = [Change("changed", instance_id) for instance_id in present]
        changes += [Change("erased", i) for i in instances.live_ids() if i not in present]
        for change in changes:
            await instances.apply(change)
        log.info("cluster: followed %d instance(s) again after missing notices", len(changes))

    async def _apply(self, work: Awaitable[None]) -> None:
        try:
            await work
        except StoreError as exc:
            log.warning("cluster: a change could not be followed: %s", exc)
        except Exception:
            log.exception("cluster: a change could not be followed")
