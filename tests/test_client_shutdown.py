"""A service's shutdown: closing a client with calls in flight on other threads or tasks ends each
of them at once with a typed error (and the broker cancels them on their workers); a process that
exits with open clients, streams and calls exits at once and quietly; a client garbage-collected
without ``close()``, even from inside a reference cycle, frees its sockets and never hangs the
process (each client's own zmq context, collected with its sockets, waited for them for ever)."""

from __future__ import annotations

import asyncio
import subprocess
import textwrap
import threading
import time
from typing import Any

import pytest

import dspex
import dspex.aio
from tests.harness import PY, Stack, base_env, wait_for

pytestmark = pytest.mark.timeout(120)

LONG_CALL = "__import__('time').sleep(30) or 'finished'"  # stopped by a cancel on a capacity-1 worker
PROMPT_S = 3.0


def _pool(stack: Stack, workers: int = 3) -> None:
    stack.pool("p:strict_queue", workers, "--no-dspy")


def _running(stack: Stack) -> int:
    return sum(int(w.get("inflight", 0)) for w in stack.workers("p"))


def _cancelled(stack: Stack) -> int:
    with dspex.connect(stack.frontend, timeout=5) as c:
        return int(c.status()["pools"]["p"]["outcomes"].get("eval:cancelled", 0))


def test_closing_a_sync_client_ends_the_calls_of_other_threads_and_futures_at_once(stack: Stack) -> None:
    _pool(stack, 4)
    dx = dspex.connect(stack.frontend, timeout=60)
    sessions = [dx.session("p") for _ in range(4)]
    for s in sessions:
        assert s.eval("1") == 1
    outcomes: list[BaseException | Any] = []

    def call(s: dspex.Session) -> None:
        try:
            outcomes.append(s.eval(LONG_CALL))
        except BaseException as exc:  # noqa: BLE001 - checked below
            outcomes.append(exc)

    threads = [threading.Thread(target=call, args=(s,)) for s in sessions[:2]]
    for t in threads:
        t.start()
    futures = [dx.submit(s.eval, LONG_CALL) for s in sessions[2:]]
    wait_for(lambda: _running(stack) == 4, timeout=10, what="four calls running")
    started = time.monotonic()
    dx.close()
    closed_in = time.monotonic() - started
    for t in threads:
        t.join(PROMPT_S)
    for f in futures:
        try:
            outcomes.append(f.result(PROMPT_S))
        except BaseException as exc:  # noqa: BLE001 - checked below
            outcomes.append(exc)
    assert closed_in < PROMPT_S, f"close() waited {closed_in:.1f}s for the calls in flight"
    assert len(outcomes) == 4 and all(isinstance(o, dspex.ConnectionLost) for o in outcomes), outcomes
    # the broker saw the sockets close and the workers stopped the calls
    wait_for(lambda: _running(stack) == 0 and _cancelled(stack) == 4, timeout=10, what="the calls cancelled")


def test_closing_an_asyncio_client_ends_the_tasks_awaiting_it_at_once(stack: Stack) -> None:
    _pool(stack)

    async def main() -> tuple[float, list[BaseException | Any]]:
        dx = dspex.aio.connect(stack.frontend, timeout=60)
        sessions = [dx.session("p") for _ in range(3)]
        await asyncio.gather(*(s.eval("1") for s in sessions))
        tasks = [asyncio.create_task(s.eval(LONG_CALL)) for s in sessions[:2]]
        stream = sessions[2].stream_eval("__import__('itertools').count()")
        assert await stream.__anext__() == 0
        streaming = asyncio.create_task(stream.__anext__())  # waits for an item (credit flow)
        tasks.append(asyncio.create_task(_drain(stream, streaming)))
        await asyncio.to_thread(wait_for, lambda: _running(stack) == 3, 10, 0.02, "three calls running")
        await dx.close()
        started = time.monotonic()
        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        return time.monotonic() - started, list(done)

    waited, outcomes = asyncio.run(main())
    assert waited < PROMPT_S, f"tasks waited {waited:.1f}s after close(): {outcomes}"
    assert all(isinstance(o, dspex.ConnectionLost) for o in outcomes), outcomes
    wait_for(lambda: _running(stack) == 0, timeout=10, what="the calls cancelled")


async def _drain(stream: Any, first: asyncio.Task[Any]) -> None:
    await first
    async for _ in stream:
        pass


CYCLE_SCRIPT = textwrap.dedent("""
    import asyncio, gc, sys
    import dspex, dspex.aio

    class Service:  # a bound method kept on the instance: the client sits in a reference cycle
        def __init__(self, client):
            self.dx = client
            self.handler = self.handle

        def handle(self, x):
            return self.dx.session("p").eval("x", {"x": x})

    for i in range(3):
        svc = Service(dspex.connect(sys.argv[1], timeout=10))
        assert svc.handler(i) == i
        del svc
        gc.collect()
    print("sync collected", flush=True)

    async def one(i):
        dx = dspex.aio.connect(sys.argv[1], timeout=10)  # never closed
        assert await dx.session("p").eval("x", {"x": i}) == i

    for i in range(3):
        asyncio.run(one(i))
        gc.collect()
    print("aio collected", flush=True)
""")


def test_a_client_collected_without_close_never_hangs_the_process(stack: Stack, tmp_path: Any) -> None:
    _pool(stack, 1)
    script = tmp_path / "cycle.py"
    script.write_text(CYCLE_SCRIPT)
    try:
        done = subprocess.run([PY, str(script), stack.frontend], capture_output=True, text=True, timeout=40,
                              env=base_env())
    except subprocess.TimeoutExpired as exc:  # subprocess.run killed it (by its pid)
        raise AssertionError(f"the process hung collecting a client: {exc.stdout!r}") from None
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["sync collected", "aio collected"]
    assert "Traceback" not in done.stderr, done.stderr


EXIT_SCRIPT = textwrap.dedent("""
    import asyncio, sys, threading, time
    import dspex, dspex.aio

    endpoint, mode = sys.argv[1], sys.argv[2]
    dx = dspex.connect(endpoint, timeout=60)
    stream = dx.session("p").stream_eval("__import__('itertools').count()")
    next(stream)
    if mode == "thread":  # a call in flight on a daemon thread at exit
        threading.Thread(target=dx.session("p").eval, args=(sys.argv[3],), daemon=True).start()
    if mode == "aio":  # asyncio.run returns with a call and a stream still awaited
        async def main():
            a = dspex.aio.connect(endpoint, timeout=60)
            agen = a.session("p").stream_eval("__import__('itertools').count()")
            await agen.__anext__()
            globals()["left"] = (agen, asyncio.create_task(a.session("p").eval(sys.argv[3])))
            while not open(sys.argv[4]).read():  # until the test saw the streams and the call running
                await asyncio.sleep(0.01)
        asyncio.run(main())
    while mode == "thread" and threading.active_count() > 1 and not open(sys.argv[4]).read():
        time.sleep(0.01)
    print("exiting", flush=True)
""")


@pytest.mark.parametrize("mode", ["plain", "thread", "aio"])
def test_exit_with_open_clients_streams_and_calls_is_prompt_and_quiet(stack: Stack, tmp_path: Any,
                                                                    mode: str) -> None:
    _pool(stack)
    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT)
    marker = tmp_path / "running"
    marker.write_text("")
    started = time.monotonic()
    proc = stack.procs_reg.spawn([PY, str(script), stack.frontend, mode, LONG_CALL, str(marker)], f"exit-{mode}.log")
    if mode != "plain":  # the sync stream and the call (and in aio mode the asyncio stream) running
        in_flight = 2 if mode == "thread" else 3
        wait_for(lambda: _running(stack) == in_flight, timeout=20, what="the streams and the call running")
        marker.write_text("x")
    code = wait_for(lambda: proc.poll() is not None and (proc.returncode, ), timeout=30, what="the process to exit")
    took = time.monotonic() - started
    log = stack.procs_reg.log_tail(f"exit-{mode}.log")
    assert code == (0,), log
    assert log.strip() == "exiting", log
    assert took < 20
    wait_for(lambda: _running(stack) == 0, timeout=10, what="the workers free after the client's exit")
