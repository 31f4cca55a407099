"""Which durable session moves next to a worker that holds fewer (``DurableSessions.spread``).

A crash or a rolling recycle moves a worker's durable sessions to the workers left; nothing
moved them back, so they all stayed on the worker that took them while the replacements idled
(a rolling ``recycle --all`` ended with every session on one worker). A durable session can move
between two calls at the price of a restore, so after a worker registers, sessions move from the
workers holding the most to the one holding the fewest, each when it is idle (at the
registration, then as each call ends), until no worker holds two more than another. A move is a
pin at once; the checkpoint loads at the session's next call.
"""

from __future__ import annotations

from collections.abc import Iterator

from broker.state import Pool, SessionRecord, WorkerRecord


def targets(pool: Pool) -> list[WorkerRecord]:
    """Workers a session may move to: not draining, not waiting for their turn in a recycle."""
    return [w for w in pool.workers.values() if not w.draining and w.id not in pool.rolling]


def even(pool: Pool) -> bool:
    """No worker that may take sessions holds two fewer than another."""
    counts = [w.pinned for w in targets(pool)]
    return not counts or max(counts) - min(counts) <= 1


def target_for(rec: SessionRecord, w: WorkerRecord) -> WorkerRecord | None:
    """Where ``rec``, pinned to ``w``, should move: the worker holding the fewest sessions, if it
    holds two fewer than ``w`` and ``rec`` may move (:func:`may_move`); else None."""
    fewest = min(targets(w.pool), key=lambda t: t.pinned, default=None)
    if fewest is None or fewest.pinned + 2 > w.pinned or not may_move(rec, w):
        return None
    return fewest


def to_spread(pool: Pool, sessions: dict[str, SessionRecord]) -> Iterator[tuple[SessionRecord, WorkerRecord]]:
    """Sessions to move now and where, from the workers holding the most; the caller moves
    each (re-pins it) before the next is chosen."""
    for w in sorted(pool.workers.values(), key=lambda w: -w.pinned):
        for rec in [r for r in sessions.values() if r.worker == w.id]:
            target = target_for(rec, w)
            if target is not None:
                yield rec, target


def may_move(rec: SessionRecord, w: WorkerRecord) -> bool:
    """``rec``, pinned to ``w``, is durable and idle, and its store holds all of it: no call
    running or queued on ``w`` or waiting for its checkpoint's write, no move under way, no
    full checkpoint owed after a broker restart, nothing left out that lives on ``w`` (a move
    would lose it), and a checkpoint stored."""
    d = rec.durable
    return (d is not None and not d.off and not d.move and d.restore is None and not d.needs_full
            and not d.partial and d.seq > 0 and d.submitted == d.done and not w.runs_session(rec.id)
            and not any(q.session == rec.id for q in w.queue))
