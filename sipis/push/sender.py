"""Sending a push: pick the provider, retry what may be retried, report every outcome.

``PushSender.send`` tries a push until it is delivered, refused for good,
or out of time: a ``RetryAfter`` waits the service's Retry-After or an
exponential backoff (0.5 s doubling to 30 s, with jitter), at most
``MAX_ATTEMPTS`` times, never past the push's deadline, and not once the
push is no longer wanted (a call push after the caller gave up would ring
for nobody).  No wait is longer than ``MAX_DELAY``: a push whose service
asks for a longer one fails at once, rather than every push sitting in
memory for as long as a 429 storm's Retry-After says (an HTTP-date may name
any day).  A ``TokenInvalid`` starts the erasure of the instance (reason
``token_invalid``) in the background.  Every attempt is counted in the
metrics by provider, kind and outcome.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping

from sipis.metrics import Metrics

from .base import Failed, Outcome, Provider, Push, RetryAfter, TokenInvalid, outcome_name

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
FIRST_DELAY = 0.5
MAX_DELAY = 30.0


class PushSender:
    def __init__(
        self,
        providers: Mapping[str, Provider],
        metrics: Metrics,
        *,
        on_token_invalid: Callable[[str], Awaitable[object]],
        rng: random.Random | None = None,
    ) -> None:
        self._providers = providers
        self._metrics = metrics
        self._on_token_invalid = on_token_invalid
        self._rng = rng or random.Random()
        self._background: set[asyncio.Task[object]] = set()
        for provider in {id(p): p for p in providers.values()}.values():
            expiry = provider.credential_expiry()
            if expiry is not None:
                metrics.push_credential_expiry.labels(provider.name).set(expiry)

    async def send(
        self,
        push: Push,
        *,
        deadline: float | None = None,
        wanted: Callable[[], bool] | None = None,
    ) -> Outcome:
        """Deliver ``push`` or say why not.

        ``deadline`` (event-loop time): no attempt starts at or after it.
        ``wanted``, asked before every retry: False once the push stopped
        mattering before its deadline (a call the caller hung up).
        """
        provider = self._providers.get(push.platform)
        if provider is None:
            return Failed(f"no push provider for platform {push.platform!r}")
        loop = asyncio.get_running_loop()
        outcome: Outcome = Failed("not sent")
        for attempt in range(MAX_ATTEMPTS):
            outcome = await provider.send(push)
            self._metrics.pushes.labels(provider.name, push.kind.value, outcome_name(outcome)).inc()
            if isinstance(outcome, TokenInvalid):
                log.info("push token of instance %s rejected: %s", push.instance_id, outcome.reason)
                self._in_background(self._on_token_invalid(push.instance_id))
                return outcome
            if not isinstance(outcome, RetryAfter):
                return outcome
            delay = outcome.seconds
            if delay is None:
                ceiling = min(MAX_DELAY, FIRST_DELAY * 2**attempt)
                delay = ceiling * self._rng.uniform(0.5, 1.0)
            elif delay > MAX_DELAY:
                return Failed(f"{outcome.reason}; asked to wait {delay:g} s, over {MAX_DELAY:g} s")
            if deadline is not None and loop.time() + delay >= deadline:
                return Failed(f"{outcome.reason}; no time left to retry")
            await asyncio.sleep(delay)
            if wanted is not None and not wanted():
                return Failed(f"{outcome.reason}; no longer wanted")
        return Failed(f"{outcome_name(outcome)} after {MAX_ATTEMPTS} attempts")

    def _in_background(self, work: Awaitable[object]) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for provider in {id(p): p for p in self._providers.values()}.values():
            await provider.close()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
