"""The call's deadline is enforced on the worker: soft limit stops the call, hard limit recycles."""

from __future__ import annotations

import textwrap
import time
from typing import Any

import pytest

import dspex
from tests.harness import Stack, wait_for


def _timed_out(s: dspex.Session, source: str, timeout: float) -> tuple[dspex.Timeout, float]:
    start = time.monotonic()
    with pytest.raises(dspex.Timeout) as info:
        s.exec(source, timeout=timeout)
    return info.value, time.monotonic() - start


def test_soft_limit_stops_sleeps_and_socket_reads_on_capacity_1(stack: Stack) -> None:
    stack.env["DSPEX_HARD_GRACE"] = "30"  # only the soft limit may act here
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    s.exec("import socket, time\nstate = ['kept']\na, b = socket.socketpair()")
    pid = s.call("os", "getpid")
    for source in ("time.sleep(60)", "a.recv(10)", ("while True:\n    try:\n        time.sleep(60)\n"
                   "    except Exception:\n        pass\n")):
        err, took = _timed_out(s, source, 1.0)
        assert err.details.get("stopped") is True and not err.details.get("hard"), source
        assert took < 5, f"{source!r} took {took:.1f}s to stop"
        # the session and its objects are intact and the worker serves at once
        assert s.eval("state") == ["kept"]
        assert s.call("os", "getpid") == pid


def test_soft_limit_stops_a_busy_call_on_a_pool_thread(stack: Stack) -> None:
    stack.env["DSPEX_HARD_GRACE"] = "30"
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", "4")
    s = dx.session("p")
    s.exec("n = 0")
    err, took = _timed_out(s, "while True:\n    n += 1\n", 1.0)
    assert err.details.get("stopped") is True
    assert took < 5
    assert s.eval("n") > 0


@pytest.mark.parametrize("capacity", [1, 4])
def test_soft_limit_stops_an_awaiting_coroutine(stack: Stack, capacity: int) -> None:
    """An awaitable result waiting in its event loop (an LM call over HTTP, a sleep): the soft
    limit wakes the loop on a pool thread too, and the coroutine's ``finally`` runs."""
    stack.env["DSPEX_HARD_GRACE"] = "30"
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", str(capacity))
    s = dx.session("p")
    s.exec("import asyncio\ncleaned = []\nasync def wait():\n    try:\n        await asyncio.sleep(60)\n"
           "    finally:\n        cleaned.append(True)\n")
    start = time.monotonic()
    with pytest.raises(dspex.Timeout) as info:
        s.eval("wait()", timeout=1.0)
    assert info.value.details.get("stopped") is True and not info.value.details.get("hard")
    assert time.monotonic() - start < 5
    assert s.eval("cleaned") == [True]


@pytest.mark.parametrize("capacity", [1, 4])
def test_hard_limit_recycles_the_worker(stack: Stack, capacity: int) -> None:
    stack.env["DSPEX_HARD_GRACE"] = "1"
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", str(capacity))
    s = dx.session("p")
    stubborn = textwrap.dedent("""
        import time
        while True:
            try:
                time.sleep(60)
            except BaseException:
                pass
    """)
    err, took = _timed_out(s, stubborn, 1.0)
    assert err.details.get("stopped") is True and err.details.get("hard") is True
    assert took < 6
    worker = stack.procs[-1]
    wait_for(lambda: worker.poll() is not None, what="the worker to exit")
    with pytest.raises(dspex.SessionWorkerUnavailable):
        s.eval("1")


def test_a_streams_timeout_is_per_item(stack: Stack) -> None:
    stack.env["DSPEX_HARD_GRACE"] = "30"
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    s.exec("import time\ndef slow(n, pause):\n    for i in range(n):\n        time.sleep(pause)\n        yield i\n")
    # 6 items 0.4 s apart: 2.4 s in all, each well within the 1.5 s timeout
    assert list(s.stream_eval("slow(6, 0.4)", timeout=1.5)) == [0, 1, 2, 3, 4, 5]
    stream = s.stream_eval("slow(3, 30)", timeout=1.0)
    start = time.monotonic()
    with pytest.raises(dspex.Timeout) as info:
        list(stream)
    assert info.value.details.get("stopped") is True
    assert time.monotonic() - start < 5
    assert s.eval("1 + 1") == 2


@pytest.mark.parametrize("capacity", [1, 4])
def test_soft_limit_never_cuts_a_reply_in_two(stack: Stack, capacity: int) -> None:
    stack.env["DSPEX_HARD_GRACE"] = "30"
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", str(capacity))
    s = dx.session("p")
    heard: list[object] = []
    for _ in range(3):  # the limit lands while output events are being sent
        err, _took = _timed_out_with_output(s, "while True:\n    print('x' * 100)\n", 1.0, heard.append)
        assert err.details.get("stopped") is True
    assert heard
    for i in range(20):  # every later reply is whole and is the right one
        assert s.eval(f"{i} * 2") == i * 2


def _timed_out_with_output(s: dspex.Session, source: str, timeout: float, on_output: Any) -> tuple[dspex.Timeout, float]:
    start = time.monotonic()
    with pytest.raises(dspex.Timeout) as info:
        s.exec(source, timeout=timeout, on_output=on_output)
    return info.value, time.monotonic() - start


@pytest.mark.parametrize("capacity", [1, 4])
def test_soft_limit_stops_an_awaited_coroutine(stack: Stack, capacity: int) -> None:
    stack.env["DSPEX_HARD_GRACE"] = "30"
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", str(capacity))
    s = dx.session("p")
    s.exec("import asyncio\nasync def slow():\n    while True:\n        await asyncio.sleep(0.05)\n")
    start = time.monotonic()
    with pytest.raises(dspex.Timeout) as info:
        s.eval("slow()", timeout=1.0)
    assert info.value.details.get("stopped") is True
    assert time.monotonic() - start < 5
    assert s.eval("1 + 1") == 2


EVALUATE = textwrap.dedent("""
    import time
    import dspy
    from dspy.utils import DummyLM

    class SlowLM(DummyLM):
        def forward(self, prompt=None, messages=None, **kwargs):
            time.sleep(0.3)
            return super().forward(prompt=prompt, messages=messages, **kwargs)

    lm = SlowLM([{"answer": "a"}] * 200)
    dspy.configure(lm=lm)
    devset = [dspy.Example(question=f"Question {i}?", answer="a").with_inputs("question") for i in range(40)]
    evaluate = dspy.Evaluate(devset=devset, metric=lambda ex, pred, trace=None: ex.answer == pred.answer,
                             num_threads=2, display_progress=False)
""")


@pytest.mark.parametrize("capacity", [1, 4])
def test_soft_limit_stops_the_threads_of_an_evaluate(stack: Stack, capacity: int) -> None:
    stack.env["DSPEX_HARD_GRACE"] = "30"
    dx = stack.pool("p:strict_queue", 1, "--capacity", str(capacity))
    s = dx.session("p")
    s.exec(EVALUATE)
    with pytest.raises(dspex.Timeout) as info:
        s.eval("evaluate(dspy.Predict('question -> answer'))", timeout=1.5)
    assert info.value.details.get("stopped") is True
    at_timeout = s.eval("len(lm.history)")
    assert 1 <= at_timeout < 40
    time.sleep(1.5)  # an observation window: 2 threads x 0.3 s per LM call would add ~10 calls
    assert s.eval("len(lm.history)") <= at_timeout + 2  # only the calls in flight finish


def test_a_call_that_replaces_the_sigint_handler_does_not_disarm_the_next_limit(stack: Stack) -> None:
    stack.env["DSPEX_HARD_GRACE"] = "30"
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    s.exec("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)")
    err, took = _timed_out(s, "time.sleep(60)", 1.0)
    assert err.details.get("stopped") is True and not err.details.get("hard")
    assert took < 5
