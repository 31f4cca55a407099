"""An async generator streaming to a consumer that does not take its items yet waits for credit
without holding its session's event loop (worker/streaming.py, ``StreamControl.credit_ready``): the
session's other calls running at once on a capacity-4 ``hint`` pool complete meanwhile, as
in-process the loop's other tasks run while such a generator waits at its ``yield``. The stream's
credit timeout, its consumer's cancel and a time limit still stop it. Real broker and workers;
calls at once from an asyncio client, each in its own task (a call made in the task that holds the
stream runs beside it as well on this pool: tests/test_stream_held_modes.py)."""

from __future__ import annotations

import asyncio
import textwrap
import time
from typing import Any

import pytest

import dspex
import dspex.aio
from dspex.wire.protocol import STREAM_WINDOW
from tests.harness import Stack
from tests.test_session_loop import _go, wait_async

pytestmark = pytest.mark.timeout(180)

CODE = textwrap.dedent("""
    import asyncio, sys

    ends = []
    sys.produced = 0  # (the process's: a session beside it reads it)

    async def numbers(n, pause=0.0):
        try:
            for i in range(n):
                if pause:
                    await asyncio.sleep(pause)
                sys.produced = i + 1
                yield i
        finally:
            ends.append("numbers")

    async def double(x):
        await asyncio.sleep(0)
        return 2 * x
""")
STALL_S = 3.0  # the stream's timeout: how long its worker waits for credit from a silent consumer


@pytest.fixture
def hint4(stack: Stack) -> Stack:
    stack.pool("p:hint", 1, "--no-dspy", "--capacity", "4")
    return stack


async def _stalled_stream(adx: dspex.aio.AsyncClient, timeout: float) -> tuple[Any, Any, Any]:
    """A session whose stream of ``numbers(500)``, read once, waits for credit: the session, the
    stream, and a session on the same worker that watches it."""
    s, watcher = adx.session("p"), adx.session("p")
    await s.exec(CODE)
    stream = s.stream_eval("numbers(500)", timeout=timeout)
    assert await anext(stream) == 0
    readings: list[int] = []

    async def settled() -> bool:
        readings.append(int(await watcher.eval("__import__('sys').produced")))
        return len(readings) >= 5 and readings[-1] == readings[-5]

    end = time.monotonic() + 10
    while not await settled() and time.monotonic() < end:
        await asyncio.sleep(0.05)
    assert readings[-1] == STREAM_WINDOW + 1, f"the producer is not waiting for credit: {readings}"
    return s, stream, watcher


def test_the_sessions_other_calls_run_while_its_async_stream_waits_for_credit(hint4: Stack) -> None:
    async def body(adx: dspex.aio.AsyncClient) -> Any:
        s, stream, _ = await _stalled_stream(adx, 30)
        started = time.monotonic()
        doubled = await asyncio.ensure_future(_in_turn(s, 5))
        # as many as the worker's other 3 threads run at once (a fourth would queue for one)
        at_once = await asyncio.gather(*(s.eval(f"double({i})", timeout=10) for i in range(3)))
        took = time.monotonic() - started
        rest = [item async for item in stream]
        return doubled, at_once, took, rest, stream.result, await s.eval("ends")

    doubled, at_once, took, rest, result, ends = _go(hint4, body)
    assert doubled == [0, 2, 4, 6, 8] and at_once == [0, 2, 4]
    assert took < 5, f"the calls took {took:.1f}s beside a stream waiting for credit"
    assert rest == list(range(1, 500)) and result == {"items": 500, "value": None} and ends == ["numbers"]


async def _in_turn(s: Any, n: int) -> list[Any]:
    return [await s.eval(f"double({i})", timeout=10) for i in range(n)]


def test_a_silent_consumers_async_stream_is_stopped_at_its_credit_timeout(hint4: Stack) -> None:
    """The session's calls run meanwhile (before it stops), and the generator's ``finally`` runs
    once the worker has waited the stream's timeout for credit."""

    async def body(adx: dspex.aio.AsyncClient) -> Any:
        s, stream, _ = await _stalled_stream(adx, STALL_S)
        started = time.monotonic()
        before = await asyncio.ensure_future(s.eval("ends", timeout=10))  # runs while the stream waits
        ends = await asyncio.ensure_future(wait_async(lambda: s.eval("ends", timeout=10), ["numbers"], 20))
        stopped = time.monotonic() - started
        items = []
        with pytest.raises(dspex.DspexError) as raised:
            async for item in stream:
                items.append(item)
        return before, ends, stopped, items, raised.value

    before, ends, stopped, items, error = _go(hint4, body)
    assert before == [] and ends == ["numbers"] and stopped < STALL_S + 5
    assert items == list(range(1, STREAM_WINDOW)), "the items sent before it stopped"
    # the credit timeout (Cancelled) or the item's time limit, which starts with it (Timeout): both stop it
    assert isinstance(error, (dspex.Cancelled, dspex.Timeout)), repr(error)


def test_a_consumers_close_stops_an_async_stream_waiting_for_credit(hint4: Stack) -> None:
    async def body(adx: dspex.aio.AsyncClient) -> Any:
        s, stream, _ = await _stalled_stream(adx, 30)
        doubled = await asyncio.ensure_future(_in_turn(s, 3))
        started = time.monotonic()
        await stream.aclose()  # waits for the producer's end
        return doubled, time.monotonic() - started, await s.eval("ends")

    doubled, took, ends = _go(hint4, body)
    assert doubled == [0, 2, 4] and took < 5 and ends == ["numbers"]


def test_a_time_limited_async_stream_still_stops(hint4: Stack) -> None:
    """Its per-item time limit passes while the generator awaits between items: the call's task
    is cancelled (its ``finally`` runs) and the consumer gets ``Timeout``."""

    async def body(adx: dspex.aio.AsyncClient) -> Any:
        s = adx.session("p")
        await s.exec(CODE)
        started = time.monotonic()
        items = []
        with pytest.raises(dspex.Timeout):
            async for item in s.stream_eval("numbers(3, pause=60)", timeout=1.0):
                items.append(item)
        return items, time.monotonic() - started, await s.eval("ends"), await s.eval("double(21)")

    items, took, ends, after = _go(hint4, body)
    assert items == [] and took < 8 and ends == ["numbers"] and after == 42
