"""Real calls: sipp calls an AOR through Kamailio, Kamailio forks to sipis, pushes reach a
local APNs or FCM."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest

from sipis.push.payload import unseal
from tests.peers.api import APNS_TOKEN, OTHER_TOKEN, PAYLOAD_KEY_B64
from tests.peers.conftest import FCM_TOKEN, World

pytestmark = pytest.mark.peer

PAYLOAD_KEY = base64.b64decode(PAYLOAD_KEY_B64)


def call_of(payload: dict[str, Any]) -> dict[str, str]:
    return unseal(payload.get("sipis", payload), PAYLOAD_KEY)


async def test_ios_call_rings_out_with_one_voip_push_and_a_missed_call_push(world: World) -> None:
    instance_id, _ = await world.instance("ios")
    result = await world.call("uac_call_ring_out.xml")
    assert result.returncode == 0, result.errors
    assert result.stats.successful_calls == 1
    ringing = [m for m in result.messages if m.status == 180]
    assert ringing and ringing[0].header("Push-Status") == "sent"
    voip, missed = await world.apns.pushes.wait_for(2)
    assert voip.token == APNS_TOKEN
    assert voip.headers["apns-push-type"] == "voip"
    assert voip.headers["apns-topic"] == "com.example.phone.voip"
    assert (voip.headers["apns-priority"], voip.headers["apns-expiration"]) == ("10", "0")
    content = call_of(voip.payload)
    assert (content["type"], content["instance"], content["account"]) == (
        "call",
        instance_id,
        "work",
    )
    assert content["caller"] == "sip:bob@example.test" and content["caller_name"] == "Bob Caller"
    assert missed.token == OTHER_TOKEN and missed.headers["apns-push-type"] == "alert"
    assert missed.headers["apns-topic"] == "com.example.phone"
    assert call_of(missed.payload)["type"] == "call_missed"
    assert voip.headers["apns-collapse-id"] == missed.headers["apns-collapse-id"]
    await asyncio.sleep(0.3)
    assert len(world.apns.pushes) == 2, "exactly one call push and one missed-call push"


async def test_android_call_pushes_through_fcm(world: World) -> None:
    await world.instance("android")
    result = await world.call("uac_call_ring_out.xml")
    assert result.returncode == 0, result.errors
    call, missed = await world.fcm.messages.wait_for(2)
    assert call.target == FCM_TOKEN
    assert call.message["android"]["priority"].lower() == "high"
    assert call_of(call.message["data"])["type"] == "call"
    assert call_of(missed.message["data"])["type"] == "call_missed"
    assert len(world.apns.pushes) == 0


@pytest.mark.parametrize(
    ("reason", "kind"),
    [("SIP;cause=487", "call_cancelled"),
     ('SIP;cause=200;text="Call completed elsewhere"', "answered_elsewhere")],
)  # fmt: skip
async def test_caller_hangs_up_while_ringing(world: World, reason: str, kind: str) -> None:
    await world.instance("ios")
    result = await world.call("uac_call_cancel.xml", reason=reason)
    assert result.returncode == 0, result.errors
    assert [m.status for m in result.messages if m.status == 487] == [487]
    voip, notice = await world.apns.pushes.wait_for(2)
    assert voip.headers["apns-push-type"] == "voip"
    assert notice.token == OTHER_TOKEN and notice.headers["apns-push-type"] != "voip"
    assert call_of(notice.payload)["type"] == kind


async def test_message_through_kamailio_is_queued_encrypted_and_pushed(world: World) -> None:
    instance_id, _ = await world.instance("ios")
    result = await world.call("uac_message.xml", text="See you at eight")
    assert result.returncode == 0, result.errors
    push = await world.apns.pushes.next()
    assert push.token == OTHER_TOKEN and push.headers["apns-push-type"] == "alert"
    assert call_of(push.payload)["type"] == "message"
    [queued] = await world.running.relay.instances.queued_messages(instance_id)
    assert queued.body.strip() == b"See you at eight" and queued.content_type == "text/plain"
    files = b"".join(p.read_bytes() for p in world.running.relay.config.data_dir.glob("sipis.db*"))
    assert b"See you at eight" not in files


async def test_unregistered_token_erases_the_instance(world: World) -> None:
    instance_id, _ = await world.instance("ios")
    world.apns.reject_token(APNS_TOKEN, "Unregistered")
    await world.call("uac_call_ring_out.xml")
    store = world.running.relay.store
    async with asyncio.timeout(10):
        while not await store.purge_log():
            await asyncio.sleep(0.1)
    [entry] = await store.purge_log()
    assert entry.reason == "token_invalid"
    assert entry.subject == world.running.relay.keys.audit.subject(instance_id)
    assert await store.get(instance_id) is None
    assert await world.kamailio.contacts("alice") == [], "un-REGISTERed"
