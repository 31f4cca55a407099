"""Durable sessions moving between live workers through real processes: a worker that registers
takes its share (broker/spread.py) while calls, kills and broker restarts race the move."""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

import dspex
from tests.harness import Stack, wait_for

pytestmark = pytest.mark.timeout(120)


def pid_of(s: dspex.Session) -> int:
    return int(s.eval("__import__('os').getpid()"))


def test_a_call_left_running_by_a_broker_restart_ends_before_its_sessions_next_call_starts(
        stack: Stack, short_tmp: str) -> None:
    """A restarted broker does not know which session a call still running on a worker belongs
    to; on a worker of capacity 2 the session's next call ran beside it: it saw half of that call,
    and its full checkpoint kept that half, so after a kill the session came back with half of a
    call that may have run (all or nothing, docs/reliability.md)."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", "2")
    s = dx.session("p", durable=True)
    s.exec("log = []")
    pid = pid_of(s)
    started = os.path.join(short_tmp, "started")
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(s.exec, "log.append(1); open(path, 'w').close(); __import__('time').sleep(1.5); "
                                    "log.append(2)", {"path": started})
        wait_for(lambda: os.path.exists(started), what="the call half done")
        assert stack.broker is not None
        stack.kill(stack.broker)
        with pytest.raises(dspex.ConnectionError):
            first.result(10)
    stack.start_broker()
    stack.wait_workers("p", 1, client=dx)
    assert s.eval("list(log)") == [1, 2]  # after all of it, never beside it
    stack.kill(pid)
    stack.start_worker("p", "--no-dspy", "--capacity", "2")
    wait_for(lambda: pid not in {w["pid"] for w in stack.wait_workers("p", 1, client=dx)}, what="the replacement")
    assert s.eval("list(log)") == [1, 2]  # restored with all of it


@pytest.mark.slow  # it starts processes without a fixture conftest knows
def test_a_durable_call_left_running_by_a_broker_restart_frees_its_workers_slot_when_it_ends(short_tmp: str) -> None:
    """A restarted broker counts the calls a worker still runs for its predecessor (adopted) as
    taking slots; one that ends frees its slot at once. A durable session's call ends with its
    checkpoint and reply in one message (``W_CHECKPOINT``), which did not free it: the worker
    stayed busy until its next heartbeat (1 s by default), the pool's calls waiting for it."""
    stack = Stack(short_tmp, heartbeat=10.0)  # heartbeats far apart: only the call's end may free the slot soon
    try:
        dx = stack.pool("p:strict_queue", 1, "--no-dspy")
        s = dx.session("p", durable=True)
        s.exec("log = []")
        started, go = os.path.join(short_tmp, "started"), os.path.join(short_tmp, "go")
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(s.exec, "import os, time\nopen(started, 'w').close()\nt = time.monotonic() + 60\n"
                                          "while not os.path.exists(go) and time.monotonic() < t:\n    time.sleep(0.01)\n"
                                          "log.append(1)", {"started": started, "go": go})
            wait_for(lambda: os.path.exists(started), what="the call started")
            assert stack.broker is not None
            stack.kill(stack.broker)
            with pytest.raises(dspex.ConnectionError):
                running.result(10)
            stack.start_broker()
            (worker,) = stack.wait_workers("p", 1, 30, client=dx)
            assert worker["state"] == "busy"  # it still runs the call
            other = dx.session("p")
            queued = pool.submit(other.eval, "__import__('time').monotonic()")  # waits for the worker's slot
            wait_for(lambda: dx.status()["pools"]["p"]["queued"] == 1, what="the other session's call waiting")
            open(go, "w").close()
            ended = time.monotonic()  # (the worker's clock too: CLOCK_MONOTONIC)
            ran = queued.result(30)
        assert ran - ended < 1.0, f"the waiting call ran {ran - ended:.2f} s after the slot's call ended"
        assert s.eval("list(log)") == [1]
    finally:
        stack.close()


def _spread(stack: Stack, dx: dspex.Client, sessions: list[dspex.Session]) -> tuple[int, int]:
    """Start a second worker and wait until it has taken half of ``sessions`` (pinned only: each
    checkpoint loads at its session's next call); the pids of the old worker and the new one."""
    old = pid_of(sessions[0])
    new = stack.start_worker("p", "--no-dspy")
    stack.wait_workers("p", 2, client=dx)

    def even() -> bool:
        return sorted(Counter(row["worker"] for row in dx.sessions("p")).values()) == [len(sessions) // 2] * 2

    wait_for(even, what="the sessions spread over both workers")
    return old, new.pid


def test_a_spread_session_keeps_its_refs_and_the_identity_of_the_objects_behind_them(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    sessions = [dx.session("p", durable=True) for _ in range(4)]
    held = []
    for i, s in enumerate(sessions):
        s.exec("class Box:\n    def __init__(self, v): self.v = v\nbox = Box(i); outer = Box([box, box])", {"i": i})
        held.append((s.eval("box"), s.eval("outer")))
    old, new = _spread(stack, dx, sessions)
    for i, (s, (box, outer)) in enumerate(zip(sessions, held)):
        assert s.eval("(b.v, o.v[0] is o.v[1] is b is box)", {"b": box, "o": outer}) == (i, True)
    assert sorted(pid_of(s) for s in sessions) == sorted([old, old, new, new])


@pytest.mark.parametrize("killed", ["old", "new"])
def test_a_spread_whose_old_or_new_worker_dies_before_the_sessions_next_call_loses_nothing(
        stack: Stack, killed: str) -> None:
    """Pinned to the new worker, held by the old one, checkpoint not loaded yet: either dies."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    sessions = [dx.session("p", durable=True) for _ in range(4)]
    for i, s in enumerate(sessions):
        s.exec("log = [i]", {"i": i})
    old, new = _spread(stack, dx, sessions)
    victim, survivor = (old, new) if killed == "old" else (new, old)
    stack.kill(victim)
    wait_for(lambda: victim not in {w["pid"] for w in stack.workers("p", dx)}, what=f"worker {victim} gone")
    assert [s.eval("(log.append(9), log)[1]") for s in sessions] == [[i, 9] for i in range(4)]
    assert {pid_of(s) for s in sessions} == {survivor}


def test_a_broker_restart_mid_spread_never_runs_a_call_on_the_old_workers_copy(stack: Stack) -> None:
    """One session restored on the new worker and changed there, one still pinned there unloaded;
    the broker SIGKILLed and restarted; then the new worker killed: the old worker holds copies
    older than the store, and every session goes on from its last acknowledged state."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    sessions = [dx.session("p", durable=True) for _ in range(4)]
    for i, s in enumerate(sessions):
        s.exec("log = [i]", {"i": i})
    _, new = _spread(stack, dx, sessions)
    (incarnation,) = [w["incarnation"] for w in stack.workers("p", dx) if w["pid"] == new]
    rows = {r["id"]: r["worker"] for r in dx.sessions("p")}
    moved = [s for s in sessions if rows[s.id] == incarnation]
    assert len(moved) == 2 and pid_of(moved[0]) == new  # restored there; moved[1] stays unloaded
    expected = {s.id: [i] for i, s in enumerate(sessions)}
    for n, step in enumerate(("before", "restart", "kill"), 1):
        if step == "restart":
            assert stack.broker is not None
            stack.kill(stack.broker)
            stack.broker.wait()
            stack.start_broker()
            stack.wait_workers("p", 2, client=dx)
        elif step == "kill":
            stack.kill(new)
            wait_for(lambda: new not in {w["pid"] for w in stack.workers("p", dx)}, what="the new worker gone")
        for s in sessions:
            s.exec("log.append(n)", {"n": n})
            expected[s.id].append(n)
        assert {s.id: s.eval("log") for s in sessions} == expected, step
