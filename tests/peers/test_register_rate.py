"""The REGISTER rate and the start-up ramp, counted at a real registrar.

sipp plays a registrar that accepts every REGISTER (registrar_accept.xml)
and traces when each one arrived.  The relay runs with its HTTPS API; its
accounts all register there.  Three phases, one relay data directory:

1. ``ACCOUNTS`` instances are created about as fast as the API takes them:
   their first REGISTERs leave at ``sip.register_rate`` and no faster;
2. the relay restarts with ``lifecycle.startup_spread = 0`` (register every
   stored account at once): the rate still spaces them;
3. the relay restarts with no rate limit and a ramp of ``RAMP`` seconds:
   the stored accounts register spread over the ramp, neither all at once
   nor later than it.

While REGISTERs wait for the rate, ``sipis_register_backlog_seconds`` says
for how long.

A REGISTER's time is the trace stamp of its first arrival (retransmissions
are not new requests).  ``most_in_a_second`` is the largest count in any
one-second window, which the pacer keeps to the rate plus one, plus what
one late timer (``SLACK``) can bunch together.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sipis.app import Relay
from sipis.sip.registration import RegistrationState
from tests.peers.api import ApiClient, instance_body, relay_with_api
from tests.peers.sipp import SipMessage, SippServer

pytestmark = pytest.mark.peer

ACCOUNTS = 150
RATE = 50.0
RAMP = 2.0
# How late a timer or a trace stamp may be on a busy machine.
SLACK = 0.3
BIG_API_BURST = {"create_rate": 100000, "create_burst": 100000}


def first_arrivals(requests: list[SipMessage]) -> list[float]:
    """When each REGISTER transaction first arrived (by Call-ID and CSeq), in order."""
    seen: dict[tuple[str | None, str | None], float] = {}
    for message in requests:
        assert message.at is not None
        seen.setdefault((message.header("Call-ID"), message.header("CSeq")), message.at)
    return sorted(seen.values())


def most_in_a_second(stamps: list[float]) -> int:
    most, start = 0, 0
    for end, stamp in enumerate(stamps):
        while stamp - stamps[start] >= 1.0:
            start += 1
        most = max(most, end - start + 1)
    return most


async def create_instances(api: ApiClient, registrar: str, count: int) -> None:
    gate = asyncio.Semaphore(16)

    async def create(number: int) -> None:
        async with gate:
            body = instance_body(registrar, user=f"user{number}", password=f"pw-{number}")
            status, answer = await api.call("POST", "/v1/instances", body=body)
        assert status == 201, answer

    await asyncio.gather(*(create(n) for n in range(count)))


async def all_registered(relay: Relay, within: float) -> float:
    """Wait until every binding is registered; how long that took."""
    start = time.monotonic()
    while True:
        states = [b.session.state for b in relay.bindings]
        if len(states) == ACCOUNTS and all(s is RegistrationState.REGISTERED for s in states):
            return time.monotonic() - start
        assert time.monotonic() - start < within, f"{states.count(RegistrationState.REGISTERED)}"
        await asyncio.sleep(0.05)


def backlog(relay: Relay) -> float | None:
    return relay.metrics.registry.get_sample_value("sipis_register_backlog_seconds")


async def test_registers_leave_at_the_rate_and_restarts_ramp(
    tmp_path: Path, sipp_registrar: Callable[..., SippServer]
) -> None:
    async with sipp_registrar("registrar_accept.xml", timeout=180) as registrar:
        paced: dict[str, dict[str, Any]] = {
            "api": BIG_API_BURST,
            "sip": {"register_rate": RATE},
            "lifecycle": {"startup_spread": 0.0},
        }
        # 1: created together, registered at the rate
        async with relay_with_api(tmp_path, **paced) as running:
            await create_instances(running.client, registrar.uri, ACCOUNTS)
            await all_registered(running.relay, within=ACCOUNTS / RATE + 10)
        created = first_arrivals(registrar.received("REGISTER"))
        assert len(created) == ACCOUNTS
        assert most_in_a_second(created) <= RATE + 1 + RATE * SLACK, created
        assert created[-1] - created[0] >= (ACCOUNTS - 1) / RATE - SLACK

        # 2: a restart with no ramp: still the rate, the wait shown as the backlog
        async with relay_with_api(tmp_path, **paced) as running:
            await asyncio.sleep(0.2)
            assert backlog(running.relay) > (ACCOUNTS / RATE) - 1.0
            await all_registered(running.relay, within=ACCOUNTS / RATE + 10)
            await asyncio.sleep(2 / RATE)
            assert backlog(running.relay) == 0.0
        restarted = first_arrivals(registrar.received("REGISTER"))[ACCOUNTS:]
        assert len(restarted) == ACCOUNTS
        assert most_in_a_second(restarted) <= RATE + 1 + RATE * SLACK, restarted
        assert restarted[-1] - restarted[0] >= (ACCOUNTS - 1) / RATE - SLACK

        # 3: a restart with no rate limit: spread over the ramp, and within it
        ramped: dict[str, dict[str, Any]] = {
            "sip": {"register_rate": 0},
            "lifecycle": {"startup_spread": RAMP},
        }
        async with relay_with_api(tmp_path, **ramped) as running:
            took = await all_registered(running.relay, within=RAMP + 10)
        again = first_arrivals(registrar.received("REGISTER"))[2 * ACCOUNTS :]
        assert len(again) == ACCOUNTS
        assert RAMP * (ACCOUNTS - 1) / ACCOUNTS - SLACK <= again[-1] - again[0] <= RAMP + SLACK
        assert most_in_a_second(again) <= ACCOUNTS / RAMP + 1 + ACCOUNTS / RAMP * SLACK
        assert took <= RAMP + 2 * SLACK + 1
