"""Kamailio as a real registrar and proxy for tests, on loopback.

`Kamailio` writes a configuration into a working directory, starts
`kamailio -DD -E` (foreground, logging to stderr, which goes to
`kamailio.log` there) in its own process group, and waits until the UDP,
TCP and TLS listeners answer and the control socket replies.  Leaving the
context kills the whole process group.

What the configuration does:

- REGISTER: digest authentication (RFC 3261 22, realm "example.test",
  qop=auth, MD5 unless told otherwise) against the passwords the test gives,
  then `save("location")` into an in-memory location table (usrloc
  db_mode 0).  usrloc use_domain is 0: an address-of-record is keyed by its
  user part, so "alice" and "alice@example.test" name the same record.  The
  registrar honours min/max expires and answers 423 with Min-Expires below
  the minimum (min_expires_mode 1).  It stores Path (RFC 3327; echoed when
  the REGISTER says `Supported: path`), +sip.instance and reg-id (RFC 5626,
  outbound_mode 1), and always records the source of the REGISTER as the
  contact's "received" address (nathelper fix_nated_register), so requests
  for the AOR go back over the flow the binding came from.  Idle TCP and
  TLS connections stay open for max_expires + 60 s, so a registered flow
  outlives its binding.
- INVITE and MESSAGE to a user of example.test (or of 127.0.0.1 and
  registrar.test, its aliases): `lookup("location")`, then `t_relay()` to
  every registered contact (parallel forking when there are several).
  INVITEs are record-routed (double Record-Route when the transport
  changes) so the dialog's in-dialog requests come back through the proxy;
  MESSAGE is not dialog-forming and is not record-routed.  No registration: 480; unknown user: 404.
- OPTIONS to the server itself (no user part) gets 200: a keepalive probe.

`contacts(aor)` asks for one address-of-record through kamcmd and the
control socket; `all_contacts()` reads the whole location table through
the JSON-RPC server's FIFO (jsonrpcs), since kamcmd's replies are capped.

`restart()` kills Kamailio and starts it again on the same ports: the
location table is lost, like a real registrar restarted with db_mode 0.

Kamailio runs as whoever runs the tests, root included, without -u/-g; its
runtime directory (-Y) and control socket live in a temporary directory, so
it needs neither /run/kamailio nor a kamailio user.
"""

import asyncio
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypedDict

import trustme

from tests.peers.loopback import HOST, free_port, tail
from tests.peers.tls import client_context, issue_server_certificate, write_ca_certificate

KAMAILIO = "kamailio"
KAMCMD = "kamcmd"

DOMAIN = "example.test"
TLS_SERVER_NAME = "registrar.test"

START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
RPC_TIMEOUT = 5.0
_PROBE_INTERVAL = 0.05

Transport = Literal["udp", "tcp", "tls"]

# RFC 3261 25.1: user = 1*( unreserved / escaped / user-unreserved ).  Users
# are limited to unreserved characters and passwords exclude quote, backslash,
# "$" and control characters, so both sit verbatim in the generated config.
_USER = re.compile(r"[A-Za-z0-9._~!*'()-]+")
_PASSWORD = re.compile(r'[^"\\$\x00-\x1f\x7f]*')
_ALGORITHMS = ("MD5", "SHA-256")
# The passwords are set in route blocks of this many statements, called in turn
# when htable starts: Kamailio's config parser takes time quadratic in the length
# of one block (100,000 users in one block: 25 s to check the config; in blocks
# of 1,000: 4 s).
_USERS_PER_ROUTE = 1000


class KamailioError(RuntimeError):
    """Kamailio failed to start, or its control socket answered with an error."""


class LocationContact(TypedDict):
    """One binding of an address-of-record, as Kamailio's location table holds it.

    `expires` is the number of seconds left, or None for a permanent binding.
    `received` is the source the REGISTER came from ("sip:127.0.0.1:40000",
    with ";transport=tcp" or ";transport=tls" for streams), `socket` the
    local listener that took it ("tls:127.0.0.1:5061").  `path` is the stored Path header value,
    `instance` the +sip.instance value with its angle brackets.
    """

    uri: str
    expires: int | None
    received: str | None
    path: str | None
    instance: str | None
    reg_id: int | None
    socket: str
    call_id: str
    cseq: int
    user_agent: str | None


class KamailioProcess:
    """One Kamailio in its own process group, with a working directory and a control socket.

    Use as an async context manager.  A subclass writes its configuration
    (``_prepare``, to ``config_path``), says how much memory it takes
    (``_memory_options``) and may wait for more than the control socket
    (``_wait_until_ready``); this class starts and stops the process group
    and runs RPCs through kamcmd.  Config and log live in `workdir`, or in a
    temporary directory removed on exit; the control socket lives in a short
    temporary directory, since a unix socket path must fit in 108 bytes.
    Starting may take `start_timeout` seconds.
    """

    def __init__(
        self,
        *,
        workdir: Path | None = None,
        start_timeout: float = START_TIMEOUT,
        rpc_timeout: float = RPC_TIMEOUT,
    ) -> None:
        self.start_timeout = start_timeout
        self.rpc_timeout = rpc_timeout
        self._requested_workdir = workdir
        self._workdir: Path | None = None
        self._runtime_dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The main Kamailio process; its workers are in the same process group."""
        if self._process is None:
            raise RuntimeError("Kamailio is not running")
        return self._process.pid

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise RuntimeError("Kamailio has not been entered")
        return self._workdir

    @property
    def log_path(self) -> Path:
        return self.workdir / "kamailio.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "kamailio.cfg"

    @property
    def runtime_dir(self) -> Path:
        """Kamailio's runtime directory (-Y), which holds the control socket."""
        if self._runtime_dir is None:
            raise RuntimeError("Kamailio has not been entered")
        return self._runtime_dir

    @property
    def control_socket(self) -> Path:
        return self.runtime_dir / "kamailio_ctl"

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    # Lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._requested_workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="kamailio-"))
        else:
            self._workdir = self._requested_workdir
            self._workdir.mkdir(parents=True, exist_ok=True)
        self._runtime_dir = Path(tempfile.mkdtemp(prefix="kam-"))
        try:
            self._prepare()
            await self.start()
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
        await self.stop()
        if self._runtime_dir is not None:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
        if self._requested_workdir is None and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def _prepare(self) -> None:
        """Write the configuration and whatever it needs, once per context."""
        raise NotImplementedError

    def _memory_options(self) -> list[str]:
        """Kamailio's -m (shared) and -M (per process) memory options."""
        raise NotImplementedError

    async def start(self) -> None:
        """Start Kamailio and return once it is ready (``_wait_until_ready``)."""
        if self._process is not None:
            raise RuntimeError("Kamailio is already running")
        self.control_socket.unlink(missing_ok=True)
        self._process = self._spawn()
        deadline = time.monotonic() + self.start_timeout
        try:
            await self._wait_until_ready(deadline)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Kill Kamailio's process group: SIGTERM, then SIGKILL if it lingers."""
        process, self._process = self._process, None
        if process is None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.wait, STOP_TIMEOUT)
        # Workers that outlived the main process still carry its group id.
        _signal_group(process.pid, signal.SIGKILL)

    def _spawn(self) -> subprocess.Popen[bytes]:
        command = [
            KAMAILIO,
            "-f", str(self.config_path),
            "-DD",  # stay in the foreground, still forking the workers
            "-E",  # log to stderr
            "-Y", str(self.runtime_dir),
            "-w", str(self.workdir),  # working directory (core files)
            *self._memory_options(),
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

    async def _wait_until_ready(self, deadline: float) -> None:
        """Wait until the control socket answers."""
        while True:
            with contextlib.suppress(KamailioError):
                await self.rpc("core.version")
                return
            self._check_deadline(deadline, "control socket")
            await asyncio.sleep(_PROBE_INTERVAL)

    def _check_deadline(self, deadline: float, waiting_for: str) -> None:
        process = self._process
        assert process is not None
        if process.poll() is not None:
            raise KamailioError(
                f"kamailio exited with status {process.returncode} during start;"
                f" log {self.log_path}:\n{self.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise KamailioError(
                f"kamailio not ready after {self.start_timeout} s (waiting for {waiting_for});"
                f" log {self.log_path}:\n{self.log_tail()}"
            )

    # Control socket ------------------------------------------------------------

    async def rpc(self, *command: str) -> str:
        """Run one RPC command through kamcmd and return its output.

        kamcmd exits with status 0 even when the command fails; a failure is
        output starting with "error: <code> - <reason>", raised here as
        KamailioError.
        """
        output = await self._kamcmd(*command)
        if output.startswith("error:"):
            raise KamailioError(f"{' '.join(command)}: {output.strip()}")
        return output

    async def _kamcmd(self, *command: str) -> str:
        completed = await asyncio.to_thread(
            subprocess.run,
            [KAMCMD, "-s", f"unix:{self.control_socket}", *command],
            capture_output=True,
            text=True,
            timeout=self.rpc_timeout,
            check=False,
        )
        if completed.returncode != 0:
            raise KamailioError(
                f"kamcmd {' '.join(command)} exited with {completed.returncode}: "
                f"{completed.stderr.strip() or completed.stdout.strip()}"
            )
        return completed.stdout


class Kamailio(KamailioProcess):
    """A Kamailio registrar and proxy on 127.0.0.1 with UDP, TCP and TLS listeners.

    Use as an async context manager.  `users` maps user names to passwords.
    `min_expires` and `max_expires` bound the interval the registrar grants;
    a REGISTER below `min_expires` gets 423 Interval Too Brief, one without
    an expiry gets `default_expires` (3600 clamped into the bounds when
    None).  `digest_algorithm` is "MD5" or "SHA-256".  The TLS certificate
    is issued by `ca` (a new trustme CA when None) for TLS_SERVER_NAME,
    DOMAIN and 127.0.0.1; clients verify it with `ca_certificate`.  Config,
    certificates and log live in `workdir`, or in a temporary directory
    removed on exit; the control socket lives in a short temporary
    directory, since a unix socket path must fit in 108 bytes.  Starting
    may take `start_timeout` seconds (a config for a few hundred thousand
    users takes tens of seconds to load).  Process, working directory and
    control socket: ``KamailioProcess``.
    """

    def __init__(
        self,
        users: Mapping[str, str],
        *,
        min_expires: int = 60,
        max_expires: int = 3600,
        default_expires: int | None = None,
        digest_algorithm: str = "MD5",
        ca: trustme.CA | None = None,
        workdir: Path | None = None,
        start_timeout: float = START_TIMEOUT,
    ):
        for user, password in users.items():
            if not _USER.fullmatch(user) or not _PASSWORD.fullmatch(password):
                raise ValueError(f"user or password unusable in a Kamailio config: {user!r}")
        if digest_algorithm not in _ALGORITHMS:
            raise ValueError(f"digest_algorithm must be one of {_ALGORITHMS}")
        if default_expires is None:
            default_expires = min(max(3600, min_expires), max_expires)
        if not 0 < min_expires <= default_expires <= max_expires:
            raise ValueError("expected 0 < min_expires <= default_expires <= max_expires")
        self.users = dict(users)
        self.min_expires = min_expires
        self.max_expires = max_expires
        self.default_expires = default_expires
        self.digest_algorithm = digest_algorithm
        self.ca = ca or trustme.CA()
        super().__init__(workdir=workdir, start_timeout=start_timeout)
        self._ports: dict[Transport, int] = {}

    # Addresses and files ---------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def domain(self) -> str:
        return DOMAIN

    @property
    def tls_server_name(self) -> str:
        return TLS_SERVER_NAME

    @property
    def udp_port(self) -> int:
        return self._ports["udp"]

    @property
    def tcp_port(self) -> int:
        return self._ports["tcp"]

    @property
    def tls_port(self) -> int:
        return self._ports["tls"]

    def address(self, transport: Transport) -> tuple[str, int]:
        """The (host, port) of the listener for `transport`."""
        return HOST, self._ports[transport]

    def uri(self, transport: Transport) -> str:
        """A SIP URI that reaches this server over `transport`, e.g. for an outbound proxy."""
        return f"sip:{HOST}:{self._ports[transport]};transport={transport}"

    @property
    def ca_certificate(self) -> Path:
        """PEM file of the CA that issued the TLS certificate."""
        return self.workdir / "ca.pem"

    @property
    def rpc_fifo(self) -> Path:
        """The FIFO where Kamailio's JSON-RPC server (jsonrpcs) reads requests; replies
        come back through FIFOs the client makes in the same directory."""
        return self.runtime_dir / "kamailio_rpc.fifo"

    # Lifecycle ---------------------------------------------------------------

    def _prepare(self) -> None:
        """Pick the ports and write certificates and configuration, once per context."""
        self._ports = {
            "udp": free_port(socket.SOCK_DGRAM),
            "tcp": free_port(socket.SOCK_STREAM),
            "tls": free_port(socket.SOCK_STREAM),
        }
        write_ca_certificate(self.ca, self.ca_certificate)
        certificate = issue_server_certificate(
            self.ca, self.workdir, [TLS_SERVER_NAME, DOMAIN, HOST], stem="registrar"
        )
        self.config_path.write_text(
            render_config(
                ports=self._ports,
                users=self.users,
                min_expires=self.min_expires,
                max_expires=self.max_expires,
                default_expires=self.default_expires,
                digest_algorithm=self.digest_algorithm,
                certificate=certificate.chain,
                private_key=certificate.private_key,
                control_socket=self.control_socket,
                rpc_fifo=self.rpc_fifo,
            )
        )

    async def start(self) -> None:
        """Start Kamailio and return once all listeners and the control socket answer."""
        self.rpc_fifo.unlink(missing_ok=True)
        await super().start()

    async def restart(self) -> None:
        """Kill Kamailio and start it again on the same ports, with an empty location table."""
        await self.stop()
        await self.start()

    def _memory_options(self) -> list[str]:
        return [
            # Shared memory: location records and transactions, which a
            # benchmark's call rate over many users fills.
            "-m", str(max(64, len(self.users) // 40)),
            # Private memory of each process: the config holds a line per user.
            "-M", str(max(8, len(self.users) // 100)),
        ]  # fmt: skip

    async def _wait_until_ready(self, deadline: float) -> None:
        probes: list[tuple[str, Callable[[], bool]]] = [
            ("UDP OPTIONS", self._udp_answers),
            ("TCP accept", self._tcp_accepts),
            ("TLS handshake", self._tls_handshakes),
        ]
        for name, probe in probes:
            while not await asyncio.to_thread(probe):
                self._check_deadline(deadline, name)
                await asyncio.sleep(_PROBE_INTERVAL)
        await super()._wait_until_ready(deadline)

    def _udp_answers(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((HOST, 0))
            probe.settimeout(0.2)
            local_port = probe.getsockname()[1]
            probe.sendto(_options_request(self.udp_port, local_port), (HOST, self.udp_port))
            try:
                reply = probe.recv(65535)
            except (TimeoutError, ConnectionRefusedError):
                return False
            return reply.startswith(b"SIP/2.0 200 ")

    def _tcp_accepts(self) -> bool:
        try:
            with socket.create_connection((HOST, self.tcp_port), timeout=0.2):
                return True
        except OSError:
            return False

    def _tls_handshakes(self) -> bool:
        context = client_context(self.ca_certificate)
        try:
            with (
                socket.create_connection((HOST, self.tls_port), timeout=0.5) as raw,
                context.wrap_socket(raw, server_hostname=TLS_SERVER_NAME),
            ):
                return True
        except ssl.SSLCertVerificationError:
            raise  # a certificate clients cannot verify is a broken fixture, not a slow start
        except OSError:
            return False

    # Location ---------------------------------------------------------------

    async def contacts(self, aor: str) -> list[LocationContact]:
        """Return the live bindings of `aor` ("alice" or "alice@example.test"); [] when none.

        Kamailio keeps an expired binding until its timer purges it and
        lookup() already ignores it; so does this.
        """
        output = await self._kamcmd("ul.lookup", "location", aor)
        if output.startswith("error:") and (
            "not found" in output.lower() or "has no contacts" in output.lower()
        ):
            return []
        if output.startswith("error:"):
            raise KamailioError(f"ul.lookup location {aor}: {output.strip()}")
        return [
            contact
            for contact in (_location_contact(fields) for fields in _contact_blocks(output))
            if contact is not None
        ]

    async def all_contacts(self) -> dict[str, list[LocationContact]]:
        """Return the live bindings of every address-of-record, by AOR, in one RPC.

        An AOR without a live binding is left out.  kamcmd cannot carry the
        location table of a few thousand users: its reply buffer has a
        compiled-in size (MAX_REPLY_SIZE), and `kamcmd ul.dump` fails with
        "reply too big" beyond a few hundred contacts, whatever the ctl
        module's binrpc sizes.  So `ul.dump` goes through the JSON-RPC
        server's FIFO transport, whose reply has no such bound; its contacts
        carry the same fields as kamcmd prints and are read the same way as
        in `contacts()`.
        """
        result = await asyncio.to_thread(self._json_rpc, "ul.dump")
        table: dict[str, list[LocationContact]] = {}
        for domain in result["Domains"]:
            if domain["Domain"]["Domain"] != "location":
                continue
            for record in domain["Domain"]["AoRs"]:
                info = record["Info"]
                fields = (
                    {name: str(value) for name, value in item["Contact"].items()}
                    for item in info["Contacts"]
                )
                live = [c for c in map(_location_contact, fields) if c is not None]
                if live:
                    table[info["AoR"]] = live
        return table

    def _json_rpc(self, method: str) -> Any:
        """Run one RPC through jsonrpcs's FIFO and return its result (blocking, bounded).

        The request names a reply FIFO made here; Kamailio opens it, writes
        the whole JSON reply and closes it.  The reply FIFO is opened
        non-blocking before the request leaves, and poll() reports data or
        the writer's close only once Kamailio has opened it, so the wait is
        bounded by RPC_TIMEOUT rather than by a blocking open().
        """
        name = f"reply-{uuid.uuid4().hex}"
        reply_fifo = self.runtime_dir / name
        os.mkfifo(reply_fifo, 0o600)
        try:
            reader = os.open(reply_fifo, os.O_RDONLY | os.O_NONBLOCK)
            try:
                self._send_json_rpc(method, name)
                text = _read_fifo(reader, time.monotonic() + RPC_TIMEOUT)
            finally:
                os.close(reader)
        finally:
            reply_fifo.unlink(missing_ok=True)
        if not text:
            raise KamailioError(f"{method}: no reply on the JSON-RPC FIFO")
        reply = json.loads(text)
        if "error" in reply:
            raise KamailioError(f"{method}: {reply['error']}")
        return reply["result"]

    def _send_json_rpc(self, method: str, reply_name: str) -> None:
        request = {"jsonrpc": "2.0", "method": method, "reply_name": reply_name, "id": 1}
        try:
            writer = os.open(self.rpc_fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:  # ENXIO: nobody reads the FIFO, Kamailio is not running
            raise KamailioError(f"JSON-RPC FIFO {self.rpc_fifo}: {exc}") from None
        try:
            # One write below PIPE_BUF: atomic even when several clients share the FIFO.
            os.write(writer, json.dumps(request).encode() + b"\n")
        finally:
            os.close(writer)

    async def wait_for_new_registrations(
        self, before: Mapping[str, set[str]], timeout: float = 10.0
    ) -> None:
        """Until each user in ``before`` has one contact, with a Call-ID not in ``before``."""
        pending = dict(before)
        try:
            async with asyncio.timeout(timeout):
                while pending:
                    found = await asyncio.gather(*(self.contacts(user) for user in pending))
                    for user, contacts in zip(list(pending), found, strict=True):
                        if len(contacts) == 1 and contacts[0]["call_id"] not in pending[user]:
                            del pending[user]
                    await asyncio.sleep(0.1)
        except TimeoutError:
            now = {user: await self.contacts(user) for user in pending}
            raise AssertionError(f"not registered (again): {now}") from None

    async def wait_for_contacts(
        self,
        aor: str,
        predicate: Callable[[list[LocationContact]], bool],
        timeout: float = 5.0,
    ) -> list[LocationContact]:
        """Poll `contacts(aor)` until `predicate` holds for the list, and return that list."""
        deadline = time.monotonic() + timeout
        while True:
            contacts = await self.contacts(aor)
            if predicate(contacts):
                return contacts
            if time.monotonic() > deadline:
                raise TimeoutError(f"after {timeout} s the bindings of {aor} are still {contacts}")
            await asyncio.sleep(_PROBE_INTERVAL)


def _signal_group(process_group: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process_group, signum)


def _read_fifo(reader: int, deadline: float) -> bytes:
    """Read a non-blocking FIFO until its writer closes it; KamailioError at ``deadline``
    (a ``time.monotonic()`` value)."""
    poller = select.poll()
    poller.register(reader, select.POLLIN)
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            raise KamailioError("no complete JSON-RPC reply in time")
        try:
            chunk = os.read(reader, 1 << 20)
        except BlockingIOError:
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _options_request(server_port: int, local_port: int) -> bytes:
    branch = f"z9hG4bK-ready-{local_port}-{time.monotonic_ns()}"
    return (
        f"OPTIONS sip:{HOST}:{server_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {HOST}:{local_port};branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:ready@{HOST}>;tag={local_port}\r\n"
        f"To: <sip:{HOST}:{server_port}>\r\n"
        f"Call-ID: ready-{branch}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


# kamcmd output ---------------------------------------------------------------
#
# kamcmd prints an RPC structure as indented "Name: value" lines, a nested
# structure as "Name: {" ... "}", e.g. for ul.lookup:
#
#   {
#       AoR: alice
#       Contacts: {
#           Contact: {
#               Address: sip:alice@127.0.0.1:5060;transport=UDP
#               Expires: 597
#               Received: sip:127.0.0.1:5060
#               Path: <sip:edge.example.test;lr;ob>
#               Socket: udp:127.0.0.1:25060
#               Instance: <urn:uuid:00000000-0000-4000-8000-000000000001>
#               Reg-Id: 1
#               ...
#
# Absent values print as "[not set]" (Path, Instance, Received), "n/a"
# (User-Agent) or 0 (Reg-Id); Expires prints "permanent", "expired" or
# "deleted" instead of a number when it is not a live interval.

_ABSENT = ("", "[not set]", "n/a")


def _contact_blocks(output: str) -> list[dict[str, str]]:
    """Collect the "Name: value" lines of every "Contact: {" block."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    for raw_line in output.splitlines():
        line = raw_line.strip()
        if line == "Contact: {":
            current = {}
            blocks.append(current)
        elif line == "}" or line.endswith("{"):
            current = None
        elif current is not None and ": " in line:
            name, value = line.split(": ", 1)
            current[name] = value
    return blocks


def _optional(fields: Mapping[str, str], name: str) -> str | None:
    value = fields.get(name)
    return None if value is None or value in _ABSENT else value


def _location_contact(fields: Mapping[str, str]) -> LocationContact | None:
    """Turn one contact block into a LocationContact; None when the binding is not live."""
    expires_text = fields["Expires"]
    expires: int | None
    if expires_text == "permanent":
        expires = None
    elif expires_text.isdigit():
        expires = int(expires_text)
    else:
        return None
    reg_id = _optional(fields, "Reg-Id")
    return LocationContact(
        uri=fields["Address"],
        expires=expires,
        received=_optional(fields, "Received"),
        path=_optional(fields, "Path"),
        instance=_optional(fields, "Instance"),
        reg_id=int(reg_id) if reg_id is not None and reg_id != "0" else None,
        socket=fields["Socket"],
        call_id=fields["Call-ID"],
        cseq=int(fields["CSeq"]),
        user_agent=_optional(fields, "User-Agent"),
    )


# Configuration -----------------------------------------------------------------


def tls_modparams(certificate: Path, private_key: Path) -> str:
    """Kamailio's tls module serving ``certificate``, asking nothing of clients."""
    return f"""modparam("tls", "certificate", "{certificate}")
modparam("tls", "private_key", "{private_key}")
modparam("tls", "tls_method", "TLSv1.2+")
modparam("tls", "verify_certificate", 0)
modparam("tls", "require_certificate", 0)"""


def render_config(
    *,
    ports: Mapping[Transport, int],
    users: Mapping[str, str],
    min_expires: int,
    max_expires: int,
    default_expires: int,
    digest_algorithm: str,
    certificate: Path,
    private_key: Path,
    control_socket: Path,
    rpc_fifo: Path,
) -> str:
    """Return the Kamailio configuration: generated settings, then the fixed routing logic."""
    assignments = [f'\t$sht(users=>{user}) = "{password}";' for user, password in users.items()]
    blocks = [
        assignments[start : start + _USERS_PER_ROUTE]
        for start in range(0, len(assignments), _USERS_PER_ROUTE)
    ]
    user_routes = "".join(
        f"route[USERS_{number}] {{\n" + "\n".join(block) + "\n}\n\n"
        for number, block in enumerate(blocks)
    )
    load_users = "\n".join(f"\troute(USERS_{number});" for number in range(len(blocks)))
    settings = f"""#!KAMAILIO
#!define REALM "{DOMAIN}"

debug=2
log_stderror=yes
children=2
tcp_children=2
auto_aliases=no
pv_cache_limit={2 * len(users) + 2048}
dns=no
rev_dns=no
use_dns_cache=off
# An idle registered TCP/TLS flow stays open as long as its binding can live.
tcp_connection_lifetime={max_expires + 60}

listen=udp:{HOST}:{ports["udp"]}
listen=tcp:{HOST}:{ports["tcp"]}
listen=tls:{HOST}:{ports["tls"]}
enable_tls=yes
alias="{DOMAIN}"
alias="{TLS_SERVER_NAME}"

loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "sanity.so"
loadmodule "ctl.so"
loadmodule "jsonrpcs.so"
loadmodule "htable.so"
loadmodule "auth.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "nathelper.so"
loadmodule "tls.so"

modparam("ctl", "binrpc", "unix:{control_socket}")
modparam("jsonrpcs", "transport", 2)
modparam("jsonrpcs", "pretty_format", 0)
modparam("jsonrpcs", "fifo_name", "{rpc_fifo}")
modparam("jsonrpcs", "fifo_reply_dir", "{rpc_fifo.parent}/")

{tls_modparams(certificate, private_key)}

modparam("htable", "htable", "users=>size={max(4, (len(users) - 1).bit_length())};")
modparam("auth", "algorithm", "{digest_algorithm}")

modparam("usrloc", "db_mode", 0)
modparam("usrloc", "use_domain", 0)

modparam("registrar", "min_expires", {min_expires})
modparam("registrar", "max_expires", {max_expires})
modparam("registrar", "default_expires", {default_expires})
modparam("registrar", "min_expires_mode", 1)
modparam("registrar", "use_path", 1)
modparam("registrar", "path_mode", 2)
modparam("registrar", "outbound_mode", 1)
modparam("registrar", "received_avp", "$avp(RECEIVED)")
modparam("nathelper", "received_avp", "$avp(RECEIVED)")

{user_routes}event_route[htable:mod-init] {{
{load_users}
}}
"""
    return settings + _ROUTING


_ROUTING = r"""
request_route {
	xlog("L_INFO", "$rm $ru from $proto:$si:$sp (Call-ID $ci)\n");

	if (!mf_process_maxfwd_header("10")) {
		sl_send_reply("483", "Too Many Hops");
		exit;
	}
	if (!sanity_check()) {
		xlog("L_WARN", "malformed $rm from $proto:$si:$sp dropped\n");
		exit;
	}
	if (is_method("OPTIONS") && uri == myself && $rU == $null) {
		sl_send_reply("200", "OK");
		exit;
	}
	if (is_method("CANCEL")) {
		if (t_check_trans()) {
			t_relay();
		}
		exit;
	}
	if (has_totag()) {
		route(IN_DIALOG);
		exit;
	}
	if (is_method("ACK")) {
		# An ACK for a non-2xx final response belongs to its INVITE transaction.
		if (t_check_trans()) {
			t_relay();
		}
		exit;
	}
	# Retransmissions of a request whose transaction exists are absorbed here.
	t_check_trans();
	remove_hf("Route");

	if (is_method("REGISTER")) {
		route(REGISTRAR);
	}
	if (is_method("INVITE|MESSAGE")) {
		route(LOCATION);
	}
	sl_send_reply("405", "Method Not Allowed");
	exit;
}

route[IN_DIALOG] {
	if (loose_route()) {
		if (!t_relay()) {
			sl_reply_error();
		}
		exit;
	}
	if (is_method("ACK")) {
		if (t_check_trans()) {
			t_relay();
		}
		exit;
	}
	sl_send_reply("404", "Not Here");
	exit;
}

route[REGISTRAR] {
	if (!(uri == myself)) {
		sl_send_reply("403", "Not Our Domain");
		exit;
	}
	if (!pv_auth_check(REALM, "$sht(users=>$fU)", "0", "1")) {
		auth_challenge(REALM, "1");
		exit;
	}
	consume_credentials();
	fix_nated_register();
	if (!save("location")) {
		sl_reply_error();
	}
	exit;
}

route[LOCATION] {
	if (!(uri == myself)) {
		sl_send_reply("403", "Relaying Forbidden");
		exit;
	}
	if ($sht(users=>$rU) == $null) {
		sl_send_reply("404", "Not Found");
		exit;
	}
	if (!lookup("location")) {
		sl_send_reply("480", "Temporarily Unavailable");
		exit;
	}
	if (is_method("INVITE")) {
		record_route();
	}
	if (!t_relay()) {
		sl_reply_error();
	}
	exit;
}
"""
