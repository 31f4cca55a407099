"""What the broker learns about a ``direct`` pool's calls it never routed (issue 14 prototype).

Clients send a pinned session's calls straight to its worker; the worker counts them and its
heartbeats carry ``stats["direct"]``::

    {"endpoint": str, "served": int, "errors": int, "running": int,
     "sessions": {session_id: seconds since its last direct call ended (0: one is running)}}

``served``/``errors`` are totals since the worker started; ``sessions`` lists only the sessions
used since the previous heartbeat. From them the broker keeps a session's idle TTL from expiring
it while it is used directly, counts direct calls towards ``max_requests`` recycling, and shows
them in ``status``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.core import Core
    from broker.state import WorkerRecord


def absorb(core: "Core", w: "WorkerRecord", report: Any, now: float) -> None:
    """One heartbeat's direct-call report of worker ``w``."""
    if not isinstance(report, dict):
        core.counters["garbage_backend"] += 1
        return
    served, errors = int(report.get("served", 0)), int(report.get("errors", 0))
    seen_served, seen_errors = w.direct_seen
    # totals of this incarnation: the difference is what ended since the last heartbeat
    w.served += max(0, served - seen_served)
    w.errors += max(0, errors - seen_errors)
    w.direct_seen = (max(served, seen_served), max(errors, seen_errors))
    sessions = report.get("sessions")
    if isinstance(sessions, dict):
        for sid, idle in sessions.items():
            rec = core.sessions.get(sid) if isinstance(sid, str) else None
            if rec is None or rec.worker != w.id or not isinstance(idle, (int, float)):
                continue  # a session the broker closed or re-pinned: its TTL is not ours to extend
            rec.last_used = max(rec.last_used, now - max(0.0, float(idle)))
    if core._over_request_limit(w):
        core.recycle(w)


def direct_status(w: "WorkerRecord") -> dict[str, Any]:
    """The ``status`` fields of a worker's direct calls (none for a worker of another pool)."""
    if not w.pool.direct:
        return {}
    report = w.stats.get("direct")
    report = report if isinstance(report, dict) else {}
    return {"direct": {"endpoint": str(report.get("endpoint", "")), "served": w.direct_seen[0],
                       "errors": w.direct_seen[1], "running": int(report.get("running", 0))}}
