"""Thread-capacity workers, the asyncio client, and streaming replies (real processes)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from offline_lm import offline_lm

import dspex
import dspex.aio
from dspex.wire.protocol import STREAM_WINDOW
from tests.harness import Stack, wait_for

pytestmark = pytest.mark.timeout(90)

SLEEP_SPAN = "(lambda t0: (__import__('time').sleep({s}), (t0, __import__('time').time()))[1])(__import__('time').time())"


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_capacity_runs_sessions_in_parallel_and_one_session_in_order(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", "4")
    assert stack.workers("p")[0]["capacity"] == 4
    sessions = [dx.session("p") for _ in range(4)]
    for s in sessions:
        s.eval("1")
    assert len({s.worker for s in sessions}) == 1
    started = time.monotonic()
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda s: s.eval(SLEEP_SPAN.format(s=1.0)), sessions))
    parallel = time.monotonic() - started
    assert parallel < 2.5, f"four 1 s calls of four sessions took {parallel:.2f}s on a capacity-4 worker"

    one = sessions[0]
    with ThreadPoolExecutor(4) as ex:
        spans = sorted(ex.map(lambda _: one.eval(SLEEP_SPAN.format(s=0.3)), range(4)))
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end - 0.005, "calls of one session overlapped"


def test_threaded_worker_keeps_session_lms_isolated(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--capacity", "4")
    a, b = dx.session("p"), dx.session("p")
    for s, model in ((a, "offline/alpha"), (b, "offline/beta")):
        lm = s.put(offline_lm(model))
        s.call("dspy", "configure", kwargs={"lm": lm})
    probe = "(__import__('time').sleep(0.05), __import__('dspy').settings.lm.model)[1]"

    def check(i: int) -> bool:
        s, model = (a, "offline/alpha") if i % 2 else (b, "offline/beta")
        return bool(s.eval(probe) == model)

    with ThreadPoolExecutor(8) as ex:
        assert all(ex.map(check, range(40)))


def test_asyncio_gather_50_calls_over_10_sessions(stack: Stack) -> None:
    stack.pool("p:strict_queue", 2, "--no-dspy")

    async def main() -> list[tuple[str, int, int]]:
        async with dspex.aio.connect(stack.frontend, timeout=20) as dx:
            sessions = [dx.session("p") for _ in range(10)]
            calls = [s.eval("(sid, i, __import__('os').getpid())", {"sid": s.id, "i": i})
                     for i in range(5) for s in sessions]
            return list(await asyncio.gather(*calls))

    results = asyncio.run(main())
    assert len(results) == 50
    pid_of: dict[str, set[int]] = {}
    for sid, _, pid in results:
        pid_of.setdefault(sid, set()).add(pid)
    assert len(pid_of) == 10 and all(len(p) == 1 for p in pid_of.values()), "affinity held under asyncio"


def test_stream_10k_items_in_order_with_bounded_broker_memory(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    s.exec("produced = [0]\ndef gen(n):\n    for i in range(n):\n        produced[0] = i + 1\n        yield {'i': i, 'pad': 'x' * 1000}\n")
    assert stack.broker is not None
    before = rss_kb(stack.broker.pid)
    stream = s.stream_eval("gen(10000)")
    got = []
    for n, item in enumerate(stream):
        got.append(item["i"])
    assert got == list(range(10000))
    assert stream.result == {"items": 10000, "value": None}
    assert rss_kb(stack.broker.pid) - before < 20_000, "broker memory grew with the stream"


def test_slow_consumer_holds_producer_to_the_window(stack: Stack) -> None:
    # capacity 2: a second session on the same worker can watch the producer while it streams
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", "2")
    s, watcher = dx.session("p"), dx.session("p")
    s.exec("import sys\nsys.produced = 0\ndef gen(n):\n    for i in range(n):\n        sys.produced = i + 1\n"
           "        yield i\n")
    stream = s.stream_eval("gen(100000)")
    assert next(stream) == 0
    readings: list[int] = []

    def settled() -> bool:
        readings.append(int(watcher.eval("__import__('sys').produced")))
        return len(readings) >= 5 and readings[-1] == readings[-5]

    wait_for(settled, timeout=10, interval=0.05, what="producer blocked on credit")
    assert readings[-1] <= STREAM_WINDOW + 1, f"producer ran {readings[-1]} items ahead of a consumer that read 1"
    stream.close()
    assert s.eval("1 + 1") == 2  # the session is usable again: the producer was stopped


def test_cancel_mid_stream_stops_producer(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    s.exec("state = {'closed': False, 'n': 0}\n"
           "def gen():\n    try:\n        while True:\n            state['n'] += 1\n            yield state['n']\n"
           "    finally:\n        state['closed'] = True\n")
    with s.stream_eval("gen()") as stream:
        for item in stream:
            if item == 10:
                break
    assert s.eval("state['closed']") is True
    n = s.eval("state['n']")
    assert n < 10 + 2 * STREAM_WINDOW
    assert s.eval("state['n']") == n, "producer stopped"


def test_async_stream_and_cancel(stack: Stack) -> None:
    stack.pool("p:strict_queue", 1, "--no-dspy")

    async def main() -> tuple[list[int], bool]:
        async with dspex.aio.connect(stack.frontend, timeout=20) as dx:
            s = dx.session("p")
            await s.exec("state = {'closed': False}\n"
                         "async def agen(n):\n    try:\n        for i in range(n):\n            yield i\n"
                         "    finally:\n        state['closed'] = True\n")
            items = [i async for i in s.stream_eval("agen(500)")]
            await s.eval("state.update(closed=False)")
            async with contextlib.aclosing(s.stream_eval("agen(10**9)")) as it:
                async for i in it:
                    if i == 5:
                        break
            return items, bool(await s.eval("state['closed']"))

    items, closed = asyncio.run(main())
    assert items == list(range(500))
    assert closed


def test_sigkill_mid_stream_gives_worker_crashed(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    pid = s.call("os", "getpid")
    s.exec("def gen():\n    i = 0\n    while True:\n        i += 1\n        __import__('time').sleep(0.01)\n        yield i\n")
    stream = s.stream_eval("gen()")
    with pytest.raises(dspex.WorkerCrashed):
        for item in stream:
            if item == 5:
                stack.kill(pid)


def test_progress_events_of_a_long_call(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    s.exec("from dspex import progress\n"
           "def work(n):\n    for i in range(n):\n        progress.report({'step': i + 1, 'of': n})\n    return 'done'\n")
    events: list[object] = []
    assert s.eval("work(5)") == "done"  # without a listener: no events, same result
    assert s.method(s.eval("work"), "__call__", [5], on_progress=events.append) == "done"
    assert events == [{"step": i, "of": 5} for i in range(1, 6)]


def test_status_shows_slots(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from dspexctl.cli import main

    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", "4")
    s = dx.session("p")
    s.eval("1")
    t = threading.Thread(target=s.call, args=("time", "sleep", [1.5]), daemon=True)
    t.start()
    wait_for(lambda: stack.workers("p")[0]["inflight"] == 1, what="one slot in use")
    monkeypatch.chdir(stack.root)  # no supervisor.conf here: the broker's view alone
    monkeypatch.delenv("DSPEX_SUPERVISOR_CONF", raising=False)
    result = CliRunner().invoke(main, ["--endpoint", stack.frontend, "pools", "status", "-v"])
    assert result.exit_code == 0, result.output
    assert "SLOTS" in result.output and "1/4" in result.output
    t.join(5)
