"""A local APNs in a process of its own, for benchmarks: ``python bench/apns_server.py DIR``.

Writes DIR/ca.pem (the CA its TLS certificate comes from) and
DIR/AuthKey.p8 (a token-auth signing key it accepts), prints one JSON line
``{"port": ..., "key_id": ..., "team_id": ...}`` and serves until its
standard input closes; then prints ``{"pushes": N, "cpu_seconds": S}``.

With ``--announce`` it also prints ``{"push": TOKEN, "arrived": T}`` as each
push arrives (T from ``time.time()``), so a benchmark can time pushes
against other clocks of the same machine; whoever asks for that must read
standard output while the server runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sipis.testing import Arrivals, tls_server_context
from sipis.testing.apns import ApnsSigningKey, LocalApns, ReceivedPush


async def announce(pushes: Arrivals[ReceivedPush]) -> None:
    """Print each push as it arrives, until cancelled."""
    while True:
        try:
            push = await pushes.next(timeout=3600)
        except TimeoutError:
            continue
        print(json.dumps({"push": push.token, "arrived": push.arrived}), flush=True)


async def serve(directory: Path, announcing: bool) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    key = ApnsSigningKey.generate()
    key.write_p8(directory / "AuthKey.p8")
    async with LocalApns(tls_server_context(ca), signing_keys=[key]) as apns:
        print(json.dumps({"port": apns.port, "key_id": key.key_id, "team_id": key.team_id}))
        sys.stdout.flush()
        announcer = asyncio.create_task(announce(apns.pushes)) if announcing else None
        await asyncio.to_thread(sys.stdin.read)
        if announcer is not None:
            announcer.cancel()
        print(json.dumps({"pushes": len(apns.pushes), "cpu_seconds": time.process_time()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--announce", action="store_true", help="print each push as it arrives")
    args = parser.parse_args()
    asyncio.run(serve(args.directory, args.announce))


if __name__ == "__main__":
    main()
