"""A private local Ray for the Ray baselines (``noop.ray``, ``serving.ray``).

``ray.init(address="local", num_cpus=2, include_dashboard=False)`` in this process: ``"local"``
always starts a new instance (without it ``ray.init`` would attach to any Ray a colleague runs on
this machine, found through ``/tmp/ray/ray_current_cluster`` or a running GCS). Ray's daemons
(GCS, raylet, its agents, the monitor and log monitor, the idle and actor workers) descend from
this process; at the end they are all killed **by pid** (pid + start time recorded while they
are still our descendants: once the raylet dies its workers are re-parented and could no longer
be found by walking our tree).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

from bench.common import descendants, starttime

RAY_CPUS = 2  # the dspex side of every comparison runs 2 worker processes


def ray_missing() -> str | None:
    """Why Ray cannot be used here, or None."""
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        return f"ray is not importable ({exc}); pip install 'dspex[bench]'"
    return None


class RayHead:
    """The running private instance: its address (for drivers in other processes) and its pids."""

    def __init__(self, address: str, before: set[int]) -> None:
        self.address = address
        self._before = before
        self.seen: set[tuple[int, int]] = set()

    def pids(self) -> list[int]:
        """Ray's processes now: every live descendant of this process that was not there before
        ``ray.init`` (workers that started or exited since are picked up or dropped)."""
        now = [(p, st) for p, st in descendants(os.getpid()) if p not in self._before]
        self.seen.update(now)
        return [p for p, _ in now]


def _kill(procs: set[tuple[int, int]]) -> list[int]:
    killed = []
    for pid, started in procs:
        if starttime(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return killed


@contextmanager
def local_ray(num_cpus: int = RAY_CPUS) -> Iterator[RayHead]:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    before = {pid for pid, _ in descendants(os.getpid())}
    head: RayHead | None = None
    try:
        ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                       configure_logging=False)
        head = RayHead(str(ctx.address_info["gcs_address"]), before)
        head.pids()
        yield head
    finally:
        tree = set(head.seen) if head is not None else set()
        tree.update((p, st) for p, st in descendants(os.getpid()) if p not in before)
        try:
            ray.shutdown()
        finally:
            time.sleep(0.2)
            tree.update((p, st) for p, st in descendants(os.getpid()) if p not in before)
            _kill(tree)
            # what ray.shutdown stopped may still be exiting: wait until none of them runs
            deadline = time.monotonic() + 10
            while any(starttime(p) == st for p, st in tree) and time.monotonic() < deadline:
                time.sleep(0.05)
