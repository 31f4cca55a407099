"""A durable session's moves (``DurableSessions.moves``; docs/protocol.md, "Durable sessions").

When a durable session's worker is gone or draining, its calls wait in the pool's ``parked``
while the session moves: (after the call it runs on a draining worker answers) the store loads
its checkpoint, the session is pinned to the pool's least-loaded worker, and its first call there
carries the checkpoint (``Durable.RESTORE``). A worker that refuses the checkpoint makes the
session lost: its rows go and its calls answer ``checkpoint_refused``. After a worker registers,
idle sessions move the same way to the workers holding the fewest (broker/spread.py).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import msgpack

from broker import spread
from broker.answers import Answers
from broker.checkpoints import Job
from broker.port import Port
from broker.sessions import SessionBook, checkpoint_lost
from broker.state import Durability, Pending, Pool, SessionRecord, WorkerRecord
from dspex.wire.errors import PoolSaturated
from dspex.wire.protocol import B_RELEASE_SESSION


def movable(rec: SessionRecord | None) -> bool:
    """A session that moves with its checkpoint when its worker goes (durable, not turned plain)."""
    return rec is not None and rec.durable is not None and not rec.durable.off


class SessionMoves:
    """Durable sessions moving to another worker with their checkpoint; acts through the port
    (``store``), the core's ``to_worker``, ``dispatch`` and ``route``, the session book and the
    answers."""

    def __init__(self, sessions: dict[str, SessionRecord], pools: dict[str, Pool], workers: dict[bytes, WorkerRecord],
                 *, port: Port, book: SessionBook, answers: Answers,
                 to_worker: Callable[[WorkerRecord, list[Any]], bool],
                 dispatch: Callable[[WorkerRecord, Pending], None],
                 route: Callable[[Pending, str, str], None]) -> None:
        self.sessions, self.pools, self.workers = sessions, pools, workers
        self.port, self.book, self.answers = port, book, answers
        self._to_worker, self._dispatch, self._route = to_worker, dispatch, route
        self.counters = {"moves": 0, "lost": 0}  # sessions moved, sessions lost (a checkpoint refused)
        self.uneven: set[str] = set()  # pools whose sessions spread to a worker that holds fewer

    def route(self, rec: SessionRecord, pool: Pool, p: Pending) -> bool:
        """Park ``p`` if its durable session must move (its pinned worker is gone or draining)
        or is moving, or refuse it (``pool_saturated``: it did not run, the session
        stays durable) when the pool's queue is full; True if it did either."""
        d = rec.durable
        if d is None or d.off:
            return False
        if pool.queued >= pool.config.queue_max:
            self.answers.fail_in_bulk(p, pool, PoolSaturated(
                f"pool {pool.name!r} has {pool.queued} queued requests, its limit", pool=pool.name))
            return True
        pool.parked.setdefault(rec.id, deque()).append(p)
        if not d.move:
            old = self.workers.get(rec.worker) if rec.worker else None
            if old is not None and old.runs_session(rec.id):
                d.move = "waiting"  # its call there answers first (with its checkpoint)
            else:
                self._load(rec, d)
        elif d.move == "spread":
            self._load(rec, d)
        return True

    def reroute(self, p: Pending, pool: Pool) -> bool:
        """A call that did not run on a worker that left or drains: if its session is durable it
        moves with it (routed again: parked); True if it did."""
        if not movable(self.sessions.get(p.session)):
            return False
        self._route(p, pool.name, "")
        return True

    def call_ended(self, rec: SessionRecord) -> None:
        """A call of ``rec`` answered (or died with its worker): a move waiting for it goes on."""
        d = rec.durable
        if d is not None and d.move == "waiting":
            old = self.workers.get(rec.worker) if rec.worker else None
            if old is None or not old.runs_session(rec.id):
                self._load(rec, d)
        elif self.uneven:
            self.spread_on(rec)

    def not_held(self, rec: SessionRecord, w: WorkerRecord, p: Pending) -> None:
        """``w`` does not hold ``rec``, though pinned there (a broker that stored the pin of a move
        and died before the worker got the checkpoint): the call did not run; it goes with the
        session's checkpoint, as after a move."""
        d, pool = rec.durable, self.pools[rec.pool]
        assert d is not None
        self.port.log(logging.WARNING, "session %s is not on worker %s (pid %d), where it is pinned: it moves with its checkpoint %d",
                    rec.id[:8], w.incarnation[:8], w.pid, d.seq)
        pool.parked.setdefault(rec.id, deque()).append(p)
        if not d.move:
            self._load(rec, d)

    def _load(self, rec: SessionRecord, d: Durability) -> None:
        d.move = "loading"
        self.port.store(Job("load", (rec.id,)))

    def loaded(self, job: Job) -> None:
        sid = job.args[0]
        rec = self.sessions.get(sid)
        d = rec.durable if rec is not None else None
        if rec is None or d is None or d.move != "loading":
            return  # closed (its parked calls were answered) or turned plain meanwhile
        stored = job.result
        back = self.workers.get(d.spread_from) if d.spread_from else None
        if back is not None and not back.draining and (job.error is not None or stored is None):
            # a spread the store cannot serve: the session goes back to its worker, which holds it,
            # and stays there until a write says the store holds all of it (else each call that
            # ended would spread it again, and the next wait for a load that fails)
            d.move, d.spread_from, d.partial = "", None, True
            self.book.pin(rec, back.id)
            for p in self.pools[rec.pool].parked.pop(rec.id, deque()):
                self._route(p, rec.pool, "")
            return
        if job.error is not None or stored is None or (d.forgotten and not stored.seq):
            why = (f"its checkpoint could not be read ({job.error})" if job.error else "its checkpoint is gone"
                   if stored is None else "the checkpoint store has no checkpoint of it (the store was set aside "
                   "or deleted while the broker was down, and the worker that held it is gone)")
            self.lose(rec, why, rec.worker or b"")
            return
        meta = msgpack.packb({"session": sid, "seq": stored.seq, "slots": stored.slots})
        d.restore = [meta, *([stored.skeleton] if stored.seq else []), *stored.blobs]
        d.move = "ready"
        self._finish_move(rec, d)

    def _finish_move(self, rec: SessionRecord, d: Durability) -> None:
        """Pin a loaded session to the pool's least-loaded worker (a spread: to the worker it is
        pinned to already) and send it its calls."""
        pool = self.pools[rec.pool]
        new = self.workers.get(rec.worker) if d.spread_from and rec.worker else None
        if new is None or new.draining or new.id in pool.rolling:
            new = pool.least_loaded()
        if new is None:
            return  # no worker yet: the next READY goes on (worker_ready)
        old = self.workers.get(d.spread_from or rec.worker or b"")
        d.spread_from = None
        self.book.pin(rec, new.id)
        rec.touch(new)
        d.restore_to, d.move = new.id, ""
        self.counters["moves"] += 1
        if old is not None and old is not new:
            self._to_worker(old, [B_RELEASE_SESSION, rec.id.encode()])  # a draining worker's copy
        self.port.log(logging.INFO, "session %s moves to worker %s (pid %d) with its checkpoint %d", rec.id[:8], new.incarnation[:8],
                 new.pid, d.seq)
        for p in pool.parked.pop(rec.id, deque()):
            if new.can_start(p.session):
                self._dispatch(new, p)
            else:
                new.queue.append(p)  # already counted in the pool's queue bound

    def spread(self, new: WorkerRecord) -> None:
        """``new`` registered: sessions of its pool move to the workers holding the fewest, each
        when idle (broker/spread.py): those idle now, the others as their calls end."""
        if not spread.even(new.pool):
            self.uneven.add(new.pool.name)
            for rec, target in spread.to_spread(new.pool, self.sessions):
                self._spread(rec, target)

    def spread_on(self, rec: SessionRecord) -> None:
        """``rec``'s call ended and its write (if any) committed: in a pool whose sessions are
        uneven, it moves now if it should."""
        w = self.workers.get(rec.worker) if rec.worker and rec.pool in self.uneven else None
        if w is None:
            return
        target = spread.target_for(rec, w)
        if target is not None:
            self._spread(rec, target)
        elif spread.even(w.pool):
            self.uneven.discard(rec.pool)

    def _spread(self, rec: SessionRecord, target: WorkerRecord) -> None:
        """Pin ``rec`` to ``target`` now (the counts the next choice reads); its checkpoint loads
        at its next call, and its old worker holds it until then (it goes back there if the
        store cannot serve it)."""
        d = rec.durable
        assert d is not None
        d.move, d.spread_from = "spread", rec.worker
        self.book.pin(rec, target.id)
        rec.touch(target)

    def worker_ready(self, pool: Pool) -> None:
        """A worker registered: sessions loaded while the pool had none go there."""
        for sid in list(pool.parked):
            rec = self.sessions.get(sid)
            if rec is not None and rec.durable is not None and rec.durable.move == "ready":
                self._finish_move(rec, rec.durable)

    def lose(self, rec: SessionRecord, reason: str, wid: bytes) -> None:
        """The session's checkpoint cannot be restored: it is lost, as a session whose worker is
        gone; its rows go and its calls answer ``checkpoint_refused``."""
        d = rec.durable
        assert d is not None
        d.off = f"lost: {reason}"
        self.port.store(Job("forget", (rec.id,)))
        self.counters["lost"] += 1
        self.port.log(logging.ERROR, "durable session %s is lost: %s", rec.id[:8], reason)
        err = checkpoint_lost(rec.id, reason)
        pool = self.pools[rec.pool]
        for p in pool.parked.pop(rec.id, deque()):
            self.answers.fail(p, pool, err)
        self.book.closed.add(rec.id, reason, wid, lost=reason)
        self.book.release(rec)
