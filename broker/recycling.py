"""Recycling rules of the routing core: graceful, rolling, by policy, with a drain deadline.

A recycled worker gets no new work, finishes what it runs, says goodbye and exits (its
supervisor starts the next incarnation). One worker of a pool at a time: the next waits for the
replacement of the last. Policy (request count, age with jitter, RSS) never takes a pool's last
worker, nor one younger than ``MIN_WORKER_AGE``. A worker still busy at the pool's drain deadline
(hung in a call) is stopped hard through the port.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from broker.port import Port
from broker.roster import DRAIN_DEADLINE
from broker.sessions import worker_gone
from broker.state import Pending, Pool, WorkerRecord
from dspex.wire.errors import DspexError
from dspex.wire.protocol import B_DISCONNECT

MIN_WORKER_AGE = 2.0  # seconds: supervisord counts an exit within startsecs as a failed start
REPLACEMENT_WAIT = 30.0  # seconds a rolling recycle waits for a replacement before going on

Fail = Callable[[Pending, "Pool | None", DspexError], None]
Reroute = Callable[[Pending, Pool], bool]  # a durable session's call moves with it (True), else not


class Recycler:
    """Recycles the core's workers; acts through the core's ``fail``, ``to_worker``, ``to_peer``,
    ``remove_worker`` and ``reroute``, and the port (a hard stop)."""

    def __init__(self, workers: dict[bytes, WorkerRecord], port: Port, *, fail: Fail,
                 to_worker: Callable[[WorkerRecord, list[Any]], bool], to_peer: Callable[[bytes, list[bytes]], None],
                 remove_worker: Callable[[WorkerRecord, str], None], wake: Callable[[float], None],
                 reroute: Reroute) -> None:
        """``wake``: tell the core's timers of a new deadline (a drain's)."""
        self.workers = workers
        self.port = port
        self._fail = fail
        self._to_worker = to_worker
        self._to_peer = to_peer
        self._remove_worker = remove_worker
        self._wake = wake
        self._reroute = reroute

    def recycle(self, w: WorkerRecord, now: float, policy: str = "") -> None:
        """Graceful: no new work; the worker finishes its request, says DISCONNECT and exits.
        ``policy``: the rule that retires it (its recycle's why names it; "": an operator's)."""
        pool = w.pool
        pool.recycling = w.id
        pool.recycle_policy = policy
        pool.recycle_started = now
        pool.size_before_recycle = max(pool.size_before_recycle, len(pool.workers))
        self.start_draining(w, "is being recycled", now)
        if not w.inflight:
            self._to_worker(w, [B_DISCONNECT])
        self.port.log(logging.INFO, "recycling worker %s (pid %d) of pool %s%s", w.incarnation[:8], w.pid, pool.name,
                      f": {policy}" if policy else "")

    def start_draining(self, w: WorkerRecord, why: str, now: float) -> None:
        """No new work for ``w``; what waits in its queue fails now (did not run), or moves with
        its durable session (once the call ``w`` runs for it has answered)."""
        pool = w.pool
        w.draining = True
        w.draining_since = now
        if pool.config.drain_timeout:
            self._wake(now + pool.config.drain_timeout)
        queued = list(w.queue)
        w.queue.clear()
        for p in queued:
            if self._reroute(p, pool):
                continue
            self._fail(p, pool, worker_gone(p.session, w.id, why))

    def stop_overdue(self, pool: Pool, now: float) -> None:
        """A draining worker past the pool's drain deadline (hung in a call) is stopped hard (the
        port's ``stop_process``). Its calls get ``WorkerCrashed`` and the rolling recycle goes on."""
        limit = pool.config.drain_timeout
        for w in list(pool.workers.values()):
            if not (w.draining and limit and now >= w.draining_since + limit):
                continue
            self.port.log(logging.ERROR, "worker %s (pid %d, pool %s) still busy %.0fs after it began draining: stopping it hard",
                      w.incarnation[:8], w.pid, pool.name, now - w.draining_since)
            self.port.stop_process(w.pid, w.host)
            self._to_peer(w.id, [B_DISCONNECT])  # a worker on another host: ask once more
            self._remove_worker(w, DRAIN_DEADLINE)

    def next_deadline(self, pool: Pool) -> float:
        """The next time ``step`` or ``stop_overdue`` may have something to do for ``pool`` that
        no message announces: a drain deadline, the end of a wait for a replacement, a worker
        growing old enough to be retired by policy."""
        soonest = pool.next_drain_deadline()
        if pool.recycling is not None and pool.recycling not in self.workers:
            soonest = min(soonest, pool.recycle_started + REPLACEMENT_WAIT)
        policy = pool.config.recycle
        if policy.max_requests or policy.max_age or policy.max_rss_mb:
            for w in pool.workers.values():
                soonest = min(soonest, w.started + MIN_WORKER_AGE)
                if w.retire_age:
                    soonest = min(soonest, w.started + w.retire_age)
        return soonest

    def over_request_limit(self, w: WorkerRecord, now: float) -> bool:
        limit = w.pool.config.recycle.max_requests
        return bool(limit and w.served + w.errors >= limit and w.pool.recycling is None
                    and w.pool.ready_count() >= 2 and now >= w.started + MIN_WORKER_AGE)

    def roll(self, pool: Pool, targets: list[WorkerRecord], now: float) -> None:
        """Recycle ``targets`` one after the other (after what the pool already rolls)."""
        pool.rolling.extend(w.id for w in targets if w.id not in pool.rolling)
        self.step(pool, now)

    def step(self, pool: Pool, now: float) -> None:
        """Go on with the pool's rolling recycle, else recycle a worker its policy retires."""
        if pool.recycling is not None:
            if pool.recycling in self.workers:
                return
            # wait for the replacement (supervisord restarts it) before touching the next one
            target = pool.size_before_recycle or pool.config.size
            if pool.ready_count() < target and now < pool.recycle_started + REPLACEMENT_WAIT:
                return
            pool.recycling = None
            pool.size_before_recycle = 0
        while pool.rolling:
            wid = pool.rolling.popleft()
            w = self.workers.get(wid)
            if w is not None:
                self.recycle(w, now)
                return
        policy = pool.config.recycle
        if not (policy.max_requests or policy.max_age or policy.max_rss_mb) or pool.ready_count() < 2:
            return  # policy never takes a pool's last worker
        for w in pool.workers.values():
            if now < w.started + MIN_WORKER_AGE:
                continue
            rss_mb = float(w.stats.get("rss", 0)) / 2**20
            if policy.max_requests and w.served + w.errors >= policy.max_requests:
                rule = f"{w.served + w.errors} requests reached max_requests {policy.max_requests}"
            elif w.retire_age and now >= w.started + w.retire_age:
                rule = (f"its age {now - w.started:.0f}s reached max_age {policy.max_age:g}s less its jitter of "
                        f"{policy.max_age - w.retire_age:.0f}s")
            elif policy.max_rss_mb and rss_mb >= policy.max_rss_mb:
                rule = f"its RSS {rss_mb:.0f} MB reached max_rss_mb {policy.max_rss_mb:g}"
            else:
                continue
            self.recycle(w, now, rule)
            return
