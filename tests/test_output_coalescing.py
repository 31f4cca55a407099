"""Many small writes travel as few events, and nothing arrives late (worker/sink.py).

A print loop's lines are coalesced into a few events; the first line after a quiet spell goes at
once, the last one before a wait (a sleep, an LM call) shows while the call waits, on a
capacity-1 worker (its stand-in thread sends it, before and after it starts reading for the main
thread) and on a capacity-N one (its reader sends it). Prints keep their order with the call's log
records (each still its own record) and stream items, and all of it arrives before the result.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Stack

pytestmark = pytest.mark.timeout(120)


def print_lines(n: int) -> int:
    for i in range(n):
        print(i)
    return n


def test_a_burst_of_prints_travels_as_few_events(stack: Stack) -> None:
    from worker.sink import COALESCE_WINDOW, MAX_EVENT_CHARS

    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p", forward_output=False)
    events: list[dict[str, Any]] = []
    n = 100_000
    t0 = time.monotonic()
    assert s.apply(print_lines, [n], on_output=events.append) == n
    took = time.monotonic() - t0
    text = "".join(e["text"] for e in events)
    assert text == "".join(f"{i}\n" for i in range(n))
    # one event per window of the call's time or per full event, not one per print
    assert len(events) <= len(text) // MAX_EVENT_CHARS + took / COALESCE_WINDOW + 2, (len(events), took)
    assert all(e["text"].endswith("\n") for e in events)  # whole lines: sessions never splice


@pytest.mark.parametrize("case", ["capacity 1", "capacity 1, past the stand-in's grace", "capacity 2"])
def test_the_last_line_before_a_wait_shows_while_the_call_waits(stack: Stack, tmp_path: Path, case: str) -> None:
    """Lines printed in a burst, then the program waits (here until the client has seen its last
    line, at most 30 s): the last line must not wait for the call's end."""
    capacity = "2" if case == "capacity 2" else "1"
    dx = stack.pool("p:strict_queue", 1, "--no-dspy", "--capacity", capacity)
    marker = tmp_path / "seen"
    start_after = 0.2 if "grace" in case else 0.0

    def burst_then_wait(path: str, delay: float) -> list[Any]:
        import os
        import time

        time.sleep(delay)
        for i in range(50):
            print(f"line {i}")
        deadline = time.monotonic() + 30
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        return [os.path.exists(path), round(30 - (deadline - time.monotonic()), 2)]

    events: list[dict[str, Any]] = []

    def on_output(event: dict[str, Any]) -> None:
        events.append(event)
        if "line 49\n" in event["text"]:
            marker.write_text("seen")

    s = dx.session("p", forward_output=False)
    seen, waited = s.apply(burst_then_wait, [str(marker), start_after], on_output=on_output, timeout=60)
    assert seen, f"the last line arrived only with the result, after {waited}s"
    assert "".join(e["text"] for e in events) == "".join(f"line {i}\n" for i in range(50))
    assert len(events) < 50  # coalesced


def test_the_first_line_after_a_quiet_spell_goes_at_once(stack: Stack, tmp_path: Path) -> None:
    """A single print, then a wait: it goes when printed (no timer involved), and so does one
    printed after the call was quiet for a while."""
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    marker = tmp_path / "seen"

    def print_then_wait(path: str) -> bool:
        import os
        import time

        for text in ("first", "second"):
            print(text)
            deadline = time.monotonic() + 30
            while not os.path.exists(path + text) and time.monotonic() < deadline:
                time.sleep(0.01)
            if not os.path.exists(path + text):
                return False
        return True

    def on_output(event: dict[str, Any]) -> None:
        Path(str(marker) + event["text"].strip()).write_text("seen")

    s = dx.session("p", forward_output=False)
    assert s.apply(print_then_wait, [str(marker)], on_output=on_output, timeout=60)


def prints_and_records(n: int) -> int:
    log = logging.getLogger("tests.coalescing")
    for i in range(n):
        print(f"p{i}")
        log.warning("r%d", i)
    print("tail")
    return n


def test_records_stay_records_in_order_with_prints(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p", forward_output=False)
    events: list[dict[str, Any]] = []
    assert s.apply(prints_and_records, [300], on_output=events.append) == 300
    order: list[str] = []
    for e in events:
        if e["stream"] == "log":
            assert e["logger"] == "tests.coalescing" and e["level"] == logging.WARNING
            order.append(e["message"])
        else:
            order.extend(e["text"].splitlines())
    assert order == [x for i in range(300) for x in (f"p{i}", f"r{i}")] + ["tail"]


def test_prints_keep_their_place_among_stream_items(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p", forward_output=False)

    def chatty_generator(n: int) -> Any:
        for i in range(n):
            for j in range(20):
                print(f"{i}.{j}")
            yield i
        print("after the last item")

    seen: list[str] = []
    stream = s.stream_apply(chatty_generator, [100], on_output=lambda e: seen.extend(e["text"].splitlines()))
    for item in stream:
        seen.append(f"item {item}")
    expected = [x for i in range(100) for x in [f"{i}.{j}" for j in range(20)] + [f"item {i}"]]
    assert seen == expected + ["after the last item"]


def test_a_flushed_partial_line_shows_within_the_window() -> None:
    """A bar's redraw (a partial line the program flushes) goes at once after a quiet spell; one
    that follows soon goes when the window ends, without another write; the caller's text is
    exactly what was written."""
    from worker.sink import COALESCE_WINDOW, OutputSink, flush_timer

    sent: list[str] = []
    sink = OutputSink("t", lambda event: sent.append(event["text"]))
    try:
        sink.write("stderr", "\rbar 0%")
        sink.flush("stderr")
        assert sent == ["\r"]  # the first piece after a quiet spell: at once; the redraw waits
        flush_timer.run(time.monotonic() + COALESCE_WINDOW)
        assert sent == ["\r", "bar 0%"]
        for piece in ["\rbar 50%", None, "\rbar 100%", "\n", "tail", None, " end"]:
            if piece is None:
                sink.flush("stderr")
            else:
                sink.write("stderr", piece)
    finally:
        sink.close()
    assert "".join(sent) == "\rbar 0%\rbar 50%\rbar 100%\ntail end"


def test_text_waits_for_credit_without_blocking_the_timer() -> None:
    """The timer's thread reads the socket credit comes on: without credit it leaves the text
    waiting (in order, ahead of what is written next) and sends it when credit comes."""
    from worker.sink import COALESCE_WINDOW, OutputSink, flush_timer

    sent: list[str] = []
    credit = {"n": 1}
    told: list[Any] = []

    def offer(event: dict[str, Any], on_credit: Any) -> bool:
        if not credit["n"]:
            told.append(on_credit)
            return False
        credit["n"] -= 1
        sent.append(event["text"])
        return True

    sink = OutputSink("t", lambda event: sent.append(event["text"]), offer=offer)
    try:
        sink.write("stdout", "a\n")  # at once, through emit
        sink.write("stdout", "b\n")
        sink.write("stderr", "c\n")
        flush_timer.run(time.monotonic() + COALESCE_WINDOW)  # credit for one event of the two
        assert sent == ["a\n", "b\n"] and len(told) == 1
        flush_timer.run(time.monotonic() + 10 * COALESCE_WINDOW)
        assert sent == ["a\n", "b\n"]  # starved: the timer does not retry by itself
        credit["n"] = 5
        told.pop()()
        flush_timer.run(time.monotonic())
        assert sent == ["a\n", "b\n", "c\n"]
    finally:
        sink.close()
