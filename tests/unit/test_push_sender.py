"""Retries within the deadline, outcome metrics, erasure on a rejected token, payload sealing."""

from __future__ import annotations

import asyncio
import random

import pytest

from sipis.metrics import Metrics
from sipis.push.base import (
    Delivered,
    Failed,
    Kind,
    Outcome,
    Push,
    RetryAfter,
    Routing,
    TokenInvalid,
    retry_after_seconds,
)
from sipis.push.compose import compose
from sipis.push.payload import seal, unseal
from sipis.push.sender import PushSender


class Scripted:
    name = "scripted"

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = list(outcomes)
        self.sent: list[float] = []

    async def send(self, push: Push) -> Outcome:
        self.sent.append(asyncio.get_running_loop().time())
        return self.outcomes.pop(0)

    async def close(self) -> None:
        return None

    def credential_expiry(self) -> float | None:
        return 1.9e9


ROUTING = Routing("inst", "android", "com.example.phone", "production", "f" * 40, None, None)


def push(kind: Kind = Kind.CALL) -> Push:
    made = compose(kind, ROUTING, account="work", call="ref")
    assert made is not None
    return made


def count(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "sipis_pushes_total", {"provider": "scripted", "kind": "call", "outcome": outcome}
    )
    return value or 0.0


async def test_retry_after_is_honoured_then_delivered() -> None:
    provider = Scripted(RetryAfter("429", 0.2), RetryAfter("503"), Delivered("x"))
    metrics = Metrics()
    sender = PushSender({"android": provider}, metrics, on_token_invalid=_never,
                        rng=random.Random(1))  # fmt: skip
    outcome = await sender.send(push())
    assert outcome == Delivered("x")
    first, second, third = provider.sent
    assert second - first == pytest.approx(0.2, abs=0.05)
    assert 0.5 <= third - second <= 1.1  # backoff: 0.5 s doubling, 50-100 % jitter
    assert (count(metrics, "retry_after"), count(metrics, "delivered")) == (2, 1)
    assert (
        metrics.registry.get_sample_value(
            "sipis_push_credential_expiry_timestamp_seconds", {"provider": "scripted"}
        )
        == 1.9e9
    )


async def test_no_retry_past_the_deadline() -> None:
    provider = Scripted(RetryAfter("429", 5.0), Delivered())
    sender = PushSender({"android": provider}, Metrics(), on_token_invalid=_never)
    deadline = asyncio.get_running_loop().time() + 1.0
    outcome = await sender.send(push(), deadline=deadline)
    assert isinstance(outcome, Failed) and "no time left" in outcome.reason
    assert len(provider.sent) == 1


async def test_rejected_token_starts_erasure_once() -> None:
    erased: list[str] = []

    async def erase(instance_id: str) -> None:
        erased.append(instance_id)

    sender = PushSender({"android": Scripted(TokenInvalid("UNREGISTERED"))}, Metrics(),
                        on_token_invalid=erase)  # fmt: skip
    assert isinstance(await sender.send(push()), TokenInvalid)
    await sender.close()
    assert erased == ["inst"]


async def test_gives_up_after_bounded_attempts() -> None:
    provider = Scripted(*[RetryAfter("500", 0.01)] * 10)
    outcome = await PushSender({"android": provider}, Metrics(), on_token_invalid=_never).send(
        push()
    )
    assert isinstance(outcome, Failed) and len(provider.sent) == 5


def test_ios_notices_go_to_the_other_token_and_never_without_one() -> None:
    ios = Routing("i", "ios", "com.example.phone", "sandbox", "a1" * 32, "b2" * 32, None)
    call, missed = compose(Kind.CALL, ios), compose(Kind.CALL_MISSED, ios)
    assert call is not None and missed is not None
    assert (call.token, missed.token) == ("a1" * 32, "b2" * 32)
    without = Routing("i", "ios", "com.example.phone", "sandbox", "a1" * 32, None, None)
    assert compose(Kind.MESSAGE, without) is None


def test_sealed_payload_hides_everything_and_opens_with_the_key() -> None:
    key = bytes(range(32))
    sealed = seal({"type": "call", "caller": "sip:bob@example.test"}, key)
    assert set(sealed) == {"v", "enc"} and "bob" not in str(sealed)
    assert unseal(sealed, key) == {"type": "call", "caller": "sip:bob@example.test"}
    with pytest.raises(Exception):  # noqa: B017, PT011 - any key but the right one fails
        unseal(sealed, bytes(32))


async def _never(instance_id: str) -> None:
    raise AssertionError("no token should be rejected here")


NOW = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT, RFC 9110's example date


@pytest.mark.parametrize(
    ("header", "seconds"),
    [(None, None), ("120", 120.0), (" 0 ", 0.0),
     ("Sun, 06 Nov 1994 08:50:07 GMT", 30.0),  # a date 30 s ahead
     ("Sun, 06 Nov 1994 08:00:00 GMT", 0.0),  # a date gone by: no wait
     ("1.5", 1.5), ("-5", None), ("1.", None), ("inf", None), ("nan", None), ("\u0662", None),
     ("soon", None), ("Sun, 06 Nov 1994 08:50:07 -0000", None)],
)  # fmt: skip
def test_retry_after_is_delay_seconds_or_an_http_date(
    header: str | None, seconds: float | None
) -> None:
    assert retry_after_seconds(header, now=lambda: NOW) == seconds
