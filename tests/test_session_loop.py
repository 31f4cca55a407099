"""A session's awaitable calls share one event loop on a capacity-N worker, as a program's async
code shares its loop (worker/session_loop.py): what the session keeps bound to the loop works from
call to call and from calls running at once on other pool threads (a ``hint`` pool runs a
session's calls side by side), interrupting one call leaves the others running, and one session's
blocking code never stalls another's. Real broker and workers; calls at once from an asyncio client."""

from __future__ import annotations

import asyncio
import functools
import textwrap
import time
from typing import Any

import dspy
import pytest

import dspex
import dspex.aio
from tests.harness import PY, Stack, wait_for
from tests.lmserver import LMServer

pytestmark = pytest.mark.timeout(180)

CODE = textwrap.dedent("""
    import asyncio, threading, time

    queue = asyncio.Queue()
    lock = asyncio.Lock()
    ready = asyncio.Event()
    ends = []
    started = []  # the calls that began, for the tests to wait on

    async def take(n):
        ready.set()
        return [await asyncio.wait_for(queue.get(), 30) for _ in range(n)]

    async def put(x):
        started.append("put")
        await asyncio.wait_for(ready.wait(), 30)
        async with lock:  # held across an await: the other calls wait for it
            await asyncio.sleep(0.05)
            await queue.put(x)
        return x

    async def slow(tag):
        started.append("slow")
        try:
            await asyncio.sleep(60)
        finally:
            ends.append(tag)

    async def steady(n):
        started.append("steady")
        for _ in range(n):
            await asyncio.sleep(0.05)
        return "steady done"

    async def blocker(seconds):
        started.append("blocker")
        time.sleep(seconds)  # synchronous code in a coroutine: it holds the loop
        return "unblocked"

    async def busy(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:  # (a pool thread takes an interruption between bytecodes)
            pass
        return "done"

    async def background():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            ends.append("background cancelled")
            raise

    async def leaver():
        asyncio.get_running_loop().create_task(background())
        await asyncio.sleep(0)
        return "left"

    async def keeper():
        child = asyncio.create_task(asyncio.sleep(1.0, "child"))
        started.append("keeper")
        await asyncio.sleep(0.3)
        return await child

    async def double(x):
        await asyncio.sleep(0)
        return 2 * x
""")


def _go(stack: Stack, body: Any) -> Any:
    async def main() -> Any:
        async with dspex.aio.connect(stack.frontend, timeout=60) as adx:
            return await body(adx)

    return asyncio.run(main())


async def _session(adx: dspex.aio.AsyncClient, code: str = CODE) -> Any:
    s = adx.session("p")
    await s.exec(code)
    return s


@pytest.fixture
def hint4(stack: Stack) -> Stack:
    stack.pool("p:hint", 1, "--no-dspy", "--capacity", "4")
    return stack


def test_an_asyncio_queue_event_and_lock_are_shared_by_calls_at_once(hint4: Stack) -> None:
    """One call waits on the session's Queue (binding it to the loop); three calls at once, on
    other pool threads, put into it taking turns at its Lock; and the other way round, calls
    waiting on its Event before the call that sets it. Each is woken at once."""

    async def body(adx: dspex.aio.AsyncClient) -> Any:
        s = await _session(adx)
        started = time.monotonic()
        taking = asyncio.ensure_future(s.eval("take(3)"))
        assert await wait_async(lambda: s.eval("ready.is_set()"), True)
        put = await asyncio.gather(*(s.eval(f"put({i})") for i in range(3)))
        taken = await taking
        await s.exec("ready.clear()")
        waiting = [asyncio.ensure_future(s.eval(f"put({i})")) for i in (7, 8)]
        assert await wait_async(lambda: s.eval("started.count('put')"), 5)  # both wait for `ready`
        again = await s.eval("take(2)")
        return sorted(put), sorted(taken), sorted(again), [await w for w in waiting], time.monotonic() - started

    put, taken, again, waited, took = _go(hint4, body)
    assert (put, taken, again, waited) == ([0, 1, 2], [0, 1, 2], [7, 8], [7, 8])
    assert took < 10, f"took {took:.1f}s: a waiter was not woken"


def test_an_httpx_async_client_kept_in_the_session_serves_calls_at_once(hint4: Stack) -> None:
    with LMServer() as server:
        async def body(adx: dspex.aio.AsyncClient) -> Any:
            s = await _session(adx, textwrap.dedent(f"""
                import httpx
                http = httpx.AsyncClient()
                async def fetch():
                    return (await http.get("{server.base}/models")).status_code
            """))
            first = [await s.eval("fetch()") for _ in range(3)]
            at_once = await asyncio.gather(*(s.eval("fetch()") for _ in range(12)))
            return first, at_once

        first, at_once = _go(hint4, body)
    assert first == [200] * 3 and at_once == [200] * 12


def test_dspy_async_lm_calls_of_one_session_at_once(stack: Stack) -> None:
    """A ``dspy.LM`` kept in the session, awaited (``acall`` of the LM and of a Predict) by calls
    running at once; each call sees its own DSPy settings (the client's ``dspy.context`` travels
    with its call) after its awaits, on the loop another call's thread may be running."""
    stack.pool("p:hint", 1, "--capacity", "4")
    with LMServer() as server:
        async def body(adx: dspex.aio.AsyncClient) -> Any:
            s = await _session(adx, textwrap.dedent(f"""
                import asyncio, dspy
                lm = dspy.LM("openai/kept", api_base="{server.base}", api_key="k", cache=False)
                qa = dspy.Predict("question -> answer")

                async def ask(q):
                    raw = await lm.acall(messages=[{{"role": "user", "content": q}}])
                    with dspy.context(lm=lm):
                        answer = (await qa.acall(question=q)).answer
                    return bool(raw) and bool(answer), dspy.settings.tag

                async def configure(tag):
                    await asyncio.sleep(0.05)
                    dspy.configure(mine=tag)  # allowed in the call's own task, whichever thread runs it
                    await asyncio.sleep(0.05)
                    return dspy.settings.mine
            """))

            async def group(tag: str) -> list[Any]:
                with dspy.context(tag=tag):
                    return list(await asyncio.gather(*(s.eval(f"ask('q{tag}{i}')") for i in range(4))))

            answers = await asyncio.gather(group("a"), group("b"))
            configured = await asyncio.gather(*(s.eval(f"configure({i})") for i in range(4)))
            return answers, configured

        answers, configured = _go(stack, body)
        assert answers == [[(True, "a")] * 4, [(True, "b")] * 4]
        assert sorted(configured) == [0, 1, 2, 3]
        calls = server.completions()
        assert len(calls) == 16, [(c.mode, c.status, c.model) for c in calls]


@pytest.mark.parametrize("first", ["steady", "interrupted"])
@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_interrupting_one_call_leaves_the_sessions_other_call_running(hint4: Stack, first: str, how: str) -> None:
    """Either may be the one whose thread runs the loop: the interrupted call's task alone is
    cancelled (its ``finally`` runs), and the other call runs to its end."""

    async def body(adx: dspex.aio.AsyncClient) -> Any:
        s = await _session(adx)
        calls: dict[str, Any] = {}
        for name in (first, "interrupted" if first == "steady" else "steady"):
            if name == "steady":
                calls[name] = asyncio.ensure_future(s.eval("steady(60)"))  # 3 s
            else:
                calls[name] = asyncio.ensure_future(s.eval("slow('x')", timeout=1.0 if how == "timeout" else None))
            began = "steady" if name == "steady" else "slow"
            assert await wait_async(functools.partial(s.eval, f"{began!r} in started"), True)
        started = time.monotonic()
        if how == "cancel":
            calls["interrupted"].cancel()
        with pytest.raises((dspex.Timeout, asyncio.CancelledError)):
            await calls["interrupted"]
        stopped = time.monotonic() - started
        steady = await calls["steady"]
        ends = await wait_async(lambda: s.eval("ends"), ["x"])
        return stopped, steady, ends

    stopped, steady, ends = _go(hint4, body)
    assert stopped < 5 and steady == "steady done" and ends == ["x"]


async def wait_async(read: Any, want: Any, timeout: float = 10) -> Any:
    end = time.monotonic() + timeout
    while (got := await read()) != want and time.monotonic() < end:
        await asyncio.sleep(0.05)
    return got


def test_a_call_blocking_the_loop_in_synchronous_code_is_stopped_in_it(hint4: Stack) -> None:
    """Its timeout raises into the thread that runs the loop, another call's, while it runs the
    blocking call's code; the other call, held meanwhile as in-process, then runs to its end."""

    async def body(adx: dspex.aio.AsyncClient) -> Any:
        s = await _session(adx)
        steady = asyncio.ensure_future(s.eval("steady(20)"))
        assert await wait_async(lambda: s.eval("'steady' in started"), True)
        started = time.monotonic()
        with pytest.raises(dspex.Timeout):
            await s.eval("busy(30)", timeout=1.0)
        return time.monotonic() - started, await steady, await s.eval("double(21)")

    took, steady, after = _go(hint4, body)
    assert took < 8 and steady == "steady done" and after == 42


def test_a_calls_left_tasks_are_cancelled_at_its_end_not_another_calls(hint4: Stack) -> None:
    async def body(adx: dspex.aio.AsyncClient) -> Any:
        s = await _session(adx)
        kept = asyncio.ensure_future(s.eval("keeper()"))
        assert await wait_async(lambda: s.eval("'keeper' in started"), True)
        left = await s.eval("leaver()")
        return await kept, left, await s.eval("ends")

    assert _go(hint4, body) == ("child", "left", ["background cancelled"])


def test_a_sessions_blocking_call_does_not_stall_another_sessions_async_calls(hint4: Stack) -> None:
    async def body(adx: dspex.aio.AsyncClient) -> Any:
        blocked, other = await _session(adx), await _session(adx)
        blocking = asyncio.ensure_future(blocked.eval("blocker(4)"))
        assert await wait_async(lambda: blocked.eval("'blocker' in started"), True)
        started = time.monotonic()
        doubled = [await other.eval(f"double({i})") for i in range(5)]
        took = time.monotonic() - started
        return doubled, took, blocking.done(), await blocking

    doubled, took, was_done, unblocked = _go(hint4, body)
    assert doubled == [0, 2, 4, 6, 8] and took < 3 and not was_done and unblocked == "unblocked"


def test_a_sessions_loop_is_closed_when_the_session_closes(hint4: Stack) -> None:
    dx = hint4.client()
    probe = dx.session("p")
    probe.exec("import asyncio, gc\n"
               "def open_loops():\n"
               "    return sum(1 for o in gc.get_objects() if isinstance(o, asyncio.BaseEventLoop) and not o.is_closed())")
    sessions = [dx.session("p") for _ in range(5)]
    for s in sessions:
        s.exec(CODE)
        assert s.eval("double(1)") == 2
    assert probe.eval("open_loops()") == 5  # one per session that awaited, none per thread
    for s in sessions:
        s.close()
    wait_for(lambda: probe.eval("open_loops()") == 0, 10, what="the closed sessions' loops to close")


def test_a_worker_keeps_the_loops_of_many_sessions_whatever_descriptor_limit_it_inherits(stack: Stack) -> None:
    """Every open session that awaited something holds its loop's descriptors on its worker: a
    worker started with a low soft limit (as a shell's default 1024, here 160) raises it, so 150
    such sessions (~450 descriptors) all go on working."""
    low = [PY, "-c", ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, "
                      "(160, resource.getrlimit(resource.RLIMIT_NOFILE)[1])); os.execv(sys.argv[1], sys.argv[1:])")]
    stack.start_broker("p:hint")
    stack.start_worker("p", "--no-dspy", "--capacity", "2", prefix=low)
    stack.wait_workers("p", 1)

    async def body(adx: dspex.aio.AsyncClient) -> Any:
        sessions = [adx.session("p") for _ in range(150)]
        for s in sessions:
            await s.exec(CODE)
        first = [await s.eval("double(1)") for s in sessions]
        again = await asyncio.gather(*(s.eval("double(2)") for s in sessions))
        limit = await sessions[0].eval("__import__('resource').getrlimit(__import__('resource').RLIMIT_NOFILE)[0]")
        return first, again, limit

    first, again, limit = _go(stack, body)
    assert first == [2] * 150 and again == [4] * 150
    assert limit > 160
