"""User code cannot take a worker down, and timeouts stop work (pool ``t``: one capacity-1 worker).

In-process, each program raises (or runs long) as written; through a session the same program
gives a typed error, and the session and its worker go on serving with their state.
"""

import argparse
import os
import sys
import time

import dspy
import pytest
from dspy.utils.dummies import DummyLM

import dspex
from tests.harness import wait_for


class UnprintableError(Exception):
    def __str__(self):
        raise RuntimeError("__str__ itself fails")


def raise_system_exit():
    raise SystemExit(3)


def call_sys_exit():
    sys.exit("goodbye")


def parse_bad_arguments():
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--count", type=int)
    return parser.parse_args(["--count", "many"])


def raise_keyboard_interrupt():
    raise KeyboardInterrupt


def raise_generator_exit():
    raise GeneratorExit


def raise_lone_surrogate():
    raise ValueError("cannot decode b'\\xff' -> '\udcff'")


def raise_unprintable():
    raise UnprintableError("payload")


CASES = [
    (raise_system_exit, SystemExit),
    (call_sys_exit, SystemExit),
    (parse_bad_arguments, SystemExit),
    (raise_keyboard_interrupt, KeyboardInterrupt),
    (raise_generator_exit, GeneratorExit),
    (raise_lone_surrogate, ValueError),
    (raise_unprintable, UnprintableError),
]


@pytest.fixture
def solo(dx: dspex.Client):
    s = dx.session("t")
    try:
        yield s
    finally:
        s.close(timeout=10)


@pytest.mark.parametrize("program,kind", CASES, ids=[fn.__name__ for fn, _ in CASES])
def test_user_exception_leaves_the_worker_serving(solo: dspex.Session, capsys, program, kind) -> None:
    with pytest.raises(kind) as local:  # in-process, as written
        program()
    capsys.readouterr()  # argparse printed its usage

    state = solo.put({"kept": [1, 2, 3]})
    pid = solo.run(os.getpid)
    worker = solo.worker
    with pytest.raises(dspex.RemoteError) as info:
        solo.run(program)
    err = info.value
    assert err.type_name.rsplit(".", 1)[-1] == kind.__name__
    assert isinstance(str(err), str) and isinstance(repr(err), str)  # even when the original's __str__ raises
    err.message.encode("utf-8")  # the wire message is always printable and loggable
    if issubclass(kind, Exception):  # an Exception comes back as itself too; SystemExit & co. must not
        assert isinstance(err, kind)
    else:
        assert not isinstance(err, kind)
    if program is raise_lone_surrogate:
        assert "\\udcff" in err.message  # backslashreplace on the wire
        assert str(err) == str(local.value)  # and the exception itself as it was raised
    assert solo.run(os.getpid) == pid and solo.worker == worker, "the worker was replaced"
    assert solo.run(len, state["kept"]) == 3, "the session lost its state"


# -- refs are counted per session ---------------------------------------------------------------


def test_ref_quota_is_per_session(dx: dspex.Client) -> None:
    """A session looping over results that stay refs hits its own quota; another session's
    program and LM on the same worker are never evicted."""
    from tests.conformance.conftest import REF_QUOTA

    owner, looper = dx.session("t"), dx.session("t")
    try:
        owner.run(dspy.configure, lm=DummyLM({"France": {"answer": "Paris"}}))
        program = owner.put(dspy.Predict("country -> answer"))
        with pytest.raises(dspex.RefQuotaExceeded):
            for _ in range(REF_QUOTA + 1):
                looper.put(dspy.Predict("country -> answer"))  # a Module: stays a ref
        assert looper.worker == owner.worker
        assert program(country="France").answer == "Paris"
        assert looper.run(len, [1, 2]) == 2  # the looping session still serves
    finally:
        owner.close(timeout=10)
        looper.close(timeout=10)


# -- timeouts -------------------------------------------------------------------------------------


def test_timeout_stops_a_sleeping_call(solo: dspex.Session) -> None:
    state = solo.put([1, 2, 3])
    pid = solo.run(os.getpid)
    started = time.monotonic()
    with pytest.raises(dspex.Timeout) as info:
        solo.apply(time.sleep, [60], timeout=1.0)  # run()'s options live on apply()
    assert info.value.details.get("stopped") is True
    assert not info.value.details.get("hard")
    assert time.monotonic() - started < 10
    started = time.monotonic()
    assert solo.run(len, state) == 3  # the session serves at once, with its state
    assert time.monotonic() - started < 5
    assert solo.run(os.getpid) == pid


def test_sleep_in_a_pool_thread_costs_its_worker_after_the_grace(dx: dspex.Client, cstack) -> None:
    """Capacity 4: a C-level sleep cannot be interrupted in a pool thread, so past deadline + grace
    the worker is recycled (hard limit) and the caller is told so. A replacement worker is started
    here as supervisord would."""
    s = dx.session("t4")
    old = ""
    try:
        s.run(os.getpid)
        old = s.worker
        started = time.monotonic()
        with pytest.raises(dspex.Timeout) as info:
            s.apply(time.sleep, [60], timeout=1.0)
        assert info.value.details.get("stopped") is True and info.value.details.get("hard") is True
        assert time.monotonic() - started < 30
        with pytest.raises(dspex.SessionWorkerUnavailable):
            s.run(os.getpid)
    finally:
        s.close(timeout=10)
        cstack.start_worker("t4", "--capacity", "4", cwd=os.path.join(cstack.root, "empty"))
        def replaced() -> bool:
            workers = [w["incarnation"] for w in cstack.workers("t4")]
            return len(workers) == 1 and workers[0] != old

        wait_for(replaced, 60, what="a replacement t4 worker, alone in its pool")
    fresh = dx.session("t4")
    try:
        assert fresh.run(sum, [1, 2]) == 3
    finally:
        fresh.close(timeout=10)


class SlowLM(DummyLM):
    """A DummyLM that takes its time, like a provider under load."""

    def forward(self, prompt=None, messages=None, **kwargs):
        time.sleep(0.3)
        return super().forward(prompt=prompt, messages=messages, **kwargs)


def lookup(term: str) -> str:
    """Look a term up."""
    return f"nothing about {term}"


def react_program(lm):
    dspy.configure(lm=lm)
    react = dspy.ReAct("question -> answer", tools=[lookup], max_iters=50)
    return react(question="What is dspex?")


@pytest.mark.parametrize("pool", ["t", "t4"], ids=["capacity1", "capacity4"])
def test_timeout_stops_a_slow_lm_call(dx: dspex.Client, pool: str) -> None:
    """A ReAct loop on a slow LM: past the deadline it stops spending LM calls, on the main thread
    of a capacity-1 worker and in a pool thread of a capacity-4 worker."""
    s = dx.session(pool)
    try:
        step = {"next_thought": "Look it up again.", "next_tool_name": "lookup", "next_tool_args": {"term": "dspex"}}
        lm = s.put(SlowLM([step] * 60))
        pid = s.run(os.getpid)
        started = time.monotonic()
        with pytest.raises(dspex.Timeout) as info:
            s.apply(react_program, [lm], timeout=1.5)
        assert info.value.details.get("stopped") is True
        assert not info.value.details.get("hard")
        assert time.monotonic() - started < 10
        calls_at_timeout = len(lm.history)
        assert 1 <= calls_at_timeout < 60
        s.run(time.sleep, 1.0)  # an observation window on the worker: a call still running would spend LM calls
        assert len(lm.history) == calls_at_timeout
        assert s.run(os.getpid) == pid
    finally:
        s.close(timeout=10)


def slow_evaluate_program(lm):
    dspy.configure(lm=lm)
    devset = [dspy.Example(question=f"Question {i}?", answer="a").with_inputs("question") for i in range(40)]
    evaluate = dspy.Evaluate(devset=devset, metric=lambda ex, pred, trace=None: ex.answer == pred.answer,
                             num_threads=2, display_progress=False)
    return evaluate(dspy.Predict("question -> answer"))


def test_timeout_stops_an_evaluate_running_threads(solo: dspex.Session) -> None:
    """dspy.Evaluate runs the program in its own threads: past the deadline those stop calling the
    LM too (the caller gave up; nobody reads their results)."""
    lm = solo.put(SlowLM({"Question": {"answer": "a"}}))
    with pytest.raises(dspex.Timeout) as info:
        solo.apply(slow_evaluate_program, [lm], timeout=1.5)
    assert info.value.details.get("stopped") is True
    calls_at_timeout = len(lm.history)
    assert 1 <= calls_at_timeout < 40
    solo.run(time.sleep, 1.5)  # an observation window: 2 threads x 0.3 s per LM call would add ~10 calls
    assert len(lm.history) <= calls_at_timeout + 2  # at most the calls in flight at the deadline finish


# -- signal handlers user code sets (last: it may cost pool t its worker) ---------------------------


def ignore_interrupts():
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a CLI tool's "ignore Ctrl-C" does
    signal.signal(signal.SIGALRM, signal.SIG_IGN)


def test_signal_handlers_set_by_user_code_do_not_outlive_the_call(dx: dspex.Client, cstack) -> None:
    from tests.conformance.conftest import REF_QUOTA

    a, b = dx.session("t"), dx.session("t")
    worker = ""
    try:
        a.run(ignore_interrupts)
        worker = a.worker
        assert b.run(os.getpid) and b.worker == worker
        with pytest.raises(dspex.Timeout) as info:
            b.apply(time.sleep, [30], timeout=1.0)
        assert info.value.details.get("stopped") is True
        assert not info.value.details.get("hard"), "the worker was recycled"
        assert b.run(sum, [1, 2]) == 3
    finally:
        a.close(timeout=10)
        b.close(timeout=10)

        def t_worker_alive() -> bool:
            workers = [w["incarnation"] for w in cstack.workers("t")]
            if workers == [worker]:
                probe = dx.session("t")
                try:
                    return probe.apply(os.getpid, timeout=5) > 0 and probe.worker == worker
                except dspex.DspexError:
                    return False
                finally:
                    probe.close(timeout=5)
            return False

        if worker and not t_worker_alive():  # as supervisord would: a fresh worker for pool t
            cstack.start_worker("t", "--ref-cap", str(REF_QUOTA), cwd=os.path.join(cstack.root, "empty"))

            def replaced() -> bool:
                workers = [w["incarnation"] for w in cstack.workers("t")]
                return len(workers) == 1 and workers[0] != worker

            wait_for(replaced, 60, what="a replacement t worker, alone in its pool")
