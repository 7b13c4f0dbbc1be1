"""One asyncio timer for many deadlines."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import pytest

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


class ManualLoop:
    """The two loop methods the scheduler uses, on a clock the test moves.

    The scheduler keeps one timer armed and cancels it before arming
    another, so the loop keeps only the last one.
    """

    def __init__(self) -> None:
        self.now = 1000.0
        self.armed: tuple[float, Callable[[], None]] | None = None
        self.wake_ups = 0

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        self.armed = (when, callback)
        return asyncio.TimerHandle(when, lambda: None, (), asyncio.get_running_loop())

    def advance(self, seconds: float) -> None:
        self.advance_to(self.now + seconds)

    def advance_to(self, now: float) -> None:
        """Move the clock on, running the armed timer once its time has come."""
        self.now = now
        if self.armed is not None and self.armed[0] <= self.now:
            callback, self.armed = self.armed[1], None
            self.wake_ups += 1
            callback()


async def test_items_due_within_one_tick_fire_on_one_wake_up_never_early() -> None:
    loop = ManualLoop()
    fired: list[tuple[str, float]] = []
    scheduler: Scheduler[Item] = Scheduler(
        cast(asyncio.AbstractEventLoop, loop),
        lambda item: fired.append((item.name, loop.now)),
        resolution=0.02,
    )
    for i in range(5):
        scheduler.schedule(Item(str(i)), 1000.001 + i * 0.004)  # all in (1000.00, 1000.02]
    assert loop.armed is not None and loop.armed[0] == pytest.approx(1000.02)
    loop.advance(0.015)
    assert fired == []  # none before its time
    loop.advance(0.005)
    assert [name for name, _ in fired] == ["0", "1", "2", "3", "4"]
    assert loop.wake_ups == 1
    assert loop.armed is None  # nothing left to wait for


async def test_a_steady_stream_of_refreshes_wakes_the_loop_once_a_tick() -> None:
    loop = ManualLoop()
    fired: dict[str, float] = {}
    scheduler: Scheduler[Item] = Scheduler(
        cast(asyncio.AbstractEventLoop, loop),
        lambda item: fired.setdefault(item.name, loop.now),
        resolution=0.02,
    )
    due = {str(i): 1000.0 + (i + 1) * 0.004 for i in range(250)}  # 250 a second
    for name, when in due.items():
        scheduler.schedule(Item(name), when)
    for millisecond in range(1, 1001):
        loop.advance_to(1000.0 + millisecond / 1000)
    assert fired.keys() == due.keys()
    assert loop.wake_ups == 50  # not 250
    lateness = [fired[name] - when for name, when in due.items()]
    assert min(lateness) >= 0
    assert max(lateness) <= 0.02 + 1e-9
