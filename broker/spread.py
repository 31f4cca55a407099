"""Which durable sessions move to a worker that just registered (``DurableSessions.spread``).

A crash or a rolling recycle moves a worker's durable sessions to the workers left; nothing
moves them back, so without this they all stay on the worker that took them while the
replacements idle (a rolling ``recycle --all`` ends with every session on one worker). A durable
session can move between two calls at the price of a restore, so when a worker registers, idle
sessions move to it from the workers that hold the most until it holds about as many.
"""

from __future__ import annotations

from broker.state import SessionRecord, WorkerRecord


def to_spread(new: WorkerRecord, workers: dict[bytes, WorkerRecord],
              sessions: dict[str, SessionRecord]) -> list[SessionRecord]:
    """Sessions of ``new``'s pool to move to it: one at a time from the worker holding the most,
    while that one holds two more than ``new`` would. Only a session whose store holds all of it
    (:func:`may_move`); none to a worker that is draining or waits for its turn in a recycle."""
    pool = new.pool
    if new.draining or new.id in pool.rolling:
        return []
    held = {w.id: len(w.sessions) for w in pool.workers.values() if w is not new and not w.draining}
    mine = len(new.sessions)
    chosen: list[SessionRecord] = []
    while held:
        wid = max(held, key=lambda k: held[k])
        if held[wid] <= mine + 1:
            break
        old = workers[wid]
        taken = {r.id for r in chosen}
        rec = next((r for sid in old.sessions if sid not in taken and (r := sessions.get(sid)) is not None
                    and may_move(r, old)), None)
        if rec is None:
            del held[wid]
            continue
        chosen.append(rec)
        held[wid] -= 1
        mine += 1
    return chosen


def may_move(rec: SessionRecord, w: WorkerRecord) -> bool:
    """``rec``, pinned to ``w``, is durable and idle, and its store holds all of it: no call
    running or queued on ``w`` or waiting for its checkpoint's write, no move under way, no
    full checkpoint owed after a broker restart, nothing left out that lives on ``w`` (a move
    would lose it), and a checkpoint stored."""
    d = rec.durable
    return (d is not None and not d.off and not d.move and d.restore is None and not d.needs_full
            and not d.partial and d.seq > 0 and d.submitted == d.done and not w.runs_session(rec.id)
            and not any(q.session == rec.id for q in w.queue))
