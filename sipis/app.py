"""The composition root: builds the relay's parts from a Config and runs them."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

from sipis.bindings import BindingManager
from sipis.config import Config
from sipis.inbound import Inbound
from sipis.sip.message import Message, ParseError
from sipis.transport.flow import Flow
from sipis.transport.layer import TransportLayer, TransportSettings
from sipis.transport.resolver import Resolver

log = logging.getLogger("sipis")


@dataclass
class Relay:
    """The running parts, for whoever drives them (``serve``, tests, benchmarks)."""

    transport: TransportLayer
    bindings: BindingManager
    inbound: Inbound

    async def close(self) -> None:
        await self.bindings.close()
        self.inbound.close()
        await self.transport.close()


async def start_relay(config: Config) -> Relay:
    sip = config.sip
    settings = TransportSettings(
        host=sip.host,
        udp_port=sip.udp_port,
        tcp_port=sip.tcp_port,
        advertise=sip.advertise,
        keepalive=sip.keepalive,
    )
    bindings: BindingManager | None = None

    def dispatch(message: Message | ParseError, flow: Flow) -> None:
        assert bindings is not None
        bindings.dispatch(message, flow)

    transport = TransportLayer(dispatch, settings)
    resolver = Resolver(list(config.dns.nameservers) or None, timeout=config.dns.timeout)
    inbound = Inbound()
    bindings = BindingManager(transport, resolver, on_request=inbound.handle)
    await transport.start()
    return Relay(transport, bindings, inbound)


async def serve(config: Config) -> None:
    """Run until SIGINT or SIGTERM."""
    for warning in config.warnings:
        log.warning("config: %s", warning)
    relay = await start_relay(config)
    ports = ", ".join(f"{name} {port}" for name, port in relay.transport.listening.items())
    log.info("SIP endpoint listening on %s (%s)", config.sip.host, ports)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await relay.close()
