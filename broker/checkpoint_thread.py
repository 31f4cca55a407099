"""The thread that runs the broker's checkpoint store (broker/checkpoints.py).

:class:`StoreThread` runs the store on a thread of its own so the routing loop never waits for
the disk: jobs go in a FIFO (so a load sees every write submitted before it), writes waiting
together share one transaction, and each finished job is handed back through
:meth:`StoreThread.completed` after a byte on a pipe the broker polls. Small writes while the
thread has none pending run on the broker's thread instead, all of one loop turn in one
transaction (:meth:`StoreThread.run_here`): a checkpoint of a few KB commits in less time than
the thread hop takes (docs/benchmarks.md, *durable sessions*); a big one never holds the routing
loop. Once a second the thread copies the WAL into the database and looks at the store's file: one
deleted or replaced under the running broker is written again from the open connections, which it
then swaps while the routing thread's writes are held off (they go to the thread meanwhile).
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from collections import deque

from broker.checkpoints import CheckpointStore, Job
from broker.store_schema import StoreError, damaged, locked

log = logging.getLogger("dspex.broker")

# seconds between two looks of the store's thread at its file: the WAL copied into the database
# (if written since), and the file written again if it went (CheckpointStore.gone)
_LOOK_EVERY = 1.0
_WAKE = Job("wake", ())  # not work: a write ran on the routing thread while the thread slept


class StoreThread:
    """Runs a :class:`CheckpointStore` on its own thread; the broker polls :meth:`fileno`."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._done: deque[Job] = deque()
        # jobs that write, handed to the thread and run by it (each counter has one writer thread)
        self._writes_submitted = 0
        self._writes_run = 0
        self._writes_here = 0  # run on the routing thread (run_here)
        # held by the routing thread while it runs writes (run_here), by the store's thread while
        # it swaps the store's connections (_rewrite_if_gone): run_here never waits for it
        self._connections = threading.Lock()
        self._rewrite_failed = ""  # (logged once until it succeeds)
        self._resets_in_round = 0  # (a round resets a damaged file once, then its jobs fail)
        # a store that holds no session, not written since the thread's last look, has nothing
        # to copy or to lose: the thread waits without a timeout (an idle broker's thread never
        # wakes) until a job, or a write on the routing thread wakes it
        self._asleep = False
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._thread = threading.Thread(target=self._run, name="dspex-checkpoints", daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        return self._read

    @property
    def writing(self) -> bool:
        """The thread has writes to run: a write that does not go through it now would overtake them."""
        return self._writes_submitted != self._writes_run

    def submit(self, job: Job) -> None:
        if job.op != "load":
            self._writes_submitted += 1
        self._jobs.put(job)

    def run_here(self, jobs: list[Job]) -> list[Job]:
        """Run small writes on the caller's thread, in one transaction, while the thread has no
        write of its own to run (:attr:`writing`): no thread hop for the common case. Never
        waits for a lock another process holds on the file (an operator's write, a VACUUM: the
        routing loop would stall): from the first job that meets one, the jobs go to the thread,
        which waits. Returns the jobs done here."""
        assert not self.writing
        if not self._connections.acquire(blocking=False):  # the thread writes the file again: it runs them after
            for job in jobs:
                self.submit(job)
            return []
        try:
            self.store.file.wait_for_locks(False)  # (the thread waits again once it has writes: _round)
            left = self._round(jobs, here=True)
        finally:
            self._connections.release()
        done = jobs[:len(jobs) - len(left)]
        self._writes_here += len(done)
        for job in left:
            self.submit(job)
        if self._asleep:  # (counted first: the thread either sees the count or is woken)
            self._asleep = False
            self._jobs.put(_WAKE)
        return done

    def completed(self) -> list[Job]:
        """Jobs finished since the last call, in the order they were submitted."""
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass
        out = []
        while self._done:
            out.append(self._done.popleft())
        return out

    def close(self) -> None:
        """Finish the jobs submitted so far, then stop."""
        self._jobs.put(None)
        self._thread.join()
        os.close(self._read)
        os.close(self._write)
        self.store.close()

    def _run(self) -> None:
        wrote = 0  # writes (submitted and run here) as of the last copy of the WAL
        looked = time.monotonic()
        empty = self._holds_nothing()
        while True:
            timeout: float | None = max(0.0, looked + _LOOK_EVERY - time.monotonic())
            if empty:
                self._asleep = True  # then look: a write on the routing thread is seen or wakes it
                if self._writes_submitted + self._writes_here == wrote:
                    timeout = None
            try:
                jobs = [self._jobs.get(timeout=timeout)]
            except queue.Empty:
                jobs = []
            self._asleep = False
            while jobs and jobs[-1] is not None:  # everything already waiting joins this round (one commit)
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            batch = [job for job in jobs if job is not None and job is not _WAKE]
            if batch:
                self._round(batch)
                self._writes_run += sum(1 for job in batch if job.op != "load")
                self._hand_back(batch)
            if jobs and jobs[-1] is None:
                self._rewrite_if_gone()  # (a broker stopped right after it went keeps its sessions)
                return
            # once a second, idle or busy (writes back to back never leave the thread idle: the WAL
            # would grow for ever)
            if time.monotonic() >= looked + _LOOK_EVERY:
                self._rewrite_if_gone()
                if self._writes_submitted + self._writes_here != wrote:  # written since the last copy
                    wrote = self._copy_wal()
                    empty = self._holds_nothing()
                looked = time.monotonic()

    def _holds_nothing(self) -> bool:
        with self._connections:  # (the routing thread's writes use the connections too)
            try:
                return self.store.file.empty()
            except sqlite3.Error:
                return False

    def _rewrite_if_gone(self) -> None:
        """Write the store's file again if it went (:meth:`CheckpointStore.rewrite`), the
        routing thread's writes held off meanwhile; begin a fresh one if it is damaged."""
        gone = self.store.file.gone()
        if not gone:
            return
        with self._connections:
            if gone == "was truncated":  # (what a rewrite would read back is not all there)
                self._reset(gone)
                return
            try:
                sessions, aside = self.store.file.rewrite()
            except (sqlite3.Error, OSError) as exc:
                if damaged(exc):
                    self._reset(f"{gone} and is damaged ({exc})")
                elif str(exc) != self._rewrite_failed:
                    self._rewrite_failed = str(exc)
                    log.error("checkpoint store %s %s while the broker ran, and writing it again failed (%s): "
                              "tried again every second; until then a broker restart loses its durable sessions",
                              self.store.path, gone, exc)
                return
        self._rewrite_failed = ""
        log.warning("checkpoint store %s %s while the broker ran: written again from memory, %d sessions%s",
                    self.store.path, gone, sessions, f"; the file found in its place set aside as {aside}" if aside else "")

    def _reset(self, why: str) -> None:
        """The store's file is damaged: a fresh one (:meth:`CheckpointStore.reset`), and the
        broker told (a ``reset`` job: each durable session's next checkpoint is a whole one).
        Called with the connections held."""
        try:
            sessions, aside = self.store.reset()
        except (sqlite3.Error, OSError) as exc:
            log.error("checkpoint store %s %s, and beginning a fresh one failed (%s)", self.store.path, why, exc)
            return
        log.error("checkpoint store %s %s while the broker ran: set aside as %s; a fresh store begins with every "
                  "session, and the checkpoints of %d durable sessions are lost until their next call (their workers "
                  "hold them: each is checkpointed whole at its next call; one whose worker goes first is lost)",
                  self.store.path, why, aside, sessions)
        self._hand_back([Job("reset", ())])

    def _hand_back(self, jobs: list[Job]) -> None:
        self._done.extend(jobs)
        try:
            os.write(self._write, b"\x01")
        except BlockingIOError:  # the pipe is full: the broker has wake-ups pending anyway
            pass

    def _copy_wal(self) -> int:
        """Copy the WAL into the database; the write count it was done at."""
        wrote = self._writes_submitted + self._writes_here
        try:
            if self.store.file.wal_checkpoint():
                wrote -= 1  # more room to give back: copied again as if written, a second later
        except sqlite3.Error as exc:
            log.warning("checkpoint store %s: copying the WAL failed: %s", self.store.path, exc)
        return wrote

    def _reset_damaged(self, exc: BaseException) -> bool:
        """A job met a damaged file: reset it (once: True) unless it was reset already since."""
        if self._resets_in_round:
            return False
        self._resets_in_round += 1
        with self._connections:
            self._reset(f"is damaged ({exc})")
        return True

    def _round(self, batch: list[Job], here: bool = False) -> list[Job]:
        """Run ``batch``; ``here`` (the routing thread): stop at a lock another process holds and
        return the jobs from there on, untouched (else none)."""
        if not here and any(job.op != "load" for job in batch):
            self.store.file.wait_for_locks(True)  # (no write runs here meanwhile: run_here waits for these)
        if not here:
            self._resets_in_round = 0
        i = 0
        while i < len(batch):
            j = i + 1
            if batch[i].op == "write":  # consecutive writes: one transaction
                while j < len(batch) and batch[j].op == "write":
                    j += 1
            jobs = batch[i:j]
            try:
                if jobs[0].op == "write":
                    for job, result in zip(jobs, self.store.apply([job.args[0] for job in jobs])):
                        job.error = result
                else:
                    jobs[0].result = getattr(self.store, jobs[0].op)(*jobs[0].args)
            except Exception as exc:  # noqa: BLE001 - handed back to the broker with the jobs
                if here and (locked(exc) or damaged(exc)):
                    return batch[i:]  # (the thread resets a damaged file first)
                if damaged(exc) and self._reset_damaged(exc):
                    continue  # the same jobs, on the fresh store
                if jobs[0].op == "write":  # a disk or database failure: every write of the transaction failed
                    log.error("checkpoint store %s: %s", self.store.path, exc)
                    exc = StoreError(f"the broker's checkpoint store failed ({exc})")
                else:
                    log.error("checkpoint store %s: %s failed: %s", self.store.path, jobs[0].op, exc)
                for job in jobs:
                    job.error = exc
            i = j
        return []
