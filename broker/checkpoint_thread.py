"""The thread that runs the broker's checkpoint store (broker/checkpoints.py).

:class:`StoreThread` runs the store on a thread of its own so the routing loop never waits for
the disk: jobs go in a FIFO (so a load sees every write submitted before it), writes waiting
together share one transaction, and each finished job is handed back through
:meth:`StoreThread.completed` after a byte on a pipe the broker polls. Small writes while the
thread has none pending run on the broker's thread instead, all of one loop turn in one
transaction (:meth:`StoreThread.run_here`): a checkpoint of a few KB commits in less time than
the thread hop takes (docs/benchmarks.md, *durable sessions*); a big one never holds the routing
loop.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from collections import deque

from broker.checkpoints import CheckpointStore, Job, StoreError, locked

log = logging.getLogger("dspex.broker")

_CHECKPOINT_IDLE = 1.0  # seconds idle (or at most between copies, while busy) before the WAL is copied into the database
_WAKE = Job("wake", ())  # not work: makes the store thread look at its counters again


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
        # the thread waits for jobs without a timeout: no write since its last copy of the WAL (an
        # idle broker's thread never wakes); a write on the routing thread then wakes it
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
        self.store.wait_for_locks(False)  # (the thread waits again once it has writes: _round)
        left = self._round(jobs, here=True)
        done = jobs[:len(jobs) - len(left)]
        self._writes_here += len(done)
        for job in left:
            self.submit(job)
        if self._asleep:
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
        wrote = 0
        copied = time.monotonic()
        while True:
            # asleep first, then look: a write on the routing thread either is seen here or sees
            # the flag and wakes the thread (a spare wake-up is harmless)
            self._asleep = True
            timeout: float | None = None
            if self._writes_submitted + self._writes_here != wrote:
                self._asleep = False
                timeout = _CHECKPOINT_IDLE
            try:
                job = self._jobs.get(timeout=timeout)
            except queue.Empty:
                if self._writes_submitted + self._writes_here != wrote:  # writes since the last copy
                    wrote, copied = self._copy_wal()
                continue
            self._asleep = False
            if job is _WAKE:
                continue
            batch: list[Job] = []
            stop = job is None
            if job is not None:
                batch.append(job)
            while not stop:  # everything already waiting joins this round (one commit for its writes)
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is _WAKE:
                    continue
                if more is None:
                    stop = True
                else:
                    batch.append(more)
            if batch:
                self._round(batch)
                writes = sum(1 for job in batch if job.op != "load")
                if writes:
                    self._writes_run += writes
                self._done.extend(batch)
                try:
                    os.write(self._write, b"\x01")
                except BlockingIOError:  # the pipe is full: the broker has wake-ups pending anyway
                    pass
            if stop:
                return
            if time.monotonic() >= copied + _CHECKPOINT_IDLE and self._writes_submitted + self._writes_here != wrote:
                # never idle (writes back to back): copied anyway, or the WAL grows for ever
                wrote, copied = self._copy_wal()

    def _copy_wal(self) -> tuple[int, float]:
        """Copy the WAL into the database; the write count and the time it was done at."""
        wrote = self._writes_submitted + self._writes_here
        try:
            if self.store.wal_checkpoint():
                wrote -= 1  # more room to give back: copied again as if written, a second later
        except sqlite3.Error as exc:
            log.warning("checkpoint store %s: copying the WAL failed: %s", self.store.path, exc)
        return wrote, time.monotonic()

    def _round(self, batch: list[Job], here: bool = False) -> list[Job]:
        """Run ``batch``; ``here`` (the routing thread): stop at a lock another process holds and
        return the jobs from there on, untouched (else none)."""
        if not here and any(job.op != "load" for job in batch):
            self.store.wait_for_locks(True)  # (no write runs here meanwhile: run_here waits for these)
        i = 0
        while i < len(batch):
            if batch[i].op == "write":  # consecutive writes: one transaction
                j = i
                while j < len(batch) and batch[j].op == "write":
                    j += 1
                writes = batch[i:j]
                try:
                    for job, result in zip(writes, self.store.apply([job.args[0] for job in writes])):
                        job.error = result
                except Exception as exc:  # noqa: BLE001 - a disk or database failure: every write of the round failed
                    if here and locked(exc):
                        return batch[i:]
                    log.error("checkpoint store %s: %s", self.store.path, exc)
                    for job in writes:
                        job.error = StoreError(f"the broker's checkpoint store failed ({exc})")
                i = j
                continue
            job = batch[i]
            try:
                job.result = getattr(self.store, job.op)(*job.args)
            except Exception as exc:  # noqa: BLE001 - handed back to the broker with the job
                if here and locked(exc):
                    return batch[i:]
                log.error("checkpoint store %s: %s failed: %s", self.store.path, job.op, exc)
                job.error = exc
            i += 1
        return []
