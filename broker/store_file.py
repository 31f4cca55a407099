"""The SQLite file under the checkpoint store (broker/checkpoints.py): its two connections (writes
on one, loads on the other beside a write, as WAL allows), and its upkeep: the WAL copied into it,
what became of it if it is no longer at its path, and writing it there again."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from typing import Any

from broker.store_schema import (
    SCHEMA,
    SCHEMA_VERSION,
    UnusableStore,
    damaged,
    identities,
    set_aside,
    transaction,
)

log = logging.getLogger("dspex.broker")

_SHRINK_MIN, _SHRINK_PAGES = 64, 512  # free pages in the file before it is shrunk; pages given back per copy
# seconds a write on the store's thread waits for a lock another process holds on the file (an
# operator's write, a VACUUM) before it fails; the durable replies waiting for it wait as long
LOCK_WAIT = 30.0


class StoreFile:
    """The database at ``path``; one thread at a time, as the :class:`CheckpointStore` over it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._connect()

    def _connect(self) -> None:
        """Open the file at the path (a new store if there is none) on both connections."""
        path = self.path
        fresh = not os.path.exists(path)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=LOCK_WAIT)
        if fresh:
            os.chmod(path, 0o600)  # session state: the broker's user only, like its run directory
            # the room of closed sessions goes back to the disk (wal_checkpoint); set before any
            # table exists, or it takes a VACUUM of the whole file
            self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        # the WAL is copied into the database (and synced) by the store's thread, never by a
        # commit on the routing thread (wal_checkpoint)
        self.db.execute("PRAGMA wal_autocheckpoint=0")
        self.waits = True  # (the timeout given to connect)
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, 1, SCHEMA_VERSION):
            raise UnusableStore(f"it holds checkpoints of store schema {version}; this broker reads {SCHEMA_VERSION}")
        self.db.executescript(SCHEMA)
        if version == 1:  # its rows' last use is not known: their idle time counts from this start
            self.db.execute("ALTER TABLE sessions ADD COLUMN used REAL")
        if version != SCHEMA_VERSION:  # (a new or older store: a broker restarted on a full disk writes nothing here)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        # loads read on a connection of their own: WAL lets them run beside a write
        self.reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._files = identities(path)  # the files the connections write, to know if they go (gone)
        self._length = os.path.getsize(path)  # the file's; only the store's WAL copies change it (gone)
        self._page_size = int(self.db.execute("PRAGMA page_size").fetchone()[0])

    def wal_checkpoint(self) -> bool:
        """Copy the committed WAL into the database file and truncate the WAL. The store's thread
        runs it when idle, and once a second while busy. A passive copy never let the WAL start
        again from its beginning under back-to-back writes (a write ran during every copy): it
        grew by every write, and its file kept its largest size for good. This one holds writes
        off while it runs: the routing thread's meet the lock and go to the store's thread
        (``run_here``), which runs them after it. Once a quarter of a store made with
        ``auto_vacuum`` is free (closed sessions), it gives back ``_SHRINK_PAGES`` pages to the
        disk; True: there is more to give back."""
        free, pages = (int(self.reader.execute(f"PRAGMA {name}").fetchone()[0])
                       for name in ("freelist_count", "page_count"))
        shrink = free >= _SHRINK_MIN and free * 4 >= pages  # (a quarter of the file free: no churn at each copy)
        if shrink:  # a step at a time: it holds writes off too (executescript: execute frees one page)
            self.reader.executescript(f"PRAGMA incremental_vacuum({_SHRINK_PAGES})")
        self.reader.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        # the size SQLite gave the file, not the one found now: a truncation just after the copy
        # would be taken for its result
        self._length = int(self.reader.execute("PRAGMA page_count").fetchone()[0]) * self._page_size
        return shrink and free > _SHRINK_PAGES

    def gone(self) -> str:
        """What became of the file the store writes, or of its WAL, if it is no longer at its
        path ("" if it is): the connections would go on writing into the unlinked file, lost at
        the broker's next start (:meth:`rewrite`)."""
        found, ours = identities(self.path), self._files
        if found[0] is None:
            return "was deleted"
        if found[0] != ours[0]:
            return "was replaced by another file"
        if found[1] != ours[1]:  # (the -wal stays while a connection is open)
            return "lost its WAL file (-wal deleted or replaced)"
        size = os.path.getsize(self.path)
        if size < self._length:  # pages cut off (rewrite() cannot read them back), or another connection's VACUUM
            sound = self._sound()
            if sound is False:
                return "was truncated"
            if sound:
                self._length = size
        return ""

    def _sound(self) -> bool | None:
        """SQLite finds every page the store's tables use (a file some other connection made
        smaller, a VACUUM, is sound; a truncated one is not); None: it could not look."""
        try:
            return self.reader.execute("PRAGMA quick_check").fetchall() == [("ok",)]
        except sqlite3.DatabaseError as exc:
            if damaged(exc):
                return False
            log.warning("checkpoint store %s: checking the file failed (%s): looked at again in a second", self.path, exc)
            return None

    def empty(self) -> bool:
        """No session's row: a store deleted now loses nothing."""
        return bool(self.reader.execute("SELECT NOT EXISTS (SELECT 1 FROM sessions)").fetchone()[0])

    def rewrite(self) -> tuple[int, str]:
        """Write all of the store at its path again, from its open connections, and reopen it
        there. Files found in the place of the store's (it, its -wal, its -shm) are set aside
        (``PATH.replaced-<UTC time>``), never read as the store. Returns the durable sessions
        written and where such a file went ("" if none). Both connections must be idle (the
        store's thread holds the routing thread's writes off). Raises sqlite3.Error or OSError
        if it cannot (the store as it was)."""
        fresh = f"{self.path}.rewrite"
        if os.path.exists(fresh):
            os.unlink(fresh)  # (left by a broker killed while it wrote one)
        os.close(os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # VACUUM INTO fills an empty file
        aside = ""
        try:
            self.db.execute("VACUUM INTO ?", (fresh,))  # every committed write, as one consistent file
            # a -wal or -shm at the path is read as the new file's at its opening: any not the
            # old file's goes (set aside) before it is there; the old file's once it is closed
            for extra, found, ours in zip(("", "-wal", "-shm"), identities(self.path), self._files):
                if found not in (None, ours):
                    aside = aside or f"{self.path}.replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
                    os.replace(self.path + extra, aside + extra)
            os.replace(fresh, self.path)
        except BaseException:
            if os.path.exists(fresh):
                os.unlink(fresh)
            raise
        self.reader.close()
        self.db.close()
        for extra in ("-wal", "-shm"):  # (SQLite keeps them when the file it closes was deleted)
            if os.path.exists(self.path + extra):
                os.unlink(self.path + extra)
        self._connect()
        sessions = int(self.db.execute("SELECT count(*) FROM sessions WHERE seq >= 0").fetchone()[0])
        self._files = identities(self.path)  # (its -wal and -shm made by the reads above)
        return sessions, aside

    def wait_for_locks(self, wait: bool) -> None:
        """Whether a write waits (up to ``LOCK_WAIT``) for a lock another process holds on the
        file, or fails at once (``locked``)."""
        if wait != self.waits:
            self.db.execute(f"PRAGMA busy_timeout={int(LOCK_WAIT * 1000) if wait else 0}")
            self.waits = wait

    def close(self) -> None:
        self.reader.close()
        self.db.close()

    def begin_again(self, rows: list[tuple[Any, ...]]) -> str:
        """Set the file aside (``PATH.unusable-<UTC time>``, with its -wal and -shm) and begin a
        fresh store at the path holding the session ``rows``; where the file went."""
        aside = set_aside(self.path, "unusable")
        for db in (self.reader, self.db):
            try:
                db.close()
            except sqlite3.Error:
                pass
        self._connect()
        with transaction(self.db):
            self.db.executemany("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        self._files = identities(self.path)
        return aside
