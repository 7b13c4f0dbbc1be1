"""Kamailio's `uac` module keeping remote registrations, for the bindings benchmark.

`KamailioUac` writes a configuration and a db_text `uacreg` table into a
working directory; starting it, waiting for its control socket, killing
its process group and its RPCs are the test fixture's (`KamailioProcess`).
Nothing routes through it: its only work is the uac module's remote
registrations, so its processes' CPU and memory are what keeping them
costs.

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

import math
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tests.peers.kamailio import KamailioProcess, tls_modparams
from tests.peers.loopback import HOST, free_port

START_TIMEOUT = 120.0
RPC_TIMEOUT = 30.0
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


class KamailioUac(KamailioProcess):
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
        super().__init__(workdir=workdir, start_timeout=START_TIMEOUT, rpc_timeout=RPC_TIMEOUT)
        self._ports: dict[Transport, int] = {}

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
        self.config_path.write_text(self._config(database))

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

{tls_modparams(self.certificate, self.private_key)}

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

    def _memory_options(self) -> list[str]:
        # Shared memory holds the table twice (uac's hash table, db_text's cache).
        return ["-m", str(max(64, len(self.registrations) * _SHM_BYTES_PER_ROW // 2**20))]

    # Statistics ------------------------------------------------------------------

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


def _fields(output: str) -> dict[str, int]:
    """The numeric "name: value" lines of kamcmd's output."""
    fields: dict[str, int] = {}
    for line in output.splitlines():
        name, _, value = line.strip().partition(":")
        if value.strip().lstrip("-").isdigit():
            fields[name.strip()] = int(value)
    return fields
