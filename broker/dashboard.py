"""The broker's read-only web dashboard, beside ``/metrics`` on the metrics port.

    /             the page (broker/dashboard.html: one file, inline CSS and JS, no external assets)
    /api/status   what the page shows, as JSON; the page polls it every second
    anything else the Prometheus exposition (``/metrics``)

The JSON is a snapshot the broker's own thread made (``broker.publisher``: pools, workers,
sessions, events, each pool's last hour) joined with supervisord's processes when the
broker runs with ``--config``: each pool gets the counts and state ``dspexctl pools status`` gives
it (one function computes both: :func:`dspex.stack.poolstatus.summarize`), and a worker process the broker has not registered
(stopped, starting, fatal...) is listed with supervisord's state.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from broker.publisher import StatusPublisher
from dspex.stack.health import (
    REGISTER_GRACE_S,
    gave_up,
    is_here,
    last_failure,
    local_pids,
    proc_uptime,
    restart_loop,
    silent_pids,
    with_exits,
)
from dspex.stack.pools import load_pools
from dspex.stack.poolstatus import latency, stack_issues, summarize
from dspex.stack.supervisor import Supervisor, SupervisorConf, by_group, full_name

log = logging.getLogger("dspex.broker.dashboard")

PROCESS_CACHE_S = 1.0
GAVE_UP = ("FATAL", "BACKOFF")  # supervisord states whose last log line the page quotes (pools status too)

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class Processes:
    """supervisord's processes of the broker's supervisor.conf, how the processes that exited
    lately ended (pid -> ``terminated by SIGSEGV``) and the pools the conf declares now (it may
    have been edited since the broker read it), cached briefly; nothing without one."""

    def __init__(self, conf: str | None) -> None:
        self.conf = conf
        self._procs: list[dict[str, Any]] = []
        self._exits: dict[int, str] = {}
        self._tails: dict[str, str] = {}
        self._declared: dict[str, int] | None = None
        self._loops: dict[str, tuple[int, str]] = {}
        self._at = 0.0
        self._lock = threading.Lock()

    def get(self, crashed: bool = False) -> tuple[list[dict[str, Any]], dict[int, str], dict[str, str],
                                                  dict[str, int] | None, dict[str, tuple[int, str]]]:
        """(processes, how crashed processes ended by pid, the last log line of each process
        supervisord gave up on, backs off or restarts in a loop, by full name, the pools the conf
        declares with their size: None when not known, the processes supervisord restarts in a loop). ``crashed``:
        the broker's events hold a crash, so read how processes ended too."""
        if not self.conf:
            return [], {}, {}, None, {}
        with self._lock:
            if time.monotonic() - self._at < PROCESS_CACHE_S:
                return self._procs, self._exits, self._tails, self._declared, self._loops
            self._at = time.monotonic()
            try:
                self._declared = {c.name: c.size for c in load_pools(self.conf)}
            except Exception as exc:  # noqa: BLE001 - an edit under way: not known, as before it
                log.debug("the pools of %s: %s", self.conf, exc)
                self._declared = None
            try:
                with Supervisor(SupervisorConf.load(self.conf), timeout=1.0) as sup:
                    self._procs = sup.processes()
                    self._exits = sup.exit_causes() if crashed else {}
                    # a loop's process is always young: supervisord's log is read only while one is
                    self._loops = sup.restart_loops(
                        [p for p in self._procs if p["group"] != "broker" and p["statename"] in ("STARTING", "RUNNING")
                         and proc_uptime(p) < REGISTER_GRACE_S], time.time() - REGISTER_GRACE_S)
                    self._tails = {full_name(p): sup.last_log_line(full_name(p)) for p in self._procs
                                   if p["statename"] in GAVE_UP or full_name(p) in self._loops}
            except Exception as exc:  # noqa: BLE001 - no supervisord: the broker's view alone
                log.debug("no processes from supervisord: %s", exc)
                self._procs, self._exits, self._tails, self._loops = [], {}, {}, {}
            return self._procs, self._exits, self._tails, self._declared, self._loops


def _unregistered(proc: dict[str, Any], phase: str) -> dict[str, Any]:
    """A worker row for a supervisord process the broker does not list, in its supervisord state (on
    this host: the dashboard joins the broker host's supervisord only)."""
    return {"incarnation": None, "id": None, "pid": proc["pid"] or None, "host": socket.gethostname(),
            "state": proc["statename"].lower(),
            "phase": phase, "process": full_name(proc),
            "uptime_s": proc_uptime(proc) or None, "registered": False}


def view(snap: dict[str, Any], procs: list[dict[str, Any]], exits: dict[int, str] | None = None,
         tails: dict[str, str] | None = None, declared: Mapping[str, int] | None = None,
         loops: dict[str, tuple[int, str]] | None = None) -> dict[str, Any]:
    """The dashboard's JSON: the broker's snapshot with pool states, supervisord's worker
    processes, and events newest first (a crash with how its process ended, from ``exits``); a
    process supervisord gave up on is a reason of its pool, with its last log line (``tails``); a
    pool removed from the broker's conf since it started (not in ``declared``, the conf's pools and
    their sizes) or added to it (not served: DOWN) is named so, and a process supervisord restarts
    in a loop (``loops``) too; ``issues``, what the broker's status says of the whole stack, as
    ``dspexctl pools status`` says it."""
    loops = loops or {}
    groups = by_group(procs)
    # supervisord's pids name this host's workers only
    registered = local_pids(w for pool in snap["pools"].values() for w in pool["workers"])
    events = with_exits(snap.get("events") or [], exits or {})
    silent = silent_pids(e for e in events if is_here(e))
    young = snap["broker"].get("uptime_s", 0) < REGISTER_GRACE_S
    pools = {}
    served = snap["pools"]
    for name in [*served, *(n for n in declared or {} if n not in served)]:
        p = served.get(name)
        # in the conf now but not served, or the other way round: the broker read the conf at its start
        edited = (str(snap["broker"].get("config") or "")
                  if declared is not None and (name in declared) != (p is not None) else "")
        # supervisord's view when there is one (no group: all its workers are elsewhere), as `pools status`
        s = summarize(name, p, groups.get(name, []) if procs else None, events=events, registered=registered,
                      silent=silent, young=young, conf_size=(declared or {}).get(name, 0), edited=edited,
                      looping=loops)
        assert s.verdict is not None  # the broker's own view: it answered
        workers = [{**w, "process": full_name(s.process_of[w["pid"]]) if is_here(w) and w["pid"] in s.process_of
                    else None, "registered": True} for w in (p or {}).get("workers") or []]
        workers += [_unregistered(proc, phase) for proc, phase in s.unregistered]
        # the page lists every process in its state: the reasons add the last log line of those given up on
        gone = [restart_loop(full_name(proc), *loops[full_name(proc)], (tails or {}).get(full_name(proc), ""))
                if full_name(proc) in loops and proc["pid"] not in silent else
                gave_up(full_name(proc), proc["statename"], (tails or {}).get(full_name(proc), ""))
                for proc in s.broken if proc["statename"] in GAVE_UP
                or (full_name(proc) in loops and proc["pid"] not in silent)]
        pools[name] = {
            **{k: v for k, v in (p or {}).items() if k not in ("workers", "latency_hist", "wait_hist", "outcomes")},
            "in_broker": p is not None,
            "expected": s.expected, "up": s.up, "state": s.verdict.state.value, "reasons": gone + s.verdict.reasons,
            "last_failure": last_failure(name, (p or {}).get("last_failures")),  # pools status's words
            "latency_p50_ms": latency(p, "latency_p50_ms"), "latency_p99_ms": latency(p, "latency_p99_ms"),
            "workers": workers,
        }
    # the snapshot's own time: the HTTP thread answers with the last one when the broker's thread
    # does not turn, and the page must not call old counts fresh
    now = time.time()
    made = float((snap.get("published") or {}).get("time") or now)
    return {"time": made, "age_s": round(max(0.0, now - made), 3), "broker": snap["broker"], "pools": pools,
            "issues": [{"state": state.value, "text": text} for state, text in stack_issues(snap)],
            "events": list(reversed(events)), "sessions": snap.get("sessions") or [],
            "supervisord": bool(procs)}


class Dashboard:
    """The WSGI app: the page, its JSON, and everything else to ``metrics_app``."""

    def __init__(self, publisher: StatusPublisher, metrics_app: WsgiApp, supervisor_conf: str | None = None) -> None:
        self.publisher = publisher
        self.metrics_app = metrics_app
        self.processes = Processes(supervisor_conf)
        self._page = importlib.resources.files("broker").joinpath("dashboard.html").read_bytes()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/":
            return self._send(start_response, "200 OK", "text/html; charset=utf-8", self._page)
        if path == "/api/status":
            if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
                return self._send(start_response, "405 Method Not Allowed", "text/plain", b"read-only\n")
            try:
                snap = self.publisher.read()
                crashed = any(e.get("event") == "crash" for e in snap.get("events") or [])
                body = json.dumps(view(snap, *self.processes.get(crashed)), default=str).encode()
            except Exception as exc:  # noqa: BLE001 - the page shows the error and keeps polling
                log.warning("dashboard status failed: %s", exc)
                return self._send(start_response, "503 Service Unavailable", "application/json",
                                  json.dumps({"error": str(exc)}).encode())
            return self._send(start_response, "200 OK", "application/json", body)
        return self.metrics_app(environ, start_response)

    @staticmethod
    def _send(start_response: StartResponse, status: str, ctype: str, body: bytes) -> list[bytes]:
        start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body))),
                                ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                                ("Content-Security-Policy", ("default-src 'self'; style-src 'unsafe-inline'; "
                                                             "script-src 'unsafe-inline'; img-src data:"))])
        return [body]
