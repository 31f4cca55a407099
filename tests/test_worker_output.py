"""What user code prints or warns reaches its caller (on_output) and the worker log, tagged."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Stack, wait_for


def _log(stack: Stack) -> str:
    return Path(stack.root, "worker-p.log").read_text(errors="replace")


def test_print_and_warnings_reach_the_caller_and_the_tagged_log(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    events: list[dict[str, Any]] = []
    with pytest.warns(UserWarning, match="careful now"):  # forwarded to this process too
        assert s.exec(textwrap.dedent("""
            import sys, threading, warnings
            print("hello from the call")
            warnings.warn("careful now")
            sys.stderr.write("an error line\\n")
            t = threading.Thread(target=lambda: print("from a user thread"))
            t.start(); t.join()
            done = 1
        """), on_output=events.append)["done"] == 1
    got = [(e["stream"], e["text"]) for e in events]
    assert ("stdout", "hello from the call\n") in got
    assert ("stderr", "an error line\n") in got
    assert ("stdout", "from a user thread\n") in got
    assert any(stream == "warning" and "careful now" in text for stream, text in got)
    # the worker log has every line, tagged with the session and request id
    tag = f"[{s.id[:8]} "
    wait_for(lambda: "from a user thread" in _log(stack), what="output in the worker log")
    lines = [line for line in _log(stack).splitlines() if "hello from the call" in line]
    assert lines and tag in lines[0] and "stdout" in lines[0]
    # no listener: the log still gets it
    s.exec("print('unheard')")
    wait_for(lambda: any(tag in line and "unheard" in line for line in _log(stack).splitlines()),
             what="unheard output logged")


def test_progress_bars_leave_whole_lines_in_the_log(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    events: list[dict[str, Any]] = []
    s.exec(textwrap.dedent("""
        from tqdm import tqdm
        for _ in tqdm(range(50), desc="bar", mininterval=0, miniters=1):
            pass
    """), on_output=events.append)
    assert "".join(e["text"] for e in events).count("\r") > 10  # the caller sees the redraws
    wait_for(lambda: "bar: 100%" in _log(stack), what="the finished bar in the log")
    text = _log(stack)
    assert "\r" not in text
    bar_lines = [line for line in text.splitlines() if "bar:" in line]
    assert len(bar_lines) == 1, bar_lines  # one line for the finished bar, not one per redraw
    assert os.path.getsize(Path(stack.root, "worker-p.log")) < 20_000


def test_a_call_that_rebinds_stdout_does_not_take_the_next_calls_output(stack: Stack) -> None:
    dx = stack.pool("p:strict_queue", 1, "--no-dspy")
    s = dx.session("p")
    s.exec("import io, sys\nsink = io.StringIO()\nsys.stdout = sink\nprint('kept by the call')")
    other = dx.session("p")
    events: list[dict[str, Any]] = []
    other.exec("print('for the caller')", on_output=events.append)
    assert [e["text"] for e in events] == ["for the caller\n"]
    assert s.eval("sink.getvalue()") == "kept by the call\n"


def test_a_bar_created_while_dspy_clears_the_registry_does_not_fail() -> None:
    """dspy.Evaluate/ParallelExecutor run ``tqdm.tqdm._instances.clear()``; on a capacity-N worker
    another session's thread may be between tqdm's ``__new__`` (registers the bar) and
    ``__init__`` (removes a disabled one again): that interleaving, replayed in order."""
    import tqdm

    from worker import output

    saved = tqdm.tqdm._instances
    try:
        output.share_progress_bars()
        bar = tqdm.tqdm.__new__(tqdm.tqdm)  # thread A: registered
        tqdm.tqdm._instances.clear()  # thread B: dspy resets the registry
        bar.__init__(total=3, disable=True)  # thread A: KeyError without the shared registry
        assert bar.disable
    finally:
        tqdm.tqdm._instances = saved


def test_late_output_held_for_the_next_call_is_bounded_and_says_what_it_left_out() -> None:
    from worker.sink import MAX_LATE_CHARS, LateOutput, OutputSink

    late = LateOutput()
    ended = OutputSink("ended 1", lambda event: None)
    ended.late = late
    ended.close()
    line = "x" * 99 + "\n"
    n = MAX_LATE_CHARS // len(line) + 10
    for _ in range(n):
        ended.write("stdout", line)  # a thread of the ended call, writing on
    events: list[dict[str, Any]] = []
    nxt = OutputSink("next 2", events.append)
    late.attach(nxt)
    nxt.write("stdout", "the next call's own line\n")
    late.detach(nxt)
    nxt.close()
    out = "".join(e["text"] for e in events if e["stream"] == "stdout")
    kept = MAX_LATE_CHARS // len(line)
    assert out == line * kept + "the next call's own line\n"
    err = "".join(e["text"] for e in events if e["stream"] == "stderr")
    assert f"[dspex: {(n - kept) * len(line)} more characters" in err
    again: list[dict[str, Any]] = []
    third = OutputSink("third 3", again.append)
    late.attach(third)  # nothing held any more
    late.detach(third)
    third.close()
    assert again == []
