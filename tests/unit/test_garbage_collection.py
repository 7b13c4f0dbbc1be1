"""Long-lived objects frozen out of full collections; young garbage collected first."""

from __future__ import annotations

import gc
import weakref

from sipis.app import freeze_long_lived


class _Node:
    other: _Node | None = None


def test_freezing_hides_what_lives_and_collects_young_cycles_first() -> None:
    held = [[number] for number in range(10_000)]
    first, second = _Node(), _Node()
    first.other, second.other = second, first
    cycle = weakref.ref(first)
    del first, second
    before = gc.get_freeze_count()
    try:
        freeze_long_lived()
        assert cycle() is None, "young cyclic garbage is collected, not frozen"
        assert gc.get_freeze_count() >= before + len(held)
        walked = {id(item) for item in gc.get_objects()}
        assert not any(id(item) in walked for item in held)
        fresh = [0]
        assert id(fresh) in {id(item) for item in gc.get_objects()}
    finally:
        gc.unfreeze()
    assert held[-1] == [9_999]
