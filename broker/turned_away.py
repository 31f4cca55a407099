"""The workers the broker told to leave at their READY: of a pool it does not serve, or speaking
another wire protocol version. Supervisord restarts such a worker, so it knocks again and again;
the broker's status lists the last few (host, pool or version) with how often and how lately, so
``dspexctl pools status`` and the dashboard on the broker host name the cause of the missing
workers (:func:`dspex.stack.poolstatus.stack_issues`)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from dspex.stack.health import HEALTH_WINDOW_S

MAX_TURNED_AWAY = 32  # distinct (host, reason, what) remembered: a fleet of wrong hosts must not grow the broker
UNKNOWN_POOL, WIRE_VERSION = "unknown_pool", "wire_version"


class TurnedAway:
    """The last :data:`MAX_TURNED_AWAY` distinct workers told to leave, each for the health window
    after its last knock."""

    def __init__(self) -> None:
        # (host, reason, pool or version) -> [count, its last pid, monotonic time of its last knock]; newest last
        self._seen: OrderedDict[tuple[str, str, str], list[Any]] = OrderedDict()

    def add(self, host: str, pid: object, reason: str, what: str, now: float) -> None:
        """A worker told to leave: ``what`` the pool it wants, or the wire version it speaks."""
        key = (host, reason, what)
        count = self._seen.pop(key, [0])[0]
        self._seen[key] = [count + 1, pid, now]
        while len(self._seen) > MAX_TURNED_AWAY:
            self._seen.popitem(last=False)

    def report(self, now: float) -> list[dict[str, Any]]:
        """Those of the health window, newest first (older ones are forgotten here)."""
        for key in [k for k, (_, _, last) in self._seen.items() if now - last >= HEALTH_WINDOW_S]:
            del self._seen[key]
        return [{"host": host, "pid": pid, "reason": reason, "wants": what, "count": count, "ago_s": round(now - last, 3)}
                for (host, reason, what), (count, pid, last) in reversed(self._seen.items())]
