"""Calls to held bindings: INVITE arrival to the push request written to APNs.

    python bench/calls.py [--bindings 10000] [--rates 100 200 400] [--duration 30]

Kamailio (the test fixture, on loopback) is the registrar and proxy; a
local APNs runs in a process of its own (bench/apns_server.py).  The relay
runs in this process with APNs token auth against it, and N iOS instances
are created, each with one account (u0 .. uN-1, 300 s registrations) and a
payload key, so every push is sealed as in production.  Once all N are
registered, sipp calls them one after another through Kamailio at each
rate in turn for ``--duration`` seconds: INVITE, 180 once the relay has
pushed, ``--ring`` seconds of ringing, CANCEL (which makes the relay send
a cancelled-call push as well), 200, 487, ACK.

Per rate it prints:

* latency from the INVITE's arrival (its server transaction's creation,
  right after the datagram was parsed) to the call push's HTTP/2 request
  written to the APNs connection: p50, p99, max;
* calls/s sustained: call pushes written per second between the first and
  the last, and sipp's successful and failed calls;
* CPU per call of this process (registration refreshes included) and of
  Kamailio's processes, with the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bindings import group_cpu_seconds
from sipis.app import Relay, start_relay, tune_garbage_collection
from sipis.calls import Calls, HeldCall
from sipis.instances import AccountSpec, InstanceSpec, PushSpec
from sipis.push.apns import _ApnsProtocol
from sipis.sip.registration import RegistrationState
from tests.peers.kamailio import Kamailio
from tests.peers.loopback import HOST, free_port
from tests.peers.relay import relay_config
from tests.peers.sipp import read_stats

PASSWORD = "bench-pw"  # noqa: S105 - the benchmark registrar's users
HERE = Path(__file__).resolve().parent
SCENARIO = HERE / "scenarios" / "call_ring_cancel.xml"

# The INVITE arrival time of the call whose push is being sent, in the task sending it.
_invite_arrived: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar(
    "invite_arrived", default=None
)


def time_call_pushes(loop: asyncio.AbstractEventLoop, samples: list[tuple[float, float]]) -> None:
    """Record, per call push, when its request was written to APNs and how long after the INVITE.

    The call push is sent in its own task; the first flush of an HTTP/2
    request inside that task is the call push leaving for APNs.
    """
    push_call: Callable[[Calls, HeldCall], Coroutine[Any, Any, None]] = Calls._push_call
    flush: Callable[[_ApnsProtocol], None] = _ApnsProtocol.flush

    async def timed_push_call(self: Calls, call: HeldCall) -> None:
        times = [call.transaction.arrived]
        _invite_arrived.set(times)
        await push_call(self, call)
        if len(times) == 2:
            samples.append((times[1], times[1] - times[0]))

    def timed_flush(self: _ApnsProtocol) -> None:
        flush(self)
        times = _invite_arrived.get()
        if times is not None and len(times) == 1:
            times.append(loop.time())

    Calls._push_call = timed_push_call  # type: ignore[method-assign]
    _ApnsProtocol.flush = timed_flush  # type: ignore[method-assign,assignment]


def start_apns(directory: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    process = subprocess.Popen(
        [sys.executable, str(HERE / "apns_server.py"), str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    return process, json.loads(process.stdout.readline())


def stop_apns(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = process.communicate("", timeout=30)
    summary: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return summary


async def create_instances(
    relay: Relay, kamailio: Kamailio, count: int, *, expires: int = 300
) -> float:
    started = time.monotonic()
    for i in range(count):
        account = AccountSpec(
            id="work",
            aor=f"sip:u{i}@example.test",
            auth_username=f"u{i}",
            password=PASSWORD,
            registrar=kamailio.uri("udp"),
            expires=expires,
        )
        spec = InstanceSpec(
            app_id="com.example.phone",
            platform="ios",
            push=PushSpec(
                call_token=f"{i:064x}", other_token=f"{i:064x}"[::-1], environment="sandbox"
            ),
            accounts=(account,),
            payload_key=i.to_bytes(32, "big"),
        )
        await relay.instances.create(spec)
    return time.monotonic() - started


async def wait_registered(relay: Relay, count: int, limit: float) -> None:
    deadline = time.monotonic() + limit
    while True:
        registered = sum(b.session.state is RegistrationState.REGISTERED for b in relay.bindings)
        if registered == count:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"only {registered} of {count} registered")
        await asyncio.sleep(0.5)


async def run_calls(
    kamailio: Kamailio, directory: Path, rate: int, calls: int, ring: float
) -> tuple[int, int]:
    """Run sipp at ``rate`` calls/s for ``calls`` calls; (successful, failed)."""
    workdir = directory / f"sipp-{rate}"
    workdir.mkdir()
    host, port = kamailio.address("udp")
    command = [
        "sipp", f"{host}:{port}",
        "-sf", str(SCENARIO),
        "-inf", str(directory / "callees.csv"),
        "-r", str(rate),
        "-m", str(calls),
        "-d", str(round(ring * 1000)),
        "-t", "u1",
        "-i", HOST,
        "-p", str(free_port(socket.SOCK_DGRAM)),
        "-cp", str(free_port(socket.SOCK_DGRAM)),
        "-nostdin",
        "-timeout", f"{calls // rate + 60}s",
        "-timeout_error",
        "-trace_stat", "-stf", str(workdir / "stats.csv"), "-fd", "1",
        "-trace_err", "-error_file", str(workdir / "errors.log"),
    ]  # fmt: skip
    with (workdir / "screen.log").open("wb") as screen:
        process = await asyncio.create_subprocess_exec(
            *command, stdin=subprocess.DEVNULL, stdout=screen, stderr=subprocess.STDOUT, cwd=workdir
        )
        await process.wait()
    stats = read_stats(workdir / "stats.csv")
    if stats.failed_calls:
        reasons = {
            name: value
            for name, value in stats.counters.items()
            if name.startswith("Failed") and name.endswith("(C)") and value != "0"
        }
        print(f"  failed calls at {rate} calls/s by sipp's reason: {reasons}")
    return stats.successful_calls, stats.failed_calls


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def bench(args: argparse.Namespace) -> None:
    users = {f"u{i}": PASSWORD for i in range(args.bindings)}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "callees.csv").write_text(
            "SEQUENTIAL\n" + "".join(f"{user};\n" for user in users)
        )
        apns_dir = directory / "apns"
        apns_dir.mkdir()
        apns, apns_info = start_apns(apns_dir)
        server = f"127.0.0.1:{apns_info['port']}"
        try:
            async with Kamailio(users, min_expires=60, workdir=directory / "kamailio") as kamailio:
                config, _ = relay_config(
                    directory / "relay",
                    push={"ring_timeout": 30.0},
                    apns={
                        "key_file": str(apns_dir / "AuthKey.p8"),
                        "key_id": apns_info["key_id"],
                        "team_id": apns_info["team_id"],
                        "production_server": server,
                        "sandbox_server": server,
                        "ca_file": str(apns_dir / "ca.pem"),
                    },
                    log={"level": "warning"},
                )
                tune_garbage_collection()
                relay = await start_relay(config, api=False)
                try:
                    await measure(relay, kamailio, directory, args)
                finally:
                    await relay.close()
        finally:
            served = stop_apns(apns)
    print(f"\nlocal APNs: {served['pushes']:,} pushes, {served['cpu_seconds']:.1f} CPU s")


async def measure(
    relay: Relay, kamailio: Kamailio, directory: Path, args: argparse.Namespace
) -> None:
    started = time.monotonic()
    took = await create_instances(relay, kamailio, args.bindings)
    await wait_registered(relay, args.bindings, limit=120)
    print(
        f"{args.bindings:,} instances created in {took:.1f} s, "
        f"all registered after {time.monotonic() - started:.1f} s"
    )
    samples: list[tuple[float, float]] = []
    time_call_pushes(asyncio.get_running_loop(), samples)
    print(
        f"\n{'calls/s':>8} {'calls':>7} {'ok':>7} {'failed':>6} {'pushed/s':>9} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'CPU/call sipis':>15} {'Kamailio':>9} "
        f"{'ratio':>6}"
    )
    for rate in args.rates:
        samples.clear()
        calls = rate * args.duration
        cpu_before = time.process_time()
        kam_before = group_cpu_seconds(kamailio.pid)
        ok, failed = await run_calls(kamailio, directory, rate, calls, args.ring)
        await asyncio.sleep(1.0)
        cpu = time.process_time() - cpu_before
        kam = group_cpu_seconds(kamailio.pid) - kam_before
        written = sorted(at for at, _ in samples)
        span = written[-1] - written[0] if len(written) > 1 else float("nan")
        ms = [latency * 1000 for _, latency in samples] or [float("nan")]
        print(
            f"{rate:8d} {calls:7,d} {ok:7,d} {failed:6d} {(len(written) - 1) / span:9.1f} "
            f"{statistics.median(ms):7.2f} {percentile(ms, 0.99):7.2f} {max(ms):7.2f} "
            f"{cpu / max(ok, 1) * 1000:12.2f} ms {kam / max(ok, 1) * 1000:6.2f} ms "
            f"{cpu / kam if kam else float('nan'):6.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bindings", type=int, default=10_000)
    parser.add_argument("--rates", type=int, nargs="+", default=[100, 200, 400])
    parser.add_argument("--duration", type=int, default=30, help="seconds of calls per rate")
    parser.add_argument("--ring", type=float, default=1.0, help="seconds each call rings")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
