"""End to end over HTTPS against Kamailio: create, pause, resume, delete, audit."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PEER_USERS
from tests.peers.api import instance_body, relay_with_api
from tests.peers.kamailio import Kamailio

pytestmark = pytest.mark.peer

ALICE = PEER_USERS["alice"]


def audit(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sipis", "audit", *args, "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_instance_lifecycle_over_https(kamailio: Kamailio, tmp_path: Path) -> None:
    async with relay_with_api(tmp_path) as running:
        api = running.client
        status, created = await api.call(
            "POST", "/v1/instances",
            body=instance_body(kamailio.uri("udp"), user="alice", password=ALICE),
        )  # fmt: skip
        assert status == 201, created
        instance_id, secret = created["id"], created["secret"]
        assert (
            created["push"]["call_token"].startswith("a1a1")
            and "…" in created["push"]["call_token"]
        )
        assert ALICE not in str(created)

        [contact] = await kamailio.wait_for_contacts("alice", bool)
        status, view = await api.call("GET", f"/v1/instances/{instance_id}", secret=secret)
        assert status == 200
        [account] = view["accounts"]
        assert account["state"] == "registered" and account["last_status"] == 200
        assert account["registered_until"] > view["created_at"]
        assert "secret" not in view and "password" not in account

        status, view = await api.call(
            "PATCH", f"/v1/instances/{instance_id}", secret=secret, body={"paused": True}
        )
        assert (status, view["accounts"][0]["state"]) == (200, "paused")
        await kamailio.wait_for_contacts("alice", lambda c: c == [])

        status, view = await api.call(
            "PATCH", f"/v1/instances/{instance_id}", secret=secret, body={"paused": False}
        )
        assert status == 200
        [again] = await kamailio.wait_for_contacts("alice", bool)
        assert again["instance"] == contact["instance"], "the same +sip.instance after resume"

        status, _ = await api.call("DELETE", f"/v1/instances/{instance_id}", secret=secret)
        assert status == 204
        assert await kamailio.contacts("alice") == []
        status, _ = await api.call("GET", f"/v1/instances/{instance_id}", secret=secret)
        assert status == 401

        [entry] = await running.relay.store.purge_log()
        assert entry.reason == "disabled"
        assert entry.subject == running.relay.keys.audit.subject(instance_id)
        assert entry.erased == {
            "accounts": 1,
            "data_key": 1,
            "payload_key": 1,
            "push_tokens": 2,
            "queued_messages": 0,
        }

        shown = audit(running.config_path, "show", instance_id)
        assert shown.returncode == 0 and "reason disabled" in shown.stdout
        verified = audit(running.config_path, "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr


async def test_expired_instance_is_erased_on_time(kamailio: Kamailio, tmp_path: Path) -> None:
    """With a lifetime 'day' of one second, a 3-day instance lives 3 s."""
    async with relay_with_api(tmp_path, lifecycle={"day": 1.0, "sweep_interval": 0.25}) as running:
        api = running.client
        status, created = await api.call(
            "POST", "/v1/instances",
            body=instance_body(kamailio.uri("udp"), user="alice", password=ALICE, lifetime=3),
        )  # fmt: skip
        assert status == 201
        assert created["expires_at"] - created["created_at"] == pytest.approx(3.0)
        await kamailio.wait_for_contacts("alice", bool)
        async with asyncio.timeout(10):
            while not await running.relay.store.purge_log():
                await asyncio.sleep(0.1)
        [entry] = await running.relay.store.purge_log()
        assert entry.reason == "expired"
        assert created["expires_at"] <= entry.at <= created["expires_at"] + 1.0
        assert await kamailio.contacts("alice") == [], "un-REGISTERed on expiry"
