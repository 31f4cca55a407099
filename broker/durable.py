"""Durable sessions in the routing core: an object the core owns (docs/protocol.md, "Durable sessions").

A durable session's calls go out with ``Durable.CHECKPOINT`` in their envelope; the worker sends
the call's checkpoint and its reply as one message (``W_CHECKPOINT``). The checkpoint goes to the
store through the port (a job: the shell runs the store on a thread or at the end of its loop turn
and hands finished jobs back through ``Core.store_done``); the call's reply is held until every
checkpoint write of its session submitted before it has committed, then forwarded, in order. A
refused write turns its call's reply into ``session_not_durable`` and the session into a plain one.

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
from typing import TYPE_CHECKING, Any

import msgpack

from broker import spread
from broker.answers import Answers, call_error, error_code
from broker.checkpoints import Job, SessionRow, StaleCheckpoint, Write
from broker.port import Port
from broker.sessions import SessionBook, checkpoint_lost
from broker.state import Clock, Durability, Pending, Pool, SessionRecord, WorkerRecord
from dspex.wire.errors import ConfigError, InternalError, PoolSaturated, SessionNotDurable, SessionNotHeld
from dspex.wire.protocol import (
    B_RELEASE_SESSION,
    W_CHECKPOINT,
    W_REPLY,
    Affinity,
    Durable,
    Status,
    pack_error,
    pack_reply_header,
)

if TYPE_CHECKING:
    import zmq


Key = tuple[bytes, int]  # (client, req_id)


def movable(rec: SessionRecord | None) -> bool:
    """A session that moves with its checkpoint when its worker goes (durable, not turned plain)."""
    return rec is not None and rec.durable is not None and not rec.durable.off


class DurableSessions:
    """The core's durable sessions; acts through the port (``store``, ``to_client``), the core's
    ``to_worker``, ``dispatch`` and ``route``, the session book and the answers."""

    def __init__(self, sessions: dict[str, SessionRecord], pools: dict[str, Pool], workers: dict[bytes, WorkerRecord],
                 *, clock: Clock, port: Port, book: SessionBook, answers: Answers,
                 to_worker: Callable[[WorkerRecord, list[Any]], bool],
                 dispatch: Callable[[WorkerRecord, Pending], None],
                 route: Callable[[Pending, str, str], None], counters: dict[str, int]) -> None:
        """``counters``: the core's (a malformed checkpoint counts as backend garbage)."""
        self.sessions, self.pools, self.workers = sessions, pools, workers
        self.core_counters = counters
        self.clock, self.port, self.book, self.answers = clock, port, book, answers
        self._to_client = port.to_client
        self._to_worker, self._dispatch, self._route = to_worker, dispatch, route
        self.enabled = False  # the shell has a store (else durable sessions are refused)
        # opened, checkpoint writes stored, refused (turned plain), moves, restores sent, sessions
        # lost (a checkpoint refused)
        self.counters = dict.fromkeys(("opened", "writes", "refused", "moves", "restores", "lost"), 0)
        self.uneven: set[str] = set()  # pools whose sessions spread to a worker that holds fewer

    # -- opening, pins, envelopes ---------------------------------------------------------------
    def refusal(self, p: Pending, pool: Pool) -> ConfigError | None:
        """Why the session call ``p``, which asks for a durable session (its header's flag or its
        pool's setting), cannot have one; None if it can."""
        if pool.mode is Affinity.NONE:
            return ConfigError(f"pool {pool.name!r} keeps no session state (affinity none): a session there "
                               "cannot be durable")
        if not self.enabled and p.session not in self.sessions:
            return ConfigError("this broker keeps no checkpoints (started without a checkpoint store): a session "
                               "cannot be durable")
        return None

    def open(self, rec: SessionRecord, p: Pending, forgotten: bool) -> None:
        """``rec`` was just opened by the call ``p``, which wants it durable. Its first checkpoint
        is a full one: a session this broker never knew is new, but one it ``forgotten`` (its
        client claims a pin from an earlier broker: the store was set aside or deleted) lives on
        in its worker if anywhere, whose tracker would send only what the call changed. The
        store's record counts as the session's first write: the call's reply waits for it, and
        if the store fails it, the call is told the session is not durable."""
        rec.durable = Durability(needs_full=True, forgotten=forgotten, submitted=1)
        worker = rec.worker.decode(errors="replace") if rec.worker else ""
        self.port.store(Job("open", (rec.id, rec.pool, rec.owner, worker, rec.created), tag=(p.client, p.req_id)))
        self.counters["opened"] += 1

    def pinned(self, rec: SessionRecord) -> None:
        """``rec``'s pin changed (``SessionBook.pin``): the store keeps it for a restarted broker."""
        if movable(rec) and rec.worker is not None:
            self.port.store(Job("pin", (rec.id, rec.worker.decode(errors="replace"))))

    def envelope(self, rec: SessionRecord, w: WorkerRecord) -> tuple[int, list[Any]]:
        """The envelope's ``Durable`` flags for a call of ``rec`` sent to ``w``, and the restore
        frames that go between the envelope and the request header."""
        d = rec.durable
        if d is None or d.off:
            return 0, []
        flags = Durable.CHECKPOINT | (Durable.FULL if d.needs_full else 0)
        if d.restore is not None and d.restore_to == w.id:
            frames, d.restore, d.restore_to = d.restore, None, None
            self.counters["restores"] += 1
            return flags | Durable.RESTORE, frames
        # a stored checkpoint: the worker must hold the session (it answers session_not_held if not)
        return flags | (Durable.HELD if d.seq else 0), []

    # -- checkpoints and replies -------------------------------------------------------------------
    def answered(self, w: WorkerRecord, p: Pending | None, rec: SessionRecord | None, frames: list[zmq.Frame],
                 ok: bool) -> bool:
        """The final reply ``frames`` (``[wid, envelope, ...]``) of call ``p`` that ``w`` ran, of a
        durable session ``rec`` or carrying a checkpoint (``W_CHECKPOINT``): the checkpoint goes to
        the store and the reply to the client once it (and every write of the session before it)
        committed. Returns whether the reply is a success."""
        if p is None:  # (the core checked it ran there: never)
            return ok
        if not ok and movable(rec) and frames[1].bytes[:1] == W_REPLY and error_code(frames) == SessionNotHeld.code:
            assert rec is not None
            self._not_held(rec, w, p)
            return False
        client = p.client
        reply: list[Any] = [client, *frames[2:]]
        if frames[1].bytes[:1] == W_CHECKPOINT:
            used = self._checkpoint(w, p, frames)
            if used < 0:  # (the session is no longer durable: the call is told so)
                self.core_counters["garbage_backend"] += 1
                ok = False
                reply = [client, pack_reply_header(Status.ERROR.value, p.req_id),
                         pack_error(InternalError.code, "its worker sent a malformed checkpoint")]
            else:
                reply = [client, *frames[2 + used:]]
        self.reply(rec, (client, p.req_id), reply)
        return ok

    def _checkpoint(self, w: WorkerRecord, p: Pending, frames: list[zmq.Frame]) -> int:
        """``frames``: ``[wid, W_CHECKPOINT envelope, meta, skeleton?, *blobs, reply_header, ...]``
        of the call ``p`` that ``w`` runs (the caller checked that). Store the checkpoint; return
        how many frames it took after the envelope (the call's reply follows them), -1 if it is
        malformed (then the session is no longer durable)."""
        key = (p.client, p.req_id)
        rec = self.sessions.get(p.session) if p.session else None
        try:
            meta = msgpack.unpackb(frames[2].buffer)
            if not isinstance(meta, dict) or meta.get("session") != p.session:
                raise ValueError("not a checkpoint of this call's session")
            if "lost" in meta or "error" in meta:
                used, set_slots = 1, []
            else:
                set_slots, clear_slots = list(meta["set"]), list(meta["clear"])
                seq, full, size = int(meta["seq"]), bool(meta["full"]), int(meta["size"])
                if not all(isinstance(i, int) for i in (*set_slots, *clear_slots)):
                    raise TypeError("slots are not integers")
                used = 2 + len(set_slots)
            if len(frames) < 2 + used + 1:
                raise ValueError(f"{len(frames) - 2} frames for a checkpoint of {used} and a reply")
        except Exception as exc:  # noqa: BLE001 - whatever a malformed frame raises
            if rec is not None and rec.durable is not None:
                self._turn_off(rec, key, f"its worker sent a malformed checkpoint ({exc})")
            return -1
        d = rec.durable if rec is not None else None
        if rec is None or d is None or d.off:
            return used  # no longer durable (a call sent before it turned so), or closed meanwhile
        if "lost" in meta:
            self._lose(rec, f"{meta['lost']}", w.id)
        elif "error" in meta:
            self._turn_off(rec, key, str(meta["error"]))
        else:
            write = Write(rec.id, seq, frames[3].buffer, set_slots, [f.buffer for f in frames[4:2 + used]],
                          clear_slots, full, size)
            if full:
                d.needs_full = False
            d.partial = bool(meta.get("partial"))
            d.submitted += 1
            self.port.store(Job("write", (write,), tag=(rec.id, key, size, seq)))
        return used

    def reply(self, rec: SessionRecord | None, key: Key, reply: list[Any]) -> None:
        """Forward a call's final reply, or hold it until its session's checkpoints committed."""
        d = rec.durable if rec is not None else None
        if d is None or (d.submitted == d.done and key not in d.refused):
            self._to_client(reply)
            return
        if d.submitted == d.done:  # refused and nothing pending: its error now
            self._to_client(self._refusal(d, key, reply))
            return
        d.held.append((d.submitted, key, reply))

    def _release_held(self, d: Durability) -> None:
        while d.held and d.held[0][0] <= d.done:
            _before, key, reply = d.held.popleft()
            self._to_client(self._refusal(d, key, reply) if key in d.refused else reply)

    @staticmethod
    def _refusal(d: Durability, key: Key, reply: list[Any]) -> list[Any]:
        """The call's ``session_not_durable`` in place of its ``reply``; a call that failed says
        its own error too (the caller would not see it otherwise)."""
        err = d.refused.pop(key)
        message, details = err.message, dict(err.details)
        failed = call_error(reply)
        if failed:
            message = f"{message}. The call itself failed: {failed}"
            details["call_error"] = failed
        return [reply[0], pack_reply_header(Status.ERROR.value, key[1]), pack_error(err.code, message, **details)]

    def _turn_off(self, rec: SessionRecord, key: Key | None, reason: str) -> None:
        """The session is no longer durable; the call ``key`` gets ``session_not_durable``."""
        d = rec.durable
        assert d is not None
        if not d.off:
            d.off = reason
            self.port.store(Job("plain", (rec.id, reason)))
            self.counters["refused"] += 1
            self.port.log(logging.WARNING, "session %s is no longer durable: %s", rec.id[:8], reason)
        if key is not None:
            d.refused[key] = SessionNotDurable(
                f"the call ran and its effects stay in session {rec.id[:8]}, but its checkpoint could not be kept: "
                f"{reason}; its result is not returned, and the session goes on as a plain (not durable) one",
                session=rec.id, reason=reason, ran=True)

    def store_done(self, jobs: list[Job]) -> None:
        """Jobs the store finished, in the order they were submitted."""
        for job in jobs:
            if job.op == "write":
                sid, key, size, seq = job.tag
                rec = self.sessions.get(sid)
                d = rec.durable if rec is not None else None
                if rec is None or d is None:
                    continue
                d.done += 1
                if job.error is None:
                    d.bytes, d.seq, d.stored = size, seq, self.clock.wall()
                    self.counters["writes"] += 1
                elif isinstance(job.error, StaleCheckpoint):
                    self.port.log(logging.WARNING, "session %s: %s", sid[:8], job.error)
                else:
                    self._turn_off(rec, key, str(job.error))
                self._release_held(d)
                if self.uneven:
                    self._spread_on(rec)
            elif job.op == "load":
                self._loaded(job)
            elif job.op == "open":
                rec = self.sessions.get(job.args[0])
                d = rec.durable if rec is not None else None
                if rec is None or d is None:
                    continue
                d.done += 1
                if job.error is not None:
                    self._turn_off(rec, job.tag, f"the broker's checkpoint store failed ({job.error})")
                self._release_held(d)

    # -- moves --------------------------------------------------------------------------------------
    def route(self, rec: SessionRecord, pool: Pool, p: Pending, w: WorkerRecord | None) -> bool:
        """Park ``p`` if its durable session must move (its pinned worker ``w`` is gone or
        draining) or is moving, or refuse it (``pool_saturated``: it did not run, the session
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
            self._spread_on(rec)

    def _not_held(self, rec: SessionRecord, w: WorkerRecord, p: Pending) -> None:
        """``w`` does not hold ``rec``, though pinned there (a broker that stored the pin of a move
        and died before the worker got the checkpoint): the call did not run; it goes with the
        session's checkpoint, as after a move."""
        d, pool = rec.durable, self.pools.get(rec.pool)
        assert d is not None
        if pool is None:
            return
        self.port.log(logging.WARNING, "session %s is not on worker %s (pid %d), where it is pinned: it moves with its checkpoint %d",
                    rec.id[:8], w.incarnation[:8], w.pid, d.seq)
        pool.parked.setdefault(rec.id, deque()).append(p)
        if not d.move:
            self._load(rec, d)

    def _load(self, rec: SessionRecord, d: Durability) -> None:
        d.move = "loading"
        self.port.store(Job("load", (rec.id,)))

    def _loaded(self, job: Job) -> None:
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
            pool = self.pools.get(rec.pool)
            for p in pool.parked.pop(rec.id, deque()) if pool is not None else ():
                self._route(p, rec.pool, "")
            return
        if job.error is not None or stored is None or (d.forgotten and not stored.seq):
            why = (f"its checkpoint could not be read ({job.error})" if job.error else "its checkpoint is gone"
                   if stored is None else "the checkpoint store has no checkpoint of it (the store was set aside "
                   "or deleted while the broker was down, and the worker that held it is gone)")
            self._lose(rec, why, rec.worker or b"")
            return
        meta = msgpack.packb({"session": sid, "seq": stored.seq, "slots": stored.slots})
        d.restore = [meta, *([stored.skeleton] if stored.seq else []), *stored.blobs]
        d.move = "ready"
        self._finish_move(rec, d)

    def _finish_move(self, rec: SessionRecord, d: Durability) -> None:
        """Pin a loaded session to the pool's least-loaded worker (a spread: to the worker it is
        pinned to already) and send it its calls."""
        pool = self.pools.get(rec.pool)
        if pool is None:
            return
        new = self.workers.get(rec.worker) if d.spread_from and rec.worker else None
        if new is None or new.draining or new.id in pool.rolling:
            new = pool.least_loaded()
        if new is None:
            return  # no worker yet: the next READY goes on (worker_ready)
        old = self.workers.get(d.spread_from or rec.worker or b"")
        d.spread_from = None
        self.book.pin(rec, new.id)
        rec.touched.add(new.id)
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

    def _spread_on(self, rec: SessionRecord) -> None:
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
        rec.touched.add(target.id)

    def worker_ready(self, pool: Pool) -> None:
        """A worker registered: sessions loaded while the pool had none go there."""
        for sid in list(pool.parked):
            rec = self.sessions.get(sid)
            if rec is not None and rec.durable is not None and rec.durable.move == "ready":
                self._finish_move(rec, rec.durable)

    def _lose(self, rec: SessionRecord, reason: str, wid: bytes) -> None:
        """The session's checkpoint cannot be restored: it is lost, as a session whose worker is
        gone; its rows go and its calls answer ``checkpoint_refused``."""
        d = rec.durable
        assert d is not None
        d.off = f"lost: {reason}"
        self.port.store(Job("drop", (rec.id,)))
        self.counters["lost"] += 1
        self.port.log(logging.ERROR, "durable session %s is lost: %s", rec.id[:8], reason)
        err = checkpoint_lost(rec.id, reason)
        pool = self.pools.get(rec.pool)
        for p in pool.parked.pop(rec.id, deque()) if pool is not None else ():
            self.answers.fail(p, pool, err)
        self.book.closed.add(rec.id, reason, wid, lost=reason)
        self.book.release(rec)

    def released(self, rec: SessionRecord) -> None:
        """The session is closed, expired or lost (``SessionBook.release``): its held replies go
        now and its rows go."""
        d = rec.durable
        if d is None:
            return
        while d.held:
            _before, key, reply = d.held.popleft()
            self._to_client(self._refusal(d, key, reply) if key in d.refused else reply)
        self.port.store(Job("drop", (rec.id,)))  # (a plain one's row too)
        pool = self.pools.get(rec.pool)
        if pool is not None:
            pool.parked.pop(rec.id, None)

    # -- what operators see ---------------------------------------------------------------------------
    @staticmethod
    def view(rec: SessionRecord, wall: float) -> dict[str, Any]:
        """``sessions`` / dashboard fields of a session: durable, checkpoint bytes and age, and
        why a session that was durable no longer is (over a cap, the store failed)."""
        d = rec.durable
        if d is None or d.off:
            return {"durable": False, "checkpoint_bytes": None, "checkpoint_age_s": None,
                    "no_longer_durable": d.off if d is not None else None}
        return {"durable": True, "checkpoint_bytes": d.bytes,
                "checkpoint_age_s": round(wall - d.stored, 3) if d.stored else None, "no_longer_durable": None}

    def status(self) -> dict[str, Any]:
        """The ``checkpoints`` part of ``status``."""
        live = [r.durable for r in self.sessions.values() if r.durable is not None and not r.durable.off]
        return {"enabled": self.enabled, "sessions": len(live), "bytes": sum(d.bytes for d in live), **self.counters}

    # -- a restarted broker ---------------------------------------------------------------------------
    def load(self, rows: list[SessionRow]) -> None:
        """The store's durable sessions, back with their pool, owner and pin: each first call
        asks its worker for a full checkpoint (the store may lack the last one)."""
        now = self.clock.now
        dropped: dict[str, int] = {}
        for row in rows:
            if row.pool not in self.pools or self.pools[row.pool].mode.value == "none":
                self.port.store(Job("drop", (row.id,)))
                dropped[row.pool] = dropped.get(row.pool, 0) + 1
                continue
            rec = SessionRecord(row.id, row.pool, row.created, now, owner=row.owner)
            if row.plain:  # it went plain: so it stays (never made durable again by a claim of its pin)
                rec.durable = Durability(off=row.plain)
            else:
                rec.durable = Durability(needs_full=True, bytes=row.size, seq=row.seq,
                                         stored=row.updated if row.seq else 0.0)
            if row.worker:
                rec.worker = row.worker.encode()
                rec.touched.add(rec.worker)
            self.sessions[row.id] = rec
        for pool, n in dropped.items():
            self.port.log(logging.WARNING, "%d durable session%s of pool %r dropped from the checkpoint store: this "
                          "broker has no pool %r that keeps session state", n, "" if n == 1 else "s", pool, pool)
        if rows:
            self.book.next_expiry = now  # (their TTLs count from now)
            plain = sum(1 for r in self.sessions.values() if r.durable is not None and r.durable.off)
            self.port.log(logging.INFO, "%d durable sessions back from the checkpoint store (and %d that went plain)",
                          len(self.sessions) - plain, plain)

