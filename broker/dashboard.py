"""The broker's read-only web dashboard, beside ``/metrics`` on the metrics port.

    /             the page (broker/dashboard.html: one file, inline CSS and JS, no external assets)
    /api/status   what the page shows, as JSON; the page polls it every second
    anything else the Prometheus exposition (``/metrics``)

The JSON is ``Broker.status()`` plus, per pool, the state :func:`dspex.health.pool_state` gives
(the rules ``dspexctl pools status`` uses), per worker the supervisord process name (when the
broker runs with ``--config``, from that conf's supervisord), and recent events. When the broker's
status carries an ``"events"`` list it is shown as is; otherwise this module notes worker starts,
recycles, crashes and exits itself by comparing successive snapshots (a sampler thread takes one
every second, so events between page loads are kept too).

Reading ``Broker.status()`` from this thread races the broker's own thread; a read that hits a
resizing dict is retried (see broker/metrics.py), and a slightly stale number is harmless here.
"""

from __future__ import annotations

import collections
import importlib.resources
import json
import logging
import threading
import time
from typing import Any, Callable, Iterable

from dspex.health import REGISTER_GRACE_S, PoolFacts, pool_state

log = logging.getLogger("dspex.broker.dashboard")

SAMPLE_EVERY_S = 1.0
MAX_EVENTS = 50
PROCESS_CACHE_S = 2.0

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def page() -> bytes:
    return importlib.resources.files("broker").joinpath("dashboard.html").read_bytes()


class EventTracker:
    """Worker starts and exits seen between successive status snapshots (newest first, bounded)."""

    def __init__(self, maxlen: int = MAX_EVENTS) -> None:
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=maxlen)
        self._workers: dict[str, tuple[str, int, str]] | None = None  # incarnation -> (pool, pid, id)
        self._counts: dict[str, tuple[int, int]] = {}  # pool -> (recycles, crashes)
        self._lock = threading.Lock()

    def observe(self, status: dict[str, Any], now: float | None = None) -> None:
        now = time.time() if now is None else now
        workers = {w["incarnation"]: (name, int(w["pid"]), str(w["id"]))
                   for name, pool in status["pools"].items() for w in pool["workers"]}
        counts = {name: (int(pool["recycles"]), int(pool["crashes"])) for name, pool in status["pools"].items()}
        with self._lock:
            if self._workers is not None:
                for inc in self._workers.keys() - workers.keys():
                    pool, pid, wid = self._workers[inc]
                    recycles, crashes = counts.get(pool, (0, 0))
                    before = self._counts.get(pool, (0, 0))
                    kind = "crash" if crashes > before[1] else "recycle" if recycles > before[0] else "exit"
                    self.events.appendleft({"time": now, "kind": kind, "pool": pool, "worker": wid,
                                            "incarnation": inc, "pid": pid})
                for inc in workers.keys() - self._workers.keys():
                    pool, pid, wid = workers[inc]
                    self.events.appendleft({"time": now, "kind": "start", "pool": pool, "worker": wid,
                                            "incarnation": inc, "pid": pid})
            self._workers = workers
            self._counts = counts

    def recent(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events)


class ProcessNames:
    """pid -> ``group:name`` from the supervisord of the broker's supervisor.conf (cached briefly)."""

    def __init__(self, conf: str | None) -> None:
        self.conf = conf
        self._names: dict[int, str] = {}
        self._at = 0.0
        self._lock = threading.Lock()

    def get(self) -> dict[int, str]:
        if not self.conf:
            return {}
        with self._lock:
            if time.monotonic() - self._at < PROCESS_CACHE_S:
                return self._names
            self._at = time.monotonic()
            try:
                from dspex.supervisor import Supervisor, SupervisorConf, full_name

                with Supervisor(SupervisorConf.load(self.conf), timeout=1.0) as sup:
                    self._names = {int(p["pid"]): full_name(p) for p in sup.processes() if p["pid"]}
            except Exception as exc:  # noqa: BLE001 - no supervisord is fine: names are a nicety
                log.debug("no process names from supervisord: %s", exc)
                self._names = {}
            return self._names


def view(status: dict[str, Any], names: dict[int, str], events: list[dict[str, Any]]) -> dict[str, Any]:
    """The dashboard's JSON: the broker's status with pool states, process names and events."""
    young = status["broker"].get("uptime_s", 0) < REGISTER_GRACE_S
    pools = {}
    for name, p in status["pools"].items():
        up = sum(1 for w in p["workers"] if w["state"] in ("ready", "busy"))
        expected = int(p.get("size") or len(p["workers"]))
        verdict = pool_state(name, PoolFacts(
            expected=expected, up=up, queued=int(p.get("queued", 0)), queue_max=p.get("queue_max"),
            requests_ok=int(p.get("requests_ok", 0)), requests_error=int(p.get("requests_error", 0)),
            starting=max(0, expected - up) if young else 0))
        no_data = not p.get("latency_p50_ms") and not p.get("latency_p99_ms")
        pools[name] = {
            **{k: v for k, v in p.items() if k != "workers"},
            "expected": expected, "up": up, "state": verdict.state.value, "reasons": verdict.reasons,
            "latency_p50_ms": None if no_data else p.get("latency_p50_ms"),
            "latency_p99_ms": None if no_data else p.get("latency_p99_ms"),
            "workers": [{**w, "process": names.get(int(w["pid"]))} for w in p["workers"]],
        }
    return {"time": time.time(), "broker": status["broker"], "pools": pools,
            "events": list(status["events"]) if status.get("events") is not None else events,
            "events_source": "broker" if status.get("events") is not None else "dashboard"}


class Dashboard:
    """The WSGI app: the page, its JSON, and everything else to ``metrics_app``."""

    def __init__(self, read_status: Callable[[], dict[str, Any]], metrics_app: WsgiApp,
                 supervisor_conf: str | None = None) -> None:
        self.read_status = read_status
        self.metrics_app = metrics_app
        self.tracker = EventTracker()
        self.names = ProcessNames(supervisor_conf)
        self._page = page()
        self._stop = threading.Event()

    def sample(self) -> dict[str, Any]:
        status = self.read_status()
        self.tracker.observe(status)
        return status

    def start_sampler(self) -> None:
        def loop() -> None:
            while not self._stop.wait(SAMPLE_EVERY_S):
                try:
                    self.sample()
                except Exception as exc:  # noqa: BLE001 - a missed sample only delays an event
                    log.debug("dashboard sample failed: %s", exc)

        threading.Thread(target=loop, name="dspex-dashboard-sampler", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/":
            return self._send(start_response, "200 OK", "text/html; charset=utf-8", self._page)
        if path == "/api/status":
            if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
                return self._send(start_response, "405 Method Not Allowed", "text/plain", b"read-only\n")
            try:
                status = self.sample()
                body = json.dumps(view(status, self.names.get(), self.tracker.recent()), default=str).encode()
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
                                ("Content-Security-Policy", "default-src 'self'; style-src 'unsafe-inline'; "
                                 "script-src 'unsafe-inline'; img-src data:")])
        return [body]
