"""Erasure leaves nothing of the instance in the database files, and start-up is spread."""

from __future__ import annotations

import asyncio
import base64
import itertools
import time
from pathlib import Path
from typing import Any

from sipis.app import start_relay
from sipis.push.base import Routing
from tests.peers.api import APNS_TOKEN, OTHER_TOKEN, PAYLOAD_KEY_B64, instance_body, relay_with_api
from tests.peers.relay import relay_config

REGISTRAR = "sip:192.0.2.1:5060;transport=udp"


def database_bytes(data_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in data_dir.glob("sipis.db*") if p.is_file())


def chunks(blob: bytes, size: int = 16) -> list[bytes]:
    return [blob[i : i + size] for i in range(0, max(len(blob) - size, 0) + 1, size)]


async def test_no_plaintext_ciphertext_or_wrapped_key_survives_erasure(tmp_path: Path) -> None:
    async with relay_with_api(tmp_path, lifecycle={"unregister_wait": 0.2}) as running:
        api, store = running.client, running.relay.store
        body = instance_body(REGISTRAR, user="alice", password="Forensic-Pa55word")
        _, keep = await api.call(
            "POST", "/v1/instances", body=instance_body(REGISTRAR, user="bob", password="kept-pw")
        )
        status, created = await api.call("POST", "/v1/instances", body=body)
        assert status == 201
        row = await store.get(created["id"])
        assert row is not None
        blobs = [row.data_key, row.push, row.payload_key or b""]
        blobs += [b for a in row.accounts for b in (a.settings, a.password)]
        data_dir = running.relay.config.data_dir
        before = database_bytes(data_dir)
        assert all(blob in before for blob in blobs), "the rows really are in the files"
        assert b"Forensic-Pa55word" not in before, "the password is stored encrypted"
        assert APNS_TOKEN.encode() not in before and OTHER_TOKEN.encode() not in before

        status, _ = await api.call(
            "DELETE", f"/v1/instances/{created['id']}", secret=created["secret"]
        )
        assert status == 204
        after = database_bytes(data_dir)
        secrets = [
            b"Forensic-Pa55word",
            base64.b64decode(PAYLOAD_KEY_B64),
            PAYLOAD_KEY_B64.encode(),
            created["id"].encode(),
            created["secret"].encode(),
        ]
        for secret in secrets:
            assert secret not in after
        for blob in blobs:
            assert not any(chunk in after for chunk in chunks(blob)), (
                "a piece of ciphertext remains"
            )
        kept = await store.get(keep["id"])
        assert kept is not None and kept.push in after, "the other instance is untouched"


async def test_restart_spreads_registrations_over_the_configured_time(tmp_path: Path) -> None:
    async with relay_with_api(tmp_path / "first") as running:
        for n in range(10):
            body = instance_body(REGISTRAR, user=f"user{n}", password="pw-spread")
            assert (await running.client.call("POST", "/v1/instances", body=body))[0] == 201
        config_dir = tmp_path / "first"
    # no REGISTER rate limit: ten accounts at 500/s would all go within 20 ms
    config, _ = relay_config(
        config_dir, sip={"register_rate": 0}, lifecycle={"startup_spread": 20.0}
    )
    relay = await start_relay(config, api=False)
    try:
        now = asyncio.get_running_loop().time()
        starts = sorted((b.session.deadline or 0) - now for b in relay.bindings)
        assert len(starts) == 10
        assert starts[0] < 1.0 and 16.0 <= starts[-1] <= 20.0
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert all(1.5 <= gap <= 2.5 for gap in gaps), gaps
    finally:
        await relay.close()


async def test_warning_a_day_before_expiry_then_erasure_then_a_signed_checkpoint(
    tmp_path: Path, store_sections: dict[str, dict[str, Any]]
) -> None:
    """With a one-second lifetime day: warned after 2 s, erased after 3 s."""
    async with relay_with_api(
        tmp_path,
        lifecycle={"day": 1.0, "sweep_interval": 0.1, "unregister_wait": 0.2},
        **store_sections,
    ) as running:
        warned: list[tuple[str, float]] = []

        async def hook(routing: Routing) -> None:
            warned.append((routing.instance_id, time.time()))

        running.relay.instances.expiring_hooks.append(hook)
        body = instance_body(REGISTRAR, user="alice", password="pw-expiring", lifetime=3)
        _, created = await running.client.call("POST", "/v1/instances", body=body)
        async with asyncio.timeout(6):
            while not await running.relay.store.purge_log():
                await asyncio.sleep(0.05)
        [(instance_id, at)] = warned
        assert instance_id == created["id"]
        assert created["expires_at"] - 1.0 <= at <= created["expires_at"] - 0.7
        store = running.relay.store
    await store.open()
    try:
        [entry] = await store.purge_log()
        [checkpoint] = await store.checkpoints()
        assert (entry.reason, checkpoint.seq, checkpoint.head_hash) == ("expired", 1, entry.hash)
    finally:
        await store.close()
