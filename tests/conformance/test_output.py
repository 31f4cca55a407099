"""A DSPy program that prints, warns, logs and draws a progress bar: in-process and through a
session, the same lines reach the same places (stdout, stderr, the loggers, the warnings) with no
``on_output`` callback: the client forwards a call's output by default (dspex.client.output)."""

from __future__ import annotations

import logging
import os
import pathlib
import re
import signal
import threading
import time
import warnings
from typing import Any

import dspy
import pytest
from dspy.utils.dummies import DummyLM

import dspex
from tests.conformance.harness import INPROCESS
from tests.harness import wait_for


def exact_answer(example: Any, pred: Any, trace: Any = None) -> bool:
    return bool(example.answer == pred.answer)


def chatty_evaluation() -> float:
    """Evaluate from DSPy's docs (tests/evaluate), with a user logger and a warning around it."""
    log = logging.getLogger("conformance.app")
    dspy.configure(lm=DummyLM([{"answer": "Paris"}, {"answer": "Rome"}, {"answer": "Paris"}]))
    devset = [dspy.Example(question=f"Capital of France? ({i})", answer="Paris").with_inputs("question")
              for i in range(3)]
    log.info("evaluating %d examples", len(devset))
    log.debug("below the level: nowhere")
    print("starting")
    warnings.warn("the devset is tiny", UserWarning)
    result = dspy.Evaluate(devset=devset, metric=exact_answer, display_progress=True, num_threads=1)(
        dspy.Predict("question -> answer"))
    dspy.inspect_history(n=1)
    try:
        1 / 0  # noqa: B018 - the error to log
    except ZeroDivisionError:
        log.exception("a metric broke")
    return float(result.score)


def _lines(text: str) -> list[str]:
    """Each line's last state (a bar redraws in place), times and rates left out."""
    finals = [line.split("\r")[-1] for line in text.split("\n")]
    return [re.sub(r"\d{4}[/-]\d\d[/-]\d\d[ T]\d\d:\d\d:\d\d(\.\d+)?|\[[^\]]*\]", "<t>", line)
            for line in finals if line.strip()]


def _observe(fn: Any, capsys: Any, caplog: Any) -> dict[str, Any]:
    caplog.clear()
    with pytest.warns(UserWarning) as warned:
        score = fn()
    captured = capsys.readouterr()
    return {
        "score": score,
        "stdout": _lines(captured.out),
        "stderr": _lines(captured.err),
        "records": [(r.name, r.levelname, r.getMessage(), (r.exc_text or "").splitlines()[-1:])
                    for r in caplog.records if r.name.startswith("conformance")],
        "warnings": [(w.category.__name__, str(w.message)) for w in warned],
    }


def test_print_warn_log_and_progress_reach_the_same_places(session: dspex.Session, capsys: Any,
                                                           caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="conformance.app")
    local = _observe(chatty_evaluation, capsys, caplog)
    dspy.configure(lm=None)
    remote = _observe(lambda: session.run(chatty_evaluation), capsys, caplog)
    assert remote == local
    assert local["score"] == pytest.approx(66.67, abs=0.01)
    assert local["stdout"][0] == "starting"
    assert any(line.startswith("Average Metric: 2.00 / 3 (66.7%): 100%|") for line in local["stdout"])
    assert any("Paris" in line for line in local["stdout"])  # inspect_history
    assert any("INFO dspy.evaluate.evaluate: Average Metric: 2 / 3 (66.7%)" in line for line in local["stderr"])
    assert local["records"] == [
        ("conformance.app", "INFO", "evaluating 3 examples", []),
        ("conformance.app", "ERROR", "a metric broke", ["ZeroDivisionError: division by zero"])]
    assert local["warnings"] == [("UserWarning", "the devset is tiny")]
    # the forwarded records say where they come from
    forwarded = [r for r in caplog.records if r.name == "conformance.app"]
    assert forwarded and all(r.dspex_session == session.id and r.dspex_worker == session.worker for r in forwarded)


def warn_about_the_option(value: int) -> int:
    warnings.warn("the option is deprecated", UserWarning)
    return value


def test_a_warning_shows_in_each_call_that_warns_it(run: Any) -> None:
    """``pytest.warns`` around each of two calls of one program that warns the same text at the
    same place (a test module's tests sharing one session): each sees its call's warning, as
    in-process, where ``catch_warnings`` makes the "once per place" registries start again. The
    worker's registry of the session's module noted the place at the first call and kept the
    second call from sending it at all."""
    for value in (1, 2):
        with pytest.warns(UserWarning, match="the option is deprecated") as warned:
            assert run(warn_about_the_option, value) == value
        assert [str(w.message) for w in warned] == ["the option is deprecated"]


async def lookup(key: str) -> str:
    return key


class Replier:
    def fail(self) -> None:
        pending = lookup("y")  # noqa: F841 - a coroutine nobody awaits, dropped with the error's traceback
        raise ValueError("no reply")


def fail_with_a_pending_coroutine() -> None:
    Replier().fail()


def test_what_dropping_a_calls_error_warns_reaches_the_caller(run: Any) -> None:
    """A coroutine left in a frame of the error's traceback: in-process Python warns "never
    awaited" as the caller's ``except`` drops the error; through a session (``s.run`` or a ref's
    method) that was after the worker had sent the error on, and the warning went to its log."""
    replier = run.put(Replier())
    for call in (lambda: run(fail_with_a_pending_coroutine), replier.fail):
        with pytest.warns(RuntimeWarning) as warned, pytest.raises(ValueError, match="no reply"):
            call()
        assert [str(w.message) for w in warned] == ["coroutine 'lookup' was never awaited"]


def numbers_with_cleanup(n: int) -> Any:
    try:
        yield from range(n)
    finally:
        print("cleaned up")


def say(word: str) -> None:
    print(word)


def test_what_a_generator_left_by_break_prints_as_it_stops_shows_before_the_next_call(
        run: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """``break`` out of a ``for`` over a generator without ``close()``: in-process the generator is
    closed as it is dropped and its ``finally`` prints there; through a session the stream is
    dropped, its producer cancelled without waiting, and the line shows when the client next
    reads (at the latest before the session's next call returns), before that call's own output."""
    stream = numbers_with_cleanup(100_000) if run.mode == INPROCESS else run.s.stream_apply(numbers_with_cleanup,
                                                                                             [100_000])
    taken = []
    for x in stream:
        taken.append(x)
        if x == 2:
            break
    del stream
    run(say, "next")
    assert (taken, capsys.readouterr().out) == ([0, 1, 2], "cleaned up\nnext\n")


def sleeps_with_cleanup(marker: str) -> None:
    try:
        pathlib.Path(marker).touch()
        time.sleep(100)
    finally:
        print("stopped")


def test_what_a_call_prints_as_ctrl_c_stops_it_shows_before_the_next_call(
        run: Any, capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path) -> None:
    """Ctrl-C (SIGINT to the client process) while a call sleeps: in-process its ``finally`` prints
    as the ``KeyboardInterrupt`` goes up; through a session the call is cancelled without waiting,
    and the line shows when the client next reads, before the next call's own output."""
    marker = str(tmp_path / "sleeping")

    def interrupt_once_asleep() -> None:
        wait_for(lambda: os.path.exists(marker), timeout=30, what="the call asleep")
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_once_asleep)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run(sleeps_with_cleanup, marker)
    finally:
        interrupter.join()
    run(say, "next")
    assert capsys.readouterr().out == "stopped\nnext\n"
