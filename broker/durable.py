"""Durable sessions in the routing core: an object the core owns (docs/protocol.md, "Durable sessions").

A durable session's calls go out with ``Durable.CHECKPOINT`` in their envelope; the worker sends
the call's checkpoint and its reply as one message (``W_CHECKPOINT``), whose checkpoint goes to
the store and whose reply waits for it (``broker.checkpoint_writes``). When a durable session's
worker is gone or draining, the session moves with its checkpoint to another, and after a worker
registers, idle sessions spread to it (``broker.moves``). This object opens durable sessions,
writes their envelopes, hands the store's finished jobs to its two parts, and answers what
operators and a restarted broker ask of them.
"""

from __future__ import annotations

import logging
from typing import Any

from broker.checkpoint_writes import CheckpointWrites
from broker.checkpoints import Job
from broker.moves import SessionMoves, movable
from broker.port import Port
from broker.sessions import SessionBook
from broker.state import Clock, Durability, Pending, Pool, SessionRecord, WorkerRecord
from broker.store_schema import SessionRow
from dspex.wire.errors import ConfigError
from dspex.wire.protocol import Affinity, Durable


class DurableSessions:
    """The core's durable sessions; acts through the port (``store``) and the session book, owns
    their checkpoint writes (``writes``) and hands the store's loads to their ``moves``."""

    def __init__(self, sessions: dict[str, SessionRecord], pools: dict[str, Pool], *, clock: Clock, port: Port,
                 book: SessionBook, moves: SessionMoves, counters: dict[str, int]) -> None:
        """``counters``: the core's (a malformed checkpoint counts as backend garbage)."""
        self.sessions, self.pools = sessions, pools
        self.clock, self.port, self.book, self.moves = clock, port, book, moves
        self.enabled = False  # the shell has a store (else durable sessions are refused)
        self.total_cap = 0  # its total cap in bytes, past which it refuses every write (0: none known)
        # opened, checkpoint writes stored, refused (turned plain), restores sent (the moves count their own)
        self.counters = dict.fromkeys(("opened", "writes", "refused", "restores"), 0)
        self.writes = CheckpointWrites(sessions, pools, clock=clock, port=port, moves=self.moves, counters=self.counters,
                                       core_counters=counters)

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
        rec.durable = Durability(needs_full=True, forgotten=forgotten, submitted=1, used=rec.created)
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

    def reroute(self, p: Pending, pool: Pool) -> bool:
        """``SessionMoves.reroute``, for the session book (which knows this object by ``DurableHooks``)."""
        return self.moves.reroute(p, pool)

    def note_use(self, rec: SessionRecord) -> None:
        """A call of ``rec`` ended: keep when it was last used in the store, for a restarted
        broker's TTL; at most once per :func:`_use_slack` of its pool's TTL (a call that changed
        nothing writes no checkpoint: one more commit per call would tax the quickest calls),
        which a restarted broker adds to the saved time: its TTL never ends early, at most that
        much late."""
        d, pool = rec.durable, self.pools[rec.pool]
        if d is None or not pool.config.session_ttl:
            return
        used = self.clock.wall() - (self.clock.now - rec.last_used)
        if used - d.used >= _use_slack(pool.config.session_ttl):
            d.used = used
            self.port.store(Job("used", (rec.id, used)))

    def store_done(self, jobs: list[Job]) -> None:
        """Jobs the store finished, in the order they were submitted."""
        for job in jobs:
            if job.op == "load":
                self.moves.loaded(job)
            elif job.op == "reset":
                self._store_reset()
            else:
                self.writes.done(job)

    def _store_reset(self) -> None:
        """The store's file was damaged under the broker and a fresh one began with every session
        but no checkpoint: each durable session's next call asks its worker for a whole one, and
        a move before it finds none (the session is lost: never restored empty)."""
        for rec in self.sessions.values():
            d = rec.durable
            if d is not None and not d.off:
                d.needs_full = d.forgotten = True
                d.bytes, d.stored = 0, 0.0

    def released(self, rec: SessionRecord) -> None:
        """The session is closed, expired or lost (``SessionBook.release``): its held replies go
        now and its rows go."""
        d = rec.durable
        if d is None:
            return
        self.writes.release_held(d, everything=True)
        self.port.store(Job("forget", (rec.id,)))  # (a plain one's row too)
        self.pools[rec.pool].parked.pop(rec.id, None)

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
        return {"enabled": self.enabled, "sessions": len(live), "bytes": sum(d.bytes for d in live),
                "total_cap": self.total_cap, **self.counters, **self.moves.counters}

    # -- a restarted broker ---------------------------------------------------------------------------
    def load(self, rows: list[SessionRow]) -> None:
        """The store's durable sessions, back with their pool, owner and pin: each first call
        asks its worker for a full checkpoint (the store may lack the last one)."""
        now, wall = self.clock.now, self.clock.wall()
        dropped: dict[str, int] = {}
        for row in rows:
            if row.pool not in self.pools or self.pools[row.pool].mode.value == "none":
                self.port.store(Job("forget", (row.id,)))
                dropped[row.pool] = dropped.get(row.pool, 0) + 1
                continue
            rec = SessionRecord(row.id, row.pool, row.created, now, owner=row.owner)
            ttl = self.pools[row.pool].config.session_ttl
            if row.used is not None and ttl:  # idle since its last use, as saved, or up to a slack later
                rec.last_used = now - max(0.0, wall - row.used - _use_slack(ttl))
            used = row.used or 0.0
            if row.plain:  # it went plain: so it stays (never made durable again by a claim of its pin)
                rec.durable = Durability(off=row.plain, used=used)
            else:
                rec.durable = Durability(needs_full=True, forgotten=row.checkpoint_lost, bytes=row.size, seq=row.seq,
                                         stored=row.updated if row.seq else 0.0, used=used)
            if row.worker:
                rec.worker = row.worker.encode()
                rec.touched = (rec.worker,)
            self.sessions[row.id] = rec
        for pool, n in dropped.items():
            self.port.log(logging.WARNING, "%d durable session%s of pool %r dropped from the checkpoint store: this "
                          "broker has no pool %r that keeps session state", n, "" if n == 1 else "s", pool, pool)
        if rows:
            self.book.next_expiry = now  # (some may be past their TTL already)
            plain = sum(1 for r in self.sessions.values() if r.durable is not None and r.durable.off)
            self.port.log(logging.INFO, "%d durable sessions back from the checkpoint store (and %d that went plain)",
                          len(self.sessions) - plain, plain)


def _use_slack(ttl: float) -> float:
    """How late the store may know a session's last use: a tenth of its TTL, at most a minute."""
    return min(ttl / 10, 60.0)
