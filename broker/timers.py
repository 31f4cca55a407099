"""When the routing core has something to do that no message announces, and doing it.

Heartbeats every interval (PPP: a worker silent for interval x liveness is removed); a queued
request past its pool's queue timeout or its caller's deadline; a draining worker past its drain
deadline; a rolling recycle that waited long enough for a replacement, or a worker old enough for
its pool's recycle policy; the end of the restart grace; an idle session past its TTL; a notice
window that ended. ``next_deadline`` is the first of them, so the shell sleeps until then instead
of polling: the heartbeat keeps it within one interval of anything announced late.
"""

from __future__ import annotations

import math

from broker.answers import Answers
from broker.recycling import Recycler
from broker.roster import Roster
from broker.sessions import SessionBook
from broker.state import Pool
from dspex.wire.errors import QueueTimeout


class Timers:
    def __init__(self, pools: dict[str, Pool], *, now: float, heartbeat_interval: float, answers: Answers,
                 book: SessionBook, recycler: Recycler, roster: Roster, counters: dict[str, int]) -> None:
        self.pools, self.answers, self.book, self.recycler, self.roster = pools, answers, book, recycler, roster
        self.counters = counters
        self.interval = heartbeat_interval
        self.beat_due = now + heartbeat_interval
        self.due = min(self.beat_due, book.grace_ends)  # nothing to do before this (monotonic seconds)

    def wake(self, when: float) -> None:
        """A deadline an event made (a request queued, a worker draining, a session opened)."""
        self.due = min(self.due, when)

    def tick(self, now: float) -> None:
        """Do what is due by ``now``."""
        if now >= self.beat_due:
            self.roster.heartbeat(now)
            self.beat_due = now + self.interval
        for pool in self.pools.values():
            for p, gave_up in pool.expire(now):
                if gave_up:
                    self.counters["expired_unsent"] += 1
                    self.answers.expired(p, pool)
                    continue
                self.answers.fail_in_bulk(p, pool, QueueTimeout(
                    f"waited {now - p.enqueued:.1f}s in pool {pool.name!r}, over its queue timeout of "
                    f"{pool.config.queue_timeout:g}s", pool=pool.name))
            self.recycler.stop_overdue(pool, now)
            self.recycler.step(pool, now)
        if now >= self.book.grace_ends:
            self.book.end_restart_grace()
        self.book.expire(now)
        self.answers.log_due(self.pools, now)
        self.due = self._next(now)

    def _next(self, now: float) -> float:
        """The first deadline after ``now`` (one that passed and could not be acted on, e.g. a
        policy recycle of a pool's last worker, is looked at again with the next heartbeat)."""
        soonest = self.beat_due
        for t in (self.book.grace_ends, self.book.next_expiry, self.answers.notices.next_due(),
                  *(t for pool in self.pools.values() for t in (pool.next_expiry(), self.recycler.next_deadline(pool)))):
            if now < t < soonest:
                soonest = t
        return soonest if soonest != math.inf else now + self.interval
