"""A relay killed with SIGKILL in the middle of API traffic keeps its word after a restart.

``sipis serve`` runs as a child process on a fixed API port.  A client
creates instances (one Kamailio user each) and deletes some of them while a
second task SIGKILLs the server at a random moment.  After a restart on the
same config and data directory:

- every instance answered 201 and not deleted is still there and registers
  again (a new Call-ID at Kamailio: the contact was refreshed, not left over);
- every instance answered 204 stays gone: 401, no contact, and a purge-log
  entry; a DELETE that got no answer may have gone either way, but its
  instance is either fully present or fully erased;
- ``sipis audit verify`` and ``sipis audit overdue`` exit 0;
- nothing the client handed over (passwords, secrets, tokens, payload keys)
  appears in the server's debug log.

The random seed is printed, so a failure can be replayed.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import contextlib
import os
import random
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from sipis.audit import AuditKeys, import_lines
from sipis.crypto import MasterKeyring
from tests.peers.api import ApiClient, instance_body
from tests.peers.kamailio import Kamailio
from tests.peers.loopback import free_port, tail
from tests.peers.relay import relay_config

pytestmark = pytest.mark.peer

USERS = 40
TEST_TIMEOUT = 40.0
START_TIMEOUT = 10.0
CLI_TIMEOUT = 10.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=5)
# Server gone mid-request: refused, reset, closed, or silent.
NO_ANSWER = (aiohttp.ClientError, TimeoutError)


@dataclass(frozen=True)
class Credentials:
    """What the client hands over for one Kamailio user: every value is a secret."""

    user: str
    password: str
    call_token: str
    other_token: str
    payload_key: str

    def body(self, registrar: str) -> dict[str, Any]:
        push = {"call_token": self.call_token, "other_token": self.other_token,
                "environment": "sandbox"}  # fmt: skip
        return instance_body(
            registrar,
            user=self.user,
            password=self.password,
            push=push,
            payload_key=self.payload_key,
        )

    def secrets(self) -> tuple[str, ...]:
        return (self.password, self.call_token, self.other_token, self.payload_key)


@dataclass
class Traffic:
    """What the client saw: answers it got, and requests that got none."""

    created: dict[str, tuple[str, Credentials]] = field(default_factory=dict)  # id: secret, creds
    deleted: set[str] = field(default_factory=set)  # DELETE answered 204
    unknown_deletes: set[str] = field(default_factory=set)  # DELETE sent, no answer
    unknown_creates: list[Credentials] = field(default_factory=list)  # POST sent, no answer

    def live(self) -> list[str]:
        return [i for i in self.created if i not in self.deleted | self.unknown_deletes]


class Server:
    """``python -m sipis serve`` in its own process group, its output appended to a log."""

    def __init__(self, config_path: Path, log_path: Path, port: int, ca_file: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.port = port
        self.ca_file = ca_file
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sipis", "serve", "--config", str(self.config_path),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )  # fmt: skip
        async with asyncio.timeout(START_TIMEOUT):
            while not await self._healthy():
                if self.process.returncode is not None:
                    raise AssertionError(
                        f"sipis serve exited with {self.process.returncode}:\n{tail(self.log_path)}"
                    )
                await asyncio.sleep(0.05)

    async def _healthy(self) -> bool:
        try:
            async with self.client() as api:
                status, answer = await api.call("GET", "/healthz")
        except (OSError, *NO_ANSWER):  # OSError: the certificate is not (fully) written yet
            return False
        return status == 200 and bool(answer == {"status": "ok"})

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[ApiClient]:
        """An API client that trusts the server's development certificate."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        connector = aiohttp.TCPConnector(ssl=context)
        async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
            yield ApiClient(session, f"https://127.0.0.1:{self.port}")

    async def kill(self) -> None:
        """SIGKILL the whole process group: no shutdown code runs."""
        process = self.process
        assert process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        async with asyncio.timeout(5):
            await process.wait()

    async def terminate(self) -> int:
        """SIGTERM and wait for a graceful exit; SIGKILL if it does not come."""
        process = self.process
        assert process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(10):
                return await process.wait()
        except TimeoutError:
            await self.kill()
            raise

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            await self.kill()


def credentials(count: int) -> list[Credentials]:
    return [
        Credentials(
            user=f"u{n}",
            password=f"pw-{secrets.token_hex(8)}",
            call_token=secrets.token_hex(32),
            other_token=secrets.token_hex(32),
            payload_key=base64.b64encode(secrets.token_bytes(32)).decode(),
        )
        for n in range(count)
    ]


async def client_loop(
    api: ApiClient,
    registrar: str,
    accounts: list[Credentials],
    traffic: Traffic,
    enough: asyncio.Event,
    kill_after: int,
    rng: random.Random,
) -> None:
    """Create an instance per account and delete some registered ones, until the server dies."""
    try:
        for creds in accounts:
            try:
                status, answer = await api.call("POST", "/v1/instances", body=creds.body(registrar))
            except NO_ANSWER:
                traffic.unknown_creates.append(creds)
                return
            assert status == 201, answer
            traffic.created[answer["id"]] = (answer["secret"], creds)
            if len(traffic.created) >= kill_after:
                enough.set()
            if rng.random() >= 0.4:
                continue
            victim = rng.choice(traffic.live())
            secret = traffic.created[victim][0]
            try:
                status, view = await api.call("GET", f"/v1/instances/{victim}", secret=secret)
                assert status == 200, view
                # Only a settled registration is deleted: a REGISTER still in flight
                # would race the un-REGISTER at the registrar.
                if view["accounts"][0]["state"] != "registered":
                    continue
            except NO_ANSWER:
                return
            try:
                status, answer = await api.call("DELETE", f"/v1/instances/{victim}", secret=secret)
            except NO_ANSWER:
                traffic.unknown_deletes.add(victim)
                return
            assert status == 204, answer
            traffic.deleted.add(victim)
    finally:
        enough.set()  # also when the client fails: the test then reports why


async def call_ids(kamailio: Kamailio, user: str) -> set[str]:
    return {contact["call_id"] for contact in await kamailio.contacts(user)}


async def sipis_cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "sipis", *args, "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


async def test_sigkill_loses_no_acknowledged_change(tmp_path: Path, peer_ca: trustme.CA) -> None:
    seed = secrets.randbits(32)
    print(f"random seed {seed}")
    rng = random.Random(seed)
    accounts = credentials(USERS)
    port = free_port(socket.SOCK_STREAM)
    config, config_path = relay_config(tmp_path, api={"port": port, "create_burst": 2 * USERS})
    log_path = tmp_path / "serve.log"
    server = Server(config_path, log_path, port, config.data_dir / "tls" / "dev-certificate.pem")
    traffic = Traffic()
    try:
        async with (
            asyncio.timeout(TEST_TIMEOUT),
            Kamailio(
                {c.user: c.password for c in accounts},
                ca=peer_ca,
                min_expires=4,
                workdir=tmp_path / "kamailio",
            ) as kamailio,
        ):
            registrar = kamailio.uri("udp")
            await server.start()

            # Traffic, and a SIGKILL at a random moment once enough instances exist.
            kill_after = rng.randint(10, 25)
            enough = asyncio.Event()
            async with server.client() as api:
                client = asyncio.create_task(
                    client_loop(api, registrar, accounts, traffic, enough, kill_after, rng)
                )
                await enough.wait()
                await asyncio.sleep(rng.uniform(0.0, 0.05))
                await server.kill()
                await client
            print(
                f"killed after {len(traffic.created)} creates: {len(traffic.deleted)} deleted, "
                f"{len(traffic.unknown_deletes)} delete(s) and "
                f"{len(traffic.unknown_creates)} create(s) unanswered"
            )
            assert len(traffic.created) >= 10
            assert server.process is not None and server.process.returncode == -signal.SIGKILL

            # A 204 came after the un-REGISTER: no contact, even before the restart.
            for instance_id in traffic.deleted:
                user = traffic.created[instance_id][1].user
                assert await kamailio.contacts(user) == [], f"{user} deleted but still registered"
            # The server is dead, so these contacts are the ones it left behind.
            maybe_live = traffic.live() + sorted(traffic.unknown_deletes)
            before = {
                instance_id: await call_ids(kamailio, traffic.created[instance_id][1].user)
                for instance_id in maybe_live
            }

            await server.start()
            async with server.client() as api:
                present, gone = [], []
                for instance_id in maybe_live:
                    secret = traffic.created[instance_id][0]
                    status, view = await api.call("GET", f"/v1/instances/{instance_id}",
                                                  secret=secret)  # fmt: skip
                    if instance_id in traffic.unknown_deletes and status == 401:
                        gone.append(instance_id)
                        continue
                    assert status == 200, f"instance {instance_id} answered 201 but is lost"
                    user = traffic.created[instance_id][1].user
                    assert view["accounts"][0]["aor"] == f"sip:{user}@example.test"
                    present.append(instance_id)
                for instance_id in traffic.deleted:
                    secret = traffic.created[instance_id][0]
                    status, _ = await api.call("GET", f"/v1/instances/{instance_id}",
                                               secret=secret)  # fmt: skip
                    assert status == 401, f"instance {instance_id} answered 204 but is back"

            print(
                f"after the restart: {len(present)} present, {len(gone)} unanswered DELETE(s) done"
            )
            await kamailio.wait_for_new_registrations(
                {traffic.created[i][1].user: before[i] for i in present},
            )
            # Everything present registered again by now; nothing erased did.
            for instance_id in sorted(traffic.deleted) + gone:
                user = traffic.created[instance_id][1].user
                assert await kamailio.contacts(user) == [], f"erased {user} registered again"

            verified, overdue, exported = await asyncio.gather(
                sipis_cli(config_path, "audit", "verify"),
                sipis_cli(config_path, "audit", "overdue"),
                sipis_cli(config_path, "audit", "export", "--output", str(tmp_path / "log.jsonl")),
            )
            assert verified.returncode == 0, verified.stdout + verified.stderr
            assert overdue.returncode == 0, overdue.stdout + overdue.stderr
            assert "0 instance(s) held past their lifetime" in overdue.stdout
            assert exported.returncode == 0, exported.stderr

            # One purge-log entry per erasure: each 204, each unanswered DELETE that took effect.
            audit_keys = AuditKeys.load(config.data_dir / "keys" / "audit.json")
            log = import_lines((tmp_path / "log.jsonl").read_text().splitlines())
            assert sorted(e.subject for e in log.entries) == sorted(
                audit_keys.subject(i) for i in traffic.deleted | set(gone)
            )
            assert {e.reason for e in log.entries} <= {"disabled"}

            assert await server.terminate() == 0, tail(log_path)
    finally:
        await server.close()

    logged = log_path.read_text(errors="replace")
    assert "API listening on https://127.0.0.1" in logged and " DEBUG " in logged
    handed_over = [s for c in accounts for s in c.secrets()]
    handed_over += [secret for secret, _ in traffic.created.values()]
    leaked = [s for s in handed_over if s in logged]
    assert leaked == [], f"{len(leaked)} secret(s) in the server's log {log_path}"


UNREACHABLE_REGISTRAR = "sip:192.0.2.1:5060;transport=udp"  # TEST-NET-1, DNS is not asked
_LOGGED_STATEMENT = re.compile(
    r"executing functools\.partial\(<[^>]*>, "
    r"'INSERT INTO (?P<table>instances|accounts) [^']*', (?P<params>\(.*\))\)$"
)


def recover_passwords(log_text: str, master: MasterKeyring) -> dict[str, str]:
    """Instance id: password, for every instance whose stored rows the log shows in full."""
    data_keys: dict[str, bytes] = {}
    blobs: dict[str, bytes] = {}
    for line in log_text.splitlines():
        found = _LOGGED_STATEMENT.search(line)
        if found is None:
            continue
        params = ast.literal_eval(found["params"])
        if found["table"] == "instances":
            data_keys[params[0]] = params[5]
        else:
            blobs[params[0]] = params[4]
    recovered = {}
    for instance_id, wrapped in data_keys.items():
        if instance_id in blobs:
            key = master.unwrap(instance_id, wrapped)
            recovered[instance_id] = key.decrypt(instance_id, "password:work", blobs[instance_id])
            key.destroy()
    return {i: p.decode() for i, p in recovered.items()}


async def test_debug_log_cannot_undo_an_erasure(tmp_path: Path) -> None:
    """After DELETE, the server's log plus its key files must not yield the erased password."""
    port = free_port(socket.SOCK_STREAM)
    config, config_path = relay_config(
        tmp_path, api={"port": port}, lifecycle={"unregister_wait": 0.2}
    )
    log_path = tmp_path / "serve.log"
    server = Server(config_path, log_path, port, config.data_dir / "tls" / "dev-certificate.pem")
    [creds] = credentials(1)
    try:
        async with asyncio.timeout(TEST_TIMEOUT):
            await server.start()
            async with server.client() as api:
                body = creds.body(UNREACHABLE_REGISTRAR)
                status, created = await api.call("POST", "/v1/instances", body=body)
                assert status == 201, created
                path, secret = f"/v1/instances/{created['id']}", created["secret"]
                status, _ = await api.call("DELETE", path, secret=secret)
                assert status == 204
                status, _ = await api.call("GET", path, secret=secret)
                assert status == 401
            assert await server.terminate() == 0, tail(log_path)
    finally:
        await server.close()
    logged = log_path.read_text(errors="replace")
    assert " DEBUG sipis." in logged, "the server really logged at debug level"
    assert creds.password not in logged
    master = MasterKeyring.load_or_create(config.data_dir / "keys" / "master.json")
    assert recover_passwords(logged, master) == {}, (
        "no log line may carry stored rows (wrapped keys, ciphertexts): with the key files, "
        "which outlive an erasure, they would give the erased password back"
    )
