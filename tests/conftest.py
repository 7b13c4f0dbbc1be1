"""Shared test setup: asyncio debug mode everywhere (unawaited coroutines, slow callbacks)."""

import os

os.environ.setdefault("PYTHONASYNCIODEBUG", "1")
