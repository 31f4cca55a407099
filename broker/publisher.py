"""The broker's status for other threads: snapshots made on the broker's own thread.

The metrics and dashboard threads never read the broker's live dicts. They ask (:meth:`read`)
and the broker's loop builds a fresh snapshot on its next turn (:meth:`serve`): a plain dict that
nobody changes afterwards, so a reader can walk it at leisure. Nothing is built while nobody asks.

The same loop keeps each pool's history for the dashboard's sparklines (:class:`History`): a
point every ``HISTORY_EVERY_S`` seconds for the last ``HISTORY_S`` seconds, bounded, made from
counters the broker keeps anyway (the latency histogram's counts give each interval's p50/p99).
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from broker.core import Core
from broker.ops import live, status
from broker.stats import Histogram

HISTORY_EVERY_S = 10.0
HISTORY_S = 3600.0  # kept in the broker's memory: a broker restart starts it empty
SESSIONS_SHOWN = 200  # the most recently used sessions a snapshot lists (the counts cover all)


def quantile(bounds: tuple[float, ...], counts: list[int], q: float) -> float | None:
    """The ``q`` quantile of histogram ``counts`` (the last bucket is +Inf), interpolated inside
    its bucket; None without samples."""
    total = sum(counts)
    if not total:
        return None
    target = q * total
    seen = 0
    lower = 0.0
    for i, n in enumerate(counts):
        upper = bounds[i] if i < len(bounds) else bounds[-1]
        if n and seen + n >= target:
            return lower + (upper - lower) * max(0.0, target - seen) / n
        seen += n
        lower = upper
    return bounds[-1]


class History:
    """Per pool, ``[time, calls/s, p50 ms, p99 ms, queued, errors, crashes, recycles]`` every
    HISTORY_EVERY_S (errors, crashes and recycles: those of the interval). A point is never changed
    once made, so a snapshot shares them."""

    def __init__(self, core: Core, every: float = HISTORY_EVERY_S, span: float = HISTORY_S) -> None:
        self.core = core
        self.every = every
        self.points: dict[str, deque[list[Any]]] = {name: deque(maxlen=int(span / every)) for name in core.pools}
        self._last: dict[str, tuple[float, int, int, list[int], int, int]] = {
            name: (time.monotonic(), 0, 0, [0] * len(pool.latency.counts), pool.crashes, pool.recycles)
            for name, pool in core.pools.items()}
        self.due = time.monotonic() + every

    def tick(self, now: float) -> None:
        if now < self.due:
            return
        self.due = now + self.every
        wall = time.time()
        for name, pool in self.core.pools.items():
            answered = sum(pool.outcomes.values())
            ok = sum(n for (_, outcome), n in pool.outcomes.items() if outcome == "ok")
            counts = list(pool.latency.counts)
            t0, answered0, errors0, counts0, crashes0, recycles0 = self._last[name]
            span = max(1e-3, now - t0)
            interval = [a - b for a, b in zip(counts, counts0)]
            p50, p99 = (quantile(pool.latency.bounds, interval, q) for q in (0.5, 0.99))
            self.points[name].append([round(wall, 1), round((answered - answered0) / span, 3),
                                      None if p50 is None else round(p50 * 1000, 3),
                                      None if p99 is None else round(p99 * 1000, 3),
                                      pool.queued, (answered - ok) - errors0, pool.crashes - crashes0,
                                      pool.recycles - recycles0])
            self._last[name] = (now, answered, answered - ok, counts, pool.crashes, pool.recycles)

    def copy(self, name: str) -> list[list[Any]]:
        return list(self.points.get(name, ()))


def _histogram(h: Histogram) -> dict[str, Any]:
    return {"bounds": list(h.bounds), "counts": list(h.counts), "sum": h.sum}


def build_snapshot(core: Core, history: History) -> dict[str, Any]:
    """The broker's status plus what only the metrics and the dashboard need: histograms, history,
    the most recently used of the sessions the status counts. Runs on the broker's thread."""
    now = time.monotonic()
    wall = time.time()
    snap = status(core, now)
    for name, pool in core.pools.items():
        p = snap["pools"][name]
        p["latency_hist"] = _histogram(pool.latency)
        p["wait_hist"] = _histogram(pool.queue_wait)
        p["history"] = history.copy(name)
        p["history_every"] = history.every
    listed = (r for r in core.sessions.values() if live(core, r))
    snap["sessions"] = [
        {"id": r.id, "pool": r.pool, "worker": (r.worker or b"").decode(errors="replace"),
         "calls": r.calls, "idle_s": round(now - r.last_used, 3), "age_s": round(wall - r.created, 3),
         **core.durable.view(r, wall)}
        for r in heapq.nlargest(SESSIONS_SHOWN, listed, key=lambda r: r.last_used)]
    snap["published"] = {"time": wall, "monotonic": now}
    return snap


class StatusPublisher:
    """Snapshots on demand: readers ask from any thread, the broker's thread builds."""

    def __init__(self, core: Core, wake: Callable[[], None]) -> None:
        """``wake``: makes the broker's loop turn (a reader waits for it)."""
        self.core = core
        self._wake = wake
        self.history = History(core)
        self.asked = False  # read by the broker's loop every turn: a plain attribute
        self._latest: dict[str, Any] | None = None
        self._waiting: list[threading.Event] = []
        self._lock = threading.Lock()

    def read(self, timeout: float = 2.0) -> dict[str, Any]:
        """A snapshot made after this call began (or, the broker's thread being slow to turn,
        the latest one; raises ``TimeoutError`` when there is none yet)."""
        done = threading.Event()
        with self._lock:
            self._waiting.append(done)
            self.asked = True
        self._wake()
        done.wait(timeout)
        latest = self._latest
        if latest is None:
            raise TimeoutError(f"the broker made no status snapshot within {timeout:g}s")
        return latest

    def serve(self) -> None:
        """On the broker's thread, when ``asked``: build one snapshot for every waiting reader."""
        snap = build_snapshot(self.core, self.history)
        with self._lock:
            self._latest = snap
            waiting, self._waiting = self._waiting, []
            self.asked = False
        for done in waiting:
            done.set()
