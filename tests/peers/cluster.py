"""A cluster of ``sipis serve`` processes sharing one PostgreSQL database, for real-peer tests.

``ClusterNode`` is one node: it writes a TOML configuration into a working
directory of its own and runs ``python -m sipis serve --config ...`` in a
process group of its own, its output (the log, in ``log.format``) appended
to ``sipis.log`` there.  Its SIP UDP port and API port are chosen free
before it starts, so that the "received" port Kamailio stores with a
contact tells which node sent the REGISTER.  The API speaks plain HTTP on
loopback and every node has the same admin token.  ``kill`` (SIGKILL),
``freeze`` (SIGSTOP), ``resume`` (SIGCONT) and ``stop`` (SIGTERM, then
SIGKILL when it lingers) signal the whole group.

``Cluster`` starts nodes against one database, one Kamailio (the
registrar of every account) and a local APNs and FCM that it runs in the
test's event loop.  The master, HPKE and audit keys are made once, before
the first node starts, in a keys directory that every node shares.  It also
opens the database itself (``PostgresStore``) to read what the nodes wrote:
shard leases and registration states.  Leaving the context kills every node
it started, whatever happened, then stops the push servers.

Nodes run without ``PYTHONASYNCIODEBUG``, which the test session sets for
its own event loop: in asyncio's debug mode three nodes take more than
twice as long to create thousands of instances, and the timings the tests
bound would be those of the debug mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
import trustme
from prometheus_client.parser import text_string_to_metric_families

from sipis.app import open_keys
from sipis.config import Config, KeysSection
from sipis.push.payload import unseal
from sipis.store.base import BindingStateRow
from sipis.store.postgres import PostgresStore
from sipis.testing import tls_server_context
from sipis.testing.apns import ApnsSigningKey, LocalApns
from sipis.testing.fcm import LocalFcm
from tests.peers.api import remember_secrets_in
from tests.peers.kamailio import Kamailio
from tests.peers.loopback import HOST, free_port, tail
from tests.secrets import remember

ADMIN_TOKEN = "cluster-admin-" + secrets.token_urlsafe(24)
remember(ADMIN_TOKEN)

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
KILL_TIMEOUT = 5.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=20)
_PROBE_INTERVAL = 0.1

DEFAULT_LEASE = 6.0
DEFAULT_TAKEOVER_SPREAD = 2.0
DEFAULT_RING_TIMEOUT = 2.0


class NodeError(RuntimeError):
    """A node did not start, or exited when it should be running."""


@dataclass(frozen=True)
class Scrape:
    """One scrape of a node's ``GET /metrics``: sample (name, sorted labels) -> value."""

    samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``; 0 if none."""
        wanted = set(labels.items())
        return sum(
            value
            for (sample, sample_labels), value in self.samples.items()
            if sample == name and wanted <= set(sample_labels)
        )


@dataclass(frozen=True)
class NodeSettings:
    """What every node of a cluster shares: the database, the keys, leases, push services."""

    store_url: str
    keys_dir: Path
    lease: float
    takeover_spread: float
    sections: Mapping[str, Mapping[str, Any]]
    log_level: str = "debug"
    log_format: str = "keyvalue"


class ClusterNode:
    """One ``sipis serve`` process of a cluster (see the module docstring)."""

    def __init__(self, name: str, workdir: Path, settings: NodeSettings) -> None:
        self.name = name
        self.workdir = workdir
        self.settings = settings
        self.sip_port = free_port(socket.SOCK_DGRAM)
        self.api_port = free_port(socket.SOCK_STREAM)
        self.device_uris: list[str] = []
        self.frozen = False
        self._process: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"ClusterNode({self.name!r}, sip {self.sip_port}, api {self.api_port})"

    # Files and addresses ---------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.workdir / "sipis.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "sipis.log"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.api_port}"

    @property
    def device_uri(self) -> str:
        """The device URI this node's pushes name (its first, TLS first)."""
        if not self.device_uris:
            raise NodeError(f"{self.name} has not started")
        return self.device_uris[0]

    @property
    def pid(self) -> int:
        if self._process is None:
            raise NodeError(f"{self.name} is not running")
        return self._process.pid

    @property
    def running(self) -> bool:
        """Started and not exited (a frozen node is running)."""
        return self._process is not None and self._process.poll() is None

    @property
    def live(self) -> bool:
        """Running and not frozen: it takes part in the cluster."""
        return self.running and not self.frozen

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def error_lines(self) -> list[str]:
        """The lines it logged at level error (logfmt or JSON lines)."""
        marks = (" level=error ", '"level": "error"')
        return [line for line in self.log_text().splitlines() if any(m in line for m in marks)]

    def tables(self) -> dict[str, dict[str, Any]]:
        """The configuration, table by table."""
        settings = self.settings
        tables: dict[str, dict[str, Any]] = {
            "sip": {
                "host": HOST,
                "udp_port": self.sip_port,
                "tcp_port": False,
                "allowed_networks": ["127.0.0.0/8"],
            },
            "device": {"host": HOST, "tls_port": 0, "tcp_port": 0, "udp_port": 0},
            "api": {
                "host": HOST,
                "port": self.api_port,
                "insecure_http": True,
                "admin_token": ADMIN_TOKEN,
                "create_rate": 100000,
                "create_burst": 100000,
            },
            "data": {"dir": str(self.data_dir)},
            "keys": {"dir": str(settings.keys_dir)},
            "store": {"url": settings.store_url},
            "cluster": {
                "node": self.name,
                "lease": settings.lease,
                "takeover_spread": settings.takeover_spread,
            },
            # Registrars are given by address: a DNS question would be a bug, and fails fast.
            "dns": {"nameservers": ["127.0.0.1:9"], "timeout": 0.5},
            "lifecycle": {"startup_spread": 0.0, "unregister_wait": 2.0},
            "log": {"level": settings.log_level, "format": settings.log_format},
        }
        for name, values in settings.sections.items():
            tables.setdefault(name, {}).update(values)
        return tables

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = []
        for name, values in self.tables().items():
            lines.append(f"[{name}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    # Lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the process and return once its API answers and it said where its device
        port is; the node has then taken its first share of the shards."""
        if self.running:
            raise NodeError(f"{self.name} is already running")
        self.write_config()
        self._process = self._spawn()
        self.frozen = False
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=REQUEST_TIMEOUT)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while not await self._healthy():
                    if not self.running:
                        raise NodeError(
                            f"{self.name} exited with {self.returncode} during start:\n"
                            f"{self.log_tail()}"
                        )
                    await asyncio.sleep(_PROBE_INTERVAL)
            status, info = await self.api("GET", "/v1/info")
        except TimeoutError:
            await self.kill()
            raise NodeError(
                f"{self.name}: API not answering after {START_TIMEOUT} s:\n{self.log_tail()}"
            ) from None
        if status != 200:
            raise NodeError(f"{self.name}: GET /v1/info answered {status}: {info}")
        self.device_uris = list(info["sip"])

    def _spawn(self) -> subprocess.Popen[bytes]:
        environment = {k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"}
        with self.log_path.open("ab") as log:
            log.write(f"==== {self.name}: sipis serve --config {self.config_path}\n".encode())
            log.flush()
            return subprocess.Popen(
                [sys.executable, "-m", "sipis", "serve", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=environment,
                start_new_session=True,
            )

    async def _healthy(self) -> bool:
        try:
            status, answer = await self.api("GET", "/healthz")
        except (aiohttp.ClientError, TimeoutError):
            return False
        return status == 200 and answer == {"status": "ok"}

    def _signal(self, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    async def _wait(self, timeout: float) -> int:
        process = self._process
        assert process is not None
        return await asyncio.to_thread(process.wait, timeout)

    async def kill(self) -> int:
        """SIGKILL the process group: no shutdown code runs.  Returns the exit status."""
        if self._process is None:
            raise NodeError(f"{self.name} was never started")
        self._signal(signal.SIGKILL)
        self.frozen = False
        return await self._wait(KILL_TIMEOUT)

    def freeze(self) -> None:
        """SIGSTOP: the node keeps its sockets and state but does nothing, as if paused."""
        self._signal(signal.SIGSTOP)
        self.frozen = True

    def resume(self) -> None:
        """SIGCONT after ``freeze``."""
        self._signal(signal.SIGCONT)
        self.frozen = False

    async def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait for a graceful exit; SIGKILL when none comes within ``timeout``."""
        if self.frozen:
            self.resume()
        self._signal(signal.SIGTERM)
        try:
            return await self._wait(timeout)
        except subprocess.TimeoutExpired:
            await self.kill()
            raise NodeError(f"{self.name} ignored SIGTERM for {timeout} s") from None

    async def close(self) -> None:
        """Kill the process group if it still runs, and close the HTTP client."""
        if self._process is not None and self._process.poll() is None:
            self._signal(signal.SIGCONT)
            await self.kill()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # API ---------------------------------------------------------------------------------

    async def api(
        self,
        method: str,
        path: str,
        *,
        secret: str | None = None,
        body: Any = None,
        admin: bool = False,
    ) -> tuple[int, Any]:
        """One HTTP request: (status, JSON answer or text or None).  ``admin`` sends the
        admin token, ``secret`` an instance secret.  Secrets in ``body`` and the
        answer's ``secret`` are remembered for the log check."""
        if self._session is None:
            raise NodeError(f"{self.name} has not started")
        token = ADMIN_TOKEN if admin else secret
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        remember_secrets_in(body)
        async with self._session.request(
            method, self.base_url + path, json=body, headers=headers
        ) as response:
            text = await response.text()
            answer: Any = None
            if text:
                is_json = response.content_type == "application/json"
                answer = json.loads(text) if is_json else text
        if isinstance(answer, dict):
            remember(answer.get("secret"))
        return response.status, answer

    async def metrics(self) -> Scrape:
        status, text = await self.api("GET", "/metrics", admin=True)
        if status != 200:
            raise NodeError(f"{self.name}: GET /metrics answered {status}: {text}")
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return Scrape(samples)

    async def stats(self) -> dict[str, Any]:
        status, stats = await self.api("GET", "/v1/stats", admin=True)
        if status != 200:
            raise NodeError(f"{self.name}: GET /v1/stats answered {status}: {stats}")
        result: dict[str, Any] = stats
        return result


class Cluster:
    """Nodes sharing one database and one registrar, pushing to a local APNs and FCM.

    ``async with Cluster(workdir, database_url, kamailio, ca) as cluster:``
    then ``await cluster.start_nodes(3)`` and ``await cluster.add_node()``.
    """

    def __init__(
        self,
        workdir: Path,
        database_url: str,
        kamailio: Kamailio,
        ca: trustme.CA,
        *,
        lease: float = DEFAULT_LEASE,
        takeover_spread: float = DEFAULT_TAKEOVER_SPREAD,
        ring_timeout: float = DEFAULT_RING_TIMEOUT,
        log_level: str = "debug",
        log_format: str = "keyvalue",
    ) -> None:
        self.workdir = workdir
        self.database_url = database_url
        self.kamailio = kamailio
        self.ca = ca
        self.lease = lease
        self.takeover_spread = takeover_spread
        self.ring_timeout = ring_timeout
        self.log_level = log_level
        self.log_format = log_format
        self.nodes: list[ClusterNode] = []
        self._settings: NodeSettings | None = None
        self._store: PostgresStore | None = None
        self._apns: LocalApns | None = None
        self._fcm: LocalFcm | None = None
        self._stack = contextlib.AsyncExitStack()

    @property
    def apns(self) -> LocalApns:
        if self._apns is None:
            raise RuntimeError("the cluster has not been entered")
        return self._apns

    @property
    def fcm(self) -> LocalFcm:
        if self._fcm is None:
            raise RuntimeError("the cluster has not been entered")
        return self._fcm

    @property
    def store(self) -> PostgresStore:
        """The shared database, as the test reads it."""
        if self._store is None:
            raise RuntimeError("the cluster has not been entered")
        return self._store

    @property
    def registrar(self) -> str:
        """The registrar URI every account uses: Kamailio over UDP."""
        return self.kamailio.uri("udp")

    async def __aenter__(self) -> Self:
        try:
            await self._enter()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _enter(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ca_file = self.workdir / "push-ca.pem"
        self.ca.cert_pem.write_to_path(str(ca_file))
        signing_key = ApnsSigningKey.generate()
        key_file = signing_key.write_p8(self.workdir / "AuthKey.p8")
        self._apns = await self._stack.enter_async_context(
            LocalApns(tls_server_context(self.ca), signing_keys=[signing_key])
        )
        self._fcm = await self._stack.enter_async_context(LocalFcm(tls_server_context(self.ca)))
        account_file = self._fcm.service_account_file(self.workdir / "service-account.json")
        apns_server = f"{HOST}:{self._apns.port}"
        keys_dir = self.workdir / "keys"
        # Made once, before any node starts: nodes starting together must not each make
        # their own master key.
        open_keys(Config(keys=KeysSection(dir=str(keys_dir))))
        self._settings = NodeSettings(
            store_url=self.database_url,
            keys_dir=keys_dir,
            lease=self.lease,
            takeover_spread=self.takeover_spread,
            log_level=self.log_level,
            log_format=self.log_format,
            sections={
                "push": {"ring_timeout": self.ring_timeout},
                "apns": {
                    "key_file": str(key_file),
                    "key_id": signing_key.key_id,
                    "team_id": signing_key.team_id,
                    "production_server": apns_server,
                    "sandbox_server": apns_server,
                    "ca_file": str(ca_file),
                },
                "fcm": {
                    "service_account": str(account_file),
                    "send_url": self._fcm.base_url,
                    "token_uri": self._fcm.token_uri,
                    "ca_file": str(ca_file),
                },
            },
        )
        store = PostgresStore(self.database_url)
        await store.open()
        self._store = store

    async def close(self) -> None:
        """Kill every node (frozen ones included), close the database, stop the push servers."""
        results = await asyncio.gather(
            *(node.close() for node in self.nodes), return_exceptions=True
        )
        if self._store is not None:
            await self._store.close()
            self._store = None
        await self._stack.aclose()
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]

    # Nodes -------------------------------------------------------------------------------

    def new_node(self, name: str | None = None) -> ClusterNode:
        """A node (not started) with the cluster's settings and a working directory of its own."""
        if self._settings is None:
            raise RuntimeError("the cluster has not been entered")
        name = name or f"n{len(self.nodes) + 1}"
        node = ClusterNode(name, self.workdir / name, self._settings)
        self.nodes.append(node)
        return node

    async def add_node(self, name: str | None = None) -> ClusterNode:
        node = self.new_node(name)
        await node.start()
        return node

    async def start_nodes(self, count: int) -> list[ClusterNode]:
        """Start ``count`` new nodes at once (they see each other before their first claim)."""
        nodes = [self.new_node() for _ in range(count)]
        await asyncio.gather(*(node.start() for node in nodes))
        return nodes

    def live(self) -> list[ClusterNode]:
        """The nodes taking part now: running and not frozen."""
        return [node for node in self.nodes if node.live]

    # What the database says -----------------------------------------------------------------

    async def leases(self) -> dict[int, tuple[str | None, int]]:
        """shard -> (owner of the unexpired lease or None, epoch)."""
        return await self.store.leases()

    async def binding_states(
        self, instance_ids: list[str], concurrency: int = 8
    ) -> dict[str, list[BindingStateRow]]:
        """The registration states the owners wrote, by instance."""
        gate = asyncio.Semaphore(concurrency)

        async def one(instance_id: str) -> list[BindingStateRow]:
            async with gate:
                return await self.store.binding_states(instance_id)

        rows = await asyncio.gather(*(one(i) for i in instance_ids))
        return dict(zip(instance_ids, rows, strict=True))

    def log_texts(self) -> dict[str, str]:
        """Every node's log, by node name."""
        return {node.name: node.log_text() for node in self.nodes}


def push_content(payload: Mapping[str, Any], payload_key: bytes | None) -> dict[str, str]:
    """What the app reads in a push (APNs carries it under "sipis", FCM as the message's
    data), unsealed with the instance's payload key when it has one."""
    content = payload.get("sipis", payload)
    if "enc" in content:
        if payload_key is None:
            raise AssertionError("a sealed payload for an instance without a payload key")
        return unseal(content, payload_key)
    return {str(k): str(v) for k, v in content.items()}
