"""A stream held open by its caller (``stream = s.stream_eval(...)``, one ``next(stream)``, then
another call of its session on the same thread or task), per pool mode. A ``hint`` or ``none``
pool of two worker slots or more runs the call beside the stream: nothing is read ahead, and a
long producer is not stopped (it waits suspended, as in-process). Where the call would wait
behind the stream — a ``strict_*`` pool (tests/test_stream_stop.py), a pool of one slot — the
call reads the stream ahead first, and its messages say why. Real broker and workers."""

from __future__ import annotations

import time
from typing import Any

import pytest

import dspex
from dspex.client.streamapi import HELD_ITEMS_MAX
from tests.harness import Stack
from tests.test_stream_stop import HELD_CODE, HELD_STALL_S, PROMPT_S, anext_n, held_stream_case

pytestmark = pytest.mark.timeout(120)

LONG = HELD_ITEMS_MAX + 500  # more items than a read-ahead keeps


@pytest.mark.parametrize("mode", ["sync", "aio"])
@pytest.mark.parametrize("spec", ["p:hint", "p:none"])
def test_a_call_runs_beside_a_held_stream_and_a_long_producer_goes_on(stack: Stack, spec: str, mode: str) -> None:
    """The call runs at once, and the stream then gives more items than a read-ahead keeps (it
    stopped the producer after ``HELD_ITEMS_MAX``, with ``Cancelled``, before)."""
    dx = stack.pool(spec, 1, "--no-dspy", "--capacity", "4")
    endless = "__import__('itertools').count()"  # (a none pool keeps no session code)

    def sync_case(s: dspex.Session) -> None:
        stream = s.stream_eval(endless, timeout=HELD_STALL_S)
        assert next(stream) == 0
        started = time.monotonic()
        assert s.eval("'next'") == "next"
        assert time.monotonic() - started < PROMPT_S
        assert [next(stream) for _ in range(LONG)] == list(range(1, LONG + 1))
        stream.close()
        assert s.eval("'again'") == "again"

    async def aio_case(s: Any) -> None:
        stream = s.stream_eval(endless, timeout=HELD_STALL_S)
        assert await anext(stream) == 0
        started = time.monotonic()
        assert await s.eval("'next'") == "next"
        assert time.monotonic() - started < PROMPT_S
        assert await anext_n(stream, LONG) == list(range(1, LONG + 1))
        await stream.aclose()
        assert await s.eval("'again'") == "again"

    held_stream_case(stack, dx, mode, sync_case if mode == "sync" else aio_case)


def test_a_hint_call_queued_for_a_slot_runs_beside_its_held_stream(stack: Stack) -> None:
    """Every other slot busy: the call waits for one to free up, then runs beside the stream (the
    broker queued it behind its session's running stream before, until its timeout)."""
    dx = stack.pool("p:hint", 1, "--no-dspy", "--capacity", "4")
    s = dx.session("p")
    s.exec(HELD_CODE)
    stream = s.stream_eval("forever()", timeout=HELD_STALL_S)
    assert next(stream) == 0
    busy = [dx.submit(dx.session("p").eval, "__import__('time').sleep(2)", timeout=30) for _ in range(3)]
    for _ in range(200):  # until the three run (each holds a slot)
        if sum(w["inflight"] for w in dx.status()["pools"]["p"]["workers"]) == 4:
            break
        time.sleep(0.02)
    started = time.monotonic()
    assert s.eval("'next'", timeout=HELD_STALL_S) == "next"
    assert time.monotonic() - started < HELD_STALL_S - 1
    assert [f.result() for f in busy] == [None] * 3
    assert [next(stream) for _ in range(LONG)] == list(range(1, LONG + 1))
    stream.close()


def test_a_pool_of_one_slot_reads_a_held_stream_ahead_and_says_why(stack: Stack) -> None:
    """The stream holds the pool's only slot: the call reads it ahead, as in a strict pool."""
    dx = stack.pool("p:hint", 1, "--no-dspy")
    s = dx.session("p")
    s.exec(HELD_CODE)
    stream = s.stream_eval("forever()", timeout=HELD_STALL_S)
    assert next(stream) == 0
    assert s.eval("'next'") == "next"
    kept: list[int] = []
    with pytest.raises(dspex.Cancelled, match="the stream holds its pool's only worker slot"):
        kept.extend(stream)
    assert kept == list(range(1, 1 + HELD_ITEMS_MAX))
