"""An asyncio client and event loops: a client belongs to one running loop at a time. Used again
from a new loop once its loop ended (``asyncio.run`` twice: a service's start-up check, then its
server; a test suite with a loop per test) it works there; used from a loop that runs in another
thread while its own still runs, it says so at once (``UsageError``) instead of letting the call
time out with "may still be running" while its reply goes unread."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

import dspex
import dspex.aio
from tests.harness import Stack, wait_for

pytestmark = pytest.mark.timeout(90)


def test_an_asyncio_client_serves_one_event_loop_after_another(stack: Stack) -> None:
    stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", "2")
    dx = dspex.aio.connect(stack.frontend, timeout=5)
    s = dx.session("p")

    async def use(i: int) -> tuple[Any, Any, list[Any], float]:
        started = time.monotonic()
        value = await s.eval("i", {"i": i})
        many = await asyncio.gather(*(dx.session("p").eval("j", {"j": j}) for j in range(20)))
        items = [item async for item in s.stream_eval("iter(range(3))")]
        return value, many, items, time.monotonic() - started

    for i in range(3):  # each asyncio.run is a new loop; the one before is closed
        value, many, items, took = asyncio.run(use(i))
        assert (value, many, items) == (i, list(range(20)), [0, 1, 2])
        assert took < 4, f"loop {i}: {took:.1f}s"
    assert asyncio.run(s.eval("'same session'")) == "same session"
    asyncio.run(dx.close())


def test_an_asyncio_client_used_from_a_loop_running_in_another_thread_is_a_usage_error(stack: Stack) -> None:
    stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", "2")
    dx = dspex.aio.connect(stack.frontend, timeout=20)
    first = asyncio.new_event_loop()
    thread = threading.Thread(target=first.run_forever, daemon=True)
    thread.start()
    try:
        s = dx.session("p")
        slow = asyncio.run_coroutine_threadsafe(s.eval("__import__('time').sleep(1) or 'first loop'"), first)
        wait_for(lambda: stack.workers("p")[0].get("inflight"), timeout=10, what="the first loop's call running")

        async def from_here() -> Any:
            return await dx.session("p").eval("2")

        started = time.monotonic()
        with pytest.raises(dspex.UsageError, match="event loop"):
            asyncio.run(from_here())
        assert time.monotonic() - started < 2
        assert slow.result(15) == "first loop"  # the client's own loop never noticed
        asyncio.run_coroutine_threadsafe(dx.close(), first).result(10)
    finally:
        first.call_soon_threadsafe(first.stop)
        thread.join(10)
        first.close()


async def counting() -> Any:
    i = 0
    while True:
        await asyncio.sleep(0.01)
        i += 1
        yield i


def test_a_stream_left_open_when_its_loop_ends_stops_its_producer(stack: Stack) -> None:
    """A stream left by ``break`` and still held (a global, a cache) when ``asyncio.run`` ends: as
    asyncio.run closes the async generators left open, its producer is stopped then, and the
    worker is free at once instead of after the stream's timeout (20 s here)."""
    stack.pool("p:strict_queue", 1, "--no-dspy")
    dx = dspex.aio.connect(stack.frontend, timeout=20)
    s = dx.session("p")
    held = []

    async def main() -> None:
        stream = s.stream_apply(counting, [])
        held.append(stream)
        async for x in stream:
            if x == 3:
                break

    asyncio.run(main())
    started = time.monotonic()
    wait_for(lambda: not stack.workers("p")[0].get("inflight"), timeout=20, what="the worker free")
    assert time.monotonic() - started < 2
    assert asyncio.run(s.eval("'serving'")) == "serving"
    asyncio.run(dx.close())
