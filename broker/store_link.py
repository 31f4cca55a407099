"""The checkpoint store as the routing thread hands it jobs.

Small writes wait for the end of the loop turn and commit together on the routing thread; loads,
big writes and everything after them go to the store's own thread (``broker.checkpoints``), in
order. Finished jobs go back to the core (``Core.store_done``) in the order they were handed over.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from broker import checkpoints
from broker.checkpoints import CheckpointStore, Job, StoreThread
from broker.settings import BrokerOptions
from dspex.stack.rundir import ensure_private_dir
from dspex.wire.errors import ConfigError

_INLINE_WRITE_MAX = 256 * 1024  # a checkpoint write this small commits on the routing thread


def open_store(options: BrokerOptions) -> tuple[CheckpointStore, str] | None:
    """The checkpoint store ``options`` ask for and its path (None: durable sessions are off)."""
    path = options.checkpoints
    if path == "":
        return None
    if path is None:
        if not options.run_dir:
            return None
        path = str(ensure_private_dir(Path(options.run_dir)) / "checkpoints.sqlite")
    try:
        store = checkpoints.open_store(path, session_cap=options.checkpoint_cap, total_cap=options.checkpoint_total_cap)
    except (checkpoints.StoreError, sqlite3.Error) as exc:
        raise ConfigError(f"cannot open the checkpoint store {path}: {exc}") from None
    return store, path


class StoreLink:
    """Checkpoint jobs from the routing thread to the store, and back to ``done`` when finished."""

    def __init__(self, store: CheckpointStore, done: Callable[[list[Job], float], None]) -> None:
        self.thread = StoreThread(store)
        self._done = done
        self._here: list[Job] = []  # small writes committed at the end of this loop turn

    def fileno(self) -> int:
        return self.thread.fileno()

    def submit(self, job: Job) -> None:
        if job.op != "load" and not self.thread.writing and _job_bytes(job) <= _INLINE_WRITE_MAX:
            self._here.append(job)
            return
        self.commit_here()  # what waits here goes first: one order for every job
        self.thread.submit(job)

    def commit_here(self) -> None:
        if not self._here:
            return
        jobs, self._here = self._here, []
        self.thread.run_here(jobs)
        self._done(jobs, time.monotonic())

    def collect(self) -> None:
        """Hand back what the store's thread finished."""
        self._done(self.thread.completed(), time.monotonic())

    def close(self) -> None:
        self.commit_here()
        self.thread.close()  # the writes submitted so far are committed first


def _job_bytes(job: Job) -> int:
    if job.op != "write":
        return 0
    write = job.args[0]
    return len(write.skeleton) + sum(len(b) for b in write.blobs)
