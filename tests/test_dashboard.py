"""The broker's live dashboard, in a real headless Chromium driven by selenium.

A small stack (the shipped broker, triage_pool with 2 workers, analytics_pool with 1) under a real
supervisord; the page is loaded once, a worker is recycled with ``dspexctl``, and the page must show
the new incarnation without a reload. Set DSPEX_DASHBOARD_SCREENSHOT=docs/dashboard.png to refresh
the screenshot in the docs (by default it goes to the test's temp dir).

Skipped, with the reason printed, when chromium/chromedriver or selenium are missing (CI installs
them: see .ci/run).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from broker.dashboard import EventTracker, view
from tests.harness import REPO, free_port, wait_for
from tests.test_cli import dspexctl
from tests.test_ops_python import small_conf_text
from tests.harness.supervisord import SupervisedStack

POOLS = {"triage_pool": 2, "analytics_pool": 1}
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1500,1000"]


# -- pure logic ----------------------------------------------------------------------------------
def _status(workers: dict[str, list[tuple[str, int]]], recycles: int = 0, crashes: int = 0) -> dict[str, Any]:
    return {"broker": {"pid": 1, "uptime_s": 100.0}, "pools": {
        name: {"size": 2, "queued": 0, "queue_max": 10, "requests_ok": 0, "requests_error": 0, "recycles": recycles,
               "crashes": crashes, "latency_p50_ms": 0.0, "latency_p99_ms": 0.0,
               "workers": [{"incarnation": inc, "id": inc[:8], "pid": pid, "state": "ready"} for inc, pid in ws]}
        for name, ws in workers.items()}}


def test_event_tracker_names_recycles_crashes_and_starts() -> None:
    t = EventTracker()
    t.observe(_status({"p": [("a" * 32, 10), ("b" * 32, 11)]}), now=1.0)
    assert t.recent() == []  # the first snapshot is the baseline, not a burst of starts
    t.observe(_status({"p": [("b" * 32, 11), ("c" * 32, 12)]}, recycles=1), now=2.0)
    t.observe(_status({"p": [("c" * 32, 12)]}, recycles=1, crashes=1), now=3.0)
    kinds = [(e["kind"], e["pid"]) for e in t.recent()]
    assert kinds == [("crash", 11), ("start", 12), ("recycle", 10)]


def test_view_states_no_data_and_broker_events() -> None:
    st = _status({"p": [("a" * 32, 10)]})
    v = view(st, {10: "p:p_00"}, [])
    pool = v["pools"]["p"]
    assert pool["state"] == "degraded" and pool["up"] == 1 and pool["expected"] == 2
    assert pool["latency_p50_ms"] is None and pool["workers"][0]["process"] == "p:p_00"
    assert v["events_source"] == "dashboard"
    st["events"] = [{"time": 5.0, "kind": "recycle", "pool": "p"}]
    assert view(st, {}, [{"kind": "start"}])["events"] == st["events"]


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
            return all(len([w for w in st["pools"][p]["workers"] if w["state"] == "ready"]) == n
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


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_dashboard_in_a_real_browser(small: SupervisedStack, browser: Any) -> None:
    port = small.metrics_port
    url = f"http://127.0.0.1:{port}/"
    with small.client() as dx:
        for i in range(5):
            assert dx.call("operator", "add", [i, 1], pool="triage_pool") == i + 1
        s = dx.session("analytics_pool")
        s.call("os", "getpid")

    browser.get(url)
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
    assert {r["td_pid"] for r in workers} == want_pids
    assert {r["td_process"] for r in workers} == {"triage_pool:triage_pool_00", "triage_pool:triage_pool_01",
                                                  "analytics_pool:analytics_pool_00"}
    assert browser.find_element("id", "broker").text.startswith(f"broker pid {status['broker']['pid']}")

    # nothing is fetched from anywhere but the broker: the page works offline
    origins = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
    assert set(origins) <= {f"http://127.0.0.1:{port}"}, origins
    assert "http://" not in browser.page_source.replace(url, "") and "https://" not in browser.page_source

    browser.execute_script("window.__same_page = 42")
    old = next(r for r in workers if r["pool"] == "triage_pool")
    res = dspexctl(small, "workers", "recycle", "triage_pool", "--worker", old["incarnation"][:8], "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    new = json.loads(res.stdout)["recycled"][0]

    def replaced() -> bool:
        small.processes()  # keeps supervisord prompt
        incs = {r["incarnation"] for r in rows(browser, "workers")}
        return new["new"] in incs and old["incarnation"] not in incs

    wait_for(replaced, 30, 0.2, "the new incarnation on the page")
    assert browser.execute_script("return window.__same_page") == 42, "the page was reloaded"
    events = wait_for(lambda: (e := rows(browser, "events")) and {r["kind"] for r in e} >= {"recycle", "start"} and e,
                      15, 0.2, "the recycle in the events table")
    assert {(r["kind"], r["td_pool"], r["td_worker"], r["td_pid"]) for r in events} >= {
        ("recycle", "triage_pool", old["incarnation"], old["pid"]),
        ("start", "triage_pool", new["new"], str(new["new_pid"]))}
    recycled = next(r for r in rows(browser, "workers") if r["incarnation"] == new["new"])
    assert recycled["td_pid"] == str(new["new_pid"])

    shot = Path(os.environ.get("DSPEX_DASHBOARD_SCREENSHOT") or Path(small.root) / "dashboard.png")
    if not shot.is_absolute():
        shot = REPO / shot
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"dashboard screenshot: {shot}")


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
