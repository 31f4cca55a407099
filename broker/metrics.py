"""Prometheus metrics for the broker, read from a snapshot of its own counters at scrape time.

Nothing here runs on the broker's per-message path: the broker already keeps per-pool outcome
counters, latency and queue-wait histograms (``broker.stats.Histogram``), queue depths, recycle,
crash, start, refusal and timeout counts, and each worker's last heartbeat stats. When Prometheus
scrapes, the collector asks the broker's thread for a snapshot of them (``broker.publisher``: the
HTTP thread never reads the broker's live dicts) and turns it into metric families;
prometheus_client's own process and platform collectors add ``process_*`` and ``python_info``. The
HTTP server runs in its own daemon thread on 127.0.0.1 only.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    make_wsgi_app,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

import dspex
from broker.publisher import StatusPublisher
from broker.roster import CRASH_WHYS, RECYCLE_WHYS
from dspex.wire.protocol import WorkerState

if TYPE_CHECKING:
    from broker.broker import Broker

log = logging.getLogger("dspex.broker.metrics")

# a registered worker whose dspy import still runs is "preparing", not "ready": an alert on ready workers
# must not count one that may yet fail its import (pools status and the dashboard say so too)
_STATES = (*(s.value for s in WorkerState), "preparing")


class BrokerCollector(Collector):
    """Yields the broker's counters as Prometheus metric families."""

    def __init__(self, publisher: StatusPublisher) -> None:
        self.publisher = publisher

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "dspex_requests", "Requests answered by the broker's pools, by op and outcome "
            "(ok, error = an exception on the worker, or the dspex error code the broker replied with)",
            labels=["pool", "op", "outcome"])
        latency = HistogramMetricFamily(
            "dspex_request_duration_seconds", "Time from dispatch to a worker until its reply", labels=["pool"])
        queued = GaugeMetricFamily("dspex_queue_depth", "Requests waiting in the pool's queues", labels=["pool"])
        queue_max = GaugeMetricFamily("dspex_queue_max", "The pool's queue bound", labels=["pool"])
        workers = GaugeMetricFamily("dspex_workers", "Registered workers by state", labels=["pool", "state"])
        expected = GaugeMetricFamily("dspex_workers_expected", "Workers the pool is declared with (numprocs)",
                                     labels=["pool"])
        wait = HistogramMetricFamily(
            "dspex_queue_wait_seconds", "Time from a request's arrival until its dispatch to a worker "
            "(requests that never left the queue are counted in dspex_queue_timeouts_total)", labels=["pool"])
        sessions = GaugeMetricFamily("dspex_sessions", "Sessions the broker holds, by pool", labels=["pool"])
        recycles = CounterMetricFamily(
            "dspex_worker_recycles", "Workers retired by the broker, by why: recycled (on demand or by policy), "
            "hard_limit (a call ignored its hard time limit), drain_deadline (stopped hard, still busy at the pool's "
            "drain deadline)", labels=["pool", "why"])
        crashes = CounterMetricFamily(
            "dspex_worker_crashes", "Workers that left without being recycled, by why: connection_lost (the process "
            "died: crashed or killed), silent (stopped answering heartbeats: wedged, or its host gone)",
            labels=["pool", "why"])
        starts = CounterMetricFamily("dspex_worker_starts", "Worker incarnations that registered with this broker "
                                     "(after a broker restart the live ones register again)", labels=["pool"])
        saturated = CounterMetricFamily("dspex_pool_saturated", "Requests refused because the pool's queue was full "
                                        "(queue_max)", labels=["pool"])
        timeouts = CounterMetricFamily("dspex_queue_timeouts", "Requests that waited in the queue past the pool's "
                                       "queue_timeout and never ran", labels=["pool"])
        expired = CounterMetricFamily("dspex_sessions_expired", "Sessions closed by their idle TTL (session_ttl)",
                                      labels=["pool"])
        wlabels = ["pool", "worker", "pid"]
        rss = GaugeMetricFamily("dspex_worker_rss_bytes", "A worker's resident memory, from its last heartbeat",
                                labels=wlabels)
        served = CounterMetricFamily("dspex_worker_served", "Requests a worker incarnation answered successfully",
                                     labels=wlabels)
        failed = CounterMetricFamily("dspex_worker_failed", "Requests a worker incarnation answered with an error",
                                     labels=wlabels)
        inflight = GaugeMetricFamily("dspex_worker_inflight", "Requests running on a worker now", labels=wlabels)
        beat_age = GaugeMetricFamily("dspex_worker_heartbeat_age_seconds", "Seconds since the broker last heard "
                                     "from a worker (a heartbeat or any other message)", labels=wlabels)
        snap = self.publisher.read()
        # heartbeat ages as of now, not as of the snapshot
        late = max(0.0, time.monotonic() - snap["published"]["monotonic"])
        for name, pool in snap["pools"].items():
            for key, n in pool["outcomes"].items():
                op, _, outcome = key.partition(":")
                requests.add_metric([name, op, outcome], n)
            latency.add_metric([name], *_cumulative(pool["latency_hist"]))
            wait.add_metric([name], *_cumulative(pool["wait_hist"]))
            states = dict.fromkeys(_STATES, 0)
            for w in pool["workers"]:
                states["preparing" if w.get("preparing") and w["state"] in ("ready", "busy") else w["state"]] += 1
                labels = [name, w["id"], str(w["pid"])]
                rss.add_metric(labels, float(w["rss"] or 0))
                served.add_metric(labels, w["served"])
                failed.add_metric(labels, w["errors"])
                inflight.add_metric(labels, w["inflight"])
                beat_age.add_metric(labels, max(0.0, w["last_heartbeat_s"] + late))
            for state, n in states.items():
                workers.add_metric([name, state], n)
            for family, key in ((queued, "queued"), (queue_max, "queue_max"), (expected, "size"), (sessions, "sessions"),
                                (starts, "starts"), (saturated, "saturated"), (timeouts, "queue_timeouts"),
                                (expired, "sessions_expired")):
                family.add_metric([name], pool[key])
            for why in RECYCLE_WHYS:  # every value from the start: rate() and alerts see the first one
                recycles.add_metric([name, why], pool["recycles_by"].get(why, 0))
            for why in CRASH_WHYS:
                crashes.add_metric([name, why], pool["crashes_by"].get(why, 0))

        yield from (requests, latency, wait, queued, queue_max, saturated, timeouts, workers, expected, sessions,
                    expired, recycles, crashes, starts, rss, served, failed, inflight, beat_age)
        garbage = CounterMetricFamily("dspex_malformed_messages", "Messages dropped as malformed", labels=["socket"])
        counters = snap["broker"]
        garbage.add_metric(["frontend"], counters.get("garbage_frontend", 0))
        garbage.add_metric(["backend"], counters.get("garbage_backend", 0))
        yield garbage
        dropped = CounterMetricFamily("dspex_replies_dropped", "Replies the broker could not deliver: to a client "
                                      "that stopped reading them (slow_client) or that has gone (gone_client)",
                                      labels=["reason"])
        dropped.add_metric(["slow_client"], counters.get("replies_dropped_slow_client", 0))
        dropped.add_metric(["gone_client"], counters.get("replies_to_gone_clients", 0))
        yield dropped
        yield CounterMetricFamily("dspex_expired_unsent", "Requests whose caller's timeout ran out before they "
                                  "reached a worker (answered queue_timeout: they never ran)",
                                  value=counters.get("expired_unsent", 0))
        yield GaugeMetricFamily("dspex_broker_start_time_seconds", "When the broker started, in seconds since "
                                "the Unix epoch", value=counters["started"])
        yield InfoMetricFamily("dspex_build", "The dspex version this broker runs",
                               value={"version": dspex.__version__})


def _cumulative(h: dict[str, Any]) -> tuple[list[tuple[str, float]], float]:
    """Prometheus buckets (cumulative, ending in +Inf) and the sum of one histogram snapshot."""
    counts = h["counts"]
    cumulative, buckets = 0, []
    for bound, n in zip(h["bounds"], counts):
        cumulative += n
        buckets.append((repr(float(bound)), float(cumulative)))
    cumulative += counts[-1]
    buckets.append(("+Inf", float(cumulative)))
    return buckets, float(h["sum"])


def make_registry(publisher: StatusPublisher) -> CollectorRegistry:
    # the names are not known before a scrape (labels come from the pools): never probed by a collect
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(publisher))
    # the library's own process_* (cpu, rss, fds, start time) and python_info collectors
    registry.register(PROCESS_COLLECTOR)
    registry.register(PLATFORM_COLLECTOR)
    return registry


def serve_metrics(broker: Broker, port: int) -> Any:
    """Serve ``/metrics`` and the dashboard (``/``, ``/api/status``) on ``127.0.0.1:port`` from a daemon
    thread; returns the server. A port in use falls back to a free one, said in the log and in the
    broker's status (``broker.metrics``: ``requested``, ``port``, ``error``), which ``dspexctl``
    prints; None if nothing could be bound.

    Only loopback: the numbers name pools and counts, and nothing on the network needs
    them more than a local Prometheus agent or an SSH tunnel does.
    """
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client.exposition import ThreadingWSGIServer

    from broker.dashboard import Dashboard

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """Scrapes and page polls are not worth a log line each."""

    addr = "127.0.0.1"
    app = Dashboard(broker.publisher, make_wsgi_app(make_registry(broker.publisher)),
                    getattr(broker.options, "supervisor_conf", None))
    try:
        server = make_server(addr, port, app, ThreadingWSGIServer, handler_class=QuietHandler)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            broker.metrics["error"] = f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}"
            log.error("%s; running without metrics", broker.metrics["error"])
            return None
        taken = f"port {port} is in use by another program"
        try:
            server = make_server(addr, 0, app, ThreadingWSGIServer, handler_class=QuietHandler)
        except OSError as again:
            broker.metrics["error"] = f"{taken}, and no free port could be bound: {again}"
            log.error("%s; running without metrics", broker.metrics["error"])
            return None
        broker.metrics["error"] = f"{taken}; serving on {server.server_port} instead"
        log.warning("metrics: %s (set DSPEX_METRICS_PORT to a free port)", broker.metrics["error"])
    broker.metrics["port"] = server.server_port
    # its poll only serves shutdown(), which nothing calls (a daemon thread): wake for requests alone
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 3600.0}, name="dspex-metrics",
                     daemon=True).start()
    log.info("metrics on http://%s:%d/metrics, dashboard on http://%s:%d/", addr, server.server_port,
             addr, server.server_port)
    return server
