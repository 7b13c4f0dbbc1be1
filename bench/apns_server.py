"""A local APNs in a process of its own, for benchmarks: ``python bench/apns_server.py DIR``.

Writes DIR/ca.pem (the CA its TLS certificate comes from) and
DIR/AuthKey.p8 (a token-auth signing key it accepts), prints one JSON line
``{"port": ..., "key_id": ..., "team_id": ...}`` and serves until its
standard input closes; then prints ``{"pushes": N, "cpu_seconds": S}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sipis.testing import tls_server_context
from sipis.testing.apns import ApnsSigningKey, LocalApns


async def serve(directory: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    key = ApnsSigningKey.generate()
    key.write_p8(directory / "AuthKey.p8")
    async with LocalApns(tls_server_context(ca), signing_keys=[key]) as apns:
        print(json.dumps({"port": apns.port, "key_id": key.key_id, "team_id": key.team_id}))
        sys.stdout.flush()
        await asyncio.to_thread(sys.stdin.read)
        print(json.dumps({"pushes": len(apns.pushes), "cpu_seconds": time.process_time()}))


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1])))
