"""The woken app picks up: sipp calls through Kamailio, a second sipp plays the app on the
device port, and the whole dialog runs through sipis."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from tests.peers.baresip import Baresip
from tests.peers.conftest import World
from tests.peers.sipp import SippResult, SippTransport
from tests.peers.tls_tunnel import TlsTunnel

pytestmark = pytest.mark.peer


def app_call(app: SippResult) -> list[str]:
    """What the app sent for the call, in order (statuses and methods), retransmissions once."""
    sent = []
    for message in app.messages:
        cseq = message.header("CSeq") or ""
        if message.direction == "sent" and "REGISTER" not in cseq and message not in sent:
            sent.append(message)
    return [str(m.status) if m.status is not None else m.method or "" for m in sent]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_the_app_answers_and_hangs_up(world: World, transport: SippTransport) -> None:
    instance = await world.instance("ios")
    caller = asyncio.create_task(world.call("uac_call_answered.xml"))
    await world.apns.pushes.wait_for(1)
    app = await world.app(instance, "app_answer.xml", transport=transport)
    called = await caller
    assert called.returncode == 0, called.errors
    assert called.stats.successful_calls == 1
    assert app.returncode == 0, app.errors
    invite = app.received("INVITE")[0]
    assert invite.header("Sipis-Account") == "work"
    assert invite.header("From") is not None and "sip:bob@example.test" in invite.header("From")
    routes = invite.headers("Record-Route")
    assert len(routes) >= 3 and all(";lr" in r for r in routes)
    assert [m.method for m in app.received() if m.method != "INVITE"] == ["ACK"]
    assert app_call(app) == ["180", "200", "BYE"] and "Aborting" not in app.errors
    byes = called.received("BYE")
    assert len(byes) == 1


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_the_caller_hangs_up_an_answered_call(world: World, transport: SippTransport) -> None:
    instance = await world.instance("ios")
    caller = asyncio.create_task(world.call("uac_call_answered_hang_up.xml"))
    await world.apns.pushes.wait_for(1)
    app = await world.app(instance, "app_answer_caller_hangs_up.xml", transport=transport)
    called = await caller
    assert called.returncode == 0, called.errors
    assert called.stats.successful_calls == 1
    assert app.returncode == 0, app.errors
    assert [m.method for m in app.received()] == ["INVITE", "ACK", "BYE"]
    assert app_call(app) == ["180", "200", "200"] and "Aborting" not in app.errors


async def test_the_app_answers_over_tls(world: World) -> None:
    relay = world.running.relay
    context = ssl.create_default_context(
        cafile=str(relay.config.data_dir / "tls" / "dev-certificate.pem")
    )
    target = ("127.0.0.1", relay.device_transport.listening["tls"])
    instance = await world.instance("ios")
    caller = asyncio.create_task(world.call("uac_call_answered.xml"))
    await world.apns.pushes.wait_for(1)
    async with TlsTunnel(target, context) as tunnel:
        app = asyncio.create_task(
            world.app(instance, "app_answer.xml", transport="tcp", port=tunnel.port)
        )
        for _ in range(100):
            device = relay.devices.get(instance[0])
            if device is not None:
                break
            await asyncio.sleep(0.05)
        assert device is not None and device.flow.transport == "tls"
        done = await app
    called = await caller
    assert called.returncode == 0, called.errors
    assert done.returncode == 0, done.errors
    assert [m.method for m in done.received()] == ["INVITE", "ACK"]
    assert len(called.received("BYE")) == 1


@pytest.mark.parametrize("hangs_up", ["caller", "app"])
async def test_a_real_softphone_picks_up_over_tls(world: World, hangs_up: str) -> None:
    relay = world.running.relay
    instance_id, secret = await world.instance("ios")
    scenario = "uac_call_answered_hang_up.xml" if hangs_up == "caller" else "uac_call_answered.xml"
    caller = asyncio.create_task(world.call(scenario))
    await world.apns.pushes.wait_for(1)
    phone = Baresip(
        world.tmp_path / "baresip",
        aor=f"sip:{instance_id}@127.0.0.1",
        registrar=f"sip:127.0.0.1:{relay.device_transport.listening['tls']};transport=tls",
        username=instance_id,
        password=secret,
        transport="tls",
        ca_file=relay.config.data_dir / "tls" / "dev-certificate.pem",
    )
    async with phone:
        await phone.wait_registered()
        device = relay.devices.get(instance_id)
        assert device is not None and device.flow.transport == "tls"
        incoming = await phone.wait_event("CALL_INCOMING")
        assert incoming.peer_uri == "sip:bob@example.test"
        await phone.wait_event("CALL_ESTABLISHED")
        if hangs_up == "app":
            await phone.hangup()
        called = await caller
        await phone.wait_event("CALL_CLOSED")
    assert called.returncode == 0, called.errors
    assert called.stats.successful_calls == 1
    assert len(relay.dialogs) == 0
