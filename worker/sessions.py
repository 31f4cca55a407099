"""The worker's session book: every session it holds state for, and when that state may go.

The book owns the sessions' state (the :class:`~worker.refs.RefTable` and its
:class:`~worker.refs.SessionState` s: refs, namespace module, DSPy settings) and what decides their
end: how many calls of each session run now and when its last call ended. The broker releases a
session it closed or expired (``B_RELEASE_SESSION``); the book's backstop releases a session idle
for twice its pool's TTL since the end of its last call, for releases that never arrive (a broker
restart, a re-pin elsewhere). A running call never lets its session go.
"""

from __future__ import annotations

import logging
import math
import threading
import time

from worker.refs import RefTable

log = logging.getLogger("dspex.worker")


class SessionBook:
    """The sessions of one worker incarnation; safe to use from every thread."""

    def __init__(self, pool: str, worker: str, ref_cap: int) -> None:
        self.refs = RefTable(pool, worker, ref_cap)
        self._lock = threading.Lock()
        self._turn = threading.Condition(self._lock)  # a call of a session ended: the next one may start
        self._running: dict[str, int] = {}  # session -> calls running now
        self._ended: dict[str, tuple[float, int]] = {}  # session -> (end of its last call, pool TTL s)
        self._next_due = math.inf  # no backstop release is due before this (time.monotonic())

    # -- the sessions themselves --------------------------------------------------------------
    def release(self, session_id: str, why: str = "its session was closed") -> int:
        """Drop everything ``session_id`` holds here; how many refs it held."""
        with self._lock:
            self._ended.pop(session_id, None)
        return self.refs.release_session(session_id, why)

    @property
    def count(self) -> int:
        return len(self.refs.sessions)

    # -- calls --------------------------------------------------------------------------------
    def call_started(self, session_id: str, durable: bool = False, until: float | None = None) -> bool:
        """A call of ``session_id`` is about to run ("" for a sessionless call: nothing to count).
        A ``durable`` one waits for the session's running call to end, up to ``until``
        (``time.monotonic()``; None: no limit); False if that call still runs then (the call is
        counted all the same).

        The broker sends a durable session's calls one at a time, but a broker that restarted does
        not know a call still running here from before: the session's next call must not run
        beside it (it would see half of it, and its checkpoint would keep that half). A hint
        session's calls may run side by side on purpose (the broker sends one to any free slot)."""
        if not session_id:
            return True
        with self._turn:
            free = not durable or self._turn.wait_for(
                lambda: session_id not in self._running, None if until is None else max(0.0, until - time.monotonic()))
            self._running[session_id] = self._running.get(session_id, 0) + 1
        return free

    def call_ended(self, session_id: str, ttl: int, ephemeral: bool) -> None:
        """A call of ``session_id`` ended; its idle time counts from now. ``ttl``: the pool's
        session TTL in seconds (0: no backstop). ``ephemeral``: the pool keeps no session state
        between calls (``none``), so the last running call releases it."""
        if not session_id:
            return
        now = time.monotonic()
        with self._lock:
            left = self._running.pop(session_id, 1) - 1
            if left:
                self._running[session_id] = left
            self._ended[session_id] = (now, ttl)
            if ttl and now + 2 * ttl < self._next_due:
                self._next_due = now + 2 * ttl
            if not left:
                self._turn.notify_all()
        if ephemeral and not left:
            self.release(session_id)

    # -- the backstop ---------------------------------------------------------------------------
    def sweep(self, now: float) -> None:
        """Release the sessions idle for twice their pool's TTL (cheap when none is due)."""
        if now < self._next_due:
            return
        with self._lock:
            # a running session is not due: its next due time comes with the end of its call
            idle = [(sid, ended + 2 * ttl) for sid, (ended, ttl) in self._ended.items()
                    if ttl and sid not in self._running]
            due = [sid for sid, at in idle if at < now]
            self._next_due = min((at for _, at in idle if at >= now), default=math.inf)
        for sid in due:
            n = self.release(sid)
            log.info("released session %s (%d refs): idle past the backstop TTL", sid[:8], n)
