"""Client transactions over real flows: the IO side of ``sipis.sip.transaction``.

``send`` starts an INVITE or non-INVITE client transaction for a request
over one flow and returns it.  Responses that reach any transport are put
to ``receive`` first: one whose top Via branch and CSeq method match a live
transaction goes to it, and what the transaction lets through goes to the
sender's ``on_response``.  A transaction that times out or cannot send
tells ``on_failure`` once.  Timers (A, B, D, E, F, K, M) run on one shared
scheduler; a terminated transaction is forgotten.

Cancelling an INVITE (RFC 3261 §9.1) is done here too: ``cancel`` sends the
CANCEL once the INVITE has had a provisional response (not before), and if
no final response follows within 64*T1 the INVITE is given up
(``on_failure``).  An INVITE sent with ``timer_c`` (RFC 3261 §16.8: a
proxy's bound on how long a callee may ring, restarted by every
provisional response) is cancelled when it runs out.
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
    State,
    TimedOut,
    Timers,
    cancel_for,
    client_key,
)
from sipis.transport.flow import Flow, FlowClosed

log = logging.getLogger(__name__)

# States after a final answer: the request is only matched against from here on.
_ANSWERED = frozenset({State.COMPLETED, State.ACCEPTED, State.TERMINATED})

OnResponse = Callable[[Response], None]
OnFailure = Callable[[TimedOut], None]


class ClientTransaction:
    """One request being sent: retransmitted until answered, its answers handed on."""

    __slots__ = (
        "_on_failure",
        "_on_response",
        "_table",
        "cancel_sent",
        "cancelling",
        "due",
        "flow",
        "timer",
        "timer_c",
        "txn",
    )

    def __init__(
        self,
        table: ClientTransactions,
        txn: ClientInviteTransaction | ClientNonInviteTransaction,
        flow: Flow,
        on_response: OnResponse | None,
        on_failure: OnFailure | None,
    ) -> None:
        self._table = table
        self.txn = txn
        self.flow = flow
        self.due: float | None = None
        self._on_response = on_response
        self._on_failure = on_failure
        self.cancelling = False
        self.cancel_sent = False
        self.timer_c: float | None = None
        # Timer C while the INVITE may ring; after its CANCEL, the wait for a final answer
        self.timer: asyncio.TimerHandle | None = None

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
        *,
        timer_c: float | None = None,
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
        if timer_c is not None:
            entry.timer_c = timer_c
            entry.timer = self._loop.call_later(timer_c, self._timer_c_fired, entry)
        self._drive(entry)
        return entry

    def cancel(self, entry: ClientTransaction) -> None:
        """Cancel a pending INVITE: now if it had a provisional response, else at its first."""
        if not isinstance(entry.txn, ClientInviteTransaction) or entry.cancelling:
            return
        if entry.txn.state not in (State.CALLING, State.PROCEEDING):
            return
        entry.cancelling = True
        if entry.txn.state is State.PROCEEDING:
            self._send_cancel(entry)

    def _send_cancel(self, entry: ClientTransaction) -> None:
        entry.cancel_sent = True
        self.send(cancel_for(entry.request), entry.flow, _ignore)
        if entry.timer is not None:
            entry.timer.cancel()
        entry.timer = self._loop.call_later(64 * self._timers.t1, self._give_up, entry)

    def _timer_c_fired(self, entry: ClientTransaction) -> None:
        entry.timer = None
        if entry.txn.state is State.PROCEEDING:
            self.cancel(entry)

    def _give_up(self, entry: ClientTransaction) -> None:
        """No final answer since the CANCEL: the INVITE is over (RFC 3261 §9.1)."""
        entry.timer = None
        if entry.txn.terminated:
            return
        self._remove(entry)
        self._failed(entry, TimedOut("no answer to the CANCEL"))
        self._release(entry)

    def receive(self, response: Response) -> bool:
        """Hand ``response`` to its transaction; False if none is waiting for it."""
        branch = response.via.branch
        if branch is None:
            return False
        entry = self._table.get(client_key(branch, response.cseq.method))
        if entry is None:
            return False
        passed = entry.txn.receive(response, self._loop.time())
        if response.status < 200 and isinstance(entry.txn, ClientInviteTransaction):
            self._provisional(entry)
        elif response.status >= 200 and entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        if passed is not None and entry._on_response is not None:
            entry._on_response(passed)
        self._drive(entry)
        return True

    def _provisional(self, entry: ClientTransaction) -> None:
        if entry.cancelling:
            if not entry.cancel_sent and entry.txn.state is State.PROCEEDING:
                self._send_cancel(entry)
        elif entry.timer is not None and entry.timer_c is not None:  # Timer C starts again
            entry.timer.cancel()
            entry.timer = self._loop.call_later(entry.timer_c, self._timer_c_fired, entry)

    def _drive(self, entry: ClientTransaction, failure: TimedOut | None = None) -> None:
        try:
            for data in entry.txn.outgoing():
                entry.flow.send(data)
        except FlowClosed:
            failure = failure or entry.txn.transport_failed()
        if entry.txn.state in _ANSWERED:
            entry.request.forget_parsed()  # kept only to match what still comes
        if entry.txn.terminated:
            self._remove(entry)
        else:
            self._scheduler.schedule(entry, entry.txn.deadline)
        if failure is not None:
            self._failed(entry, failure)
        if entry.txn.terminated:
            self._release(entry)

    def _fire(self, entry: ClientTransaction) -> None:
        self._drive(entry, entry.txn.on_timer(self._loop.time()))

    def _remove(self, entry: ClientTransaction) -> None:
        self._scheduler.schedule(entry, None)
        if self._table.get(entry.txn.key) is entry:
            del self._table[entry.txn.key]

    @staticmethod
    def _release(entry: ClientTransaction) -> None:
        """Nothing more can reach the sender: let go of its state (no cycle keeps it alive)."""
        entry._on_response = entry._on_failure = None

    def _failed(self, entry: ClientTransaction, failure: TimedOut) -> None:
        log.debug("%s to %r failed: %s", entry.request.method, entry.flow, failure.reason)
        if entry._on_failure is not None:
            entry._on_failure(failure)

    def close(self) -> None:
        for entry in self._table.values():
            if entry.timer is not None:
                entry.timer.cancel()
        self._scheduler.close()
        self._table.clear()


def _ignore(_: object) -> None:
    return None
