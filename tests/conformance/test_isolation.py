"""DSPy settings isolation: sessions that share a worker each see only their own LM.

Every way DSPy code sets the LM (``dspy.configure``, ``dspy.settings.configure``,
``dspy.settings.lm = ...``, ``dspy.context``), on a capacity-1 worker (pool ``t``) and on a
capacity-4 worker (pool ``c4``, calls of the two sessions running at the same time). The
in-process half of each case is the same program run here with fresh settings: each session must
give what its program gives in-process, as if it had the worker to itself.
"""

import concurrent.futures
import importlib
import sys
import threading

import dspy
import pytest
from dspy.utils.dummies import DummyLM

import dspex
from tests.conformance.harness import Runner, as_data, fresh_dspy_settings

SPELLINGS = ["dspy.configure", "dspy.settings.configure", "dspy.settings.lm =", "dspy.context"]


def set_lm(spelling, lm):
    if spelling == "dspy.configure":
        dspy.configure(lm=lm)
    elif spelling == "dspy.settings.configure":
        dspy.settings.configure(lm=lm)
    elif spelling == "dspy.settings.lm =":
        dspy.settings.lm = lm


def ask(spelling, lm, country):
    """One user program: its LM set through ``spelling``, then a question."""
    predict = dspy.Predict("country -> answer")
    if spelling == "dspy.context":
        with dspy.context(lm=lm):
            return predict(country=country).answer
    return predict(country=country).answer


def lm_of(name):
    return DummyLM({c: {"answer": f"{c} says {name}"} for c in ("France", "Italy", "Spain")})


def current_lm_answer(country):
    lm = dspy.settings.lm
    return None if lm is None else dspy.Predict("country -> answer")(country=country).answer


def expected_answer(spelling, name, country):
    with fresh_dspy_settings():
        lm = lm_of(name)
        set_lm(spelling, lm)
        return ask(spelling, lm, country)


@pytest.mark.parametrize("pool", ["t", "c4"], ids=["capacity1", "capacity4"])
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_two_sessions_on_one_worker_keep_their_own_lm(dx: dspex.Client, pool: str, spelling: str) -> None:
    a, b = dx.session(pool), dx.session(pool)
    try:
        lm_a, lm_b = a.put(lm_of("alpha")), b.put(lm_of("beta"))
        a.run(set_lm, spelling, lm_a)
        b.run(set_lm, spelling, lm_b)
        assert a.worker == b.worker, "the pool has one worker: both sessions share it"

        def calls(s: dspex.Session, lm: dspex.Ref) -> list[str]:
            return [s.run(ask, spelling, lm, c) for c in ("France", "Italy", "Spain", "France")]

        futures = [dx.submit(calls, a, lm_a), dx.submit(calls, b, lm_b), dx.submit(calls, a, lm_a)]
        got_a, got_b, got_a2 = (f.result(timeout=60) for f in futures)
        expected = {name: [expected_answer(spelling, name, c) for c in ("France", "Italy", "Spain", "France")]
                    for name in ("alpha", "beta")}
        assert got_a == got_a2 == expected["alpha"]
        assert got_b == expected["beta"]
        if spelling != "dspy.context":  # the session's own setting stays; context ends with the call
            assert a.run(current_lm_answer, "Italy") == "Italy says alpha"
            assert b.run(current_lm_answer, "Italy") == "Italy says beta"
        c = dx.session(pool)
        try:
            assert c.run(current_lm_answer, "Italy") is None, "a fresh session sees no LM"
            assert c.worker == a.worker
        finally:
            c.close(timeout=10)
    finally:
        a.close(timeout=10)
        b.close(timeout=10)


def user_thread_program():
    dspy.configure(lm=lm_of("threaded"))
    predict = dspy.Predict("country -> answer")
    results = []
    thread = threading.Thread(target=lambda: results.append(predict(country="Spain").answer))
    thread.start()
    thread.join()
    return results


def test_thread_started_by_user_code_sees_the_session_lm(run: Runner) -> None:
    assert run.check(user_thread_program) == ["Spain says threaded"]


def test_thread_sees_its_own_session_lm_on_a_shared_worker(dx: dspex.Client) -> None:
    """Capacity-1 worker: another session's LM never shows through to a user thread."""
    other, s = dx.session("t"), dx.session("t")
    try:
        other.run(set_lm, "dspy.configure", lm_of("other"))
        assert s.run(user_thread_program) == ["Spain says threaded"]
        assert other.run(current_lm_answer, "Spain") == "Spain says other"
    finally:
        other.close(timeout=10)
        s.close(timeout=10)


def test_settings_of_one_case_do_not_leak_into_the_next(run: Runner) -> None:
    """Each case starts with no LM, in-process and in a new session (the suite is hermetic)."""
    assert as_data(run(current_lm_answer, "France")) is None


def json_adapter_program():
    dspy.configure(lm=DummyLM([{"answer": "Paris"}], adapter=dspy.JSONAdapter()), adapter=dspy.JSONAdapter(),
                   track_usage=True)
    lm = dspy.settings.lm
    pred = dspy.Predict("question -> answer")(question="Capital of France?")
    return pred.answer, lm.history[-1]["outputs"], type(dspy.settings.adapter).__name__, dspy.settings.track_usage


def chat_adapter_program():
    dspy.configure(lm=DummyLM([{"answer": "Rome"}]))
    lm = dspy.settings.lm
    pred = dspy.Predict("question -> answer")(question="Capital of Italy?")
    return pred.answer, lm.history[-1]["outputs"], type(dspy.settings.adapter).__name__, dspy.settings.track_usage


@pytest.mark.parametrize("pool", ["t", "c4"], ids=["capacity1", "capacity4"])
def test_other_settings_stay_in_their_session(dx: dspex.Client, pool: str) -> None:
    """Not only the LM: the adapter and ``track_usage`` one session configures never reach another."""
    expected = []
    for program in (json_adapter_program, chat_adapter_program):
        with fresh_dspy_settings():
            expected.append(program())
    a, b = dx.session(pool), dx.session(pool)
    try:
        for _ in range(3):
            futures = [dx.submit(a.run, json_adapter_program), dx.submit(b.run, chat_adapter_program)]
            assert [f.result(timeout=60) for f in futures] == expected
        assert a.worker == b.worker
    finally:
        a.close(timeout=10)
        b.close(timeout=10)


class CountingCallback(dspy.utils.callback.BaseCallback):
    def __init__(self):
        self.starts = 0

    def on_module_start(self, call_id, instance, inputs):
        self.starts += 1


def append_a_callback_in_place():
    """DSPy's default ``callbacks`` list changed in place, nothing configured: in-process the
    process's list, seen by every later call."""
    dspy.settings.callbacks.append(CountingCallback())
    return len(dspy.settings.callbacks)


def callback_starts_of_a_call():
    with dspy.context(lm=DummyLM([{"answer": "Paris"}])):
        dspy.Predict("question -> answer")(question="Capital of France?")
    return [callback.starts for callback in dspy.settings.callbacks]


@pytest.mark.parametrize("pool", ["t", "c4"], ids=["capacity1", "capacity4"])
def test_a_default_setting_changed_in_place_stays_in_its_session(dx: dspex.Client, pool: str) -> None:
    """The session's ``dspy.settings.callbacks.append(cb)`` reaches its later calls as it reaches a
    process's in-process, and never another session's on the worker (it changed the worker's
    default list, which every new session then had)."""
    with fresh_dspy_settings():
        expected = [append_a_callback_in_place(), callback_starts_of_a_call(), callback_starts_of_a_call()]
    with fresh_dspy_settings():
        expected_fresh = callback_starts_of_a_call()
    assert expected == [1, [1], [2]] and expected_fresh == []
    a, b = dx.session(pool), dx.session(pool)
    try:
        assert [a.run(append_a_callback_in_place), a.run(callback_starts_of_a_call),
                b.run(callback_starts_of_a_call), a.run(callback_starts_of_a_call)] == [1, [1], [], [2]]
        assert a.worker == b.worker
    finally:
        a.close(timeout=10)
        b.close(timeout=10)
    c = dx.session(pool)
    try:
        assert c.run(callback_starts_of_a_call) == []
    finally:
        c.close(timeout=10)


def threaded_program(configure_here):
    """A program that spreads its questions over threads the way DSPy users do: a
    ``ThreadPoolExecutor``, a bare ``threading.Thread`` and ``dspy.Parallel``, each printing as it
    asks; then what the session's ``dspy.inspect_history`` holds of it."""
    base_lm = importlib.import_module("dspy.clients.base_lm")
    base_lm.GLOBAL_HISTORY.clear()
    if configure_here:
        dspy.configure(lm=lm_of("threaded"))
    predict = dspy.Predict("country -> answer")

    def ask(country):
        print(f"asking about {country}")
        return predict(country=country).answer

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        pooled = list(pool.map(ask, ["France", "Italy"]))
    box = []
    thread = threading.Thread(target=lambda: box.append(ask("Spain")))
    thread.start()
    thread.join()
    loud = dspy.Predict("country -> answer")
    loud.forward = lambda **kw: (print(f"parallel asks about {kw['country']}"), dspy.Predict.forward(loud, **kw))[1]
    parallel = dspy.Parallel(num_threads=2, disable_progress_bar=True)([(loud, {"country": c}) for c in ("Italy", "Spain")])
    return pooled, box, [p.answer for p in parallel], len(base_lm.GLOBAL_HISTORY)


@pytest.mark.parametrize("configure_here", [True, False], ids=["program_configures", "client_configures"])
@pytest.mark.parametrize("pool", ["t", "c4"], ids=["capacity1", "capacity4"])
def test_threads_a_program_starts_carry_its_settings_output_and_history(
        dx: dspex.Client, capsys: pytest.CaptureFixture[str], pool: str, configure_here: bool) -> None:
    """In-process, a thread sees what ``dspy.configure`` set and prints where the program prints;
    a session's threads must too, also on a worker that runs other sessions' calls at once."""
    with fresh_dspy_settings():
        if not configure_here:
            dspy.configure(lm=lm_of("threaded"))
        expected = threaded_program(configure_here)
    expected_lines = sorted(capsys.readouterr().out.splitlines())
    assert expected == (["France says threaded", "Italy says threaded"], ["Spain says threaded"],
                        ["Italy says threaded", "Spain says threaded"], 5)
    other, s = dx.session(pool), dx.session(pool)
    try:
        other.run(set_lm, "dspy.configure", lm_of("other"))
        if not configure_here:
            dspy.configure(lm=lm_of("threaded"))
        futures = [dx.submit(s.run, threaded_program, configure_here),
                   dx.submit(other.run, current_lm_answer, "France")]
        got, other_answer = (f.result(timeout=60) for f in futures)
        assert got == expected
        assert other_answer == "France says other"
        assert sorted(capsys.readouterr().out.splitlines()) == expected_lines
    finally:
        other.close(timeout=10)
        s.close(timeout=10)


def ask_through_a_shared_executor(country):
    """An executor that outlives calls and serves several sessions, as one an installed library
    keeps in a module global would (here on ``sys``, shared by every session of the worker)."""
    if not hasattr(sys, "dspex_shared_executor"):
        sys.dspex_shared_executor = concurrent.futures.ThreadPoolExecutor(1)
    return sys.dspex_shared_executor.submit(current_lm_answer, country).result()


def test_a_shared_executor_runs_each_sessions_task_as_that_sessions(dx: dspex.Client) -> None:
    a, b = dx.session("c4"), dx.session("c4")
    try:
        a.run(set_lm, "dspy.configure", lm_of("alpha"))
        b.run(set_lm, "dspy.configure", lm_of("beta"))
        assert a.run(ask_through_a_shared_executor, "Italy") == "Italy says alpha"  # a's call starts its thread
        assert b.run(ask_through_a_shared_executor, "Spain") == "Spain says beta"
        assert a.worker == b.worker
    finally:
        a.close(timeout=10)
        b.close(timeout=10)


def a_thread_fails():
    def fail():
        raise LookupError("no answer for Atlantis")

    thread = threading.Thread(target=fail)
    thread.start()
    thread.join()
    return "joined"


@pytest.mark.parametrize("pool", ["t", "c4"], ids=["capacity1", "capacity4"])
def test_a_failing_threads_traceback_reaches_the_callers_stderr(dx: dspex.Client, capsys: pytest.CaptureFixture[str],
                                                               pool: str) -> None:
    """In-process, Python's default ``threading.excepthook`` prints an uncaught exception of a thread
    to ``sys.stderr`` ("Exception in thread ..."); pytest replaces that hook here, so the session's
    half alone is checked: the traceback is written where the program's stderr goes."""
    s = dx.session(pool)
    try:
        assert s.run(a_thread_fails) == "joined"
        err = capsys.readouterr().err
        assert "Exception in thread" in err and "LookupError: no answer for Atlantis" in err
    finally:
        s.close(timeout=10)
