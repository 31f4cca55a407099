"""The client's LM history after ``s.run(program)`` is what it is after ``program()`` in-process.

DSPy's docs debug a program with ``lm.history`` and ``dspy.inspect_history(n)``
(https://dspy.ai/learn/programming/language_models/ "Inspecting output and usage metadata",
the quick-start's ``dspy.inspect_history(n=1)``). Each case runs the same program in-process with
one LM and through a session with an equal one, both configured on the client with
``dspy.configure(lm=...)``, and compares the two LMs' histories (length, messages, outputs,
kwargs, model) and what ``dspy.inspect_history`` prints (timestamps aside).
"""

from __future__ import annotations

import io
import re
from typing import Any

import dspy
import pytest
from dspy.utils import DummyLM

import dspex
from tests.conformance.harness import fresh_dspy_settings

ANSWERS = {"What is the capital of France?": {"reasoning": "It is Paris.", "answer": "Paris"},
           "What is 2 + 2?": {"reasoning": "Two and two.", "answer": "4"},
           "Is Paris the answer to 'What is the capital of France?'": {"verdict": "yes"}}
JUDGE = DummyLM({"Paris": {"verdict": "yes"}, "4": {"verdict": "yes"}})  # a module global: sent once, by key


def make_lm() -> DummyLM:
    return DummyLM({q: a for q, a in ANSWERS.items() if "answer" in a})


class QAWithJudge(dspy.Module):
    """DSPy docs "Modules": a custom module with two predictors; the judge runs on its own LM."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = dspy.ChainOfThought("question -> answer")
        self.judge = dspy.Predict("answer -> verdict")

    def forward(self, question: str) -> dspy.Prediction:
        pred = self.answer(question=question)
        with dspy.context(lm=JUDGE):
            verdict = self.judge(answer=pred.answer).verdict
        return dspy.Prediction(answer=pred.answer, verdict=verdict)


def quick_start() -> str:
    """DSPy's quick-start: ChainOfThought over the configured LM, two questions."""
    qa = dspy.ChainOfThought("question -> answer")
    return " ".join(qa(question=q).answer for q in ("What is the capital of France?", "What is 2 + 2?"))


def two_lms() -> list[str]:
    program = QAWithJudge()
    return [program(question=q).verdict for q in ("What is the capital of France?", "What is 2 + 2?")]


def raises_after_a_call() -> None:
    dspy.Predict("question -> answer")(question="What is 2 + 2?")
    raise ValueError("after the LM call")


def batch_of_questions() -> list[str]:
    qa = dspy.Predict("question -> answer")
    examples = [dspy.Example(question=q).with_inputs("question") for q in ("What is the capital of France?",
                                                                            "What is 2 + 2?")]
    return sorted(p.answer for p in qa.batch(examples, num_threads=2))


def own_lm() -> str:
    dspy.configure(lm=DummyLM([{"answer": "mine"}]))  # the session's own LM: its history stays there
    return dspy.Predict("question -> answer")(question="What is 2 + 2?").answer


def _comparable(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in ("prompt", "messages", "kwargs", "outputs", "model", "model_type", "usage")}


def _inspected(n: int) -> str:
    out = io.StringIO()
    dspy.inspect_history(n=n, file=out)
    return re.sub(r"\[\d{4}-\d\d-\d\dT[\d:.]+\]", "[time]", out.getvalue())


def _run_both(session: dspex.Session, program: Any, lms: tuple[Any, ...] = (),
              ordered: bool = True) -> tuple[Any, Any, Any, Any]:
    """(in-process LM, session LM, in-process inspect_history text, session's) after running
    ``program`` both ways, each with a fresh configured LM; ``lms`` are other LMs it uses,
    whose history is compared too (emptied before each run). Not ``ordered``: the program's
    threads call the LM in any order; histories are compared as sorted lists."""
    global_history = __import__("dspy.clients.base_lm", fromlist=["GLOBAL_HISTORY"]).GLOBAL_HISTORY
    results = []
    for mode in ("inprocess", "session"):
        for other in lms:
            other.history.clear()
        global_history.clear()
        lm = make_lm()
        with fresh_dspy_settings():
            dspy.configure(lm=lm)
            try:
                out = program() if mode == "inprocess" else session.run(program)
            except ValueError as exc:  # a RemoteError of the ValueError through the session: compared below
                out = ("ValueError", str(exc))
            n = len(global_history)
            results.append((out, lm, [list(o.history) for o in lms], n, _inspected(max(n, 1))))
    (out_a, lm_a, others_a, n_a, text_a), (out_b, lm_b, others_b, n_b, text_b) = results
    assert out_b == out_a
    assert n_b == n_a and n_a > 0

    def listed(history: list[dict[str, Any]]) -> list[Any]:
        entries = [_comparable(e) for e in history]
        return entries if ordered else sorted(entries, key=repr)

    assert listed(lm_b.history) == listed(lm_a.history)
    assert len(lm_a.history) > 0
    for hist_a, hist_b in zip(others_a, others_b):
        assert listed(hist_b) == listed(hist_a)
    if ordered:
        assert text_b == text_a
    return lm_a, lm_b, text_a, text_b


def test_quick_start_history_reaches_the_clients_lm(session: dspex.Session) -> None:
    lm_a, lm_b, _, text = _run_both(session, quick_start)
    assert len(lm_b.history) == 2 and "What is 2 + 2?" in text
    assert lm_b.history[-1]["response"].text == lm_a.history[-1]["response"].text  # the response by value


def test_two_lms_in_call_order(session: dspex.Session) -> None:
    """The configured LM and a module global LM used through ``dspy.context``: each LM's own
    history, and the global history interleaved in call order."""
    _, lm_b, _, text = _run_both(session, two_lms, lms=(JUDGE,))
    assert len(lm_b.history) == 2 and len(JUDGE.history) == 2
    assert text.index("What is the capital of France?") < text.index("verdict") < text.index("What is 2 + 2?")


def test_history_of_a_call_that_raises(session: dspex.Session) -> None:
    _, lm_b, _, _ = _run_both(session, raises_after_a_call)
    assert len(lm_b.history) == 1


@pytest.mark.parametrize("pool", ["c1", "c4"])
def test_history_of_threads_the_program_starts(dx: dspex.Client, pool: str) -> None:
    s = dx.session(pool)
    try:
        _, lm_b, _, _ = _run_both(s, batch_of_questions, ordered=False)
        assert len(lm_b.history) == 2
    finally:
        s.close(timeout=10)


def test_an_lm_the_session_configured_keeps_its_history(session: dspex.Session) -> None:
    lm = make_lm()
    with fresh_dspy_settings():
        dspy.configure(lm=lm)
        assert session.run(own_lm) == "mine"
        assert lm.history == []
    assert session.run(lambda: len(dspy.settings.lm.history)) == 1


def test_disable_history_turns_it_off_both_ways(session: dspex.Session) -> None:
    """DSPy's own switch, ``dspy.configure(disable_history=True)``, is the opt-out: nothing is
    recorded in-process, and through a session nothing is recorded or sent back."""
    for mode in ("inprocess", "session"):
        lm = make_lm()
        with fresh_dspy_settings():
            dspy.configure(lm=lm, disable_history=True)
            assert (quick_start() if mode == "inprocess" else session.run(quick_start)) == "Paris 4"
        assert lm.history == [], mode


class Verdict:
    """A class of this module: on the worker the session's own copy, which plain pickle cannot name."""

    def __init__(self, text: str) -> None:
        self.text = text


class RecordingLM(DummyLM):
    """An LM whose history entries hold an object of a session class (sent back by value)."""

    def update_history(self, entry: dict[str, Any]) -> None:
        super().update_history({**entry, "verdict": Verdict(entry["outputs"][0])})


def test_entries_holding_the_sessions_own_objects_come_back_by_value(session: dspex.Session) -> None:
    lm = RecordingLM({q: a for q, a in ANSWERS.items() if "answer" in a})
    with fresh_dspy_settings():
        dspy.configure(lm=lm)
        assert session.run(quick_start) == "Paris 4"
    assert [type(e["verdict"]).__name__ for e in lm.history] == ["Verdict", "Verdict"]
    assert [e["verdict"].text for e in lm.history] == [e["outputs"][0] for e in lm.history]


def answers_one_by_one():
    qa = dspy.Predict("question -> answer")
    for q in ("What is the capital of France?", "What is 2 + 2?"):
        yield qa(question=q).answer


def test_a_streamed_call_brings_its_history_too(session: dspex.Session) -> None:
    lm = make_lm()
    with fresh_dspy_settings():
        dspy.configure(lm=lm)
        assert list(session.stream_apply(answers_one_by_one)) == ["Paris", "4"]
    assert [e["outputs"][0].rsplit("\n", 1)[-1] for e in lm.history] == ["Paris", "4"]


def test_the_asyncio_client_brings_it_too(cstack: Any) -> None:
    import asyncio

    lm = make_lm()

    async def main() -> str:
        client = dspex.aio.connect(cstack.frontend, timeout=60)
        try:
            s = client.session("c1")
            try:
                return str(await s.run(quick_start))
            finally:
                await s.close()
        finally:
            await client.close()

    with fresh_dspy_settings():
        dspy.configure(lm=lm)
        assert asyncio.run(main()) == "Paris 4"
    assert len(lm.history) == 2 and "What is 2 + 2?" in str(lm.history[-1]["messages"])


LATE_ASKERS: list[Any] = []  # threads start_a_late_question left running (the session's copy through it)


def start_a_late_question(gate: str) -> str:
    """Leave a thread that asks the configured LM once ``gate`` exists, after this call returned
    (as DSPy's own ``streamify(..., async_streaming=False)`` leaves its producer thread finishing
    the LM call when the consumer leaves the stream early)."""
    import os
    import threading
    import time

    qa = dspy.Predict("question -> answer")

    def ask_later() -> None:
        deadline = time.monotonic() + 30
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        qa(question="What is 2 + 2?")

    thread = threading.Thread(target=ask_later)
    thread.start()
    LATE_ASKERS.append(thread)
    return "asking later"


def join_late_questions() -> int:
    joined = 0
    while LATE_ASKERS:
        LATE_ASKERS.pop().join(30)
        joined += 1
    return joined


def test_a_thread_asking_after_its_call_returned_records_in_the_clients_lm(run: Any, tmp_path: Any) -> None:
    """In-process the entry is in ``lm.history`` (and DSPy's global history) once the thread
    asked; through a session it comes back with the session's next call (the one that waits for
    the thread here), as a late thread's output does."""
    global_history = __import__("dspy.clients.base_lm", fromlist=["GLOBAL_HISTORY"]).GLOBAL_HISTORY
    global_history.clear()
    lm = make_lm()
    dspy.configure(lm=lm)
    gate = tmp_path / "ask"
    assert run(start_a_late_question, str(gate)) == "asking later"
    assert lm.history == []
    gate.touch()
    assert run(join_late_questions) == 1
    assert [e["outputs"][0].rsplit("\n", 1)[-1] for e in lm.history] == ["4"]
    assert len(global_history) == 1 and "What is 2 + 2?" in _inspected(1)
