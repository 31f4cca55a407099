"""Cancelling a call stops it: an asyncio cancel (or Ctrl-C in the sync client) sends ``cancel``;
the broker drops a queued request, the worker interrupts a running one (worker/limits.py)."""

from __future__ import annotations

import asyncio
import re
import signal
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

import dspex
import dspex.aio
from dspex.client.exchange import control_frames, encode_request
from dspex.wire import codec
from dspex.wire.headers import RequestHeader, unpack_reply_header
from dspex.wire.ops import Op
from tests.harness import Stack, wait_for
from worker.executor import Executor
from worker.refs import RefTable

# The session's code: ``done`` records each call's side effect after its cancel point; a call
# first creates its marker file, so the test cancels it only once it runs.
SESSION_CODE = textwrap.dedent("""
    import asyncio, os, threading, time
    done = []

    def slow(marker, tag, steps=3000):
        open(marker, "w").close()
        for _ in range(steps):  # 30 s in short sleeps: a pool thread sees an interruption between two
            time.sleep(0.01)
        done.append(tag)

    async def aslow(marker, tag, seconds=30.0):
        open(marker, "w").close()
        await asyncio.sleep(seconds)
        done.append(tag)

    async def ablocked(marker, tag):  # a coroutine that blocks its loop: no await takes a task's cancel
        slow(marker, tag)

    def vitals():
        return {"threads": threading.active_count(), "fds": len(os.listdir("/proc/self/fd")),
                "rss": int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")}
""")
SLOW_CALL_S = 30.0  # what a cancelled call would take to its end
PROMPT_S = 3.0  # "promptly": far below SLOW_CALL_S, with room for a loaded machine


def _start(stack: Stack, capacity: int, pool_options: str = "") -> None:
    spec = "p:strict_queue" + (f":{pool_options}" if pool_options else "")
    stack.pool(spec, 1, "--no-dspy", "--capacity", str(capacity))


async def _until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def _cancel_when_running(task: asyncio.Task[Any], marker: Path) -> None:
    await _until(lambda: marker.exists() or task.done(), f"{marker.name} to start")
    assert not task.done(), task
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def _run(stack: Stack, body: Callable[[dspex.aio.AsyncClient, dspex.aio.AsyncSession], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        client = dspex.aio.connect(stack.frontend, timeout=60)
        try:
            s = client.session("p")
            await s.exec(SESSION_CODE)
            try:
                return await body(client, s)
            finally:
                await s.close()
        finally:
            await client.close()

    return asyncio.run(main())


def _outcomes(stack: Stack) -> dict[str, int]:
    with dspex.connect(stack.frontend, timeout=5) as c:
        return dict(c.status()["pools"]["p"]["outcomes"])


@pytest.mark.parametrize("capacity", [1, 4])
@pytest.mark.parametrize("kind", ["sync", "async", "async_blocked"])
def test_a_cancelled_call_stops_and_frees_its_slot(stack: Stack, tmp_path: Path, capacity: int, kind: str) -> None:
    """``task.cancel()`` on an awaited call: the worker stops it (main thread or pool thread; a
    plain function, a coroutine, or one that blocks its loop in synchronous code), the session's
    next call answers at once, and what the call would have done after the cancel never happens."""
    stack.env["DSPEX_HARD_GRACE"] = "60"  # a cancel must stop the call by itself, never the hard limit
    _start(stack, capacity)
    marker = tmp_path / "m"
    fn = {"sync": "slow", "async": "aslow", "async_blocked": "ablocked"}[kind]

    async def body(client: dspex.aio.AsyncClient, s: dspex.aio.AsyncSession) -> tuple[float, Any, int]:
        pid = await s.call("os", "getpid")
        task = asyncio.create_task(s.eval(f"{fn}({str(marker)!r}, 'cancelled')"))
        await _cancel_when_running(task, marker)
        started = time.monotonic()
        done = await s.eval("done")
        return time.monotonic() - started, done, pid == await s.call("os", "getpid")

    waited, done, same_worker = _run(stack, body)
    assert waited < PROMPT_S, f"the session's next call waited {waited:.1f}s behind the cancelled one"
    assert done == [], "the cancelled call went on past its cancel point"
    assert same_worker
    # the broker freed the slot on the worker's answer and counted it as cancelled, not as an error
    assert _outcomes(stack).get("eval:cancelled") == 1
    assert "eval:error" not in _outcomes(stack)


BLOCKED_CODE = textwrap.dedent("""
    import os, signal

    def blocked(marker):
        r, w = os.pipe()
        signal.siginterrupt(signal.SIGINT, False)  # the kernel now restarts a read SIGINT interrupts
        open(marker, "w").close()
        try:
            os.read(r, 1)  # nothing ever comes
        finally:
            signal.siginterrupt(signal.SIGINT, True)
            os.close(r)
            os.close(w)
""")


@pytest.mark.timeout(60)
def test_a_cancel_that_lands_before_a_blocking_system_call_still_stops_it(stack: Stack, tmp_path: Path) -> None:
    """A cancel's SIGINT that reaches the main thread after its last look at its signals and before
    it blocks in a system call leaves its handler pending while the call blocks (a race a loaded
    machine makes likely: the GIL is handed to the thread sending the signal right there). The
    watchdog nudges the thread until the handler has run. Made deterministic here: with SA_RESTART
    on SIGINT the kernel restarts the blocked read after the signal, as if it had landed before."""
    _start(stack, 1)
    marker = tmp_path / "m"

    async def body(client: dspex.aio.AsyncClient, s: dspex.aio.AsyncSession) -> float:
        await s.exec(BLOCKED_CODE)
        task = asyncio.create_task(s.eval(f"blocked({str(marker)!r})", timeout=10))
        await _cancel_when_running(task, marker)
        started = time.monotonic()
        assert await s.eval("1") == 1  # without the nudge: after the 10 s deadline and more
        return time.monotonic() - started

    waited = _run(stack, body)
    assert waited < PROMPT_S, f"the session's next call waited {waited:.1f}s behind the cancelled one"
    assert _outcomes(stack).get("eval:cancelled") == 1


FINALIZER_CODE = textwrap.dedent("""
    import time, weakref

    class Box:
        pass

    def busy_callback(ref):
        end = time.monotonic() + 3.0  # the cancel arrives while this runs
        while time.monotonic() < end:
            pass

    def collected(marker, tag):
        box = Box()
        keep = weakref.ref(box, busy_callback)
        open(marker, "w").close()
        del box  # the callback runs here: Python ignores what it raises ("Exception ignored in")
        for _ in range(3000):
            time.sleep(0.01)
        done.append((tag, keep() is None))
""")


@pytest.mark.timeout(60)
def test_a_cancel_that_lands_in_a_weakref_callback_still_stops_the_call(stack: Stack, tmp_path: Path) -> None:
    """A cancel's interruption raised while a weakref callback (or a ``__del__``, a garbage
    collection's finalizer) runs on the call's thread is swallowed by Python, which prints it as
    "Exception ignored in" and goes on: the call must still stop. Seen in the conformance suite:
    a cancel landed in a ``WeakKeyDictionary`` callback and the call ran on for 7 s."""
    stack.env["DSPEX_HARD_GRACE"] = "60"  # the cancel must stop the call by itself
    _start(stack, 1)
    marker = tmp_path / "m"

    async def body(client: dspex.aio.AsyncClient, s: dspex.aio.AsyncSession) -> tuple[float, Any]:
        await s.exec(FINALIZER_CODE)
        task = asyncio.create_task(s.eval(f"collected({str(marker)!r}, 'cancelled')"))
        await _cancel_when_running(task, marker)
        started = time.monotonic()
        done = await s.eval("done")
        return time.monotonic() - started, done

    waited, done = _run(stack, body)
    assert waited < PROMPT_S + 3.0, f"the session's next call waited {waited:.1f}s behind the cancelled one"
    assert done == [], "the cancelled call went on past its cancel point"
    assert _outcomes(stack).get("eval:cancelled") == 1


@pytest.mark.parametrize("prefetch", [0, 1], ids=["queued-in-broker", "prefetch-allowed"])
def test_a_cancelled_queued_request_never_runs(stack: Stack, tmp_path: Path, prefetch: int) -> None:
    """A call waiting behind the session's running call is cancelled: it never runs, the running
    call is untouched. With prefetch the worker may hold it already: it must not run there either."""
    _start(stack, 1, f"prefetch={prefetch}")
    marker = tmp_path / "m"

    async def body(client: dspex.aio.AsyncClient, s: dspex.aio.AsyncSession) -> Any:
        await s.eval("1")  # a short last call: the broker may prefetch behind the next one
        running = asyncio.create_task(s.eval(f"slow({str(marker)!r}, 'first', 150)"))  # 1.5 s
        queued = asyncio.create_task(s.eval("done.append('queued')"))
        await _until(lambda: marker.exists(), "the first call to start")
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert await running is None  # ran to its end, undisturbed
        return await s.eval("done")

    done = _run(stack, body)
    assert done == ["first"]
    assert _outcomes(stack).get("eval:cancelled") == 1


def test_cancelling_a_finished_call_is_harmless(stack: Stack) -> None:
    """A cancel for a request that has answered already (a race any client can lose): no reply,
    no error, no log line above DEBUG, and the session goes on."""
    _start(stack, 1)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(stack.frontend)
    try:
        def call(req_id: int, expr: str) -> Any:
            frames = encode_request(Op.EVAL.value, [expr, {}], 2**20)[0]
            sock.send_multipart([RequestHeader(Op.EVAL.value, req_id, "p", "s" * 32).pack(), *frames])
            assert sock.poll(20_000), "no reply"
            reply = sock.recv_multipart()
            status, rid, _, _ = unpack_reply_header(reply[0])
            assert (status, rid) == ("ok", req_id), msgpack.unpackb(reply[1])
            return codec.decode(reply[1:])

        assert call(1, "1 + 1") == 2
        for _ in range(3):  # again and again: nothing accumulates
            sock.send_multipart(control_frames(Op.CANCEL, "p", "s" * 32, 1, 0))
        # the next message on this socket is request 2's reply: the cancels got none
        assert call(2, "40 + 2") == 42
    finally:
        sock.close(0)
    assert _outcomes(stack) == {"eval:ok": 2}
    noisy = [line for line in stack.logs().splitlines()
             if re.search(r"cancel", line, re.IGNORECASE) and not re.search(r"\bDEBUG\b", line)]
    assert not noisy, noisy


@pytest.mark.parametrize("capacity", [1, 4])
def test_the_worker_survives_50_cancels_in_a_row(stack: Stack, tmp_path: Path, capacity: int) -> None:
    """50 running calls cancelled one after the other, alternating plain and async ones: the same
    worker serves on, with no leaked threads or file descriptors, and a stable RSS."""
    stack.env["DSPEX_HARD_GRACE"] = "60"
    _start(stack, capacity)

    async def body(client: dspex.aio.AsyncClient, s: dspex.aio.AsyncSession) -> tuple[Any, ...]:
        pid = await s.call("os", "getpid")
        # warm up what calls create once: every pool thread (with its socket), the first event loop
        others = [client.session("p") for _ in range(capacity)]
        await asyncio.gather(*(o.call("time", "sleep", [0.3]) for o in others))
        await asyncio.gather(*(o.close() for o in others))
        for fn in ("slow", "aslow"):
            marker = tmp_path / f"warm-{fn}"
            await _cancel_when_running(asyncio.create_task(s.eval(f"{fn}({str(marker)!r}, 'warm')")), marker)
        before = await s.eval("vitals()")
        for i in range(50):
            marker = tmp_path / f"m{i}"
            fn = "slow" if i % 2 == 0 else "aslow"
            await _cancel_when_running(asyncio.create_task(s.eval(f"{fn}({str(marker)!r}, {i})")), marker)
        started = time.monotonic()
        after = await s.eval("vitals()")
        waited = time.monotonic() - started
        return pid, await s.call("os", "getpid"), before, after, waited, await s.eval("done")

    pid, pid_after, before, after, waited, done = _run(stack, body)
    assert pid_after == pid, "the worker was replaced"
    assert waited < PROMPT_S
    assert done == []
    assert after["threads"] <= before["threads"], (before, after)
    assert after["fds"] <= before["fds"], (before, after)
    assert after["rss"] - before["rss"] < 16 * 2**20, (before, after)
    assert _outcomes(stack).get("eval:cancelled") == 52


def test_ctrl_c_in_the_sync_client_stops_the_call(stack: Stack, tmp_path: Path) -> None:
    """KeyboardInterrupt while ``s.eval`` waits sends ``cancel`` before it propagates: the worker
    stops the call and the session's next call answers at once."""
    stack.env["DSPEX_HARD_GRACE"] = "60"
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    s.exec(SESSION_CODE)
    marker = tmp_path / "m"
    main = threading.main_thread().ident
    assert main == threading.get_ident() and signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def interrupt() -> None:
        wait_for(marker.exists, 20, what="the call to start")
        assert main is not None
        signal.pthread_kill(main, signal.SIGINT)

    ctrl_c = threading.Thread(target=interrupt)
    ctrl_c.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            s.eval(f"slow({str(marker)!r}, 'interrupted')")
    finally:
        ctrl_c.join()
    started = time.monotonic()
    assert s.eval("done") == []
    assert time.monotonic() - started < PROMPT_S
    assert _outcomes(stack).get("eval:cancelled") == 1


def test_cancel_all_stops_the_calls_other_threads_wait_on(stack: Stack, tmp_path: Path) -> None:
    """``Client.cancel_all()`` from the main thread (what a Ctrl-C handler does) stops the calls the
    client's ``submit`` threads wait on: each raises Cancelled at once and stops on its worker, and
    the client's next calls run as usual."""
    stack.env["DSPEX_HARD_GRACE"] = "60"
    dx = stack.pool("p:strict_queue", 2, "--no-dspy")
    sessions = [dx.session("p"), dx.session("p")]
    for s in sessions:
        s.exec(SESSION_CODE)
    markers = [tmp_path / "a", tmp_path / "b"]
    futures = [dx.submit(s.eval, f"slow({str(m)!r}, 'not cancelled')") for s, m in zip(sessions, markers)]
    wait_for(lambda: all(m.exists() for m in markers), 20, what="both calls to start")
    started = time.monotonic()
    dx.cancel_all()
    for f in futures:
        with pytest.raises(dspex.Cancelled, match="cancel_all"):
            f.result(timeout=PROMPT_S)
    assert time.monotonic() - started < PROMPT_S
    assert [s.eval("done") for s in sessions] == [[], []]  # stopped there, and both workers free at once
    assert time.monotonic() - started < PROMPT_S
    assert _outcomes(stack).get("eval:cancelled") == 2


# -- the executor's cancel bookkeeping, in-process (no processes; calls run on a non-main thread,
# as on a pool thread, so the test process's SIGINT handler is never touched) -------------------
def _executor_call(ex: Executor, req_id: int, source: str, client: bytes = b"c") -> Any:
    body = encode_request(Op.EXEC.value, [source, {}], 2**20)[0]
    frames = ex.execute(RequestHeader(Op.EXEC.value, req_id, "p", "s" * 32), body, client=client)
    return codec.decode(frames)


def test_a_cancel_that_arrives_before_its_request_starts_stops_it_unrun() -> None:
    ex = Executor(RefTable("p", "w" * 32), capacity=4)
    with ThreadPoolExecutor(1) as pool:
        assert ex.cancel((b"c", 7)) is False  # received, not started: remembered
        with pytest.raises(dspex.Cancelled):
            pool.submit(_executor_call, ex, 7, "ran = True").result(10)
        assert pool.submit(_executor_call, ex, 8, "seen = 'ran' in globals()").result(10) == {"seen": False}
        # a cancel of a request that ended before it arrived is forgotten once the worker is idle
        assert ex.cancel((b"c", 8)) is False
        ex.forget_cancels()
        assert pool.submit(_executor_call, ex, 9, "x = 1").result(10) == {"x": 1}
        # another client's request with the same id is not the cancelled one
        ex.cancel((b"other", 10))
        assert pool.submit(_executor_call, ex, 10, "y = 2").result(10) == {"y": 2}


def test_a_cancel_interrupts_a_running_call_on_a_pool_thread() -> None:
    ex = Executor(RefTable("p", "w" * 32), capacity=4)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(_executor_call, ex, 1, "import time\nfor i in range(3000):\n    time.sleep(0.01)\n")
        wait_for(lambda: (b"c", 1) in ex._calls, 10, 0.005, "the call to start")
        started = time.monotonic()
        assert ex.cancel((b"c", 1)) is True
        with pytest.raises(dspex.Cancelled) as info:
            running.result(10)
        assert time.monotonic() - started < PROMPT_S
        assert info.value.details.get("stopped") is True
        assert ex.cancel((b"c", 1)) is False  # ended: nothing to interrupt
        assert pool.submit(_executor_call, ex, 2, "after = i").result(10)["after"] < 2999


WRITER_CODE = textwrap.dedent("""
    import asyncio, socket, threading, time

    def _drain(sock):
        try:
            while sock.recv(1 << 16):
                pass
        except OSError:
            pass

    async def awrite(marker, seconds=30.0):
        mine, theirs = socket.socketpair()
        threading.Thread(target=_drain, args=(theirs,), daemon=True).start()
        _, writer = await asyncio.open_connection(sock=mine)
        open(marker, "w").close()
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:  # nearly all its time inside the transport's socket write
                for _ in range(200):
                    writer.write(b"x" * 256)
                await writer.drain()
                await asyncio.sleep(0)  # (drain does not yield below the high-water mark)
            done.append("wrote on")
        finally:
            writer.close()
            theirs.close()
""")


def test_a_cancel_that_lands_inside_asyncios_socket_write_stops_the_coroutine(stack: Stack, tmp_path: Path) -> None:
    """A coroutine that writes to a socket through an asyncio transport, cancelled over and over on
    a capacity-1 worker: asyncio's transport catches ``BaseException`` around its socket write, so
    an interruption raised there became "Fatal write error on socket transport" and a closed
    connection, and the coroutine wrote on. Each call must end cancelled, with nothing logged."""
    stack.env["DSPEX_HARD_GRACE"] = "60"
    _start(stack, 1)

    async def body(client: dspex.aio.AsyncClient, s: dspex.aio.AsyncSession) -> Any:
        await s.exec(WRITER_CODE)
        for i in range(20):
            marker = tmp_path / f"w{i}"
            task = asyncio.create_task(s.eval(f"awrite({str(marker)!r})"))
            await _until(lambda: marker.exists() or task.done(), f"{marker.name} to start")  # noqa: B023
            await asyncio.sleep(0.05)  # well inside its writes
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return await s.eval("done")

    done = _run(stack, body)
    assert done == []
    assert _outcomes(stack).get("eval:cancelled") == 20, _outcomes(stack)
    noisy = [line for line in stack.logs().splitlines() if "Fatal write error" in line or "Traceback" in line]
    assert not noisy, noisy[:10]
