"""baresip 1.0.0 as a real softphone for tests, on loopback, with no sound card.

`Baresip` writes a configuration directory, starts `baresip -f <dir> -s`
(SIP trace on, output to `baresip.log` there) in its own process group,
connects to its ctrl_tcp control socket, and creates one user agent that
registers `aor` at `registrar` over UDP, TCP or TLS.  Leaving the context
kills the whole process group.

Control.  The ctrl_tcp module speaks JSON in netstrings over TCP:

    netstring = length ":" payload ","     ; length: the payload's size in
                                           ; decimal digits (djb's netstrings)

A command is `{"command": "hangup", "params": "", "token": "7"}`; its answer
is `{"response": true, "ok": true, "data": "...", "token": "7"}`.  Every
user-agent event arrives unasked as `{"event": true, "type": "REGISTER_OK",
"class": "register", "accountaor": "sip:alice@example.test", ...}`; call
events add "direction", "peeruri", "peerdisplayname", "id" (the Call-ID)
and "param".  Event types a test waits for: REGISTERING, REGISTER_OK,
REGISTER_FAIL, UNREGISTERING, CALL_INCOMING, CALL_ESTABLISHED, CALL_CLOSED
(plus CALL_LOCAL_SDP and CALL_REMOTE_SDP around each offer/answer).

ctrl_tcp sends events only to a connected client, and baresip registers the
accounts of its `accounts` file while it starts, before it accepts any
connection.  So the configuration loads no account module and holds no
account: once connected, the fixture creates the account with the `uanew`
command, whose registration then starts under observation.

Answering.  With `;answermode=auto` baresip 1.0.0 answers inside the user
agent and never reports CALL_INCOMING.  The account is therefore created
with `;answermode=manual` (baresip answers 180 Ringing), and when
`auto_answer` is set the fixture answers each CALL_INCOMING with the
`accept` command after `answer_delay` seconds.

Media.  Only the G.711 codecs (PCMU, PCMA) are loaded.  Audio source and
player are the `aubridge` module's device "fixture" (the player's samples
feed the source: an echo inside the process, no device file), and the
ringing tone plays to another aubridge device.  The SDP names 127.0.0.1,
and RTP flows between loopback ports.  No NAT module is loaded (no STUN,
TURN or ICE) and the SIP account uses no RFC 5626 outbound keepalives.

Network.  `net_interface 127.0.0.1` makes baresip use only the loopback
address, and `sip_listen 127.0.0.1:0` lets it pick free UDP, TCP and TLS
ports itself (with a fixed port P it would take P for UDP and TCP and P+1
for TLS).  DNS queries, which the numeric registrar address makes
unnecessary, would go to 127.0.0.1:53.

TLS.  `ca_file` becomes `sip_cafile`.  baresip 1.0.0 loads it but does not
reject a server certificate that fails to chain to it (it registers with a
CA file that lacks the issuer), so a test over TLS proves encryption and
routing, not certificate verification by baresip.
"""

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from tests.peers.loopback import HOST, free_port, is_bound, tail

BARESIP = "baresip"
MODULE_PATH = Path("/usr/lib/baresip/modules")

START_TIMEOUT = 10.0
STOP_TIMEOUT = 3.0
COMMAND_TIMEOUT = 5.0
_POLL_INTERVAL = 0.05
_MAX_NETSTRING_DIGITS = 9

Transport = Literal["udp", "tcp", "tls"]

# Values end up inside baresip's account line, `<uri>;name=value;...`, whose
# parser stops a value at ";", whitespace, quotes and angle brackets.
_PARAMETER_VALUE = re.compile(r"[^;\"<>\\\s]+")
# RFC 3261 19.1.1: sip:user@host, here without parameters or headers.
_ADDRESS_OF_RECORD = re.compile(r"sip:[^;?<>\"\\\s@]+@[^;?<>\"\\\s@]+")
_TRANSPORT_PARAMETER = re.compile(r";transport=([A-Za-z]+)", re.IGNORECASE)


class BaresipError(RuntimeError):
    """baresip failed to start, exited, refused a command or failed to register."""


@dataclass(frozen=True)
class BaresipEvent:
    """One event baresip reported over ctrl_tcp.

    `call_id` is the call's Call-ID ("id"), `peer_uri` the remote party
    ("peeruri"), `param` the event's detail: "200 OK" for REGISTER_OK, the
    caller's URI for CALL_INCOMING, the reason for CALL_CLOSED.  `fields`
    holds the whole event as baresip sent it, `received_at` the
    time.monotonic() at which the fixture read it.
    """

    type: str
    aor: str | None
    call_id: str | None
    peer_uri: str | None
    param: str | None
    fields: Mapping[str, Any]
    received_at: float

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> Self:
        return cls(
            type=str(message["type"]),
            aor=message.get("accountaor"),
            call_id=message.get("id"),
            peer_uri=message.get("peeruri"),
            param=message.get("param"),
            fields=dict(message),
            received_at=time.monotonic(),
        )


class Baresip:
    """A baresip user agent registered as `aor`, driven and observed over ctrl_tcp.

    Use as an async context manager.  `registrar` is the SIP URI of the
    registrar, which baresip also uses as outbound proxy for every request
    (e.g. `kamailio.uri("tls")`); it gets ";transport=<transport>" unless it
    names that transport already.  `username` and `password` answer the
    digest challenge.  `register_interval` is the expiry baresip asks for.
    Entering returns once baresip runs and its user agent exists; a test
    then awaits `wait_registered()`.  `workdir` holds the configuration and
    `baresip.log`.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        aor: str,
        registrar: str,
        username: str,
        password: str,
        transport: Transport,
        ca_file: Path | None = None,
        auto_answer: bool = True,
        answer_delay: float = 0.0,
        register_interval: int = 600,
    ):
        if not _ADDRESS_OF_RECORD.fullmatch(aor):
            raise ValueError(f"aor must be sip:user@host without parameters: {aor!r}")
        for name, value in (("username", username), ("password", password)):
            if not _PARAMETER_VALUE.fullmatch(value):
                raise ValueError(f"{name} unusable in a baresip account line")
        if answer_delay < 0 or register_interval <= 0:
            raise ValueError("expected answer_delay >= 0 and register_interval > 0")
        self.workdir = workdir
        self.aor = aor
        self.registrar = registrar
        self.username = username
        self.password = password
        self.transport: Transport = transport
        self.ca_file = ca_file
        self.auto_answer = auto_answer
        self.answer_delay = answer_delay
        self.register_interval = register_interval
        self._outbound = _outbound_uri(registrar, transport)
        self._control_port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._answering: set[asyncio.Task[None]] = set()
        self._tokens = count(1)
        self._replies: dict[str, asyncio.Future[Mapping[str, Any]]] = {}
        self._events: list[BaresipEvent] = []
        self._changed = asyncio.Condition()
        self._closed_reason: str | None = None
        self.answer_failures: list[str] = []

    # Files and state -----------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.workdir / "config"

    @property
    def log_path(self) -> Path:
        return self.workdir / "baresip.log"

    @property
    def control_port(self) -> int:
        """The TCP port of ctrl_tcp on 127.0.0.1."""
        return self._control_port

    @property
    def pid(self) -> int:
        """The baresip process, which leads its own process group."""
        if self._process is None:
            raise RuntimeError("baresip is not running")
        return self._process.pid

    @property
    def events(self) -> list[BaresipEvent]:
        """Every event received so far, oldest first."""
        return list(self._events)

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    # Lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._control_port = free_port(socket.SOCK_STREAM)
        self.config_path.write_text(
            render_config(control_port=self._control_port, ca_file=self.ca_file)
        )
        try:
            self._process = self._spawn()
            await self._connect(time.monotonic() + START_TIMEOUT)
            await self.command("uanew", self._account_line())
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
        for task in self._answering:
            task.cancel()
        await asyncio.gather(*self._answering, return_exceptions=True)
        await self._stop_process()
        if self._reading is not None:
            self._reading.cancel()
            await asyncio.gather(self._reading, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()

    def _spawn(self) -> subprocess.Popen[bytes]:
        command = [BARESIP, "-f", str(self.workdir), "-s"]
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

    async def _connect(self, deadline: float) -> None:
        """Wait for ctrl_tcp to listen, connect, and start reading what it sends."""
        process = self._process
        assert process is not None
        while not is_bound(self._control_port, socket.SOCK_STREAM):
            if process.poll() is not None:
                raise BaresipError(
                    f"baresip exited with status {process.returncode} during start;"
                    f" log {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise BaresipError(
                    f"ctrl_tcp not listening on {HOST}:{self._control_port} after"
                    f" {START_TIMEOUT} s; log {self.log_path}:\n{self.log_tail()}"
                )
            await asyncio.sleep(_POLL_INTERVAL)
        self._reader, self._writer = await asyncio.open_connection(HOST, self._control_port)
        self._reading = asyncio.create_task(self._read_messages(self._reader))

    async def _stop_process(self) -> None:
        """SIGTERM (baresip unregisters, then exits), SIGKILL if it lingers."""
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

    def _account_line(self) -> str:
        """The account in baresip's `accounts` syntax: `<uri>;name=value;...`."""
        return (
            f"<{self.aor};transport={self.transport}>"
            f";auth_user={self.username}"
            f";auth_pass={self.password}"
            f';outbound="{self._outbound}"'
            ";answermode=manual"
            f";regint={self.register_interval}"
        )

    # Control ---------------------------------------------------------------------

    async def command(self, name: str, params: str = "") -> str:
        """Run a baresip command (as typed at its console: "hangup", "accept") and return its
        output; a command baresip refuses raises BaresipError."""
        writer = self._writer
        if writer is None or self._closed_reason is not None:
            raise BaresipError(f"no control connection for {name!r}: {self._closed_reason}")
        token = str(next(self._tokens))
        reply: asyncio.Future[Mapping[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[token] = reply
        payload = json.dumps({"command": name, "params": params, "token": token}).encode()
        try:
            writer.write(encode_netstring(payload))
            await writer.drain()
            async with asyncio.timeout(COMMAND_TIMEOUT):
                answer = await reply
        except TimeoutError:
            raise BaresipError(f"no answer to {name!r} after {COMMAND_TIMEOUT} s") from None
        finally:
            self._replies.pop(token, None)
        data = str(answer.get("data", ""))
        if not answer.get("ok"):
            raise BaresipError(f"baresip refused {name!r}: {data.strip()}")
        return data

    async def answer(self) -> str:
        """Answer the incoming call with 200 OK."""
        return await self.command("accept")

    async def hangup(self) -> str:
        """End the current call: BYE once established, a final response while ringing."""
        return await self.command("hangup")

    async def _read_messages(self, reader: asyncio.StreamReader) -> None:
        reason = "control connection closed by baresip"
        try:
            while True:
                message = json.loads(await read_netstring(reader))
                if message.get("response"):
                    reply = self._replies.get(str(message.get("token")))
                    if reply is not None and not reply.done():
                        reply.set_result(message)
                elif message.get("event"):
                    await self._record(BaresipEvent.from_message(message))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as error:
            reason = f"control connection lost: {error!r}"
        finally:
            self._closed_reason = reason
            for reply in self._replies.values():
                if not reply.done():
                    reply.set_exception(BaresipError(reason))
            async with self._changed:
                self._changed.notify_all()

    async def _record(self, event: BaresipEvent) -> None:
        async with self._changed:
            self._events.append(event)
            self._changed.notify_all()
        if event.type == "CALL_INCOMING" and self.auto_answer:
            task = asyncio.create_task(self._answer_later(event))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)

    async def _answer_later(self, event: BaresipEvent) -> None:
        await asyncio.sleep(self.answer_delay)
        try:
            await self.answer()
        except BaresipError as error:
            self.answer_failures.append(f"call {event.call_id}: {error}")

    # Waiting -------------------------------------------------------------------------

    async def wait_event(
        self, event_type: str, timeout: float = 5.0, *, count: int = 1
    ) -> BaresipEvent:
        """Wait until `count` events of `event_type` have arrived, and return the last of them."""

        def matching() -> list[BaresipEvent]:
            return [event for event in self._events if event.type == event_type]

        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(
                    lambda: len(matching()) >= count or self._closed_reason is not None
                )
        except TimeoutError:
            raise TimeoutError(
                f"{len(matching())} of {count} {event_type} after {timeout} s; {self._summary()}"
            ) from None
        found = matching()
        if len(found) < count:
            raise BaresipError(f"{len(found)} of {count} {event_type}; {self._summary()}")
        return found[count - 1]

    async def wait_registered(self, timeout: float = 5.0) -> BaresipEvent:
        """Wait for the registration's outcome: REGISTER_OK, or BaresipError on REGISTER_FAIL."""
        outcomes = ("REGISTER_OK", "REGISTER_FAIL")

        def outcome() -> BaresipEvent | None:
            return next((event for event in self._events if event.type in outcomes), None)

        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(
                    lambda: outcome() is not None or self._closed_reason is not None
                )
        except TimeoutError:
            raise TimeoutError(f"not registered after {timeout} s; {self._summary()}") from None
        event = outcome()
        if event is None or event.type != "REGISTER_OK":
            detail = "no outcome" if event is None else f"REGISTER_FAIL {event.param!r}"
            raise BaresipError(f"{self.aor} did not register: {detail}; {self._summary()}")
        return event

    def _summary(self) -> str:
        events = ", ".join(f"{event.type}({event.param or ''})" for event in self._events)
        lines = [f"events: [{events}]"]
        if self._closed_reason is not None:
            lines.append(self._closed_reason)
        lines.extend(self.answer_failures)
        lines.append(f"log {self.log_path}:\n{self.log_tail()}")
        return "\n".join(lines)


# Netstrings (djb): length ":" payload "," ------------------------------------------


def encode_netstring(payload: bytes) -> bytes:
    return str(len(payload)).encode() + b":" + payload + b","


async def read_netstring(reader: asyncio.StreamReader) -> bytes:
    """Read one netstring and return its payload; ValueError when the framing is broken."""
    length = (await reader.readuntil(b":"))[:-1]
    if not length.isdigit() or len(length) > _MAX_NETSTRING_DIGITS:
        raise ValueError(f"bad netstring length {length[:20]!r}")
    framed = await reader.readexactly(int(length) + 1)
    if framed[-1:] != b",":
        raise ValueError("netstring not terminated by ','")
    return framed[:-1]


# Configuration -----------------------------------------------------------------------


def _outbound_uri(registrar: str, transport: Transport) -> str:
    """`registrar` with ";transport=<transport>"; ValueError if it names another transport."""
    if not registrar.startswith(("sip:", "sips:")) or any(c in registrar for c in '"<> '):
        raise ValueError(f"registrar must be a SIP URI: {registrar!r}")
    named = _TRANSPORT_PARAMETER.search(registrar)
    if named is None:
        return f"{registrar};transport={transport}"
    if named[1].lower() != transport:
        raise ValueError(f"registrar {registrar!r} names another transport than {transport!r}")
    return registrar


def render_config(*, control_port: int, ca_file: Path | None) -> str:
    """baresip's `config`: loopback only, no sound card, ctrl_tcp on `control_port`."""
    lines = [
        "poll_method\tepoll",
        "net_interface\t127.0.0.1",
        f"sip_listen\t{HOST}:0",
        *([f"sip_cafile\t{ca_file}"] if ca_file is not None else []),
        f"dns_server\t{HOST}:53",
        "call_local_timeout\t120",
        "call_max_calls\t4",
        "audio_source\taubridge,fixture",
        "audio_player\taubridge,fixture",
        "audio_alert\taubridge,alert",
        "rtp_stats\tno",
        f"module_path\t{MODULE_PATH}",
        "module\tg711.so",
        "module\taubridge.so",
        "module_app\tmenu.so",
        "module_app\tctrl_tcp.so",
        f"ctrl_tcp_listen\t{HOST}:{control_port}",
    ]
    return "\n".join(lines) + "\n"


def _signal_group(process_group: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process_group, signum)
