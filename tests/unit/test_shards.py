"""Shards: a stable hash, fair shares, and plans that converge on them."""

from __future__ import annotations

import random
import secrets
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipis.shards import SHARDS, Plan, fair_share, plan, shard_of

# shard_of of "a", "b" and "a" * 26, pinned: changing the hash would move every instance.
EXPECTED = [559, 3957, 847]


def test_shard_of_is_stable_across_runs() -> None:
    # Nodes of different versions and runs must agree: these values are fixed for good.
    assert [shard_of(i) for i in ("a", "b", "aaaaaaaaaaaaaaaaaaaaaaaaaa")] == EXPECTED


def test_instance_ids_spread_evenly_over_the_shards() -> None:
    counts = Counter(shard_of(secrets.token_hex(13)) for _ in range(SHARDS * 20))
    assert len(counts) > SHARDS * 0.99
    # 20 per shard on average; a Poisson tail beyond 50 is vanishingly rare.
    assert max(counts.values()) < 50


@pytest.mark.parametrize(("nodes", "share"), [(0, 4096), (1, 4096), (3, 1366), (4, 1024), (5, 820)])
def test_fair_share_rounds_up(nodes: int, share: int) -> None:
    assert fair_share(nodes) == share


def test_a_node_below_its_share_claims_the_difference() -> None:
    assert plan(set(range(1000)), 4) == Plan(claim=24)
    assert plan(set(), 3) == Plan(claim=1366)


def test_a_node_above_its_share_releases_its_highest_shards() -> None:
    held = set(range(0, 4096, 2))  # 2048 shards
    step = plan(held, 4)
    assert step.claim == 0
    assert len(step.release) == 1024
    assert set(step.release) == set(sorted(held)[-1024:])


def test_slack_tolerates_a_small_excess() -> None:
    assert plan(set(range(1030)), 4, slack=10) == Plan()
    assert len(plan(set(range(1040)), 4, slack=10).release) == 16


@given(nodes=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_rounds_converge_on_fair_shares_without_double_ownership(nodes: int, seed: int) -> None:
    """Nodes playing rounds in any order over a shared lease table end within the share."""
    rng = random.Random(seed)
    owner: dict[int, int | None] = dict.fromkeys(range(SHARDS))
    held: dict[int, set[int]] = {n: set() for n in range(nodes)}
    # a first node grabs everything, as when it starts alone
    held[0] = set(range(SHARDS))
    owner.update(dict.fromkeys(range(SHARDS), 0))
    for _ in range(6):
        order = list(range(nodes))
        rng.shuffle(order)
        for node in order:
            step = plan(held[node], nodes)
            for shard in step.release:
                owner[shard] = None
                held[node].discard(shard)
            free = [s for s, o in owner.items() if o is None]
            for shard in rng.sample(free, min(step.claim, len(free))):
                owner[shard] = node
                held[node].add(shard)
    assert sum(len(h) for h in held.values()) == SHARDS
    assert all(owner[s] == n for n, h in held.items() for s in h)
    share = fair_share(nodes)
    assert all(share - nodes <= len(h) <= share for h in held.values())
