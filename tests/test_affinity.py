"""The affinity table of the brief, row by row, on a real broker and real workers."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import dspex
import dspex.aio
from tests.harness import Stack, wait_for

pytestmark = pytest.mark.timeout(60)


def pid_of(s: dspex.Session) -> int:
    return int(s.call("os", "getpid"))


def busy_in_background(s: dspex.Session, seconds: float) -> threading.Thread:
    t = threading.Thread(target=s.call, args=("time", "sleep", [seconds]), daemon=True)
    t.start()
    return t


def wait_busy(stack: Stack, pool: str, worker: str) -> None:
    wait_for(lambda: any(w["incarnation"] == worker and w["state"] == "busy" for w in stack.workers(pool)),
             what=f"worker {worker[:8]} busy")


def test_new_sessions_spread_least_loaded(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    a, b = dx.session("p"), dx.session("p")
    assert pid_of(a) != pid_of(b), "two new sessions must land on different workers"
    assert a.worker and b.worker and a.worker != b.worker


def test_strict_queue_idle_runs_on_pinned_worker(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    s = dx.session("p")
    pids = {pid_of(s) for _ in range(20)}
    assert len(pids) == 1


def test_strict_queue_busy_waits_in_that_workers_queue(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    s = dx.session("p")
    pinned = pid_of(s)
    t = busy_in_background(s, 1.0)
    wait_busy(stack, "p", s.worker)
    started = time.monotonic()
    assert pid_of(s) == pinned  # waited, then ran on the same worker, although another was idle
    assert time.monotonic() - started > 0.3
    t.join(5)


def test_strict_queue_timeout(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue:queue_timeout=0.3", 1, "--no-dspy")
    s = dx.session("p")
    s.call("os", "getpid")
    t = busy_in_background(s, 2.0)
    wait_busy(stack, "p", s.worker)
    with pytest.raises(dspex.QueueTimeout):
        s.call("os", "getpid")
    t.join(5)


@pytest.mark.parametrize("depth", [1, 2])
def test_prefetched_request_past_its_queue_deadline_times_out_on_the_worker_and_never_runs(
        stack: Stack, tmp_path: Path, depth: int) -> None:
    """Prefetch (on by default) sends pinned requests to a capacity-1 worker behind a short-looking
    call (up to ``prefetch`` of them); when that call turns out long, the worker answers
    QueueTimeout to each at its queue deadline without running it."""
    stack.pool(f"p:strict_queue:queue_timeout=0.4,prefetch={depth}", 1, "--no-dspy")

    async def attempt(n: int) -> list[str]:
        async with dspex.aio.connect(stack.frontend, timeout=20) as dx:
            long, victims = dx.session("p"), [dx.session("p") for _ in range(depth)]
            for _ in range(3):  # quick calls: the broker learns this worker's calls are short
                await long.call("os", "getpid")
            markers = [tmp_path / f"ran-{n}-{i}" for i in range(depth)]
            first = asyncio.ensure_future(long.call("time", "sleep", [1.2]))
            await asyncio.sleep(0)  # its send is under way first: the long call reaches the worker first
            results = await asyncio.gather(first, *(v.call("os", "mkdir", [str(m)]) for v, m in zip(victims, markers)),
                                           return_exceptions=True)
            for r in results[1:]:
                assert isinstance(r, dspex.QueueTimeout), r
            assert not any(m.exists() for m in markers), "a request that timed out in the queue ran"
            return [str(r.message) for r in results[1:]]  # type: ignore[union-attr]

    # prefetch only happens when the victims reach the broker within 10 ms of the first call's
    # dispatch: on a loaded machine that may take a few tries (each try checks the semantics)
    def all_prefetched(messages: list[str]) -> bool:
        return all("on this worker" in m for m in messages)

    tries = [asyncio.run(attempt(0))]
    while not all_prefetched(tries[-1]) and len(tries) < 8:
        tries.append(asyncio.run(attempt(len(tries))))
    assert all_prefetched(tries[-1]), tries


@pytest.mark.parametrize("mode", ["strict_queue", "strict_fail_fast"])
def test_strict_pinned_worker_gone(stack: Stack, mode: str) -> None:
    dx = stack.pool(f"p:{mode}", 2, "--no-dspy")
    s = dx.session("p")
    pid = pid_of(s)
    stack.kill(pid)
    wait_for(lambda: len(stack.workers("p")) == 1, what="dead worker dropped")
    with pytest.raises(dspex.SessionWorkerUnavailable):
        s.call("os", "getpid")
    with pytest.raises(dspex.SessionWorkerUnavailable):  # and it stays so: no silent re-pin
        s.call("os", "getpid")
    # the other sessions are untouched
    other = dx.session("p")
    assert pid_of(other) != pid


def test_strict_fail_fast_busy(stack: Stack) -> None:
    dx = stack.pool("p:strict_fail_fast", 2, "--no-dspy")
    s = dx.session("p")
    s.call("os", "getpid")
    t = busy_in_background(s, 1.0)
    wait_busy(stack, "p", s.worker)
    started = time.monotonic()
    with pytest.raises(dspex.WorkerBusy):
        s.call("os", "getpid")
    assert time.monotonic() - started < 0.5, "fail-fast must not wait"
    t.join(5)


def test_hint_busy_runs_on_another_worker(stack: Stack) -> None:
    dx = stack.pool("p:hint", 2, "--no-dspy")
    s = dx.session("p")
    pinned = pid_of(s)
    t = busy_in_background(s, 1.0)
    wait_busy(stack, "p", s.worker)
    assert pid_of(s) != pinned
    t.join(5)


def test_hint_gone_repins(stack: Stack) -> None:
    dx = stack.pool("p:hint", 2, "--no-dspy")
    s = dx.session("p")
    pid = pid_of(s)
    stack.kill(pid)
    new_pid = wait_for(lambda: pid_of(s), what="re-pinned call")
    assert new_pid != pid
    assert {pid_of(s) for _ in range(5)} == {new_pid}


def test_none_runs_anywhere(stack: Stack) -> None:
    dx = stack.pool("p:none", 2, "--no-dspy")
    s = dx.session("p")
    with ThreadPoolExecutor(2) as ex:
        pids = set(ex.map(lambda _: s.eval("__import__('time').sleep(0.5) or __import__('os').getpid()"), range(2)))
    assert len(pids) == 2, "mode none spreads one session's concurrent calls"


def test_pool_saturated(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue:queue_max=1", 1, "--no-dspy")
    s = dx.session("p")
    s.call("os", "getpid")
    t = busy_in_background(s, 1.5)
    wait_busy(stack, "p", s.worker)
    queued = threading.Thread(target=lambda: s.call("os", "getpid"), daemon=True)
    queued.start()
    wait_for(lambda: stack.workers("p")[0]["queued"] == 1, what="one queued")
    with pytest.raises(dspex.PoolSaturated):
        s.call("os", "getpid")
    t.join(5)
    queued.join(5)


def test_pool_not_found(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    with pytest.raises(dspex.PoolNotFound):
        dx.session("nope").call("os", "getpid")
    with pytest.raises(dspex.PoolNotFound):
        dx.call("os", "getpid", pool="nope")


def test_sessionless_call(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    assert dx.call("math", "hypot", [3, 4], pool="p") == 5.0
    ref = dx.call("builtins", "object", pool="p")
    assert isinstance(ref, dspex.Ref)
    s = dx.session("p")
    with pytest.raises(dspex.RefNotFound):
        s.method(ref, "__repr__")


def test_concurrent_threads_keep_affinity(stack: Stack) -> None:
    """8 threads on 4 sessions: every call answered, each on its session's pinned worker."""
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    sessions = [dx.session("p") for _ in range(4)]
    pinned = {s.id: pid_of(s) for s in sessions}

    def drive(i: int) -> list[tuple[str, int]]:
        s = sessions[i % 4]
        return [(s.id, pid_of(s)) for _ in range(25)]

    with ThreadPoolExecutor(8) as ex:
        results = [r for batch in ex.map(drive, range(8)) for r in batch]
    assert len(results) == 200
    assert all(pinned[sid] == pid for sid, pid in results)
    assert len(set(pinned.values())) == 2


def test_sigterm_worker_says_goodbye(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    s = dx.session("p")
    pid = pid_of(s)
    stack.kill(pid, signal.SIGTERM)
    wait_for(lambda: len(stack.workers("p")) == 1, what="worker gone")
    with pytest.raises(dspex.SessionWorkerUnavailable):
        s.call("os", "getpid")
