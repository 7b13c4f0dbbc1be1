"""One asyncio timer for many deadlines."""

from __future__ import annotations

import asyncio

from sipis.scheduler import Scheduler


class Item:
    def __init__(self, name: str) -> None:
        self.name = name
        self.due: float | None = None


async def test_items_fire_in_deadline_order_once() -> None:
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    scheduler: Scheduler[Item] = Scheduler(loop, lambda item: fired.append(item.name))
    now = loop.time()
    a, b, c = Item("a"), Item("b"), Item("c")
    scheduler.schedule(c, now + 0.06)
    scheduler.schedule(a, now + 0.02)
    scheduler.schedule(b, now + 0.04)
    await asyncio.sleep(0.1)
    assert fired == ["a", "b", "c"]
    assert (a.due, b.due, c.due) == (None, None, None)


async def test_rescheduling_and_clearing() -> None:
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    scheduler: Scheduler[Item] = Scheduler(loop, lambda item: fired.append(item.name))
    now = loop.time()
    moved, cleared, kept = Item("moved"), Item("cleared"), Item("kept")
    scheduler.schedule(moved, now + 0.01)
    scheduler.schedule(cleared, now + 0.02)
    scheduler.schedule(kept, now + 0.03)
    scheduler.schedule(moved, now + 0.05)  # later: the first entry goes stale
    scheduler.schedule(cleared, None)
    await asyncio.sleep(0.08)
    assert fired == ["kept", "moved"]


async def test_stale_entries_do_not_pile_up() -> None:
    loop = asyncio.get_running_loop()
    scheduler: Scheduler[Item] = Scheduler(loop, lambda item: None)
    items = [Item(str(i)) for i in range(100)]
    now = loop.time()
    for round_ in range(50):
        for item in items:
            scheduler.schedule(item, now + 100 + round_)
    assert len(scheduler._heap) <= 2 * len(items) + 64
    scheduler.close()


async def test_an_item_scheduled_in_the_past_fires_at_once() -> None:
    loop = asyncio.get_running_loop()
    fired = asyncio.Event()
    scheduler: Scheduler[Item] = Scheduler(loop, lambda item: fired.set())
    scheduler.schedule(Item("late"), loop.time() - 5)
    async with asyncio.timeout(1):
        await fired.wait()
