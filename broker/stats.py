"""What the broker measures of a pool: latency histograms with their bucket bounds, the failures
of the last health window, percentiles. Small pure objects the routing core updates and the
metrics and status snapshots read."""

from __future__ import annotations

import bisect
from collections import Counter, deque

# Latency histogram bucket bounds in seconds (Prometheus-style, cumulative at export time).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# longer bounds, used up to the longest timeout a pool is configured with (GEPA calls and queue
# waits of many minutes must not all land in +Inf)
_LONG_BUCKETS = (120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0)


def bucket_bounds(longest: float) -> tuple[float, ...]:
    """``LATENCY_BUCKETS`` extended by long bounds up to the first one >= ``longest`` seconds."""
    bounds = list(LATENCY_BUCKETS)
    for b in _LONG_BUCKETS:
        if bounds[-1] >= longest:
            break
        bounds.append(b)
    if bounds[-1] < longest:
        bounds.append(float(longest))
    return tuple(bounds)


class RecentFailures:
    """Failed answers and crashes of the last ``window`` seconds, by kind (service, user, recycle)
    and error code, in one-second buckets: at most ``window`` + 1 of them, whatever the rate; and
    each kind's newest one with its cause, since counts of ``remote_error`` alone do not say that
    an LM provider refuses every call."""

    __slots__ = ("_buckets", "_last", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        self._buckets: deque[tuple[int, Counter[tuple[str, str]]]] = deque()
        self._last: dict[str, tuple[float, str, str]] = {}  # kind -> (when, code, cause)

    def add(self, kind: str, code: str, now: float, cause: str = "") -> None:
        self._last[kind] = (now, code, cause)
        second = int(now)
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append((second, Counter()))
            while self._buckets[0][0] < now - self.window - 1:
                self._buckets.popleft()
        self._buckets[-1][1][(kind, code)] += 1

    def __len__(self) -> int:
        """The one-second buckets it holds: what it costs in memory."""
        return len(self._buckets)

    def totals(self, now: float) -> dict[str, dict[str, int]]:
        """kind -> code -> count over the buckets inside the window."""
        out: dict[str, dict[str, int]] = {}
        for second, counts in list(self._buckets):
            if second + 1 <= now - self.window:
                continue
            for (kind, code), n in counts.items():
                per = out.setdefault(kind, {})
                per[code] = per.get(code, 0) + n
        return out

    def latest(self, now: float) -> dict[str, dict[str, object]]:
        """kind -> its newest failure inside the window: ``code``, ``cause`` (its error's
        ``Type: message``, "" when none was given) and ``ago_s``."""
        return {kind: {"code": code, "cause": cause, "ago_s": round(now - at, 3)}
                for kind, (at, code, cause) in self._last.items() if at > now - self.window}


class Histogram:
    """Counts per bucket (the last one is +Inf) and their sum; exported cumulative."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx]
