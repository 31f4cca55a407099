"""Awaitables are awaited on the worker; async generators run in one task; any iterator streams."""

from __future__ import annotations

import textwrap

import pytest

import dspex
from tests.harness import Stack
from tests.lmserver import LMServer


@pytest.fixture
def s(stack: Stack) -> dspex.Session:
    dx = stack.pool("p:strict_queue", 1)
    session = dx.session("p")
    session.exec(textwrap.dedent("""
        import asyncio, itertools
        import anyio, dspy
        from dspy.utils import DummyLM

        dspy.configure(lm=DummyLM([{"answer": "async answer"}] * 20))
        qa = dspy.Predict("question -> answer")

        async def double(x):
            await asyncio.sleep(0)
            return 2 * x

        async def scoped(n):
            # an anyio cancel scope must be left in the task that entered it (dspy.streamify's)
            with anyio.CancelScope():
                for i in range(n):
                    await anyio.sleep(0)
                    yield i

        closed = []
        def numbers():
            try:
                yield from itertools.count()
            finally:
                closed.append(True)
    """))
    return session


def test_awaitable_results_are_awaited(s: dspex.Session) -> None:
    assert s.eval("double(21)") == 42
    qa = s.eval("qa")
    assert s.method(qa, "acall", kwargs={"question": "q"}).answer == "async answer"
    assert s.eval("dspy.asyncify(qa)(question='q')").answer == "async answer"


def test_async_generator_is_driven_in_one_task(s: dspex.Session) -> None:
    assert list(s.stream_eval("scoped(5)")) == [0, 1, 2, 3, 4]
    items = list(s.stream_eval("dspy.streamify(qa)(question='q')"))
    assert items[-1].answer == "async answer"


def test_any_iterator_streams(s: dspex.Session) -> None:
    assert list(s.stream_eval("iter([1, 2, 3])")) == [1, 2, 3]
    assert list(s.stream_eval("map(str, range(3))")) == ["0", "1", "2"]
    stream = s.stream_eval("numbers()")
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    stream.close()  # an endless producer stops when its consumer does
    assert s.eval("closed") == [True]


def test_stream_of_any_iterable_and_a_clear_error_for_others(s: dspex.Session) -> None:
    assert list(s.stream_eval("[1, 2]")) == [1, 2]
    assert list(s.stream_eval("{'a': 1}")) == ["a"]  # as `for x in result` in-process
    with pytest.raises(dspex.RemoteError, match="not iterable"):
        list(s.stream_eval("42"))
    assert s.eval("1 + 1") == 2


def test_what_a_session_keeps_bound_to_its_loop_works_in_its_next_calls(s: dspex.Session) -> None:
    """An ``httpx.AsyncClient`` kept in the session (its pooled connection), an ``asyncio.Queue``
    and an async generator the session's code steps, each used by one call after another, as a
    program does on its one loop (each call on a loop of its own broke all three)."""
    with LMServer() as server:
        s.exec(textwrap.dedent(f"""
            import httpx
            http = httpx.AsyncClient()
            async def fetch():
                return (await http.get("{server.base}/models")).status_code

            queue = asyncio.Queue()
            async def put_later(x):
                asyncio.get_running_loop().call_later(0.01, queue.put_nowait, x)
                return await asyncio.wait_for(queue.get(), 5)  # binds the queue to the loop

            async def counting():
                for i in range(3):
                    yield i
            counter = counting()
            async def step():
                return await anext(counter, "end")
        """))
        assert [s.eval("fetch()") for _ in range(3)] == [200, 200, 200]
        assert [s.eval(f"put_later({i})") for i in range(3)] == [0, 1, 2]
        assert [s.eval("step()") for _ in range(4)] == [0, 1, 2, "end"]


def test_tasks_a_call_leaves_behind_are_cancelled_at_its_end(s: dspex.Session) -> None:
    s.exec(textwrap.dedent("""
        ends = []
        async def background():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                ends.append("cancelled")
                raise
        async def start():
            asyncio.get_running_loop().create_task(background())
            await asyncio.sleep(0)
            return "started"
    """))
    assert s.eval("start()") == "started"
    assert s.eval("ends") == ["cancelled"]  # as asyncio.run does at a program's end


def test_a_call_that_closes_the_sessions_loop_leaves_later_calls_a_fresh_one(s: dspex.Session) -> None:
    s.exec(textwrap.dedent("""
        async def keep():
            global kept
            kept = asyncio.get_running_loop()
    """))
    s.eval("keep()")
    s.eval("kept.close()")  # from a plain call: the loop is not running then
    assert [s.eval("double(21)") for _ in range(2)] == [42, 42]
