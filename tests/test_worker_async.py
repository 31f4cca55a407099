"""Awaitables are awaited on the worker; async generators run in one task; any iterator streams."""

from __future__ import annotations

import textwrap

import pytest

import dspex
from tests.harness import Stack


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
