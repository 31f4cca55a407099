"""The broker's live dashboard, in a real headless Chromium driven by selenium.

A small stack (the shipped broker, triage_pool with 2 workers, analytics_pool with 1) under a real
supervisord; the page is loaded once and must follow, without a reload: the stack's identity in the
header, sparklines drawn from the broker's history, sessions, a recycle (events newest first), a
stopped pool (DOWN, its workers in supervisord's STOPPED state, as `dspexctl pools status` says),
at 1280 px without clipping and in the narrow layout. DSPEX_DASHBOARD_SCREENSHOT=docs/dashboard.png
runs the shipped supervisor.conf's whole stack under load and writes the screenshot in the docs.

Skipped, with the reason printed, when chromium/chromedriver or selenium are missing (Debian:
apt-get install chromium chromium-driver; CI installs them: see .ci/run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import dspex
from broker.dashboard import view
from broker.publisher import HISTORY_EVERY_S, HISTORY_S, History, quantile
from broker.stats import LATENCY_BUCKETS, Histogram
from dspexctl.keys import generate
from tests.harness import PY, REPO, base_env, free_port, wait_for
from tests.harness.supervisord import SupervisedStack
from tests.test_cli import dspexctl
from tests.test_ops_python import small_conf_text

POOLS = {"triage_pool": 2, "analytics_pool": 1}
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,900"]


# -- pure logic ----------------------------------------------------------------------------------
def _snap(workers: dict[str, list[tuple[str, int]]], events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"broker": {"pid": 1, "uptime_s": 100.0}, "events": events or [], "sessions": [], "pools": {
        name: {"size": 2, "queued": 0, "queue_max": 10, "requests_ok": 0, "requests_error": 0, "recycles": 0,
               "crashes": 0, "latency_p50_ms": 0.0, "latency_p99_ms": 0.0, "health_window": 300, "recent": {},
               "workers": [{"incarnation": inc, "id": inc[:8], "pid": pid, "state": "ready"} for inc, pid in ws]}
        for name, ws in workers.items()}}


def _proc(group: str, i: int, state: str, pid: int = 0) -> dict[str, Any]:
    return {"group": group, "name": f"{group}_{i:02d}", "statename": state, "pid": pid, "start": 0, "now": 1000}


def test_view_events_newest_first_and_the_brokers_view_alone() -> None:
    events = [{"time": t, "event": e, "pool": "p"} for t, e in ((1.0, "start"), (2.0, "recycle"), (3.0, "start"))]
    v = view(_snap({"p": [("a" * 32, 10)]}, events), [])
    assert [e["time"] for e in v["events"]] == [3.0, 2.0, 1.0]
    pool = v["pools"]["p"]
    assert pool["state"] == "degraded" and pool["up"] == 1 and pool["expected"] == 2
    assert pool["latency_p50_ms"] is None and pool["workers"][0]["process"] is None


def test_view_joins_supervisords_processes_like_pools_status() -> None:
    """A stopped pool is DOWN (not "starting"), its processes listed in supervisord's state."""
    procs = [_proc("p", 0, "RUNNING", 10), _proc("p", 1, "STARTING"), _proc("q", 0, "STOPPED"),
             _proc("q", 1, "STOPPED")]
    v = view(_snap({"p": [("a" * 32, 10)], "q": []}), procs)
    p, q = v["pools"]["p"], v["pools"]["q"]
    assert p["state"] == "starting" and p["workers"][0]["process"] == "p:p_00"
    assert [(w["state"], w["phase"]) for w in p["workers"][1:]] == [("starting", "starting")]
    assert q["state"] == "down" and q["reasons"] == ["q has no ready worker (0/2)"]
    assert [w["state"] for w in q["workers"]] == ["stopped", "stopped"]


def test_view_a_worker_still_importing_dspy_is_not_counted_ready() -> None:
    """Registered, its dspy import still running: the pool is STARTING and its Ready count leaves it
    out, as `dspexctl pools status` does (whether it can do its job is not known yet)."""
    snap = _snap({"p": [("a" * 32, 10), ("b" * 32, 11)]})
    snap["pools"]["p"]["workers"][1]["preparing"] = True
    pool = view(snap, [_proc("p", 0, "RUNNING", 10), _proc("p", 1, "RUNNING", 11)])["pools"]["p"]
    assert (pool["state"], pool["up"], pool["expected"]) == ("starting", 1, 2), pool
    assert pool["reasons"] == ["p: 1 worker(s) starting"]


def test_history_percentiles_come_from_the_intervals_histogram() -> None:
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    assert quantile(LATENCY_BUCKETS, counts, 0.5) is None
    counts[LATENCY_BUCKETS.index(0.01)] = 99  # 99 calls in (5 ms, 10 ms]
    counts[LATENCY_BUCKETS.index(1.0)] = 1  # one in (0.5 s, 1 s]
    assert 0.005 < (quantile(LATENCY_BUCKETS, counts, 0.5) or 0) <= 0.01
    assert 0.005 < (quantile(LATENCY_BUCKETS, counts, 0.99) or 0) <= 0.01
    assert 0.5 < (quantile(LATENCY_BUCKETS, counts, 1.0) or 0) <= 1.0


def test_history_keeps_the_last_hour_of_calls_errors_and_restarts_per_pool_bounded() -> None:
    pool = SimpleNamespace(outcomes={}, latency=Histogram(), queued=0, crashes=0, recycles=0)
    history = History(SimpleNamespace(pools={"p": pool}))  # type: ignore[arg-type]
    assert HISTORY_S >= 3600 and history.points["p"].maxlen == int(HISTORY_S / HISTORY_EVERY_S)
    now = history.due
    for i in range(history.points["p"].maxlen + 50):  # longer than the span: the oldest points go
        pool.outcomes = {("call", "ok"): 10 * (i + 1), ("call", "error"): i + 1}
        pool.crashes, pool.recycles = i // 100, i // 50
        history.tick(now)
        now += HISTORY_EVERY_S
    points = history.copy("p")
    assert len(points) == history.points["p"].maxlen
    _t, calls_s, _p50, _p99, queued, errors, _crashes, _recycles = points[-1]
    assert calls_s == pytest.approx(11 / HISTORY_EVERY_S) and errors == 1 and queued == 0
    # per interval: a crash every 100 ticks, a recycle every 50, never a running total
    assert {p[6] for p in points} == {0, 1} and {p[7] for p in points} == {0, 1}
    assert sum(p[7] for p in points) in (len(points) // 50, len(points) // 50 + 1)


# -- in a browser --------------------------------------------------------------------------------
def browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        reason = "no chromium/chromedriver on PATH (apt-get install chromium chromium-driver)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return chromium, driver


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium, driver_path = browser_paths()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        print("SKIP: selenium is not installed (pip install -e '.[test]')")
        pytest.skip("selenium is not installed")
    profile = tempfile.mkdtemp(prefix="dxc", dir="/tmp")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in [*CHROME_ARGS, f"--user-data-dir={profile}"]:
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def small() -> Iterator[SupervisedStack]:
    stack = SupervisedStack(small_conf_text(POOLS))
    try:
        stack.start_foreground()

        def ready() -> bool:
            stack.processes()
            st = stack.status()
            # a worker still importing dspy is "preparing": its pool reads STARTING, not OK, until it is over
            return all(len([w for w in st["pools"][p]["workers"] if w["state"] == "ready" and not w["preparing"]]) == n
                       for p, n in POOLS.items())

        wait_for(ready, 120, 0.1, "the stack ready")
        yield stack
    finally:
        stack.stop()
        stack.cleanup()


def rows(driver: Any, table: str) -> list[dict[str, str]]:
    """Each row of a dashboard table as its data-* attributes plus its cells' text by class."""
    return driver.execute_script("""
        const trs = [...document.querySelectorAll(`#${arguments[0]} tbody tr`)];
        return trs.filter(tr => Object.keys(tr.dataset).length).map(tr => {
            const out = Object.assign({}, tr.dataset);
            for (const td of tr.children) for (const c of td.classList) out["td_" + c] = td.textContent;
            return out;
        });""", table)


def fits(driver: Any) -> list[str]:
    """What is wider than the window or clipped in its section (nothing, when the layout fits)."""
    return list(driver.execute_script("""
        const out = [];
        const doc = document.documentElement;
        if (doc.scrollWidth > window.innerWidth) out.push(`page ${doc.scrollWidth} > ${window.innerWidth}`);
        for (const sec of document.querySelectorAll("section"))
            if (sec.scrollWidth > sec.clientWidth + 1) out.push(`${sec.querySelector("h2").textContent}: `
                + `${sec.scrollWidth} > ${sec.clientWidth}`);
        return out;"""))


def sparkline_points(driver: Any) -> dict[str, dict[str, int]]:
    """pool -> sparkline -> points drawn (polyline vertices)."""
    return dict(driver.execute_script("""
        const out = {};
        for (const tr of document.querySelectorAll("#history tbody tr[data-pool]")) {
            out[tr.dataset.pool] = {};
            for (const td of tr.querySelectorAll("td")) {
                const svg = td.querySelector("svg");
                if (svg) out[tr.dataset.pool][td.className] = Number(svg.dataset.points)
                    * (svg.querySelectorAll("polyline").length ? 1 : 0);
            }
        }
        return out;"""))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dashboard_in_a_real_browser(small: SupervisedStack, browser: Any) -> None:
    stop = threading.Event()

    def traffic() -> None:  # a call every 0.2 s, so each history interval has latencies
        with small.client() as c:
            while not stop.wait(0.2):
                c.call("operator", "add", [1, 1], pool="triage_pool")

    background = threading.Thread(target=traffic, daemon=True)
    background.start()
    try:
        check_the_page(small, browser, stop)
    finally:
        stop.set()
        background.join(30)


def check_the_page(small: SupervisedStack, browser: Any, stop: threading.Event) -> None:
    port = small.metrics_port
    url = f"http://127.0.0.1:{port}/"
    with small.client() as dx:
        for i in range(20):
            assert dx.call("operator", "add", [i, 1], pool="triage_pool") == i + 1
        s = dx.session("analytics_pool")
        s.call("os", "getpid")
        durable = dx.session("analytics_pool", durable=True)
        durable.exec("kept = list(range(1000))")  # a change: its checkpoint is stored

        browser.get(url)
        assert browser.execute_script("return window.innerWidth") >= 1270
        status = small.status()
        want_pids = {str(w["pid"]) for p in status["pools"].values() for w in p["workers"]}

        def pools_rendered() -> list[dict[str, str]] | None:
            got = rows(browser, "pools")
            return got if {r["pool"] for r in got} == set(POOLS) else None

        pools = {r["pool"]: r for r in wait_for(pools_rendered, 30, 0.2, "the pools table")}
        assert {p: r["state"] for p, r in pools.items()} == {"triage_pool": "ok", "analytics_pool": "ok"}
        assert pools["triage_pool"]["td_ready"] == "2 / 2" and pools["analytics_pool"]["td_ready"] == "1 / 1"
        assert pools["triage_pool"]["td_p50"].endswith(("ms", "s")) and pools["triage_pool"]["td_p50"] != "-"
        workers = wait_for(lambda: (w := rows(browser, "workers")) and {r["pid"] for r in w} == want_pids and w,
                           30, 0.2, "the worker pids")
        assert {r["td_process"] for r in workers} == {"triage_pool:triage_pool_00", "triage_pool:triage_pool_01",
                                                      "analytics_pool:analytics_pool_00"}
        # each worker's host, as `pools status -v` names it (a worker host's workers: another name)
        assert {r["td_host"] for r in workers} == {socket.gethostname()}, workers
        # the background traffic makes a triage worker busy now and then: the page follows it back to ready
        wait_for(lambda: {(r["state"], r["colour"]) for r in rows(browser, "workers")} == {("ready", "ok")},
                 10, 0.1, "every worker ready (green) on the page")
        # the header and the title say which stack this is
        header = browser.find_element("id", "stack").text
        assert str(small.conf) in header and small.run_dir in header
        assert str(small.conf) in browser.title
        assert browser.find_element("id", "broker").text.startswith(f"broker pid {status['broker']['pid']}")
        # the session, in the sessions panel with its pool and worker
        sessions = wait_for(lambda: len(got := rows(browser, "sessions")) == 2 and got, 10, 0.2,
                            "the sessions panel")
        by_id = {r["session"]: r for r in sessions}
        assert {sid: (r["pool"], r["td_worker"][:8], r["durable"]) for sid, r in by_id.items()} == {
            s.id: ("analytics_pool", s.worker[:8], "0"), durable.id: ("analytics_pool", durable.worker[:8], "1")}
        # which session is durable, with its checkpoint's size (as the broker reports it) and age
        (listed,) = [r for r in dx.sessions("analytics_pool") if r["id"] == durable.id]
        kb = f"{listed['checkpoint_bytes'] / 1024:.1f} KB"
        assert listed["checkpoint_bytes"] > 1024 and by_id[durable.id]["td_checkpoint"].startswith(f"{kb}, 0:00:")
        assert by_id[durable.id]["td_checkpoint"].endswith(" ago") and by_id[s.id]["td_checkpoint"] == "-"
        # sparklines: drawn from the broker's history (a point every 10 s), without a reload
        browser.execute_script("window.__same_page = 42")
        drawn = wait_for(lambda: (got := sparkline_points(browser)) and min(got["triage_pool"].values()) >= 2
                         and got, 30, 0.5, "triage_pool's sparklines drawn")
        assert set(drawn) == set(POOLS)
        assert set(drawn["triage_pool"]) == {"calls", "latency", "queue", "errors", "restarts"}
        assert browser.find_element("id", "history-title").get_attribute("textContent") == "Last hour"
        assert drawn["analytics_pool"]["calls"] >= 2 and drawn["analytics_pool"]["queue"] >= 2
        stop.set()  # a quiet pool's intervals have no latency: a gap, never a made-up zero
        assert fits(browser) == [], "at 1280 px nothing is clipped"

    # a recycle: the new incarnation and the events, newest first, on the same page
    old = next(r for r in workers if r["pool"] == "triage_pool")
    res = dspexctl(small, "workers", "recycle", "triage_pool", "--worker", old["incarnation"][:8], "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    new = json.loads(res.stdout)["recycled"][0]

    def replaced() -> bool:
        small.processes()  # keeps supervisord prompt
        incs = {r["incarnation"] for r in rows(browser, "workers")}
        return new["new"] in incs and old["incarnation"] not in incs

    wait_for(replaced, 30, 0.2, "the new incarnation on the page")
    events = wait_for(lambda: (e := rows(browser, "events")) and e[0]["kind"] == "start"
                      and e[0]["incarnation"] == new["new"] and e, 15, 0.2, "the new start on top of the events")
    assert events[1]["kind"] == "recycle" and events[1]["incarnation"] == old["incarnation"], events[:2]
    times = [float(r["time"]) for r in events]
    assert times == sorted(times, reverse=True), "newest first"
    assert {r["kind"] for r in events[2:]} == {"start"}, "the stack's first starts are below the recycle"
    # the hour's history counts the recycle in its restarts column
    wait_for(lambda: {r["pool"]: r for r in rows(browser, "history")}["triage_pool"]["td_restarts"]
             == "0 crashed, 1 recycled", 30, 0.2, "the recycle in the history")

    # a stopped pool: DOWN, its worker listed in supervisord's state, as pools status says
    res = dspexctl(small, "pools", "stop", "analytics_pool")
    assert res.returncode == 0, res.stdout + res.stderr
    wait_for(lambda: {r["pool"]: r for r in rows(browser, "pools")}["analytics_pool"]["state"] == "down",
             20, 0.2, "analytics_pool DOWN on the page")
    stopped = wait_for(lambda: (got := [(r["td_process"], r["state"], r["colour"]) for r in rows(browser, "workers")
                                        if r["pool"] == "analytics_pool"]) and got[0][1] == "stopped" and got,
                       10, 0.2, "the stopped worker in supervisord's state")
    assert stopped == [("analytics_pool:analytics_pool_00", "stopped", "down")]
    assert {r["td_host"] for r in rows(browser, "workers") if r["pool"] == "analytics_pool"} == {socket.gethostname()}, \
        "a process of this supervisord runs on this host"
    assert "analytics_pool has no ready worker (0/1)" in browser.find_element("id", "reasons").text
    res = dspexctl(small, "pools", "status")
    assert res.returncode == 5 and "DOWN: analytics_pool has no ready worker (0/1)" in res.stdout, res.stdout
    assert browser.execute_script("return window.__same_page") == 42, "the page was never reloaded"
    assert fits(browser) == []

    # the narrow layout: rows become cards, nothing wider than a phone's screen
    browser.set_window_size(420, 900)
    wait_for(lambda: browser.execute_script("return window.innerWidth") <= 430, 10, 0.1, "the narrow window")
    assert browser.execute_script(
        "return getComputedStyle(document.querySelector('#workers thead')).display") == "none"
    assert fits(browser) == [], "the narrow layout fits"
    shot = Path(small.root) / "dashboard-narrow.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 5_000


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(not os.environ.get("DSPEX_DASHBOARD_SCREENSHOT"), reason="set DSPEX_DASHBOARD_SCREENSHOT=PATH")
def test_screenshot_of_the_shipped_stack(browser: Any) -> None:
    """docs/dashboard.png: the shipped supervisor.conf (6 workers) with sessions and calls running,
    after a recycle, at 1280 px."""
    stack = SupervisedStack()
    try:
        stack.start_foreground()
        stack.wait_all_ready()
        stop = threading.Event()

        def load(pool: str) -> None:
            with stack.client() as dx:
                sessions = [dx.session(pool) for _ in range(3)]
                while not stop.is_set():
                    for sess in sessions:
                        try:
                            sess.call("time", "sleep", [0.01])
                        except Exception:  # noqa: BLE001 - a recycle's session_worker_unavailable
                            sessions[sessions.index(sess)] = dx.session(pool)

        threads = [threading.Thread(target=load, args=(p,), daemon=True) for p in ("triage_pool", "analytics_pool")]
        for th in threads:
            th.start()
        try:
            browser.get(f"http://127.0.0.1:{stack.metrics_port}/")
            res = dspexctl(stack, "workers", "recycle", "triage_pool")
            assert res.returncode == 0, res.stderr
            wait_for(lambda: min(int(r["points"]) for r in rows(browser, "history")) >= 12, 120, 1.0,
                     "a minute of history")
            assert fits(browser) == []
            height = browser.execute_script("return document.documentElement.scrollHeight")
            browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",  # the whole page, not the window
                                    {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False})
            shot = Path(os.environ["DSPEX_DASHBOARD_SCREENSHOT"])
            shot = shot if shot.is_absolute() else REPO / shot
            assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 20_000
            print(f"dashboard screenshot: {shot}")
        finally:
            stop.set()
            for th in threads:
                th.join(30)
    finally:
        stack.stop()
        stack.cleanup()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_status_json_and_metrics_share_the_port(stack: Any) -> None:
    """The page's JSON and /metrics on one port; a broker without supervisord has no process names."""
    port = free_port()
    stack.start_broker("p:strict_queue", extra=["--metrics-port", str(port)])
    stack.start_worker("p")
    stack.wait_workers("p", 1)

    def get(path: str) -> tuple[str, bytes]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.headers["Content-Type"], resp.read()

    ctype, body = wait_for(lambda: get("/api/status"), 10, 0.1, "the dashboard JSON")
    assert ctype == "application/json"
    doc = json.loads(body)
    [worker] = doc["pools"]["p"]["workers"]
    assert worker["process"] is None and doc["pools"]["p"]["state"] in ("ok", "degraded", "starting")
    ctype, body = get("/")
    assert ctype.startswith("text/html") and b"/api/status" in body
    ctype, body = get("/metrics")
    assert b"dspex_queue_depth" in body
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/api/status", data=b"x"), timeout=10)
    assert info.value.code == 405
    info.value.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_page_says_what_pools_status_says_of_the_stack(stack: Any, browser: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """What `dspexctl pools status` names beside its pools' workers, the page names too, in the same
    words (one computation: dspex.stack.poolstatus): a pool the conf declares that the broker does
    not serve (DOWN, with the conf and the restart command), the checkpoint store near its total
    cap (WARN, with its figures) and a worker key the broker refused (WARN: the address, the key,
    the fix). The page showed none of them."""
    conf = Path(stack.root, "supervisor.conf")
    sock = Path(stack.root, "s.sock")  # the supervisord of this conf is not running: pools status says so too
    conf.write_text(f"[unix_http_server]\nfile = {sock}\n[supervisorctl]\nserverurl = unix://{sock}\n"
                    "[dspex:pool:p]\naffinity = strict_queue\ndurable = true\n")
    written = generate(Path(stack.root, "k"))
    server_key = str(Path(stack.root, "k", "broker.key"))
    stack.frontend, stack.backend = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    port = free_port()
    stack.env.update(DSPEX_CURVE_SERVER_KEY=server_key, DSPEX_CURVE_WORKER_KEY=str(written["worker"]))
    stack.broker_args = ["--config", str(conf), "--curve-secret-key", str(written["broker"]), "--curve-allowed",
                         str(written["allowed"]), "--metrics-port", str(port), "--checkpoint-total-cap", "0.2"]
    stack.start_broker()
    stack.start_worker("p", "--no-dspy")
    # a worker host holding a client key: the broker refuses it
    stack.start_worker("p", "--no-dspy", env={**stack.env, "DSPEX_CURVE_WORKER_KEY": str(written["client"])})
    monkeypatch.setenv("DSPEX_CURVE_SERVER_KEY", server_key)
    monkeypatch.setenv("DSPEX_CURVE_CLIENT_KEY", str(written["client"]))
    with dspex.connect(stack.frontend, timeout=20) as dx:
        wait_for(lambda: len(dx.status()["pools"]["p"]["workers"]) == 1, what="the worker with its key")
        for _ in range(2):  # 176 KB of the store's 204.8 KB
            dx.session("p").put(os.urandom(90_000))
    conf.write_text(conf.read_text() + "[dspex:pool:extra]\naffinity = hint\n")  # a pool added, no broker restart

    env = {**base_env(), "DSPEX_ENDPOINT": stack.frontend, "DSPEX_CURVE_SERVER_KEY": server_key,
           "DSPEX_CURVE_CLIENT_KEY": str(written["client"])}

    def cli() -> str:
        out = subprocess.run([PY, "-m", "dspexctl", "pools", "status"], cwd=stack.root, env=env, capture_output=True,
                             text=True, timeout=60, check=False)
        assert out.stdout and "Traceback" not in out.stderr, out.stderr
        return out.stdout

    def stable(text: str) -> str:  # the count of refusals and the time since the last go on changing
        return re.sub(r"refused \d+ (.*) the last \w+ ago", r"refused N \1 the last T ago", text)

    browser.get(f"http://127.0.0.1:{port}/")

    def shown() -> tuple[list[str], str, str] | None:
        issues = [f"{li.get_attribute('data-state')}: {li.text}"
                  for li in browser.find_elements("css selector", "#issues li")]
        states = {r["pool"]: r["state"] for r in rows(browser, "pools")}
        reasons = browser.find_element("id", "reasons").text
        return (issues, states.get("extra", ""), reasons) if len(issues) == 2 and "extra" in states else None

    issues, extra_state, reasons = wait_for(shown, 30, 0.2, "the stack's issues and the added pool on the page")
    text = cli()
    refused, filling = sorted(issues, key=lambda i: "checkpoint store" in i)
    assert refused.startswith("warn: WARN: the broker refused") and "worker connection(s) from 127.0.0.1" in refused
    assert "dspexctl keys generate" in refused and str(Path(written["allowed"], "workers")) in refused, refused
    assert filling.startswith("warn: WARN: the checkpoint store holds 17"), filling
    for line in (refused, filling):  # as pools status prints it
        assert stable(line.removeprefix("warn: ")) in stable(text), (line, text)
    added = (f"extra is in {conf} but the broker does not serve it: it read its pools when it started, so it turns "
             f"the pool's workers away; restart the broker (supervisorctl -c {conf} restart broker)")
    assert extra_state == "down" and added in reasons, reasons
    assert f"DOWN: {added}" in text, text
    assert {r["pool"]: r["td_sessions"] for r in rows(browser, "pools")}["extra"] == "-", "not served: no counts"
    assert fits(browser) == []
