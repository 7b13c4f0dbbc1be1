"""sipp as a scripted SIP peer for tests, on loopback.

`SippServer` runs a UAS scenario (tests/peers/scenarios/reg_*.xml: a
registrar that misbehaves in one precise way) on a free UDP or TCP port of
127.0.0.1 and returns once sipp has bound it.  `run_sipp_client` runs a UAC
scenario against a target and returns when sipp exits.  Both keep sipp's
traces in a working directory:

- `-trace_msg -message_file messages.log`: every message sent and received,
  written as it happens, so a test can count the REGISTERs a server got
  while it runs (`SippServer.received`);
- `-trace_stat -stf stats.csv -fd 1`: the counters, one CSV line a second
  and a final line at exit (`SippStats`);
- `-trace_err -error_file errors.log`: unexpected messages, aborted calls;
- stdout: the final screen sipp prints when it ends.

sipp keys a scenario run (a "call") by Call-ID: a REGISTER with a new
Call-ID starts the scenario from its first message.

sipp's own exit codes: 0 every call succeeded, 1 at least one call failed,
97 exit on an internal command (also: its -timeout ran out), 99 normal exit
without any call processed, 255 fatal error, 254 fatal error binding a
socket.  `SippServer.stop` interrupts sipp with SIGINT, after which it
writes its final statistics and exits; a call still in progress then
counts as neither successful nor failed.
"""

import asyncio
import contextlib
import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from tests.peers.loopback import HOST, free_port, is_bound, tail

SIPP = "sipp"
SCENARIOS = Path(__file__).parent / "scenarios"

# Scenarios compiled into sipp, selected with -sn instead of -sf.
BUILT_IN_SCENARIOS = frozenset(
    {
        "uac",
        "uas",
        "regexp",
        "branchc",
        "branchs",
        "uac_pcap",
        "3pcc-C-A",
        "3pcc-C-B",
        "3pcc-A",
        "3pcc-B",
    }
)

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
_POLL_INTERVAL = 0.05

# A scenario's INVITE from bob to [service]@example.test with an audio offer, as the
# text inside a <send> element's CDATA.
CALLER_INVITE = """\
      INVITE sip:[service]@example.test SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      From: "Bob Caller" <sip:bob@example.test>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@example.test>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:bob@[local_ip]:[local_port];transport=[transport]>
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=bob 2890844526 2890844526 IN IP4 [local_ip]
      s=-
      c=IN IP4 [local_ip]
      t=0 0
      m=audio [auto_media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000
"""

SippTransport = Literal["udp", "tcp"]
_TRANSPORT_MODE: dict[SippTransport, str] = {"udp": "u1", "tcp": "t1"}
_SOCKET_KIND: dict[SippTransport, socket.SocketKind] = {
    "udp": socket.SOCK_DGRAM,
    "tcp": socket.SOCK_STREAM,
}


class SippError(RuntimeError):
    """sipp could not be started, or did not finish in time."""


@dataclass(frozen=True)
class SipMessage:
    """One SIP message as sipp traced it.

    `at` is when sipp sent or received it, as a `time.time()` value (the
    trace's local-time stamp), or None for a message not read from a trace.
    """

    direction: Literal["sent", "received"]
    transport: str
    text: str
    at: float | None = None

    @property
    def start_line(self) -> str:
        return self.text.split("\r\n", 1)[0]

    @property
    def method(self) -> str | None:
        """The method of a request; None for a response."""
        first = self.start_line.split(" ", 1)[0]
        return None if first.startswith("SIP/") else first

    @property
    def status(self) -> int | None:
        """The status code of a response; None for a request."""
        parts = self.start_line.split(" ", 2)
        return int(parts[1]) if parts[0].startswith("SIP/") else None

    def headers(self, name: str) -> list[str]:
        """Values of every header field called `name` (case-insensitive, long form only)."""
        head = self.text.split("\r\n\r\n", 1)[0]
        wanted = name.lower()
        values = []
        for line in head.split("\r\n")[1:]:
            field, _, value = line.partition(":")
            if field.strip().lower() == wanted:
                values.append(value.strip())
        return values

    def header(self, name: str) -> str | None:
        """The first value of header field `name`, or None."""
        values = self.headers(name)
        return values[0] if values else None


@dataclass(frozen=True)
class SippStats:
    """sipp's cumulative counters at exit, from the last line of its -stf file."""

    successful_calls: int
    failed_calls: int
    total_calls: int
    counters: Mapping[str, str]


@dataclass(frozen=True)
class SippResult:
    """What a finished sipp run left behind."""

    returncode: int
    stats: SippStats
    messages: tuple[SipMessage, ...]
    errors: str
    screen: str

    def received(self, method: str | None = None) -> list[SipMessage]:
        """Requests sipp received (of `method` if given), retransmissions included."""
        return _received(self.messages, method)


class SippServer:
    """sipp running a UAS scenario on 127.0.0.1.

    `scenario` is a file name in tests/peers/scenarios ("reg_423.xml"), a
    path, or a scenario built into sipp ("uas").  `keys` become
    `-key NAME VALUE` ([NAME] in the scenario's messages), `variables`
    become `-set NAME VALUE` (scenario global variables).  With
    `max_calls`, sipp exits by itself once that many calls (Call-IDs) have
    run through the scenario, and `finished()` waits for that: its
    statistics then count every call.  `stop()` interrupts sipp instead,
    and a call whose last message went out just before may not be counted
    yet.  sipp ends on its own after `timeout` seconds if nobody stops it.
    """

    def __init__(
        self,
        scenario: str | Path,
        *,
        transport: SippTransport = "udp",
        keys: Mapping[str, str] | None = None,
        variables: Mapping[str, str] | None = None,
        max_calls: int | None = None,
        timeout: float = 120.0,
        workdir: Path | None = None,
    ):
        self.scenario = scenario
        self.max_calls = max_calls
        self.transport = transport
        self.keys = dict(keys or {})
        self.variables = dict(variables or {})
        self.timeout = timeout
        self._requested_workdir = workdir
        self._workdir: Path | None = None
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._result: SippResult | None = None

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise RuntimeError("SippServer has not been entered")
        return self._workdir

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("SippServer has not been entered")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return HOST, self.port

    @property
    def uri(self) -> str:
        """A SIP URI that reaches the scenario, e.g. for a registrar or outbound proxy setting."""
        return f"sip:{HOST}:{self.port};transport={self.transport}"

    @property
    def result(self) -> SippResult:
        """The outcome, available once the server has stopped."""
        if self._result is None:
            raise RuntimeError("SippServer has not stopped yet")
        return self._result

    def messages(self) -> list[SipMessage]:
        """Every message traced so far."""
        return _read_messages(self.workdir / "messages.log")

    def received(self, method: str | None = None) -> list[SipMessage]:
        """Requests received so far (of `method` if given), retransmissions included."""
        return _received(self.messages(), method)

    async def wait_for_requests(
        self,
        method: str,
        count: int,
        timeout: float = 5.0,
    ) -> list[SipMessage]:
        """Wait until at least `count` `method` requests have arrived, and return them all."""
        deadline = time.monotonic() + timeout
        while len(requests := self.received(method)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(requests)} of {count} {method} after {timeout} s")
            await asyncio.sleep(_POLL_INTERVAL)
        return requests

    async def __aenter__(self) -> Self:
        if self._requested_workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="sipp-"))
        else:
            self._workdir = self._requested_workdir
            self._workdir.mkdir(parents=True, exist_ok=True)
        try:
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
        if self._process is not None:
            await self.stop()
        if self._requested_workdir is None and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    async def _start(self) -> None:
        kind = _SOCKET_KIND[self.transport]
        self._port = free_port(kind)
        command = [
            *_scenario_arguments(self.scenario),
            "-t", _TRANSPORT_MODE[self.transport],
            "-p", str(self._port),
            "-timeout", _milliseconds(self.timeout),
            *_value_arguments("-key", self.keys),
            *_value_arguments("-set", self.variables),
            *(["-m", str(self.max_calls)] if self.max_calls is not None else []),
        ]  # fmt: skip
        self._process = _spawn(command, self.workdir)
        deadline = time.monotonic() + START_TIMEOUT
        while not is_bound(self._port, kind):
            if self._process.poll() is not None or time.monotonic() > deadline:
                result = await self.stop()
                raise SippError(
                    f"sipp did not bind {self.transport} port {self._port} "
                    f"(exit status {result.returncode}):\n{_diagnostics(self.workdir)}"
                )
            await asyncio.sleep(_POLL_INTERVAL)

    async def finished(
        self,
        timeout: float = 5.0,
    ) -> SippResult:
        """Wait for sipp to exit by itself (after `max_calls` calls) and return the result."""
        process = self._process
        if process is not None:
            try:
                await asyncio.to_thread(process.wait, timeout)
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"sipp still running after {timeout} s") from None
        return await self.stop()

    async def stop(self) -> SippResult:
        """Interrupt sipp, wait for it to write its statistics, and return the result.

        A sipp that ignores SIGINT for STOP_TIMEOUT seconds is killed, and
        its result has returncode -9.
        """
        process, self._process = self._process, None
        if process is None:
            return self.result
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGINT)
        returncode = await _wait(process, STOP_TIMEOUT)
        self._result = _collect(returncode, self.workdir)
        return self._result


async def run_sipp_client(
    scenario: str | Path,
    target: tuple[str, int],
    *,
    transport: SippTransport = "udp",
    service: str | None = None,
    arguments: Sequence[str] = (),
    calls: int = 1,
    timeout: float = 15.0,
    workdir: Path | None = None,
) -> SippResult:
    """Run a UAC scenario against `target` until `calls` calls have ended, and return the result.

    `scenario` is a file name in tests/peers/scenarios, a path, or a
    built-in scenario ("uac").  `service` is the user part sipp puts in the
    Request-URI ([service], -s).  `arguments` are passed to sipp as they are
    (e.g. "-au", "alice", "-ap", "secret").  sipp gives up after `timeout`
    seconds and then exits with a failure status.
    """
    own_workdir = workdir is None
    directory = Path(tempfile.mkdtemp(prefix="sipp-client-")) if workdir is None else workdir
    directory.mkdir(parents=True, exist_ok=True)
    host, port = target
    command = [
        f"{host}:{port}",
        *_scenario_arguments(scenario),
        "-t", _TRANSPORT_MODE[transport],
        "-p", str(free_port(_SOCKET_KIND[transport])),
        "-m", str(calls),
        "-timeout", _milliseconds(timeout),
        "-timeout_error",
        *(["-s", service] if service is not None else []),
        *arguments,
    ]  # fmt: skip
    try:
        process = _spawn(command, directory)
        returncode = await _wait(process, timeout + STOP_TIMEOUT)
        if returncode == -signal.SIGKILL:
            raise SippError(
                f"sipp outlived its -timeout {timeout}s and was killed:\n" + _diagnostics(directory)
            )
        return _collect(returncode, directory)
    finally:
        if own_workdir:
            shutil.rmtree(directory, ignore_errors=True)


def scenario_path(name: str | Path) -> Path:
    """Resolve a scenario name: a bare file name is looked up in tests/peers/scenarios."""
    path = Path(name)
    if not path.is_absolute() and path.parent == Path("."):
        path = SCENARIOS / path
    if not path.is_file():
        raise FileNotFoundError(f"no sipp scenario at {path}")
    return path


def _scenario_arguments(scenario: str | Path) -> list[str]:
    if isinstance(scenario, str) and scenario in BUILT_IN_SCENARIOS:
        return ["-sn", scenario]
    return ["-sf", str(scenario_path(scenario))]


def _milliseconds(seconds: float) -> str:
    """A duration in sipp's notation, e.g. "1500ms"."""
    return f"{round(seconds * 1000)}ms"


def _value_arguments(option: str, values: Mapping[str, str]) -> list[str]:
    return [item for name, value in values.items() for item in (option, name, value)]


def _spawn(arguments: Sequence[str], workdir: Path) -> subprocess.Popen[bytes]:
    """Start sipp in its own process group with traces in `workdir`."""
    command = [
        SIPP,
        *arguments,
        "-i", HOST,
        "-bind_local",
        "-ci", HOST,
        "-cp", str(free_port(socket.SOCK_DGRAM)),  # the default, 8888, clashes between sipps
        "-nostdin",
        "-trace_msg", "-message_file", str(workdir / "messages.log"),
        "-trace_stat", "-stf", str(workdir / "stats.csv"), "-fd", "1",
        "-trace_err", "-error_file", str(workdir / "errors.log"),
    ]  # fmt: skip
    (workdir / "command.txt").write_text(" ".join(command) + "\n")
    with (workdir / "screen.log").open("wb") as screen:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=screen,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,
        )


async def _wait(process: subprocess.Popen[bytes], limit: float) -> int:
    """Wait for sipp to exit and return its status; kill it if it still runs after `limit` s."""
    try:
        return await asyncio.to_thread(process.wait, limit)
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGKILL)
        return await asyncio.to_thread(process.wait, STOP_TIMEOUT)


def _signal_group(process_group: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process_group, signum)


def _collect(returncode: int, workdir: Path) -> SippResult:
    errors_path = workdir / "errors.log"
    return SippResult(
        returncode=returncode,
        stats=read_stats(workdir / "stats.csv"),
        messages=tuple(_read_messages(workdir / "messages.log")),
        errors=errors_path.read_text(errors="replace") if errors_path.exists() else "",
        screen=tail(workdir / "screen.log", 200),
    )


def _diagnostics(workdir: Path) -> str:
    return f"screen:\n{tail(workdir / 'screen.log')}\nerrors:\n{tail(workdir / 'errors.log')}"


def _received(messages: Sequence[SipMessage], method: str | None) -> list[SipMessage]:
    return [
        message
        for message in messages
        if message.direction == "received"
        and message.method is not None
        and (method is None or message.method == method)
    ]


# sipp's -message_file: each message is preceded by a separator line of 47
# dashes and the local time ("2026-11-21 09:38:07.940350"), then "UDP
# message received [436] bytes :" or "UDP message sent (465 bytes):", an
# empty line, the message with its CRLF line ends, and one more LF.
_TRACE_HEADER = re.compile(r"(?P<transport>\S+) message (?P<direction>sent|received) ")
_SEPARATOR = "-" * 47 + " "
_TRACE_TIME = "%Y-%m-%d %H:%M:%S.%f"


def _read_messages(path: Path) -> list[SipMessage]:
    if not path.exists():
        return []
    messages = []
    # Read bytes: text mode would turn the messages' CRLF line ends into LF.
    for entry in ("\n" + path.read_bytes().decode(errors="replace")).split("\n" + _SEPARATOR):
        stamp, _, rest = entry.partition("\n")
        header, _, text = rest.partition("\n\n")
        match = _TRACE_HEADER.match(header)
        if match is None:
            continue
        text = text.rstrip("\n")
        if text.endswith("\r"):
            text += "\n"
        direction: Literal["sent", "received"] = "sent"
        if match["direction"] == "received":
            direction = "received"
        at = datetime.strptime(stamp.strip(), _TRACE_TIME).timestamp()
        messages.append(
            SipMessage(direction=direction, transport=match["transport"], text=text, at=at)
        )
    return messages


def read_stats(path: Path) -> SippStats:
    """Read the final (cumulative) counters; all zero when sipp wrote none."""
    rows = list(csv.reader(path.read_text().splitlines(), delimiter=";")) if path.exists() else []
    if len(rows) < 2:
        return SippStats(successful_calls=0, failed_calls=0, total_calls=0, counters={})
    counters = dict(zip(rows[0], rows[-1], strict=False))
    return SippStats(
        successful_calls=int(counters["SuccessfulCall(C)"]),
        failed_calls=int(counters["FailedCall(C)"]),
        total_calls=int(counters["TotalCallCreated"]),
        counters=counters,
    )
