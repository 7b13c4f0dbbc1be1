"""A real PostgreSQL server for tests, on loopback, one per test session.

``PostgresServer`` runs Debian's PostgreSQL (``/usr/lib/postgresql/<version>/bin``,
package ``postgresql``): ``initdb -A trust -U sipis --no-sync`` into a fresh
temporary directory, then ``pg_ctl start`` with the server listening on
127.0.0.1 on a port chosen free at runtime, its unix socket in the same
temporary directory, and ``fsync`` off (a crash of a test server loses
nothing that matters).  Every wait is bounded; leaving the context stops it
with ``pg_ctl stop -m immediate`` and removes the directory.

PostgreSQL refuses to run as root.  When the tests run as root (as in CI),
the directory is handed to Debian's ``postgres`` user and ``initdb`` and
``pg_ctl`` run as that user; the server still trusts every local
connection, so the tests connect as ``sipis`` without a password.

What tests use:

- the session fixture ``postgres_server`` (a started ``PostgresServer``);
- ``postgres_server.url(database)``: ``postgresql://sipis@127.0.0.1:PORT/DATABASE``;
- ``await postgres_server.new_database()``: creates an empty database of its
  own (``t_1``, ``t_2``, ...) and returns its URL, so that tests never see
  each other's rows;
- the function fixture ``pg_url``: the URL of such a fresh database.
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import asyncpg
import pytest

from tests.peers.loopback import HOST, free_port, tail

USER = "sipis"
SERVER_USER = "postgres"
START_TIMEOUT = 30
STOP_TIMEOUT = 15
CONNECT_TIMEOUT = 10.0

SETTINGS = {
    "listen_addresses": f"'{HOST}'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
}


# what SETTINGS turn off for speed, and a durable server keeps on
DURABILITY = ("fsync", "synchronous_commit", "full_page_writes")


def postgres_bin() -> Path:
    """The bin directory of the newest PostgreSQL Debian installed."""
    found = sorted(
        (int(match.group(1)), path.parent)
        for path in Path("/usr/lib/postgresql").glob("*/bin/initdb")
        if (match := re.fullmatch(r"(\d+)", path.parent.parent.name))
    )
    if not found:
        raise RuntimeError("PostgreSQL is not installed (Debian package postgresql)")
    return found[-1][1]


class PostgresServer:
    """A throw-away PostgreSQL cluster in a temporary directory (see the module docstring)."""

    def __init__(self, *, durable: bool = False) -> None:
        """``durable`` keeps PostgreSQL's own fsync and synchronous commit (for benchmarks)."""
        self.durable = durable
        self.port = 0
        self._bin = postgres_bin()
        self._workdir: Path | None = None
        self._numbers = itertools.count(1)
        self._as_server_user = os.geteuid() == 0

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise RuntimeError("the server is not started")
        return self._workdir

    @property
    def log_path(self) -> Path:
        return self.workdir / "postgres.log"

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@{HOST}:{self.port}/{database}"

    async def new_database(self) -> str:
        """Create an empty database of its own; return its URL."""
        name = f"t_{next(self._numbers)}"
        connection = await asyncpg.connect(self.url("postgres"), timeout=CONNECT_TIMEOUT)
        try:
            await connection.execute(f'CREATE DATABASE "{name}"', timeout=CONNECT_TIMEOUT)
        finally:
            await connection.close(timeout=CONNECT_TIMEOUT)
        return self.url(name)

    def start(self) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix="sipis-postgres-"))
        if self._as_server_user:
            account = pwd.getpwnam(SERVER_USER)
            os.chown(self._workdir, account.pw_uid, account.pw_gid)
        data = self.workdir / "data"
        self._run(
            "initdb", "-D", str(data), "-A", "trust", "-U", USER, "--no-sync",
            "--encoding=UTF8", "--locale=C", timeout=START_TIMEOUT,
        )  # fmt: skip
        self.port = free_port(socket.SOCK_STREAM)
        durability = {k: "on" for k in DURABILITY} if self.durable else {}
        settings = {**SETTINGS, **durability, "port": str(self.port),
                    "unix_socket_directories": f"'{self.workdir}'"}  # fmt: skip
        with (data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        self._run(
            "pg_ctl", "start", "-D", str(data), "-l", str(self.log_path),
            "-w", "-t", str(START_TIMEOUT), timeout=START_TIMEOUT + 5,
        )  # fmt: skip

    def stop(self) -> None:
        if self._workdir is None:
            return
        data = self._workdir / "data"
        try:
            if (data / "postmaster.pid").exists():
                self._run(
                    "pg_ctl", "stop", "-D", str(data), "-m", "immediate",
                    "-w", "-t", str(STOP_TIMEOUT), timeout=STOP_TIMEOUT + 5,
                )  # fmt: skip
        finally:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _run(self, program: str, *args: str, timeout: float) -> None:
        """Run a PostgreSQL program (as the server user when we are root); its output in errors."""
        account = pwd.getpwnam(SERVER_USER) if self._as_server_user else None
        result = subprocess.run(
            [str(self._bin / program), *args],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            user=account.pw_uid if account else None,
            group=account.pw_gid if account else None,
            extra_groups=[] if account else None,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{program} failed ({result.returncode}):\n{result.stdout}{result.stderr}\n"
                f"{tail(self.log_path)}"
            )

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture
async def pg_url(postgres_server: PostgresServer) -> str:
    return await postgres_server.new_database()
