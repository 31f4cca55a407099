"""Durable sessions in a pool under load, through real processes: a move that meets a full
queue, and where a pool's durable sessions go when its workers come back."""

from __future__ import annotations

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
