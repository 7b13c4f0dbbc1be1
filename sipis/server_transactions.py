"""Server transactions over real flows: the IO side of ``sipis.sip.transaction``.

Every request that is not a retransmission is first put to ``admit``: a
request it refuses is answered statelessly, once (a scanner or a spoofed
packet costs one datagram back and no memory).  Any other opens a
transaction, keyed as RFC 3261 §17.2.3 says, and goes to the handler once;
retransmissions and ACKs for non-2xx finals stay here, and any other ACK
(one for a 2xx, which has no transaction) goes to ``on_ack``.  Responses go
out over the flow the request came on (to the Via's rport/received address
on UDP), the transaction's timers (G, H, I, J, L) run on one shared
scheduler, and a terminated transaction is forgotten.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sipis.scheduler import Scheduler
from sipis.sip.message import Request, Response
from sipis.sip.transaction import (
    DEFAULT_TIMERS,
    ServerInviteTransaction,
    ServerNonInviteTransaction,
    State,
    Timers,
    server_key,
)
from sipis.transport.flow import Flow, FlowClosed

log = logging.getLogger(__name__)

# States in which the handler may still read the request and respond.
_OPEN = frozenset({State.TRYING, State.PROCEEDING})


class ServerTransaction:
    """One request being answered: respond through it, as often as the method allows."""

    __slots__ = ("_table", "arrived", "due", "flow", "key", "txn")

    def __init__(
        self,
        table: ServerTransactions,
        key: tuple[str, ...],
        txn: ServerInviteTransaction | ServerNonInviteTransaction,
        flow: Flow,
    ) -> None:
        self._table = table
        self.key = key
        self.txn = txn
        self.flow = flow
        self.due: float | None = None
        self.arrived = table.now()

    @property
    def request(self) -> Request:
        return self.txn.request

    def respond(self, response: Response) -> None:
        self.txn.respond(response, self._table.now())
        self._table.drive(self)

    def respond_statelessly(self, response: Response) -> None:
        """Send a final answer that is cheap to make again (a challenge, a refusal) and
        forget the transaction at once.

        RFC 3261 §8.2.7: a stateless UAS keeps no transaction; a retransmission
        of the request opens a new one and is answered anew.  A flood of
        requests that never authenticate then holds no memory past their
        answers, where a transaction would keep each for Timer J (32 s over
        UDP).  Not for INVITE, whose final answer is retransmitted until ACKed.
        """
        if not isinstance(self.txn, ServerNonInviteTransaction):
            raise TypeError("an INVITE's final answer needs its transaction")
        self.respond(response)
        self._table.forget(self)


class ServerTransactions:
    """The table of live server transactions and their timers."""

    def __init__(
        self,
        on_request: Callable[[ServerTransaction], None],
        *,
        admit: Callable[[Request, Flow], Response | None] | None = None,
        on_ack: Callable[[Request, Flow], None] | None = None,
        timers: Timers = DEFAULT_TIMERS,
    ) -> None:
        self._on_request = on_request
        self._admit = admit
        self._on_ack = on_ack
        self._timers = timers
        self._loop = asyncio.get_running_loop()
        self._table: dict[tuple[str, ...], ServerTransaction] = {}
        self._scheduler: Scheduler[ServerTransaction] = Scheduler(self._loop, self._fire)

    def now(self) -> float:
        return self._loop.time()

    def __len__(self) -> int:
        return len(self._table)

    def receive(self, request: Request, flow: Flow) -> None:
        key = server_key(request)
        existing = self._table.get(key)
        if request.method == "ACK":
            if existing is not None and isinstance(existing.txn, ServerInviteTransaction):
                existing.txn.receive_ack(self.now())
                self.drive(existing)
            elif self._on_ack is not None:
                self._on_ack(request, flow)  # an ACK for a 2xx: end to end, no transaction
            return
        if existing is not None:
            existing.txn.receive_retransmission()
            self.drive(existing)
            return
        refusal = self._admit(request, flow) if self._admit is not None else None
        if refusal is not None:
            # Answered once and forgotten: no state, no retransmissions, nothing to amplify.
            try:
                flow.reply(refusal.serialize(), request.via)
            except FlowClosed:
                log.debug("refusal not sent: %r is closed", flow)
            return
        reliable = flow.reliable
        txn: ServerInviteTransaction | ServerNonInviteTransaction
        if request.method == "INVITE":
            txn = ServerInviteTransaction(request, reliable=reliable, timers=self._timers)
        else:
            txn = ServerNonInviteTransaction(request, reliable=reliable, timers=self._timers)
        entry = self._table[key] = ServerTransaction(self, key, txn, flow)
        self._on_request(entry)

    def invite_cancelled_by(self, cancel: Request) -> ServerTransaction | None:
        """The INVITE transaction a CANCEL is for (RFC 3261 §9.2: same branch and sent-by)."""
        entry = self._table.get(server_key(cancel, method="INVITE"))
        return (
            entry if entry is not None and isinstance(entry.txn, ServerInviteTransaction) else None
        )

    def drive(self, entry: ServerTransaction) -> None:
        outgoing = entry.txn.outgoing()
        if outgoing:
            via = entry.request.via
            for data in outgoing:
                try:
                    entry.flow.reply(data, via)
                except FlowClosed:
                    log.debug("response not sent: %r is closed", entry.flow)
            if entry.txn.state not in _OPEN:
                entry.request.forget_parsed()  # kept only to absorb retransmissions now
        if entry.txn.terminated:
            self.forget(entry)
        else:
            self._scheduler.schedule(entry, entry.txn.deadline)

    def forget(self, entry: ServerTransaction) -> None:
        self._scheduler.schedule(entry, None)
        if self._table.get(entry.key) is entry:
            del self._table[entry.key]

    def _fire(self, entry: ServerTransaction) -> None:
        entry.txn.on_timer(self.now())
        self.drive(entry)

    def close(self) -> None:
        self._scheduler.close()
        self._table.clear()
