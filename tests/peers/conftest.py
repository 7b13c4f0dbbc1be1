"""Fixtures for the real-peer tests: a relay with local push services, and Kamailio."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from sipis.testing import tls_server_context
from sipis.testing.apns import ApnsSigningKey, LocalApns
from sipis.testing.fcm import LocalFcm
from tests.conftest import PEER_USERS
from tests.peers.api import APNS_TOKEN, OTHER_TOKEN, PAYLOAD_KEY_B64, RunningRelay, relay_with_api
from tests.peers.kamailio import Kamailio
from tests.peers.sipp import SippResult, SippTransport, run_sipp_client, scenario_path
from tests.secrets import remember

RING = 2.0
FCM_TOKEN = "fcm-token-" + "x" * 40
ADMIN_TOKEN = "operator-admin-token-" + "y" * 20
remember(ADMIN_TOKEN)
_runs = itertools.count()


@dataclass
class World:
    """Kamailio, a local APNs and FCM, and a relay pushing to them."""

    kamailio: Kamailio
    apns: LocalApns
    fcm: LocalFcm
    running: RunningRelay
    tmp_path: Path

    async def instance(self, platform: str, user: str = "alice") -> tuple[str, str]:
        """A new instance whose account registers ``user`` at Kamailio; (id, secret)."""
        push: dict[str, Any] = (
            {"call_token": APNS_TOKEN, "other_token": OTHER_TOKEN, "environment": "sandbox"}
            if platform == "ios"
            else {"call_token": FCM_TOKEN}
        )
        account = {
            "id": "work",
            "aor": f"sip:{user}@example.test",
            "password": PEER_USERS[user],
            "registrar": self.kamailio.uri("udp"),
        }
        body = {
            "app_id": "com.example.phone",
            "platform": platform,
            "push": push,
            "payload_key": PAYLOAD_KEY_B64,
            "accounts": [account],
        }
        status, created = await self.running.client.call("POST", "/v1/instances", body=body)
        assert status == 201, created
        await self.kamailio.wait_for_contacts(user, bool)
        return created["id"], created["secret"]

    async def app(
        self,
        instance: tuple[str, str],
        answer: str,
        *,
        transport: SippTransport = "udp",
        port: int | None = None,
        registered_for: float = 2.0,
    ) -> SippResult:
        """sipp as the app: REGISTER on the device port (or ``port``) with the instance's id
        and secret, take the call with the out-of-call scenario ``answer``, un-REGISTER."""
        instance_id, secret = instance
        port = port or self.running.relay.device_transport.listening[transport]
        workdir = self.tmp_path / f"app-{answer}-{transport}-{next(_runs)}"
        workdir.mkdir(parents=True)
        credentials = workdir / "credentials.csv"
        credentials.write_text(
            "SEQUENTIAL\n"
            f'{instance_id};[authentication username="{instance_id}" password="{secret}"];\n'
        )
        arguments = [
            "-inf", str(credentials),
            "-oocsf", str(scenario_path(answer)),
            "-d", str(round(registered_for * 1000)),
        ]  # fmt: skip
        return await run_sipp_client(
            "app_register.xml",
            ("127.0.0.1", port),
            transport=transport,
            arguments=arguments,
            timeout=registered_for + 8,
            workdir=workdir,
        )

    async def call(self, scenario: str, user: str = "alice", **keys: str) -> SippResult:
        """Run a sipp caller scenario towards ``user`` through Kamailio."""
        arguments = [arg for name, value in keys.items() for arg in ("-key", name, value)]
        return await run_sipp_client(
            scenario,
            self.kamailio.address("udp"),
            service=user,
            arguments=arguments,
            timeout=RING + 8,
            workdir=self.tmp_path / f"sipp-{scenario}",
        )


@dataclass
class LocalPushServices:
    """The local APNs (token auth) and FCM, and the files a relay needs to reach them."""

    apns: LocalApns
    fcm: LocalFcm
    key: ApnsSigningKey
    key_file: Path
    ca_file: Path
    account_file: Path

    def sections(self, apns_server: str, fcm_base: str, **extra: Any) -> dict[str, dict[str, Any]]:
        """The relay's ``apns`` and ``fcm`` tables for the services reached at these
        addresses (``host:port`` and ``https://host:port``), with ``extra`` in both."""
        return {
            "apns": {
                "key_file": str(self.key_file),
                "key_id": self.key.key_id,
                "team_id": self.key.team_id,
                "production_server": apns_server,
                "sandbox_server": apns_server,
                "ca_file": str(self.ca_file),
                **extra,
            },
            "fcm": {
                "service_account": str(self.account_file),
                "send_url": fcm_base,
                "token_uri": f"{fcm_base}/token",
                "ca_file": str(self.ca_file),
                **extra,
            },
        }


@asynccontextmanager
async def local_push_services(
    tmp_path: Path, peer_ca: trustme.CA
) -> AsyncIterator[LocalPushServices]:
    ca_file = tmp_path / "push-ca.pem"
    peer_ca.cert_pem.write_to_path(str(ca_file))
    key = ApnsSigningKey.generate()
    key_file = key.write_p8(tmp_path / "AuthKey.p8")
    async with (
        LocalApns(tls_server_context(peer_ca), signing_keys=[key]) as apns,
        LocalFcm(tls_server_context(peer_ca)) as fcm,
    ):
        account_file = fcm.service_account_file(tmp_path / "service-account.json")
        yield LocalPushServices(apns, fcm, key, key_file, ca_file, account_file)


@pytest.fixture
async def world(kamailio: Kamailio, tmp_path: Path, peer_ca: trustme.CA) -> AsyncIterator[World]:
    async with (
        local_push_services(tmp_path, peer_ca) as push,
        relay_with_api(
            tmp_path,
            push={"ring_timeout": RING},
            **push.sections(f"127.0.0.1:{push.apns.port}", push.fcm.base_url),
            lifecycle={"unregister_wait": 1.0},
            api={"admin_token": ADMIN_TOKEN},
        ) as running,
    ):
        yield World(kamailio, push.apns, push.fcm, running, tmp_path)
