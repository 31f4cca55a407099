"""Session lifecycle and recycling rules of the routing core (a mixin of ``broker.core.Core``).

Sessions: idle time counts from the end of the last call; closed and expired ids are remembered
(``SessionClosed``); the release reaches every worker a session touched, after its last running
call. Recycling: one worker of a pool at a time, with a drain deadline past which a hung worker
is stopped hard.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from dspex.errors import DspexError, SessionClosed, SessionWorkerUnavailable
from dspex.protocol import B_DISCONNECT, B_RELEASE_SESSION
from broker.port import Port
from broker.state import GoneWorkers, Pending, Pool, SessionRecord, Tombstones, WorkerRecord

log = logging.getLogger("dspex.broker")

_MIN_WORKER_AGE = 2.0  # policy never retires a worker younger than this (seconds)


class Lifecycle:
    """Needs the core's state and its ``_fail``, ``_to_worker``, ``_to_peer``, ``_remove_worker``."""

    if TYPE_CHECKING:
        pools: dict[str, Pool]
        workers: dict[bytes, WorkerRecord]
        sessions: dict[str, SessionRecord]
        closed: Tombstones
        gone: GoneWorkers
        now: float
        port: Port

        def _fail(self, p: Pending, pool: Pool | None, err: DspexError) -> None: ...
        def _to_worker(self, w: WorkerRecord, frames: list[Any]) -> bool: ...
        def _to_peer(self, wid: bytes, frames: list[bytes]) -> None: ...
        def _remove_worker(self, w: WorkerRecord, why: str, clean: bool = False) -> None: ...

    # -- sessions -------------------------------------------------------------------------
    _last_ttl_sweep = 0.0

    def _expire_sessions(self, now: float) -> None:
        if now - self._last_ttl_sweep < 1.0:
            return
        self._last_ttl_sweep = now
        for rec in list(self.sessions.values()):
            pool = self.pools.get(rec.pool)
            ttl = pool.config.session_ttl if pool is not None else 3600.0
            if ttl and not rec.closing and now - rec.last_used > ttl and not self._session_running(rec):
                if pool is not None:
                    pool.sessions_expired += 1
                self._close_session(rec, f"expired after {ttl:g}s idle")

    def _session_running(self, rec: SessionRecord) -> bool:
        return any(w.runs_session(rec.id) for wid in rec.touched if (w := self.workers.get(wid)) is not None)

    def _close_session(self, rec: SessionRecord, why: str) -> bool:
        """Close now, or (a call of it still running) refuse new calls and release when the last
        call ends. Its calls still waiting in a queue never run. True if a worker holds state."""
        self.closed.add(rec.id, why)
        pool = self.pools.get(rec.pool)
        if pool is not None:
            for queue in pool.queues():
                for p in [q for q in queue if q.session == rec.id]:
                    queue.remove(p)
                    self._fail(p, pool, SessionClosed(f"session {rec.id[:8]} {why} before this call ran",
                                                      session=rec.id))
        holders = any(wid in self.workers for wid in rec.touched)
        if self._session_running(rec):
            rec.closing = why
        else:
            self._release_session(rec)
        return holders

    def _retire_session(self, rec: SessionRecord, lost: bytes | None) -> None:
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
            for queue in pool.queues() if pool is not None else []:
                for p in [q for q in queue if q.session == rec.id]:  # waiting for a worker to pin it
                    queue.remove(p)
                    self._fail(p, pool, SessionWorkerUnavailable(
                        f"session {rec.id[:8]} is pinned to worker {lost.decode(errors='replace')[:8]}, which {why}",
                        session=rec.id, worker=lost.decode(errors="replace")))
        self._release_session(rec)

    def _release_session(self, rec: SessionRecord) -> None:
        """Every worker the session touched drops its state (a hint session may have run on
        several; a re-pin leaves state behind on the old worker)."""
        self.sessions.pop(rec.id, None)
        for wid in rec.touched:
            w = self.workers.get(wid)
            if w is not None:
                w.sessions.discard(rec.id)
                self._to_worker(w, [B_RELEASE_SESSION, rec.id.encode()])

    def recycle(self, w: WorkerRecord) -> None:
        """Graceful: no new work; the worker finishes its request, says DISCONNECT and exits."""
        pool = w.pool
        pool.recycling = w.id
        pool.recycle_started = self.now
        pool.size_before_recycle = max(pool.size_before_recycle, len(pool.workers))
        self._start_draining(w, "is being recycled")
        if not w.inflight:
            self._to_worker(w, [B_DISCONNECT])
        log.info("recycling worker %s (pid %d) of pool %s", w.incarnation[:8], w.pid, pool.name)

    def _start_draining(self, w: WorkerRecord, why: str) -> None:
        """No new work for ``w``; what waits in its queue fails now (did not run)."""
        pool = w.pool
        w.draining = True
        w.draining_since = self.now
        queued = list(w.queue)
        w.queue.clear()
        for p in queued:
            self._fail(p, pool, SessionWorkerUnavailable(
                f"session {p.session[:8]} is pinned to worker {w.incarnation[:8]}, which {why}",
                session=p.session, worker=w.incarnation))

    def _stop_overdue(self, pool: Pool, now: float) -> None:
        """A draining worker past the pool's drain deadline (hung in a call) is stopped hard (the
        port's ``stop_process``). Its calls get ``WorkerCrashed`` and the rolling recycle goes on."""
        limit = pool.config.drain_timeout
        for w in list(pool.workers.values()):
            if not (w.draining and limit and now - w.draining_since > limit):
                continue
            log.error("worker %s (pid %d, pool %s) still busy %.0fs after it began draining: stopping it hard",
                      w.incarnation[:8], w.pid, pool.name, now - w.draining_since)
            self.port.stop_process(w.pid, w.host)
            self._to_peer(w.id, [B_DISCONNECT])  # a worker on another host: ask once more
            self._remove_worker(w, "was recycled (stopped hard at its drain deadline)")

    def _over_request_limit(self, w: WorkerRecord) -> bool:
        limit = w.pool.config.recycle.max_requests
        return bool(limit and w.served + w.errors >= limit and w.pool.recycling is None
                    and w.pool.ready_count() >= 2 and self.now - w.registered >= _MIN_WORKER_AGE)

    def _recycle_step(self, pool: Pool, now: float) -> None:
        if pool.recycling is not None:
            if pool.recycling in self.workers:
                return
            # wait for the replacement (supervisord restarts it) before touching the next one
            target = pool.size_before_recycle or pool.config.size
            if pool.ready_count() < target and now - pool.recycle_started < 30.0:
                return
            pool.recycling = None
            pool.size_before_recycle = 0
        while pool.rolling:
            wid = pool.rolling.popleft()
            w = self.workers.get(wid)
            if w is not None:
                self.recycle(w)
                return
        policy = pool.config.recycle
        if not (policy.max_requests or policy.max_age or policy.max_rss_mb) or pool.ready_count() < 2:
            return  # policy never takes a pool's last worker
        for w in pool.workers.values():
            if now - w.registered < _MIN_WORKER_AGE:
                continue  # supervisord counts an exit within startsecs as a failed start
            rss_mb = float(w.stats.get("rss", 0)) / 2**20
            if ((policy.max_requests and w.served + w.errors >= policy.max_requests)
                    or (w.retire_age and now - w.registered >= w.retire_age)
                    or (policy.max_rss_mb and rss_mb >= policy.max_rss_mb)):
                self.recycle(w)
                return
