"""The expiry sweeper: instances past their lifetime are erased, those near it warned.

Every ``interval`` seconds it asks the instances to sweep: erase what has
expired (reason ``expired``) and call the "about to expire" hooks for what
ends within a day.  An instance is therefore erased at most one interval
after its lifetime ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sipis.instances import Instances
from sipis.store import StoreError

log = logging.getLogger(__name__)


class Sweeper:
    def __init__(self, instances: Instances, interval: float) -> None:
        self._instances = instances
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="expiry sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                erased = await self._instances.sweep()
                if erased:
                    log.info("erased %d expired instance(s)", erased)
            except StoreError:
                log.warning("expiry sweep failed: the store is unavailable")
            except Exception:
                log.exception("expiry sweep failed")
            await asyncio.sleep(self._interval)
