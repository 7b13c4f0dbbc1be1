"""Many deadlines on one asyncio timer.

A relay holding 100,000 bindings would otherwise keep 100,000 asyncio timer
handles (each with its own context copy and argument tuple) and re-arm one
on every message.  Here each item carries its current deadline in ``due``;
the heap holds ``(when, sequence, item)`` entries, and an entry whose
``when`` no longer equals the item's ``due`` is stale and skipped when it
surfaces.  One loop timer is armed for the earliest entry.  When stale
entries outnumber live items the heap is rebuilt.

Time is kept in ticks of ``resolution`` seconds (20 ms by default): the loop
timer is armed at the end of the tick holding the earliest entry, so every
item due within one tick fires on one wake-up, never before its time and at
most one tick after it.  A wake-up costs far more than the work of one item
(a system call and a timer interrupt, dearer still in a virtual machine),
and at a few hundred refreshes a second most of them would otherwise be
spent on retransmission timers that a response has already made stale.
SIP's shortest timer, T1 = 500 ms, needs no finer grain.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class Scheduled(Protocol):
    due: float | None


T = TypeVar("T", bound=Scheduled)


class Scheduler(Generic[T]):
    """Calls ``fire(item)`` once each item's ``due`` time has come."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fire: Callable[[T], None],
        *,
        resolution: float = 0.02,
    ) -> None:
        self._loop = loop
        self._fire = fire
        self._resolution = resolution
        self._heap: list[tuple[float, int, T]] = []
        self._sequence = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at: float | None = None
        self._live = 0

    def schedule(self, item: T, when: float | None) -> None:
        """Set (or, with None, clear) the time ``item`` fires at."""
        if item.due == when:
            return
        if item.due is None:
            self._live += 1
        elif when is None:
            self._live -= 1
        item.due = when
        if when is None:
            return
        heapq.heappush(self._heap, (when, next(self._sequence), item))
        if len(self._heap) > 2 * self._live + 64:
            self._compact()
        if self._armed_at is None or when < self._armed_at:
            self._arm(when)

    def _arm(self, when: float) -> None:
        """Arm the loop timer at the end of the tick holding ``when``, unless it is already."""
        at = max(when, math.ceil(when / self._resolution) * self._resolution)
        if at == self._armed_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = at
        self._timer = self._loop.call_at(at, self._run)

    def _run(self) -> None:
        self._timer = None
        self._armed_at = None
        heap = self._heap
        now = self._loop.time()
        while heap and heap[0][0] <= now:
            when, _, item = heapq.heappop(heap)
            if item.due == when:
                item.due = None
                self._live -= 1
                self._fire(item)
        while heap and heap[0][2].due != heap[0][0]:
            heapq.heappop(heap)
        if heap:
            self._arm(heap[0][0])

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if entry[2].due == entry[0]]
        heapq.heapify(self._heap)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._heap.clear()
