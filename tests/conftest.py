"""Shared test setup: asyncio debug mode, secret-free logs, and the real peers on loopback."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

os.environ.setdefault("PYTHONASYNCIODEBUG", "1")

from tests.peers.kamailio import Kamailio
from tests.peers.sipp import SippServer
from tests.postgres import PostgresServer, pg_url, postgres_server  # noqa: F401  (fixtures)
from tests.secrets import RECORDER, SECRETS, remember

PEER_USERS = {"alice": "wonderland", "bob": "builder"}
remember(*PEER_USERS.values())


@pytest.fixture(params=["sqlite", "postgres"])
async def store_sections(request: pytest.FixtureRequest) -> dict[str, dict[str, Any]]:
    """Config sections running a relay on each store: SQLite (the default), and a fresh
    PostgreSQL database, where the relay is the one node of a cluster."""
    if request.param == "sqlite":
        return {}
    server: PostgresServer = request.getfixturevalue("postgres_server")
    url = await server.new_database()
    return {"store": {"url": url}, "cluster": {"node": "n1", "lease": 3.0}}


def pytest_configure(config: pytest.Config) -> None:
    """Record everything sipis logs at DEBUG, for the whole session."""
    logging.getLogger().addHandler(RECORDER)
    logging.getLogger("sipis").setLevel(logging.DEBUG)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any secret a test used was logged."""
    leaks = RECORDER.leaks()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if leaks:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter is not None:
            reporter.write_line(f"SECRETS IN LOGS ({len(leaks)} line(s)):", red=True)
            for line in leaks[:20]:
                reporter.write_line(f"  {line[:300]}")
    elif reporter is not None:
        reporter.write_line(
            f"log check: {len(RECORDER.lines)} log records searched for "
            f"{len(SECRETS)} secrets, none found"
        )


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
