"""The broker's /metrics scraped over HTTP from a real broker and workers: Prometheus naming
conventions, per-pool counters and histograms, per-worker series, and the rate-limited log lines
for refusals and queue timeouts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

import dspex
from broker.state import Notices
from broker.stats import bucket_bounds
from dspex.client.exchange import encode_request
from dspex.wire.headers import RequestHeader
from dspex.wire.ops import Op
from tests.harness import Stack, free_port, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, sorted labels), and every family's type."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def worker_series(samples: Samples, name: str, pool: str) -> dict[str, float]:
    """``name``'s samples of ``pool`` by worker pid."""
    return {dict(k[1])["pid"]: v for k, v in samples.items() if k[0] == name and dict(k[1]).get("pool") == pool}


def start(stack: Stack, spec: str, n: int) -> tuple[int, dspex.Client]:
    port = free_port()
    stack.start_broker(spec, extra=["--metrics-port", str(port)])
    name = spec.split(":")[0]
    for _ in range(n):
        stack.start_worker(name, "--no-dspy")
    stack.wait_workers(name, n)
    wait_for(lambda: scrape(port), 10, 0.1, "the metrics endpoint")
    return port, stack.client()


# -- pure logic -------------------------------------------------------------------------------

def test_buckets_reach_the_longest_timeout() -> None:
    assert bucket_bounds(60)[-1] == 60.0
    assert bucket_bounds(900)[-3:] == (300.0, 600.0, 900.0)
    assert bucket_bounds(1000)[-1] == 1800.0
    assert bucket_bounds(10**6)[-1] == 10**6


def test_notices_fold_repeats_into_one_line_per_window() -> None:
    n = Notices(every=10.0)
    key = ("p", "pool_saturated")
    assert n.note(key, 100.0) == 1  # the first of a quiet spell: logged at once
    assert [n.note(key, 100.0 + i) for i in range(1, 6)] == [0] * 5
    assert n.due(105.0) == []
    assert n.due(110.0) == [(key, 5, 10.0)]  # the rest of the window as one count
    assert n.due(125.0) == []  # nothing new: no line
    assert n.note(key, 125.0) == 1  # window over: at once again
    assert n.note(("q", "pool_saturated"), 125.0) == 1  # per pool


# -- a real broker ----------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_metrics_follow_prometheus_conventions(stack: Stack) -> None:
    before = time.time()
    port, _dx = start(stack, "p:strict_queue:queue_timeout=900", 2)
    samples, types = scrape(port)
    for family, kind in types.items():
        if kind == "gauge":
            assert not family.endswith("_total"), f"gauge {family} is named like a counter"
        assert "uptime" not in family
    assert ("dspex_sessions_total", ()) not in samples
    assert types["dspex_sessions"] == "gauge"
    assert types["dspex_broker_start_time_seconds"] == "gauge"
    assert before - 60 < value(samples, "dspex_broker_start_time_seconds") <= time.time()
    assert value(samples, "dspex_build_info", version=dspex.__version__) == 1.0
    # prometheus_client's own collectors: the broker process itself
    assert value(samples, "process_resident_memory_bytes") > 10 * 2**20
    assert value(samples, "process_start_time_seconds") > before - 60
    assert ("process_open_fds", ()) in samples
    # buckets reach the pool's 900 s queue timeout, for call latency and for queue waits
    for hist in ("dspex_request_duration_seconds", "dspex_queue_wait_seconds"):
        assert types[hist] == "histogram"
        assert (f"{hist}_bucket", (("le", "900.0"), ("pool", "p"))) in samples
    for counter in ("dspex_pool_saturated", "dspex_queue_timeouts", "dspex_sessions_expired",
                    "dspex_worker_starts", "dspex_worker_served", "dspex_worker_failed"):
        assert types[counter] == "counter"


@pytest.mark.timeout(90)
def test_counters_and_per_worker_series_move(stack: Stack) -> None:
    port, dx = start(stack, "p:strict_queue:session_ttl=1", 2)
    pids = {str(w["pid"]) for w in stack.workers("p")}
    s = dx.session("p")
    pid = str(s.call("os", "getpid"))
    for _ in range(4):
        s.call("os", "getpid")
    with pytest.raises(dspex.RemoteError):
        s.call("operator", "truediv", [1, 0])
    # the broker counts a reply just after forwarding it: the last one may be a moment behind
    samples = wait_for(lambda: (got := scrape(port)[0])
                       and value(got, "dspex_request_duration_seconds_count", pool="p") == 6 and got,
                       10, 0.05, "the last reply counted")
    assert value(samples, "dspex_worker_starts_total", pool="p") == 2
    served = worker_series(samples, "dspex_worker_served_total", "p")
    assert set(served) == pids
    assert served[pid] == 5 and sum(served.values()) == 5
    assert worker_series(samples, "dspex_worker_failed_total", "p")[pid] == 1
    assert value(samples, "dspex_queue_wait_seconds_count", pool="p") == 6
    assert value(samples, "dspex_request_duration_seconds_count", pool="p") == 6

    # heartbeats carry each worker's RSS; their age stays within a few heartbeat intervals
    def rss_known() -> Samples | None:
        got, _ = scrape(port)
        rss = worker_series(got, "dspex_worker_rss_bytes", "p")
        return got if set(rss) == pids and all(v > 10 * 2**20 for v in rss.values()) else None

    samples = wait_for(rss_known, 20, 0.1, "every worker's RSS")
    ages = worker_series(samples, "dspex_worker_heartbeat_age_seconds", "p")
    assert set(ages) == pids and all(0 <= a < 5 for a in ages.values()), ages

    # the session expires after 1 s idle; a killed worker's replacement is a new start
    wait_for(lambda: value(scrape(port)[0], "dspex_sessions_expired_total", pool="p") == 1, 20, 0.2,
             "the session's expiry counted")
    stack.kill(int(pid))
    stack.start_worker("p", "--no-dspy")
    wait_for(lambda: (now := {str(w["pid"]) for w in stack.workers("p")}) and len(now) == 2 and pid not in now,
             30, 0.1, "a replacement worker")
    samples, _ = scrape(port)
    assert value(samples, "dspex_worker_starts_total", pool="p") == 3
    assert value(samples, "dspex_worker_crashes_total", pool="p", why="connection_lost") == 1
    assert pid not in worker_series(samples, "dspex_worker_rss_bytes", "p"), "a gone worker's series go"


def broker_lines(stack: Stack, pattern: str) -> list[str]:
    text = Path(stack.root, "broker.log").read_text(errors="replace")
    return [line for line in text.splitlines() if re.search(pattern, line)]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_refusals_and_queue_timeouts_are_counted_and_logged_in_bulk(stack: Stack) -> None:
    """One worker busy, a queue of 2: 2 calls wait (and time out), 6 are refused. The log has one
    line per pool and kind at once, then one count for the rest of the 10 s window."""
    port, dx = start(stack, "p:none:queue_max=2,queue_timeout=1", 1)
    busy = threading.Thread(target=dx.call, args=("time", "sleep", [6]), kwargs={"pool": "p"}, daemon=True)
    busy.start()
    wait_for(lambda: stack.workers("p")[0]["state"] == "busy", what="the worker busy")
    with ThreadPoolExecutor(2) as ex:
        waiting = [ex.submit(dx.call, "os", "getpid", pool="p") for _ in range(2)]
        wait_for(lambda: dx.status()["pools"]["p"]["queued"] == 2, what="two queued calls")
        for _ in range(6):
            with pytest.raises(dspex.PoolSaturated):
                dx.call("os", "getpid", pool="p")
        for f in waiting:
            with pytest.raises(dspex.QueueTimeout):
                f.result(30)
    samples, _ = scrape(port)
    assert value(samples, "dspex_pool_saturated_total", pool="p") == 6
    assert value(samples, "dspex_queue_timeouts_total", pool="p") == 2
    assert value(samples, "dspex_requests_total", pool="p", op="call", outcome="pool_saturated") == 6
    first = broker_lines(stack, r"pool p refused 1 request\(s\): queue full \(2/2 queued; pool_saturated\)")
    assert len(first) == 1, stack.logs()
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z? broker\[\d+\] WARNING ", first[0]), first[0]
    wait_for(lambda: broker_lines(stack, r"pool p refused 5 request\(s\) in the last 1\ds: queue full"), 20, 0.2,
             "the refusals of the rest of the window as one line")
    wait_for(lambda: broker_lines(stack, r"pool p: 1 request\(s\) waited past its queue timeout of 1s in the last"),
             20, 0.2, "the second queue timeout as one line")
    assert len(broker_lines(stack, r"pool p refused")) == 2
    assert len(broker_lines(stack, r"pool p: \d+ request\(s\) waited past")) == 2
    assert not broker_lines(stack, r"call failed.*(pool_saturated|queue_timeout)"), "no line per refused call"
    busy.join(30)


@pytest.mark.timeout(90)
def test_a_nearly_full_queue_warns_on_the_dashboard(stack: Stack) -> None:
    """4 of 5 queue slots used: the dashboard's JSON says WARN and why, before anything is refused;
    the refusal that follows is counted in the status too."""
    port, dx = start(stack, "p:none:queue_max=5,queue_timeout=60", 1)
    busy = threading.Thread(target=dx.call, args=("time", "sleep", [4]), kwargs={"pool": "p"}, daemon=True)
    busy.start()
    wait_for(lambda: stack.workers("p")[0]["state"] == "busy", what="the worker busy")
    with ThreadPoolExecutor(5) as ex:
        waiting = [ex.submit(dx.call, "os", "getpid", pool="p") for _ in range(4)]
        wait_for(lambda: dx.status()["pools"]["p"]["queued"] == 4, what="four queued calls")

        def pool_view() -> dict[str, Any]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=10) as resp:
                return dict(json.loads(resp.read())["pools"]["p"])

        p = pool_view()
        assert p["state"] == "warn", p
        assert p["reasons"] == ["p queue is 4/5 full (pool_saturated at 5)"]
        assert value(scrape(port)[0], "dspex_queue_depth", pool="p") == 4
        waiting.append(ex.submit(dx.call, "os", "getpid", pool="p"))
        wait_for(lambda: dx.status()["pools"]["p"]["queued"] == 5, what="the queue full")
        with pytest.raises(dspex.PoolSaturated):
            dx.call("os", "getpid", pool="p")
        assert dx.status()["pools"]["p"]["saturated"] == 1
        assert pool_view()["saturated"] == 1
        assert all(isinstance(f.result(30), int) for f in waiting), "every queued call ran"
    busy.join(30)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_crashes_and_recycles_are_counted_by_why_from_a_bounded_set(stack: Stack) -> None:
    """How a worker left, as a ``why`` label a Prometheus user can alert on: a killed worker's
    connection closed (``connection_lost``), a stopped one's heartbeats stopped (``silent``), a
    recycle (``recycled``). Every value of the bounded set is there from the start (at 0), and
    nothing else: no pid, incarnation or free text in a label."""
    port, dx = start(stack, "p:none", 3)
    samples, _ = scrape(port)
    crash_whys = {"connection_lost", "silent"}
    recycle_whys = {"recycled", "hard_limit", "drain_deadline"}
    for why in crash_whys:
        assert value(samples, "dspex_worker_crashes_total", pool="p", why=why) == 0
    for why in recycle_whys:
        assert value(samples, "dspex_worker_recycles_total", pool="p", why=why) == 0
    recycled, killed, stopped = stack.workers("p")
    dx.recycle("p", worker=recycled["incarnation"])
    wait_for(lambda: value(scrape(port)[0], "dspex_worker_recycles_total", pool="p", why="recycled") == 1, 30, 0.1,
             "the recycle counted")
    stack.kill(int(killed["pid"]))
    os.kill(int(stopped["pid"]), signal.SIGSTOP)  # alive, silent: dropped at heartbeat expiry (close kills it)
    samples = wait_for(lambda: (got := scrape(port)[0])
                       and value(got, "dspex_worker_crashes_total", pool="p", why="silent") == 1 and got,
                       30, 0.2, "the silent worker dropped")
    assert value(samples, "dspex_worker_crashes_total", pool="p", why="connection_lost") == 1
    assert value(samples, "dspex_worker_recycles_total", pool="p", why="recycled") == 1
    seen = {dict(k[1])["why"] for k in samples if k[0] in ("dspex_worker_crashes_total", "dspex_worker_recycles_total")}
    assert seen == crash_whys | recycle_whys, seen
    # the status keeps its totals and says the same per why
    pool = dx.status()["pools"]["p"]
    assert pool["crashes"] == 2 and pool["crashes_by"] == {"connection_lost": 1, "silent": 1}, pool
    assert pool["recycles"] == 1 and pool["recycles_by"] == {"recycled": 1}, pool


def test_why_labels_are_the_bounded_set_for_every_way_a_worker_leaves() -> None:
    from broker.roster import CRASH_WHYS, DRAIN_DEADLINE, HARD_LIMIT, LOST, RECYCLE_WHYS, RECYCLED, why_label
    from dspex.stack.health import SILENT

    assert why_label(LOST, crashed=True) == "connection_lost"
    assert why_label(SILENT, crashed=True) == "silent"
    assert why_label(RECYCLED, crashed=False) == "recycled"
    assert why_label(HARD_LIMIT, crashed=False) == "hard_limit"
    assert why_label(DRAIN_DEADLINE, crashed=False) == "drain_deadline"
    assert why_label("anything a future change says", crashed=True) in CRASH_WHYS
    assert why_label("was recycled (by a new rule)", crashed=False) in RECYCLE_WHYS


@pytest.mark.timeout(90)
def test_the_cli_dashboard_and_metrics_count_the_same_sessions(stack: Stack) -> None:
    """One definition of a live session: with a live session, a closing one (closed while its call
    runs) and one whose worker went silent (kept, uncounted, for a partitioned host's return),
    ``sessions list``, the dashboard's table and counts, the status and /metrics all name the live
    one alone."""
    port, dx = start(stack, "p:strict_queue", 3)
    lost = dx.session("p")
    silent_pid = lost.call("os", "getpid")
    os.kill(silent_pid, signal.SIGSTOP)  # alive, silent: dropped at heartbeat expiry, its session kept
    wait_for(lambda: len(stack.workers("p")) == 2, 20, 0.05, "the silent worker dropped")
    live = dx.session("p")
    live.call("os", "getpid")
    closing = dx.session("p")
    ended: list[BaseException] = []

    def run_long_call() -> None:
        try:
            closing.call("time", "sleep", [60])
        except dspex.DspexError as err:
            ended.append(err)

    running = threading.Thread(target=run_long_call, daemon=True)
    running.start()
    wait_for(lambda: sum(w["inflight"] for w in stack.workers("p")) == 1, 20, 0.05, "the closing session's call running")
    assert dx.close_session(closing.id)["closed"]  # its call is cancelled: closing until its worker answers

    cli = subprocess.run([sys.executable, "-m", "dspexctl", "--endpoint", stack.frontend, "sessions", "list", "--json"],
                         cwd=stack.root, env=stack.env, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    listed = [s["id"] for s in json.loads(cli.stdout)["sessions"]]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=10) as resp:
        board = json.loads(resp.read())
    status = dx.status()
    assert listed == [live.id]
    assert [s["id"] for s in board["sessions"]] == [live.id], board["sessions"]
    assert board["broker"]["sessions"] == board["pools"]["p"]["sessions"] == 1
    assert status["broker"]["sessions"] == status["pools"]["p"]["sessions"] == 1
    assert value(scrape(port)[0], "dspex_sessions", pool="p") == 1
    running.join(10)
    assert isinstance(ended[0], dspex.Cancelled) and not running.is_alive()


def test_a_call_answered_session_not_durable_is_no_ok(stack: Stack) -> None:
    """A durable call whose checkpoint the store refuses ran, but its caller gets
    ``session_not_durable`` and no result: counted under that outcome, an error in the pool's
    OK/ERR (dashboard, pools status), never ``ok``; one whose checkpoint is kept is ``ok``."""
    port = free_port()
    stack.start_broker("p:strict_queue:durable=true", extra=["--metrics-port", str(port), "--checkpoint-cap", "0.1"])
    stack.start_worker("p", "--no-dspy")
    stack.wait_workers("p", 1)
    dx = stack.client()
    s = dx.session("p")
    s.exec("small = 1")
    with pytest.raises(dspex.SessionNotDurable):
        s.exec("big = bytes(150_000)")  # over the session's cap: the call ran, its checkpoint is refused
    samples, _ = scrape(port)
    assert value(samples, "dspex_requests_total", pool="p", op="exec", outcome="ok") == 1
    assert value(samples, "dspex_requests_total", pool="p", op="exec", outcome="session_not_durable") == 1
    pool = dx.status()["pools"]["p"]
    assert (pool["requests_ok"], pool["requests_error"]) == (1, 1), pool
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=10) as resp:
        page = json.loads(resp.read())["pools"]["p"]
    assert (page["requests_ok"], page["requests_error"]) == (1, 1), page


def test_a_reply_to_a_client_that_left_is_counted_quietly_and_the_broker_serves_on(stack: Stack) -> None:
    """A client gone mid-call (a killed process): its call is cancelled and the worker's answer
    finds nobody on the frontend (EHOSTUNREACH). Counted in status and /metrics, not logged as
    trouble."""
    port, dx = start(stack, "p:strict_queue", 1)
    assert dx.status()["broker"]["replies_to_gone_clients"] == 0
    leaving = zmq.Context.instance().socket(zmq.DEALER)
    leaving.setsockopt(zmq.LINGER, 0)
    leaving.connect(stack.frontend)
    try:
        leaving.send_multipart([RequestHeader(Op.CALL.value, 1, "p", "").pack(),
                                *encode_request(Op.CALL.value, ["time", "sleep", [30.0], {}], 2**20)[0]])
        wait_for(lambda: stack.workers("p")[0]["state"] == "busy", what="the leaving client's call runs")
    finally:
        leaving.close()
    wait_for(lambda: dx.status()["broker"]["replies_to_gone_clients"] == 1, what="the reply to nobody counted")
    samples = scrape(port)[0]
    assert value(samples, "dspex_replies_dropped_total", reason="gone_client") == 1
    assert value(samples, "dspex_replies_dropped_total", reason="slow_client") == 0
    assert dx.call("os", "getpid", pool="p")  # the worker's slot is free again: the broker serves on
    assert dx.status()["pools"]["p"]["outcomes"].get("call:cancelled") == 1
    log = Path(stack.root, "broker.log").read_text()
    assert not [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line], log
