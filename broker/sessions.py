"""The session book of the routing core: sessions, their tombstones, idle expiry and release.

Idle time counts from the end of a session's last call, and a running call never expires it;
closed and expired ids are remembered, so a late call answers ``SessionClosed`` instead of
opening a fresh namespace; a release reaches every worker the session touched, after its last
running call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dspex.errors import DspexError, SessionClosed, SessionWorkerUnavailable
from dspex.protocol import B_RELEASE_SESSION
from broker.state import GoneWorkers, Pending, Pool, SessionRecord, Tombstones, WorkerRecord

Fail = Callable[[Pending, "Pool | None", DspexError], None]  # answer a request with an error
ToWorker = Callable[[WorkerRecord, list[Any]], bool]  # send to a worker (False: it is gone)

_TTL_SCAN_EVERY = 1.0  # seconds: idle sessions are looked for at most this often


class SessionBook:
    """The rules of a session's end, over the core's ``sessions``, ``pools`` and ``workers``."""

    def __init__(self, sessions: dict[str, SessionRecord], pools: dict[str, Pool],
                 workers: dict[bytes, WorkerRecord], gone: GoneWorkers, *, fail: Fail, to_worker: ToWorker) -> None:
        self.sessions = sessions
        self.pools = pools
        self.workers = workers
        self.gone = gone
        self.closed = Tombstones()  # closed and expired session ids: late calls get SessionClosed
        self._fail = fail
        self._to_worker = to_worker
        self._last_ttl_scan = 0.0

    def expire(self, now: float) -> None:
        """Close the sessions idle past their pool's TTL."""
        if now - self._last_ttl_scan < _TTL_SCAN_EVERY:
            return
        self._last_ttl_scan = now
        for rec in list(self.sessions.values()):
            pool = self.pools.get(rec.pool)
            ttl = pool.config.session_ttl if pool is not None else 3600.0
            if ttl and not rec.closing and now - rec.last_used > ttl and not self.running(rec):
                if pool is not None:
                    pool.sessions_expired += 1
                self.close(rec, f"expired after {ttl:g}s idle")

    def running(self, rec: SessionRecord) -> bool:
        return any(w.runs_session(rec.id) for wid in rec.touched if (w := self.workers.get(wid)) is not None)

    def close(self, rec: SessionRecord, why: str) -> bool:
        """Close now, or (a call of it still running) refuse new calls and release when the last
        call ends. Its calls still waiting in a queue never run. True if a worker holds state."""
        self.closed.add(rec.id, why)
        pool = self.pools.get(rec.pool)
        for p in pool.take_session(rec.id) if pool is not None else []:
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
            pool = self.pools.get(rec.pool)
            for p in pool.take_session(rec.id) if pool is not None else []:  # waiting for a worker to pin it
                self._fail(p, pool, SessionWorkerUnavailable(
                    f"session {rec.id[:8]} is pinned to worker {lost.decode(errors='replace')[:8]}, which {why}",
                    session=rec.id, worker=lost.decode(errors="replace")))
        self.release(rec)

    def release(self, rec: SessionRecord) -> None:
        """Every worker the session touched drops its state (a hint session may have run on
        several; a re-pin leaves state behind on the old worker)."""
        self.sessions.pop(rec.id, None)
        for wid in rec.touched:
            w = self.workers.get(wid)
            if w is not None:
                w.sessions.discard(rec.id)
                self._to_worker(w, [B_RELEASE_SESSION, rec.id.encode()])
