"""sipis registers at a real Kamailio: UDP, TCP, TLS, refresh, restart, un-REGISTER."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from sipis.sip.registration import RegistrationState
from tests.conftest import PEER_USERS
from tests.peers.dnsserver import DnsServer
from tests.peers.kamailio import Kamailio
from tests.peers.relay import account, running_relay
from tests.peers.sipp import SippServer

pytestmark = pytest.mark.peer

ALICE = PEER_USERS["alice"]


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
async def test_register_then_unregister(kamailio: Kamailio, transport: str) -> None:
    config = account("alice", ALICE, kamailio.uri(transport))  # type: ignore[arg-type]
    async with running_relay(ca_file=str(kamailio.ca_certificate)) as relay:
        relay.bindings.add("alice", config)
        status = await relay.registered("alice")
        assert status.last_status == 200
        [contact] = await kamailio.wait_for_contacts("alice", bool)
        assert contact["instance"] == f"<{config.instance_id}>"
        assert contact["reg_id"] == 1
        assert config.contact_user in contact["uri"]
        assert contact["socket"].startswith(f"{transport}:")
        assert contact["expires"] is not None and 590 <= contact["expires"] <= 600

        await relay.bindings.remove("alice")
        assert await kamailio.contacts("alice") == []


async def test_refresh_keeps_the_binding_with_a_rising_cseq(kamailio: Kamailio) -> None:
    config = account("alice", ALICE, kamailio.uri("udp"), expires=5)
    async with running_relay() as relay:
        relay.bindings.add("alice", config)
        await relay.registered("alice")
        [first] = await kamailio.wait_for_contacts("alice", bool)
        [later] = await kamailio.wait_for_contacts(
            "alice", lambda c: bool(c) and c[0]["cseq"] >= first["cseq"] + 2, timeout=15
        )
        assert later["call_id"] == first["call_id"]
        assert relay.bindings.status("alice").state is RegistrationState.REGISTERED


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_kamailio_restart_is_survived(kamailio: Kamailio, transport: str) -> None:
    config = account("alice", ALICE, kamailio.uri(transport), expires=5)  # type: ignore[arg-type]
    async with running_relay() as relay:
        relay.bindings.add("alice", config)
        await relay.registered("alice")
        await kamailio.wait_for_contacts("alice", bool)
        await kamailio.restart()
        assert await kamailio.contacts("alice") == [], "the restart emptied the location table"
        [contact] = await kamailio.wait_for_contacts("alice", bool, timeout=15)
        assert contact["instance"] == f"<{config.instance_id}>"


async def test_connection_loss_reregisters_at_once(kamailio: Kamailio) -> None:
    """A dead TCP flow re-registers through a new one, long before the refresh is due."""
    config = account("alice", ALICE, kamailio.uri("tcp"), expires=3600)
    async with running_relay() as relay:
        relay.bindings.add("alice", config)
        await relay.registered("alice")
        await kamailio.restart()
        [contact] = await kamailio.wait_for_contacts("alice", bool, timeout=10)
        assert contact["cseq"] >= 2


async def test_wrong_password_fails_without_retrying(kamailio: Kamailio) -> None:
    async with running_relay() as relay:
        relay.bindings.add("alice", account("alice", "not-the-password", kamailio.uri("udp")))
        status = await relay.wait_for("alice", lambda s: s.state is RegistrationState.FAILED)
        assert (status.last_status, status.reason) == (401, "authentication failed")
        assert status.next_action_at is None
        assert await kamailio.contacts("alice") == []


async def test_bindings_to_one_registrar_share_one_tls_connection(kamailio: Kamailio) -> None:
    async with running_relay(ca_file=str(kamailio.ca_certificate)) as relay:
        for user, password in PEER_USERS.items():
            relay.bindings.add(user, account(user, password, kamailio.uri("tls")))
        for user in PEER_USERS:
            await relay.registered(user)
            await kamailio.wait_for_contacts(user, bool)
        assert relay.transport.connections == 1


async def test_tls_by_dns_srv_with_the_certificate_name_verified(kamailio: Kamailio) -> None:
    zone = [
        ("_sips._tcp.example.test.", "SRV", 60, f"0 0 {kamailio.tls_port} registrar.test."),
        ("registrar.test.", "A", 60, "127.0.0.1"),
    ]
    async with (
        DnsServer(zone) as dns,
        running_relay(ca_file=str(kamailio.ca_certificate), nameservers=[dns.address]) as relay,
    ):
        relay.bindings.add("alice", account("alice", ALICE, "sips:example.test"))
        await relay.registered("alice")
        [contact] = await kamailio.wait_for_contacts("alice", bool)
        assert contact["socket"] == f"tls:127.0.0.1:{kamailio.tls_port}"
        assert dns.asked("_sips._tcp.example.test", "SRV") == 1


async def test_untrusted_registrar_certificate_is_refused(kamailio: Kamailio) -> None:
    async with running_relay() as relay:
        relay.bindings.add("alice", account("alice", ALICE, kamailio.uri("tls")))
        status = await relay.wait_for("alice", lambda s: s.failures >= 1)
        assert status.state is RegistrationState.REGISTERING
        assert status.reason is not None and "certificate verify failed" in status.reason
        await asyncio.sleep(0.5)
        assert await kamailio.contacts("alice") == []


async def test_failover_from_a_silent_srv_target_to_the_next(
    kamailio: Kamailio, sipp_registrar: Callable[..., SippServer]
) -> None:
    async with sipp_registrar("reg_silent.xml") as silent:
        zone = [
            ("_sip._udp.example.test.", "SRV", 60, f"10 0 {silent.port} dead.example.test."),
            ("_sip._udp.example.test.", "SRV", 60, f"20 0 {kamailio.udp_port} registrar.test."),
            ("dead.example.test.", "A", 60, "127.0.0.1"),
            ("registrar.test.", "A", 60, "127.0.0.1"),
        ]
        async with DnsServer(zone) as dns, running_relay(nameservers=[dns.address]) as relay:
            relay.bindings.add("alice", account("alice", ALICE, "sip:example.test;transport=udp"))
            status = await relay.registered("alice", timeout=15)
            assert status.failures == 0, "the failure count resets on success"
            assert len(silent.received("REGISTER")) >= 1, "the first target was tried first"
            [contact] = await kamailio.wait_for_contacts("alice", bool)
            assert contact["socket"] == f"udp:127.0.0.1:{kamailio.udp_port}"


async def test_no_password_or_digest_answer_in_debug_logs(
    kamailio: Kamailio, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    async with running_relay() as relay:
        relay.bindings.add("alice", account("alice", ALICE, kamailio.uri("udp")))
        relay.bindings.add("bob", account("bob", "a-wrong-password", kamailio.uri("tcp")))
        await relay.registered("alice")
        await relay.wait_for("bob", lambda s: s.state is RegistrationState.FAILED)
        await relay.bindings.remove("alice")
    text = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert caplog.records, "debug logging was captured"
    for secret in (ALICE, "a-wrong-password", "response=", "Authorization"):
        assert secret not in text


async def test_no_register_leaves_while_sending_is_held(kamailio: Kamailio) -> None:
    """A cluster node unsure of its leases holds its REGISTERs, and sends them once sure."""
    sending = False
    config = account("alice", ALICE, kamailio.uri("udp"), expires=5)
    async with running_relay() as relay:
        relay.bindings.may_send = lambda: sending
        relay.bindings.add("alice", config)
        await asyncio.sleep(2.5)
        assert await kamailio.contacts("alice") == []
        assert relay.bindings.status("alice").state is RegistrationState.REGISTERING

        sending = True
        await relay.registered("alice", timeout=5)
        [first] = await kamailio.wait_for_contacts("alice", bool)
        # held again: the refresh due within 4.5 s does not go out, so the binding lapses
        sending = False
        await asyncio.sleep(6)
        assert await kamailio.contacts("alice") == []

        sending = True
        [again] = await kamailio.wait_for_contacts("alice", bool, timeout=5)
        assert again["call_id"] == first["call_id"]
        assert again["cseq"] > first["cseq"]
