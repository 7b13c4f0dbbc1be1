"""A relay whose disk fills up answers 503, writes nothing by halves, and recovers on its own.

``sipis serve`` runs as a child process that ignores SIGXFSZ, so that once
the test lowers its RLIMIT_FSIZE (``prlimit`` on the running process) a write
past the limit fails with EFBIG.  SQLite reports that as "disk I/O error"
(SQLITE_IOERR_WRITE; only ENOSPC becomes "database or disk is full"), and
rolls the transaction back by itself, as it does on a full disk.  The
server's log goes through a pipe, which no file size limit applies to.

The first test sets the limit just above the largest database file (the WAL,
which every commit appends to until a checkpoint empties it) and below one
more WAL frame: the next commit cannot fit.  While the disk is full:

- POST /v1/instances answers 503 with the store's JSON error and Retry-After;
- PATCH and DELETE of an existing instance answer 503 and leave it as it was:
  the same view, the same settings, its binding still held;
- a copy of the database files as they are on disk (what a power cut would
  leave) passes ``PRAGMA integrity_check`` and holds exactly the acknowledged
  instances.

Once the limit is raised, without a restart, creates, changes and deletes
work again, ``sipis audit verify`` passes and the purge log holds the erasure
made after the recovery.  After a restart everything acknowledged is there,
nothing refused is, and the log names the cause but never a secret or a 500.

The second test fills the disk between an erasure's commit and its scrub
(the checkpoint that moves the zeroed pages into the database file): the
answer must say what happened, and the next erasure after space returns
leaves nothing of the first one in the files.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import resource
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sipis.audit import AuditKeys, import_lines
from tests.peers.relay import relay_config
from tests.secrets import remember

pytestmark = pytest.mark.peer

TEST_TIMEOUT = 30.0
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
CLI_TIMEOUT = 10.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=5)
ADMIN_TOKEN = "disk-full-admin-" + secrets.token_hex(16)
remember(ADMIN_TOKEN)
# A name nobody resolves (DNS goes to a closed loopback port): the binding exists and
# keeps trying, and the test needs no registrar.
REGISTRAR = "sip:registrar.example.test;transport=udp"
WAL_FRAME = 24 + 4096  # frame header + page
# Less than one WAL frame: the next commit cannot fit.
HEADROOM = 1024
# More WAL frames than one erasure's commit writes (instance, account, index and
# purge-log pages), so that it fits where a create no longer would.
ERASURE_FRAMES = 10
# Instances that make the database file larger than the WAL of a few creates.
MANY = 80
STORE_UNAVAILABLE = {"error": "unavailable", "detail": "storage is unavailable, retry later"}
# Per-account fields that move on their own while a binding keeps trying.
_MOVING = ("state", "last_status", "reason", "registered_until", "next_action_at")


def _ignore_file_size_signal() -> None:
    """In the child before exec: a write past RLIMIT_FSIZE fails with EFBIG, not SIGXFSZ."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


class Server:
    """``python -m sipis serve`` in its own process group; its log read from a pipe."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> str:
        """Start and return the API's base URL once it listens."""
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sipis", "serve", "--config", str(self.config_path),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_ignore_file_size_signal,
        )  # fmt: skip
        listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read_log(listening))
        async with asyncio.timeout(START_TIMEOUT):
            return await listening

    async def _read_log(self, listening: asyncio.Future[str]) -> None:
        assert self.process is not None and self.process.stdout is not None
        with self.log_path.open("ab") as log:
            async for line in self.process.stdout:
                log.write(line)
                log.flush()
                found = re.search(rb"API listening on (http://127\.0\.0\.1:\d+)", line)
                if found and not listening.done():
                    listening.set_result(found.group(1).decode())
        if not listening.done():
            listening.set_exception(AssertionError(f"sipis serve exited:\n{self.log_text()}"))

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def limit_file_size(self, limit: int) -> None:
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    def lift_file_size_limit(self) -> None:
        unlimited = resource.RLIM_INFINITY
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (unlimited, unlimited))

    async def terminate(self) -> int:
        """SIGTERM and wait for a graceful exit (and the end of its log)."""
        assert self.process is not None and self._reader is not None
        os.killpg(self.process.pid, signal.SIGTERM)
        async with asyncio.timeout(STOP_TIMEOUT):
            await self._reader
            return await self.process.wait()

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            async with asyncio.timeout(STOP_TIMEOUT):
                await self.process.wait()
        if self._reader is not None:
            async with asyncio.timeout(STOP_TIMEOUT):
                await self._reader


class Api:
    """A plain-HTTP client that keeps every answer's status, headers and JSON body."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(
        self, method: str, path: str, *, token: str | None = None, body: Any = None
    ) -> tuple[int, dict[str, str], Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.request(method, self.base + path, json=body, headers=headers) as r:
            text = await r.text()
            return r.status, dict(r.headers), await r.json() if text else None

    async def stats(self) -> dict[str, Any]:
        status, _, answer = await self.call("GET", "/v1/stats", token=ADMIN_TOKEN)
        assert status == 200, answer
        return dict(answer)


@contextlib.asynccontextmanager
async def api_at(base: str) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        yield Api(session, base)


def new_body(user: str, handed_over: list[str]) -> dict[str, Any]:
    """A create body with fresh secrets, which are added to ``handed_over``."""
    password = f"pw-{secrets.token_hex(12)}"
    call_token, other_token = secrets.token_hex(32), secrets.token_hex(32)
    payload_key = base64.b64encode(secrets.token_bytes(32)).decode()
    handed_over += [password, call_token, other_token, payload_key]
    return {
        "app_id": "com.example.phone",
        "platform": "ios",
        "push": {"call_token": call_token, "other_token": other_token, "environment": "sandbox"},
        "payload_key": payload_key,
        "accounts": [
            {
                "id": "work",
                "aor": f"sip:{user}@example.test",
                "password": password,
                "registrar": REGISTRAR,
            }
        ],
    }


def settled(view: dict[str, Any]) -> dict[str, Any]:
    """An instance's view without what its binding's attempts change from moment to moment."""
    accounts = [{k: v for k, v in a.items() if k not in _MOVING} for a in view["accounts"]]
    return {**view, "accounts": accounts}


def binding_count(stats: dict[str, Any]) -> int:
    return sum(stats["bindings"].values())


def database_files(data_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in data_dir.glob("sipis.db*")}


def copy_database(data_dir: Path, into: Path) -> Path:
    """A copy of the database files as they are on disk now; opening it replays the WAL
    the way a restart after a power cut would."""
    into.mkdir()
    for name in ("sipis.db", "sipis.db-wal"):
        if (data_dir / name).exists():
            shutil.copyfile(data_dir / name, into / name)
    return into / "sipis.db"


def inspect_copy(data_dir: Path, into: Path) -> tuple[str, set[str], int]:
    """Integrity, instance ids and purge-log length of the database as it is on disk."""
    with contextlib.closing(sqlite3.connect(copy_database(data_dir, into))) as db:
        [(integrity,)] = db.execute("PRAGMA integrity_check").fetchall()
        ids = {row[0] for row in db.execute("SELECT id FROM instances")}
        orphans = db.execute(
            "SELECT count(*) FROM accounts WHERE instance_id NOT IN (SELECT id FROM instances)"
        ).fetchone()[0]
        assert orphans == 0, f"{orphans} account row(s) without their instance"
        [(purged,)] = db.execute("SELECT count(*) FROM purge_log").fetchall()
    return str(integrity), ids, int(purged)


def image_size(data_dir: Path, into: Path) -> int:
    """How large the database file must grow for a checkpoint to take in the whole WAL."""
    with contextlib.closing(sqlite3.connect(copy_database(data_dir, into))) as db:
        [(pages,)] = db.execute("PRAGMA page_count").fetchall()
        [(page_size,)] = db.execute("PRAGMA page_size").fetchall()
    return int(pages) * int(page_size)


def wrapped_data_key(data_dir: Path, into: Path, instance_id: str) -> bytes:
    with contextlib.closing(sqlite3.connect(copy_database(data_dir, into))) as db:
        [(wrapped,)] = db.execute("SELECT data_key FROM instances WHERE id=?", (instance_id,))
    return bytes(wrapped)


def held_in_files(data_dir: Path, value: bytes) -> list[str]:
    return [p.name for p in data_dir.glob("sipis.db*") if value in p.read_bytes()]


async def sipis_cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sipis", *args, "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


async def test_full_disk_answers_503_keeps_everything_whole_and_recovers(tmp_path: Path) -> None:
    config, config_path = relay_config(
        tmp_path,
        api={"insecure_http": True, "admin_token": ADMIN_TOKEN},
        lifecycle={"unregister_wait": 0.2},
    )
    data_dir = config.data_dir
    server = Server(config_path, tmp_path / "serve.log")
    handed_over: list[str] = [ADMIN_TOKEN]
    instances: dict[str, str] = {}  # id: secret, for every 201
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            base = await server.start()
            async with api_at(base) as api:
                for n in range(4):
                    status, _, created = await api.call(
                        "POST", "/v1/instances", body=new_body(f"u{n}", handed_over)
                    )
                    assert status == 201, created
                    instances[created["id"]] = created["secret"]
                handed_over += instances.values()
                changed, erased = list(instances)[1:3]
                before = {}
                for instance_id in (changed, erased):
                    path = f"/v1/instances/{instance_id}"
                    status, _, view = await api.call("GET", path, token=instances[instance_id])
                    assert status == 200 and len(view["accounts"]) == 1, view
                    before[instance_id] = settled(view)
                stats = await api.stats()
                assert stats["instances"] == {"ios": {"active": 4}}
                assert binding_count(stats) == 4

                # The disk fills: the WAL, the largest file, cannot take one more frame.
                sizes = database_files(data_dir)
                assert sizes["sipis.db-wal"] >= sizes["sipis.db"], sizes
                server.limit_file_size(max(sizes.values()) + HEADROOM)

                for n in range(2):
                    body = new_body(f"refused{n}", handed_over)
                    status, headers, answer = await api.call("POST", "/v1/instances", body=body)
                    assert (status, answer) == (503, STORE_UNAVAILABLE)
                    assert headers["Content-Type"].startswith("application/json")
                    assert int(headers["Retry-After"]) > 0
                status, headers, answer = await api.call(
                    "PATCH", f"/v1/instances/{changed}", token=instances[changed],
                    body={"paused": True, "lifetime": 3 * 86400},
                )  # fmt: skip
                assert (status, answer) == (503, STORE_UNAVAILABLE)
                assert int(headers["Retry-After"]) > 0
                status, headers, answer = await api.call(
                    "DELETE", f"/v1/instances/{erased}", token=instances[erased]
                )
                assert (status, answer) == (503, STORE_UNAVAILABLE)
                assert int(headers["Retry-After"]) > 0

                # Both are as they were, bindings included; the refused creates left nothing.
                for instance_id in (changed, erased):
                    path = f"/v1/instances/{instance_id}"
                    status, _, view = await api.call("GET", path, token=instances[instance_id])
                    assert status == 200, view
                    assert settled(view) == before[instance_id]
                stats = await api.stats()
                assert stats["instances"] == {"ios": {"active": 4}}
                assert binding_count(stats) == 4, stats["bindings"]
                assert stats["purges"] == {} and stats["purge_log"]["entries"] == 0
                assert database_files(data_dir)["sipis.db-wal"] <= sizes["sipis.db-wal"] + HEADROOM
                integrity, stored, purged = inspect_copy(data_dir, tmp_path / "while-full")
                assert (integrity, stored, purged) == ("ok", set(instances), 0)

                # Space returns: the same process takes every kind of write again.
                server.lift_file_size_limit()
                status, _, created = await api.call(
                    "POST", "/v1/instances", body=new_body("later", handed_over)
                )
                assert status == 201, created
                instances[created["id"]] = created["secret"]
                handed_over.append(created["secret"])
                status, _, view = await api.call(
                    "PATCH", f"/v1/instances/{changed}", token=instances[changed],
                    body={"paused": True},
                )  # fmt: skip
                assert status == 200 and view["paused"] is True, view
                status, _, answer = await api.call(
                    "DELETE", f"/v1/instances/{erased}", token=instances[erased]
                )
                assert status == 204, answer
                status, _, _ = await api.call(
                    "GET", f"/v1/instances/{erased}", token=instances[erased]
                )
                assert status == 401
                stats = await api.stats()
                assert stats["instances"] == {"ios": {"active": 3, "paused": 1}}
                assert binding_count(stats) == 3, stats["bindings"]

            verified = await sipis_cli(config_path, "audit", "verify")
            assert verified.returncode == 0, verified.stdout + verified.stderr
            exported = tmp_path / "purge-log.jsonl"
            export = await sipis_cli(config_path, "audit", "export", "--output", str(exported))
            assert export.returncode == 0, export.stderr
            log = import_lines(exported.read_text().splitlines())
            subject = AuditKeys.load(data_dir / "keys" / "audit.json").subject(erased)
            assert [(e.subject, e.reason) for e in log.entries] == [(subject, "disabled")]

            assert await server.terminate() == 0, server.log_text()[-4000:]
            kept = set(instances) - {erased}
            integrity, stored, purged = inspect_copy(data_dir, tmp_path / "stopped")
            assert (integrity, stored, purged) == ("ok", kept, 1)

            # After a restart: everything acknowledged, nothing refused.
            async with api_at(await server.start()) as api:
                for instance_id in kept:
                    path = f"/v1/instances/{instance_id}"
                    status, _, view = await api.call("GET", path, token=instances[instance_id])
                    assert status == 200, view
                    assert view["paused"] is (instance_id == changed)
                status, _, _ = await api.call(
                    "GET", f"/v1/instances/{erased}", token=instances[erased]
                )
                assert status == 401
                stats = await api.stats()
                assert stats["instances"] == {"ios": {"active": 3, "paused": 1}}
                assert stats["purge_log"]["entries"] == 1
            assert await server.terminate() == 0, server.log_text()[-4000:]
    finally:
        await server.close()

    logged = server.log_text()
    assert "store unavailable" in logged
    assert "database write failed: disk I/O error" in logged, "the log names the cause"
    assert "cannot rollback" not in logged, "a failed ROLLBACK hides the cause"
    assert "unexpected failure" not in logged
    assert_no_secret_in(logged, handed_over)


def assert_no_secret_in(logged: str, handed_over: list[str]) -> None:
    leaked = [s for s in handed_over if s in logged]
    assert leaked == [], f"{len(leaked)} secret(s) in the server's log"


async def test_an_erasure_committed_on_a_filling_disk_is_answered_204(tmp_path: Path) -> None:
    """The erasure commits to the WAL, then its scrub cannot grow the database file."""
    config, config_path = relay_config(
        tmp_path,
        api={"insecure_http": True, "admin_token": ADMIN_TOKEN, "create_burst": 2 * MANY},
        lifecycle={"unregister_wait": 0.2},
    )
    data_dir = config.data_dir
    server = Server(config_path, tmp_path / "serve.log")
    handed_over: list[str] = [ADMIN_TOKEN]
    instances: dict[str, str] = {}
    copies = (tmp_path / f"copy-{n}" for n in range(10 * MANY))
    try:
        async with asyncio.timeout(TEST_TIMEOUT), api_at(await server.start()) as api:

            async def create(user: str) -> str:
                body = new_body(user, handed_over)
                status, _, created = await api.call("POST", "/v1/instances", body=body)
                assert status == 201, created
                instances[created["id"]] = created["secret"]
                handed_over.append(created["secret"])
                return str(created["id"])

            async def delete(instance_id: str) -> tuple[int, int]:
                """The DELETE's status, then that of a GET right after it."""
                path, secret = f"/v1/instances/{instance_id}", instances[instance_id]
                deleted, _, _ = await api.call("DELETE", path, token=secret)
                read, _, _ = await api.call("GET", path, token=secret)
                return deleted, read

            first, victim, later = [await create(f"u{n}") for n in range(MANY)][:3]
            assert await delete(first) == (204, 401)
            sizes = database_files(data_dir)
            assert sizes["sipis.db-wal"] == 0, sizes  # scrubbed: everything is in the file
            server.limit_file_size(sizes["sipis.db"])

            # Creates still fit in the WAL until the database they make outgrows its file.
            while image_size(data_dir, next(copies)) <= sizes["sipis.db"]:
                room = sizes["sipis.db"] - database_files(data_dir)["sipis.db-wal"]
                assert room > 2 * ERASURE_FRAMES * WAL_FRAME, "the WAL filled first"
                await create("growing")
            wrapped = wrapped_data_key(data_dir, next(copies), victim)
            assert held_in_files(data_dir, wrapped) == ["sipis.db"]

            # The erasure is committed; answering 503 ("retry later") would deny it.
            assert await delete(victim) == (204, 401)
            integrity, stored, purged = inspect_copy(data_dir, next(copies))
            assert (integrity, stored, purged) == ("ok", set(instances) - {first, victim}, 2)
            assert database_files(data_dir)["sipis.db-wal"] > 0, "the checkpoint went through"

            # Space returns: the next erasure's scrub leaves nothing of the first.
            server.lift_file_size_limit()
            assert await delete(later) == (204, 401)
            assert database_files(data_dir)["sipis.db-wal"] == 0
            assert held_in_files(data_dir, wrapped) == []

            verified = await sipis_cli(config_path, "audit", "verify")
            assert verified.returncode == 0, verified.stdout + verified.stderr
            assert "purge log intact: 3 entries" in verified.stdout
            assert await server.terminate() == 0, server.log_text()[-4000:]
    finally:
        await server.close()

    logged = server.log_text()
    assert "unexpected failure" not in logged
    assert_no_secret_in(logged, handed_over)
