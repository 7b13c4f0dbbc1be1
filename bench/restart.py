"""A restart with many stored bindings: how fast they register again, and at what rate.

    python bench/restart.py [--bindings 100000] [--register-rate 500] [--startup-spread 600]

Kamailio (the test fixture, on loopback) is the registrar.  The relay runs
in this process: N iOS instances are created, one account each (600 s
registrations), and once all are registered the relay stops, leaving
them registered, as ``sipis serve`` does on SIGTERM.  It then starts again
on the same database, with ``sip.register_rate`` and
``lifecycle.startup_spread`` as given, and is sampled once a second: how
many bindings have sent their first REGISTER (a new REGISTER, which the
rate limit paces), how many REGISTERs went out in all (with the answers
to digest challenges, which are not paced), and how many are registered.
Reported: the time until every binding is registered again, against the
ramp the configuration promises (``min(startup_spread, N /
register_rate)``), the most first REGISTERs in any one second against the
rate, and their mean rate from the first to the last.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.calls import PASSWORD, create_instances, wait_registered
from sipis.app import Relay, freeze_long_lived, start_relay, tune_garbage_collection
from sipis.config import Config
from sipis.sip.registration import RegistrationState
from tests.peers.kamailio import Kamailio
from tests.peers.relay import relay_config


def sample(relay: Relay) -> tuple[float, int, int, int]:
    """(when, bindings that sent a REGISTER, REGISTERs sent, bindings registered)."""
    at = time.monotonic()
    started = sent = registered = 0
    for binding in relay.bindings:
        cseq = binding.session.cseq
        started += cseq > 0
        sent += cseq
        registered += binding.session.state is RegistrationState.REGISTERED
    return at, started, sent, registered


async def watch_restart(
    config: Config, count: int, limit: float
) -> list[tuple[float, int, int, int]]:
    """Start the relay as ``sipis serve`` does and sample it once a second until every
    binding is registered."""
    relay = await start_relay(config, api=False)
    freeze_long_lived()
    samples = [sample(relay)]
    try:
        deadline = time.monotonic() + limit
        next_at = time.monotonic()
        while samples[-1][3] < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {samples[-1][3]} of {count} registered after {limit} s")
            next_at += 1.0
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            samples.append(sample(relay))
    finally:
        await relay.close()
    return samples


async def bench(args: argparse.Namespace) -> None:
    count = args.bindings
    users = {f"u{i}": PASSWORD for i in range(count)}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        async with Kamailio(
            users, min_expires=60, workdir=directory / "kamailio", start_timeout=300
        ) as kamailio:
            config, _ = relay_config(
                directory / "relay",
                sip={"register_rate": args.register_rate},
                lifecycle={"startup_spread": args.startup_spread},
                api={"create_rate": 100000, "create_burst": 100000},
                log={"level": "warning"},
            )
            tune_garbage_collection()
            relay = await start_relay(config, api=False)
            try:
                started = time.monotonic()
                await create_instances(relay, kamailio, count, expires=600)
                await wait_registered(relay, count, limit=count / args.register_rate + 300)
                print(f"{count:,} instances created and registered in "
                      f"{time.monotonic() - started:.0f} s")  # fmt: skip
            finally:
                await relay.close()
            ramp = min(args.startup_spread, count / args.register_rate)
            samples = await watch_restart(config, count, limit=ramp + 300)
    # per second over each interval between samples (one second apart, unless the loop lagged)
    firsts = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in itertools.pairwise(samples)]
    sent = [(b[2] - a[2]) / (b[0] - a[0]) for a, b in itertools.pairwise(samples)]
    longest = max(b[0] - a[0] for a, b in itertools.pairwise(samples))
    under_way = [i for i, n in enumerate(firsts) if n]
    mean = count / max(1, under_way[-1] - under_way[0] + 1) if under_way else 0.0
    took = samples[-1][0] - samples[0][0]
    print(f"\nrestart: {count:,} stored bindings, sip.register_rate {args.register_rate:g}/s, "
          f"lifecycle.startup_spread {args.startup_spread:g} s")  # fmt: skip
    print(f"  all registered again after      {took:6.0f} s   "
          f"(ramp promised: {ramp:.0f} s)")  # fmt: skip
    print(f"  first REGISTERs per second      {max(firsts):6.0f} most, {mean:.0f} on average "
          f"(rate: {args.register_rate:g}; samples at most {longest:.2f} s apart)")  # fmt: skip
    print(f"  REGISTERs per second, all       {max(sent):6.0f} most   "
          f"(digest answers included, not paced)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bindings", type=int, default=100_000)
    parser.add_argument("--register-rate", type=float, default=500.0)
    parser.add_argument("--startup-spread", type=float, default=600.0)
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
