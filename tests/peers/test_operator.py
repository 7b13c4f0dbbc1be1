"""What an operator sees matches what happened: /metrics, /v1/stats, `sipis status`,
`sipis push test`, and a graceful shutdown."""

from __future__ import annotations

import argparse
import asyncio
import base64
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sipis.cli import push_test, show_status
from sipis.config import load_config
from sipis.push.payload import unseal
from sipis.store.sqlite import SqliteStore
from tests.conftest import PEER_USERS
from tests.peers.api import PAYLOAD_KEY_B64, instance_body, relay_with_api
from tests.peers.conftest import ADMIN_TOKEN, World
from tests.peers.kamailio import Kamailio

pytestmark = pytest.mark.peer

PAYLOAD_KEY = base64.b64decode(PAYLOAD_KEY_B64)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(world: World) -> Samples:
    client = world.running.client
    async with client.session.get(
        f"{client.base}/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as answer:
        assert answer.status == 200
        text = await answer.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_and_stats_count_what_happened(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    client = world.running.client
    unauthorized = await client.session.get(f"{client.base}/metrics")
    assert unauthorized.status == 401
    instance = await world.instance("ios")
    before = await scrape(world)
    assert value(before, "sipis_instances", platform="ios", state="active") == 1
    assert value(before, "sipis_bindings", state="registered") == 1
    assert value(before, "sipis_register_transactions_total", outcome="challenge", status="401")
    assert value(before, "sipis_register_transactions_total", outcome="success", status="200")
    assert value(before, "sipis_register_rtt_seconds_count") >= 2

    rang_out = await world.call("uac_call_ring_out.xml")
    cancelled = await world.call("uac_call_cancel.xml", reason="SIP;cause=487")
    caller = asyncio.create_task(world.call("uac_call_answered.xml"))
    await world.apns.pushes.wait_for(5)  # call + missed, call + cancelled, call
    app = await world.app(instance, "app_answer.xml")
    answered = await caller
    message = await world.call("uac_message.xml", text="later")
    for result in (rang_out, cancelled, answered, message, app):
        assert result.returncode == 0, result.errors
    await world.apns.pushes.wait_for(6)

    during = await scrape(world)
    for kind, count in (("call", 3), ("call_missed", 1), ("call_cancelled", 1), ("message", 1)):
        pushed = value(
            during, "sipis_pushes_total", provider="apns", kind=kind, outcome="delivered"
        )
        assert pushed == count, kind
    assert value(during, "sipis_invite_to_push_seconds_count") == 3
    for outcome in ("missed", "cancelled", "relayed"):
        assert value(during, "sipis_calls_total", outcome=outcome) == 1, outcome
    assert value(during, "sipis_messages_total", outcome="queued") == 1
    assert value(during, "sipis_devices_registered") == 0  # the app un-REGISTERed
    assert value(during, "sipis_dialogs") == 0

    config = load_config(world.running.config_path)
    options = argparse.Namespace(url=f"{client.base}/v1/stats", json=False)  # its port was 0
    assert await asyncio.to_thread(show_status, config, options) == 0
    table = capsys.readouterr().out
    assert "calls        cancelled 1, missed 1, relayed 1" in table
    assert "instances    ios: active 1" in table
    assert "apns: delivered 6" in table

    assert await push_test(config, instance[0]) == 0
    [test] = [p for p in await world.apns.pushes.wait_for(7) if p.headers.get("apns-push-type")
              == "alert" and unseal(p.payload["sipis"], PAYLOAD_KEY)["type"] == "test"]  # fmt: skip
    assert test.headers["apns-topic"] == "com.example.phone"

    status, _ = await client.call("DELETE", f"/v1/instances/{instance[0]}", secret=instance[1])
    assert status == 204
    after = await scrape(world)
    assert value(after, "sipis_erasures_total", reason="disabled") == 1
    assert value(after, "sipis_purge_log_entries") == 1
    assert value(after, "sipis_instances", platform="ios", state="active") == 0
    assert value(after, "sipis_bindings", state="registered") == 0
    status, stats = await client.call("GET", "/v1/stats", secret=ADMIN_TOKEN)
    assert status == 200
    assert stats["purges"] == {"disabled": 1} and stats["calls"]["relayed"] == 1


@pytest.mark.parametrize("unregister", [False, True])
async def test_shutdown_signs_the_purge_log_and_unregisters_only_when_told(
    kamailio: Kamailio, tmp_path: Path, unregister: bool
) -> None:
    lifecycle = {"unregister_on_shutdown": unregister, "unregister_wait": 2.0}
    async with relay_with_api(tmp_path, lifecycle=lifecycle) as running:
        registrar = kamailio.uri("udp")
        for user in ("alice", "bob"):
            body = instance_body(registrar, user=user, password=PEER_USERS[user])
            status, created = await running.client.call("POST", "/v1/instances", body=body)
            assert status == 201
            await kamailio.wait_for_contacts(user, bool)
        status, _ = await running.client.call(
            "DELETE", f"/v1/instances/{created['id']}", secret=created["secret"]
        )
        assert status == 204
        await kamailio.wait_for_contacts("bob", lambda contacts: not contacts)
    if unregister:
        await kamailio.wait_for_contacts("alice", lambda contacts: not contacts)
    else:
        assert len(await kamailio.contacts("alice")) == 1
    store = SqliteStore(tmp_path / "data" / "sipis.db")
    await store.open()
    try:
        [checkpoint] = await store.checkpoints()
        [entry] = await store.purge_log()
    finally:
        await store.close()
    assert checkpoint.seq == entry.seq == 1
