"""The transport layer: a UDP endpoint, TCP/TLS listeners and a pool of shared stream flows.

``flow_to(target)`` returns the flow towards a resolved target.  Stream
flows are shared: every binding towards the same (transport, address, port,
TLS name, verification) uses one connection, and concurrent callers wait for
the same connect.  Everything received, on any flow, goes to ``dispatch``.

Connections peers open to the listeners are counted by one ``Admission``
and held to ``TransportSettings.limits`` (see ``sipis.transport.stream``).
For those limits to be what refuses connections, rather than running out
of file descriptors (after which asyncio stops accepting on every socket
for a while), ``start`` raises the process's soft open-file limit to its
hard limit, and warns when even that leaves too few.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import ssl
from dataclasses import dataclass, field

from .admission import Admission, ConnectionLimits
from .flow import Flow
from .resolver import Target
from .stream import StreamFlow, open_stream, stream_server_factory
from .udp import Dispatch, UdpEndpoint

log = logging.getLogger(__name__)

_PoolKey = tuple[str, str, int, str, bool]

# Descriptors wanted beyond the connection limit: the other side's listeners and
# connections, the API, the store, outgoing flows, files.
DESCRIPTOR_HEADROOM = 1024
# Connections the kernel queues until they are accepted (and counted, or refused) during
# a burst; asyncio's default of 100 would drop the handshakes of a burst, legitimate ones
# included.  The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024


@dataclass(frozen=True, slots=True)
class TransportSettings:
    """Where to listen, what to advertise, how to keep flows alive and whom to trust."""

    host: str = "0.0.0.0"  # noqa: S104 - the SIP endpoint serves every interface by default
    udp_port: int | None = 5060
    tcp_port: int | None = None
    tls_port: int | None = None
    advertise: str | None = None
    keepalive: float = 30.0
    # whether connections peers open to us are pinged too (the device port's apps)
    ping_accepted: bool = False
    connect_timeout: float = 5.0
    ca_file: str | None = None
    server_tls: ssl.SSLContext | None = None
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)


class TransportLayer:
    """Owns every socket sipis speaks SIP on."""

    def __init__(self, dispatch: Dispatch, settings: TransportSettings) -> None:
        self._dispatch = dispatch
        self.settings = settings
        self.udp: UdpEndpoint | None = None
        self._servers: list[asyncio.Server] = []
        self._pool: dict[_PoolKey, StreamFlow] = {}
        self._connecting: dict[_PoolKey, asyncio.Task[StreamFlow]] = {}
        self.admission = Admission(settings.limits)
        self._tls_verified = ssl.create_default_context(cafile=settings.ca_file)
        self._tls_verified.minimum_version = ssl.TLSVersion.TLSv1_2
        self._tls_unverified = ssl.create_default_context()
        self._tls_unverified.check_hostname = False
        self._tls_unverified.verify_mode = ssl.CERT_NONE

    async def start(self) -> None:
        s = self.settings
        if s.udp_port is not None:
            self.udp = await UdpEndpoint.open(s.host, s.udp_port, self._dispatch, s.advertise)
        if s.tcp_port is None and s.tls_port is None:
            return
        if s.tls_port is not None and s.server_tls is None:
            raise ValueError("a TLS port needs a server certificate")
        self._check_descriptors()
        loop = asyncio.get_running_loop()
        keepalive = s.keepalive if s.ping_accepted else None
        for port, tls in ((s.tcp_port, None), (s.tls_port, s.server_tls)):
            if port is not None:
                factory = stream_server_factory(
                    self._dispatch, tls=tls, keepalive=keepalive, admission=self.admission
                )
                server = await loop.create_server(factory, s.host, port, backlog=LISTEN_BACKLOG)
                self._servers.append(server)

    def _check_descriptors(self) -> None:
        available = raise_descriptor_limit()
        wanted = self.settings.limits.max_connections + DESCRIPTOR_HEADROOM
        if available < wanted:
            log.warning(
                "only %d open files allowed: connections may fail before the limit of %d is "
                "reached (raise LimitNOFILE or lower max_connections)",
                available,
                self.settings.limits.max_connections,
            )

    @property
    def listening(self) -> dict[str, int]:
        """The ports actually bound, by transport (useful when configured as 0)."""
        ports: dict[str, int] = {}
        if self.udp is not None:
            ports["udp"] = self.udp.port
        names = [n for n in ("tcp", "tls") if getattr(self.settings, f"{n}_port") is not None]
        for name, server in zip(names, self._servers, strict=True):
            ports[name] = server.sockets[0].getsockname()[1]
        return ports

    async def flow_to(self, target: Target, *, verify_tls: bool = True) -> Flow:
        """The flow to ``target``: the shared UDP one, or a pooled (new if need be) connection."""
        if target.transport == "udp":
            if self.udp is None:
                raise ConnectionError("the UDP endpoint is not open")
            flow = self.udp.flow((target.address, target.port), self.settings.keepalive)
            if flow.alive:
                return flow
            raise ConnectionError(f"udp flow to {target.address}:{target.port} is closed")
        key: _PoolKey = (target.transport, target.address, target.port, target.host, verify_tls)
        pooled = self._pool.get(key)
        if pooled is not None and pooled.alive:
            return pooled
        task = self._connecting.get(key)
        if task is None:
            task = asyncio.ensure_future(self._connect(key, target, verify_tls))
            self._connecting[key] = task
            task.add_done_callback(lambda _: self._connecting.pop(key, None))
        return await asyncio.shield(task)

    async def _connect(self, key: _PoolKey, target: Target, verify_tls: bool) -> StreamFlow:
        tls = None
        if target.transport == "tls":
            tls = self._tls_verified if verify_tls else self._tls_unverified
        flow = await open_stream(
            target.address,
            target.port,
            self._dispatch,
            tls=tls,
            server_name=target.host,
            keepalive=self.settings.keepalive,
            timeout=self.settings.connect_timeout,
        )
        self._pool[key] = flow

        def unpool(closed: Flow) -> None:
            if self._pool.get(key) is closed:
                del self._pool[key]

        flow.on_close(unpool)
        return flow

    @property
    def connections(self) -> int:
        """Connections held: pooled ones this side opened, and accepted ones (in handshake too)."""
        return len(self._pool) + len(self.admission)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._connecting.values()):
            task.cancel()
        for flow in [*self._pool.values(), *self.admission.flows]:
            flow.close()
        if self.udp is not None:
            self.udp.close()
        for server in self._servers:
            await server.wait_closed()


def raise_descriptor_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; return the soft limit.

    The soft limit is often 1024 while the hard limit allows far more; a
    server holding thousands of connections is expected to raise it itself.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and soft != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
        soft = hard
    return 2**31 - 1 if soft == resource.RLIM_INFINITY else soft
