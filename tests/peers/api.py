"""A relay started in-process with its HTTPS API, and a client for it."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from sipis.app import Relay, start_relay
from sipis.push.base import Provider
from tests.peers.relay import relay_config
from tests.secrets import remember

APNS_TOKEN = "a1" * 32
OTHER_TOKEN = "b2" * 32
PAYLOAD_KEY_B64 = "cGF5bG9hZC1rZXktMzItYnl0ZXMtbG9uZy0tLS0tLS0="  # 32 bytes


@dataclass
class ApiClient:
    session: aiohttp.ClientSession
    base: str

    async def call(
        self, method: str, path: str, *, secret: str | None = None, body: Any = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        remember_secrets_in(body)
        async with self.session.request(method, self.base + path, json=body, headers=headers) as r:
            text = await r.text()
            answer = await r.json() if text else None
        if isinstance(answer, dict):
            remember(answer.get("secret"))
        return r.status, answer


_SECRET_FIELDS = ("password", "password_sealed", "call_token", "other_token", "payload_key")


def remember_secrets_in(value: Any) -> None:
    """Register every password, token and key in a request body with the log check."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in _SECRET_FIELDS and isinstance(item, str):
                remember(item)
            else:
                remember_secrets_in(item)
    elif isinstance(value, list):
        for item in value:
            remember_secrets_in(item)


@dataclass
class RunningRelay:
    relay: Relay
    client: ApiClient
    config_path: Path


@asynccontextmanager
async def relay_with_api(
    tmp_path: Path, providers: Mapping[str, Provider] | None = None, **sections: dict[str, Any]
) -> AsyncIterator[RunningRelay]:
    config, path = relay_config(tmp_path, **sections)
    relay = await start_relay(config, providers=providers)
    context = ssl.create_default_context(
        cafile=str(config.data_dir / "tls" / "dev-certificate.pem")
    )
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
            yield RunningRelay(
                relay, ApiClient(session, f"https://127.0.0.1:{relay.api_port}"), path
            )
    finally:
        await relay.close()


def instance_body(registrar: str, *, user: str, password: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "app_id": "com.example.phone",
        "platform": "ios",
        "push": {"call_token": APNS_TOKEN, "other_token": OTHER_TOKEN, "environment": "sandbox"},
        "payload_key": PAYLOAD_KEY_B64,
        "lifetime": 4 * 86400,
        "accounts": [
            {
                "id": "work",
                "aor": f"sip:{user}@example.test",
                "password": password,
                "registrar": registrar,
                "expires": 600,
                "display_name": "Alice",
            }
        ],
    }
    body.update(extra)
    return body
