"""The checkpoint store's file (broker/checkpoints.py): its tables, what a sound row is, the rows
and checkpoints it reads and writes, what the store does with the files at its path (their
identities, setting one aside), SQLite's errors about them and the store's own errors."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

SCHEMA_VERSION = 2  # 2: sessions.used

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    pool TEXT NOT NULL,
    owner TEXT NOT NULL,
    worker TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    seq INTEGER NOT NULL,
    skeleton BLOB,
    size INTEGER NOT NULL,
    used REAL
);
CREATE TABLE IF NOT EXISTS blobs (
    session TEXT NOT NULL,
    slot INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (session, slot)
);
"""


class StoreError(Exception):
    """A write the store refused; the session's checkpoint is gone (``reason`` says why)."""


class OverCap(StoreError):
    """Past the per-session cap: the session's own size (or past the total cap: OverTotalCap)."""


class OverTotalCap(OverCap):
    """Past the total cap: the store is full, for every durable session (the service's failure)."""


class StaleCheckpoint(StoreError):
    """Not newer than the stored one: ignored, the stored one stays."""


class UnusableStore(StoreError):
    """The file is no store this broker can read: damaged, not a database, another schema."""


class NotKept(StaleCheckpoint):
    """A checkpoint of what changed, for a session whose stored checkpoint was lost with a damaged
    file (:meth:`CheckpointStore.reset`): not kept (it would restore as the whole state); the
    session's next checkpoint is a whole one."""


# what a row needs to be read back (the SQLite column types are not enforced)
SOUND_ROW = ("typeof(id) = 'text' AND typeof(pool) = 'text' AND typeof(owner) = 'text' AND typeof(worker) = 'text' "
              "AND typeof(created) IN ('integer', 'real') AND typeof(updated) IN ('integer', 'real') "
              "AND typeof(seq) = 'integer' AND typeof(size) = 'integer' AND size >= 0 "
              "AND typeof(used) IN ('null', 'integer', 'real') "
              "AND typeof(skeleton) IN ('null', CASE WHEN seq < 0 THEN 'text' ELSE 'blob' END)")


@dataclass
class SessionRow:
    """A durable session as the store keeps it (what a restarted broker needs)."""

    id: str
    pool: str
    owner: str
    worker: str
    created: float
    updated: float
    seq: int
    size: int
    plain: str = ""  # why it went plain (over a cap, the store failed): it has no checkpoint
    # wall time of its last use as the broker saved it (DurableSessions.call_ended); None: not
    # known (a row of a store schema 1)
    used: float | None = None
    # its checkpoint was lost with a damaged store file (reset) and none stored since: a move finds
    # none (the session is lost, never restored empty)
    checkpoint_lost: bool = False


@dataclass
class Write:
    """One checkpoint of a session (worker/checkpoint.py ``Checkpoint``), as it arrived."""

    session: str
    seq: int
    skeleton: bytes | memoryview
    set_slots: Sequence[int]
    blobs: Sequence[bytes | memoryview]
    clear_slots: Sequence[int]
    full: bool
    size: int  # bytes the session holds once applied (the worker keeps every blob's size)


@dataclass
class Stored:
    """A session's last checkpoint, for a restore."""

    seq: int
    skeleton: bytes
    slots: list[int]
    blobs: list[bytes]


def set_aside(path: str, why: str) -> str:
    """Rename the file at ``path`` and its -wal and -shm to ``PATH.<why>-<UTC time>``; that name."""
    aside = f"{path}.{why}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    for extra in ("", "-wal", "-shm"):
        if os.path.exists(path + extra):
            os.replace(path + extra, aside + extra)
    return aside


def damaged(exc: BaseException) -> bool:
    """``exc`` says the file is damaged (malformed, not a database)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in DAMAGED


def forget_rows(db: sqlite3.Connection, session: str, plain: str) -> None:
    """Delete a session's checkpoint; its row too, unless it went ``plain`` (then marked so)."""
    db.execute("DELETE FROM blobs WHERE session = ?", (session,))
    if plain:
        db.execute("UPDATE sessions SET seq = -1, skeleton = ?, size = 0 WHERE id = ?", (plain, session))
    else:
        db.execute("DELETE FROM sessions WHERE id = ?", (session,))


def identities(path: str) -> list[tuple[int, int] | None]:
    """The device and inode of the store's file, its -wal and its -shm (None: none there)."""
    found: list[tuple[int, int] | None] = []
    for extra in ("", "-wal", "-shm"):
        try:
            st = os.stat(path + extra)
            found.append((st.st_dev, st.st_ino))
        except FileNotFoundError:
            found.append(None)
    return found


def locked(exc: BaseException) -> bool:
    """``exc`` is SQLite's "database is locked" (busy or locked: another connection holds it)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One transaction: committed at the end of the block, rolled back if the block raises.
    SQLite rolls a transaction back by itself after some errors (a full disk): a ROLLBACK then
    would raise, hiding the error that matters."""
    db.execute("BEGIN")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


DAMAGED = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)  # primary result codes of a damaged file
