"""Persistence: what sipis keeps about instances, and the purge log.

``Store`` is the whole interface; ``SqliteStore`` is the embedded default.
"""

from .base import AccountRow, InstanceRow, Store, StoreError

__all__ = ["AccountRow", "InstanceRow", "Store", "StoreError"]
