"""Kamailio's `uac` module keeping remote registrations, for the bindings benchmark.

`KamailioUac` writes a configuration and a db_text `uacreg` table into a
working directory, starts `kamailio -DD -E` in its own process group and
waits until its control socket answers; leaving the context kills the whole
group.  Nothing routes through it: its only work is the uac module's remote
registrations, so its processes' CPU and memory are what keeping them costs.

How the uac module (Kamailio 5.6) registers, which the table is built for:

* at start it loads every `uacreg` row into a hash table in shared memory
  (2^`reg_hash_size` slots); a timer process walks the whole table every
  `reg_timer_interval` seconds and sends a REGISTER for every row whose
  registration ends within that interval plus 3 s, or whose `reg_delay`
  (seconds after start) has just passed for the first time;
* the REGISTER goes to `sip:<r_domain>`, To and From `sip:<r_username>@<r_domain>`,
  through `auth_proxy` as outbound proxy, with
  `Contact: <sip:<l_uuid>@<contact_addr>>` and `Expires: <expires>`; a 401
  or 407 is answered once with digest credentials (it keeps no nonce, so
  every refresh is challenged); a 2xx sets the next refresh from the expiry
  the registrar granted;
* with `reg_keep_callid` a refresh keeps its Call-ID and counts CSeq on,
  as RFC 3261 10.2.4 recommends.

So a row registers first `reg_delay` seconds after start and then every
`expires - 3 - U(0, reg_timer_interval)` seconds: spreading `reg_delay`
evenly over one such period makes the registrar see a steady rate from
the first REGISTER on.

Counting: the instance sends nothing but registrations, so its tm module's
statistics count them: `total_local` is every REGISTER it sent (digest
retries included) and `2xx` every one the registrar accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from tests.peers.loopback import HOST, free_port, tail

KAMAILIO = "kamailio"
KAMCMD = "kamcmd"
START_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0
RPC_TIMEOUT = 30.0
_PROBE_INTERVAL = 0.1
# Loading 110,000 rows peaks at about 5 KB of shared memory per row (db_text's
# cached table and its query result, the uac module's hash table); transactions
# of registrations in flight come on top.
_SHM_BYTES_PER_ROW = 8192
# `version` table of the db_text database: the uac module checks its table's version.
_UACREG_VERSION = 5
_UACREG_COLUMNS = (
    "id(int,auto) l_uuid(string) l_username(string) l_domain(string) r_username(string) "
    "r_domain(string) realm(string) auth_username(string) auth_password(string) "
    "auth_ha1(string,null) auth_proxy(string) expires(int) flags(int) reg_delay(int) "
    "contact_addr(string) socket(string,null)"
)

Transport = Literal["udp", "tls"]


class KamailioUacError(RuntimeError):
    """The uac Kamailio failed to start, or its control socket answered with an error."""


@dataclass(frozen=True)
class RemoteRegistration:
    """One `uacreg` row: `user` registers with `password` at `registrar` over `transport`.

    `registrar` is the (host, port) the REGISTERs go to (the outbound proxy);
    `domain` the registrar's domain, in the Request-URI, To and From.  The
    first REGISTER leaves `delay` whole seconds after start.
    """

    user: str
    password: str
    domain: str
    registrar: tuple[str, int]
    transport: Transport
    delay: int


class KamailioUac:
    """A Kamailio on 127.0.0.1 whose uac module keeps `registrations` registered.

    Every registration asks for `expires` seconds; the module's timer runs
    every `timer_interval` seconds and retries a failed registration after
    `retry_interval`.  The instance listens on UDP and TLS (its TLS client
    does not verify the registrar's certificate, it loads
    `certificate`/`private_key` for its own listener) and its contacts name
    the listener of the transport they registered over.
    """

    def __init__(
        self,
        registrations: Sequence[RemoteRegistration],
        *,
        expires: int,
        certificate: Path,
        private_key: Path,
        timer_interval: int = 1,
        retry_interval: int = 30,
        workdir: Path | None = None,
    ) -> None:
        for registration in registrations:
            if not registration.user.isalnum() or not registration.password.isalnum():
                raise ValueError(f"user or password unusable in db_text: {registration.user!r}")
        self.registrations = list(registrations)
        self.expires = expires
        self.certificate = certificate
        self.private_key = private_key
        self.timer_interval = timer_interval
        self.retry_interval = retry_interval
        self._requested_workdir = workdir
        self._workdir: Path | None = None
        self._runtime_dir: Path | None = None
        self._ports: dict[Transport, int] = {}
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The main process; its workers, timers and TLS processes share its process group."""
        if self._process is None:
            raise RuntimeError("the uac Kamailio is not running")
        return self._process.pid

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise RuntimeError("the uac Kamailio has not been entered")
        return self._workdir

    @property
    def log_path(self) -> Path:
        return self.workdir / "kamailio.log"

    @property
    def control_socket(self) -> Path:
        if self._runtime_dir is None:
            raise RuntimeError("the uac Kamailio has not been entered")
        return self._runtime_dir / "kamailio_ctl"

    # Lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._requested_workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="kamailio-uac-"))
        else:
            self._workdir = self._requested_workdir
            self._workdir.mkdir(parents=True, exist_ok=True)
        self._runtime_dir = Path(tempfile.mkdtemp(prefix="kamuac-"))
        try:
            self._prepare()
            await self._start()
        except BaseException:
            await self._leave()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._leave()

    async def _leave(self) -> None:
        await self._stop()
        if self._runtime_dir is not None:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
        if self._requested_workdir is None and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def _prepare(self) -> None:
        self._ports = {"udp": free_port(socket.SOCK_DGRAM), "tls": free_port(socket.SOCK_STREAM)}
        database = self.workdir / "db"
        database.mkdir(exist_ok=True)
        (database / "version").write_text(
            f"table_name(string) table_version(int)\nuacreg:{_UACREG_VERSION}\n"
        )
        with (database / "uacreg").open("w") as table:
            table.write(_UACREG_COLUMNS + "\n")
            for index, registration in enumerate(self.registrations, 1):
                table.write(self._row(index, registration))
        (self.workdir / "kamailio.cfg").write_text(self._config(database))

    def _row(self, index: int, registration: RemoteRegistration) -> str:
        host, port = registration.registrar
        proxy = f"sip:{host}:{port};transport={registration.transport}"
        contact = f"{HOST}:{self._ports[registration.transport]};transport={registration.transport}"
        user = registration.user
        fields = [
            str(index), user, user, "uac.test", user, registration.domain, registration.domain,
            user, registration.password, "", proxy, str(self.expires), "0",
            str(registration.delay), contact, "",
        ]  # fmt: skip
        # db_text separates fields with ":" and takes "\:" for a colon inside one.
        return ":".join(field.replace(":", "\\:") for field in fields) + "\n"

    def _config(self, database: Path) -> str:
        rows = max(1, len(self.registrations))
        return f"""#!KAMAILIO
debug=2
log_stderror=yes
children=2
tcp_children=2
auto_aliases=no
dns=no
rev_dns=no
use_dns_cache=off
tcp_connection_lifetime={self.expires + 60}

listen=udp:{HOST}:{self._ports["udp"]}
listen=tls:{HOST}:{self._ports["tls"]}
enable_tls=yes

loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "ctl.so"
loadmodule "db_text.so"
loadmodule "uac.so"
loadmodule "tls.so"

modparam("ctl", "binrpc", "unix:{self.control_socket}")

modparam("tls", "certificate", "{self.certificate}")
modparam("tls", "private_key", "{self.private_key}")
modparam("tls", "tls_method", "TLSv1.2+")
modparam("tls", "verify_certificate", 0)
modparam("tls", "require_certificate", 0)

modparam("db_text", "max_result_rows", {rows})

modparam("uac", "restore_mode", "none")
modparam("uac", "reg_db_url", "text://{database}")
modparam("uac", "reg_db_table", "uacreg")
modparam("uac", "reg_hash_size", {max(4, math.ceil(math.log2(rows)))})
modparam("uac", "reg_timer_interval", {self.timer_interval})
modparam("uac", "reg_retry_interval", {self.retry_interval})
modparam("uac", "reg_keep_callid", 1)
modparam("uac", "reg_contact_addr", "{HOST}:{self._ports["udp"]}")

request_route {{
	if (method == "OPTIONS") {{
		sl_send_reply("200", "OK");
	}}
	exit;
}}
"""

    async def _start(self) -> None:
        self._process = self._spawn()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                raise KamailioUacError(
                    f"kamailio exited with status {self._process.returncode} during start;"
                    f" log {self.log_path}:\n{tail(self.log_path)}"
                )
            with contextlib.suppress(KamailioUacError, subprocess.TimeoutExpired):
                await self.rpc("core.version")
                return
            if time.monotonic() > deadline:
                await self._stop()
                raise KamailioUacError(
                    f"kamailio not ready after {START_TIMEOUT} s; log {self.log_path}:\n"
                    f"{tail(self.log_path)}"
                )
            await asyncio.sleep(_PROBE_INTERVAL)

    def _spawn(self) -> subprocess.Popen[bytes]:
        # Shared memory holds the table twice (uac's hash table, db_text's cache).
        shm_mb = max(64, len(self.registrations) * _SHM_BYTES_PER_ROW // 2**20)
        command = [
            KAMAILIO,
            "-f", str(self.workdir / "kamailio.cfg"),
            "-DD",  # stay in the foreground, still forking the workers
            "-E",  # log to stderr
            "-Y", str(self.control_socket.parent),
            "-w", str(self.workdir),
            "-m", str(shm_mb),
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            log.write(f"==== {' '.join(command)}\n".encode())
            log.flush()
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )

    async def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.wait, STOP_TIMEOUT)
        _signal_group(process.pid, signal.SIGKILL)

    # Control socket --------------------------------------------------------------

    async def rpc(self, *command: str) -> str:
        """Run one RPC through kamcmd; KamailioUacError when it fails."""
        completed = await asyncio.to_thread(
            subprocess.run,
            [KAMCMD, "-s", f"unix:{self.control_socket}", *command],
            capture_output=True,
            text=True,
            timeout=RPC_TIMEOUT,
            check=False,
        )
        if completed.returncode != 0 or completed.stdout.startswith("error:"):
            raise KamailioUacError(
                f"kamcmd {' '.join(command)}: {completed.stderr.strip() or completed.stdout}"
            )
        return completed.stdout

    async def transactions(self) -> dict[str, int]:
        """tm's statistics ("total_local", "2xx", "4xx", ...), as numbers."""
        return _fields(await self.rpc("tm.stats"))

    async def module_shm(self) -> dict[str, int]:
        """Shared memory in use per module ("core", "tm", "uac", "db_text", ...), in bytes."""
        totals: dict[str, int] = {}
        module = ""
        for line in (await self.rpc("mod.stats", "all", "shm")).splitlines():
            name, _, value = line.strip().partition(":")
            if name == "Module":
                module = value.strip()
            elif name == "Total":
                totals[module] = int(value)
        return totals

    async def tcp_connections(self) -> int:
        """TCP and TLS connections open (its registrations over TLS share them)."""
        return _fields(await self.rpc("core.tcp_info"))["opened_connections"]


def refresh_period(expires: int, timer_interval: int) -> float:
    """Mean seconds between two registrations of one row (see the module docstring)."""
    return expires - 3 - timer_interval / 2


def _signal_group(process_group: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process_group, signum)


def _fields(output: str) -> dict[str, int]:
    """The numeric "name: value" lines of kamcmd's output."""
    fields: dict[str, int] = {}
    for line in output.splitlines():
        name, _, value = line.strip().partition(":")
        if value.strip().lstrip("-").isdigit():
            fields[name.strip()] = int(value)
    return fields
