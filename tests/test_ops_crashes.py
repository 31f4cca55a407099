"""A worker that dies the way workers die in production is named with its cause: the CLI as a
subprocess and the dashboard's JSON against a real supervisord stack (the shipped broker and
triage_pool sections, one worker).

* A segfault in user code (``ctypes.string_at(0)``): the caller gets ``WorkerCrashed``;
  ``pools status`` says WARN with the crashed worker's pid and "terminated by SIGSEGV" (what
  supervisord saw when it reaped it), ``--json`` events and the dashboard's events carry it as
  ``exit``, and the worker's log holds Python's fatal-error report with the call's stack.
* A SIGKILL from outside dspex (what the kernel's OOM killer sends): named, with the hint that it
  is most likely the OOM killer.
* The dashboard in a real browser shows a crash's cause in its events and its reasons.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

import dspex
from tests.harness import wait_for
from tests.harness.supervisord import SupervisedStack, cli_status, dashboard_status, dspexctl, no_traceback, small_stack
from tests.test_dashboard import browser, rows  # noqa: F401 - the fixture, for the page's test

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def stack() -> Iterator[SupervisedStack]:
    with small_stack({"triage_pool": 1}) as s:
        yield s


def replaced(stack: SupervisedStack, gone: int) -> None:
    def check() -> bool:
        # supervisord's loop turns, and the harness records the new pid; RUNNING (past startsecs)
        # before the next test kills it, or supervisord counts that as a failed start (FATAL at
        # startretries=1) however fast the worker registered
        running = {p["pid"] for p in stack.processes() if p["statename"] == "RUNNING"}
        pids = {w["pid"] for w in stack.ready("triage_pool")}
        return len(pids) == 1 and gone not in pids and pids <= running

    wait_for(check, 60, 0.1, f"the replacement of pid {gone}")


def status(stack: SupervisedStack) -> tuple[int, dict[str, Any], str]:
    return cli_status(stack)


def crash_of(events: list[dict[str, Any]], pid: int) -> dict[str, Any]:
    crashes = [e for e in events if e.get("event") == "crash" and e.get("pid") == pid]
    assert len(crashes) == 1, events
    return crashes[0]


def dashboard_events(stack: SupervisedStack) -> list[dict[str, Any]]:
    return list(dashboard_status(stack)["events"])


@pytest.mark.timeout(180)
def test_a_segfault_in_user_code_is_named_with_its_signal_and_its_stack(stack: SupervisedStack) -> None:
    with stack.client() as dx:
        s = dx.session("triage_pool")
        victim = s.call("os", "getpid")
        with pytest.raises(dspex.WorkerCrashed):
            s.exec("import ctypes\n\ndef read_null():\n    return ctypes.string_at(0)\n\nread_null()\n")
    replaced(stack, victim)

    rc, doc, text = status(stack)
    assert rc == 6, text
    warn = next(line for line in text.splitlines() if line.startswith("WARN: triage_pool"))
    assert f"pid {victim}" in warn and "terminated by SIGSEGV" in warn, text
    assert crash_of(doc["events"], victim)["exit"].startswith("terminated by SIGSEGV"), doc["events"]
    assert crash_of(dashboard_events(stack), victim)["exit"].startswith("terminated by SIGSEGV")

    log = "".join(p.read_text(errors="replace") for p in (stack.root / "log").glob("triage_pool_*.log"))
    assert "Fatal Python error: Segmentation fault" in log, log[-3000:]
    assert "in read_null" in log, "the worker's log shows where in the user's code it died"


@pytest.mark.timeout(180)
def test_a_sigkill_from_outside_is_named_as_the_oom_killers(stack: SupervisedStack) -> None:
    victim = stack.ready("triage_pool")[0]["pid"]
    os.kill(victim, signal.SIGKILL)  # what the kernel's OOM killer does
    replaced(stack, victim)

    rc, doc, text = status(stack)
    assert rc == 6, text
    warn = next(line for line in text.splitlines() if line.startswith("WARN: triage_pool"))
    assert f"pid {victim}" in warn and "terminated by SIGKILL" in warn and "OOM killer" in warn, text
    assert crash_of(doc["events"], victim)["exit"].startswith("terminated by SIGKILL")
    # the dashboard's view of supervisord is cached briefly: a look from before the crash may still serve
    wait_for(lambda: crash_of(dashboard_events(stack), victim).get("exit", "").startswith("terminated by SIGKILL"),
             10, 0.2, "the dashboard's crash with how it ended")


@pytest.mark.timeout(180)
def test_the_dashboard_shows_how_a_worker_died(stack: SupervisedStack, browser: Any) -> None:  # noqa: F811
    browser.get(f"http://127.0.0.1:{stack.metrics_port}/")
    wait_for(lambda: [r["pool"] for r in rows(browser, "pools")] == ["triage_pool"], 30, 0.2, "the pools table")
    victim = stack.ready("triage_pool")[0]["pid"]
    os.kill(victim, signal.SIGSEGV)
    replaced(stack, victim)

    def crash_row() -> dict[str, str] | None:
        return next((r for r in rows(browser, "events") if r["kind"] == "crash" and r["td_pid"] == str(victim)), None)

    row = wait_for(crash_row, 30, 0.2, "the crash on the page")
    assert row["td_why"].startswith("crashed (connection lost): terminated by SIGSEGV"), row
    # the page polls every second: what it shows may still be the replacement's dspy import (STARTING)
    reasons = wait_for(lambda: "last crash" in (text := browser.find_element("id", "reasons").text) and text, 10, 0.2,
                       "the crash among the page's reasons")
    assert f"last crash: worker {row['incarnation'][:8]} (pid {victim})" in reasons, reasons
    assert "terminated by SIGSEGV" in reasons, reasons


@pytest.mark.timeout(180)
def test_a_worker_stuck_in_c_code_past_its_hard_limit_is_named_so(stack: SupervisedStack) -> None:
    with stack.client() as dx:
        s = dx.session("triage_pool")
        victim = s.call("os", "getpid")
        with pytest.raises(dspex.Timeout, match="ignored the interruption"):
            # C code that blocks every signal: the soft limit cannot interrupt it, the hard one ends the worker
            s.exec("import ctypes, signal\nsignal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals))\n"
                   "ctypes.CDLL(None).sleep(600)\n", timeout=1)
    replaced(stack, victim)

    rc, doc, text = status(stack)
    assert rc == 6 and "call stopped at its deadline ×1" in text, text
    left = [e for e in doc["events"] if e.get("pid") == victim and e["event"] != "start"]
    assert [(e["event"], e["why"]) for e in left] == [("recycle", "was recycled at a call's hard time limit")], left
    assert [(e["event"], e["why"]) for e in dashboard_events(stack) if e.get("pid") == victim
            and e["event"] != "start"] == [("recycle", "was recycled at a call's hard time limit")]


HARD = "terminated by SIGKILL, sent by dspexctl workers recycle --hard"


def crashes_total(stack: SupervisedStack) -> float:
    """The broker's ``dspex_worker_crashes_total`` of triage_pool, summed over its labels."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("dspex_worker_crashes_total{") and 'pool="triage_pool"' in line)


@pytest.mark.timeout(180)
def test_a_hard_recycle_of_a_registered_worker_is_a_recycle_not_a_crash() -> None:
    """The operator asked for it: ``--hard`` tells the broker it recycles the worker, then
    SIGKILLs it, so the pool stays OK, the broker counts a recycle with its why and no crash (a
    stack of its own: the module's has crashes of the other tests in its health window)."""
    with small_stack({"triage_pool": 1}) as stack:
        hard_recycle_is_a_recycle(stack)


def hard_recycle_is_a_recycle(stack: SupervisedStack) -> None:
    victim = stack.ready("triage_pool")[0]["pid"]
    crashes = crashes_total(stack)
    recycles = stack.status()["pools"]["triage_pool"]["recycles"]
    res = dspexctl(stack, "workers", "recycle", "triage_pool", "--hard")
    no_traceback(res)
    assert res.returncode == 0, res.stdout + res.stderr
    replaced(stack, victim)

    rc, doc, text = status(stack)
    assert rc == 0 and not any(line.startswith("WARN") for line in text.splitlines()), text
    left = [e for e in doc["events"] if e.get("pid") == victim and e["event"] != "start"]
    assert [(e["event"], e["why"]) for e in left] == [("recycle", "was recycled")], left
    assert stack.status()["pools"]["triage_pool"]["recycles"] == recycles + 1
    assert crashes_total(stack) == crashes
    pool = dashboard_status(stack)["pools"]["triage_pool"]
    assert pool["state"] == "ok", pool["reasons"]

    # busy: no goodbye can come first, so the SIGKILL ends the call it runs, and still no crash is counted
    victim = stack.ready("triage_pool")[0]["pid"]
    with stack.client() as dx:
        running = dx.submit(lambda: dx.call("time", "sleep", [120], pool="triage_pool", timeout=150))
        wait_for(lambda: stack.status()["pools"]["triage_pool"]["workers"][0]["inflight"] == 1, 30, 0.1, "the call")
        res = dspexctl(stack, "workers", "recycle", "triage_pool", "--hard")
        assert res.returncode == 0 and f"(pid {victim}, triage_pool:triage_pool_00) with SIGKILL" in res.stderr, \
            res.stdout + res.stderr
        with pytest.raises(dspex.WorkerCrashed, match="was recycled while running this request"):
            running.result(30)
    replaced(stack, victim)
    events = [(e["event"], e["why"]) for e in stack.status()["events"] if e.get("pid") == victim and e["event"] != "start"]
    assert events == [("recycle", "was recycled")], events
    assert crashes_total(stack) == crashes


@pytest.mark.timeout(180)
def test_recycling_a_wedged_only_worker_points_at_hard_which_ends_it(stack: SupervisedStack) -> None:
    """A call that holds the GIL (a catastrophic regex) wedges the pool's only worker: the broker
    drops it for silence while supervisord still runs it. A graceful recycle has nothing to ask to
    leave: it says so and gives the command that ends the process (exit 1, the JSON error too);
    that command works, and the crash is named: silent first, then killed by the operator."""
    victim = stack.ready("triage_pool")[0]["pid"]
    with stack.client() as dx:
        wedged = dx.submit(lambda: dx.call("re", "match", ["(a*)*b", "a" * 40], pool="triage_pool", timeout=120))
        wait_for(lambda: not stack.status()["pools"]["triage_pool"]["workers"], 30, 0.2, "the broker dropping it")
        with pytest.raises(dspex.WorkerCrashed):
            wedged.result(30)
    hint = f"dspexctl workers recycle triage_pool --worker {victim} --hard"
    res = dspexctl(stack, "workers", "recycle", "triage_pool")
    no_traceback(res)
    assert res.returncode == 1 and hint in res.stderr and "stopped answering heartbeats" in res.stderr, res.stderr
    as_json = dspexctl(stack, "--json", "workers", "recycle", "triage_pool")
    error = json.loads(as_json.stdout)["error"]
    assert as_json.returncode == 1 and error["exit"] == 1 and hint in error["message"], as_json.stdout
    assert error["code"] == "nothing_to_recycle", error

    res = dspexctl(stack, *hint.split()[1:])
    assert res.returncode == 0, res.stdout + res.stderr
    replaced(stack, victim)
    rc, doc, text = status(stack)
    assert rc == 6, text
    warn = next(line for line in text.splitlines() if line.startswith("WARN: triage_pool"))
    assert f"pid {victim}" in warn and f"stopped answering heartbeats, then {HARD}" in warn, warn
    assert "OOM" not in warn, warn
    crash = crash_of(doc["events"], victim)
    assert (crash["why"], crash["exit"]) == ("stopped answering heartbeats", HARD), crash
