"""A bindings manager on loopback, as the relay runs it, for tests against real peers."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sipis.bindings import BindingManager
from sipis.config import Config, load_config
from sipis.inbound import Inbound
from sipis.sip.message import Message, ParseError
from sipis.sip.registration import (
    Backoff,
    RegistrationConfig,
    RegistrationState,
    RegistrationStatus,
)
from sipis.sip.transaction import Timers
from sipis.sip.uri import parse_sip_uri
from sipis.transport.flow import Flow
from sipis.transport.layer import TransportLayer, TransportSettings
from sipis.transport.resolver import Resolver

# Fast transaction timers, so that "no answer" takes 3.2 s instead of 32 s, and a
# backoff that retries within a second or two instead of 15-30 s.
FAST_TIMERS = Timers(t1=0.05, t2=0.4, t4=0.5)
FAST_BACKOFF = Backoff(no_flow=1.0, flow_up=2.0, cap=8.0)


@dataclass
class RelayUnderTest:
    transport: TransportLayer
    bindings: BindingManager

    async def wait_for(
        self,
        key: str,
        condition: Callable[[RegistrationStatus], bool],
        timeout: float = 10.0,
    ) -> RegistrationStatus:
        async with asyncio.timeout(timeout):
            while not condition(status := self.bindings.status(key)):
                await asyncio.sleep(0.05)
        return status

    async def registered(self, key: str, timeout: float = 10.0) -> RegistrationStatus:
        return await self.wait_for(key, lambda s: s.state is RegistrationState.REGISTERED, timeout)


@asynccontextmanager
async def running_relay(
    *,
    ca_file: str | None = None,
    nameservers: list[tuple[str, int]] | None = None,
    timers: Timers = FAST_TIMERS,
    backoff: Backoff = FAST_BACKOFF,
    keepalive: float = 30.0,
) -> AsyncIterator[RelayUnderTest]:
    bindings: BindingManager | None = None

    def dispatch(message: Message | ParseError, flow: Flow) -> None:
        assert bindings is not None
        bindings.dispatch(message, flow)

    transport = TransportLayer(
        dispatch,
        TransportSettings(host="127.0.0.1", udp_port=0, keepalive=keepalive, ca_file=ca_file),
    )
    await transport.start()
    resolver = Resolver(nameservers or [("127.0.0.1", 9)], timeout=1.0)
    inbound = Inbound(timers=timers)
    bindings = BindingManager(
        transport, resolver, on_request=inbound.handle, timers=timers, backoff=backoff
    )
    try:
        yield RelayUnderTest(transport, bindings)
    finally:
        await bindings.close()
        inbound.close()
        await transport.close()


def relay_config(tmp_path: Path, **sections: dict[str, Any]) -> tuple[Config, Path]:
    """A relay config on loopback with free ports and its data under ``tmp_path``, and its file.

    ``sections`` override or add TOML tables, e.g. ``lifecycle={"day": 1.0}``.
    """
    tables: dict[str, dict[str, Any]] = {
        # the test peers run on loopback; 192.0.2.0/24 is never reached
        "sip": {
            "host": "127.0.0.1",
            "udp_port": 0,
            "tcp_port": False,
            "allowed_networks": ["127.0.0.0/8", "::1/128", "192.0.2.0/24"],
        },
        "device": {"host": "127.0.0.1", "tls_port": 0, "tcp_port": 0, "udp_port": 0},
        "api": {"host": "127.0.0.1", "port": 0},
        "data": {"dir": str(tmp_path / "data")},
        "dns": {"nameservers": ["127.0.0.1:9"], "timeout": 0.5},
        "lifecycle": {"startup_spread": 0.0, "unregister_wait": 2.0},
        "log": {"level": "debug"},
    }
    for name, values in sections.items():
        tables.setdefault(name, {}).update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "sipis.toml"
    path.write_text(_toml(tables))
    return load_config(path), path


def _toml(tables: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def account(
    user: str,
    password: str,
    registrar: str,
    *,
    domain: str = "example.test",
    expires: int = 600,
) -> RegistrationConfig:
    return RegistrationConfig(
        aor=parse_sip_uri(f"sip:{user}@{domain}"),
        registrar=parse_sip_uri(registrar),
        username=user,
        password=password,
        contact_user=secrets.token_hex(8),
        instance_id=f"urn:uuid:{uuid.uuid4()}",
        expires=expires,
    )
