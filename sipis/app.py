"""The composition root: builds the relay's parts from a Config and runs them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import signal
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import generate_latest

from sipis import __version__
from sipis.api.devcert import development_certificate
from sipis.api.server import Api, ApiSettings
from sipis.audit import AuditKeys
from sipis.bindings import Binding, BindingManager
from sipis.calls import Calls
from sipis.client_transactions import ClientTransactions
from sipis.cluster import ClusterNode
from sipis.config import Config
from sipis.crypto import HpkeKeyring, MasterKeyring
from sipis.devices import Devices
from sipis.inbound import Inbound
from sipis.instances import Instances, LifetimeBounds
from sipis.lifecycle import Sweeper
from sipis.metrics import Metrics, Snapshot
from sipis.push.apns import ApnsCertificate, ApnsProvider, ApnsTokenKey
from sipis.push.base import Provider, Routing
from sipis.push.fcm import FcmProvider
from sipis.push.logged import LoggingProvider
from sipis.push.sender import PushSender
from sipis.relay import DialogRelay
from sipis.server_transactions import ServerTransaction
from sipis.sip.message import Message, ParseError, Request, Response
from sipis.sip.registration import RegistrationState
from sipis.store.base import ClusterStore, Store
from sipis.store.postgres import PostgresStore
from sipis.store.sqlite import SqliteStore
from sipis.transport.admission import ConnectionLimits
from sipis.transport.flow import Flow
from sipis.transport.layer import TransportLayer, TransportSettings
from sipis.transport.policy import TargetPolicy
from sipis.transport.resolver import Resolver
from sipis.transport.udp import uri_host

log = logging.getLogger("sipis")

# Collections of the middle generation between two full collections (CPython's default: 10).
FULL_COLLECTION_EVERY = 100
# seconds between moves of the objects alive into the collector's permanent generation
FREEZE_EVERY = 600.0


@dataclass
class Keys:
    master: MasterKeyring
    hpke: HpkeKeyring
    audit: AuditKeys


def open_keys(config: Config) -> Keys:
    directory = config.keys_dir
    grace = config.keys.hpke_grace_days * 86400
    return Keys(
        master=MasterKeyring.load_or_create(directory / "master.json"),
        hpke=HpkeKeyring.load_or_create(directory / "hpke.json", grace=grace),
        audit=AuditKeys.load_or_create(directory / "audit.json"),
    )


def open_store(config: Config) -> Store:
    """PostgreSQL when ``store.url`` names one (a cluster), else SQLite in the data directory."""
    if config.store.url is not None:
        return PostgresStore(config.store.url)
    return SqliteStore(config.data_dir / "sipis.db")


@dataclass
class Relay:
    """The running parts, for whoever drives them (``serve``, tests, benchmarks)."""

    config: Config
    store: Store
    keys: Keys
    transport: TransportLayer
    bindings: BindingManager
    inbound: Inbound
    instances: Instances
    sweeper: Sweeper
    metrics: Metrics
    sender: PushSender
    calls: Calls
    clients: ClientTransactions
    device_transport: TransportLayer
    device_inbound: Inbound
    devices: Devices
    dialogs: DialogRelay
    cluster: ClusterNode | None = None
    api: web.AppRunner | None = None
    api_port: int | None = None
    started_at: float = field(default_factory=time.time)

    async def close(self) -> None:
        """Stop gracefully: take no more requests, end held calls, let in-flight pushes
        finish, sign the purge log's head, and un-REGISTER only if configured to."""
        if self.api is not None:
            await self.api.cleanup()
        await self.sweeper.stop()
        await self.calls.close()
        await self.dialogs.close()
        await self.devices.close()
        await self.sender.close()
        await self.instances.checkpoint()
        life = self.config.lifecycle
        await self.bindings.close(
            unregister=life.unregister_on_shutdown, timeout=life.unregister_wait
        )
        if self.cluster is not None:
            await self.cluster.leave()
        self.inbound.close()
        self.device_inbound.close()
        self.clients.close()
        await self.device_transport.close()
        await self.transport.close()
        await self.store.close()


async def start_relay(
    config: Config, *, api: bool = True, providers: Mapping[str, Provider] | None = None
) -> Relay:
    """Build and start everything; ``providers`` (by platform) replace the configured ones."""
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys = open_keys(config)
    store = open_store(config)
    await store.open()
    sip, device = config.sip, config.device
    bindings: BindingManager | None = None
    calls: Calls | None = None
    dialogs: DialogRelay | None = None
    devices: Devices | None = None
    cluster: ClusterNode | None = None
    clients = ClientTransactions()

    # The provider's side: registrations, calls and messages arriving on them, dialogs.
    def binding_changed(binding: Binding) -> None:
        if cluster is not None:
            cluster.binding_changed(binding)

    def dispatch(message: Message | ParseError, flow: Flow) -> None:
        assert bindings is not None
        if isinstance(message, Response) and clients.receive(message):
            return
        bindings.dispatch(message, flow)

    def admit(request: Request, flow: Flow) -> Response | None:
        assert calls is not None
        assert dialogs is not None
        return None if dialogs.claims(request) else calls.admit(request, flow)

    def on_request(transaction: ServerTransaction) -> None:
        assert calls is not None
        assert dialogs is not None
        if dialogs.claims(transaction.request):
            dialogs.upstream_request(transaction)
        else:
            calls.on_request(transaction)

    def on_ack(request: Request, flow: Flow) -> None:
        assert dialogs is not None
        dialogs.upstream_ack(request, flow)

    transport = TransportLayer(
        dispatch,
        TransportSettings(
            host=sip.host,
            udp_port=sip.udp_port,
            tcp_port=sip.tcp_port,
            advertise=sip.advertise,
            keepalive=sip.keepalive,
            limits=ConnectionLimits(
                max_connections=sip.max_connections,
                max_per_source=sip.max_connections_per_source,
                idle_timeout=sip.idle_timeout,
            ),
        ),
    )
    resolver = Resolver(list(config.dns.nameservers) or None, timeout=config.dns.timeout)
    inbound = Inbound(on_request, admit=admit, on_ack=on_ack)
    metrics = Metrics()
    await transport.start()
    bindings = BindingManager(
        transport,
        resolver,
        on_request=inbound.handle,
        on_exchange=metrics.register_exchange,
        on_state=binding_changed if config.clustered else None,
        register_rate=sip.register_rate,
    )

    # The device side: apps registering, and their half of each dialog.
    def device_dispatch(message: Message | ParseError, flow: Flow) -> None:
        if isinstance(message, Response):
            clients.receive(message)
        elif isinstance(message, Request | ParseError):
            device_inbound.handle(message, flow)

    def device_admit(request: Request, flow: Flow) -> Response | None:
        assert dialogs is not None
        return dialogs.device_admit(request, flow)

    def device_request(transaction: ServerTransaction) -> None:
        assert dialogs is not None
        assert devices is not None
        if transaction.request.method == "REGISTER":
            devices.register(transaction)
        else:
            dialogs.device_request(transaction)

    def device_ack(request: Request, flow: Flow) -> None:
        assert dialogs is not None
        dialogs.device_ack(request, flow)

    device_inbound = Inbound(device_request, admit=device_admit, on_ack=device_ack)
    device_transport = TransportLayer(
        device_dispatch,
        TransportSettings(
            host=device.host,
            udp_port=device.udp_port,
            tcp_port=device.tcp_port,
            tls_port=device.tls_port,
            advertise=device.advertise,
            keepalive=device.keepalive,
            server_tls=None if device.tls_port is None else _device_tls(config),
            ping_accepted=True,
            limits=ConnectionLimits(
                max_connections=device.max_connections,
                max_per_source=device.max_connections_per_source,
                handshake_timeout=device.handshake_timeout,
                idle_timeout=device.idle_timeout,
            ),
        ),
    )
    await device_transport.start()
    bindings.policy = _server_policy(config, [transport, device_transport])

    life = config.lifecycle
    if config.clustered:
        assert isinstance(store, PostgresStore)
        cluster = _cluster_node(config, store, bindings, metrics, transport, device_transport)
    instances = Instances(
        store,
        keys.master,
        keys.audit,
        bindings,
        bounds=LifetimeBounds(
            life.min_lifetime_days * life.day, life.max_lifetime_days * life.day, life.day
        ),
        unregister_wait=life.unregister_wait,
        realm=device.realm,
        ownership=cluster,
    )
    sender = PushSender(
        providers if providers is not None else push_providers(config),
        metrics,
        on_token_invalid=lambda instance_id: instances.erase(instance_id, "token_invalid"),
    )
    calls = Calls(
        bindings,
        instances,
        sender,
        metrics,
        ring_timeout=config.push.ring_timeout,
        relay_uri=config.push.relay_uri or _device_uri(config, device_transport),
        max_message=config.push.max_message,
    )
    calls.transactions = inbound.transactions
    dialogs = DialogRelay(
        calls,
        instances,
        metrics,
        clients,
        transport,
        resolver,
        upstream=inbound.transactions,
        device_side=device_inbound.transactions,
        device_host=device.advertise,
        grace=device.grace,
    )
    devices = Devices(
        instances,
        realm=device.realm,
        algorithms=device.digest_algorithms,
        max_failures=device.max_failures,
        udp=device_transport.udp,
        on_registered=dialogs.device_registered,
        on_gone=dialogs.device_gone,
    )
    dialogs.devices = devices
    calls.handoff = dialogs
    instances.expiring_hooks.append(calls.notify_expiring)
    instances.erased_hooks.append(calls.notify_erased)

    async def forget_erased(routing: Routing, reason: str) -> None:
        assert dialogs is not None
        dialogs.instance_erased(routing.instance_id)

    instances.erased_hooks.append(forget_erased)
    metrics.watch(lambda: _snapshot(instances, bindings, devices, dialogs))
    if cluster is None:
        started = await instances.start(spread=life.startup_spread)
        if started:
            paced = bindings.pacer.span(started)
            log.info(
                "registering %d stored account(s) over %.0f s",
                started,
                paced or life.startup_spread,
            )
            if paced > life.startup_spread:
                log.warning(
                    "%d accounts at sip.register_rate %g/s take %.0f s, longer than "
                    "lifecycle.startup_spread (%.0f s)",
                    started, sip.register_rate, paced, life.startup_spread,
                )  # fmt: skip
    else:
        await instances.start(spread=life.startup_spread)
        await cluster.start(instances)
    sweeper = Sweeper(instances, life.sweep_interval)
    sweeper.start()
    relay = Relay(
        config,
        store,
        keys,
        transport,
        bindings,
        inbound,
        instances,
        sweeper,
        metrics,
        sender,
        calls,
        clients,
        device_transport,
        device_inbound,
        devices,
        dialogs,
        cluster,
    )
    if api:
        await _start_api(relay)
    return relay


def _server_policy(config: Config, transports: list[TransportLayer]) -> TargetPolicy:
    """Where registrars may not be: not globally routable addresses outside
    ``sip.allowed_networks``, and this relay's own SIP, device and API ports."""
    hosts = {config.sip.host, config.device.host, config.api.host}
    hosts |= {h for h in (config.sip.advertise, config.device.advertise) if h}
    addresses = {h.strip("[]") for h in hosts if _is_address(h.strip("[]"))}
    if hosts & {"0.0.0.0", "::"}:  # noqa: S104 - a wildcard bind: every address of the host
        with contextlib.suppress(OSError):
            addresses |= {
                str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None)
            }
    ports = {port for t in transports for port in t.listening.values()} | {config.api.port}
    own = [(address, port) for address in addresses for port in ports if port]
    return TargetPolicy.build(config.sip.allowed_networks, own)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _cluster_node(
    config: Config,
    store: ClusterStore,
    bindings: BindingManager,
    metrics: Metrics,
    transport: TransportLayer,
    device_transport: TransportLayer,
) -> ClusterNode:
    cluster = config.cluster
    node = cluster.node or f"{socket.gethostname()}:{transport.listening['udp']}"
    return ClusterNode(
        store,
        node,
        config.push.relay_uri or _device_uri(config, device_transport),
        bindings,
        metrics,
        lease=cluster.lease,
        takeover_spread=cluster.takeover_spread,
    )


def push_providers(config: Config) -> dict[str, Provider]:
    """The push providers the configuration names; pushes are logged for the others."""
    apns, fcm = config.apns, config.fcm
    providers: dict[str, Provider] = {}
    if apns.configured:
        credentials: ApnsTokenKey | ApnsCertificate
        if apns.key_file is not None:
            credentials = ApnsTokenKey(Path(apns.key_file), apns.key_id or "", apns.team_id or "")
        else:
            assert apns.certificate is not None
            credentials = ApnsCertificate(Path(apns.certificate))
        providers["ios"] = ApnsProvider(
            credentials,
            servers={
                "production": _host_port(apns.production_server),
                "sandbox": _host_port(apns.sandbox_server),
            },
            ca_file=Path(apns.ca_file) if apns.ca_file else None,
            timeout=apns.timeout,
        )
    if fcm.configured:
        assert fcm.service_account is not None
        providers["android"] = FcmProvider(
            Path(fcm.service_account),
            send_url_base=fcm.send_url,
            token_uri=fcm.token_uri,
            ca_file=Path(fcm.ca_file) if fcm.ca_file else None,
            timeout=fcm.timeout,
            call_ttl=fcm.call_ttl,
        )
    for platform, service in (("ios", "APNs"), ("android", "FCM")):
        if platform not in providers:
            log.warning("no %s credentials configured: %s pushes are logged, not sent",
                        service, platform)  # fmt: skip
            providers[platform] = LoggingProvider(platform)
    return providers


def _host_port(server: str) -> tuple[str, int]:
    host, _, port = server.rpartition(":")
    return host, int(port)


def _device_host(config: Config) -> str:
    """The host apps are told to reach the device port at."""
    device = config.device
    if device.advertise:
        return device.advertise
    if device.host not in ("0.0.0.0", "::"):  # noqa: S104 - a wildcard bind names no host
        return uri_host(device.host)
    return socket.getfqdn()


def _device_uris(config: Config, transport: TransportLayer) -> list[str]:
    """The device port's SIP URIs, TLS first."""
    host = _device_host(config)
    listening = transport.listening
    return [
        f"sip:{host}:{listening[name]};transport={name}"
        for name in ("tls", "tcp", "udp")
        if name in listening
    ]


def _device_uri(config: Config, transport: TransportLayer) -> str:
    return _device_uris(config, transport)[0]


def _device_tls(config: Config) -> ssl.SSLContext:
    device = config.device
    certificate, private_key = device.certificate, device.private_key
    if certificate is None or private_key is None:
        cert_path, key_path, _ = development_certificate(config.data_dir / "tls")
        certificate, private_key = str(cert_path), str(key_path)
        log.warning("no device.certificate configured: the device port uses the development "
                    "certificate (%s)", cert_path)  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, private_key)
    return context


def _info(relay: Relay) -> dict[str, Any]:
    return {"sip": _device_uris(relay.config, relay.device_transport)}


async def _stats(relay: Relay) -> dict[str, Any]:
    """The numbers an operator looks at first (``GET /v1/stats``, ``sipis status``)."""
    counts = await relay.store.counts()
    snapshot = _snapshot(relay.instances, relay.bindings, relay.devices, relay.dialogs)
    instances: dict[str, dict[str, int]] = {}
    for (platform, state), count in snapshot.instances.items():
        instances.setdefault(platform, {})[state] = count
    pushes: dict[str, dict[str, int]] = {}
    for (provider, outcome), value in relay.metrics.totals(
        "sipis_pushes", "provider", "outcome"
    ).items():
        pushes.setdefault(provider, {})[outcome] = int(value)
    return {
        "version": __version__,
        "uptime": round(time.time() - relay.started_at, 1),
        "instances": instances,
        "bindings": snapshot.bindings,
        "devices": snapshot.devices,
        "dialogs": snapshot.dialogs,
        "pushes": pushes,
        "calls": _by_label(relay.metrics, "sipis_calls"),
        "messages": _by_label(relay.metrics, "sipis_messages"),
        "purges": {k.split(".", 1)[1]: v for k, v in counts.items() if k.startswith("purges.")},
        "purge_log": {
            "entries": snapshot.purge_log_entries,
            "checkpoint_age": None
            if snapshot.checkpoint_age is None
            else round(snapshot.checkpoint_age, 1),
        },
        "cluster": None
        if relay.cluster is None
        else {
            "node": relay.cluster.node,
            "shards": len(relay.cluster.held),
            "nodes": relay.cluster.nodes,
        },
        "at": time.time(),
    }


def _by_label(metrics: Metrics, name: str) -> dict[str, int]:
    return {key[0]: int(value) for key, value in metrics.totals(name, "outcome").items()}


async def _start_api(relay: Relay) -> None:
    config = relay.config.api
    servers = relay.bindings.policy
    assert servers is not None
    api = Api(
        relay.instances,
        relay.keys.hpke,
        ApiSettings(
            config.admin_token,
            config.max_body,
            config.create_rate,
            config.create_burst,
            servers=servers,
        ),
        info=lambda: _info(relay),
        stats=lambda: _stats(relay),
        metrics=lambda: generate_latest(relay.metrics.registry),
    )
    runner = web.AppRunner(api.application(), access_log=None)
    await runner.setup()
    context: ssl.SSLContext | None = None
    if config.insecure_http:
        log.warning("the API speaks plain HTTP (api.insecure_http): for development only")
    else:
        certificate, private_key = config.certificate, config.private_key
        if certificate is None or private_key is None:
            cert_path, key_path, made = development_certificate(relay.config.data_dir / "tls")
            certificate, private_key = str(cert_path), str(key_path)
            log.warning(
                "no api.certificate configured: using a self-signed development certificate (%s%s)",
                cert_path,
                ", made now" if made else "",
            )
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(certificate, private_key)
    site = web.TCPSite(runner, config.host, config.port, ssl_context=context)
    await site.start()
    relay.api = runner
    relay.api_port = runner.addresses[0][1]


def _snapshot(
    instances: Instances, bindings: BindingManager, devices: Devices, dialogs: DialogRelay
) -> Snapshot:
    now = asyncio.get_running_loop().time()
    states: dict[str, int] = {}
    for binding in bindings:
        state = binding.session.status(now).state
        name = "paused" if state is RegistrationState.STOPPED else state.value
        states[name] = states.get(name, 0) + 1
    checkpointed = instances.checkpointed_at
    return Snapshot(
        instances=instances.counts(),
        bindings=states,
        devices=len(devices),
        dialogs=len(dialogs),
        erasures=dict(instances.erasures),
        purge_log_entries=instances.purge_entries,
        checkpoint_age=None if checkpointed is None else max(0.0, time.time() - checkpointed),
        register_backlog=bindings.pacer.backlog(now),
    )


def tune_garbage_collection() -> None:
    """Make CPython's full garbage collections ten times rarer.

    A full collection walks every object the process holds; with thousands
    of bindings and calls held it takes hundreds of milliseconds, during
    which no SIP message is handled.  By default one is considered every
    ten collections of the middle generation, which under call load means
    every few seconds.  What sipis lets go of is freed by reference counting
    (a finished transaction drops its callbacks, so no call's state is held
    by a cycle), so collecting the oldest generation less often costs
    little memory.
    """
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


def freeze_long_lived() -> None:
    """Take every object alive now out of the collector's sight (``gc.freeze``).

    What a node holds for long (bindings, sessions, instances) would
    otherwise be walked by every full collection: about 10 µs per binding,
    a pause of a second at 100,000 bindings.  Frozen, a full collection
    walks only what came since.  Young garbage is collected first; frozen
    objects are still freed by reference counting, and sipis leaves no
    long-lived cycles behind, so freezing costs no memory that would
    otherwise be reclaimed.
    """
    gc.collect(1)
    gc.freeze()


async def _freeze_long_lived_every(seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        freeze_long_lived()


async def serve(config: Config) -> None:
    """Run until SIGINT or SIGTERM."""
    for warning in config.warnings:
        log.warning("config: %s", warning)
    tune_garbage_collection()
    relay = await start_relay(config)
    freeze_long_lived()
    ports = ", ".join(f"{name} {port}" for name, port in relay.transport.listening.items())
    log.info("SIP endpoint listening on %s (%s)", config.sip.host, ports)
    log.info("device port: %s", ", ".join(_device_uris(config, relay.device_transport)))
    scheme = "http" if config.api.insecure_http else "https"
    log.info("API listening on %s://%s:%s", scheme, config.api.host, relay.api_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    progress = asyncio.ensure_future(_registration_progress(relay))
    freezing = asyncio.ensure_future(_freeze_long_lived_every(FREEZE_EVERY))
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        progress.cancel()
        freezing.cancel()
        await relay.close()
        log.info("stopped")


async def _registration_progress(relay: Relay, every: float = 10.0) -> None:
    """Log how the start-up registrations advance until none is left registering."""
    while True:
        await asyncio.sleep(every)
        states = _snapshot(relay.instances, relay.bindings, relay.devices, relay.dialogs).bindings
        registering = states.get("registering", 0)
        registered, failed = states.get("registered", 0), states.get("failed", 0)
        total = sum(states.values())
        log.info("bindings: %d of %d registered, %d registering, %d failed",
                 registered, total, registering, failed)  # fmt: skip
        if not registering:
            freeze_long_lived()  # the registered sessions are long-lived now
            return
