"""A pool whose workers are all busy while requests wait says so before they time out, and is OK
again once the queue moves: the CLI as a subprocess and the dashboard's JSON against a real
supervisord stack (the shipped broker and triage_pool sections, one worker, a 16 s queue timeout).

A call holds the only worker until the test lets it go; a second call waits behind it. Once it has
waited half its queue timeout, ``pools status`` is WARN (exit 6) with a line that says how long the
oldest request has waited of its timeout and that every worker is busy; the dashboard says the
same. The first call is let go then, the second runs (it never timed out), and the pool is OK
(exit 0) with no failure counted.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import wait_for
from tests.harness.supervisord import SupervisedStack, cli_status, dashboard_status, small_stack

pytestmark = [pytest.mark.slow]

QUEUE_TIMEOUT = 16


@pytest.fixture(scope="module")
def stack() -> Iterator[SupervisedStack]:
    with small_stack({"triage_pool": 1}, triage_pool={"queue_timeout": str(QUEUE_TIMEOUT)}) as s:
        yield s


def status(stack: SupervisedStack) -> tuple[int, dict[str, Any], str]:
    return cli_status(stack, same_exit=False)


def dashboard(stack: SupervisedStack) -> dict[str, Any]:
    return dict(dashboard_status(stack)["pools"]["triage_pool"])


@pytest.mark.timeout(120)
def test_requests_waiting_long_behind_busy_workers_warn_before_they_time_out(stack: SupervisedStack) -> None:
    results: list[Any] = []
    # the WARN lasts from half the waiting call's queue timeout until the worker is let go (8 s
    # here): two dspexctl runs and the dashboard fit in it on a loaded host, where they did not in
    # the 3 s a fixed 7 s call left of an 8 s queue timeout
    release = Path(stack.root, "release")

    def hold_the_worker() -> None:
        with stack.client() as dx, dx.session("triage_pool") as s:
            s.exec("import os, time\nwhile not os.path.exists(release):\n    time.sleep(0.02)\n", {"release": str(release)},
                   timeout=60)
            results.append("let go")

    def call() -> None:
        with stack.client() as dx:
            results.append(dx.call("time", "sleep", [0.0], pool="triage_pool", timeout=60))

    blocker = threading.Thread(target=hold_the_worker)
    blocker.start()
    waiter = threading.Thread(target=call)
    try:
        wait_for(lambda: stack.status()["pools"]["triage_pool"]["workers"][0]["state"] == "busy", 10, 0.05,
                 "the worker busy")
        queued_at = time.monotonic()
        waiter.start()
        rc, doc, text = wait_for(lambda: (got := status(stack))[0] == 6 and got[1]["health"] == "warn" and got,
                                 QUEUE_TIMEOUT, 0.3, "WARN while it waits")
        assert time.monotonic() - queued_at >= QUEUE_TIMEOUT / 2 - 0.5, "not before half the queue timeout"
        line = next(ln for ln in text.splitlines() if ln.startswith("WARN: triage_pool"))
        assert "the oldest of 1 queued request(s) has waited" in line and f"of its {QUEUE_TIMEOUT}s queue timeout" in line
        assert "all 1 worker(s) busy" in line, line
        assert doc["pools"][0]["oldest_wait_s"] >= QUEUE_TIMEOUT / 2
        pool = dashboard(stack)
        assert pool["state"] == "warn" and any("has waited" in r for r in pool["reasons"]), pool["reasons"]
    finally:
        release.touch()
        blocker.join(30)
        if waiter.ident is not None:
            waiter.join(30)
    assert sorted(results, key=str) == [None, "let go"], "both ran: the waiting one never timed out"
    rc, doc, text = status(stack)
    assert rc == 0 and "WARN" not in text, text
    assert doc["pools"][0]["failures"]["service"] == {} and doc["pools"][0]["oldest_wait_s"] is None
    assert dashboard(stack)["state"] == "ok"


@pytest.mark.timeout(120)
def test_a_recycle_waiting_for_a_busy_worker_says_what_it_waits_for(stack: SupervisedStack) -> None:
    """``workers recycle`` of a worker running a call: the progress line says the worker finishes
    its running call first, not only "0/1 retired" for as long as the call takes. The call ends
    once that line is out (a call of fixed length, 5 s, could end before a dspexctl started on a
    loaded host printed it)."""
    (old,) = stack.ready("triage_pool")
    results: list[Any] = []
    release = Path(stack.root, "release-recycle")

    def call() -> None:
        with stack.client() as dx, dx.session("triage_pool") as s:
            s.exec("import os, time\nwhile not os.path.exists(release):\n    time.sleep(0.02)\n", {"release": str(release)},
                   timeout=60)
            results.append("let go")

    busy = threading.Thread(target=call)
    busy.start()
    progress: list[str] = []
    try:
        wait_for(lambda: stack.status()["pools"]["triage_pool"]["workers"][0]["state"] == "busy", 10, 0.05,
                 "the worker busy")
        env = {k: v for k, v in stack.env.items() if k != "DSPEX_SUPERVISOR_CONF"}  # as harness.dspexctl runs it
        recycle = subprocess.Popen([sys.executable, "-m", "dspexctl", "workers", "recycle", "triage_pool"], cwd=stack.root,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            def read_progress() -> None:
                assert recycle.stderr is not None
                for line in recycle.stderr:
                    progress.append(line.rstrip("\n"))

            reader = threading.Thread(target=read_progress)
            reader.start()
            wait_for(lambda: any(ln.startswith("waiting:") for ln in progress), 60, 0.05, "the recycle's first wait line")
            release.touch()
            out, _ = recycle.communicate(timeout=60)
            reader.join(10)
        finally:
            if recycle.poll() is None:
                recycle.kill()
                recycle.wait()
    finally:
        release.touch()
        busy.join(30)
    text = out + "\n".join(progress)
    assert "Traceback" not in text, text
    assert recycle.returncode == 0 and results == ["let go"], text
    assert (f"waiting: 0/1 retired ({old['id']} finishes its 1 running call(s) first), 0/1 replacements ready"
            in progress), text
