"""Durable sessions in a pool under load, through real processes: a move that meets a full
queue, and where a pool's durable sessions go when its workers come back."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

import dspex
from tests.harness import Stack, wait_for

pytestmark = pytest.mark.timeout(120)


def pid_of(s: dspex.Session) -> int:
    return int(s.eval("__import__('os').getpid()"))


def test_a_move_that_meets_a_full_queue_is_pool_saturated_and_the_session_moves_later(stack: Stack) -> None:
    """Its worker gone and the pool's queue at ``queue_max``: the call did not run (retry), and
    the session is still durable; never ``SessionWorkerUnavailable``, the error durability ends."""
    dx = stack.pool("p:strict_queue:queue_max=1,prefetch=0", 2, "--no-dspy")
    s = dx.session("p", durable=True)
    s.exec("counter = 41")
    pid = pid_of(s)
    busy = dx.session("p")
    while pid_of(busy) == pid:  # a session on the other worker
        busy = dx.session("p")
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(busy.eval, "__import__('time').sleep(3)")
        wait_for(lambda: any(w["state"] == "busy" for w in stack.workers("p", dx)), what="the other worker busy")
        queued = pool.submit(busy.eval, "1")
        wait_for(lambda: dx.status()["pools"]["p"]["queued"] == 1, what="the pool's queue full")
        stack.kill(pid)
        wait_for(lambda: pid not in {w["pid"] for w in stack.workers("p", dx)}, what=f"worker {pid} gone")
        with pytest.raises(dspex.PoolSaturated):
            s.eval("counter + 1")
        assert running.result(30) is None and queued.result(30) == 1
    assert s.eval("counter + 1") == 42  # moved with its state once the queue had room
    (row,) = [r for r in dx.sessions("p") if r["id"] == s.id]
    assert row["durable"] is True


def test_a_replacement_worker_takes_its_share_of_the_durable_sessions(stack: Stack) -> None:
    """After a worker dies its durable sessions all move to the survivor; when the replacement
    registers, idle ones move on to it (each with its checkpoint at its next call), so the pool
    serves with both workers again. A session holding an object that cannot be durable stays
    where that object lives."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    sessions = [dx.session("p", durable=True) for _ in range(6)]
    for i, s in enumerate(sessions):
        s.exec("counter = i", {"i": i})
    with pytest.warns(dspex.NotDurableWarning):
        lock = sessions[0].call("threading", "Lock")
    pids = {pid_of(s) for s in sessions}
    assert len(pids) == 2
    (victim,) = pids - {pid_of(sessions[0])}
    stack.kill(victim)
    wait_for(lambda: victim not in {w["pid"] for w in stack.workers("p", dx)}, what=f"worker {victim} gone")
    survivor = {w["pid"] for w in stack.workers("p", dx)}.pop()
    assert [s.eval("counter") for s in sessions] == list(range(6))  # all moved to the survivor
    assert {pid_of(s) for s in sessions} == {survivor}
    replacement = stack.start_worker("p", "--no-dspy")
    stack.wait_workers("p", 2, client=dx)

    def spread() -> bool:
        return sorted(Counter(row["worker"] for row in dx.sessions("p")).values()) == [3, 3]

    wait_for(spread, what="the sessions spread over both workers")
    assert [s.eval("counter") for s in sessions] == list(range(6))  # each with its state
    where = [pid_of(s) for s in sessions]
    assert sorted(where) == sorted([survivor] * 3 + [replacement.pid] * 3)
    assert where[0] == survivor and sessions[0].eval("l.acquire(False)", {"l": lock}) is True
    assert dx.status()["pools"]["p"]["crashes"] == 1
