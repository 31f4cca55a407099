"""The handlers of the broker ops (``dspex.wire.ops.Op`` members of ``Side.BROKER``), one small
function each, registered against their op in ``HANDLERS``, which the shell hands the core.

Session ops act only on the caller's own sessions (its client identity) unless the caller holds
an admin key; ``recycle`` needs an admin key when the broker has an admin allow-list.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Any

from broker.core import Core, Handler, OpCall
from broker.moves import movable
from broker.state import SessionRecord
from broker.stats import percentile
from dspex.wire.errors import PoolNotFound, ProtocolError, Refused, SessionNotYours
from dspex.wire.ops import Op
from dspex.wire.protocol import PROTOCOL_VERSION

HANDLERS: dict[str, Handler] = {}


def _handles(op: Op) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[op.value] = fn
        return fn
    return register


def may_administer(core: Core, owner: str) -> bool:
    """``recycle`` is open to every peer unless the broker has an admin allow-list (CURVE)."""
    return core.admins is None or owner in core.admins()


def sees_every_session(core: Core, owner: str) -> bool:
    """Only admin keys list, use or close other clients' sessions (never without a list)."""
    return core.admins is not None and owner in core.admins()


@_handles(Op.PING)
def _ping(core: Core, call: OpCall) -> Any:
    # which stack answers: dspexctl compares "config" with its own supervisor.conf
    return {"pong": True, "pid": os.getpid(), **core.stack_info}


@_handles(Op.STATUS)
def _status(core: Core, call: OpCall) -> Any:
    return status(core, core.clock.now)


@_handles(Op.CLOSE_SESSION)
def _close_session(core: Core, call: OpCall) -> Any:
    sid = call.args["session"] or call.session
    rec = core.sessions.get(sid)
    if rec is not None and rec.owner != call.owner and not sees_every_session(core, call.owner):
        raise SessionNotYours(f"session {sid[:8]} belongs to another client", session=sid)
    if rec is None or rec.closing:
        return {"closed": False, "released": False}
    # what it runs ends with it: released when the cancelled calls answer (Sessions.close)
    core.control.cancel_session(rec.id, (w for wid in rec.touched if (w := core.workers.get(wid)) is not None))
    return {"closed": True, "released": core.book.close(rec, "was closed")}


@_handles(Op.SESSIONS)
def _sessions(core: Core, call: OpCall) -> Any:
    wanted = call.args["pool"]
    now = core.clock.now
    wall = core.clock.wall()
    return [
        {"id": r.id, "pool": r.pool, "worker": (r.worker or b"").decode(errors="replace"),
         "worker_alive": r.worker in core.workers if r.worker else False,
         "calls": r.calls, "idle_s": round(now - r.last_used, 3), "created": r.created,
         # the CURVE key that opened it; on ipc every client shares one identity, so none is named
         **({"owner": r.owner} if r.owner else {}),
         **core.durable.view(r, wall)}
        for r in core.sessions.values()
        if (not wanted or r.pool == wanted) and live(core, r) and (r.owner == call.owner or sees_every_session(core, call.owner))
    ]


@_handles(Op.RECYCLE)
def _recycle(core: Core, call: OpCall) -> Any:
    if not may_administer(core, call.owner):
        raise Refused("recycle needs an admin key (the broker has an admin allow-list: --curve-allowed DIR/admins)")
    name = call.args["pool"] or call.pool
    pool = core.pools.get(name)
    if pool is None:
        raise PoolNotFound(f"no pool named {name!r}")
    wanted_worker = call.args["worker"]
    if wanted_worker:
        matches = [w for w in pool.workers.values() if w.incarnation.startswith(str(wanted_worker))
                   or str(w.pid) == str(wanted_worker)]
        if len(matches) != 1:
            raise ProtocolError(f"worker {wanted_worker!r} matches {len(matches)} workers of {pool.name}")
        targets = matches
    elif call.args["all"]:
        targets = list(pool.workers.values())
    else:  # the oldest worker
        targets = sorted(pool.workers.values(), key=lambda w: w.started)[:1]
    core.recycler.roll(pool, targets, core.clock.now)
    return {"pool": pool.name, "recycling": [w.incarnation for w in targets]}


def live(core: Core, r: SessionRecord) -> bool:
    """A session its caller can use: not closing, and not waiting for a worker that went silent
    (a partitioned host's, which may come back with it), unless it is durable: one whose worker
    is gone moves with its next call, and must stay in sight (``dspexctl sessions close`` closes
    what it lists). The one definition that ``sessions``, the status's counts, /metrics and the
    dashboard's table all use."""
    return not r.closing and (r.worker is None or r.worker in core.workers or movable(r))


def session_counts(core: Core) -> tuple[dict[str, int], dict[bytes, int]]:
    """Live sessions per pool and per pinned worker, in one pass."""
    per_pool: Counter[str] = Counter()
    per_worker: Counter[bytes] = Counter()
    for r in core.sessions.values():
        if live(core, r):
            per_pool[r.pool] += 1
            if r.worker is not None:
                per_worker[r.worker] += 1
    return per_pool, per_worker


def status(core: Core, now: float) -> dict[str, Any]:
    """The broker's status at monotonic time ``now``."""
    stack = {k: dict(v) if isinstance(v, dict) else v for k, v in core.stack_info.items()}
    per_pool, per_worker = session_counts(core)
    pools = {}
    for pool in core.pools.values():
        lat = list(pool.latencies)
        ok = sum(n for (op, outcome), n in pool.outcomes.items() if outcome == "ok")
        pools[pool.name] = {
            "affinity": pool.mode.value,
            "durable": pool.config.durable,  # every session of it (the client reads it: dspex.client.streamapi)
            "size": pool.config.size,
            "queue_max": pool.config.queue_max,
            "queue_timeout": pool.config.queue_timeout,
            "queued": pool.queued,
            # how long the request waiting longest has waited (each queue's head is its oldest)
            "oldest_wait_s": round(now - min(heads), 3) if (heads := [q[0].enqueued for q in pool.queues() if q])
            else None,
            "sessions": per_pool.get(pool.name, 0),
            "requests_ok": ok,
            "requests_error": sum(pool.outcomes.values()) - ok,
            "outcomes": {f"{op}:{outcome}": n for (op, outcome), n in pool.outcomes.items()},
            "latency_p50_ms": round(percentile(lat, 0.5) * 1000, 3),
            "latency_p99_ms": round(percentile(lat, 0.99) * 1000, 3),
            "recycles": pool.recycles,
            "crashes": pool.crashes,
            "recycles_by": dict(pool.recycles_by),
            "crashes_by": dict(pool.crashes_by),
            "starts": pool.starts,
            "saturated": pool.saturated,
            "queue_timeouts": pool.queue_timeouts,
            "sessions_expired": pool.sessions_expired,
            "health_window": pool.config.health_window,
            "recent": pool.recent.totals(now),  # failures of the health window: service, user, recycle
            "last_failures": pool.recent.latest(now),  # and the newest of each kind, with its cause
            "checkpoint_error": pool.checkpoint_error or None,
            "recycling": pool.recycling.decode() if pool.recycling else None,
            "workers": [
                {
                    "id": w.incarnation[:8], "incarnation": w.incarnation, "pid": w.pid, "host": w.host,
                    "state": w.state.value, "sessions": per_worker.get(w.id, 0), "served": w.served,
                    "errors": w.errors, "inflight": len(w.inflight) - w.ahead, "capacity": w.capacity,
                    "queued": len(w.queue) + w.ahead, "rss": int(w.stats.get("rss", 0)),
                    "refs": int(w.stats.get("refs", 0)),
                    "held_sessions": int(w.stats.get("sessions", 0)),  # session states the worker holds
                    # what keeps it from its job, by its own account (its dspy import failed); None: nothing
                    "problem": str(w.stats["problem"]) if w.stats.get("problem") else None,
                    # still importing dspy (its problem, if any, is not known yet)
                    "preparing": bool(w.stats.get("preparing")),
                    "uptime_s": round(now - w.started, 3),  # its process's, not since it registered here
                    "last_heartbeat_s": round(
                        core.heartbeat_interval * core.heartbeat_liveness - (w.expiry - now), 3),
                }
                for w in pool.workers.values()
            ],
        }
    return {
        "broker": {"pid": os.getpid(), "protocol": PROTOCOL_VERSION, "uptime_s": round(now - core.book.booted, 3), "started": core.started,
                   **stack,
                   "sessions": sum(per_pool.values()), "closed_sessions": len(core.book.closed), **core.counters},
        "pools": pools,
        "events": list(core.roster.events),
        "refused": core.refusals(),
        "turned_away": core.turned_away.report(now),
        "checkpoints": core.durable.status(),
    }
