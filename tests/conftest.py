"""Shared test setup: asyncio debug mode everywhere, and the real peers on loopback."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

os.environ.setdefault("PYTHONASYNCIODEBUG", "1")

from tests.peers.kamailio import Kamailio
from tests.peers.sipp import SippServer

PEER_USERS = {"alice": "wonderland", "bob": "builder"}


@pytest.fixture(scope="session")
def peer_ca() -> trustme.CA:
    """One CA for every peer: trusting kamailio.ca_certificate trusts them all."""
    return trustme.CA()


@pytest.fixture
async def kamailio(tmp_path: Path, peer_ca: trustme.CA) -> AsyncIterator[Kamailio]:
    async with Kamailio(
        PEER_USERS, ca=peer_ca, min_expires=4, workdir=tmp_path / "kamailio"
    ) as server:
        yield server


@pytest.fixture
def sipp_registrar(tmp_path: Path) -> Callable[..., SippServer]:
    """``async with sipp_registrar("reg_423.xml", max_calls=1) as registrar: ...``"""
    numbers = itertools.count()

    def make(scenario: str, **options: Any) -> SippServer:
        return SippServer(scenario, workdir=tmp_path / f"sipp-{next(numbers)}", **options)

    return make
