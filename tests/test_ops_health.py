"""Health means trouble, and session counts tell the truth: the CLI as a subprocess against a real
supervisord stack (the shipped broker and triage_pool sections, 2 workers, a 30 s health window).

* 50 user exceptions and a ``workers recycle --all`` leave the pool OK (exit 0), counted apart;
  3 worker crashes make it WARN (exit 6), and it is OK again once the window holds no crash.
* Sessions of a recycled worker leave every count at once (pool and worker rows, the header,
  ``sessions list``); during a rolling recycle a client that reopens its session after the first
  ``SessionWorkerUnavailable`` is never pinned to the worker recycled next (one error, not two).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import dspex
from dspex.stack.supervisor import pid_alive
from tests.harness import wait_for
from tests.harness.supervisord import SupervisedStack, cli_status, dashboard_status, dspexctl, no_traceback, small_stack

pytestmark = [pytest.mark.slow]

# a crash a test makes must still be in the window when it reads the status after it: a hard
# recycle's kill and replacement plus five dspexctl runs took 15 s on a loaded 2-core host
WINDOW = 30


@pytest.fixture(scope="module")
def stack() -> Iterator[SupervisedStack]:
    with small_stack({"triage_pool": 2}, triage_pool={"health_window": str(WINDOW)}) as s:
        yield s


def status(stack: SupervisedStack) -> tuple[int, dict[str, Any], str]:
    return cli_status(stack, "-v")


def dashboard_state(stack: SupervisedStack) -> str:
    return str(dashboard_status(stack)["pools"]["triage_pool"]["state"])


def pinned_sessions(dx: dspex.Client, n: int) -> list[dspex.Session]:
    sessions = [dx.session("triage_pool") for _ in range(n)]
    for s in sessions:
        s.call("os", "getpid")
    return sessions


@pytest.mark.timeout(300)
def test_user_errors_and_recycles_are_not_trouble_crashes_are_and_warn_clears(stack: SupervisedStack) -> None:
    with stack.client() as dx:
        for _ in range(50):
            with pytest.raises(ZeroDivisionError):
                dx.call("operator", "truediv", [1, 0], pool="triage_pool")
        sessions = pinned_sessions(dx, 4)
        assert len({s.worker for s in sessions}) == 2
        res = dspexctl(stack, "workers", "recycle", "triage_pool", "--all")
        assert res.returncode == 0, res.stdout + res.stderr
        for s in sessions:
            with pytest.raises(dspex.SessionWorkerUnavailable):
                s.call("os", "getpid")
    rc, doc, text = status(stack)
    assert rc == 0, text
    pool = doc["pools"][0]
    assert pool["health"] == "ok" and doc["problems"] == []
    assert pool["failures"]["user"] == {"remote_error": 50}
    assert pool["failures"]["recycle"] == {"session_worker_unavailable": 4}
    assert pool["failures"]["service"] == {}
    assert "WARN:" not in text and "requests failed" not in text, text
    failed = text.splitlines()[text.splitlines().index(
        "failed answers in the health window (only SERVICE counts toward WARN):") + 1:]
    assert failed[0].split() == ["POOL", "LAST", "SERVICE", "USER", "RECYCLE"]
    assert failed[1].split() == ["triage_pool", f"{WINDOW}s", "0", "50", "4"]
    assert dashboard_state(stack) == "ok"

    for i in range(3):  # three crashes: SIGKILL through supervisord, which starts a new incarnation
        # a RUNNING one: supervisord counts an exit within startsecs as a failed start, not a crash
        # (after the recycle both may still be STARTING: wait for one)
        victim = wait_for(lambda: next((p for p in stack.processes()
                                        if p["group"] == "triage_pool" and p["statename"] == "RUNNING"), None),
                          60, 0.1, "a RUNNING triage_pool worker")
        with stack.supervisor() as sup:
            sup.signal(f"triage_pool:{victim['name']}", "KILL")

        def replaced(gone: int = victim["pid"]) -> bool:
            procs = [p for p in stack.processes() if p["group"] == "triage_pool"]
            pids = {w["pid"] for w in stack.ready("triage_pool")}
            return len(pids) == 2 and gone not in pids and all(p["statename"] == "RUNNING" for p in procs)

        wait_for(replaced, 60, 0.1, f"the replacement of crash {i + 1}")
    crashed = time.monotonic()
    rc, doc, text = status(stack)
    assert rc == 6, text
    assert doc["pools"][0]["failures"]["service"] == {"crash": 3}
    assert f"WARN: triage_pool failed 3 time(s) in the last {WINDOW}s: worker crash ×3" in text, text
    assert dashboard_state(stack) == "warn", "the dashboard says what the CLI says"

    # no new crash: WARN clears by itself once the window has slid past the crashes
    rc, doc, text = wait_for(lambda: (got := status(stack))[0] == 0 and got, WINDOW + 30, 0.5, "OK again")
    assert time.monotonic() - crashed >= WINDOW - 3, "not before the window passed"
    assert doc["pools"][0]["failures"]["service"] == {} and "WARN:" not in text
    assert dashboard_state(stack) == "ok"


@pytest.mark.timeout(300)
def test_sessions_of_recycled_workers_leave_every_count(stack: SupervisedStack) -> None:
    with stack.client() as dx:
        sessions = pinned_sessions(dx, 4)
        res = dspexctl(stack, "workers", "recycle", "triage_pool", "--all")
        assert res.returncode == 0, res.stdout + res.stderr
        fresh = pinned_sessions(dx, 2)

        listed = json.loads(dspexctl(stack, "sessions", "list", "--json").stdout)["sessions"]
        assert {s["id"] for s in listed} == {s.id for s in fresh}, "no rows for sessions of gone workers"
        text = dspexctl(stack, "sessions", "list").stdout
        assert "(gone)" not in text
        _, doc, status_text = status(stack)
        pool = doc["pools"][0]
        assert pool["sessions"] == sum(w["sessions"] for w in pool["workers"]) == doc["broker"]["sessions"] == 2
        assert "2 sessions" in status_text
        for s in sessions:  # answered so, from its tombstone, every time: never a fresh namespace
            for _ in range(2):
                with pytest.raises(dspex.SessionWorkerUnavailable):
                    s.call("os", "getpid")


@pytest.mark.timeout(300)
def test_a_reopened_session_is_never_pinned_to_the_worker_recycled_next(stack: SupervisedStack) -> None:
    """Clients that reopen their session on SessionWorkerUnavailable (as dspex.Rehydrator does) see it
    once per rolling recycle: their new session waits for a replacement instead of landing on the
    worker the roll takes next."""
    errors: dict[int, int] = {}
    stop = threading.Event()
    failures: list[BaseException] = []
    started: set[int] = set()
    served_by: dict[int, str] = {}  # client -> the incarnation its last call ran on

    def client(n: int) -> None:
        try:
            with stack.client() as dx:
                s = dx.session("triage_pool")
                while not stop.is_set():
                    try:
                        s.call("time", "sleep", [0.02])
                        served_by[n] = s.worker
                        started.add(n)
                    except dspex.SessionWorkerUnavailable:
                        errors[n] = errors.get(n, 0) + 1
                        s = dx.session("triage_pool")
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for th in threads:
        th.start()
    try:
        wait_for(lambda: len(started) == 4, 30, 0.05, "four clients calling")
        old = {w["incarnation"] for w in stack.status()["pools"]["triage_pool"]["workers"]}
        res = dspexctl(stack, "workers", "recycle", "triage_pool", "--all")
        assert res.returncode == 0, res.stdout + res.stderr
        wait_for(lambda: all(served_by.get(n) not in old for n in range(4)), 60, 0.02,
                 "every client calling on a new incarnation")
    finally:
        stop.set()
        for th in threads:
            th.join(60)
    assert not failures, failures
    assert sum(errors.values()) >= 1, "the recycle reached the clients' sessions"
    assert max(errors.values()) == 1, f"a client got the error more than once: {errors}"


def wedge() -> Any:
    """User code that never returns and holds the GIL all along (a regex backtracking
    exponentially): the worker's heartbeat thread cannot run either."""
    import re

    return re.match(r"(a+)+$", "a" * 64 + "b")


@pytest.mark.timeout(300)
def test_a_worker_wedged_in_user_code_is_named_and_recycle_hard_kills_it(stack: SupervisedStack) -> None:
    before = {w["pid"] for w in stack.ready("triage_pool")}  # remembered: killed at the end if still there
    with stack.client(60) as dx:
        s = dx.session("triage_pool")
        pid = s.call("os", "getpid")
        with pytest.raises(dspex.WorkerCrashed, match="stopped answering heartbeats"):
            s.run(wedge)
    assert pid in before
    name = next(f"{p['group']}:{p['name']}" for p in stack.processes() if p["pid"] == pid)
    rc, doc, text = status(stack)
    # at once, not after the 60 s a starting worker is given: the process is RUNNING, not coming back
    assert rc == 3, text
    line = next((ln for ln in text.splitlines() if ln.startswith(f"DEGRADED: {name} is RUNNING (pid {pid}) but "
                                                                      "stopped answering heartbeats")), None)
    assert line is not None and line.endswith(f"dspexctl workers recycle triage_pool --worker {pid} --hard kills it"), \
        text
    assert any(p.startswith(f"{name} is RUNNING (pid {pid}) but stopped answering heartbeats") and p.endswith(
        "--hard kills it") for p in doc["problems"]), doc["problems"]  # the same fact (its age a second later)
    assert dashboard_state(stack) == "degraded"  # the same rule on the dashboard
    res = dspexctl(stack, "workers", "recycle", "triage_pool", "--worker", str(pid), "--hard")
    no_traceback(res)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"(pid {pid}) -> " in res.stdout and res.stdout.rstrip().endswith("(hard)"), res.stdout
    wait_for(lambda: not pid_alive(pid), 20, 0.1, "the wedged worker killed")
    assert len(stack.ready("triage_pool")) == 2
    rc, doc, text = status(stack)
    assert rc == 6 and "worker crash" in text, text  # the crash stays in the health window, nothing else


@pytest.mark.timeout(300)
def test_a_stopped_worker_is_named_as_stopped_not_guessed_wedged(stack: SupervisedStack) -> None:
    """A worker whose heartbeats stopped because its process is stopped (SIGSTOP, a debugger) is
    named so, with what resumes it, from /proc: not guessed to be in user code holding the GIL."""
    import os
    import signal

    (w, *_) = stack.ready("triage_pool")
    pid = w["pid"]
    name = next(f"{p['group']}:{p['name']}" for p in stack.processes() if p["pid"] == pid)
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: pid not in {x["pid"] for x in stack.ready("triage_pool")}, 30, 0.2, "the broker dropping it")
        rc, doc, text = status(stack)
        assert rc == 3, text
        line = next((ln for ln in text.splitlines() if ln.startswith(f"DEGRADED: {name} is RUNNING (pid {pid}) but "
                                                                          "stopped answering heartbeats")), "")
        assert (f"its process is stopped (a SIGSTOP or a debugger; kill -CONT {pid} resumes it); dspexctl" in line
                and "holds the GIL" not in line and line.endswith(f"--worker {pid} --hard kills it")), text
        assert any(f"kill -CONT {pid} resumes it" in p for p in doc["pools"][0]["reasons"]), doc["pools"][0]
    finally:
        res = dspexctl(stack, "workers", "recycle", "triage_pool", "--worker", str(pid), "--hard")
        assert res.returncode == 0, res.stdout + res.stderr
        wait_for(lambda: not pid_alive(pid), 20, 0.1, "the stopped worker killed")
    wait_for(lambda: len(stack.ready("triage_pool")) == 2, 60, 0.2, "its replacement")


@pytest.mark.timeout(300)
def test_a_recycle_beside_a_silent_worker_says_which_command_ends_that_one(stack: SupervisedStack) -> None:
    """``workers recycle POOL`` recycles a worker the broker lists; a process of the pool the broker
    dropped for silence (here SIGSTOPped) is not among them: the command warns, naming it as
    ``pools status`` does, with the command that ends it."""
    import os
    import signal

    (w, *_) = stack.ready("triage_pool")
    pid = w["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: pid not in {x["pid"] for x in stack.ready("triage_pool")}, 30, 0.2, "the broker dropping it")
        res = dspexctl(stack, "workers", "recycle", "triage_pool")
        no_traceback(res)
        assert res.returncode == 0, res.stdout + res.stderr
        warning = next((ln for ln in res.stderr.splitlines() if ln.startswith("warning: ")), "")
        assert f"(pid {pid}) but stopped answering heartbeats" in warning, res.stderr
        assert f"kill -CONT {pid} resumes it" in warning, warning
        assert warning.endswith(f"dspexctl workers recycle triage_pool --worker {pid} --hard kills it"), warning
        _, _, text = status(stack)
        head, _, tail = warning.removeprefix("warning: ").partition(" ago: ")  # (the time has moved on since)
        head = head.rsplit(" ", 1)[0]
        assert any(ln.startswith(f"DEGRADED: {head}") and ln.endswith(tail) for ln in text.splitlines()), text
    finally:
        res = dspexctl(stack, "workers", "recycle", "triage_pool", "--worker", str(pid), "--hard")
        assert res.returncode == 0, res.stdout + res.stderr
        wait_for(lambda: not pid_alive(pid), 20, 0.1, "the stopped worker killed")
    wait_for(lambda: len(stack.ready("triage_pool")) == 2, 60, 0.2, "its replacement")
