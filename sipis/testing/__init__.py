"""Local stand-ins for Apple's and Google's push services, for tests and staging.

``sipis.testing.apns.LocalApns`` speaks APNs (HTTP/2 over TLS) and
``sipis.testing.fcm.LocalFcm`` speaks FCM HTTP v1 and its OAuth token
endpoint (HTTPS).  Both check requests the way the real service does,
record what they received, and let a test make them fail the ways the real
service fails.  This module holds what both share: the server-side TLS
context and the record of arrivals a test can wait on.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    import trustme

LOOPBACK_NAMES = ("127.0.0.1", "::1", "localhost")

T = TypeVar("T")


def tls_server_context(
    ca: trustme.CA,
    hosts: Iterable[str] = LOOPBACK_NAMES,
    *,
    client_ca: trustme.CA | None = None,
) -> ssl.SSLContext:
    """A server context with a certificate from ``ca`` for ``hosts``.

    With ``client_ca``, clients may present a certificate issued by it (APNs
    certificate auth); they are not required to, so token auth still works.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*hosts).configure_cert(context)
    if client_ca is not None:
        client_ca.configure_trust(context)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


class Arrivals(Generic[T]):
    """Everything a local server received, in order, with ways to wait for more.

    ``next()`` hands out arrivals one by one (each once); ``wait_for(n)``
    waits until ``n`` have arrived in all.  Every wait is bounded.
    """

    def __init__(self) -> None:
        self.items: list[T] = []
        self._taken = 0
        self._arrived = asyncio.Event()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> T:
        return self.items[index]

    def append(self, item: T) -> None:
        self.items.append(item)
        arrived, self._arrived = self._arrived, asyncio.Event()
        arrived.set()

    async def next(self, timeout: float = 5.0) -> T:
        """The first arrival that ``next()`` has not handed out yet."""
        await self._until(lambda: len(self.items) > self._taken, timeout, self._taken + 1)
        self._taken += 1
        return self.items[self._taken - 1]

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[T]:
        """The first ``count`` arrivals, once that many have arrived."""
        await self._until(lambda: len(self.items) >= count, timeout, count)
        return self.items[:count]

    async def _until(self, ready: Callable[[], bool], timeout: float, wanted: int) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not ready():
                    await self._arrived.wait()
        except TimeoutError:
            raise TimeoutError(
                f"{len(self.items)} of {wanted} arrivals within {timeout} s"
            ) from None
