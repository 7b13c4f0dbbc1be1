"""The woken app picks up: sipp calls through Kamailio, a second sipp plays the app on the
device port, and the whole dialog runs through sipis."""

from __future__ import annotations

import asyncio

import pytest

from tests.peers.conftest import World
from tests.peers.sipp import SippResult, SippTransport, run_sipp_client, scenario_path

pytestmark = pytest.mark.peer

HOST = "127.0.0.1"


async def run_app(
    world: World,
    instance: tuple[str, str],
    answer: str,
    *,
    transport: SippTransport = "udp",
    registered_for: float = 2.0,
) -> SippResult:
    """sipp as the app: REGISTER on the device port, take the call with ``answer``."""
    instance_id, secret = instance
    port = world.running.relay.device_transport.listening[transport]
    arguments = [
        "-au", instance_id,
        "-ap", secret,
        "-oocsf", str(scenario_path(answer)),
        "-d", str(round(registered_for * 1000)),
    ]  # fmt: skip
    return await run_sipp_client(
        "app_register.xml",
        (HOST, port),
        transport=transport,
        service=instance_id,
        arguments=arguments,
        timeout=registered_for + 8,
        workdir=world.tmp_path / f"app-{answer}-{transport}",
    )


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_the_app_answers_and_hangs_up(world: World, transport: SippTransport) -> None:
    instance = await world.instance("ios")
    caller = asyncio.create_task(world.call("uac_call_answered.xml"))
    await world.apns.pushes.wait_for(1)
    app = await run_app(world, instance, "app_answer.xml", transport=transport)
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
    byes = called.received("BYE")
    assert len(byes) == 1


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_the_caller_hangs_up_an_answered_call(world: World, transport: SippTransport) -> None:
    instance = await world.instance("ios")
    caller = asyncio.create_task(world.call("uac_call_answered_hang_up.xml"))
    await world.apns.pushes.wait_for(1)
    app = await run_app(world, instance, "app_answer_caller_hangs_up.xml", transport=transport)
    called = await caller
    assert called.returncode == 0, called.errors
    assert called.stats.successful_calls == 1
    assert app.returncode == 0, app.errors
    assert [m.method for m in app.received()] == ["INVITE", "ACK", "BYE"]
