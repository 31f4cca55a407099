"""The session book of the routing core: sessions, their tombstones, idle expiry and release.

Idle time counts from the end of a session's last call, and a running call never expires it;
closed and expired ids are remembered, so a late call answers ``SessionClosed`` instead of
opening a fresh namespace; a release reaches every worker the session touched, after its last
running call. After a broker restart, clients claim their sessions' pins: a strict session's
call waits for its worker to re-register for one restart grace (heartbeat x liveness). A durable
session (``broker.durable``) hears of its pin and its release, and outlives its worker.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

from broker.state import (
    Clock,
    GoneWorkers,
    Pending,
    Pool,
    SessionRecord,
    Tombstones,
    WorkerRecord,
)
from dspex.wire.errors import (
    CheckpointRefused,
    DspexError,
    SessionClosed,
    SessionNotYours,
    SessionPoolMismatch,
    SessionQuotaExceeded,
    SessionWorkerUnavailable,
)
from dspex.wire.protocol import B_RELEASE_SESSION

Fail = Callable[[Pending, "Pool | None", DspexError], None]  # answer a request with an error
ToWorker = Callable[[WorkerRecord, list[Any]], bool]  # send to a worker (False: it is gone)

_TTL_SCAN_EVERY = 1.0  # seconds: idle sessions are looked for at most this often


def worker_gone(session: str, wid: bytes, why: str) -> SessionWorkerUnavailable:
    incarnation = wid.decode(errors="replace")
    return SessionWorkerUnavailable(f"session {session[:8]} is pinned to worker {incarnation[:8]}, which {why}",
                                    session=session, worker=incarnation)


def checkpoint_lost(session: str, reason: str) -> CheckpointRefused:
    return CheckpointRefused(f"session {session[:8]} could not be restored: {reason}; the session is lost "
                             "(open a new one)", session=session, reason=reason)


class DurableHooks(Protocol):
    """What the book tells the durable sessions' keeper (``broker.durable.DurableSessions``)."""

    def pinned(self, rec: SessionRecord) -> None: ...
    def released(self, rec: SessionRecord) -> None: ...
    def reroute(self, p: Pending, pool: Pool) -> bool: ...


class SessionBook:
    """The rules of a session's end, over the core's ``sessions``, ``pools`` and ``workers``."""

    durable: DurableHooks  # the core's, made after this book (it uses it): the core sets it

    def __init__(self, sessions: dict[str, SessionRecord], pools: dict[str, Pool],
                 workers: dict[bytes, WorkerRecord], gone: GoneWorkers, *, clock: Clock, restart_grace: float,
                 max_sessions: int, fail: Fail, to_worker: ToWorker, wake: Callable[[float], None]) -> None:
        """``wake``: tell the core's timers of a new deadline (a session's TTL)."""
        self.sessions = sessions
        self.pools = pools
        self.workers = workers
        self.gone = gone
        self.clock = clock
        self.closed = Tombstones()  # closed and expired session ids: late calls get SessionClosed
        self.max_sessions = max_sessions
        self._fail = fail
        self._to_worker = to_worker
        self._wake = wake
        self.next_expiry = math.inf  # no session can expire before this (monotonic seconds)
        self.booted = clock.now
        self.grace_ends = clock.now + restart_grace  # math.inf once it ended
        self.restart_grace = restart_grace

    def admit(self, p: Pending, pool: Pool, claimed_worker: str, *, keep_claim: bool = False) -> SessionRecord | DspexError:
        """The session call ``p`` runs in (opened on its first call: ``claimed_worker`` is the pin
        a client claims after a broker restart, kept in a strict pool or with ``keep_claim``: a
        durable session's state is on that worker only), or why it may not: closed or its worker
        gone (a tombstone), another client's, closing, another pool's, or one session too many."""
        rec = self.sessions.get(p.session)
        if rec is None:
            if (tombstone := self.closed.get(p.session)) is not None:
                why, lost, reason = tombstone
                if reason:
                    return checkpoint_lost(p.session, reason)
                return worker_gone(p.session, lost, why) if lost else SessionClosed(
                    f"session {p.session[:8]} {why}", session=p.session)
            if len(self.sessions) >= self.max_sessions:
                return SessionQuotaExceeded(f"the broker holds {len(self.sessions)} sessions, its limit")
            rec = self._open(p.session, pool, p.owner)
            if claimed_worker:  # a pin from before a broker restart: kept if that incarnation is back
                wid = claimed_worker.encode()
                known = self.workers.get(wid)
                if (known is not None and known.pool is pool) or pool.strict or keep_claim:
                    self.pin(rec, wid)
        elif rec.owner != p.owner:
            return SessionNotYours(f"session {p.session[:8]} belongs to another client", session=p.session)
        elif rec.closing:
            return SessionClosed(f"session {p.session[:8]} {rec.closing}", session=p.session)
        elif rec.pool != pool.name:
            return SessionPoolMismatch(f"session {p.session[:8]} belongs to pool {rec.pool!r}, not {pool.name!r}",
                                       session=p.session)
        rec.last_used = p.enqueued
        rec.calls += 1
        return rec

    def _open(self, session: str, pool: Pool, owner: str) -> SessionRecord:
        now = self.clock.now
        rec = self.sessions[session] = SessionRecord(session, pool.name, self.clock.wall(), now, owner=owner)
        if pool.config.session_ttl and now + pool.config.session_ttl < self.next_expiry:
            self.next_expiry = now + pool.config.session_ttl
            self._wake(self.next_expiry)
        return rec

    def pin(self, rec: SessionRecord, wid: bytes | None) -> None:
        """The one place a session's pin changes: the workers' counts follow it."""
        old = self.workers.get(rec.worker) if rec.worker else None
        if old is not None:
            old.pinned -= 1
        rec.worker = wid
        new = self.workers.get(wid) if wid else None
        if new is not None:
            new.pinned += 1
        if rec.durable is not None:
            self.durable.pinned(rec)

    def expire(self, now: float) -> None:
        """Close the sessions idle past their pool's TTL; the sessions are looked at only when
        one may have expired, and at most every ``_TTL_SCAN_EVERY``."""
        if now < self.next_expiry:
            return
        soonest = math.inf
        for rec in list(self.sessions.values()):
            pool = self.pools[rec.pool]
            ttl = pool.config.session_ttl
            if not ttl or rec.closing:
                continue
            if self.running(rec):  # its idle time starts when the call ends, after now
                soonest = min(soonest, now + ttl)
            elif now >= rec.last_used + ttl:
                pool.sessions_expired += 1
                self.close(rec, f"expired after {ttl:g}s idle")
            else:
                soonest = min(soonest, rec.last_used + ttl)
        self.next_expiry = max(soonest, now + _TTL_SCAN_EVERY)

    def in_restart_grace(self, wid: bytes) -> bool:
        """A pin to ``wid`` a client claims may still be good: the broker just started and that
        incarnation may not have re-registered yet."""
        # (grace_ends is inf once the grace ended: never again)
        return self.clock.now < self.grace_ends != math.inf and wid not in self.gone

    def end_restart_grace(self) -> None:
        """Pins claimed after a broker restart whose worker never came back: strict sessions end,
        and the calls that waited for that worker are answered (a durable session's move)."""
        self.grace_ends = math.inf
        for rec in [r for r in self.sessions.values() if r.worker and r.worker not in self.workers]:
            if self.pools[rec.pool].strict and (rec.durable is None or rec.durable.off):  # (a durable one moves)
                self.retire(rec, rec.worker)
        for pool in self.pools.values():
            for wid, p in pool.take_awaiting():
                if self.durable.reroute(p, pool):
                    continue
                self._fail(p, pool, worker_gone(
                    p.session, wid, f"did not re-register within {self.restart_grace:g}s of this broker's start"))

    def running(self, rec: SessionRecord) -> bool:
        return any(w.runs_session(rec.id) for wid in rec.touched if (w := self.workers.get(wid)) is not None)

    def close(self, rec: SessionRecord, why: str) -> bool:
        """Close now, or (a call of it still running) refuse new calls and release when the last
        call ends. Its calls still waiting in a queue never run. True if a worker holds state."""
        self.closed.add(rec.id, why)
        pool = self.pools[rec.pool]
        for p in pool.take_session(rec.id):
            self._fail(p, pool, SessionClosed(f"session {rec.id[:8]} {why} before this call ran", session=rec.id))
        holders = any(wid in self.workers for wid in rec.touched)
        if self.running(rec):
            rec.closing = why
        else:
            self.release(rec)
        return holders

    def retire(self, rec: SessionRecord, lost: bytes | None) -> None:
        """A session whose pinned worker left (or one closing whose last call died with its
        worker): it leaves every count and stays only as a tombstone, which answers
        ``session_worker_unavailable`` (or ``session_closed`` when it was closing)."""
        if rec.closing:
            self.closed.add(rec.id, rec.closing)
        else:
            assert lost is not None
            why = self.gone.why(lost)
            self.closed.add(rec.id, why, worker=lost)
            pool = self.pools[rec.pool]
            for p in pool.take_session(rec.id):  # waiting for a worker to pin it
                self._fail(p, pool, worker_gone(rec.id, lost, why))
        self.release(rec)

    def release(self, rec: SessionRecord) -> None:
        """Every worker the session touched drops its state (a hint session may have run on
        several; a re-pin leaves state behind on the old worker)."""
        if self.sessions.pop(rec.id, None) is rec and rec.worker and (pinned := self.workers.get(rec.worker)):
            pinned.pinned -= 1
        if rec.durable is not None:
            self.durable.released(rec)
        for wid in rec.touched:
            w = self.workers.get(wid)
            if w is not None:
                self._to_worker(w, [B_RELEASE_SESSION, rec.id.encode()])
