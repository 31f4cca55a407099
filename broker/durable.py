"""Durable sessions in the routing core (a mixin of ``broker.core.Core``; docs/protocol.md).

A durable session's calls go out with ``BUDGET_DURABLE``; the worker sends the call's checkpoint
and its reply as one message (``W_CHECKPOINT``). The checkpoint goes to the store (a job: the shell runs the
store on a thread and hands finished jobs back to :meth:`DurableSessions._store_done`); the
call's reply is held until every checkpoint write of its session submitted before it has
committed, then forwarded, in order. A refused write turns its call's reply into
``session_not_durable`` and the session into a plain one.

When a durable session's worker is gone or draining, its calls wait in the pool's ``parked``
while the session moves: (after the call it runs on a draining worker answers) the store loads
its checkpoint, the session is pinned to the pool's least-loaded worker, and its first call there
carries the checkpoint (``BUDGET_RESTORE``). A worker that refuses the checkpoint makes the session
lost: its rows go and its calls answer ``checkpoint_refused``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import msgpack

from broker.checkpoints import Job, SessionRow, StaleCheckpoint, Write
from broker.state import (
    Durability,
    Pending,
    Pool,
    SessionRecord,
    Tombstones,
    WorkerRecord,
)
from dspex.errors import CheckpointRefused, DspexError, SessionNotDurable
from dspex.protocol import (
    B_RELEASE_SESSION,
    BUDGET_DURABLE,
    BUDGET_FULL,
    BUDGET_RESTORE,
    Status,
    pack_error,
    pack_reply_header,
)

if TYPE_CHECKING:
    import zmq

log = logging.getLogger("dspex.broker")

Key = tuple[bytes, int]  # (client, req_id)


class DurableSessions:
    """Needs the core's state and its ``_fail``, ``_to_client``, ``_to_worker``, ``_pin``,
    ``_dispatch``, ``_release_session``."""

    if TYPE_CHECKING:
        pools: dict[str, Pool]
        workers: dict[bytes, WorkerRecord]
        sessions: dict[str, SessionRecord]
        closed: Tombstones
        counters: dict[str, int]

        def _fail(self, p: Pending, pool: Pool | None, err: DspexError) -> None: ...
        def _to_client(self, frames: list[Any]) -> None: ...
        def _to_worker(self, w: WorkerRecord, frames: list[Any]) -> bool: ...
        def _pin(self, rec: SessionRecord, wid: bytes | None) -> None: ...
        def _dispatch(self, w: WorkerRecord, p: Pending, now: float | None = None) -> None: ...
        def _release_session(self, rec: SessionRecord) -> None: ...

    checkpoints = False  # the shell has a store (else durable sessions are refused)
    durable_counters: dict[str, int]

    # -- the store port -----------------------------------------------------------------------
    def _store(self, job: Job) -> None:
        """Hand ``job`` to the store; the shell calls :meth:`_store_done` with it once it ran."""
        raise NotImplementedError

    # -- opening, pins, flags ------------------------------------------------------------------
    def _open_durable(self, rec: SessionRecord) -> None:
        rec.durable = Durability()
        self._store(Job("open", (rec.id, rec.pool, rec.owner, "", rec.created)))
        self.durable_counters["opened"] += 1

    def _durable_pinned(self, rec: SessionRecord) -> None:
        """``rec``'s pin changed (``Core._pin``): the store keeps it for a restarted broker."""
        d = rec.durable
        if d is not None and not d.off and rec.worker is not None:
            self._store(Job("pin", (rec.id, rec.worker.decode(errors="replace"))))

    def _durable_head(self, rec: SessionRecord, w: WorkerRecord) -> tuple[int, list[Any]]:
        """The request head's flags for a call of ``rec`` sent to ``w``, and the restore frames
        that go between the head and the request header."""
        d = rec.durable
        if d is None or d.off:
            return 0, []
        flags = BUDGET_DURABLE | (BUDGET_FULL if d.needs_full else 0)
        if d.restore is not None and d.restore_to == w.id:
            frames, d.restore, d.restore_to = d.restore, None, None
            self.durable_counters["restores"] += 1
            return flags | BUDGET_RESTORE, frames
        return flags, []

    # -- checkpoints and replies -----------------------------------------------------------------
    def _on_checkpoint(self, w: WorkerRecord, p: Pending, frames: list[zmq.Frame]) -> int:
        """``frames``: ``[wid, W_CHECKPOINT head, meta, skeleton?, *blobs, reply_header, ...]`` of
        the call ``p`` that ``w`` runs (the caller checked that). Store the checkpoint; return how
        many frames it took after the head (the call's reply follows them), -1 if it is
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
            self.counters["garbage_backend"] += 1
            if rec is not None and rec.durable is not None:
                self._turn_off(rec, key, f"its worker sent a malformed checkpoint ({exc})")
            return -1
        d = rec.durable if rec is not None else None
        if rec is None or d is None or d.off:
            return used  # no longer durable (a call sent before it turned so), or closed meanwhile
        if "lost" in meta:
            self._lose(rec, f"{meta['lost']}", w.id)
        elif "error" in meta:
            self._turn_off(rec, key, f"the session as a whole cannot be pickled ({meta['error']})")
        else:
            write = Write(rec.id, seq, frames[3].buffer, set_slots, [f.buffer for f in frames[4:2 + used]],
                          clear_slots, full, size)
            if full:
                d.needs_full = False
            d.submitted += 1
            self._store(Job("write", (write,), tag=(rec.id, key, size, seq)))
        return used

    def _durable_reply(self, rec: SessionRecord | None, key: Key, reply: list[Any]) -> None:
        """Forward a call's final reply, or hold it until its session's checkpoints committed."""
        d = rec.durable if rec is not None else None
        if d is None or (d.submitted == d.done and key not in d.refused):
            self._to_client(reply)
            return
        if d.submitted == d.done:  # refused and nothing pending: its error now
            self._to_client(self._refusal(d, key, reply))
            return
        d.held.append((d.submitted, key, reply))

    def _release_held(self, rec: SessionRecord, d: Durability) -> None:
        while d.held and d.held[0][0] <= d.done:
            _before, key, reply = d.held.popleft()
            self._to_client(self._refusal(d, key, reply) if key in d.refused else reply)

    @staticmethod
    def _refusal(d: Durability, key: Key, reply: list[Any]) -> list[Any]:
        err = d.refused.pop(key)
        return [reply[0], pack_reply_header(Status.ERROR.value, key[1]), pack_error(err.code, err.message, **err.details)]

    def _turn_off(self, rec: SessionRecord, key: Key | None, reason: str) -> None:
        """The session is no longer durable; the call ``key`` gets ``session_not_durable``."""
        d = rec.durable
        assert d is not None
        if not d.off:
            d.off = reason
            self._store(Job("drop", (rec.id,)))
            self.durable_counters["refused"] += 1
            log.warning("session %s is no longer durable: %s", rec.id[:8], reason)
        if key is not None:
            d.refused[key] = SessionNotDurable(
                f"the call ran and its effects stay in session {rec.id[:8]}, but its checkpoint could not be kept: "
                f"{reason}; its result is not returned, and the session goes on as a plain (not durable) one",
                session=rec.id, reason=reason, ran=True)

    def _store_done(self, jobs: list[Job]) -> None:
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
                    d.bytes, d.seq, d.stored = size, seq, time.time()
                    self.durable_counters["writes"] += 1
                elif isinstance(job.error, StaleCheckpoint):
                    log.warning("session %s: %s", sid[:8], job.error)
                else:
                    self._turn_off(rec, key, str(job.error))
                self._release_held(rec, d)
            elif job.op == "load":
                self._loaded(job)
            elif job.error is not None and job.op == "open":
                rec = self.sessions.get(job.args[0])
                if rec is not None and rec.durable is not None:
                    self._turn_off(rec, None, f"the broker's checkpoint store failed ({job.error})")

    # -- moves ------------------------------------------------------------------------------------
    def _durable_route(self, rec: SessionRecord, pool: Pool, p: Pending, w: WorkerRecord | None) -> bool:
        """Park ``p`` if its durable session is moving or must move (its pinned worker ``w`` is
        gone or draining); True if it did."""
        d = rec.durable
        if d is None or d.off:
            return False
        if not d.move and w is not None and not w.draining:
            return False
        if pool.queued >= pool.config.queue_max:
            return False  # the caller's _enqueue refuses it (pool_saturated)
        pool.parked.setdefault(rec.id, deque()).append(p)
        if not d.move:
            self._start_move(rec, pool)
        return True

    def _start_move(self, rec: SessionRecord, pool: Pool) -> None:
        d = rec.durable
        assert d is not None
        old = self.workers.get(rec.worker) if rec.worker else None
        if old is not None and old.runs_session(rec.id):
            d.move = "waiting"  # its call there answers first (with its checkpoint)
            return
        d.move = "loading"
        self._store(Job("load", (rec.id,)))

    def _durable_call_ended(self, rec: SessionRecord) -> None:
        """A call of ``rec`` answered (or died with its worker): a move waiting for it goes on."""
        d = rec.durable
        if d is not None and d.move == "waiting":
            old = self.workers.get(rec.worker) if rec.worker else None
            if old is None or not old.runs_session(rec.id):
                d.move = "loading"
                self._store(Job("load", (rec.id,)))

    def _loaded(self, job: Job) -> None:
        sid = job.args[0]
        rec = self.sessions.get(sid)
        d = rec.durable if rec is not None else None
        if rec is None or d is None or d.move != "loading":
            return  # closed (its parked calls were answered) or turned plain meanwhile
        stored = job.result
        if job.error is not None or stored is None:
            why = f"its checkpoint could not be read ({job.error})" if job.error else "its checkpoint is gone"
            self._lose(rec, why, rec.worker or b"")
            return
        meta = msgpack.packb({"session": sid, "seq": stored.seq, "slots": stored.slots})
        d.restore = [meta, *([stored.skeleton] if stored.seq else []), *stored.blobs]
        d.move = "ready"
        self._finish_move(rec)

    def _finish_move(self, rec: SessionRecord) -> None:
        """Pin a loaded session to the pool's least-loaded worker and send it its calls."""
        d = rec.durable
        pool = self.pools.get(rec.pool)
        assert d is not None
        if pool is None:
            return
        new = pool.least_loaded()
        if new is None:
            return  # no worker yet: the next READY goes on (_durable_worker_ready)
        old = self.workers.get(rec.worker) if rec.worker else None
        self._pin(rec, new.id)
        rec.touched.add(new.id)
        d.restore_to, d.move = new.id, ""
        self.durable_counters["moves"] += 1
        if old is not None and old is not new:
            self._to_worker(old, [B_RELEASE_SESSION, rec.id.encode()])  # a draining worker's copy
        log.info("session %s moves to worker %s (pid %d) with its checkpoint %d", rec.id[:8], new.incarnation[:8],
                 new.pid, d.seq)
        for p in pool.parked.pop(rec.id, deque()):
            if new.can_start(p.session):
                self._dispatch(new, p)
            else:
                new.queue.append(p)  # already counted in the pool's queue bound

    def _durable_worker_ready(self, pool: Pool) -> None:
        """A worker registered: sessions loaded while the pool had none go there."""
        for sid in list(pool.parked):
            rec = self.sessions.get(sid)
            if rec is not None and rec.durable is not None and rec.durable.move == "ready":
                self._finish_move(rec)

    def _lose(self, rec: SessionRecord, reason: str, wid: bytes) -> None:
        """The session's checkpoint cannot be restored: it is lost, as a session whose worker is
        gone; its rows go and its calls answer ``checkpoint_refused``."""
        d = rec.durable
        assert d is not None
        d.off = f"lost: {reason}"
        self._store(Job("drop", (rec.id,)))
        self.durable_counters["lost"] += 1
        log.error("durable session %s is lost: %s", rec.id[:8], reason)
        err = self._lost_error(rec.id, reason)
        pool = self.pools.get(rec.pool)
        for p in pool.parked.pop(rec.id, deque()) if pool is not None else ():
            self._fail(p, pool, err)
        self.closed.add(rec.id, reason, wid, lost=reason)
        self._release_session(rec)

    @staticmethod
    def _lost_error(session: str, reason: str) -> CheckpointRefused:
        return CheckpointRefused(f"session {session[:8]} could not be restored: {reason}; the session is lost "
                                 "(open a new one)", session=session, reason=reason)

    def _durable_released(self, rec: SessionRecord) -> None:
        """The session is closed, expired or lost: its held replies go now and its rows go."""
        d = rec.durable
        if d is None:
            return
        while d.held:
            _before, key, reply = d.held.popleft()
            self._to_client(self._refusal(d, key, reply) if key in d.refused else reply)
        if not d.off:
            self._store(Job("drop", (rec.id,)))
        pool = self.pools.get(rec.pool)
        if pool is not None:
            pool.parked.pop(rec.id, None)

    # -- what operators see ------------------------------------------------------------------------
    def durable_view(self, rec: SessionRecord, wall: float) -> dict[str, Any]:
        """``sessions`` / dashboard fields of a session: durable, checkpoint bytes and age."""
        d = rec.durable
        if d is None or d.off:
            return {"durable": False, "checkpoint_bytes": None, "checkpoint_age_s": None}
        return {"durable": True, "checkpoint_bytes": d.bytes,
                "checkpoint_age_s": round(wall - d.stored, 3) if d.stored else None}

    def durable_status(self) -> dict[str, Any]:
        """The ``checkpoints`` part of ``status``."""
        live = [r.durable for r in self.sessions.values() if r.durable is not None and not r.durable.off]
        return {"enabled": self.checkpoints, "sessions": len(live), "bytes": sum(d.bytes for d in live),
                **self.durable_counters}

    # -- a restarted broker ----------------------------------------------------------------------
    def load_durable(self, rows: list[SessionRow]) -> None:
        """The store's durable sessions, back with their pool, owner and pin: each first call
        asks its worker for a full checkpoint (the store may lack the last one)."""
        for row in rows:
            if row.pool not in self.pools or self.pools[row.pool].mode.value == "none":
                self._store(Job("drop", (row.id,)))
                continue
            rec = SessionRecord(row.id, row.pool, created=row.created, owner=row.owner)
            rec.durable = Durability(needs_full=True, bytes=row.size, seq=row.seq,
                                     stored=row.updated if row.seq else 0.0)
            if row.worker:
                rec.worker = row.worker.encode()
                rec.touched.add(rec.worker)
            self.sessions[row.id] = rec
        if rows:
            log.info("%d durable sessions back from the checkpoint store", len(self.sessions))
