"""``dspexctl pools status`` states: STARTING, DOWN, WARN, ``-`` for no data, supervisord's view
with an invalid dspex config, a broker that is not this supervisord's, and ``--timeout`` checks.

The pure state logic (dspex.stack.health) has fast unit tests; the rest runs the CLI as a subprocess
against real supervisord stacks made of the shipped conf's sections (fewer workers).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dspex.stack.health import (
    PoolFacts,
    State,
    facts_from_status,
    failure_kind,
    last_crash,
    other_hosts,
    pool_state,
    with_exits,
    worst,
)
from dspex.stack.supervisor import exit_causes, pid_alive, restart_loops, unexpected_exits
from dspexctl.status import AGREEMENT_TRIES, agreeing_views
from tests.harness import REPO, base_env, wait_for
from tests.harness.supervisord import SupervisedStack, dashboard_status
from tests.test_cli import dspexctl, no_traceback
from tests.test_ops_python import small_conf_text

POOLS = {"triage_pool": 2, "analytics_pool": 1}


# -- pure logic ----------------------------------------------------------------------------------
def test_a_programs_unexpected_exits_are_those_after_it_started_and_in_the_window() -> None:
    """A broker that fails at its start served nothing (its FATAL is said elsewhere); one killed
    while RUNNING lost its sessions; a stop supervisord was asked for is expected."""
    log = """\
2026-12-07 18:38:26,700 INFO spawned: 'broker' with pid 100
2026-12-07 18:38:26,900 WARN exited: broker (exit status 127; not expected)
2026-12-07 18:38:27,000 INFO spawned: 'broker' with pid 101
2026-12-07 18:38:28,762 INFO success: broker entered RUNNING state, process has stayed up for > than 1 seconds (startsecs)
2026-12-07 18:38:29,670 WARN exited: broker (terminated by SIGKILL; not expected)
2026-12-07 18:38:29,952 INFO spawned: 'broker' with pid 102
2026-12-07 18:38:31,779 INFO success: broker entered RUNNING state, process has stayed up for > than 1 seconds (startsecs)
2026-12-07 18:38:40,000 WARN exited: triage_pool_00 (terminated by SIGKILL; not expected)
2026-12-07 18:39:31,779 INFO stopped: broker (terminated by SIGTERM)
"""
    at = datetime.datetime(2026, 12, 7, 18, 38, 29, 670000).timestamp()
    assert unexpected_exits(log, "broker", 0) == [(101, at, "terminated by SIGKILL")]
    assert unexpected_exits(log, "broker", at + 1) == []


def test_a_restart_loop_is_two_unexpected_exits_in_the_window_not_an_operators_kills() -> None:
    """A worker supervisord restarted after two exits it did not expect is looping; two
    ``workers recycle --hard`` of it (SIGKILLs noted as the operator's) are not a loop."""
    log = """\
2026-12-07 18:38:20,000 INFO spawned: 'a_00' with pid 200
2026-12-07 18:38:21,100 INFO success: a_00 entered RUNNING state, process has stayed up for > than 1 seconds (startsecs)
2026-12-07 18:38:22,000 WARN exited: a_00 (exit status 3; not expected)
2026-12-07 18:38:22,100 INFO spawned: 'a_00' with pid 201
2026-12-07 18:38:23,200 INFO success: a_00 entered RUNNING state, process has stayed up for > than 1 seconds (startsecs)
2026-12-07 18:38:24,000 WARN exited: a_00 (exit status 3; not expected)
2026-12-07 18:38:24,100 INFO spawned: 'a_00' with pid 202
2026-12-07 18:38:20,000 INFO spawned: 'b_00' with pid 300
2026-12-07 18:38:21,100 INFO success: b_00 entered RUNNING state, process has stayed up for > than 1 seconds (startsecs)
2026-12-07 18:38:22,000 WARN exited: b_00 (terminated by SIGKILL; not expected)
2026-12-07 18:38:22,100 INFO spawned: 'b_00' with pid 301
2026-12-07 18:38:23,200 INFO success: b_00 entered RUNNING state, process has stayed up for > than 1 seconds (startsecs)
2026-12-07 18:38:24,000 WARN exited: b_00 (terminated by SIGKILL; not expected)
2026-12-07 18:38:24,100 INFO spawned: 'b_00' with pid 302
"""
    procs = [{"group": "a", "name": "a_00"}, {"group": "b", "name": "b_00"}]
    since = datetime.datetime(2026, 12, 7, 18, 38, 0).timestamp()
    assert restart_loops(log, procs, since, killed={300: "b:b_00", 301: "b:b_00"}) == {"a:a_00": (2, "exit status 3")}
    assert restart_loops(log, procs, since, killed={}) == {"a:a_00": (2, "exit status 3"),
                                                          "b:b_00": (2, "terminated by SIGKILL")}
    assert restart_loops(log, procs, since + 23, killed={}) == {}  # one exit in the window: a crash, not a loop


@pytest.mark.parametrize("facts, state", [
    (PoolFacts(expected=2, up=2), State.OK),
    (PoolFacts(expected=2, up=1, broken=1), State.DEGRADED),
    (PoolFacts(expected=2, up=1), State.DEGRADED),  # a worker missing without supervisord's view
    (PoolFacts(expected=2, up=0, broken=2), State.DOWN),
    (PoolFacts(expected=2, up=0), State.DOWN),
    (PoolFacts(expected=2, up=0, starting=2), State.STARTING),
    (PoolFacts(expected=2, up=0, starting=1, broken=1), State.DOWN),
    (PoolFacts(expected=2, up=1, starting=1), State.STARTING),
    (PoolFacts(expected=2, up=2, queued=800, queue_max=1000), State.WARN),
    (PoolFacts(expected=2, up=2, queued=799, queue_max=1000), State.OK),
    (PoolFacts(expected=2, up=2, failures={"crash": 1}), State.WARN),
    (PoolFacts(expected=2, up=2, failures={"queue_timeout": 2, "worker_crashed": 1}), State.WARN),
    (PoolFacts(expected=2, up=2, failures={"crash": 0}), State.OK),
    (PoolFacts(expected=2, up=1, broken=1, queued=999, queue_max=1000), State.DEGRADED),
    (PoolFacts(expected=2, up=2, problems=("worker x (pid 1) cannot import dspy: ImportError: y",)), State.DEGRADED),
    (PoolFacts(expected=1, up=1, queued=1, oldest_wait_s=4.0, queue_timeout=8.0, free=0), State.WARN),
    (PoolFacts(expected=1, up=1, queued=1, oldest_wait_s=3.9, queue_timeout=8.0, free=0), State.OK),
])
def test_pool_state(facts: PoolFacts, state: State) -> None:
    verdict = pool_state("p", facts)
    assert verdict.state == state
    assert bool(verdict.reasons) == (state != State.OK)


def test_only_the_services_failures_count_and_the_reason_names_them() -> None:
    assert [failure_kind(c) for c in ("remote_error", "cancelled", "ref_not_found", "worker_busy")] == ["user"] * 4
    assert [failure_kind(c) for c in ("crash", "worker_crashed", "queue_timeout", "pool_saturated", "timeout",
                                      "internal_error")] == ["service"] * 6
    assert failure_kind("session_worker_unavailable") == "recycle"
    assert failure_kind("session_worker_unavailable", worker_left_cleanly=False) == "service"
    verdict = pool_state("p", PoolFacts(expected=2, up=2, failures={"crash": 3, "queue_timeout": 1}, window_s=300))
    assert verdict.reasons == [("p failed 4 time(s) in the last 5m: worker crash ×3, queue timeout ×1 "
                               "(clears after 5m without one)")]


def test_a_crash_is_named_with_how_its_process_ended_as_supervisord_logged_it() -> None:
    log = """\
2026-12-07 03:28:07,501 INFO spawned: 'triage_pool_00' with pid 100
2026-12-07 03:28:07,502 INFO spawned: 'triage_pool_01' with pid 101
2026-12-07 03:28:11,958 WARN exited: triage_pool_00 (terminated by SIGSEGV (core dumped); not expected)
2026-12-07 03:28:12,960 INFO spawned: 'triage_pool_00' with pid 102
2026-12-07 03:28:20,001 INFO exited: triage_pool_00 (exit status 0; expected)
2026-12-07 03:28:21,001 INFO spawned: 'triage_pool_00' with pid 103
2026-12-07 03:29:00,000 WARN exited: triage_pool_01 (terminated by SIGKILL; not expected)
2026-12-07 03:29:01,000 WARN exited: other_00 (exit status 1; not expected)
"""  # other_00 was spawned before the tail: no pid to name
    causes = exit_causes(log)
    assert causes == {100: "terminated by SIGSEGV (core dumped)", 102: "exit status 0", 101: "terminated by SIGKILL"}
    events = [{"time": 10.0, "event": "crash", "pool": "p", "worker": "aaaaaaaa1", "pid": 100, "host": "h",
               "why": "connection lost"},
              {"time": 20.0, "event": "start", "pool": "p", "worker": "bbbbbbbb1", "pid": 102, "host": "h"},
              {"time": 30.0, "event": "crash", "pool": "p", "worker": "cccccccc1", "pid": 101, "host": "other",
               "why": "connection lost"}]
    seen = with_exits(events, causes, here="h")
    assert [e.get("exit") for e in seen] == ["terminated by SIGSEGV (core dumped)", None, None]  # pids of this host only
    assert last_crash(seen, "p", now=40.0) == "worker cccccccc (pid 101) 10s ago: connection lost"
    assert last_crash(seen[:2], "p", now=40.0) == "worker aaaaaaaa (pid 100) 30s ago: terminated by SIGSEGV (core dumped)"
    assert "OOM killer" in last_crash([{**events[0], "exit": "terminated by SIGKILL"}], "p", now=40.0)
    assert last_crash(seen, "q") == ""
    verdict = pool_state("p", PoolFacts(expected=1, up=1, failures={"crash": 1}, last_crash="worker x (pid 1) 1s ago"))
    assert verdict.reasons == [("p failed 1 time(s) in the last 5m: worker crash ×1; last crash: worker x (pid 1) 1s ago "
                                "(clears after 5m without one)")]


def test_a_sigkill_an_operators_command_sent_is_named_so_not_the_oom_killers() -> None:
    """``workers recycle --hard`` notes its kill (pid and process) beside supervisord's log; the
    exit of that process is named as the operator's, a SIGKILL of any other as before, and a
    note whose pid a later process of another name got again names nothing."""
    log = """\
2026-12-07 03:28:07,501 INFO spawned: 'triage_pool_00' with pid 100
2026-12-07 03:28:07,502 INFO spawned: 'triage_pool_01' with pid 101
2026-12-07 03:28:07,503 INFO spawned: 'other_00' with pid 102
2026-12-07 03:28:11,958 WARN exited: triage_pool_00 (terminated by SIGKILL; not expected)
2026-12-07 03:28:11,959 WARN exited: triage_pool_01 (terminated by SIGKILL; not expected)
2026-12-07 03:28:11,960 WARN exited: other_00 (terminated by SIGKILL; not expected)
"""
    killed = {100: "triage_pool:triage_pool_00", 102: "triage_pool:triage_pool_01"}
    causes = exit_causes(log, killed)
    hard = "terminated by SIGKILL, sent by dspexctl workers recycle --hard"
    assert causes == {100: hard, 101: "terminated by SIGKILL", 102: "terminated by SIGKILL"}
    crash = {"time": 10.0, "event": "crash", "pool": "p", "worker": "aaaaaaaa1", "pid": 100,
             "why": "crashed (connection lost)"}
    assert last_crash(with_exits([crash], causes, here="h"), "p", now=40.0) == f"worker aaaaaaaa (pid 100) 30s ago: {hard}"
    silent = {**crash, "why": "stopped answering heartbeats"}
    assert last_crash(with_exits([silent], causes), "p", now=40.0).endswith(
        f": stopped answering heartbeats, then {hard}")
    other = last_crash(with_exits([{**silent, "pid": 101}], causes), "p", now=40.0)
    assert other.endswith("stopped answering heartbeats, then terminated by SIGKILL (out of memory? the kernel's OOM "
                          "killer sends SIGKILL: see dmesg)"), other


def test_workers_of_other_hosts_count_against_the_pools_size() -> None:
    """A pool of size 4, one process here (pid 10): workers of host b fill the rest; those b lost
    and never replaced are named, by host and cause; a young broker's unseen ones are starting."""
    def w(pid: int, host: str, state: str = "ready") -> dict[str, Any]:
        return {"pid": pid, "host": host, "state": state}

    def e(t: float, event: str, pid: int, host: str, why: str = "stopped answering heartbeats") -> dict[str, Any]:
        return {"time": t, "pool": "p", "event": event, "pid": pid, "host": host, "why": why}

    here = "a"
    full = {"size": 4, "workers": [w(10, here), w(10, "b"), w(11, "b"), w(12, "b")]}  # pid 10 twice: two hosts
    assert other_hosts(full, "p", {10}, 1, [], young=False, here=here) == (4, 0, [])
    events = [e(1, "start", 10, "b"), e(2, "start", 11, "b"), e(3, "start", 12, "b"), e(50, "crash", 11, "b"),
              e(50, "crash", 12, "b"), e(60, "crash", 13, "b", "exited"), e(70, "start", 14, "b"),
              e(80, "crash", 9, here)]  # a loss here is supervisord's business: not listed
    half = {"size": 4, "workers": [w(10, here), w(10, "b"), w(14, "b")]}
    expected, starting, lost = other_hosts(half, "p", {10}, 1, events, young=True, here=here, now=114)
    assert (expected, starting) == (4, 0), "known losses are not starting, even for a young broker"
    assert [str(x) for x in lost] == ["host b: 1 exited 54s ago"], "one missing: the newest loss"
    fewer = {**half, "workers": half["workers"][:2]}
    lost = other_hosts(fewer, "p", {10}, 1, events, young=True, here=here, now=114)[2]
    assert [str(x) for x in lost] == ["host b: 1 stopped answering heartbeats 1m4s ago", "host b: 1 exited 54s ago"]
    verdict = pool_state("p", PoolFacts(expected=4, up=3, here=1, lost=tuple(lost)))
    assert verdict.state == State.DEGRADED
    assert verdict.reasons[0].startswith("p has 3/4 workers ready (1 here, 3 expected from other hosts); host b: ")
    assert other_hosts(half, "p", {10}, 1, [], young=True, here=here)[1] == 1, "unheard of yet: starting"
    assert other_hosts(half, "p", {10}, 1, [], young=False, here=here)[1] == 0
    assert other_hosts({"size": 0, "workers": []}, "p", set(), 2, [], young=False, here=here)[0] == 2, \
        "a group bigger than size: the group"


def test_a_down_pool_names_the_requests_waiting_for_a_worker() -> None:
    down = pool_state("p", PoolFacts(expected=2, up=0, broken=2, queued=5, queue_max=5, queue_timeout=20))
    assert down.state is State.DOWN
    assert down.reasons == [("p has no ready worker (0/2); 5 queued request(s) wait for one "
                             "(queue_timeout after 20s)")], down.reasons
    assert pool_state("p", PoolFacts(expected=2, up=0, broken=2)).reasons == ["p has no ready worker (0/2)"]


def test_a_worker_still_importing_dspy_is_starting_not_ready() -> None:
    """Registered, but whether its dspy import works is not known yet: STARTING (as pools start
    waits for it), then OK, or DEGRADED with its problem once the import is over."""
    def verdict(*workers: dict[str, Any]) -> State:
        pool = {"workers": list(workers), "size": 2}
        up = sum(1 for w in workers if w["state"] in ("ready", "busy"))
        return pool_state("p", facts_from_status(pool, expected=2, up=up)).state

    ready = {"state": "ready", "pid": 1}
    importing = {"state": "ready", "pid": 2, "preparing": True}
    assert verdict(ready, importing) is State.STARTING
    assert verdict(dict(importing, pid=1), importing) is State.STARTING, "not DOWN: nothing failed yet"
    assert verdict(ready, dict(ready, pid=2)) is State.OK
    assert verdict(ready, dict(ready, pid=2, problem="cannot import dspy: ImportError: x")) is State.DEGRADED


def test_supervisords_view_is_taken_between_two_broker_reads_that_agree() -> None:
    """A recycle that begins between the broker's read and supervisord's (the replacement's new pid
    already there) must not show as a worker nobody replaces: both are read again until the broker's
    workers are the same on either side of supervisord's read."""
    def status(recycling: str | None, *workers: tuple[str, int, str]) -> dict[str, Any]:
        return {"pools": {"p": {"recycling": recycling, "workers": [
            {"incarnation": i, "pid": pid, "state": st, "preparing": False} for i, pid, st in workers]}}}

    before = status(None, ("w1", 1, "ready"), ("w2", 2, "ready"))
    during = status("w1", ("w2", 2, "busy"))
    later = [during, status("w1", ("w2", 2, "ready"))]  # busy or ready: both up, the same shape
    procs_then = [[{"pid": 3}, {"pid": 2}]]
    broker, procs = agreeing_views(before, [{"pid": 3}, {"pid": 2}], lambda: later.pop(0), lambda: procs_then.pop(0))
    assert broker["pools"]["p"]["recycling"] == "w1" and procs == [{"pid": 3}, {"pid": 2}] and not later
    # unchanged across the read: one more broker read, supervisord's view kept
    broker, procs = agreeing_views(before, [{"pid": 1}, {"pid": 2}], lambda: before, lambda: pytest.fail("read again"))
    assert broker is before and procs == [{"pid": 1}, {"pid": 2}]
    # a broker that stops answering: the pair read last
    assert agreeing_views(before, [], lambda: None, list) == (before, [])
    # a broker whose workers change at every read: bounded, the last pair
    reads = iter(status(str(n), ("w", n, "ready")) for n in range(100))
    broker, _ = agreeing_views(before, [], lambda: next(reads), list)
    assert broker["pools"]["p"]["recycling"] == str(AGREEMENT_TRIES - 1)


def test_worst_orders_by_severity() -> None:
    assert worst([]) == State.OK
    assert worst([State.OK, State.STARTING]) == State.STARTING
    assert worst([State.STARTING, State.WARN]) == State.WARN
    assert worst([State.DOWN, State.DEGRADED, State.WARN]) == State.DOWN
    assert worst([State.DOWN, State.UNREACHABLE]) == State.UNREACHABLE


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "abc"])
def test_timeout_is_validated(value: str) -> None:
    res = subprocess.run([sys.executable, "-m", "dspexctl", "--timeout", value, "pools", "status"],
                         capture_output=True, text=True, timeout=60, cwd="/tmp", env=base_env())
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"Invalid value for '--timeout': '{value}' is not a" in res.stderr
    no_traceback(res)


# -- real stacks ---------------------------------------------------------------------------------
def status(stack: SupervisedStack, *args: str) -> tuple[int, dict[str, Any], str]:
    doc_res = dspexctl(stack, "pools", "status", "--json", *args)
    text_res = dspexctl(stack, "pools", "status", *args)
    no_traceback(doc_res)
    no_traceback(text_res)
    return doc_res.returncode, json.loads(doc_res.stdout), text_res.stdout


def row(text: str, pool: str) -> list[str]:
    return next(line.split() for line in text.splitlines() if line.startswith(pool + " "))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_start_up_is_starting_not_a_problem() -> None:
    stack = SupervisedStack(small_conf_text(POOLS))
    try:
        stack.start_foreground()
        wait_for(lambda: stack.processes(), 30, 0.05, "supervisord answering")
        seen: list[tuple[int, str, list[str]]] = []
        deadline = time.monotonic() + 120
        while True:
            res = dspexctl(stack, "pools", "status", "--json")
            no_traceback(res)
            doc = json.loads(res.stdout)
            seen.append((res.returncode, doc["health"], doc["problems"]))
            if res.returncode == 0 or time.monotonic() > deadline:
                break
            stack.processes()  # keep supervisord's loop prompt
        codes = {rc for rc, _, _ in seen}
        assert codes <= {0, 7}, seen
        assert 7 in codes, f"start-up was never seen as STARTING: {seen}"
        assert seen[-1][0] == 0, seen
        assert all(problems == [] for _, _, problems in seen), seen
        assert {health for _, health, _ in seen} <= {"starting", "ok"}
    finally:
        stack.stop()
        stack.cleanup()


@pytest.fixture(scope="module")
def small() -> Iterator[SupervisedStack]:
    stack = SupervisedStack(small_conf_text(POOLS, analytics_pool={"queue_max": "2"}))
    try:
        stack.start_foreground()

        def ready() -> bool:
            stack.processes()
            return all(len(stack.ready(p)) == n for p, n in POOLS.items())

        wait_for(ready, 120, 0.1, "the small stack ready")
        yield stack
    finally:
        stack.stop()
        stack.cleanup()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_no_data_is_a_dash_not_zero(small: SupervisedStack) -> None:
    rc, doc, text = status(small, "analytics_pool")
    assert rc == 0, text
    pool = doc["pools"][0]
    assert pool["latency_p50_ms"] is None and pool["latency_p99_ms"] is None
    r = row(text, "analytics_pool")
    assert r[9:12] == ["-", "-", "OK"], text
    assert "0.0ms" not in text
    with small.client() as dx:
        assert dx.call("operator", "add", [1, 2], pool="analytics_pool") == 3
    rc, doc, text = status(small, "analytics_pool")
    assert doc["pools"][0]["latency_p50_ms"] > 0
    assert row(text, "analytics_pool")[9].endswith(("ms", "s"))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_workers_are_listed_by_process_name_whatever_order_they_registered_in(small: SupervisedStack) -> None:
    first = "triage_pool:triage_pool_00"
    old = {w["pid"] for w in small.ready("triage_pool")}
    small.rpc("supervisor.stopProcess", first)
    small.rpc("supervisor.startProcess", first)  # it registers again after triage_pool_01

    def registered_again() -> bool:
        small.processes()
        ready = small.ready("triage_pool")
        return len(ready) == 2 and {w["pid"] for w in ready} != old

    wait_for(registered_again, 60, 0.1, "triage_pool_00 registered again")
    assert [w["pid"] for w in small.ready("triage_pool")][-1] not in old  # the broker's order: _00 last
    rc, doc, text = status(small, "triage_pool", "-v")
    assert rc == 0, text
    assert [w["process"] for w in doc["pools"][0]["workers"]] == [first, "triage_pool:triage_pool_01"], doc
    rows = [line.split()[0] for line in text.splitlines() if line.strip().startswith("triage_pool:")]
    assert rows == [first, "triage_pool:triage_pool_01"], text


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_pool_without_a_ready_worker_is_down(small: SupervisedStack) -> None:
    res = dspexctl(small, "pools", "stop", "analytics_pool")
    assert res.returncode == 0, res.stdout + res.stderr
    rc, doc, text = status(small)
    assert rc == 5, text
    assert doc["health"] == "down"
    assert {p["name"]: p["health"] for p in doc["pools"]} == {"triage_pool": "ok", "analytics_pool": "down"}
    assert row(text, "analytics_pool")[-1] == "DOWN"
    assert "DOWN: analytics_pool has no ready worker (0/1)" in text
    # one of two down is DEGRADED (exit 3), a different state and code
    with small.supervisor() as sup:
        sup.call("supervisor.stopProcess", "triage_pool:triage_pool_01", True)
    rc, doc, text = status(small, "triage_pool")
    assert rc == 3 and doc["pools"][0]["health"] == "degraded", text
    assert "triage_pool:triage_pool_01 is STOPPED" in text
    res = dspexctl(small, "pools", "start")
    assert res.returncode == 0, res.stdout + res.stderr
    rc, doc, text = status(small)
    assert rc == 0, text


def pool_views(stack: SupervisedStack) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each pool as the dashboard's ``/api/status`` and as ``pools status --json`` present it, in
    the fields both have: counts, state, reasons, each worker's process and phase."""
    dash = dashboard_status(stack)["pools"]
    res = dspexctl(stack, "pools", "status", "--json")
    no_traceback(res)
    cli = {p["name"]: p for p in json.loads(res.stdout)["pools"]}
    processes = [f"{p['group']}:{p['name']} is " for p in stack.processes()]

    def verdict(reasons: list[str]) -> list[str]:  # without the lines of single processes
        return [r for r in reasons if not r.startswith(tuple(processes))]

    def workers(ws: list[dict[str, Any]], registered: Any) -> list[tuple[Any, ...]]:
        return sorted(((w["pid"] or 0, w["process"], bool(registered(w)), w.get("phase")) for w in ws), key=str)

    return ({name: {"expected": p["expected"], "up": p["up"], "state": p["state"], "reasons": verdict(p["reasons"]),
                    "workers": workers(p["workers"], lambda w: w["registered"])} for name, p in dash.items()},
            {name: {"expected": p["expected"], "up": p["ready"] + p["busy"], "state": p["health"],
                    "reasons": verdict(p["reasons"]), "workers": workers(p["workers"], lambda w: w["id"] is not None)}
             for name, p in cli.items()})


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_dashboard_and_pools_status_agree_on_each_pool(small: SupervisedStack) -> None:
    """One definition of a pool's status: the dashboard's JSON and the CLI's give the same counts,
    state, reasons and processes, with every worker up and with a pool stopped and a worker of
    another stopped (once the dashboard's one-second process cache has seen the stop)."""
    dash, cli = pool_views(small)
    assert dash == cli and {p["state"] for p in dash.values()} == {"ok"}, (dash, cli)
    assert dspexctl(small, "pools", "stop", "analytics_pool").returncode == 0
    with small.supervisor() as sup:
        sup.call("supervisor.stopProcess", "triage_pool:triage_pool_01", True)
    try:
        wait_for(lambda: dashboard_status(small)["pools"]["triage_pool"]["state"] == "degraded", 15, 0.2,
                 "the dashboard seeing the stopped worker")
        dash, cli = pool_views(small)
        assert dash == cli, (dash, cli)
        assert (dash["analytics_pool"]["state"], dash["triage_pool"]["state"]) == ("down", "degraded"), dash
        assert [w[3] for w in dash["triage_pool"]["workers"] if not w[2]] == ["broken"], dash
    finally:
        res = dspexctl(small, "pools", "start")
        assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_broker_that_accepts_but_does_not_answer_is_a_timeout_named(small: SupervisedStack) -> None:
    """This stack's broker, where dspexctl looks, but hung (here: SIGSTOP): exit 8 as for every
    command that waits past --timeout, saying it accepts connections and does not answer and what
    its process is doing, not "another stack's conf or run directory" (exit 4)."""
    broker_pid = small.status()["broker"]["pid"]
    wait_for(lambda: small.status()["broker"]["uptime_s"] > 21, 30, 0.5, "the broker past its start-up")
    env = {k: v for k, v in small.env.items() if k != "DSPEX_SUPERVISOR_CONF"}
    # both at once, so the broker is stopped well under the workers' liveness (3 s): past it they
    # would renew their sockets, and the stack would not be the same for the next test
    runs = [subprocess.Popen([sys.executable, "-m", "dspexctl", "--timeout", "1", "pools", "status", *extra],
                             cwd=small.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for extra in (["--json"], [])]
    os.kill(broker_pid, signal.SIGSTOP)
    try:
        outs = [run.communicate(timeout=60) for run in runs]
    finally:
        os.kill(broker_pid, signal.SIGCONT)
    doc_res, text_res = (subprocess.CompletedProcess(r.args, r.returncode, out, err) for r, (out, err) in zip(runs, outs))
    for res in (doc_res, text_res):
        no_traceback(res)
        assert res.returncode == 8, res.stdout + res.stderr
    assert json.loads(doc_res.stdout)["health"] == "unreachable"
    line = next(ln for ln in text_res.stdout.splitlines() if ln.startswith("UNREACHABLE: "))
    assert line.startswith(f"UNREACHABLE: the broker broker:broker of {small.conf} (pid {broker_pid}, RUNNING for "), line
    assert line.endswith(f"accepts connections at {small.endpoint} but did not answer within 1s: its process is "
                         f"stopped (a SIGSTOP or a debugger; kill -CONT {broker_pid} resumes it)"), line
    assert "another stack" not in line, line
    wait_for(lambda: small.status(), 15, 0.2, "the broker answering again")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_another_brokers_endpoint_is_named(small: SupervisedStack) -> None:
    """dspexctl talks to the broker at its endpoint; when that is not this supervisord's broker, say so.
    Its pools are as that broker has them (no worker registered there: DOWN, however long this
    supervisord's workers have run), and this supervisord's workers are not blamed for not
    registering with a broker they never were meant for."""
    other_dir = str(small.root / "o")
    env = {**small.env, "DSPEX_RUN_DIR": other_dir}
    log = open(small.root / "other-broker.log", "wb")  # noqa: SIM115 - the child process holds it
    other = subprocess.Popen([sys.executable, "-m", "broker", "--config", str(small.conf), "--metrics-port", "0"],
                             cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        wait_for(lambda: os.path.exists(f"{other_dir}/frontend.sock"), 30, 0.05, "the other broker's socket")
        ours = small.status()["broker"]["pid"]
        named = (f"another stack is using this run directory {other_dir}: the broker there (pid {other.pid}) is not "
                 f"this supervisord's broker (pid {ours}, which listens at {small.endpoint}); it was started with "
                 f"{small.conf}; run this command with DSPEX_RUN_DIR={small.run_dir} (or --endpoint {small.endpoint}), "
                 f"or stop that broker (kill {other.pid})")
        res = dspexctl(small, "--endpoint", f"ipc://{other_dir}/frontend.sock", "pools", "status")
        no_traceback(res)
        assert res.returncode == 5, res.stdout
        assert f"DEGRADED: {named}" in res.stdout, res.stdout
        assert "DOWN: triage_pool has no ready worker" in res.stdout
        assert "not registered" not in res.stdout and "unregistered" not in res.stdout
        # the same rule where a command refuses: pools start joins no other broker (never waits its --wait out)
        res = dspexctl(small, "--endpoint", f"ipc://{other_dir}/frontend.sock", "pools", "start", "--wait", "30")
        no_traceback(res)
        assert res.returncode == 2 and res.stderr.splitlines()[-1] == f"Error: {named}", res.stdout + res.stderr
    finally:
        other.send_signal(signal.SIGTERM)
        try:
            other.wait(timeout=15)
        except subprocess.TimeoutExpired:
            other.kill()
            other.wait()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_running_broker_in_another_run_dir_is_named_not_starting(small: SupervisedStack) -> None:
    """This shell's DSPEX_RUN_DIR is not the stack's: the broker runs (supervisord says so) but
    listens elsewhere. Said at once, with both values and the fix; never "starting", never "is the
    broker running?"."""
    other = str(small.root / "elsewhere")
    env = {**small.env, "DSPEX_RUN_DIR": other}
    env.pop("DSPEX_SUPERVISOR_CONF", None)

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([sys.executable, "-m", "dspexctl", *args], cwd=small.root, env=env,
                             capture_output=True, text=True, timeout=60)
        no_traceback(res)
        return res

    broker_pid = small.status()["broker"]["pid"]
    want = (f"supervisord of {small.conf} reports its broker broker:broker RUNNING (pid {broker_pid}), but it "
            f"listens at {small.endpoint}, not at ipc://{other}/frontend.sock: another DSPEX_RUN_DIR: the broker's "
            f"is {small.run_dir}, this command's DSPEX_RUN_DIR={other}; run it with DSPEX_RUN_DIR={small.run_dir}")
    res = ctl("pools", "status")
    assert res.returncode == 4, res.stdout + res.stderr
    assert f"UNREACHABLE: {want}" in res.stdout, res.stdout
    doc = json.loads(ctl("pools", "status", "--json").stdout)
    assert doc["health"] == "unreachable" and doc["starting"] == []
    for args in (["sessions", "list"], ["workers", "recycle", "triage_pool"], ["sessions", "close", "--all"]):
        res = ctl(*args)
        assert res.returncode == 4, (args, res.stderr)
        assert res.stderr.startswith(f"Error: nothing is listening at ipc://{other}/frontend.sock")
        assert want in res.stderr and res.stderr.count("\n") == 1, res.stderr
    for res in (ctl("pools", "status"), ctl("sessions", "list")):
        for misleading in ("is the broker running", "STARTING", "the broker is starting", "chmod",
                           "DEGRADED: broker:broker is RUNNING"):
            assert misleading not in res.stdout + res.stderr

    # the broker where we look, but silent past its start-up grace (here: its socket file moved away)
    from dspexctl.diagnose import BROKER_GRACE_S

    wait_for(lambda: small.status()["broker"]["uptime_s"] > BROKER_GRACE_S + 1, 60, 0.5, "the broker past its grace")
    sock = small.endpoint[len("ipc://"):]
    os.rename(sock, sock + ".away")
    try:
        res = dspexctl(small, "pools", "status")
    finally:
        os.rename(sock + ".away", sock)
    assert res.returncode == 4, res.stdout
    assert "reports its broker broker:broker RUNNING" in res.stdout, res.stdout
    # it still holds the socket bound at that path: the file was moved away, not another stack's
    assert f"its socket file {sock} was deleted (or moved) while it ran" in res.stdout, res.stdout
    assert "STARTING" not in res.stdout and "DEGRADED: broker:broker is RUNNING" not in res.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_nearly_full_queue_warns(small: SupervisedStack) -> None:
    """analytics_pool: one worker, queue_max 2. One long call runs, two wait: the queue is full."""
    answers: list[Any] = []

    def call() -> None:
        with small.client(90) as dx:
            answers.append(dx.call("time", "sleep", [10], pool="analytics_pool"))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for th in threads:
        th.start()
    try:
        wait_for(lambda: small.status()["pools"]["analytics_pool"]["queued"] == 2, 20, 0.05, "two queued calls")
        res = dspexctl(small, "pools", "status", "analytics_pool")
        no_traceback(res)
        assert res.returncode == 6, res.stdout
        assert row(res.stdout, "analytics_pool")[-1] == "WARN"
        assert "WARN: analytics_pool queue is 2/2 full (pool_saturated at 2)" in res.stdout
        # --json has the lines the text shows under the table, with the pool each is about
        doc = json.loads(dspexctl(small, "pools", "status", "analytics_pool", "--json").stdout)
        reason = "analytics_pool queue is 2/2 full (pool_saturated at 2)"
        assert reason in doc["pools"][0]["reasons"], doc["pools"][0]
        assert {"state": "warn", "text": reason, "pool": "analytics_pool"} in doc["issues"], doc["issues"]
    finally:
        for th in threads:
            th.join(60)
    assert answers == [None, None, None], "every queued call was answered"
    rc, doc, text = status(small, "analytics_pool")
    assert rc == 0 and doc["pools"][0]["queued"] == 0, text


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_invalid_dspex_config_still_shows_supervisords_view() -> None:
    stack = SupervisedStack(small_conf_text({"triage_pool": 1}, triage_pool={"queue_max": "banana"}))
    try:
        stack.start_foreground()
        wait_for(lambda: any(p["name"] == "broker" and p["statename"] == "FATAL" for p in stack.processes()),
                 60, 0.1, "the broker FATAL on its bad config")
        res = dspexctl(stack, "pools", "status")
        no_traceback(res)
        assert res.returncode == 4, res.stdout + res.stderr
        assert "invalid dspex config" in res.stdout and "queue_max" in res.stdout
        assert "supervisord: RUNNING" in res.stdout
        assert any(ln.split()[:2] == ["broker:broker", "FATAL"] for ln in res.stdout.splitlines()), res.stdout
        assert "triage_pool:triage_pool_00" in res.stdout
        doc = json.loads(dspexctl(stack, "pools", "status", "--json").stdout)
        assert doc["health"] == "unreachable"
        assert [p["name"] for p in doc["pools"]] == ["triage_pool"]
    finally:
        for pid in list(stack.child_pids):
            if not pid_alive(pid):
                stack.child_pids.discard(pid)
        stack.stop()
        stack.cleanup()
