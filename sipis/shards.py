"""Shards: how a cluster of nodes divides the instances between them.

Theory of operation
-------------------
Every instance hashes into one of ``SHARDS`` shards, fixed for the life of
a database.  An instance's accounts all live in its shard: the app wakes
for any of them and reaches the one node that holds its calls.

A node owns a shard while it holds the shard's lease (owner, expiry,
epoch) in the database.  Each round a node renews every lease it holds in
one statement, then compares what it holds with its fair share, the
number of shards divided by the number of live nodes, rounded up:

- below the share, it claims free or expired shards (``FOR UPDATE SKIP
  LOCKED``, so two nodes never claim the same shard and never wait on
  each other); each claim raises the shard's epoch;
- above the share by more than the slack, it releases the excess: the
  registrations stay at the registrar until the next owner re-registers
  them with the same ``+sip.instance`` and ``reg-id``, which replaces
  them.

The epoch is the fencing token: a write that depends on owning a shard
names the epoch it was made under and the database refuses it if the
shard has moved on.  This module decides; ``sipis.cluster`` does the IO.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

SHARDS = 4096


def shard_of(instance_id: str) -> int:
    """The shard an instance belongs to: the same on every node and every run."""
    digest = hashlib.blake2b(instance_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SHARDS


def fair_share(live_nodes: int, shards: int = SHARDS) -> int:
    """The most shards a node should hold when ``live_nodes`` nodes share them."""
    return math.ceil(shards / max(1, live_nodes))


@dataclass(frozen=True, slots=True)
class Plan:
    """What one round should do: claim this many shards, or release these."""

    claim: int = 0
    release: tuple[int, ...] = ()


def plan(held: set[int], live_nodes: int, *, shards: int = SHARDS, slack: int = 0) -> Plan:
    """Claim up to the fair share, or release what is beyond it (plus ``slack``).

    The shards released are the highest numbered, so that a node releasing
    over several rounds gives up a stable set rather than a random one.
    """
    share = fair_share(live_nodes, shards)
    if len(held) < share:
        return Plan(claim=share - len(held))
    excess = len(held) - share
    if excess > slack:
        return Plan(release=tuple(sorted(held)[-excess:]))
    return Plan()
