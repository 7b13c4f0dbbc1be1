"""Paces new REGISTER transactions to the rate the operator configured.

A registrar sees at most ``rate`` new REGISTERs per second from this node,
whatever its bindings want at that moment: a restart with 100,000 stored
accounts, a take-over of another node's shards, a registrar coming back
after an outage, a burst of instances created at once.

The pacer keeps one clock, ``next_free``: the earliest time the next
REGISTER may leave.  Each request is given the slot ``max(now,
next_free)``, and ``next_free`` moves one interval (``1 / rate``) past it.
A slot in the future is a reservation: the binding waits for it and then
goes without asking again, so waiting bindings leave in the order they
asked, one interval apart, and no time left unused builds up a burst for
later.  In any window of ``w`` seconds at most ``w * rate + 1`` REGISTERs
leave.
"""

from __future__ import annotations


class Pacer:
    """Hands out send times at most ``rate`` per second (``rate`` 0: no limit)."""

    __slots__ = ("_interval", "_next_free")

    def __init__(self, rate: float) -> None:
        if rate < 0:
            raise ValueError("a rate is not negative")
        self._interval = 1.0 / rate if rate else 0.0
        self._next_free = float("-inf")

    def slot(self, now: float) -> float:
        """The time (``now`` or later) at which one more REGISTER may leave, now reserved."""
        if not self._interval:
            return now
        slot = max(now, self._next_free)
        self._next_free = slot + self._interval
        return slot

    def backlog(self, now: float) -> float:
        """Seconds until the slots reserved so far have all come."""
        return max(0.0, self._next_free - now)

    def span(self, count: int) -> float:
        """Seconds that ``count`` REGISTERs take at this rate (0 without a limit)."""
        return count * self._interval
