"""Where a request runs: the routing core's placement rules. A request goes to its session's
worker (pinned, under the pool's affinity), to any idle worker, or waits in a queue; a worker
with free slots is fed from its own queue, then the pool's; a dispatched request carries its
deadlines in its envelope. ``broker.core.Core`` owns one and calls it from its events."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

from broker.answers import Answers
from broker.durable import DurableSessions
from broker.moves import movable
from broker.port import Port, WorkerUnreachable
from broker.roster import LOST, Roster
from broker.sessions import SessionBook, worker_gone
from broker.state import Clock, GoneWorkers, Pending, Pool, SessionRecord, WorkerRecord
from broker.timers import Timers
from dspex.wire.errors import (
    DspexError,
    PoolNotFound,
    PoolSaturated,
    ProtocolError,
    QueueTimeout,
    SessionWorkerUnavailable,
    WorkerBusy,
)
from dspex.wire.headers import pack_request_envelope
from dspex.wire.protocol import FLAG_DURABLE, Affinity, SessionMode

_MAX_BUDGET_MS = 2**31 - 1  # ~24 days: longer deadlines are "none" in practice
# the affinities the per-call path tests, as module names: a member read from its enum class
# costs ~0.2 µs in CPython 3.11, several per call
_NONE, _STRICT_QUEUE = Affinity.NONE, Affinity.STRICT_QUEUE


class Dispatcher:
    """Routes requests to workers and feeds workers their next work."""

    # made after the dispatcher (they call back into it): the core sets them
    durable: DurableSessions
    roster: Roster
    timers: Timers

    def __init__(self, pools: dict[str, Pool], workers: dict[bytes, WorkerRecord], sessions: dict[str, SessionRecord],
                 running: dict[tuple[bytes, int], WorkerRecord], gone: GoneWorkers, *, clock: Clock, port: Port,
                 answers: Answers, book: SessionBook, counters: dict[str, int]) -> None:
        self.pools, self.workers, self.sessions, self.running, self.gone = pools, workers, sessions, running, gone
        self.clock = clock
        self._send_worker: Callable[[bytes, list[Any]], None] = port.to_worker
        self.answers = answers
        self._fail = answers.fail
        self.book = book
        self.counters = counters

    def route(self, p: Pending, pool_name: str, claimed_worker: str) -> None:
        pool = self.pools.get(pool_name)
        if pool is None:
            self._fail(p, None, PoolNotFound(f"no pool named {pool_name!r}; pools: {', '.join(sorted(self.pools))}"))
            return
        durable = p.flags & FLAG_DURABLE or pool.config.durable
        if durable and p.session and (refused := self.durable.refusal(p, pool)):
            self._fail(p, pool, refused)
            return
        if not p.session or pool.mode is _NONE:
            self._run_anywhere(pool, p)
            return
        rec = self.book.admit(p, pool, claimed_worker, keep_claim=bool(durable))
        if isinstance(rec, DspexError):
            self._fail(p, pool, rec)
            return
        if durable and rec.durable is None and rec.calls == 1:
            self.durable.open(rec, p, forgotten=bool(claimed_worker))
        if rec.worker is None:
            w = pool.least_loaded()
            if w is None:
                self._enqueue(pool, pool.queue, p)  # pinned when a worker takes it
                return
            self.book.pin(rec, w.id)
        pinned = rec.worker
        assert pinned is not None
        w = self.workers.get(pinned)
        if rec.durable is not None and rec.durable.move and self.durable.moves.route(rec, pool, p):
            return  # moving (to a worker that came up) while its worker lives: it waits for the move
        if w is None or w.draining:
            if w is None and (pool.strict or rec.durable is not None) and self.book.in_restart_grace(pinned):
                # just (re)started: its worker may be alive and not re-registered yet; wait for it
                self._enqueue(pool, pool.awaiting.setdefault(pinned, deque()), p)
                return
            if rec.durable is not None and self.durable.moves.route(rec, pool, p):
                return  # it moves with its checkpoint; the call waits for the move
            if pool.strict:
                if w is None:  # its worker left: from now on the session is a tombstone
                    self._fail(p, pool, worker_gone(rec.id, pinned, self.gone.why(pinned)))
                    self.book.retire(rec, pinned)
                else:
                    self._fail(p, pool, worker_gone(rec.id, pinned, "is being recycled"))
                return
            # hint: the session re-pins to the least-loaded worker
            self.book.pin(rec, None)
            new = pool.least_loaded()
            if new is None:
                self._enqueue(pool, pool.queue, p)
                return
            self.book.pin(rec, new.id)
            w = new
        if w.can_start(p.session):
            self.dispatch(w, p)
        elif w.away:  # renewing its connection: the call waits for it
            self._enqueue(pool, w.queue, p)
        elif pool.mode is _STRICT_QUEUE:
            # (pool.queued counts every queue: asked last)
            if not w.queue and w.may_prefetch(self.clock.now) and pool.queued < pool.config.queue_max:
                self.dispatch(w, p)
            else:
                self._enqueue(pool, w.queue, p)
        elif pool.mode is Affinity.STRICT_FAIL_FAST:
            self._fail(p, pool, WorkerBusy(f"worker {w.incarnation[:8]} of session {rec.id[:8]} is busy", session=rec.id))
        elif rec.durable is not None:  # hint, durable: one state, so its own worker only
            self._enqueue(pool, w.queue, p)
        else:  # hint: any idle worker, else the first one to free up
            self._run_anywhere(pool, p)

    def _run_anywhere(self, pool: Pool, p: Pending) -> None:
        w = pool.idle_worker()
        if w is not None and not pool.queue:
            self.dispatch(w, p)
        else:
            self._enqueue(pool, pool.queue, p)

    def _enqueue(self, pool: Pool, queue: deque[Pending], p: Pending) -> None:
        if pool.admit(queue, p):  # the timers wake at its queue deadline, or its caller's
            self.timers.due = min(self.timers.due, p.enqueued + pool.config.queue_timeout, p.deadline)
        else:
            self.answers.fail_in_bulk(p, pool, PoolSaturated(
                f"pool {pool.name!r} has {pool.queued} queued requests, its limit", pool=pool.name))

    def dispatch(self, w: WorkerRecord, p: Pending) -> None:
        now = self.clock.now
        pool = w.pool
        if now > p.deadline:
            self.counters["expired_unsent"] += 1
            self.answers.expired(p, pool)
            return
        queue_left = p.enqueued + pool.config.queue_timeout - now
        if queue_left < 0:  # waited out its queue time before a tick came by
            self._fail(p, pool, QueueTimeout(
                f"waited {now - p.enqueued:.1f}s in pool {pool.name!r}, over its queue timeout of "
                f"{pool.config.queue_timeout:g}s", pool=pool.name))
            return
        key = (p.client, p.req_id)
        if key in self.running:  # a client reusing the id of a request still running
            self._fail(p, w.pool, ProtocolError(f"request id {p.req_id} is already in flight", req_id=p.req_id))
            return
        # the deadline travels with the request: the worker stops the call when it passes
        # (capped: a client may send any timeout_ms, and msgpack ints stop at 64 bits)
        call_ms = min(_MAX_BUDGET_MS, max(1, int((p.deadline - now) * 1000))) if p.deadline != math.inf else 0
        # and so does its queue deadline: a worker that reaches it later (it was prefetched behind
        # a call that turned out long) answers QueueTimeout without running it
        queue_ms = min(_MAX_BUDGET_MS, max(1, int(queue_left * 1000)))
        restore: list[Any] = []  # the checkpoint of a durable session that moved here
        if not p.session:
            envelope = pack_request_envelope(p.client, call_ms, queue_ms)
        elif pool.mode is _NONE:  # nothing of it stays on the worker
            envelope = pack_request_envelope(p.client, call_ms, queue_ms, 0, SessionMode.EPHEMERAL)
        else:
            rec = self.sessions.get(p.session)
            durable = 0
            if rec is not None:
                rec.touch(w)  # every worker that may hold its state gets the release
                if rec.durable is not None:
                    durable, restore = self.durable.envelope(rec, w)
            envelope = pack_request_envelope(p.client, call_ms, queue_ms, math.ceil(pool.config.session_ttl),
                                             durable=durable)
        p.started = now
        w.sent += 1
        p.sent = w.sent
        pool.queue_wait.observe(now - p.enqueued)
        w.inflight[key] = p
        self.running[key] = w
        try:
            self._send_worker(w.id, [envelope, *restore, p.header, *p.payload])
        except WorkerUnreachable:
            del w.inflight[key]  # never delivered: not a crash mid-request
            self.running.pop(key, None)
            self.roster.lost(w)
            if w.away:
                w.queue.appendleft(p)  # first in line for its worker's return
            else:
                self.hand_back(p, pool, w, LOST)

    def hand_back(self, p: Pending, pool: Pool, w: WorkerRecord, why: str) -> None:
        """A request ``w`` never started: route it again where the pool allows, else say so
        (a did-not-run error: the caller may retry); a durable session's call moves with it."""
        if not p.session or pool.mode in (Affinity.HINT, Affinity.NONE) or movable(self.sessions.get(p.session)):
            self.route(p, pool.name, "")
            return
        self._fail(p, pool, worker_gone(p.session, w.id, f"{why} before running this request (it did not run)"))

    def feed(self, w: WorkerRecord) -> None:
        """Give a worker its next work: free slots first, then what it may prefetch."""
        if w.free > 0:
            self._feed_free(w)
        while w.queue and w.free <= 0 and w.may_prefetch(self.clock.now):
            self.dispatch(w, w.queue.popleft())

    def _feed_free(self, w: WorkerRecord) -> None:
        """Give a worker with free slots its next work: its own queue first, then the pool's."""
        pool = w.pool
        workers = self.workers
        # (a send that finds its connection gone removes it: from then on it is fed nothing, or a
        # call handed back to the pool's queue would be taken by it again, forever)
        while w.free > 0 and workers.get(w.id) is w:
            if w.queue:
                p = w.next_queued()
                if p is not None:
                    self.dispatch(w, p)
                    continue
            if not pool.queue:
                return
            p = pool.queue[0]
            rec = self.sessions.get(p.session) if p.session and pool.mode is not _NONE else None
            if rec is not None and rec.worker is None and w.id in pool.rolling:
                return  # a new session waits for a worker that is not about to be recycled
            pool.queue.popleft()
            if rec is not None and rec.worker is None:
                self.book.pin(rec, w.id)
            if rec is not None and rec.worker != w.id and pool.strict:
                # its session was pinned elsewhere while it waited: route it there
                self._route_pinned(pool, p, rec)
                continue
            if p.session and w.capacity > 1 and not w.can_start(p.session) and not (
                    pool.mode is Affinity.HINT and (rec is None or rec.durable is None)):
                # a call of a session already running here waits its turn (a hint session's, not
                # durable, runs beside it, as route() sends it to any free slot)
                w.queue.append(p)
                continue
            self.dispatch(w, p)

    def _route_pinned(self, pool: Pool, p: Pending, rec: SessionRecord) -> None:
        target = self.workers.get(rec.worker) if rec.worker else None
        if (target is None or target.draining) and movable(rec):
            self.route(p, pool.name, "")  # it moves with its session
        elif target is None or target.draining:
            self._fail(p, pool, SessionWorkerUnavailable(
                f"session {rec.id[:8]} lost its worker", session=rec.id,
                worker=(rec.worker or b"").decode(errors="replace")))
        elif target.can_start(p.session):
            self.dispatch(target, p)
        else:
            self._enqueue(pool, target.queue, p)
