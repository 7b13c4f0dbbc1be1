"""The stand-in provider when no push credentials are configured: it logs, it sends nothing."""

from __future__ import annotations

import logging

from .base import Delivered, Outcome, Push

log = logging.getLogger(__name__)


def masked(token: str) -> str:
    return f"{token[:4]}…{token[-4:]}" if len(token) > 12 else "…"


class LoggingProvider:
    name = "log"

    def __init__(self, platform: str) -> None:
        self.platform = platform

    async def send(self, push: Push) -> Outcome:
        log.info(
            "push not sent (no %s credentials): %s for instance %s to token %s",
            self.platform,
            push.kind.value,
            push.instance_id,
            masked(push.token),
        )
        return Delivered(None)

    async def close(self) -> None:
        return None

    def credential_expiry(self) -> float | None:
        return None
