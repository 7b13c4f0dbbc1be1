"""The store interface: narrow enough that another database is a second implementation.

Rows hold what the instance service gives them: personal data arrives
already encrypted (``bytes`` fields) under the instance's data key, which
itself arrives wrapped under the master key.  The store never sees a
plaintext secret and never decides anything about lifetimes; it keeps
rows, makes every change durable before returning, and erases an instance
and appends its purge-log entry in one transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from sipis.audit import Checkpoint, PurgeEntry


class StoreError(Exception):
    """The store could not do what was asked (the database is unusable, full, ...)."""


class Fenced(StoreError):
    """A write named a lease that is no longer held: another node owns the shard now."""


@dataclass(frozen=True, slots=True)
class Fence:
    """The lease a write is made under: shard, owning node and the lease's epoch."""

    shard: int
    node: str
    epoch: int


@dataclass(frozen=True, slots=True)
class AccountRow:
    """One SIP account of an instance: its label, settings and password, both encrypted."""

    account_id: str
    settings: bytes
    password: bytes


@dataclass(frozen=True, slots=True)
class InstanceRow:
    """One app install: push routing in clear, everything personal encrypted."""

    id: str
    secret_hash: bytes
    platform: str
    app_id: str
    environment: str
    data_key: bytes
    push: bytes
    payload_key: bytes | None
    paused: bool
    created_at: float
    expires_at: float
    warned_at: float | None
    accounts: tuple[AccountRow, ...]
    # what checking the app's digest answer needs (realm, HA1s), encrypted
    digest: bytes | None = None


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def insert(self, row: InstanceRow) -> None:
        """Add a new instance with its accounts."""

    async def replace(self, row: InstanceRow) -> bool:
        """Overwrite an existing instance and its accounts, except its wrapped data key;
        False if it is gone."""

    async def set_digest(self, instance_id: str, digest: bytes) -> None:
        """Store the encrypted digest data of an instance that had none."""

    async def get(self, instance_id: str) -> InstanceRow | None: ...

    async def all(self) -> list[InstanceRow]:
        """Every instance, for the bindings manager at start-up."""

    async def expired(self, now: float) -> list[str]:
        """Ids of the instances whose lifetime ended at or before ``now``."""

    async def expiring(self, before: float) -> list[InstanceRow]:
        """Instances ending before ``before`` that were not warned yet."""

    async def mark_warned(self, instance_id: str, at: float, *, fence: Fence | None = None) -> None:
        """Note the expiry warning; with ``fence``, only while that lease is held."""

    async def erase(
        self, instance_id: str, *, at: float, reason: str, subject: str, erased: Mapping[str, int]
    ) -> PurgeEntry | None:
        """Delete the instance and append its purge-log entry, in one transaction.

        The entry's ``erased`` counts get ``queued_messages``, counted in the same
        transaction.  Returns the entry, or None when the instance was already gone
        (then nothing is written).
        """

    async def purge_log(self, after: int = 0) -> list[PurgeEntry]: ...

    async def purge_status(self) -> tuple[int, float | None]:
        """(entries in the purge log, time of its last signed checkpoint or None)."""

    async def checkpoints(self) -> list[Checkpoint]: ...

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None: ...

    async def scrub(self) -> bool:
        """Leave no trace of deleted rows in the database files; False if it must wait."""

    async def wrapped_keys(self) -> list[tuple[str, bytes]]:
        """(instance id, wrapped data key) of every instance, for key rotation."""

    async def rewrap(self, instance_id: str, old: bytes, new: bytes) -> bool:
        """Replace a wrapped data key if it is still ``old`` (compare-and-set)."""

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
        """Keep an encrypted message for the instance; returns its id.  A ``key`` (the
        request's identity) is kept once: the same request again returns the first one's
        id, so a retransmission after a crash is not stored twice.  With ``fence``, only
        while that lease is held (else ``Fenced``)."""

    async def messages(self, instance_id: str) -> list[tuple[int, str, float, bytes]]:
        """(id, account id, received at, encrypted content), oldest first."""

    async def delete_message(self, message_id: int) -> None: ...

    async def counts(self) -> dict[str, int]:
        """Instances by platform and paused state, and purge-log entries by reason."""


# -- clusters ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeRow:
    """A live node of the cluster and the device URI its pushes name."""

    id: str
    device_uri: str


@dataclass(frozen=True, slots=True)
class BindingStateRow:
    """The registration state of one account, as its owning node last wrote it."""

    instance_id: str
    account_id: str
    state: str
    last_status: int | None
    reason: str | None
    at: float
    fence: Fence


@dataclass(frozen=True, slots=True)
class Change:
    """An instance was created or changed, or erased (with the reason), on some node."""

    kind: Literal["changed", "erased"]
    instance_id: str
    reason: str | None = None


class ClusterStore(Store, Protocol):
    """A store several nodes share: shard leases, change notices, registration states.

    Lease times are the database's clock, so nodes need not agree on the time.
    """

    async def heartbeat(self, node: str, device_uri: str, ttl: float) -> list[NodeRow]:
        """Say this node is alive for ``ttl`` seconds more; the live nodes, this one included."""

    async def leave(self, node: str) -> None:
        """Release every lease of the node at once and forget the node."""

    async def renew(self, node: str, ttl: float) -> dict[int, int]:
        """Extend every lease of the node that no other node claimed since, expired or not
        (its epoch is unchanged, so nothing was written under another); shard -> epoch."""

    async def claim(self, node: str, count: int, ttl: float) -> dict[int, int]:
        """Take up to ``count`` free or expired shards, raising their epochs; shard -> epoch."""

    async def release(self, node: str, shards: Collection[int]) -> None:
        """Give up leases of the node so that another node may claim them at once."""

    async def leases(self) -> dict[int, tuple[str | None, int]]:
        """shard -> (owner while the lease is unexpired else None, epoch)."""

    async def instances_in_shards(self, shards: Collection[int]) -> list[InstanceRow]:
        """Every instance of the given shards, with its accounts."""

    async def set_binding_states(self, rows: Sequence[BindingStateRow]) -> list[BindingStateRow]:
        """Write each row whose fence still holds; returns the rows refused as fenced."""

    async def binding_states(self, instance_id: str) -> list[BindingStateRow]: ...

    async def listen(
        self, on_change: Callable[[Change], None], on_gap: Callable[[], None] | None = None
    ) -> None:
        """Call ``on_change`` for every change committed by any node, this one included, and
        ``on_gap`` when notices may have been missed (the connection was lost meanwhile)."""
