"""Closing a session ends what it runs: its running call is cancelled on its worker (its caller gets
``Cancelled``, as from a cancel), its open streams' producers are cancelled, and a stream read
after the close raises ``SessionClosed`` instead of yielding. Blocking and asyncio clients alike.

Every case runs on a ``strict_queue`` pool of one capacity-1 worker whose queue timeout (10 s) is
far below what the producer would take: another session's call answers at once only if the close
freed the worker, and a producer left running would show as ``QueueTimeout``."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import dspex
import dspex.aio
from tests.harness import Stack, wait_for
from tests.test_stream_stop import POOL, PROMPT_S, SESSION_CODE, wait_closed

pytestmark = pytest.mark.timeout(120)

FAST_CODE = """
def items(marker):
    open(marker + ".started", "w").close()
    try:
        n = 0
        while True:  # as fast as credit allows: the consumer's window runs ahead of it
            yield n
            n += 1
    finally:
        open(marker + ".closed", "w").close()
"""


@pytest.fixture
def dx(stack: Stack) -> dspex.Client:
    client = stack.pool(POOL, 1, "--no-dspy")
    return client


def session(dx: dspex.Client) -> dspex.Session:
    s = dx.session("p")
    s.exec(SESSION_CODE + FAST_CODE)
    return s


def worker_is_free(dx: dspex.Client) -> None:
    """Another session's call answers at once: nothing of the closed session holds the worker."""
    started = time.monotonic()
    assert dx.session("p").eval("'next'") == "next"
    assert time.monotonic() - started < PROMPT_S


def assert_says_closed(err: BaseException) -> None:
    """The caller of a call its session's close stopped is told so, not that the session is intact."""
    assert "its session was closed" in str(err) and "intact" not in str(err), str(err)


def test_close_cancels_a_running_call(dx: dspex.Client, tmp_path: Path) -> None:
    s = session(dx)
    marker = tmp_path / "m"
    outcome: list[Any] = []

    def call() -> None:
        try:
            outcome.append(s.eval(f"slow({str(marker)!r})"))
        except BaseException as exc:  # noqa: BLE001 - what the caller got is the test's result
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    try:
        wait_for(lambda: Path(f"{marker}.started").exists(), 10, what="the call to start")
        closing = time.monotonic()
        s.close()
        caller.join(PROMPT_S)
        assert not caller.is_alive(), "the call kept running after its session closed"
    finally:
        caller.join(60)
    assert isinstance(outcome[0], dspex.Cancelled), outcome
    assert_says_closed(outcome[0])
    assert time.monotonic() - closing < PROMPT_S
    wait_closed(marker)
    worker_is_free(dx)
    with pytest.raises(dspex.SessionClosed):
        s.eval("1")


def test_close_cancels_an_open_stream(dx: dspex.Client, tmp_path: Path) -> None:
    s = session(dx)
    marker = tmp_path / "m"
    stream = s.stream_eval(f"items({str(marker)!r})")
    assert next(stream) == 0
    s.close()
    wait_closed(marker)
    with pytest.raises(dspex.SessionClosed):
        next(stream)
    assert stream.done
    with pytest.raises(StopIteration):  # ended: it stays so
        next(stream)
    worker_is_free(dx)


def test_close_cancels_a_stream_waiting_for_its_item(dx: dspex.Client, tmp_path: Path) -> None:
    """The producer sleeps inside an item (``gen``): the close interrupts it there."""
    s = session(dx)
    marker = tmp_path / "m"
    stream = s.stream_eval(f"gen({str(marker)!r})")
    assert next(stream) == 0
    s.close()
    wait_closed(marker)
    with pytest.raises(dspex.SessionClosed):
        next(stream)
    worker_is_free(dx)


def test_async_close_cancels_a_running_call_and_an_open_stream(stack: Stack, dx: dspex.Client,
                                                               tmp_path: Path) -> None:
    s = session(dx)
    call_marker, stream_marker = tmp_path / "c", tmp_path / "s"

    async def main() -> None:
        async with dspex.aio.connect(stack.frontend, timeout=60) as adx:
            a = adx.session("p", s.id)
            task = asyncio.create_task(a.eval(f"slow({str(call_marker)!r})"))
            while not Path(f"{call_marker}.started").exists():
                await asyncio.sleep(0.02)
            await a.close()
            with pytest.raises(dspex.Cancelled) as cancelled:
                async with asyncio.timeout(PROMPT_S):
                    await task
            assert_says_closed(cancelled.value)
            assert Path(f"{call_marker}.closed").exists()

            b = adx.session("p")
            await b.exec(SESSION_CODE + FAST_CODE)
            it = b.stream_eval(f"items({str(stream_marker)!r})")
            assert await anext(it) == 0
            await b.close()
            with pytest.raises(dspex.SessionClosed):
                await anext(it)
            assert it.done

    asyncio.run(main())
    wait_closed(stream_marker)
    worker_is_free(dx)


@pytest.mark.parametrize("error", [dspex.Timeout, dspex.QueueTimeout])
def test_except_timeout_error_catches_dspex_timeouts(error: type[dspex.DspexError]) -> None:
    """``except TimeoutError`` (what asyncio and concurrent.futures raise) catches dspex's timeouts,
    as their own family still does, after a round trip through the wire and pickle."""
    import pickle

    from dspex.wire.remoteerror import error_from_wire

    err = error("no answer in 1s", op="eval")
    for copy in (err, error_from_wire(err.to_wire()), pickle.loads(pickle.dumps(err))):
        assert type(copy) is error and isinstance(copy, TimeoutError)
        assert copy.message == "no answer in 1s" and copy.details == {"op": "eval"}
        assert str(copy) == "no answer in 1s"
    assert isinstance(err, dspex.MayHaveRun if error is dspex.Timeout else dspex.DidNotRun)


def test_except_timeout_error_catches_timeouts_of_calls(stack: Stack, tmp_path: Path) -> None:
    """A call past its deadline (``Timeout``), and one queued past the pool's queue timeout behind
    another session's call (``QueueTimeout``), through both client kinds."""
    dx = stack.pool("p:strict_queue:queue_timeout=1", 1, "--no-dspy")
    s = session(dx)
    with pytest.raises(TimeoutError) as sync_err:
        s.eval(f"slow({str(tmp_path / 'a')!r})", timeout=0.5)
    assert isinstance(sync_err.value, dspex.Timeout)
    holder = threading.Thread(target=s.eval, args=(f"slow({str(tmp_path / 'b')!r}, 4)",))
    holder.start()
    try:
        wait_for(lambda: Path(tmp_path / "b.started").exists(), 10, what="the call to start")
        with pytest.raises(TimeoutError) as queued:
            dx.session("p").eval("1")
        assert isinstance(queued.value, dspex.QueueTimeout)
    finally:
        holder.join(60)

    async def main() -> None:
        async with dspex.aio.connect(stack.frontend, timeout=60) as adx:
            a = adx.session("p", s.id)
            with pytest.raises(TimeoutError) as async_err:
                await a.eval(f"slow({str(tmp_path / 'c')!r})", timeout=0.5)
            assert isinstance(async_err.value, dspex.Timeout)
            holding = asyncio.create_task(a.eval(f"slow({str(tmp_path / 'd')!r}, 4)"))
            while not Path(tmp_path / "d.started").exists():
                await asyncio.sleep(0.02)
            with pytest.raises(TimeoutError) as async_queued:
                await adx.session("p").eval("1")
            assert isinstance(async_queued.value, dspex.QueueTimeout)
            await holding

    asyncio.run(main())
