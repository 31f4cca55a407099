"""The broker's store of durable sessions: an embedded SQLite database in its run directory.

One row per durable session (its pool, owner, pinned worker, creation time, the sequence number
and skeleton frame of its last checkpoint, the bytes it holds, when it was last used) and one row per blob slot
(worker/checkpoint.py). WAL journal with ``synchronous=NORMAL``: a committed write is in the
WAL file before ``commit`` returns, so it survives the broker's SIGKILL (not a power cut: the
WAL is synced at checkpoints, not per commit). A broker that restarts on the same run directory
reads :meth:`CheckpointStore.sessions` to know its durable sessions again.

Bounds: a session may hold ``session_cap`` bytes, all sessions together ``total_cap``; a write
past either is refused (:class:`OverCap`) and the session's checkpoint deleted (it goes on as a
plain session: its row stays, marked plain). Closing or expiring a session deletes its rows.

The thread that runs it beside the routing loop: broker/checkpoint_thread.py.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from broker.store_file import StoreFile
from broker.store_schema import (
    SOUND_ROW,
    NotKept,
    OverCap,
    OverTotalCap,
    SessionRow,
    StaleCheckpoint,
    Stored,
    StoreError,
    UnusableStore,
    Write,
    damaged,
    forget_rows,
    locked,
    set_aside,
    transaction,
)
from dspex.stack.health import fmt_size

log = logging.getLogger("dspex.broker")

SESSION_CAP = 64 * 1024 * 1024
TOTAL_CAP = 4 * 1024 * 1024 * 1024


class CheckpointStore:
    """The durable sessions' rows and checkpoints in the store's file (:class:`StoreFile`); one
    thread at a time (the :class:`StoreThread`'s, or a test's)."""

    def __init__(self, path: str, *, session_cap: int = SESSION_CAP, total_cap: int = TOTAL_CAP) -> None:
        self.path = path
        self.session_cap = session_cap
        self.total_cap = total_cap
        self.file = StoreFile(path)
        self._drop_damaged_rows()
        self._sizes: dict[str, int] = dict(self.file.db.execute("SELECT id, size FROM sessions WHERE seq >= 0"))
        self._seqs: dict[str, int] = dict(self.file.db.execute("SELECT id, seq FROM sessions WHERE seq >= 0"))
        self.total = sum(self._sizes.values())
        # every session's row but its checkpoint, kept to write them again if the file is damaged
        # under the broker (reset): [pool, owner, worker, created, used, why it went plain]
        self._rows: dict[str, list[Any]] = {
            r.id: [r.pool, r.owner, r.worker, r.created, r.used, r.plain] for r in self.sessions()}
        self._need_full: set[str] = set()  # sessions whose checkpoint the damage took (reset)
        # sessions dropped ("") or gone plain (why) whose rows a full disk would not change yet (a
        # delete needs room in the WAL too): done at the next job that writes. Left as they were,
        # a restarted broker would bring such a session back durable, with its state of before.
        self._unwritten: dict[str, str] = {}

    def _drop_damaged_rows(self) -> None:
        """Delete the rows whose fields have the wrong types (edited by hand, written by a tool):
        the broker would fail on them at start or at their session's next write. Their sessions
        are lost (their workers, if alive, checkpoint them whole again at their next call)."""
        bad = self.file.db.execute(f"SELECT id, pool FROM sessions WHERE NOT ({SOUND_ROW})").fetchall()
        if not bad:
            return
        with transaction(self.file.db):
            for session, _ in bad:
                forget_rows(self.file.db, session, "")
        log.error("checkpoint store %s: %d damaged session rows (fields of the wrong types) deleted; their "
                  "durable sessions are lost, but for those their workers still hold: %s", self.path, len(bad),
                  ", ".join(f"{str(session)[:8]} (pool {pool!r})" for session, pool in bad))

    def reset(self) -> tuple[int, str]:
        """The file is damaged under the broker (truncated, overwritten): what it held cannot be
        read back, nor trusted where it can. Set it aside (``PATH.unusable-<UTC time>``, with its
        -wal and -shm) and begin a fresh store at the path with every session's row (pool, owner,
        pin, last use; a plain one's reason) and no checkpoint: a durable session's next stored
        checkpoint must be a whole one (:class:`NotKept` until then). Returns the durable
        sessions whose checkpoint was lost and where the file went. Both connections must be idle."""
        # (a durable one's skeleton empty, not NULL: its checkpoint_lost for a restarted broker)
        aside = self.file.begin_again([(sid, pool, owner, worker, created, time.time(), -1 if plain else 0, plain or b"",
                                        0, used) for sid, (pool, owner, worker, created, used, plain) in self._rows.items()])
        self._unwritten.clear()  # (their rows are not in the fresh store)
        self._need_full = set(self._seqs)
        self._sizes = dict.fromkeys(self._seqs, 0)
        self._seqs = dict.fromkeys(self._seqs, 0)
        self.total = 0
        return len(self._need_full), aside

    def close(self) -> None:
        self.file.close()

    # -- sessions ---------------------------------------------------------------------------
    def sessions(self) -> list[SessionRow]:
        rows = self.file.db.execute("SELECT id, pool, owner, worker, created, updated, seq, size, CASE WHEN seq < 0 THEN "
                                "CAST(skeleton AS TEXT) ELSE '' END, used, seq = 0 AND skeleton IS NOT NULL FROM sessions")
        return [SessionRow(sid, pool, owner, worker, created, updated, seq, size, plain, used, bool(lost))
                for sid, pool, owner, worker, created, updated, seq, size, plain, used, lost in rows]

    def open(self, session: str, pool: str, owner: str, worker: str, created: float) -> None:
        """A durable session exists (before its first checkpoint: an empty state to restore)."""
        self._write_forgotten()
        self.file.db.execute("INSERT OR IGNORE INTO sessions VALUES (?, ?, ?, ?, ?, ?, 0, NULL, 0, ?)",
                         (session, pool, owner, worker, created, time.time(), created))
        self._rows.setdefault(session, [pool, owner, worker, created, created, ""])
        self._sizes.setdefault(session, 0)
        self._seqs.setdefault(session, 0)

    def pin(self, session: str, worker: str) -> None:
        self.file.db.execute("UPDATE sessions SET worker = ? WHERE id = ?", (worker, session))
        if session in self._rows:
            self._rows[session][2] = worker

    def used(self, session: str, when: float) -> None:
        """The session's last call ended at wall time ``when`` (its idle time after a restart)."""
        self.file.db.execute("UPDATE sessions SET used = ? WHERE id = ?", (when, session))
        if session in self._rows:
            self._rows[session][4] = when

    def forget(self, session: str, plain: str = "") -> None:
        """The session is closed, expired or lost: its rows go. Or it went ``plain`` (why): its
        checkpoint goes and its row stays (``seq`` -1, the reason in place of a skeleton) until it
        is closed, so that a restarted broker knows it as plain, not as a durable session to
        checkpoint whole again."""
        self.total -= self._sizes.pop(session, 0)
        self._seqs.pop(session, None)
        self._plain_row(session, plain)
        self._unwritten[session] = plain
        try:
            self._write_forgotten()
        except sqlite3.Error as exc:
            if locked(exc) and not self.file.waits:
                raise  # (on the routing thread: the job goes to the store's thread, which waits for the lock)
            log.error("checkpoint store %s: the checkpoint of session %s could not be deleted yet (%s): it is "
                      "deleted at the next write", self.path, session[:8], exc)

    def _write_forgotten(self) -> None:
        """Delete the checkpoints of the sessions dropped or gone plain (raises sqlite3.Error if
        it cannot, keeping them to do)."""
        if not self._unwritten:
            return
        db = self.file.db
        with transaction(db):
            for session, plain in self._unwritten.items():
                forget_rows(db, session, plain)
        self._unwritten.clear()

    def _plain_row(self, session: str, plain: str) -> None:
        self._need_full.discard(session)
        if not plain:
            self._rows.pop(session, None)
        elif session in self._rows:
            self._rows[session][5] = plain

    # -- checkpoints ------------------------------------------------------------------------
    def apply(self, writes: Sequence[Write]) -> list[StoreError | None]:
        """Apply ``writes`` in order, in one transaction; per write None or why it was refused
        (then that session's checkpoint is deleted). Raises sqlite3.Error if the transaction
        fails as a whole (nothing of it is kept)."""
        results: list[StoreError | None] = []
        sizes: dict[str, int] = {}  # sizes changed by this transaction, committed to self._sizes after it
        dropped: list[tuple[str, str]] = []  # (session, why)
        self._write_forgotten()
        db = self.file.db
        with transaction(db):
            for w in writes:
                try:
                    sizes[w.session] = self._apply(w, sizes)
                    results.append(None)
                except StaleCheckpoint as exc:
                    results.append(exc)
                except StoreError as exc:
                    forget_rows(db, w.session, str(exc))
                    sizes.pop(w.session, None)
                    dropped.append((w.session, str(exc)))
                    results.append(exc)
        for session, why in dropped:
            self.total -= self._sizes.pop(session, 0)
            self._seqs.pop(session, None)
            self._plain_row(session, why)
        for session, size in sizes.items():
            self.total += size - self._sizes.get(session, 0)
            self._sizes[session] = size
        for w, result in zip(writes, results):
            if result is None:
                self._seqs[w.session] = w.seq
                self._need_full.discard(w.session)
        return results

    def _apply(self, w: Write, pending: dict[str, int]) -> int:
        db = self.file.db
        old = pending.get(w.session, self._sizes.get(w.session))
        seq = self._seqs.get(w.session)
        if old is None or seq is None:
            raise StoreError(f"session {w.session[:8]} has no durable record (closed, expired or dropped)")
        if w.seq <= seq:
            raise StaleCheckpoint(f"checkpoint {w.seq} of session {w.session[:8]} is not newer than the stored {seq}")
        if not w.full and w.session in self._need_full:
            raise NotKept(f"checkpoint {w.seq} of session {w.session[:8]} holds what changed, and the stored one was "
                          "lost with the damaged store file: not kept (its next checkpoint is a whole one)")
        new = w.size
        if new < len(w.skeleton) + sum(map(len, w.blobs)):
            raise StoreError(f"checkpoint {w.seq} of session {w.session[:8]} says it holds {new} bytes, less than it "
                             "carries")
        if new > self.session_cap:
            raise OverCap(f"its checkpoint would hold {fmt_size(new)}, over the per-session cap of {fmt_size(self.session_cap)}")
        total = self.total + sum(pending.values()) - sum(self._sizes.get(s, 0) for s in pending)
        if total - old + new > self.total_cap:
            raise OverTotalCap(f"the broker's checkpoints would hold {fmt_size(total - old + new)}, over their total cap of "
                          f"{fmt_size(self.total_cap)}")
        if w.full:
            db.execute("DELETE FROM blobs WHERE session = ?", (w.session,))
        elif w.clear_slots:
            marks = ",".join("?" * len(w.clear_slots))
            db.execute(f"DELETE FROM blobs WHERE session = ? AND slot IN ({marks})",
                       (w.session, *w.clear_slots))
        if w.set_slots:
            # an upsert rewrites a slot's row in place; INSERT OR REPLACE would delete it and insert
            # it again under a new rowid, several more pages into the WAL per commit
            db.executemany("INSERT INTO blobs VALUES (?, ?, ?) ON CONFLICT (session, slot) DO UPDATE SET data = "
                           "excluded.data", [(w.session, slot, blob) for slot, blob in zip(w.set_slots, w.blobs)])
        db.execute("UPDATE sessions SET seq = ?, skeleton = ?, size = ?, updated = ? WHERE id = ?",
                   (w.seq, w.skeleton, new, time.time(), w.session))
        return new

    def load(self, session: str) -> Stored | None:
        """The session's last checkpoint (seq 0 and no skeleton: none yet), None if it has no
        durable record."""
        # (as BLOB: a value something else rewrote as text still reaches the worker, which refuses it)
        db = self.file.reader
        db.execute("BEGIN")  # one snapshot: the skeleton and the blobs of the same checkpoint
        try:
            row = db.execute("SELECT seq, CAST(skeleton AS BLOB) FROM sessions WHERE id = ? AND seq >= 0",
                             (session,)).fetchone()
            rows = db.execute("SELECT slot, CAST(data AS BLOB) FROM blobs WHERE session = ? ORDER BY slot",
                              (session,)).fetchall() if row is not None else []
        finally:
            db.execute("COMMIT")
        if row is None:
            return None
        return Stored(row[0], bytes(row[1] or b""), [r[0] for r in rows], [bytes(r[1]) for r in rows])


def open_store(path: str, *, session_cap: int = SESSION_CAP, total_cap: int = TOTAL_CAP) -> CheckpointStore:
    """The store at ``path``. A file there that is no store this broker can read is set aside
    under a new name (kept for a post-mortem) and a fresh store begins: the durable sessions it
    held are lost (but for those their workers still hold), and the broker serves. Refusing to start would not bring them back, and
    supervisord would start the broker again on the same file, for ever."""
    try:
        return CheckpointStore(path, session_cap=session_cap, total_cap=total_cap)
    except (UnusableStore, sqlite3.DatabaseError) as exc:
        if not isinstance(exc, UnusableStore) and not damaged(exc):
            raise  # cannot open or lock it (permissions, a full disk): an operator's to fix
        aside = set_aside(path, "unusable")
        log.error("checkpoint store %s is unusable (%s): set aside as %s; its durable sessions are lost, but for "
                  "those their workers still hold (checkpointed whole again at their next call)", path, exc, aside)
    return CheckpointStore(path, session_cap=session_cap, total_cap=total_cap)




# -- the thread --------------------------------------------------------------------------------

@dataclass
class Job:
    """Work for the store thread. ``op``: "open", "pin", "used", "write", "load", "forget"; ``args`` its
    arguments; ``tag`` whatever the broker needs when it comes back; ``result`` / ``error``
    are set by the thread."""

    op: str
    args: tuple[Any, ...]
    tag: Any = None
    result: Any = None
    error: BaseException | None = None
