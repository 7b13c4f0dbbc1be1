"""Scanners and spoofers get SIP errors or silence from the relay, never a push."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from sipis.sip.message import Response, parse_message
from tests.peers.conftest import World

pytestmark = pytest.mark.peer

SCAN_TIMEOUT = 60


async def sipvicious(tool: str, *args: str, home: Path) -> subprocess.CompletedProcess[str]:
    """Run one of sipvicious's tools (svmap, svwar) to completion, bounded."""
    return await asyncio.to_thread(
        subprocess.run,
        [tool, *args],
        capture_output=True,
        text=True,
        timeout=SCAN_TIMEOUT,
        check=False,
        env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
    )


async def test_sipvicious_scans_and_spoofed_invites_push_nothing(
    world: World, tmp_path: Path
) -> None:
    instance_id, _ = await world.instance("ios")
    relay = world.running.relay
    port = relay.transport.listening["udp"]
    binding = relay.bindings.get(f"{instance_id}/work")
    assert binding is not None
    contact_user = binding.session.config.contact_user

    found = await sipvicious("svmap", "127.0.0.1", "-p", str(port), home=tmp_path)
    assert found.returncode == 0, found.stderr
    assert "127.0.0.1" in found.stdout, "svmap saw the relay answer (OPTIONS: 200)"

    dictionary = tmp_path / "users.txt"
    dictionary.write_text("\n".join(["100", "alice", "admin", contact_user, instance_id]) + "\n")
    scans = [
        ("-m", "INVITE", "-d", str(dictionary)),
        ("-m", "INVITE", "-e", "100-120"),
        ("-m", "REGISTER", "-d", str(dictionary)),
    ]
    for options in scans:
        scan = await sipvicious(
            "svwar", "127.0.0.1", "-p", str(port), *options,
            "-t", "0.02", "--maximumtime", "3", "--force", home=tmp_path,
        )  # fmt: skip
        assert scan.returncode == 0, scan.stderr

    # A spoofed INVITE: the real contact user, the registrar's Via, but another socket.
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[Response] = loop.create_future()

    class Spoofer(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            message = parse_message(data)
            if isinstance(message, Response) and message.status >= 200 and not answered.done():
                answered.set_result(message)

    transport, _ = await loop.create_datagram_endpoint(Spoofer, local_addr=("127.0.0.1", 0))
    kamailio_host, kamailio_port = world.kamailio.address("udp")
    invite = (
        f"INVITE sip:{contact_user}@127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {kamailio_host}:{kamailio_port};branch=z9hG4bKspoof;rport\r\n"
        "From: <sip:mallory@example.test>;tag=spoof\r\nTo: <sip:alice@example.test>\r\n"
        "Call-ID: spoofed-call\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
        "Contact: <sip:mallory@127.0.0.1>\r\nContent-Length: 0\r\n\r\n"
    )
    transport.sendto(invite.encode(), ("127.0.0.1", port))
    try:
        async with asyncio.timeout(5):
            refused = await answered
    finally:
        transport.close()
    assert refused.status == 404

    await asyncio.sleep(0.5)
    assert len(world.apns.pushes) == 0 and len(world.fcm.messages) == 0, "no push at all"
    assert binding.session.registered_until is not None, "the real binding is untouched"
    refused_calls = relay.metrics.registry.get_sample_value(
        "sipis_calls_total", {"outcome": "refused"}
    )
    assert refused_calls is not None and refused_calls >= 1
