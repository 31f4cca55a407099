"""``dspexctl pools status``: the broker's view and supervisord's, joined into pool states.

Each supervisord worker process is either *registered* (the broker lists its pid), *starting*
(supervisord says STARTING, or RUNNING for under ``REGISTER_GRACE_S`` while it imports dspy), or
*broken* (anything else). :func:`dspex.stack.health.pool_state` turns those counts and the broker's
numbers into OK / STARTING / WARN / DEGRADED / DOWN; the stack's state is the worst of the pools'
and of the stack-wide issues (broker unreachable, invalid dspex config, a broker that is not this
supervisord's). The text of the result is ``dspexctl.status_text``'s.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from dspex.client.endpoints import ANY_POOL
from dspex.stack.health import (
    HEALTH_WINDOW_S,
    RECYCLE,
    REGISTER_GRACE_S,
    SERVICE,
    USER,
    State,
    gave_up,
    is_here,
    local_pids,
    proc_phase,
    proc_uptime,
    restart_loop,
    silent_pids,
    with_exits,
    worst,
)
from dspex.stack.poolstatus import latency, stack_issues, summarize
from dspex.stack.supervisor import (
    Supervisor,
    SupervisorConf,
    SupervisorUnreachable,
    by_group,
    full_name,
    left_running,
    left_running_text,
    supervisord_pid,
)
from dspex.wire.errors import ConfigError, ConnectionError, PoolNotFound, Timeout
from dspexctl.commands import (
    EXIT_FOR_STATE,
    EXIT_TIMEOUT,
    Settings,
    foreign_broker,
    silent_process,
)
from dspexctl.diagnose import silent_broker
from dspexctl.status_text import status_text

WORKER_KEYS = ("id", "incarnation", "pid", "state", "sessions", "served", "errors", "inflight", "capacity", "queued",
               "rss", "uptime_s", "last_heartbeat_s", "host", "problem", "preparing")


def gave_up_line(tails: dict[str, str], proc: dict[str, Any]) -> str:
    return gave_up(full_name(proc), proc["statename"], tails.get(full_name(proc), ""))


class PoolsStatus:
    def request(self, pools: tuple[str, ...] = (), verbose: bool = False) -> dict[str, Any]:
        return {"pools": list(pools), "verbose": verbose}

    def execute(self, settings: Settings, req: dict[str, Any]) -> dict[str, Any]:
        """One stack's status; with a map of brokers (one or several), one such part per broker
        (each joined with the supervisord of the conf that broker was started with), the state the worst."""
        brokers = settings.broker_map()
        if brokers is None:
            return self._stack(settings, req)
        for pool in req["pools"]:
            brokers.broker_for(pool)  # a pool the map sends nowhere: PoolNotFound
        parts = []
        for sub in settings.each_broker():
            endpoint = sub.resolved_endpoint()
            wanted = [p for p in req["pools"] if brokers.serves(endpoint, p)]
            if req["pools"] and not wanted:
                continue
            # the pools the map names for this broker (or asks of it): rows even when it cannot be asked
            routed = [*(r for r in brokers.pools_of(endpoint) if r != ANY_POOL), *wanted]
            part = self._stack(sub, {**req, "pools": wanted, "routed": list(dict.fromkeys(routed))})
            del part["verbose"]
            parts.append({"endpoint": endpoint, "routes": brokers.pools_of(endpoint), **part})
        return {"health": worst([State(p["health"]) for p in parts]).value, "brokers": parts,
                "verbose": req["verbose"]}

    def _stack(self, settings: Settings, req: dict[str, Any]) -> dict[str, Any]:
        issues: list[tuple[State, str]] = []
        broker: dict[str, Any] | None = None
        broker_err = ""
        timed_out = False  # the broker accepted the request and did not answer: exit 8, as every command
        try:
            with settings.client() as dx:
                broker = dx.status()
        except (ConnectionError, Timeout) as err:
            broker_err = str(err.details.get("probe") or err.message)  # without the explanation silent_broker gives
            timed_out = isinstance(err, Timeout)
        sc = settings.conf_of(broker)
        broker, procs, tails, loops, sup_info = supervisor_view(settings, sc, broker, issues)
        conf_sizes: dict[str, int] = {}  # the pools the conf declares
        config_error = None
        if sc is not None and not (sup_info or {}).get("unused"):
            from dspex.stack.pools import load_pools

            try:
                conf_sizes = {c.name: c.size for c in load_pools(sc.path)}
            except ConfigError as err:  # still show supervisord's view: it is what explains a FATAL broker
                config_error = err.message
                issues.append((State.DEGRADED, f"invalid dspex config: {err.message}"))

        groups = by_group(procs)
        broker_proc = next((p for p in groups.get("broker", []) if p["name"] == "broker"), None)
        # the pids of this host's workers: supervisord's pids say nothing of another host's
        registered = local_pids(w for pool in (broker or {}).get("pools", {}).values() for w in pool["workers"])
        broker_starting = False
        mismatch = None
        if broker is None:
            if sc is not None and broker_proc is not None and broker_proc["statename"] in ("RUNNING", "STARTING"):
                state, text = silent_broker(broker_proc, settings.resolved_endpoint(), sc, broker_err, settings.config,
                                            settings.timeout if timed_out else None)
                broker_starting = state is State.STARTING
                issues.append((state, text))
            else:
                issues.append((State.UNREACHABLE, f"broker {'did not answer' if timed_out else 'unreachable'}: {broker_err}"))
        else:
            registered.add(broker["broker"]["pid"])
            issues += stack_issues(broker)
            mismatch = foreign_broker(broker["broker"], settings.resolved_endpoint(), sc, procs) if sc else None
            if mismatch:
                issues.append((State.DEGRADED, mismatch))

        routed = req.get("routed") or []
        names = list(dict.fromkeys([*(broker["pools"] if broker else {}), *conf_sizes]))
        if broker is None:  # what it serves is known from the map alone: its pools' state is not
            names += [n for n in routed if n not in names]
        else:
            for n in routed:
                if n not in broker["pools"]:
                    its = ", ".join(broker["pools"]) or "none"
                    text = (f"the endpoint map sends pool {n} to {settings.resolved_endpoint()}, whose broker has no "
                            f"pool {n} (its pools: {its}): its calls get pool_not_found")
                    issues.append((State.DOWN, text))
        if config_error is not None:
            names += [g for g in groups if g != "broker" and g not in names]
        if req["pools"]:
            missing = [n for n in req["pools"] if n not in names and n not in routed]
            if missing:
                raise PoolNotFound(f"no pool named {', '.join(map(repr, missing))}; "
                                   f"pools: {', '.join(names) or 'none'}")
            names = list(req["pools"])
        for g, members in groups.items():  # programs that are not pools (the broker, others)
            if g in names:
                continue
            for p in members:
                if p is broker_proc and broker is None and p["statename"] in ("RUNNING", "STARTING"):
                    continue  # said above: running but silent where we look
                if proc_phase(p, registered) == "broken":
                    issues.append((State.DEGRADED, gave_up_line(tails, p)))

        # with supervisord's view, a pool without a group here has all its workers on other hosts;
        # another stack's broker (mismatch) says nothing of whether this supervisord's workers registered
        local_view = bool(sup_info and sup_info["state"] is not None)
        # the conf this broker read its pools from at its start, as it is now: edited since (a pool
        # added or removed, then `supervisorctl update`), it and the broker disagree until it restarts
        served = (broker or {}).get("pools") or {}
        read_at_start = (str(sc.path) if sc is not None and broker is not None and not mismatch
                         and config_error is None and str(broker["broker"].get("config") or "") == str(sc.path)
                         else "")
        pools = [self._pool(name, broker, broker_starting,
                            None if mismatch else groups.get(name, [] if local_view else None), conf_sizes,
                            registered, tails, loops, issues,
                            read_at_start if (name in conf_sizes) != (name in served) else "")
                 for name in names]
        states = [State(p["health"]) for p in pools if p["health"] != "unknown"] + [s for s, _ in issues]
        health = worst(states)
        owner = {text: p["name"] for p in pools for text in p["reasons"]}
        return {
            "health": health.value,
            "problems": [text for s, text in issues if s != State.STARTING],
            "starting": [text for s, text in issues if s == State.STARTING],
            "issues": [{"state": s.value, "text": text, "pool": owner.get(text)} for s, text in issues],
            "broker": None if broker is None else {**broker["broker"]},
            "supervisor": sup_info,
            "pools": pools,
            "events": list((broker or {}).get("events") or []),
            "verbose": req["verbose"],
            # unreachable only because the broker did not answer in time (exit 8, not 4)
            "timed_out": timed_out and [s for s, _ in issues if s == State.UNREACHABLE] == [State.UNREACHABLE],
        }

    def _pool(self, name: str, broker: dict[str, Any] | None, broker_starting: bool,
              group: list[dict[str, Any]] | None, conf_sizes: dict[str, int], registered: set[int],
              tails: dict[str, str], loops: dict[str, tuple[int, str]], issues: list[tuple[State, str]],
              edited: str) -> dict[str, Any]:
        mark = len(issues)  # the issues from here on are this pool's (its "reasons")
        bp = (broker or {}).get("pools", {}).get(name)
        workers_b = bp["workers"] if bp else []
        events = (broker or {}).get("events") or []
        silent = silent_pids(w for w in events if is_here(w))
        s = summarize(name, bp, group, events=events, registered=registered, silent=silent,
                      young=float((broker or {"broker": {}})["broker"].get("uptime_s") or 0) < REGISTER_GRACE_S,
                      conf_size=conf_sizes.get(name, 0), broker_answered=broker is not None, edited=edited,
                      looping=loops)
        workers = []
        for w in workers_b:
            proc = s.process_of.get(w["pid"]) if is_here(w) else None
            workers.append({**{k: w.get(k) for k in WORKER_KEYS},
                            "process": full_name(proc) if proc else None,
                            "process_state": proc["statename"] if proc else None})
        for proc, phase in s.unregistered:
            if phase == "broken" and (broker is not None or proc["statename"] in ("FATAL", "BACKOFF")):
                if proc["statename"] == "RUNNING" and proc["pid"] in silent:  # it registered: no loop's
                    text = silent_process(proc, name, silent[proc["pid"]])
                elif full_name(proc) in loops:
                    text = restart_loop(full_name(proc), *loops[full_name(proc)], tails.get(full_name(proc), ""))
                elif proc["statename"] != "RUNNING":
                    text = gave_up_line(tails, proc)
                else:
                    text = (f"{full_name(proc)} is RUNNING for {proc_uptime(proc):.0f}s but not registered with the "
                            "broker (see its log)")
                issues.append((State.DEGRADED, text))
            workers.append({**dict.fromkeys(WORKER_KEYS), "pid": proc["pid"] or None, "host": socket.gethostname(),
                            "state": "unregistered", "sessions": 0, "served": 0, "errors": 0, "inflight": 0,
                            "capacity": 0, "queued": 0, "rss": 0, "uptime_s": 0, "process": full_name(proc),
                            "process_state": proc["statename"], "phase": phase})
        # supervisorctl's order: by process name; workers of other hosts (no local process) last
        workers.sort(key=lambda w: (w["process"] is None, w["process"] or "", w.get("host") or "", w.get("id") or ""))
        if s.verdict is None:
            health = State.STARTING.value if broker_starting else "unknown"
        else:
            health = s.verdict.state.value
            issues.extend((s.verdict.state, r) for r in s.verdict.reasons)
        b = bp or {}
        recent = b.get("recent") or {}
        return {
            "name": name, "affinity": b.get("affinity"), "expected": s.expected,
            "ready": s.ready, "busy": s.busy, "draining": s.draining, "total": len(workers_b), "starting": s.starting,
            "sessions": b.get("sessions", 0), "queued": b.get("queued", 0), "oldest_wait_s": b.get("oldest_wait_s"),
            "queue_max": b.get("queue_max"), "requests_ok": b.get("requests_ok", 0),
            "requests_error": b.get("requests_error", 0),
            "latency_p50_ms": latency(bp, "latency_p50_ms"), "latency_p99_ms": latency(bp, "latency_p99_ms"),
            "recycles": b.get("recycles", 0), "crashes": b.get("crashes", 0), "health_window": b.get("health_window"),
            # failed answers (and crashes) of the health window: only "service" counts for WARN
            "failures": {kind: dict(recent.get(kind) or {}) for kind in (SERVICE, USER, RECYCLE)},
            "last_failures": dict(b.get("last_failures") or {}),  # each kind's newest, with its cause
            "health": health, "reasons": [text for _, text in issues[mark:]], "in_broker": bp is not None,
            "workers": workers,
        }

    def exit_code(self, result: dict[str, Any]) -> int:
        if result["health"] == State.UNREACHABLE.value:
            parts = result.get("brokers") or [result]
            if all(p["timed_out"] for p in parts if p["health"] == State.UNREACHABLE.value):
                return EXIT_TIMEOUT
        return EXIT_FOR_STATE[State(result["health"])]

    def present(self, result: dict[str, Any]) -> str:
        return status_text(result)


AGREEMENT_TRIES = 3  # broker reads around supervisord's before the last pair is taken as it is



def supervisor_view(settings: Settings, sc: SupervisorConf | None, broker: dict[str, Any] | None,
                    issues: list[tuple[State, str]]) -> tuple[dict[str, Any] | None, list[dict[str, Any]],
                                                              dict[str, str], dict[str, tuple[int, str]],
                                                              dict[str, Any] | None]:
    """What supervisord of the conf ``sc`` says of the stack, taken between two reads of the
    broker that agree (``broker`` comes back as the later one): its processes, the last log line
    of those that gave up or restart in a loop, and its own state; what it shows wrong goes to
    ``issues``."""
    if sc is None:
        return broker, [], {}, {}, None
    procs: list[dict[str, Any]] = []
    tails: dict[str, str] = {}
    loops: dict[str, tuple[int, str]] = {}  # processes supervisord restarts in a loop
    sup_info: dict[str, Any] = {"conf": str(sc.path), "url": sc.serverurl, "state": None, "pid": None, "processes": []}
    try:
        with Supervisor(sc, timeout=settings.timeout) as sup:
            sup_info["state"] = sup.state()
            sup_info["pid"] = sup.pid()
            procs = sup.processes()
            if broker is not None:
                broker, procs = agreeing_views(broker, procs, lambda: again(settings), sup.processes)
            if broker is not None:  # a worker restarted again and again without registering
                mine = local_pids(w for pool in broker["pools"].values() for w in pool["workers"])
                loops = sup.restart_loops([p for p in procs if p["group"] != "broker" and p["pid"] not in mine
                                           and p["statename"] in ("STARTING", "RUNNING")],
                                          time.time() - REGISTER_GRACE_S)
            tails = {full_name(p): sup.last_log_line(full_name(p)) for p in procs
                     if p["statename"] in ("FATAL", "BACKOFF") or full_name(p) in loops}
            if broker is not None:  # one that answers again after a crash, which only supervisord saw
                now = time.time()
                for pid, when, how in sup.unexpected_exits("broker", now - HEALTH_WINDOW_S):
                    crash = (f"the broker (pid {pid}) exited {now - when:.0f}s ago ({how}) and supervisord "
                             "restarted it: the sessions it held are gone "
                             f"(this clears {HEALTH_WINDOW_S:g}s after)")
                    issues.append((State.WARN, crash))
            if broker is not None and any(e.get("event") == "crash" for e in broker.get("events") or []):
                broker["events"] = with_exits(broker["events"], sup.exit_causes())
    except SupervisorUnreachable as err:
        if broker is not None and not broker["broker"].get("config") and not settings.conf_explicit:
            # a broker started by hand (no --config) beside a conf nobody runs: not its stack's
            sup_info["unused"] = (f"{sc.path} is not this broker's (it was started without --config) and "
                                  "its supervisord is not running: its pools are not expected")
        else:
            left = left_running(sc) if supervisord_pid(sc) is None else {}
            issues.append((State.UNREACHABLE, left_running_text(sc, left) if left else err.message))
    sup_info["processes"] = [{"name": full_name(p), "group": p["group"], "state": p["statename"], "pid": p["pid"],
                              "uptime_s": proc_uptime(p), "description": p["description"],
                              "log_tail": tails.get(full_name(p))} for p in procs]
    return broker, procs, tails, loops, sup_info


def agreeing_views(broker: dict[str, Any], procs: list[dict[str, Any]],
                   read_broker: Callable[[], dict[str, Any] | None],
                   read_procs: Callable[[], list[dict[str, Any]]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The broker's status and supervisord's processes as of one moment. Read one after the other,
    a change between the two reads (a recycle that began: its worker gone, the replacement's new
    pid) shows a worker nobody is replacing. So supervisord's read counts only if the broker's
    workers are the same just after it; else both are read again."""
    for _ in range(AGREEMENT_TRIES):
        after = read_broker()
        if after is None:
            break
        if worker_shape(after) == worker_shape(broker):
            return after, procs
        broker, procs = after, read_procs()
    return broker, procs


def worker_shape(status: dict[str, Any]) -> dict[str, Any]:
    """What of a broker's status supervisord's processes are judged against: each pool's workers
    (busy and ready alike: both are up) and the recycle it runs."""
    return {name: (pool.get("recycling"), sorted(
        (w["incarnation"], w["pid"], w["state"] if w["state"] in ("draining", "away") else "up", bool(w.get("preparing")))
        for w in pool.get("workers") or []))
        for name, pool in (status.get("pools") or {}).items()}


def again(settings: Settings) -> dict[str, Any] | None:
    """The broker's status read once more (None: it did not answer this time)."""
    try:
        with settings.client() as dx:
            status: dict[str, Any] = dx.status()
    except (ConnectionError, Timeout):
        return None
    return status
