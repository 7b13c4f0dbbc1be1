"""A relay killed with SIGKILL in the middle of its traffic keeps its word after a restart.

``sipis serve`` runs as a child process on fixed ports.  A client creates
instances (one Kamailio user each) and deletes some of them while a second
task SIGKILLs the server at a random moment.  After a restart on the same
config and data directory:

- every instance answered 201 and not deleted is still there and registers
  again (a new Call-ID at Kamailio: the contact was refreshed, not left over);
- every instance answered 204 stays gone: 401, no contact, and a purge-log
  entry; a DELETE that got no answer may have gone either way, but its
  instance is either fully present or fully erased;
- ``sipis audit verify`` and ``sipis audit overdue`` exit 0;
- nothing the client handed over (passwords, secrets, tokens, payload keys)
  appears in the server's debug log.

The second test adds calls and messages to the burst: callers (sipp through
Kamailio) keep calls ringing, senders (sipp through Kamailio) send MESSAGEs
to instances alive and erased, pushes go to a local APNs, and the kill comes
once some MESSAGEs were answered 2xx while calls ring.  After the restart:

- every MESSAGE its sender saw answered 2xx reaches the app (sipp on the
  device port with the instance's id and secret) when it registers, once,
  with its body; a MESSAGE that got no answer may arrive, at most once; one
  answered otherwise never does; a second registration gets nothing again,
  and the store keeps no message;
- no MESSAGE is answered 2xx for an instance once its DELETE got 204, the
  purge-log entry of every erased instance counts the messages it held, and
  the erased instance's secret no longer opens the device port;
- a call ringing at the kill leaves nothing behind: the woken app gets no
  INVITE, no push mentions the call again, and a new call to the same
  account rings with its VoIP push and rings out with its missed-call push.

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
import sqlite3
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterable
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from sipis.audit import AuditKeys, PurgeEntry, import_lines
from sipis.crypto import MasterKeyring
from sipis.push.payload import call_reference, unseal
from sipis.testing import tls_server_context
from sipis.testing.apns import ApnsSigningKey, LocalApns
from tests.peers.api import ApiClient, instance_body
from tests.peers.kamailio import Kamailio
from tests.peers.loopback import HOST, free_port, tail
from tests.peers.relay import relay_config
from tests.peers.sipp import SippResult, run_sipp_client, scenario_path

pytestmark = pytest.mark.peer

USERS = 40
TEST_TIMEOUT = 40.0
START_TIMEOUT = 10.0
CLI_TIMEOUT = 10.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=5)
# Server gone mid-request: refused, reset, closed, or silent.
NO_ANSWER = (aiohttp.ClientError, TimeoutError)

# The burst of calls and messages.  A call rings RING seconds, then 480; one cut
# by the kill is cancelled by its caller (crash_uac_call_ring.xml) within 12.5 s.
RING = 3.0
CALL_TIMEOUT = 16.0
CALL_INTERVAL = 0.3
MAX_CALLS = 3
SENDERS = 4
# A MESSAGE in flight at the kill is retransmitted by Kamailio (every 4 s at most)
# until the restarted relay answers it: its sender waits long enough to hear that.
MESSAGE_TIMEOUT = 8.0
MIN_ACKNOWLEDGED = 3
TO_ERASED = 0.15  # share of MESSAGEs sent to an instance whose DELETE got 204
BURST_TIMEOUT = 15.0
APP_PRESENCE = 1.0  # seconds the app stays registered on the device port
CALL_KINDS = frozenset({"call", "call_missed", "call_cancelled", "answered_elsewhere"})
CALLS_AND_MESSAGES_TIMEOUT = 60.0


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
    erased_at: dict[str, float] = field(default_factory=dict)  # id: when its 204 came
    deleting: set[str] = field(default_factory=set)  # chosen for a DELETE not answered yet
    unknown_deletes: set[str] = field(default_factory=set)  # DELETE sent, no answer
    unknown_creates: list[Credentials] = field(default_factory=list)  # POST sent, no answer

    def live(self) -> list[str]:
        return [i for i in self.created if i not in self.deleted | self.unknown_deletes]

    def user(self, instance_id: str) -> str:
        return self.created[instance_id][1].user

    def secret(self, instance_id: str) -> str:
        return self.created[instance_id][0]


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


@dataclass(frozen=True)
class Victims:
    """Which instances the client may delete: never one in ``keep``, one in ``favour`` if any."""

    keep: AbstractSet[str] = frozenset()
    favour: AbstractSet[str] = frozenset()

    def choose(self, traffic: Traffic, rng: random.Random) -> str | None:
        victims = [i for i in traffic.live() if i not in self.keep]
        favoured = [i for i in victims if i in self.favour]
        return rng.choice(favoured or victims) if victims else None


async def client_loop(
    api: ApiClient,
    registrar: str,
    accounts: list[Credentials],
    traffic: Traffic,
    enough: asyncio.Event,
    kill_after: int,
    rng: random.Random,
    victims: Victims = Victims(),
    linger: asyncio.Event | None = None,
) -> None:
    """Create an instance per account and delete some registered ones, until the server dies;
    with ``linger``, once every account has one, go on deleting until it is set."""
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
            if rng.random() < 0.4 and not await delete_one(api, traffic, victims, rng):
                return
        while linger is not None and not linger.is_set():
            await asyncio.sleep(0.1)
            if not await delete_one(api, traffic, victims, rng):
                return
    finally:
        enough.set()  # also when the client fails: the test then reports why


async def delete_one(
    api: ApiClient, traffic: Traffic, victims: Victims, rng: random.Random
) -> bool:
    """Delete one registered instance, if there is one; False if the server did not answer."""
    victim = victims.choose(traffic, rng)
    if victim is None:
        return True
    secret = traffic.secret(victim)
    traffic.deleting.add(victim)
    try:
        try:
            status, view = await api.call("GET", f"/v1/instances/{victim}", secret=secret)
        except NO_ANSWER:
            return False
        assert status == 200, view
        # Only a settled registration is deleted: a REGISTER still in flight
        # would race the un-REGISTER at the registrar.
        if view["accounts"][0]["state"] != "registered":
            return True
        try:
            status, answer = await api.call("DELETE", f"/v1/instances/{victim}", secret=secret)
        except NO_ANSWER:
            traffic.unknown_deletes.add(victim)
            return False
        assert status == 204, answer
        traffic.deleted.add(victim)
        traffic.erased_at[victim] = time.time()
        return True
    finally:
        traffic.deleting.discard(victim)


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


async def contacts_left_behind(kamailio: Kamailio, traffic: Traffic) -> dict[str, set[str]]:
    """With the server dead: no contact for a 204, and the Call-IDs of every other contact."""
    # A 204 came after the un-REGISTER: no contact, even before the restart.
    for instance_id in traffic.deleted:
        user = traffic.user(instance_id)
        assert await kamailio.contacts(user) == [], f"{user} deleted but still registered"
    maybe_live = traffic.live() + sorted(traffic.unknown_deletes)
    return {i: await call_ids(kamailio, traffic.user(i)) for i in maybe_live}


async def instances_after_restart(api: ApiClient, traffic: Traffic) -> tuple[list[str], list[str]]:
    """Every 201 not deleted is there, every 204 is gone; (present, unanswered DELETEs done)."""
    present, gone = [], []
    for instance_id in traffic.live() + sorted(traffic.unknown_deletes):
        path = f"/v1/instances/{instance_id}"
        status, view = await api.call("GET", path, secret=traffic.secret(instance_id))
        if instance_id in traffic.unknown_deletes and status == 401:
            gone.append(instance_id)
            continue
        assert status == 200, f"instance {instance_id} answered 201 but is lost"
        user = traffic.user(instance_id)
        assert view["accounts"][0]["aor"] == f"sip:{user}@example.test"
        present.append(instance_id)
    for instance_id in traffic.deleted:
        path = f"/v1/instances/{instance_id}"
        status, _ = await api.call("GET", path, secret=traffic.secret(instance_id))
        assert status == 401, f"instance {instance_id} answered 204 but is back"
    return present, gone


async def registered_again(
    kamailio: Kamailio,
    traffic: Traffic,
    before: dict[str, set[str]],
    present: list[str],
    erased: Iterable[str],
) -> None:
    """Everything present registers again with a new Call-ID; nothing erased does."""
    await kamailio.wait_for_new_registrations({traffic.user(i): before[i] for i in present})
    for instance_id in erased:
        user = traffic.user(instance_id)
        assert await kamailio.contacts(user) == [], f"erased {user} registered again"


async def verified_purge_log(
    config_path: Path, data_dir: Path, export: Path, erased: Iterable[str]
) -> dict[str, PurgeEntry]:
    """``audit verify`` and ``audit overdue`` pass, and the exported log holds one entry per
    erased instance, each for "disabled"; the entries by instance id."""
    verified, overdue, exported = await asyncio.gather(
        sipis_cli(config_path, "audit", "verify"),
        sipis_cli(config_path, "audit", "overdue"),
        sipis_cli(config_path, "audit", "export", "--output", str(export)),
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert overdue.returncode == 0, overdue.stdout + overdue.stderr
    assert "0 instance(s) held past their lifetime" in overdue.stdout
    assert exported.returncode == 0, exported.stderr
    audit_keys = AuditKeys.load(data_dir / "keys" / "audit.json")
    log = import_lines((await asyncio.to_thread(export.read_text)).splitlines())
    by_subject = {audit_keys.subject(i): i for i in erased}
    assert sorted(e.subject for e in log.entries) == sorted(by_subject)
    assert {e.reason for e in log.entries} <= {"disabled"}
    return {by_subject[e.subject]: e for e in log.entries}


def assert_nothing_logged(log_path: Path, handed_over: Iterable[str]) -> None:
    logged = log_path.read_text(errors="replace")
    assert "API listening on https://127.0.0.1" in logged and " DEBUG " in logged
    leaked = [s for s in handed_over if s in logged]
    assert leaked == [], f"{len(leaked)} secret(s) in the server's log {log_path}"


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

            # The server is dead, so these contacts are the ones it left behind.
            before = await contacts_left_behind(kamailio, traffic)

            await server.start()
            async with server.client() as api:
                present, gone = await instances_after_restart(api, traffic)
            print(
                f"after the restart: {len(present)} present, {len(gone)} unanswered DELETE(s) done"
            )
            erased = sorted(traffic.deleted) + gone
            await registered_again(kamailio, traffic, before, present, erased)

            # One purge-log entry per erasure: each 204, each unanswered DELETE that took effect.
            await verified_purge_log(config_path, config.data_dir, tmp_path / "log.jsonl", erased)

            assert await server.terminate() == 0, tail(log_path)
    finally:
        await server.close()

    handed_over = [s for c in accounts for s in c.secrets()]
    handed_over += [secret for secret, _ in traffic.created.values()]
    assert_nothing_logged(log_path, handed_over)


# -- calls and messages in the burst ---------------------------------------------------------


@dataclass
class SentMessage:
    """One MESSAGE through Kamailio to an instance's account, and the final answer its sender
    heard (None: none before it gave up)."""

    instance_id: str
    body: str
    sent_at: float
    status: int | None = None
    answered_at: float | None = None

    @property
    def acknowledged(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def unanswered_at(self, moment: float) -> bool:
        """No final answer had come by ``moment``."""
        return self.answered_at is None or self.answered_at > moment


@dataclass
class PlacedCall:
    """One call through Kamailio to an instance's account, and its caller's trace once over."""

    instance_id: str
    result: SippResult | None = None

    def _trace(self) -> SippResult:
        assert self.result is not None, "the caller has not finished"
        return self.result

    @property
    def reference(self) -> str:
        """The name the call's pushes give it (``call`` in their payload)."""
        invite = next(m for m in self._trace().messages if m.method == "INVITE")
        from_tag = (invite.header("From") or "").partition(";tag=")[2]
        return call_reference(invite.header("Call-ID") or "", from_tag)

    def _heard_by(self, moment: float, *, final: bool) -> bool:
        """Whether the caller got 180 (or, with ``final``, a final answer) to its INVITE
        by ``moment``."""
        for message in self._trace().messages:
            status, at = message.status, message.at
            if message.direction != "received" or status is None or at is None or at > moment:
                continue
            if message.header("CSeq") == "1 INVITE" and (status >= 200 if final else status == 180):
                return True
        return False

    def ringing_at(self, moment: float) -> bool:
        """The caller heard 180 from the relay and no final answer by ``moment``."""
        return self._heard_by(moment, final=False) and not self._heard_by(moment, final=True)

    def silent_at(self, moment: float) -> bool:
        """The caller had heard neither 180 nor a final answer by ``moment``: its INVITE may
        not have reached the relay yet (the proxy answers 100 itself)."""
        return not self._heard_by(moment, final=False) and not self._heard_by(moment, final=True)


def final_answer(result: SippResult, method: str) -> tuple[int, float] | None:
    """The first final response sipp got to its ``method`` request, and when."""
    for message in result.messages:
        status = message.status
        if (
            message.direction == "received"
            and status is not None
            and status >= 200
            and (message.header("CSeq") or "").endswith(f" {method}")
            and message.at is not None
        ):
            return status, message.at
    return None


async def send_messages(
    kamailio: Kamailio,
    traffic: Traffic,
    sent: list[SentMessage],
    holding: set[str],
    stop: asyncio.Event,
    rng: random.Random,
    workdir: Path,
) -> None:
    """MESSAGEs one after another, mostly to live instances, some to erased ones, until ``stop``;
    ``holding`` gets each instance that had one answered 2xx."""
    while not stop.is_set():
        live, erased = traffic.live(), sorted(traffic.deleted)
        if not live:
            await asyncio.sleep(0.02)
            continue
        instance_id = rng.choice(erased if erased and rng.random() < TO_ERASED else live)
        number = len(sent)
        message = SentMessage(instance_id, f"note-{number}-{secrets.token_hex(6)}", time.time())
        sent.append(message)
        result = await run_sipp_client(
            "uac_message.xml",
            kamailio.address("udp"),
            service=traffic.user(instance_id),
            arguments=["-key", "text", message.body],
            timeout=MESSAGE_TIMEOUT,
            workdir=workdir / f"message-{number}",
        )
        answer = final_answer(result, "MESSAGE")
        if answer is not None:
            message.status, message.answered_at = answer
            if message.acknowledged:
                holding.add(instance_id)


@dataclass
class Callers:
    """Keeps up to MAX_CALLS calls ringing at live instances, one new every CALL_INTERVAL."""

    workdir: Path
    calls: list[PlacedCall] = field(default_factory=list)
    busy: set[str] = field(default_factory=set)  # called now: not to be deleted meanwhile
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def run(
        self, kamailio: Kamailio, traffic: Traffic, stop: asyncio.Event, rng: random.Random
    ) -> None:
        while not stop.is_set():
            idle = [i for i in traffic.live() if i not in self.busy | traffic.deleting]
            if idle and len(self.busy) < MAX_CALLS:
                call = PlacedCall(rng.choice(idle))
                self.calls.append(call)
                self.busy.add(call.instance_id)
                caller = run_sipp_client(
                    "crash_uac_call_ring.xml",
                    kamailio.address("udp"),
                    service=traffic.user(call.instance_id),
                    timeout=CALL_TIMEOUT,
                    workdir=self.workdir / f"call-{len(self.calls)}",
                )
                self.tasks.append(asyncio.create_task(self._ring(call, caller)))
            await asyncio.sleep(CALL_INTERVAL)

    async def _ring(self, call: PlacedCall, caller: Awaitable[SippResult]) -> None:
        try:
            call.result = await caller
        finally:
            self.busy.discard(call.instance_id)


async def ripe_for_the_kill(
    enough: asyncio.Event,
    apns: LocalApns,
    sent: list[SentMessage],
    holding: set[str],
    traffic: Traffic,
) -> None:
    """Until enough instances exist, some MESSAGEs got 2xx, an instance holding one was
    deleted, and a call surely rings: its VoIP push came long enough ago for its 180 to be
    out, and recently enough not to ring out yet."""

    def a_call_rings() -> bool:
        now = time.time()
        return any(
            push.headers.get("apns-push-type") == "voip" and 0.2 < now - push.arrived < RING - 1
            for push in apns.pushes.items
        )

    await enough.wait()
    async with asyncio.timeout(BURST_TIMEOUT):
        while (
            sum(m.acknowledged for m in sent) < MIN_ACKNOWLEDGED
            or holding.isdisjoint(traffic.deleted)
            or not a_call_rings()
        ):
            await asyncio.sleep(0.02)


def injection_file(workdir: Path, instances: list[tuple[str, str]]) -> Path:
    """sipp's -inf file: per registration, the instance id and its digest credentials."""
    workdir.mkdir(parents=True)
    rows = [f'{i};[authentication username="{i}" password="{s}"];' for i, s in instances]
    path = workdir / "credentials.csv"
    path.write_text("\n".join(["SEQUENTIAL", *rows]) + "\n")
    return path


async def app_session(
    device: tuple[str, int],
    instances: list[tuple[str, str]],
    workdir: Path,
    *,
    scenario: str = "app_register.xml",
) -> SippResult:
    """sipp as the apps of ``instances`` (id, secret): each REGISTERs on the device port,
    takes what comes (crash_app_take_message.xml), and un-REGISTERs after APP_PRESENCE; with
    crash_app_register_refused.xml as ``scenario``, each expects its REGISTER refused."""
    arguments = [
        "-inf", str(await asyncio.to_thread(injection_file, workdir, instances)),
        "-oocsf", str(scenario_path("crash_app_take_message.xml")),
        "-d", str(round(APP_PRESENCE * 1000)),
        "-r", str(len(instances)),
        "-l", str(len(instances)),
    ]  # fmt: skip
    return await run_sipp_client(
        scenario,
        device,
        arguments=arguments,
        calls=len(instances),
        timeout=APP_PRESENCE + 8,
        workdir=workdir,
    )


def deliveries(session: SippResult) -> dict[str, dict[str, set[str]]]:
    """What the apps received: instance id: body: the Call-IDs it came with."""
    delivered: dict[str, dict[str, set[str]]] = {}
    for message in session.received("MESSAGE"):
        to = re.search(r"sip:([^@>;]+)@", message.header("To") or "")
        assert to is not None, message.text
        assert message.header("Sipis-Account") == "work", message.text
        body = message.text.split("\r\n\r\n", 1)[1].strip()
        delivered.setdefault(to[1], {}).setdefault(body, set()).add(message.header("Call-ID") or "")
    return delivered


def pushes_since(
    apns: LocalApns, moment: float, accounts: list[Credentials]
) -> list[dict[str, str]]:
    """The payloads of every push that arrived from ``moment`` on, unsealed as the app would."""
    keys = {}
    for creds in accounts:
        key = base64.b64decode(creds.payload_key)
        keys[creds.call_token] = keys[creds.other_token] = key
    return [
        unseal(push.payload.get("sipis", push.payload), keys[push.token])
        for push in apns.pushes.items
        if push.arrived >= moment
    ]


async def test_sigkill_amid_calls_and_messages(tmp_path: Path, peer_ca: trustme.CA) -> None:
    seed = secrets.randbits(32)
    print(f"random seed {seed}")
    rng = random.Random(seed)
    accounts = credentials(USERS)
    traffic = Traffic()
    sent: list[SentMessage] = []
    holding: set[str] = set()  # instances that had a MESSAGE answered 2xx
    port = free_port(socket.SOCK_STREAM)
    device = (HOST, free_port(socket.SOCK_DGRAM))
    ca_file = tmp_path / "push-ca.pem"
    peer_ca.cert_pem.write_to_path(str(ca_file))
    key = ApnsSigningKey.generate()
    # Each running sipp waits in a thread: enough of them that kamcmd and the CLI never queue.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=SENDERS + MAX_CALLS + 8)
    )
    started = time.monotonic()
    server: Server | None = None
    enough, stop = asyncio.Event(), asyncio.Event()
    callers = Callers(tmp_path / "callers")
    background: list[asyncio.Task[None]] = []
    try:
        async with (
            asyncio.timeout(CALLS_AND_MESSAGES_TIMEOUT),
            LocalApns(tls_server_context(peer_ca), signing_keys=[key]) as apns,
            Kamailio(
                {c.user: c.password for c in accounts},
                ca=peer_ca,
                min_expires=4,
                workdir=tmp_path / "kamailio",
            ) as kamailio,
        ):
            apns_server = f"127.0.0.1:{apns.port}"
            config, config_path = relay_config(
                tmp_path,
                # a fixed SIP port: what Kamailio still sends to the dead relay reaches the new one
                sip={"udp_port": free_port(socket.SOCK_DGRAM)},
                device={"udp_port": device[1], "max_failures": 1000},
                api={"port": port, "create_burst": 2 * USERS},
                push={"ring_timeout": RING},
                apns={
                    "key_file": str(key.write_p8(tmp_path / "AuthKey.p8")),
                    "key_id": key.key_id,
                    "team_id": key.team_id,
                    "production_server": apns_server,
                    "sandbox_server": apns_server,
                    "ca_file": str(ca_file),
                },
            )
            log_path = tmp_path / "serve.log"
            certificate = config.data_dir / "tls" / "dev-certificate.pem"
            server = Server(config_path, log_path, port, certificate)
            await server.start()

            # Creates and deletes, MESSAGEs, calls; the kill once MESSAGEs got 2xx while calls ring.
            async with server.client() as api:
                client = asyncio.create_task(
                    client_loop(
                        api, kamailio.uri("udp"), accounts, traffic, enough,
                        rng.randint(10, 25), rng, Victims(keep=callers.busy, favour=holding),
                        linger=stop,
                    )
                )  # fmt: skip
                senders = [
                    asyncio.create_task(
                        send_messages(
                            kamailio, traffic, sent, holding, stop, rng, tmp_path / f"sender-{n}"
                        )
                    )
                    for n in range(SENDERS)
                ]
                calling = asyncio.create_task(callers.run(kamailio, traffic, stop, rng))
                background += [client, *senders, calling]
                await ripe_for_the_kill(enough, apns, sent, holding, traffic)
                await asyncio.sleep(rng.uniform(0.0, 0.05))
                stop.set()
                killed_at = time.time()
                await server.kill()
                await asyncio.gather(client, calling)
            assert server.process is not None and server.process.returncode == -signal.SIGKILL
            burst = time.monotonic() - started
            taken_before = [m for m in sent if m.acknowledged and not m.unanswered_at(killed_at)]
            print(
                f"killed after {burst:.1f} s, {len(traffic.created)} creates: "
                f"{len(traffic.deleted)} deleted, {len(traffic.unknown_deletes)} delete(s) and "
                f"{len(traffic.unknown_creates)} create(s) unanswered; {len(taken_before)} of "
                f"{len(sent)} MESSAGE(s) answered 2xx, {len(callers.busy)} call(s) in progress"
            )
            assert len(taken_before) >= MIN_ACKNOWLEDGED

            before = await contacts_left_behind(kamailio, traffic)
            restarted_at = time.time()
            await server.start()
            async with server.client() as api:
                present, gone = await instances_after_restart(api, traffic)
            erased = sorted(traffic.deleted) + gone
            await registered_again(kamailio, traffic, before, present, erased)
            registered = time.monotonic()
            # Callers and senders caught by the kill hear the end of it (sipp's timeouts bound it).
            await asyncio.gather(*senders, *callers.tasks)
            settled = time.monotonic()

            acknowledged = [m for m in sent if m.acknowledged]
            # Nothing erased comes back: no MESSAGE sent after a 204 is taken for its instance.
            late = [
                m for m in acknowledged
                if m.instance_id in traffic.erased_at
                and m.sent_at >= traffic.erased_at[m.instance_id]
            ]  # fmt: skip
            assert late == [], "MESSAGEs answered 2xx for an erased instance"
            ringing = [c for c in callers.calls if c.ringing_at(killed_at)]
            assert ringing, "no call rang at the kill"
            print(
                f"after the restart: {len(present)} present, {len(gone)} unanswered DELETE(s) "
                f"done; {len(acknowledged)} MESSAGE(s) answered 2xx in all, "
                f"{sum(m.status is None for m in sent)} unanswered; "
                f"{len(ringing)} call(s) cut while ringing, "
                f"{sum(c.silent_at(killed_at) for c in callers.calls)} before the relay answered"
            )

            # The apps come: each gets every MESSAGE answered 2xx for it, once, and no call.
            # An erased instance's secret opens nothing, so nothing of it can be delivered.
            unsure = {m.body for m in sent if m.status is None}
            first, refused = await asyncio.gather(
                app_session(device, [(i, traffic.secret(i)) for i in present], tmp_path / "app-1"),
                app_session(
                    device,
                    [(i, traffic.secret(i)) for i in erased],
                    tmp_path / "app-erased",
                    scenario="crash_app_register_refused.xml",
                ),
            )
            assert refused.returncode == 0, refused.errors
            assert refused.stats.successful_calls == len(erased)
            assert refused.received("MESSAGE") == []
            assert first.returncode == 0, first.errors
            assert first.stats.successful_calls == len(present)
            assert first.received("INVITE") == [], "a call cut by the kill was forwarded"
            delivered = deliveries(first)
            assert set(delivered) <= set(present)
            for instance_id in present:
                bodies = delivered.get(instance_id, {})
                twice = {body: ids for body, ids in bodies.items() if len(ids) > 1}
                assert twice == {}, f"{instance_id}: delivered more than once"
                expected = {m.body for m in acknowledged if m.instance_id == instance_id}
                assert expected <= set(bodies), f"{instance_id}: 2xx but lost"
                assert set(bodies) <= expected | unsure, f"{instance_id}: refused but delivered"
            print(f"{sum(map(len, delivered.values()))} MESSAGE(s) delivered to the apps")

            # The app's 2xx erased what it took: a second registration gets none of it again.
            second = await app_session(
                device,
                [(i, traffic.secret(i)) for i in present],
                tmp_path / "app-2",
            )
            assert second.returncode == 0, second.errors
            assert second.received("INVITE") == []
            again = {body for bodies in deliveries(second).values() for body in bodies}
            taken = {body for bodies in delivered.values() for body in bodies}
            assert again <= unsure - taken

            # A new call to an account whose call was cut rings and pushes as any other.
            targets = [c.instance_id for c in ringing if c.instance_id in present]
            assert targets, "every account whose call was cut is gone"  # never deleted: busy
            probe = PlacedCall(targets[0])
            probe.result = await run_sipp_client(
                "uac_call_ring_out.xml",
                kamailio.address("udp"),
                service=traffic.user(probe.instance_id),
                timeout=RING + 8,
                workdir=tmp_path / "probe",
            )
            assert probe.result.returncode == 0, probe.result.errors
            [rang] = [m for m in probe.result.messages if m.status == 180]
            assert rang.header("Push-Status") == "sent"
            async with asyncio.timeout(2.0):  # the missed-call push follows the 480
                while not any(p.get("call") == probe.reference and p["type"] == "call_missed"
                              for p in pushes_since(apns, restarted_at, accounts)):  # fmt: skip
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # and nothing more comes

            # Since the restart: the new call's pushes, and those of calls and MESSAGEs still
            # in flight at the kill; nothing about a call that rang at the kill.
            after = pushes_since(apns, restarted_at, accounts)
            about_probe = [(p["type"], p["instance"]) for p in after
                           if p.get("call") == probe.reference]  # fmt: skip
            assert about_probe == [("call", probe.instance_id), ("call_missed", probe.instance_id)]
            # Kamailio retransmits an INVITE the relay did not answer 100 to (nor 180): the
            # restarted relay takes it as the new call it is.
            may_ring_again = {c.reference for c in callers.calls if c.silent_at(killed_at)}
            for payload in after:
                if payload["type"] in CALL_KINDS:
                    assert payload["call"] in may_ring_again | {probe.reference}, payload
                else:
                    assert payload["type"] == "message", payload
            pushed = Counter(p["instance"] for p in after if p["type"] == "message")
            unanswered = Counter(m.instance_id for m in sent if m.unanswered_at(killed_at))
            assert pushed <= unanswered, "message pushes for MESSAGEs the dead relay answered"

            # Every erasure counts the MESSAGEs its instance held.
            entries = await verified_purge_log(
                config_path, config.data_dir, tmp_path / "log.jsonl", erased
            )
            for instance_id, entry in entries.items():
                held = [m for m in sent if m.instance_id == instance_id]
                answered = sum(m.acknowledged for m in held)
                maybe = sum(m.status is None for m in held)
                counted = entry.erased["queued_messages"]
                assert answered <= counted <= answered + maybe, (instance_id, counted, answered)
            print(
                f"{sum(e.erased['queued_messages'] for e in entries.values())} MESSAGE(s) erased "
                f"with {len(entries)} instance(s); {len(about_probe)} probe push(es), "
                f"{len(after)} push(es) since the restart"
            )

            assert await server.terminate() == 0, tail(log_path)
            with contextlib.closing(
                sqlite3.connect(f"file:{config.data_dir / 'sipis.db'}?mode=ro", uri=True)
            ) as db:
                [(kept,)] = db.execute("SELECT count(*) FROM messages").fetchall()
            # only a MESSAGE no one heard answered, and no app took, may still wait
            assert kept <= len(unsure - taken - again), "delivered messages are still stored"
            print(
                f"timings: burst {burst:.1f} s, restart and registrations "
                f"{registered - started - burst:.1f} s, callers and senders done "
                f"{settled - registered:.1f} s later, in all {time.monotonic() - started:.1f} s"
            )
    finally:
        stop.set()
        if server is not None:
            await server.close()
        # A sipp still running ends by its own -timeout: wait for it rather than leave it behind.
        leftover = [t for t in [*background, *callers.tasks] if not t.done()]
        if leftover:
            await asyncio.wait(leftover, timeout=CALL_TIMEOUT + 10)

    handed_over = [s for c in accounts for s in c.secrets()]
    handed_over += [secret for secret, _ in traffic.created.values()]
    handed_over += [m.body for m in sent]
    assert_nothing_logged(tmp_path / "serve.log", handed_over)


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
