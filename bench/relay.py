"""Calls relayed to apps on the device port: throughput, and one call's latency through a push.

    python bench/relay.py [--bindings 1000] [--calls 30000] [--concurrent 50] [--talk 0.1]

Kamailio (the test fixture, on loopback) is the provider's registrar and
proxy; a local APNs runs in a process of its own (bench/apns_server.py,
announcing each push as it arrives); the relay runs in this process with
APNs token auth against it.  N iOS instances are created, each with one
account (u0 .. uN-1, 300 s registrations) and a payload key, so every push
is sealed as in production.  Kamailio is told of more users than that
(``--kamailio-shm``): the fixture sizes its shared memory from its users,
and the transactions of several hundred calls a second outgrow the 64 MB
that 1,000 users would give it.

A. Throughput.  One sipp registers all N apps on the device port from one
UDP source port (digest: instance id and secret, from an injection file)
and exits; a sipp UAS then takes that port and answers every call the
relay hands it: 180, 200, ACK, the caller's BYE, 200.  A caller sipp calls
u0 .. uN-1 in turn through Kamailio, ``--concurrent`` calls at a time,
``--calls`` in all, each talking ``--talk`` seconds before the caller
hangs up.  Over the caller's run it prints calls relayed per second
(successful calls over the run's wall time), successful and failed calls,
CPU per call of this process (registration refreshes and the push every
call still makes included) and of Kamailio's processes, with the ratio,
and this process's full garbage collections: each stops the event loop,
for longer the more transactions the relay keeps (over UDP Timers J, L
and M keep one for 32 s after it ends, so the heap grows through a run's
first ~32 s).

B. One call through a push.  Once the relay holds no transaction any more,
one more instance (user uN) is created, with no app on the device port.
A caller sipp calls it; once its push reaches the local APNs an app sipp
REGISTERs (401, then digest), answers the call it is handed (180, 200),
takes the ACK, talks, and hangs up with a BYE.  From both sipps' message
traces and the push's arrival it prints, for every hop that crosses the
relay, the time from one end to the other, and their sum: an upper bound
of the relay's share, since each hop also holds Kamailio's work and
loopback.  The time the two ends take themselves (the app waking and
answering, the talk, the caller's ACK and 200) is printed apart.  By then
the relay's APNs connection has been closed for idleness (aioapns closes
one after 10 s), so the push opens a new one, as the first call after a
quiet spell does.  sipp stamps a message it sends once the send returned
and one it receives when it gets to it, so a hop of well under a
millisecond can come out slightly negative when the sender was preempted
by the processes its datagram woke.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import re
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bindings import group_cpu_seconds
from bench.calls import PASSWORD, wait_registered
from sipis.app import Relay, start_relay, tune_garbage_collection
from sipis.instances import AccountSpec, InstanceSpec, PushSpec
from sipis.sip.registration import RegistrationState
from tests.peers.kamailio import Kamailio
from tests.peers.loopback import HOST, free_port, is_bound
from tests.peers.relay import relay_config
from tests.peers.sipp import SipMessage, SippStats, read_stats, run_sipp_client, scenario_path

HERE = Path(__file__).resolve().parent
SCENARIOS = HERE / "scenarios"
REGISTER_RATE = 200  # device REGISTERs started per second
# The app stays registered this long in B: the whole call fits in it.
APP_REGISTERED_MS = 3000
STOP_TIMEOUT = 5.0
USERS_PER_SHM_MB = 40  # the Kamailio fixture's -m: one MB of shared memory per 40 users


def instance_spec(kamailio: Kamailio, index: int) -> InstanceSpec:
    """An iOS instance whose one account registers u<index> at Kamailio for 300 s."""
    account = AccountSpec(
        id="work",
        aor=f"sip:u{index}@example.test",
        auth_username=f"u{index}",
        password=PASSWORD,
        registrar=kamailio.uri("udp"),
        expires=300,
    )
    return InstanceSpec(
        app_id="com.example.phone",
        platform="ios",
        push=PushSpec(
            call_token=call_token(index), other_token=call_token(index)[::-1], environment="sandbox"
        ),
        accounts=(account,),
        payload_key=index.to_bytes(32, "big"),
    )


def call_token(index: int) -> str:
    return f"{index:064x}"


# -- the local APNs, announcing pushes ------------------------------------------------------


class ApnsProcess:
    """bench/apns_server.py --announce, each push's arrival kept as it is announced."""

    def __init__(self, process: asyncio.subprocess.Process, info: dict[str, Any]) -> None:
        self.info = info
        self._process = process
        self._arrivals: dict[str, list[float]] = {}
        self._announced = asyncio.Event()
        self._summary: dict[str, Any] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, directory: Path) -> ApnsProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "apns_server.py"),
            str(directory),
            "--announce",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            return cls(process, json.loads(line))
        except BaseException:
            process.kill()
            await process.wait()
            raise

    async def _read(self) -> None:
        stdout = self._process.stdout
        assert stdout is not None
        async for line in stdout:
            record = json.loads(line)
            if "push" in record:
                self._arrivals.setdefault(record["push"], []).append(record["arrived"])
                self._announced.set()
            else:
                self._summary = record

    async def arrival(self, token: str, timeout: float) -> float:
        """When the first push to ``token`` arrived (``time.time()``)."""
        async with asyncio.timeout(timeout):
            while token not in self._arrivals:
                self._announced.clear()
                await self._announced.wait()
        return self._arrivals[token][0]

    async def stop(self) -> dict[str, Any]:
        """Close its standard input and return its summary; kill it if it does not end."""
        assert self._process.stdin is not None
        self._process.stdin.close()
        try:
            await asyncio.wait_for(self._process.wait(), 30)
        except TimeoutError:
            self._process.kill()
            await self._process.wait()
        await self._reader
        return self._summary


# -- sipp without message traces (throughput) ---------------------------------------------


def sipp_command(workdir: Path, arguments: Sequence[str]) -> list[str]:
    """sipp with statistics and errors (no messages) traced into ``workdir``, made here."""
    workdir.mkdir(parents=True)
    return [
        "sipp",
        *arguments,
        "-i", HOST,
        "-cp", str(free_port(socket.SOCK_DGRAM)),
        "-nostdin",
        "-trace_stat", "-stf", str(workdir / "stats.csv"), "-fd", "1",
        "-trace_err", "-error_file", str(workdir / "errors.log"),
    ]  # fmt: skip


@contextlib.asynccontextmanager
async def running_sipp(
    workdir: Path, arguments: Sequence[str]
) -> AsyncIterator[asyncio.subprocess.Process]:
    """sipp in its own process group (its screen in ``workdir``/screen.log), ended on leaving."""
    command = sipp_command(workdir, arguments)
    with (workdir / "screen.log").open("wb") as screen:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=screen,
            stderr=asyncio.subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            await finish_sipp(process, 0)


async def finish_sipp(process: asyncio.subprocess.Process, limit: float) -> int:
    """Wait up to ``limit`` s for sipp to exit by itself, then interrupt it (SIGINT, SIGKILL)."""
    waits: tuple[tuple[signal.Signals | None, float], ...] = (
        (None, limit),
        (signal.SIGINT, STOP_TIMEOUT),
        (signal.SIGKILL, STOP_TIMEOUT),
    )
    for signum, wait in waits:
        if signum is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)
        try:
            return await asyncio.wait_for(process.wait(), wait)
        except TimeoutError:
            continue
    raise RuntimeError(f"sipp {process.pid} survived SIGKILL")


def failure_reasons(stats: SippStats) -> dict[str, str]:
    return {
        name: value
        for name, value in stats.counters.items()
        if name.startswith("Failed") and name.endswith("(C)") and value != "0"
    }


# -- A: throughput ------------------------------------------------------------------------


async def register_apps(
    relay: Relay, directory: Path, apps: Sequence[tuple[str, str]], port: int
) -> float:
    """Register every app on the device port from UDP ``port``; the seconds it took."""
    apps_file = directory / "apps.csv"
    apps_file.write_text(
        "SEQUENTIAL\n"
        + "".join(
            f'{id_};[authentication username="{id_}" password="{secret}"]\n' for id_, secret in apps
        )
    )
    device_port = relay.device_transport.listening["udp"]
    limit = len(apps) / REGISTER_RATE + 60
    started = time.monotonic()
    arguments = [
        f"{HOST}:{device_port}",
        "-sf", str(SCENARIOS / "device_register.xml"),
        "-inf", str(apps_file),
        "-t", "u1",
        "-p", str(port),
        "-m", str(len(apps)),
        "-r", str(REGISTER_RATE),
        "-timeout", f"{limit:.0f}s",
        "-timeout_error",
    ]  # fmt: skip
    async with running_sipp(directory / "register", arguments) as process:
        await finish_sipp(process, limit + 10)
    took = time.monotonic() - started
    stats = read_stats(directory / "register" / "stats.csv")
    if stats.successful_calls != len(apps) or len(relay.devices) < len(apps):
        raise SystemExit(
            f"{stats.successful_calls} of {len(apps)} device REGISTERs succeeded, "
            f"{len(relay.devices)} devices registered; sipp's failures: {failure_reasons(stats)}"
        )
    return took


@contextlib.asynccontextmanager
async def answering_apps(directory: Path, port: int, limit: float) -> AsyncIterator[None]:
    """A sipp UAS on UDP ``port`` answering every call: 180, 200, ACK, BYE, 200."""
    arguments = [
        "-sf", str(SCENARIOS / "apps_answer.xml"),
        "-t", "u1",
        "-p", str(port),
        "-timeout", f"{limit:.0f}s",
    ]  # fmt: skip
    async with running_sipp(directory / "apps", arguments) as process:
        deadline = time.monotonic() + 10
        while not is_bound(port, socket.SOCK_DGRAM):
            if process.returncode is not None or time.monotonic() > deadline:
                raise SystemExit(f"the apps' sipp did not bind UDP port {port}")
            await asyncio.sleep(0.05)
        yield


class GcPauses:
    """This process's full (generation 2) garbage collections while in the block, and their length.

    A full collection stops the event loop for as long as it walks the
    heap, so its length grows with what the relay holds (ended
    transactions included, until their Timer J, L or M fires).
    """

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._started = 0.0

    def _observe(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._started)

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._observe)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        gc.callbacks.remove(self._observe)


@dataclass(frozen=True)
class Throughput:
    seconds: float
    caller: SippStats
    answered: int
    sipis_cpu: float
    kamailio_cpu: float
    gc_pauses: list[float]


async def run_calls(
    kamailio: Kamailio, directory: Path, args: argparse.Namespace, apps_port: int
) -> Throughput:
    """The caller's run against apps answering on ``apps_port``, with CPU and wall time."""
    callees = directory / "callees.csv"
    callees.write_text("SEQUENTIAL\n" + "".join(f"u{i};\n" for i in range(args.bindings)))
    limit = args.calls / 20 + 60
    host, port = kamailio.address("udp")
    arguments = [
        f"{host}:{port}",
        "-sf", str(SCENARIOS / "call_answered_hang_up.xml"),
        "-inf", str(callees),
        "-t", "u1",
        "-p", str(free_port(socket.SOCK_DGRAM)),
        "-l", str(args.concurrent),
        "-r", str(args.rate),
        "-m", str(args.calls),
        "-d", str(round(args.talk * 1000)),
        "-timeout", f"{limit:.0f}s",
        "-timeout_error",
    ]  # fmt: skip
    async with answering_apps(directory, apps_port, limit + 30):
        cpu_before = time.process_time()
        kamailio_before = group_cpu_seconds(kamailio.pid)
        started = time.monotonic()
        with GcPauses() as collections:
            async with running_sipp(directory / "caller", arguments) as caller:
                await finish_sipp(caller, limit + 10)
        seconds = time.monotonic() - started
        sipis_cpu = time.process_time() - cpu_before
        kamailio_cpu = group_cpu_seconds(kamailio.pid) - kamailio_before
    return Throughput(
        seconds,
        read_stats(directory / "caller" / "stats.csv"),
        read_stats(directory / "apps" / "stats.csv").successful_calls,
        sipis_cpu,
        kamailio_cpu,
        collections.pauses,
    )


async def throughput(
    relay: Relay, kamailio: Kamailio, directory: Path, args: argparse.Namespace
) -> None:
    started = time.monotonic()
    apps = []
    for i in range(args.bindings):
        instance_id, secret, _ = await relay.instances.create(instance_spec(kamailio, i))
        apps.append((instance_id, secret))
    created = time.monotonic() - started
    await wait_registered(relay, args.bindings, limit=120)
    print(
        f"{args.bindings:,} instances created in {created:.1f} s, "
        f"all registered at Kamailio after {time.monotonic() - started:.1f} s"
    )
    apps_port = free_port(socket.SOCK_DGRAM)
    took = await register_apps(relay, directory, apps, apps_port)
    print(f"{len(relay.devices):,} apps registered on the device port in {took:.1f} s")
    result = await run_calls(kamailio, directory, args, apps_port)
    ok, failed = result.caller.successful_calls, result.caller.failed_calls
    if result.caller.total_calls == 0:
        raise SystemExit("the caller's sipp made no call; see its screen.log")
    if failed:
        print(f"  failed calls by sipp's reason: {failure_reasons(result.caller)}")
    per_call = 1000 / max(ok, 1)
    ratio = result.sipis_cpu / result.kamailio_cpu if result.kamailio_cpu else float("nan")
    print(
        f"\nA. {args.concurrent} concurrent calls, {args.talk * 1000:.0f} ms talk, "
        f"BYE from the caller"
    )
    print(
        f"{'calls':>7} {'ok':>7} {'failed':>6} {'answered':>8} {'seconds':>8} {'calls/s':>8} "
        f"{'CPU/call sipis':>15} {'Kamailio':>9} {'ratio':>6}"
    )
    print(
        f"{args.calls:7,d} {ok:7,d} {failed:6d} {result.answered:8,d} {result.seconds:8.1f} "
        f"{ok / result.seconds:8.1f} {result.sipis_cpu * per_call:12.2f} ms "
        f"{result.kamailio_cpu * per_call:6.2f} ms {ratio:6.2f}"
    )
    pauses = result.gc_pauses or [0.0]
    print(
        f"sipis full garbage collections during the run: {len(result.gc_pauses)}, "
        f"longest {max(pauses) * 1000:.0f} ms, {sum(pauses):.1f} s in all"
    )


# -- B: one call through a push -----------------------------------------------------------


@dataclass(frozen=True)
class Traced:
    """A message from a sipp trace, with when sipp sent or received it (``time.time()``)."""

    at: float
    message: SipMessage


# sipp's -message_file: a separator of 47 dashes and the local time
# ("2026-11-21 07:55:12.407322"), then "UDP message sent (465 bytes):" or
# "UDP message received [436] bytes :", an empty line, the message.
_SEPARATOR = "-" * 47 + " "
_TRACE_HEADER = re.compile(r"(?P<transport>\S+) message (?P<direction>sent|received) ")


def read_trace(path: Path) -> list[Traced]:
    traced = []
    for entry in ("\n" + path.read_bytes().decode(errors="replace")).split("\n" + _SEPARATOR):
        stamp, _, rest = entry.partition("\n")
        header, _, text = rest.partition("\n\n")
        match = _TRACE_HEADER.match(header)
        if match is None:
            continue
        text = text.rstrip("\n")
        if text.endswith("\r"):
            text += "\n"
        direction: Literal["sent", "received"] = (
            "received" if match["direction"] == "received" else "sent"
        )
        at = datetime.strptime(stamp.strip(), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        traced.append(Traced(at, SipMessage(direction, match["transport"], text)))
    return traced


def cseq(message: SipMessage) -> tuple[int, str]:
    number, method = (message.header("CSeq") or "0 -").split()
    return int(number), method


def request(method: str, number: int | None = None) -> Callable[[SipMessage], bool]:
    return lambda m: m.method == method and number in (None, cseq(m)[0])


def response(status: int, method: str, number: int | None = None) -> Callable[[SipMessage], bool]:
    return lambda m: m.status == status and cseq(m)[1] == method and number in (None, cseq(m)[0])


def first(
    trace: Sequence[Traced],
    direction: Literal["sent", "received"],
    wanted: Callable[[SipMessage], bool],
    what: str,
) -> float:
    """When the first message of ``trace`` that went ``direction`` and is ``wanted`` did."""
    for item in trace:
        if item.message.direction == direction and wanted(item.message):
            return item.at
    raise SystemExit(f"not in the trace: {what}")


async def quiet(relay: Relay, limit: float) -> tuple[float, int]:
    """Wait until the relay holds no transaction (or ``limit`` s); seconds waited, ones left."""
    started = time.monotonic()
    tables = (relay.clients, relay.inbound.transactions, relay.device_inbound.transactions)
    while True:
        waited = time.monotonic() - started
        left = sum(len(table) for table in tables)
        if not left or waited > limit:
            return waited, left
        await asyncio.sleep(0.5)


async def registered_at_kamailio(relay: Relay, key: str, limit: float) -> None:
    deadline = time.monotonic() + limit
    while relay.bindings.status(key).state is not RegistrationState.REGISTERED:
        if time.monotonic() > deadline:
            raise SystemExit(f"binding {key} not registered after {limit} s")
        await asyncio.sleep(0.05)


async def one_call(
    relay: Relay, kamailio: Kamailio, apns: ApnsProcess, directory: Path, index: int
) -> None:
    waited, left = await quiet(relay, limit=60)
    print(f"\nrelay quiet after {waited:.0f} s ({left} transactions left)")
    instance_id, secret, _ = await relay.instances.create(instance_spec(kamailio, index))
    await registered_at_kamailio(relay, f"{instance_id}/work", limit=30)
    caller_dir, app_dir = directory / "one-caller", directory / "one-app"
    caller = asyncio.create_task(
        run_sipp_client(
            "uac_call_answered.xml",
            kamailio.address("udp"),
            service=f"u{index}",
            timeout=30,
            workdir=caller_dir,
        )
    )
    try:
        pushed = await apns.arrival(call_token(index), timeout=10)
        app = await run_sipp_client(
            "app_register.xml",
            (HOST, relay.device_transport.listening["udp"]),
            service=instance_id,
            arguments=[
                "-au", instance_id,
                "-ap", secret,
                "-oocsf", str(scenario_path("app_answer.xml")),
                "-d", str(APP_REGISTERED_MS),
            ],
            timeout=APP_REGISTERED_MS / 1000 + 10,
            workdir=app_dir,
        )  # fmt: skip
    finally:
        called = await caller
    if called.returncode != 0 or app.returncode != 0:
        raise SystemExit(
            f"the call failed: caller {called.returncode} {called.errors}, "
            f"app {app.returncode} {app.errors}"
        )
    print_latency(
        pushed, read_trace(caller_dir / "messages.log"), read_trace(app_dir / "messages.log")
    )


def print_latency(pushed: float, caller: list[Traced], app: list[Traced]) -> None:
    invite_sent = first(caller, "sent", request("INVITE"), "caller's INVITE")
    register_sent = first(app, "sent", request("REGISTER", 1), "app's REGISTER")
    challenged = first(app, "received", response(401, "REGISTER", 1), "app's 401")
    digest_sent = first(app, "sent", request("REGISTER", 2), "app's REGISTER with digest")
    registered = first(app, "received", response(200, "REGISTER", 2), "app's 200 for REGISTER")
    invite_in = first(app, "received", request("INVITE"), "app's INVITE")
    ringing_out = first(app, "sent", response(180, "INVITE"), "app's 180")
    # The app's 180, not the one the relay sends once it has pushed (Push-Status).
    ringing = response(180, "INVITE")
    ringing_in = first(
        caller, "received", lambda m: ringing(m) and not m.headers("Push-Status"), "caller's 180"
    )
    answer_out = first(app, "sent", response(200, "INVITE"), "app's 200 for INVITE")
    answer_in = first(caller, "received", response(200, "INVITE"), "caller's 200 for INVITE")
    ack_out = first(caller, "sent", request("ACK"), "caller's ACK")
    ack_in = first(app, "received", request("ACK"), "app's ACK")
    bye_out = first(app, "sent", request("BYE"), "app's BYE")
    bye_in = first(caller, "received", request("BYE"), "caller's BYE")
    done_out = first(caller, "sent", response(200, "BYE"), "caller's 200 for BYE")
    done_in = first(app, "received", response(200, "BYE"), "app's 200 for BYE")

    hops = [
        ("INVITE (caller) -> its push at APNs", pushed - invite_sent),
        ("REGISTER (app) -> 401", challenged - register_sent),
        ("REGISTER with digest (app) -> 200", registered - digest_sent),
        ("200 for REGISTER -> INVITE at the app", invite_in - registered),
        ("180 app -> caller", ringing_in - ringing_out),
        ("200 app -> caller", answer_in - answer_out),
        ("ACK caller -> app", ack_in - ack_out),
        ("BYE app -> caller", bye_in - bye_out),
        ("200 for BYE caller -> app", done_in - done_out),
    ]
    ends = [
        ("push at APNs -> app's REGISTER", register_sent - pushed),
        ("401 -> app's REGISTER with digest", digest_sent - challenged),
        ("INVITE at the app -> its 200", answer_out - invite_in),
        ("200 at the caller -> its ACK", ack_out - answer_in),
        ("talk: ACK at the app -> its BYE", bye_out - ack_in),
        ("BYE at the caller -> its 200", done_out - bye_in),
    ]
    total = sum(seconds for _, seconds in hops)
    sequential = total - (ringing_in - ringing_out)  # the 180 overlaps the app's answering
    print("\nB. one call through a push, the app hangs up (ms, one end's trace to the other's)")
    for name, seconds in hops:
        print(f"  {name:<42} {seconds * 1000:8.2f}")
    verdict = "yes" if total < 2 else "NO"
    print(f"  {'sum over the hops crossing sipis':<42} {total * 1000:8.2f}   under 2 s: {verdict}")
    print("  not summed, the ends' own time:")
    for name, seconds in ends:
        print(f"  {name:<42} {seconds * 1000:8.2f}")
    print(
        f"  {'end to end: INVITE -> 200 for BYE':<42} {(done_in - invite_sent) * 1000:8.2f}"
        f"   (hops but the 180 {sequential * 1000:.2f} + the ends' "
        f"{sum(s for _, s in ends) * 1000:.2f})"
    )


# -- the whole bench ----------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> None:
    # The Kamailio fixture sizes its shared memory from its users (users/40 MB, at
    # least 64): users nobody registers make room for the transactions of
    # hundreds of calls a second.
    known = max(args.bindings + 1, args.kamailio_shm * USERS_PER_SHM_MB)
    users = {f"u{i}": PASSWORD for i in range(known)}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        apns_dir = directory / "apns"
        apns_dir.mkdir()
        apns = await ApnsProcess.start(apns_dir)
        server = f"127.0.0.1:{apns.info['port']}"
        try:
            async with Kamailio(users, min_expires=60, workdir=directory / "kamailio") as kamailio:
                config, _ = relay_config(
                    directory / "relay",
                    device={"tls_port": False, "tcp_port": False},
                    push={"ring_timeout": 30.0},
                    apns={
                        "key_file": str(apns_dir / "AuthKey.p8"),
                        "key_id": apns.info["key_id"],
                        "team_id": apns.info["team_id"],
                        "production_server": server,
                        "sandbox_server": server,
                        "ca_file": str(apns_dir / "ca.pem"),
                    },
                    log={"level": "warning"},
                )
                tune_garbage_collection()
                relay = await start_relay(config, api=False)
                try:
                    await throughput(relay, kamailio, directory, args)
                    await one_call(relay, kamailio, apns, directory, args.bindings)
                finally:
                    await relay.close()
        finally:
            served = await apns.stop()
    print(f"\nlocal APNs: {served['pushes']:,} pushes, {served['cpu_seconds']:.1f} CPU s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bindings", type=int, default=1000, help="instances, and apps")
    parser.add_argument("--calls", type=int, default=30_000, help="calls in the throughput run")
    parser.add_argument("--concurrent", type=int, default=50, help="calls at a time")
    parser.add_argument("--rate", type=int, default=1000, help="calls started per second at most")
    parser.add_argument("--talk", type=float, default=0.1, help="seconds each call talks")
    parser.add_argument(
        "--kamailio-shm", type=int, default=256, help="MB of shared memory Kamailio gets"
    )
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
