"""One asyncio lock per key, held in memory only while someone holds or awaits it.

Work on one instance (a change, an erasure, a queued message, a change
notice from another node) is serialised by its id; a relay holding 100,000
instances keeps locks only for the few being worked on right now.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class KeyedLock:
    """``async with locks.hold(key):`` runs one holder of ``key`` at a time."""

    __slots__ = ("_locks",)

    def __init__(self) -> None:
        # each key's lock and how many tasks hold or await it
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
