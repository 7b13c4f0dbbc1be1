"""Bindings held against a local Kamailio, side by side with Kamailio's own `uac` module.

    python bench/bindings.py [--udp 100000] [--tls 10000] [--expires 600] [--window 180]
                             [--add-rate R] [--uac-timer-interval 1] [--no-uac]
                             [--tls-connections 300]

One Kamailio (the test fixture, on loopback) is the registrar, with digest
users u0 .. uN-1 for sipis and k0 .. kN-1 for a second Kamailio whose `uac`
module keeps the same number of remote registrations from a db_text
`uacreg` table (bench/kamailio_uac.py), the same share of them over TLS.

sipis runs in this process (its bindings manager, transport layer and
resolver, with the relay's garbage-collection tuning, and its long-lived
objects frozen once registered, as `sipis serve` does): it adds ``--udp``
bindings over UDP and ``--tls`` over TLS, interleaved, all asking for
``--expires`` seconds.  TLS bindings share the relay's pooled connection to
the registrar's TLS port; the uac Kamailio's TLS rows share its one TCP
connection the same way.  sipis refreshes a binding at a random 75-90 %
of its granted expiry, the uac module ``expires - 3 - U(0, timer interval)``
seconds after its last registration; each side's first registrations are
spread over one such mean period (sipis: adds at ``--add-rate``, by default
N over 82.5 % of the expiry; uac: its rows' ``reg_delay``), so the
registrar sees a steady rate from the start instead of bursts that recur
every refresh period.

Once every binding is registered and sipis's first refreshes are all
under way (90 % of the expiry after the first add), a ``--window`` of
steady refreshing is watched.  Reported, for sipis and the uac Kamailio:

* memory per registration: growth of the proportional set size (PSS, from
  /proc/PID/smaps_rollup, summed over a process group) from before any
  registration existed to the end of the window, divided by N.  PSS counts
  a shared page once across the processes sharing it, which is fair to
  Kamailio: its registrations live in shared memory mapped by every one of
  its processes.  The uac baseline is a uac Kamailio with the same
  configuration and an empty table, started and stopped before the run.
  sipis's RSS growth and Kamailio's own shared-memory accounting (per
  module: uac's table, db_text's copy of the table, tm's transactions) are
  printed too;
* CPU per 1,000 refreshes: CPU seconds over the window (this process for
  sipis; every process of the group for Kamailio) per 1,000 REGISTERs
  answered 2xx in it, and per 1,000 REGISTERs sent.  The uac module
  never pre-authorizes, so each of its refreshes takes two REGISTERs;
  sipis pre-authorizes with the nonce it was last given, but the
  registrar's nonces live 300 s (Kamailio's default), so with refreshes
  more than 300 s apart sipis's refresh is challenged too;
* the REGISTER rate sustained: refreshes per second over the window, and
  the fewest and most in any 10 s of it;
* sipis bindings not registered at the end, and the registrar's count of
  contacts in its location table and of contacts that ever expired there
  (a registration that lapsed on either side); the registrar's accepted
  REGISTERs over the window should match the sum of both sides' 2xx.

The registrar's CPU per 1,000 REGISTERs it received is printed for
context, with the load average.  Then, in a fresh process (so it inherits
no freed memory), ``--tls-connections`` TLS connections are opened to a
registrar with sipis's TLS flow and as many with asyncio's own TLS
transport, and the memory each takes is compared.
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
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.kamailio_uac import KamailioUac, RemoteRegistration, Transport, refresh_period
from sipis.app import freeze_long_lived, tune_garbage_collection
from sipis.bindings import BindingManager
from sipis.inbound import Inbound
from sipis.sip.message import Message, ParseError
from sipis.sip.registration import Backoff, RegistrationState
from sipis.sip.transaction import DEFAULT_TIMERS
from sipis.transport.flow import Flow
from sipis.transport.layer import TransportLayer, TransportSettings
from sipis.transport.resolver import Resolver
from sipis.transport.stream import open_stream
from tests.peers.kamailio import Kamailio
from tests.peers.loopback import HOST
from tests.peers.relay import account
from tests.peers.tls import issue_server_certificate

PASSWORD = "benchpw"  # noqa: S105 - the benchmark registrar's users
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# sipis refreshes at a uniformly random 75-90 % of the granted expiry
# (sipis.sip.registration): on average at 82.5 %, at the latest at 90 %.
MEAN_REFRESH_FRACTION = 0.825
LAST_REFRESH_FRACTION = 0.9
BUCKET = 10.0  # seconds per count of the steadiness check
# How long registrations may take beyond their spread before the run gives up.
REGISTER_GRACE = 180.0
# The registrar's config for a few hundred thousand users takes tens of seconds to load.
REGISTRAR_START_TIMEOUT = 300.0


# Process accounting -------------------------------------------------------------------


def group_cpu_seconds(group: int) -> float:
    """User + system CPU of every process in a process group."""
    total = 0
    for pid in _group_members(group):
        try:
            fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def pss_bytes(pids: Sequence[int | str]) -> int:
    """Proportional set size summed over processes (/proc/PID/smaps_rollup)."""
    total = 0
    for pid in pids:
        try:
            text = (Path("/proc") / str(pid) / "smaps_rollup").read_text()
        except OSError:
            continue
        total += _kib(text, "Pss:")
    return total


def rss_bytes() -> int:
    return _kib(Path("/proc/self/status").read_text(), "VmRSS:")


def group_pss_bytes(group: int) -> int:
    return pss_bytes(_group_members(group))


def _group_members(group: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group:
            members.append(int(entry.name))
    return members


def _kib(text: str, name: str) -> int:
    for line in text.splitlines():
        if line.startswith(name):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {name}")


# sipis under test ---------------------------------------------------------------------


@dataclass
class ExchangeCounts:
    """REGISTER transactions sipis finished: all of them, and those answered 2xx."""

    sent: int = 0
    accepted: int = 0

    def count(self, status: int | None, _duration: float) -> None:
        self.sent += 1
        if status is not None and 200 <= status < 300:
            self.accepted += 1


@asynccontextmanager
async def sipis_bindings(
    ca_file: str, counts: ExchangeCounts
) -> AsyncIterator[tuple[TransportLayer, BindingManager]]:
    """The relay's bindings manager on loopback, with production timers and backoff."""
    manager: BindingManager | None = None

    def dispatch(message: Message | ParseError, flow: Flow) -> None:
        assert manager is not None
        manager.dispatch(message, flow)

    transport = TransportLayer(
        dispatch, TransportSettings(host="127.0.0.1", udp_port=0, ca_file=ca_file)
    )
    await transport.start()
    inbound = Inbound(timers=DEFAULT_TIMERS)
    manager = BindingManager(
        transport,
        Resolver([("127.0.0.1", 9)], timeout=1.0),
        on_request=inbound.handle,
        on_exchange=counts.count,
        timers=DEFAULT_TIMERS,
        backoff=Backoff(),
    )
    try:
        yield transport, manager
    finally:
        await manager.close()
        inbound.close()
        await transport.close()


# The run ------------------------------------------------------------------------------


@dataclass
class Side:
    """One registering side and what it did over the window."""

    name: str
    registrations: int
    registered_after: float | None = None
    connections: int = 0
    cpu: float = 0.0
    sent: int = 0
    accepted: int = 0
    buckets: list[int] = field(default_factory=list)
    memory: int = 0
    memory_note: str = ""
    not_live: int = 0

    def per_thousand(self, count: int) -> float:
        return self.cpu * 1000 / count if count else float("nan")

    @property
    def memory_per_registration(self) -> float:
        return self.memory / self.registrations


@dataclass
class Context:
    """The registrar's share of the window, and the machine's load."""

    registrar_cpu: float
    registrar_accepted: int
    # contacts in the location table at the end, and how many ever expired there
    location_contacts: int
    location_expired: int
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]


def interleaved(count_udp: int, count_tls: int) -> list[Transport]:
    """UDP and TLS interleaved evenly, so both are spread over the ramp."""
    total = count_udp + count_tls
    return [
        "tls" if (i + 1) * count_tls // total > i * count_tls // total else "udp"
        for i in range(total)
    ]


async def run(args: argparse.Namespace) -> None:
    kinds = interleaved(args.udp, args.tls)
    total = len(kinds)
    users = {f"u{i}": PASSWORD for i in range(total)}
    if args.uac:
        users |= {f"k{i}": PASSWORD for i in range(total)}
    sipis = Side("sipis", total)
    kam = Side("Kamailio uac", total if args.uac else 0)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        started = time.monotonic()
        async with Kamailio(
            users,
            min_expires=60,
            max_expires=max(3600, args.expires),
            workdir=directory / "reg",
            start_timeout=REGISTRAR_START_TIMEOUT,
        ) as registrar:
            print(
                f"registrar up with {len(users):,} users after {time.monotonic() - started:.1f} s",
                flush=True,
            )
            certificate = issue_server_certificate(registrar.ca, directory, [HOST], stem="uac")

            def uac(rows: Sequence[RemoteRegistration], name: str) -> KamailioUac:
                return KamailioUac(
                    rows,
                    expires=args.expires,
                    timer_interval=args.uac_timer_interval,
                    certificate=certificate.chain,
                    private_key=certificate.private_key,
                    workdir=directory / name,
                )

            empty_pss, empty_shm = await uac_baseline(uac([], "uac-empty")) if args.uac else (0, {})
            counts = ExchangeCounts()
            tune_garbage_collection()
            async with sipis_bindings(str(registrar.ca_certificate), counts) as (
                transport,
                bindings,
            ):
                sipis_pss, sipis_rss = pss_bytes(["self"]), rss_bytes()
                uac_rows = uac_registrations(registrar, kinds, args) if args.uac else []
                async with _maybe(uac(uac_rows, "uac") if args.uac else None) as kamailio_uac:
                    first_add = time.monotonic()
                    add_rate = args.add_rate or total / (MEAN_REFRESH_FRACTION * args.expires)
                    add_bindings(bindings, registrar, kinds, args.expires, add_rate)
                    deadline = first_add + max(total / add_rate, args.expires) + REGISTER_GRACE
                    await wait_registered(bindings, kamailio_uac, sipis, kam, first_add, deadline)
                    freeze_long_lived()  # as sipis serve does once its bindings are registered
                    settle = first_add + LAST_REFRESH_FRACTION * args.expires + BUCKET
                    await asyncio.sleep(max(0.0, settle - time.monotonic()))
                    print(f"watching {args.window:.0f} s of refreshes", flush=True)
                    context = await watch(registrar, counts, kamailio_uac, sipis, kam, args.window)
                    sipis.connections = transport.connections
                    sipis.memory = pss_bytes(["self"]) - sipis_pss
                    sipis.memory_note = (
                        f"RSS growth {(rss_bytes() - sipis_rss) / total:.0f} B per registration"
                    )
                    sipis.not_live = sum(
                        b.session.state is not RegistrationState.REGISTERED for b in bindings
                    )
                    if kamailio_uac is not None:
                        kam.memory = group_pss_bytes(kamailio_uac.pid) - empty_pss
                        shm = await kamailio_uac.module_shm()
                        kam.memory_note = shm_note(shm, empty_shm, total)
                        kam.connections = await kamailio_uac.tcp_connections()
    report(args, sipis, kam, context)


async def uac_baseline(empty: KamailioUac) -> tuple[int, dict[str, int]]:
    """PSS and shared memory per module of a uac Kamailio with an empty table."""
    async with empty:
        await asyncio.sleep(2.0)
        return group_pss_bytes(empty.pid), await empty.module_shm()


def uac_registrations(
    registrar: Kamailio, kinds: Sequence[Transport], args: argparse.Namespace
) -> list[RemoteRegistration]:
    """Rows for k0 .. kN-1, first registrations spread evenly over one refresh period."""
    period = refresh_period(args.expires, args.uac_timer_interval)
    print(f"uac rows' first registrations spread over {period:.0f} s", flush=True)
    return [
        RemoteRegistration(
            user=f"k{i}",
            password=PASSWORD,
            domain=registrar.domain,
            registrar=registrar.address(kind),
            transport=kind,
            delay=int(i * period / len(kinds)),
        )
        for i, kind in enumerate(kinds)
    ]


def add_bindings(
    bindings: BindingManager,
    registrar: Kamailio,
    kinds: Sequence[Transport],
    expires: int,
    rate: float,
) -> None:
    """Add u0 .. uN-1, the first REGISTER of each ``1 / rate`` seconds after the last."""
    for i, kind in enumerate(kinds):
        config = account(f"u{i}", PASSWORD, registrar.uri(kind), expires=expires)
        bindings.add(f"u{i}", config, delay=i / rate)
    print(f"adding {len(kinds):,} sipis bindings at {rate:.0f}/s", flush=True)


@asynccontextmanager
async def _maybe(manager: KamailioUac | None) -> AsyncIterator[KamailioUac | None]:
    if manager is None:
        yield None
        return
    async with manager as entered:
        yield entered


async def wait_registered(
    bindings: BindingManager,
    kamailio_uac: KamailioUac | None,
    sipis: Side,
    kam: Side,
    first_add: float,
    deadline: float,
) -> None:
    """Until every registration of both sides is in place; SystemExit past ``deadline``.

    The uac Kamailio counts as registered once the registrar has accepted as
    many of its REGISTERs as it has rows.
    """
    while sipis.registered_after is None or (
        kamailio_uac is not None and kam.registered_after is None
    ):
        now = time.monotonic()
        registered = sum(b.session.state is RegistrationState.REGISTERED for b in bindings)
        if registered == sipis.registrations and sipis.registered_after is None:
            sipis.registered_after = now - first_add
        accepted = 0
        if kamailio_uac is not None:
            accepted = (await kamailio_uac.transactions())["2xx"]
            if accepted >= kam.registrations and kam.registered_after is None:
                kam.registered_after = now - first_add
        if now > deadline:
            raise SystemExit(
                f"after {now - first_add:.0f} s: {registered:,} of {sipis.registrations:,} "
                f"sipis bindings registered, {accepted:,} uac registrations accepted"
            )
        await asyncio.sleep(2.0)


async def watch(
    registrar: Kamailio,
    counts: ExchangeCounts,
    kamailio_uac: KamailioUac | None,
    sipis: Side,
    kam: Side,
    window: float,
) -> Context:
    """Watch ``window`` seconds of refreshes, counting them every ``BUCKET`` seconds."""

    async def uac_counts() -> tuple[int, int]:
        if kamailio_uac is None:
            return 0, 0
        stats = await kamailio_uac.transactions()
        return stats["total_local"], stats["2xx"]

    def uac_cpu() -> float:
        return group_cpu_seconds(kamailio_uac.pid) if kamailio_uac is not None else 0.0

    load_before = os.getloadavg()
    registrar_accepted = await registrar_statistic(registrar, "accepted_regs")
    registrar_cpu = group_cpu_seconds(registrar.pid)
    uac_start, uac_cpu_start = await uac_counts(), uac_cpu()
    sipis_start, sipis_cpu_start = (counts.sent, counts.accepted), time.process_time()
    sipis_last, uac_last = sipis_start[1], uac_start[1]
    started = time.monotonic()
    for step in range(1, max(1, round(window / BUCKET)) + 1):
        await asyncio.sleep(max(0.0, started + step * BUCKET - time.monotonic()))
        sipis.buckets.append(counts.accepted - sipis_last)
        sipis_last = counts.accepted
        if kamailio_uac is not None:
            accepted = (await uac_counts())[1]
            kam.buckets.append(accepted - uac_last)
            uac_last = accepted
    sipis.cpu = time.process_time() - sipis_cpu_start
    sipis.sent, sipis.accepted = counts.sent - sipis_start[0], counts.accepted - sipis_start[1]
    kam.cpu = uac_cpu() - uac_cpu_start
    uac_end = await uac_counts()
    kam.sent, kam.accepted = uac_end[0] - uac_start[0], uac_end[1] - uac_start[1]
    return Context(
        registrar_cpu=group_cpu_seconds(registrar.pid) - registrar_cpu,
        registrar_accepted=await registrar_statistic(registrar, "accepted_regs")
        - registrar_accepted,
        location_contacts=await registrar_statistic(registrar, "location_contacts"),
        location_expired=await registrar_statistic(registrar, "location_expires"),
        load_before=load_before,
        load_after=os.getloadavg(),
    )


def shm_note(shm: dict[str, int], empty: dict[str, int], total: int) -> str:
    """Kamailio's own count of shared memory grown per registration, for the main modules."""
    growth = (
        f"{name} {(shm.get(name, 0) - empty.get(name, 0)) / total:.0f} B"
        for name in ("uac", "db_text", "tm", "core")
    )
    return "shared memory growth per registration: " + ", ".join(growth)


async def registrar_statistic(registrar: Kamailio, name: str) -> int:
    """One of the registrar's statistics ("accepted_regs", "location_contacts", ...)."""
    output = await registrar.rpc("stats.get_statistics", name)
    return int(output.split("=")[1])


# The table -----------------------------------------------------------------------------


def report(args: argparse.Namespace, sipis: Side, kam: Side, context: Context) -> None:
    sides = [sipis, kam] if kam.registrations else [sipis]
    window = len(sipis.buckets) * BUCKET
    width = 16

    def row(label: str, values: Callable[[Side], str]) -> None:
        print(f"  {label:<34}" + "".join(f"{values(side):>{width}}" for side in sides))

    print(f"\n{args.udp:,} UDP + {args.tls:,} TLS registrations per side, {args.expires} s expiry,")
    print(
        f"{window:.0f} s window; load average {_load(context.load_before)} before, "
        f"{_load(context.load_after)} after"
    )
    row("", lambda side: side.name)
    row("all registered after", lambda side: f"{side.registered_after or float('nan'):.0f} s")
    row("stream connections", lambda side: f"{side.connections}")
    row("memory per registration (PSS)", lambda side: f"{side.memory_per_registration:.0f} B")
    row("memory in all (PSS growth)", lambda side: f"{side.memory / 2**20:.1f} MiB")
    row("REGISTERs sent in the window", lambda side: f"{side.sent:,}")
    row("refreshes (2xx) in the window", lambda side: f"{side.accepted:,}")
    row("refreshes per second", lambda side: f"{side.accepted / window:.1f}")
    row(
        f"refreshes per {BUCKET:.0f} s, min-max",
        lambda side: f"{min(side.buckets)}-{max(side.buckets)}",
    )
    row("CPU seconds in the window", lambda side: f"{side.cpu:.2f}")
    row("CPU s per 1,000 refreshes", lambda side: f"{side.per_thousand(side.accepted):.3f}")
    row("CPU s per 1,000 REGISTERs", lambda side: f"{side.per_thousand(side.sent):.3f}")
    for side in sides:
        print(f"  {side.name}: {side.memory_note}")
    if kam.registrations:
        cpu_ratio = sipis.per_thousand(sipis.accepted) / kam.per_thousand(kam.accepted)
        memory_ratio = sipis.memory_per_registration / kam.memory_per_registration
        print(f"  ratio sipis/Kamailio uac: CPU per refresh {cpu_ratio:.2f}, ", end="")
        print(f"memory per registration {memory_ratio:.2f}")
    print(f"  sipis bindings not registered at the end: {sipis.not_live:,}")
    print(
        f"  registrar's location table at the end: {context.location_contacts:,} contacts "
        f"(of {sipis.registrations + kam.registrations:,}), "
        f"{context.location_expired:,} expired there since it started"
    )
    received = sipis.sent + kam.sent
    print(
        f"  registrar: {context.registrar_cpu:.2f} CPU s in the window, "
        f"{context.registrar_cpu * 1000 / max(received, 1):.3f} s per 1,000 REGISTERs received; "
        f"accepted {context.registrar_accepted:,} (sides' 2xx: {sipis.accepted + kam.accepted:,})"
    )


def _load(values: tuple[float, float, float]) -> str:
    return "/".join(f"{value:.2f}" for value in values)


# TLS connection memory ----------------------------------------------------------------


async def tls_connection_memory(count: int) -> None:
    async with Kamailio({"u0": PASSWORD}) as kamailio:
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
    print(f"\nTLS connections to Kamailio, {count} each (RSS growth):")
    for name, per in results.items():
        print(f"  {name:<24} {per / 1024:8.1f} KiB per connection")
    ours_kib, theirs_kib = results.values()
    print(f"  ratio sipis/asyncio      {ours_kib / theirs_kib:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--udp", type=int, default=100_000, help="UDP registrations per side")
    parser.add_argument("--tls", type=int, default=10_000, help="TLS registrations per side")
    parser.add_argument("--expires", type=int, default=600, help="registration expiry, s")
    parser.add_argument("--window", type=float, default=180.0, help="seconds watched")
    parser.add_argument(
        "--add-rate",
        type=float,
        default=0.0,
        help="sipis bindings added per second (default: the steady refresh rate)",
    )
    parser.add_argument("--uac-timer-interval", type=int, default=1, help="reg_timer_interval")
    parser.add_argument("--no-uac", dest="uac", action="store_false", help="sipis alone")
    parser.add_argument("--tls-connections", type=int, default=300)
    parser.add_argument("--one", choices=["bindings", "tls-connections"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one == "bindings":
        asyncio.run(run(args))
    elif args.one == "tls-connections":
        asyncio.run(tls_connection_memory(args.tls_connections))
    else:
        # Each measurement in a fresh process, so none inherits another's freed memory.
        runs = ["bindings", *(["tls-connections"] if args.tls_connections else [])]
        for one in runs:
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", one], check=True)


if __name__ == "__main__":
    main()
