"""No reflection through the relay: registrars at loopback, private, link-local addresses
or at the relay itself are refused unless the operator allows their network."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers.api import RunningRelay, instance_body, relay_with_api
from tests.peers.dnsserver import DnsServer

pytestmark = pytest.mark.peer

PASSWORD = "policy-pa55"


class CountingRegistrar(asyncio.DatagramProtocol):
    """A UDP socket that counts what arrives and answers nothing."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)


@pytest.fixture
async def registrar() -> AsyncIterator[tuple[CountingRegistrar, int]]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        CountingRegistrar, local_addr=("127.0.0.2", 0)
    )
    yield protocol, transport.get_extra_info("sockname")[1]
    transport.close()


def account(**fields: Any) -> dict[str, Any]:
    return instance_body("sip:192.0.2.1", user="alice", password=PASSWORD, **fields)


def with_servers(**fields: Any) -> dict[str, Any]:
    body = account()
    body["accounts"][0].update(fields)
    return body


async def create(running: RunningRelay, body: dict[str, Any]) -> tuple[int, Any]:
    return await running.client.call("POST", "/v1/instances", body=body)


async def test_the_api_refuses_servers_the_relay_must_not_reach(tmp_path: Path) -> None:
    # The relay config of the tests allows 127.0.0.0/8, ::1 and 192.0.2.0/24.
    async with relay_with_api(tmp_path) as running:
        own = running.relay.transport.listening["udp"]
        cases = [
            (with_servers(registrar="sip:10.1.2.3"), "registrar", "a private or reserved"),
            (with_servers(registrar="sip:169.254.169.254:80"), "registrar", "a link-local"),
            (with_servers(registrar="sip:[fe80::1]"), "registrar", "a link-local"),
            (with_servers(registrar="sip:224.0.0.1"), "registrar", "a multicast"),
            (with_servers(outbound_proxy="sip:192.168.0.1;lr"), "outbound_proxy", "a private"),
            (with_servers(registrar=f"sip:127.0.0.1:{own}"), "registrar", "the relay's own"),
            (with_servers(registrar=None, aor="sip:alice@172.16.0.9"), "aor", "a private"),
        ]
        for body, field, reason in cases:
            status, answer = await create(running, body)
            assert (status, answer["error"], answer["field"]) == (
                400,
                "invalid_field",
                f"accounts.0.{field}",
            ), answer
            assert reason in answer["detail"]
            assert PASSWORD not in str(answer)

        # A change may not point an existing account somewhere refused either.
        status, created = await create(running, account())
        assert status == 201
        path, secret = f"/v1/instances/{created['id']}", created["secret"]
        change = {"accounts": [{**account()["accounts"][0], "registrar": "sip:10.0.0.1"}]}
        status, answer = await running.client.call("PATCH", path, secret=secret, body=change)
        assert (status, answer["field"]) == (400, "accounts.0.registrar")
        status, view = await running.client.call("GET", path, secret=secret)
        assert view["accounts"][0]["registrar"] == "sip:192.0.2.1"


async def test_loopback_is_refused_unless_allowed(tmp_path: Path) -> None:
    async with relay_with_api(tmp_path, sip={"allowed_networks": []}) as running:
        status, answer = await create(running, with_servers(registrar="sip:127.0.0.1:5070"))
        assert (status, answer["field"]) == (400, "accounts.0.registrar")
        assert "a loopback address" in answer["detail"]


async def test_a_name_resolving_to_a_refused_address_sends_nothing(
    tmp_path: Path, registrar: tuple[CountingRegistrar, int]
) -> None:
    """DNS may point an accepted name anywhere later: every address is checked when the
    flow opens, and a refused one gets no packet, until the operator allows it."""
    counting, port = registrar
    records = [("registrar.test", "A", 60, "127.0.0.2")]
    body = with_servers(registrar=f"sip:registrar.test:{port};transport=udp")
    async with DnsServer(records) as dns:
        nameserver = "{}:{}".format(*dns.address)
        async with relay_with_api(
            tmp_path / "refused",
            sip={"allowed_networks": ["127.0.0.1/32"]},
            dns={"nameservers": [nameserver]},
        ) as running:
            status, created = await create(running, body)
            assert status == 201, created
            path, secret = f"/v1/instances/{created['id']}", created["secret"]
            async with asyncio.timeout(5):
                while True:
                    status, view = await running.client.call("GET", path, secret=secret)
                    if view["accounts"][0]["reason"]:
                        break
                    await asyncio.sleep(0.05)
            assert "127.0.0.2 is a loopback address" in view["accounts"][0]["reason"]
            assert view["accounts"][0]["state"] in ("registering", "failed")  # backing off
            await asyncio.sleep(0.5)
            assert counting.received == []

        async with relay_with_api(
            tmp_path / "allowed",
            sip={"allowed_networks": ["127.0.0.0/8"]},
            dns={"nameservers": [nameserver]},
        ) as running:
            status, created = await create(running, body)
            assert status == 201, created
            async with asyncio.timeout(5):
                while not counting.received:
                    await asyncio.sleep(0.05)
            assert counting.received[0].startswith(b"REGISTER sip:registrar.test")
