"""How far a long command-line operation has got, on standard error.

On a terminal the line is rewritten in place; elsewhere (a log, a pipe) a
line is written at most every ``every`` seconds, so a long run stays
readable.  The last count is always written when the operation ends.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")


class Progress:
    def __init__(
        self,
        what: str,
        total: int | None = None,
        *,
        stream: TextIO | None = None,
        every: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._what = what
        self._total = total
        self._stream = stream or sys.stderr
        self._every = every
        self._clock = clock
        self._done = 0
        self._shown_at = clock()
        self._in_place = self._stream.isatty()

    def step(self, count: int = 1) -> None:
        self._done += count
        now = self._clock()
        if now - self._shown_at >= self._every:
            self._shown_at = now
            self._show(final=False)

    def finish(self) -> None:
        self._show(final=True)

    def over(self, items: Iterable[T]) -> Iterator[T]:
        """Each of ``items``, counting them, then the final line."""
        for item in items:
            yield item
            self.step()
        self.finish()

    def _show(self, *, final: bool) -> None:
        of = "" if self._total is None else f" of {self._total:,}"
        line = f"{self._what}: {self._done:,}{of}"
        if self._in_place:
            self._stream.write(f"\r{line}" + ("\n" if final else ""))
        else:
            self._stream.write(line + "\n")
        self._stream.flush()
