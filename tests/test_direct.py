"""A ``direct`` pool (issue 14 prototype): after a session's first call pins it through the
broker, its calls go straight to the pinned worker, with the broker's semantics kept."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest

import dspex
from dspex.pools import parse_pool_spec
from tests.harness import Stack, wait_for

pytestmark = pytest.mark.timeout(60)


def pool_status(client: dspex.Client, pool: str = "p") -> dict[str, Any]:
    return dict(client.status(timeout=5)["pools"][pool])


def broker_calls(client: dspex.Client) -> int:
    """Worker calls the broker routed and saw answered (ok or error)."""
    st = pool_status(client)
    return int(st["requests_ok"]) + int(st["requests_error"])


def pinned(client: dspex.Client) -> dspex.Session:
    s = client.session("p")
    s.call("builtins", "len", [[]])  # through the broker: pins the session, teaches the endpoint
    assert s.worker in client._direct.endpoints, "the pinning reply carried no direct endpoint"
    return s


def test_pool_setting_parses() -> None:
    assert parse_pool_spec("p:strict_queue:direct=true").direct is True
    assert parse_pool_spec("p:strict_queue:direct=off").direct is False
    assert parse_pool_spec("p:strict_queue").direct is False
    with pytest.raises(dspex.DspexError):
        parse_pool_spec("p:strict_queue:direct=maybe")


def test_direct_calls_run_on_the_pinned_worker_and_skip_the_broker(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue:direct=true", 2, "--no-dspy")
    s = pinned(dx)
    worker_pid = int(s.call("os", "getpid"))
    routed = broker_calls(dx)
    pids = {int(s.call("os", "getpid")) for _ in range(30)}
    assert pids == {worker_pid}
    assert broker_calls(dx) == routed, "direct calls went through the broker's frontend"
    # the worker's heartbeats tell the broker what it did not see: status shows the direct calls
    me = wait_for(lambda: next((w for w in pool_status(dx)["workers"] if w["pid"] == worker_pid
                                and w["direct"]["served"] >= 31), None), 10, what="direct calls in status")
    assert me["direct"]["endpoint"] == dx._direct.endpoints[s.worker]
    assert me["served"] >= 32  # brokered + direct: what max_requests recycling counts


def test_a_pool_without_the_setting_stays_brokered(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    s.call("builtins", "len", [[]])
    assert not dx._direct.endpoints
    routed = broker_calls(dx)
    s.call("builtins", "len", [[]])
    assert broker_calls(dx) == routed + 1
    assert "direct" not in pool_status(dx)["workers"][0]


def test_sigkill_fails_the_running_call_then_the_session(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue:direct=true", 1, "--no-dspy")
    s = pinned(dx)
    pid = int(s.call("os", "getpid"))
    errors: list[BaseException] = []

    def long_call() -> None:
        try:
            s.call("time", "sleep", [30])
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            errors.append(exc)

    t = threading.Thread(target=long_call, daemon=True)
    t.start()
    wait_for(lambda: any(w["direct"]["running"] for w in pool_status(dx)["workers"]), 10, what="direct call running")
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    t.join(10)
    assert not t.is_alive()
    assert time.monotonic() - killed < 2.0, "the crash was not detected promptly"
    assert isinstance(errors[0], dspex.WorkerCrashed) and isinstance(errors[0], dspex.MayHaveRun)
    started = time.monotonic()
    with pytest.raises(dspex.SessionWorkerUnavailable):
        s.call("os", "getpid")
    assert time.monotonic() - started < 1.0


def test_the_worker_enforces_the_queue_deadline_of_direct_calls(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue:direct=true,queue_timeout=0.5", 1, "--no-dspy")
    a, b = pinned(dx), pinned(dx)
    assert a.worker == b.worker
    b.define([], name="ran")
    routed = broker_calls(dx)
    t = threading.Thread(target=a.call, args=("time", "sleep", [1.5]), daemon=True)
    t.start()
    wait_for(lambda: any(w["direct"]["running"] for w in pool_status(dx)["workers"]), 10, what="direct call running")
    with pytest.raises(dspex.QueueTimeout) as info:
        b.eval("ran.append(1)")  # waits behind a's call on the one queue, past 0.5 s
    assert isinstance(info.value, dspex.DidNotRun)
    t.join(10)
    assert b.eval("len(ran)") == 0
    assert broker_calls(dx) == routed  # the worker, not the broker, answered it


def test_session_close_releases_the_worker_state(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue:direct=true", 1, "--no-dspy")
    s = pinned(dx)
    s.define(list(range(10)), name="data")
    assert s.eval("sum(data)") == 45  # direct
    wait_for(lambda: pool_status(dx)["workers"][0]["held_sessions"] == 1, 10, what="session held")
    s.close()  # through the broker, which releases it on the worker
    wait_for(lambda: pool_status(dx)["workers"][0]["held_sessions"] == 0, 10, what="session released")
    # the same session id with the pin still known: the worker sends it back to the broker
    again = dx.session("p", s.id)
    again.worker = s.worker
    with pytest.raises(dspex.SessionClosed):
        again.eval("1")


def test_ttl_holds_while_only_direct_calls_use_the_session(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue:direct=true,session_ttl=1.5", 1, "--no-dspy")
    s = pinned(dx)
    s.define(7, name="x")
    until = time.monotonic() + 4.0
    while time.monotonic() < until:  # 4 s of direct calls only: well past the 1.5 s TTL
        assert s.eval("x") == 7
        time.sleep(0.3)
    assert any(r["id"] == s.id for r in dx.sessions("p"))
    # idle: the broker expires it and releases it on the worker; a late direct call is refused
    wait_for(lambda: not any(r["id"] == s.id for r in dx.sessions("p")), 10, what="session expired")
    with pytest.raises(dspex.SessionClosed):
        s.eval("x")


def test_max_requests_counts_direct_calls(stack: Stack) -> None:
    # two workers: the policy never recycles a pool's last one
    dx = stack.pool("p:strict_queue:direct=true,max_requests=20", 2, "--no-dspy")
    s = pinned(dx)
    pid = int(s.call("os", "getpid"))
    for _ in range(18):
        s.call("builtins", "len", [[]])
    # its heartbeats report the direct calls; the broker recycles it at the limit (once it is
    # older than the policy's minimum age)
    wait_for(lambda: all(w["pid"] != pid for w in pool_status(dx)["workers"]), 15, what="worker recycled")
    assert pool_status(dx)["recycles"] >= 1
    with pytest.raises(dspex.SessionWorkerUnavailable):
        s.call("os", "getpid")


def test_asyncio_client_calls_directly_and_sees_the_crash(stack: Stack) -> None:
    import asyncio

    import dspex.aio

    stack.pool("p:strict_queue:direct=true", 1, "--no-dspy")
    sync = stack.client()

    async def main() -> None:
        async with dspex.aio.connect(stack.frontend, timeout=20) as dx:
            sessions = [dx.session("p") for _ in range(5)]
            pids = set(await asyncio.gather(*(s.call("os", "getpid") for s in sessions)))  # brokered: pins
            assert all(s.worker in dx._direct.endpoints for s in sessions)
            routed = broker_calls(sync)
            for _ in range(5):
                pids |= set(await asyncio.gather(*(s.call("os", "getpid") for s in sessions)))
            assert len(pids) == 1
            assert broker_calls(sync) == routed, "direct calls went through the broker's frontend"
            running = asyncio.ensure_future(sessions[0].call("time", "sleep", [30]))
            await asyncio.sleep(0.3)
            killed = time.monotonic()
            os.kill(pids.pop(), signal.SIGKILL)
            with pytest.raises(dspex.WorkerCrashed):
                await asyncio.wait_for(running, 5)
            assert time.monotonic() - killed < 2.0
            with pytest.raises(dspex.SessionWorkerUnavailable):
                await sessions[1].call("os", "getpid")

    asyncio.run(main())


def test_close_while_direct_calls_run_and_wait_keeps_the_running_one_whole(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue:direct=true", 1, "--no-dspy")
    s = pinned(dx)
    s.define(41, name="x")
    results: dict[str, Any] = {}

    def run(key: str, expr: str) -> None:
        try:
            results[key] = s.eval(expr)
        except dspex.DspexError as err:
            results[key] = err

    running = threading.Thread(target=run, args=("running", "(__import__('time').sleep(1.5), x + 1)[1]"))
    running.start()
    wait_for(lambda: any(w["direct"]["running"] == 1 for w in pool_status(dx)["workers"]), 10, what="call running")
    waiting = threading.Thread(target=run, args=("waiting", "x"))
    waiting.start()
    wait_for(lambda: any(w["direct"]["running"] == 2 for w in pool_status(dx)["workers"]), 10, what="call queued")
    s.close()  # the broker releases at once: it does not see the direct calls
    running.join(10)
    waiting.join(10)
    assert results["running"] == 42  # its state stayed until it ended
    assert isinstance(results["waiting"], dspex.SessionClosed)  # not started: sent back, the broker says closed
    wait_for(lambda: pool_status(dx)["workers"][0]["held_sessions"] == 0, 10, what="session released")


def test_dspexctl_status_shows_the_direct_calls(stack: Stack) -> None:
    import json
    import subprocess
    import sys

    dx = stack.pool("p:strict_queue:direct=true", 1, "--no-dspy")
    s = pinned(dx)
    for _ in range(10):
        s.call("builtins", "len", [[]])
    wait_for(lambda: pool_status(dx)["workers"][0]["direct"]["served"] >= 10, 10, what="heartbeat")
    env = dict(stack.env, DSPEX_ENDPOINT=stack.frontend)
    env.pop("DSPEX_SUPERVISOR_CONF", None)
    res = subprocess.run([sys.executable, "-m", "dspexctl", "pools", "status", "--json"], cwd=stack.root, env=env,
                         capture_output=True, text=True, timeout=30)
    assert "Traceback" not in res.stderr, res.stderr
    doc = json.loads(res.stdout)
    pool = next(p for p in doc["pools"] if p["name"] == "p")
    worker = pool["workers"][0]
    assert worker["direct"]["served"] >= 10 and worker["served"] >= 11


def test_a_frozen_worker_fails_the_direct_call_after_the_silence_limit(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue:direct=true", 1, "--no-dspy")
    s = pinned(dx)
    pid = int(s.call("os", "getpid"))
    errors: list[BaseException] = []

    def long_call() -> None:
        try:
            s.call("time", "sleep", [30], timeout=40)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            errors.append(exc)

    t = threading.Thread(target=long_call, daemon=True)
    t.start()
    wait_for(lambda: any(w["direct"]["running"] for w in pool_status(dx)["workers"]), 10, what="direct call running")
    stopped = time.monotonic()
    os.kill(pid, signal.SIGSTOP)  # alive, connection open, silent: only heartbeats tell
    try:
        t.join(15)
        assert not t.is_alive()
        assert isinstance(errors[0], dspex.WorkerCrashed)
        assert time.monotonic() - stopped < 10.0  # the silence limit (1 s × 3 by default), not the call's 40 s
        with pytest.raises(dspex.SessionWorkerUnavailable):
            s.call("os", "getpid")
    finally:
        os.kill(pid, signal.SIGCONT)


def test_the_worker_bounds_waiting_direct_calls_by_queue_max(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue:direct=true,queue_max=1", 1, "--no-dspy")
    a, b, c = pinned(dx), pinned(dx), pinned(dx)
    threads = [threading.Thread(target=a.call, args=("time", "sleep", [1.5]), daemon=True),
               threading.Thread(target=b.call, args=("time", "sleep", [0]), daemon=True)]
    threads[0].start()
    wait_for(lambda: pool_status(dx)["workers"][0]["direct"]["running"] == 1, 10, what="a running")
    threads[1].start()
    wait_for(lambda: pool_status(dx)["workers"][0]["direct"]["running"] == 2, 10, what="b waiting")
    with pytest.raises(dspex.PoolSaturated):  # a second one waiting: over queue_max (did not run)
        c.call("builtins", "len", [[]])
    for t in threads:
        t.join(10)
    assert c.call("builtins", "len", [[]]) == 0


def test_a_clean_exit_removes_the_direct_socket_file(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue:direct=true", 1, "--no-dspy")
    s = pinned(dx)
    path = dx._direct.endpoints[s.worker][len("ipc://"):]
    assert os.path.exists(path)
    proc = stack.worker_procs[0]
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(15)
    assert not os.path.exists(path)
    with pytest.raises(dspex.SessionWorkerUnavailable):  # gone: the broker says so, as without direct
        s.call("os", "getpid")
