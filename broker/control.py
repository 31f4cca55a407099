"""Request control: a client's ``credit`` and ``cancel`` for a request it sent, a client gone, and a
session closed.

A request running on a worker gets them forwarded (``B_CREDIT``, ``B_CANCEL``); a cancelled
request still waiting in a queue is taken out and answered ``cancelled``; control for a request
that ended (or that the broker never saw) is dropped. A client whose connection closed has its
requests cancelled as if it had sent ``cancel`` for each (without answers: nobody reads them); a
session that closes has its running requests cancelled so too (their callers get the answers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import msgpack

from broker.answers import Answers
from broker.port import Port
from broker.state import Pending, Pool, WorkerRecord
from dspex.wire.errors import Cancelled
from dspex.wire.ops import Op
from dspex.wire.protocol import B_CANCEL, B_CREDIT, CANCEL_SESSION_CLOSED


class RequestControl:
    def __init__(self, pools: dict[str, Pool], running: dict[tuple[bytes, int], WorkerRecord], *, port: Port,
                 answers: Answers, counters: dict[str, int],
                 to_worker: Callable[[WorkerRecord, list[Any]], bool]) -> None:
        self.pools, self.running, self.port, self.answers, self.counters = pools, running, port, answers, counters
        self._to_worker = to_worker

    def on_control(self, client: bytes, req_id: int, pool_name: str, op: str, frames: list[Any]) -> None:
        """``op`` (credit or cancel) from ``client`` for its request ``req_id``."""
        key = (client, req_id)
        w = self.running.get(key)
        if w is not None:
            n = 0
            if op == Op.CREDIT.value and len(frames) > 2:
                try:
                    n = int(msgpack.unpackb(frames[2].buffer))
                except Exception:  # noqa: BLE001 - a client's garbage is counted, never fatal
                    self.counters["garbage_frontend"] += 1
                    return
            elif op == Op.CANCEL.value and (p := w.inflight.get(key)) is not None:
                p.cancelled = True  # its error reply counts as ``cancelled``, not as a worker error
            self._to_worker(w, [B_CREDIT if op == Op.CREDIT.value else B_CANCEL, client, msgpack.packb([req_id, n])])
            return
        pool = self.pools.get(pool_name)
        if op == Op.CANCEL.value and pool is not None and (p := pool.take(client, req_id)) is not None:
            self.answers.fail(p, pool, Cancelled("cancelled while queued"))

    def client_gone(self, client: bytes, workers: dict[bytes, WorkerRecord]) -> None:
        """The connection of ``client`` closed: nobody reads the replies of its requests any more.
        Its running calls are cancelled on their workers (their slots free when the workers
        answer), its queued ones dropped; both count as ``cancelled``."""
        running = self._cancel_running(workers.values(), lambda owner, p: owner == client, 0)
        queued = 0
        for pool in self.pools.values():
            for p in pool.take_client(client):
                pool.outcomes[(p.op, Cancelled.code)] += 1
                queued += 1
        if running or queued:
            self.port.log(logging.INFO, "client %s disconnected: cancelled %d running and %d queued request(s)", client.hex()[:12],
                     running, queued)

    def cancel_session(self, session: str, workers: Iterable[WorkerRecord]) -> int:
        """The session closes: its running calls (and open streams) are cancelled on their workers,
        as its client's ``cancel`` would; their callers get the workers' ``cancelled`` answers,
        which say the session was closed."""
        return self._cancel_running(workers, lambda owner, p: p.session == session, CANCEL_SESSION_CLOSED)

    def _cancel_running(self, workers: Iterable[WorkerRecord], chosen: Callable[[bytes, Pending], bool],
                        reason: int) -> int:
        """Cancel the running requests ``chosen`` (owner, request) on their workers, for ``reason``
        (B_CANCEL's n): the number."""
        running = 0
        for w in list(workers):
            for (owner, req_id), p in list(w.inflight.items()):
                if chosen(owner, p) and not p.cancelled:
                    p.cancelled = True
                    running += 1
                    if not self._to_worker(w, [B_CANCEL, owner, msgpack.packb([req_id, reason])]):
                        break  # that worker is gone, and its calls with it
        return running
