"""The bindings manager: runs every account's registration session over real flows.

Theory of operation
-------------------
Each ``Binding`` pairs a sans-IO ``RegistrationSession`` with the flow it
registers through and one timer.  After anything happens to a binding (it
is added, a response arrives, its timer fires, its flow dies) ``_drive``
does the same three things: send what the session queued, open a flow if
the session needs one and has something to send, and re-arm the timer at
the session's deadline.

Flows come from RFC 3263 resolution of the session's target, tried in
order; a target that gave no answer is skipped on the next attempt, so a
dead server fails over to the next one.  Stream flows are shared between
bindings (``TransportLayer`` pools them); when one dies, every binding on it
re-registers through a new one.  Responses find their binding by Call-ID;
requests go to ``on_request``.

New REGISTER transactions (initial, refresh, retry; not the answer to a
challenge, nor an un-REGISTER) leave at most ``register_rate`` per second
(``sipis.pacer``): a binding whose time has come takes the next slot, and
when that slot lies ahead its timer is moved to it.  Hence a restart, a
take-over or the end of an outage reaches the registrar as a steady rate.

A node of a cluster may send REGISTERs only while it holds the leases of
its shards.  While ``may_send`` says no (a node that was paused past its
lease and has not yet learnt whether it still holds them), timers are put
off and answers dropped, so that no REGISTER leaves that could replace the
contact of the shard's new owner at the registrar.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterator

from sipis.pacer import Pacer
from sipis.scheduler import Scheduler
from sipis.sip.message import Message, ParseError, Request, Response
from sipis.sip.registration import (
    Backoff,
    RegistrationConfig,
    RegistrationSession,
    RegistrationState,
    RegistrationStatus,
)
from sipis.sip.transaction import DEFAULT_TIMERS, Timers
from sipis.sip.uri import SipUri
from sipis.transport.flow import Flow, FlowClosed
from sipis.transport.layer import TransportLayer
from sipis.transport.policy import TargetPolicy
from sipis.transport.resolver import ResolveError, Resolver, Target

log = logging.getLogger(__name__)

RequestHandler = Callable[[Request | ParseError, Flow], None]
# How long a binding waits before asking ``may_send`` again.
HOLD_RETRY = 1.0


class Binding:
    """One account's registration and the flow it currently uses."""

    __slots__ = (
        "_connecting",
        "_index_target",
        "_stopped",
        "_target_index",
        "due",
        "flow",
        "key",
        "manager",
        "reported",
        "session",
        "slot",
        "verify_tls",
    )

    def __init__(
        self, manager: BindingManager, key: str, session: RegistrationSession, verify_tls: bool
    ) -> None:
        self.manager = manager
        self.key = key
        self.session = session
        self.verify_tls = verify_tls
        self.flow: Flow | None = None
        self.due: float | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._target_index = 0
        self._index_target: SipUri | None = None
        self._stopped: asyncio.Future[None] | None = None
        # the state ``on_state`` was last told of
        self.reported: RegistrationState | None = None
        # the time the pacer reserved for this binding's next REGISTER, while it waits
        self.slot: float | None = None

    def flow_lost(self, flow: Flow) -> None:
        """Close listener of the binding's flow (a bound method, so it can be forgotten)."""
        self.manager._flow_lost(self, flow)


class BindingManager:
    """Keeps a registration alive for every binding added to it."""

    def __init__(
        self,
        transport: TransportLayer,
        resolver: Resolver,
        *,
        on_request: RequestHandler,
        on_exchange: Callable[[int | None, float], None] | None = None,
        on_state: Callable[[Binding], None] | None = None,
        rng: random.Random | None = None,
        timers: Timers = DEFAULT_TIMERS,
        backoff: Backoff = Backoff(),  # noqa: B008 - immutable
        policy: TargetPolicy | None = None,
        register_rate: float = 0.0,
    ) -> None:
        self._transport = transport
        # told of every REGISTER transaction that ends: its final status (None: no answer)
        # and how long it took
        self._on_exchange = on_exchange
        # told whenever a binding's registration state changes
        self._on_state = on_state
        self.may_send: Callable[[], bool] = lambda: True
        # new REGISTERs per second, at most (0: no limit)
        self.pacer = Pacer(register_rate)
        self._timers = timers
        self._backoff = backoff
        self._resolver = resolver
        # addresses REGISTERs may not go to (None: any)
        self.policy = policy
        self._on_request = on_request
        self._rng = rng or random.Random()
        self._bindings: dict[str, Binding] = {}
        self._by_call_id: dict[str, Binding] = {}
        self._by_contact_user: dict[str, Binding] = {}
        self._loop = asyncio.get_running_loop()
        self._scheduler: Scheduler[Binding] = Scheduler(self._loop, self._fire)

    # -- the public surface ------------------------------------------------------------

    def add(
        self, key: str, config: RegistrationConfig, *, verify_tls: bool = True, delay: float = 0.0
    ) -> Binding:
        """Start registering ``config`` under ``key`` (after ``delay`` seconds)."""
        if key in self._bindings:
            raise KeyError(f"binding {key!r} exists")
        session = RegistrationSession(
            config, rng=self._rng, timers=self._timers, backoff=self._backoff
        )
        binding = Binding(self, key, session, verify_tls)
        self._bindings[key] = binding
        self._by_call_id[session.call_id] = binding
        self._by_contact_user[config.contact_user] = binding
        session.start(self._loop.time(), delay)
        self._drive(binding)
        return binding

    async def remove(self, key: str, *, unregister: bool = True, timeout: float = 5.0) -> None:
        """Stop a binding: un-REGISTER it (waiting at most ``timeout``), then forget it."""
        binding = self._bindings.get(key)
        if binding is None:
            return
        session = binding.session
        if unregister:
            binding._stopped = self._loop.create_future()
            session.stop(self._loop.time())
            self._drive(binding)
            if session.state is not RegistrationState.STOPPED:
                try:
                    async with asyncio.timeout(timeout):
                        await binding._stopped
                except TimeoutError:
                    log.info("binding %s: no answer to the un-REGISTER", key)
        self._forget(binding)

    def status(self, key: str) -> RegistrationStatus:
        return self._bindings[key].session.status(self._loop.time())

    def __iter__(self) -> Iterator[Binding]:
        return iter(self._bindings.values())

    def __len__(self) -> int:
        return len(self._bindings)

    def get(self, key: str) -> Binding | None:
        return self._bindings.get(key)

    def by_contact_user(self, user: str) -> Binding | None:
        """The binding whose Contact carries this (unguessable) user part."""
        return self._by_contact_user.get(user)

    async def close(self, *, unregister: bool = False, timeout: float = 5.0) -> None:
        await asyncio.gather(
            *(self.remove(k, unregister=unregister, timeout=timeout) for k in list(self._bindings))
        )
        self._scheduler.close()

    def dispatch(self, message: Message | ParseError, flow: Flow) -> None:
        """Everything the transport layer receives comes here."""
        if isinstance(message, Response):
            binding = self._by_call_id.get(message.call_id)
            if binding is not None and self.may_send():
                log.debug("binding %s: %d %s", binding.key, message.status, message.reason)
                binding.session.receive(message, self._loop.time())
                self._drive(binding)
        elif isinstance(message, Request) or (
            isinstance(message, ParseError) and isinstance(message.partial, Request)
        ):
            self._on_request(message, flow)

    # -- driving -------------------------------------------------------------------

    def _drive(self, binding: Binding) -> None:
        session = binding.session
        now = self._loop.time()
        outgoing = session.outgoing()
        if outgoing:
            flow = binding.flow
            try:
                if flow is None:
                    raise FlowClosed("no flow")
                for data in outgoing:
                    flow.send(data)
            except FlowClosed:
                session.transport_failed(now)
        deadline = session.deadline
        if (
            session.needs_flow
            and deadline is not None
            and deadline <= now
            and binding._connecting is None
            and binding.key in self._bindings
        ):
            binding._connecting = asyncio.ensure_future(self._open_flow(binding))
        if binding.slot is not None:
            if deadline is not None and session.register_due(now):
                deadline = binding.slot  # waiting for its turn
            else:
                binding.slot = None
        self._scheduler.schedule(binding, deadline if binding._connecting is None else None)
        stopped = binding._stopped
        if (
            session.state is RegistrationState.STOPPED
            and stopped is not None
            and not stopped.done()
        ):
            stopped.set_result(None)
        if session.completed is not None:
            if self._on_exchange is not None:
                self._on_exchange(*session.completed)
            session.completed = None
        if self._on_state is not None and binding.reported is not session.state:
            binding.reported = session.state
            self._on_state(binding)

    def _fire(self, binding: Binding) -> None:
        if self._held(binding) or self._paced(binding):
            return
        binding.session.on_timer(self._loop.time())
        self._drive(binding)

    def _paced(self, binding: Binding) -> bool:
        """Hold a new REGISTER back until the binding's slot; False if it may leave now."""
        now = self._loop.time()
        if not binding.session.register_due(now):
            return False
        if binding.slot is None:
            binding.slot = self.pacer.slot(now)
        if binding.slot <= now:
            binding.slot = None
            return False
        self._scheduler.schedule(binding, binding.slot)
        return True

    def _held(self, binding: Binding) -> bool:
        """Put the binding's timer off if REGISTERs may not leave now."""
        if self.may_send():
            return False
        self._scheduler.schedule(binding, self._loop.time() + HOLD_RETRY)
        return True

    async def _open_flow(self, binding: Binding) -> None:
        session = binding.session
        target_uri = session.target
        try:
            targets = await self._resolver.resolve(
                target_uri.host,
                target_uri.port,
                target_uri.transport,
                target_uri.secure,
            )
            targets = self._allowed(targets)
            flow, index = await self._first_flow(binding, targets)
        except (ResolveError, ConnectionError, OSError, TimeoutError) as exc:
            self._no_flow(binding, _reason(exc))
            return
        except Exception:
            # A failure nobody foresaw must not leave the binding waiting forever.
            log.exception("binding %s: opening a flow to %s failed", binding.key, target_uri)
            self._no_flow(binding, "internal error")
            return
        binding._connecting = None
        if binding.key not in self._bindings:
            return
        binding._target_index = index
        self._use_flow(binding, flow)
        self._fire(binding)

    def _allowed(self, targets: list[Target]) -> list[Target]:
        """The targets the policy allows; ConnectionError naming why if none is left."""
        if self.policy is None:
            return targets
        refusals = [(t, self.policy.refusal(t.address, t.port)) for t in targets]
        allowed = [t for t, refusal in refusals if refusal is None]
        if not allowed and refusals:
            target, refusal = refusals[0]
            raise ConnectionError(f"{target.address} is {refusal}, not allowed as a registrar")
        return allowed

    def _no_flow(self, binding: Binding, reason: str) -> None:
        binding._connecting = None
        binding.session.flow_failed(self._loop.time(), reason)
        log.info("binding %s: no flow to %s: %s", binding.key, binding.session.target, reason)
        self._drive(binding)

    async def _first_flow(self, binding: Binding, targets: list[Target]) -> tuple[Flow, int]:
        """Try the targets in order, starting after the one that last went silent.

        A session that asks for a new flow while its flow is still up got no
        answer through it: that target is skipped this time.  After a
        redirect the count starts again from the first target.
        """
        target_uri = binding.session.target
        if binding._index_target is not target_uri:
            binding._index_target = target_uri
            binding._target_index = 0
        elif binding.flow is not None and binding.flow.alive:
            binding._target_index += 1
        start = binding._target_index % len(targets)
        last_error: Exception = ConnectionError("no target")
        for offset in range(len(targets)):
            index = (start + offset) % len(targets)
            try:
                flow = await self._transport.flow_to(targets[index], verify_tls=binding.verify_tls)
            except (ConnectionError, OSError, TimeoutError) as exc:
                last_error = exc
                continue
            return flow, index
        raise last_error

    def _use_flow(self, binding: Binding, flow: Flow) -> None:
        if binding.flow is not None:
            binding.flow.forget(binding.flow_lost)
        binding.flow = flow
        flow.on_close(binding.flow_lost)
        binding.session.bind(flow.local)

    def _flow_lost(self, binding: Binding, flow: Flow) -> None:
        if binding.flow is not flow:
            return
        binding.flow = None
        binding.session.transport_failed(self._loop.time())
        self._drive(binding)

    def _forget(self, binding: Binding) -> None:
        self._scheduler.schedule(binding, None)
        if binding._connecting is not None:
            binding._connecting.cancel()
        if binding.flow is not None:
            binding.flow.forget(binding.flow_lost)
        self._bindings.pop(binding.key, None)
        self._by_call_id.pop(binding.session.call_id, None)
        if self._by_contact_user.get(binding.session.config.contact_user) is binding:
            del self._by_contact_user[binding.session.config.contact_user]


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
