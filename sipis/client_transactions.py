"""Client transactions over real flows: the IO side of ``sipis.sip.transaction``.

``send`` starts an INVITE or non-INVITE client transaction for a request
over one flow and returns it.  Responses that reach any transport are put
to ``receive`` first: one whose top Via branch and CSeq method match a live
transaction goes to it, and what the transaction lets through goes to the
sender's ``on_response``.  A transaction that times out or cannot send
tells ``on_failure`` once.  Timers (A, B, D, E, F, K, M) run on one shared
scheduler; a terminated transaction is forgotten.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sipis.scheduler import Scheduler
from sipis.sip.message import Request, Response
from sipis.sip.transaction import (
    DEFAULT_TIMERS,
    ClientInviteTransaction,
    ClientNonInviteTransaction,
    TimedOut,
    Timers,
    client_key,
)
from sipis.transport.flow import Flow, FlowClosed

log = logging.getLogger(__name__)

OnResponse = Callable[[Response], None]
OnFailure = Callable[[TimedOut], None]


class ClientTransaction:
    """One request being sent: retransmitted until answered, its answers handed on."""

    __slots__ = ("_on_failure", "_on_response", "_table", "due", "flow", "txn")

    def __init__(
        self,
        table: ClientTransactions,
        txn: ClientInviteTransaction | ClientNonInviteTransaction,
        flow: Flow,
        on_response: OnResponse,
        on_failure: OnFailure | None,
    ) -> None:
        self._table = table
        self.txn = txn
        self.flow = flow
        self.due: float | None = None
        self._on_response = on_response
        self._on_failure = on_failure

    @property
    def request(self) -> Request:
        return self.txn.request

    @property
    def terminated(self) -> bool:
        return self.txn.terminated


class ClientTransactions:
    """The table of live client transactions and their timers."""

    def __init__(self, *, timers: Timers = DEFAULT_TIMERS) -> None:
        self._timers = timers
        self._loop = asyncio.get_running_loop()
        self._table: dict[tuple[str, str], ClientTransaction] = {}
        self._scheduler: Scheduler[ClientTransaction] = Scheduler(self._loop, self._fire)

    def __len__(self) -> int:
        return len(self._table)

    def send(
        self,
        request: Request,
        flow: Flow,
        on_response: OnResponse,
        on_failure: OnFailure | None = None,
    ) -> ClientTransaction:
        """Start a transaction for ``request`` (not an ACK: those are sent as they are)."""
        now = self._loop.time()
        txn: ClientInviteTransaction | ClientNonInviteTransaction
        if request.method == "INVITE":
            txn = ClientInviteTransaction(request, now, reliable=flow.reliable, timers=self._timers)
        else:
            txn = ClientNonInviteTransaction(
                request, now, reliable=flow.reliable, timers=self._timers
            )
        entry = ClientTransaction(self, txn, flow, on_response, on_failure)
        self._table[txn.key] = entry
        self._drive(entry)
        return entry

    def receive(self, response: Response) -> bool:
        """Hand ``response`` to its transaction; False if none is waiting for it."""
        branch = response.via.branch
        if branch is None:
            return False
        entry = self._table.get(client_key(branch, response.cseq.method))
        if entry is None:
            return False
        passed = entry.txn.receive(response, self._loop.time())
        self._drive(entry)
        if passed is not None:
            entry._on_response(passed)
        return True

    def _drive(self, entry: ClientTransaction) -> None:
        failure: TimedOut | None = None
        try:
            for data in entry.txn.outgoing():
                entry.flow.send(data)
        except FlowClosed:
            failure = entry.txn.transport_failed()
        if entry.txn.terminated:
            self._scheduler.schedule(entry, None)
            if self._table.get(entry.txn.key) is entry:
                del self._table[entry.txn.key]
        else:
            self._scheduler.schedule(entry, entry.txn.deadline)
        if failure is not None:
            self._failed(entry, failure)

    def _fire(self, entry: ClientTransaction) -> None:
        failure = entry.txn.on_timer(self._loop.time())
        self._drive(entry)
        if failure is not None:
            self._failed(entry, failure)

    def _failed(self, entry: ClientTransaction, failure: TimedOut) -> None:
        log.debug("%s to %r failed: %s", entry.request.method, entry.flow, failure.reason)
        if entry._on_failure is not None:
            entry._on_failure(failure)

    def close(self) -> None:
        self._scheduler.close()
        self._table.clear()
