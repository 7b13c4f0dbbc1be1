"""Every secret the test suite hands to sipis, and every log line sipis writes meanwhile.

Tests register the passwords, instance secrets, tokens and keys they use;
the session ends by searching everything logged at DEBUG for any of them.
"""

from __future__ import annotations

import logging

SECRETS: set[str] = set()


def remember(*secrets: str | None) -> None:
    """Add secrets to look for (short values would match by chance and are skipped)."""
    SECRETS.update(s for s in secrets if s and len(s) >= 6)


class LogRecorder(logging.Handler):
    """Keeps the text of every record: message, arguments and exception."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a broken format string is still searched
            text = f"{record.msg!r} {record.args!r}"
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.lines.append(f"{record.name}: {text}")

    def leaks(self) -> list[str]:
        return [line for line in self.lines if any(secret in line for secret in SECRETS)]


RECORDER = LogRecorder()
