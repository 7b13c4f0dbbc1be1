"""Bindings held against a local Kamailio: memory per binding, CPU per 1,000 refreshes.

    python bench/bindings.py [--bindings 10000] [--transports udp tls] [--window 90]

For each transport it starts Kamailio (the test fixture, on loopback), adds
N bindings with 60 s registrations (refreshed at 45-54 s), waits until all
are registered, and then watches a window of refreshes.  Reported:

* RSS per binding: growth of this process's resident set from before the
  bindings were added to when all were registered, divided by N;
* CPU per 1,000 refreshes: this process's CPU seconds over the window per
  1,000 REGISTER requests sent in it (digest retries included), and the
  same for Kamailio's processes, with the ratio;
* for TLS, memory per connection: K connections opened with sipis's TLS
  flow and K with asyncio's own TLS transport, in the same process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sipis.sip.registration import Backoff, RegistrationState
from sipis.sip.transaction import DEFAULT_TIMERS
from sipis.transport.stream import open_stream
from tests.peers.kamailio import Kamailio
from tests.peers.relay import account, running_relay

PASSWORD = "bench-pw"  # noqa: S105 - the benchmark registrar's users
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def group_cpu_seconds(group: int) -> float:
    """User + system CPU of every process in a process group."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group:
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


async def hold_bindings(kamailio: Kamailio, transport: str, count: int, window: float) -> None:
    async with running_relay(
        ca_file=str(kamailio.ca_certificate), timers=DEFAULT_TIMERS, backoff=Backoff()
    ) as relay:
        before = rss_bytes()
        ramp = count / 1000  # 1,000 new bindings per second
        for i in range(count):
            config = account(f"u{i}", PASSWORD, kamailio.uri(transport), expires=60)  # type: ignore[arg-type]
            relay.bindings.add(f"u{i}", config, delay=ramp * i / count)
        start = time.monotonic()
        while True:
            registered = sum(
                b.session.state is RegistrationState.REGISTERED for b in relay.bindings
            )
            if registered == count:
                break
            if time.monotonic() - start > ramp + 120:
                raise SystemExit(f"only {registered} of {count} registered")
            await asyncio.sleep(0.5)
        took = time.monotonic() - start
        rss = rss_bytes() - before
        sent_before = sum(b.session.cseq for b in relay.bindings)
        cpu_before = time.process_time()
        kam_before = group_cpu_seconds(kamailio.pid)
        await asyncio.sleep(window)
        cpu = time.process_time() - cpu_before
        kam = group_cpu_seconds(kamailio.pid) - kam_before
        sent = sum(b.session.cseq for b in relay.bindings) - sent_before
        failed = sum(b.session.state is not RegistrationState.REGISTERED for b in relay.bindings)
        per_k = 1000 / sent if sent else float("nan")
        print(
            f"\n{transport.upper()}: {count:,} bindings registered in {took:.1f} s "
            f"over {relay.transport.connections} stream connection(s)"
        )
        print(f"  RSS per binding            {rss / count:8.0f} B   ({rss / 2**20:.1f} MiB total)")
        print(
            f"  REGISTERs in {window:.0f} s window   {sent:8,d}   ({sent / window:.0f}/s, "
            f"{failed} not registered at the end)"
        )
        print(
            f"  CPU per 1,000 REGISTERs    sipis {cpu * per_k:6.3f} s   "
            f"Kamailio {kam * per_k:6.3f} s   ratio {cpu / kam if kam else float('nan'):.2f}"
        )


async def tls_connection_memory(kamailio: Kamailio, count: int) -> None:
    context = ssl.create_default_context(cafile=str(kamailio.ca_certificate))
    host, port = kamailio.address("tls")

    def ignore(*_: object) -> None:
        return None

    async def ours() -> list[object]:
        return [
            await open_stream(
                host,
                port,
                ignore,
                tls=context,
                server_name="registrar.test",
                keepalive=None,
                timeout=5,
            )
            for _ in range(count)
        ]

    async def asyncio_ssl() -> list[object]:
        loop = asyncio.get_running_loop()
        out: list[object] = []
        for _ in range(count):
            transport, _ = await loop.create_connection(
                asyncio.Protocol, host, port, ssl=context, server_hostname="registrar.test"
            )
            transport.write(b"\r\n\r\n")
            out.append(transport)
        return out

    results = {}
    for name, opener in (("sipis TLS flow", ours), ("asyncio TLS transport", asyncio_ssl)):
        before = rss_bytes()
        held = await opener()
        await asyncio.sleep(1.0)
        results[name] = (rss_bytes() - before) / count
        for item in held:
            item.close()  # type: ignore[attr-defined]
        await asyncio.sleep(0.5)
    print(f"\nTLS connections to Kamailio, {count} each:")
    for name, per in results.items():
        print(f"  {name:<24} {per / 1024:8.1f} KiB per connection")
    ours_kib, theirs_kib = results.values()
    print(f"  ratio sipis/asyncio      {ours_kib / theirs_kib:8.2f}")


async def run_one(transport: str, args: argparse.Namespace) -> None:
    users = {f"u{i}": PASSWORD for i in range(args.bindings)}
    with tempfile.TemporaryDirectory() as tmp:
        async with Kamailio(users, min_expires=60, workdir=Path(tmp)) as kamailio:
            if transport == "tls-connections":
                await tls_connection_memory(kamailio, args.tls_connections)
            else:
                await hold_bindings(kamailio, transport, args.bindings, args.window)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bindings", type=int, default=10_000)
    parser.add_argument("--transports", nargs="+", default=["udp", "tls"])
    parser.add_argument("--window", type=float, default=90.0)
    parser.add_argument("--tls-connections", type=int, default=300)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        asyncio.run(run_one(args.one, args))
        return
    # Each measurement in a fresh process, so no run inherits another's freed memory.
    runs = [*args.transports, *(["tls-connections"] if args.tls_connections else [])]
    for run in runs:
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", run], check=True)


if __name__ == "__main__":
    main()
