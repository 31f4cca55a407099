"""DSPy optimizers and evaluation, run in-process and through a session (see harness.py).

Patterns from DSPy's tests/teleprompt and tests/evaluate: small trainsets, ``DummyLM`` answers,
metrics written by the user (here: in this test module, so they travel by value). SIMBA and GEPA
run on small budgets and must log no failed strategy (their failures are only logged).
"""

import logging
import os
import tempfile

import dspy
from dspy.evaluate.evaluate import EvaluationResult
from dspy.teleprompt import (
    GEPA,
    SIMBA,
    BootstrapFewShot,
    BootstrapFewShotWithRandomSearch,
    KNNFewShot,
    LabeledFewShot,
)
from dspy.utils.dummies import DummyLM

import dspex
from tests.conformance.harness import Runner, fresh_dspy_settings


def simple_metric(example, prediction, trace=None):
    return example.output == prediction.output


class SimpleModule(dspy.Module):
    def __init__(self, signature):
        super().__init__()
        self.predictor = dspy.Predict(signature)

    def forward(self, **kwargs):
        return self.predictor(**kwargs)


def qa_trainset():
    return [
        dspy.Example(question="What is 1+1?", answer="2").with_inputs("question"),
        dspy.Example(question="What is 2+2?", answer="4").with_inputs("question"),
        dspy.Example(question="What is 3+3?", answer="6").with_inputs("question"),
        dspy.Example(question="What is 4+4?", answer="8").with_inputs("question"),
    ]


# -- LabeledFewShot ------------------------------------------------------------------------------


def labeled_few_shot_program(trainset):
    dspy.configure(lm=DummyLM([{"answer": "10"}]))
    student = dspy.Predict("question -> answer")
    compiled = LabeledFewShot(k=2).compile(student, trainset=trainset)
    return compiled.demos, compiled(question="What is 5+5?")


def test_labeled_few_shot(run: Runner) -> None:
    demos, prediction = run.check(labeled_few_shot_program, qa_trainset())
    assert len(demos) == 2 and all(isinstance(d, dspy.Example) for d in demos)
    assert {d.question for d in demos} <= {ex.question for ex in qa_trainset()}
    assert prediction.answer == "10"


def test_labeled_few_shot_through_handles(run: Runner) -> None:
    """Trainset built here, optimizer and program kept where they run."""
    run(dspy.configure, lm=DummyLM([{"answer": "10"}]))
    optimizer = run.put(LabeledFewShot(k=4))
    compiled = optimizer.compile(run.put(dspy.Predict("question -> answer")), trainset=qa_trainset())
    assert sorted(d.answer for d in compiled.demos) == ["2", "4", "6", "8"]
    assert compiled(question="What is 5+5?").answer == "10"


# -- BootstrapFewShot (after DSPy's test_bootstrap_effectiveness) ------------------------------


def bootstrap_program():
    examples = [
        dspy.Example(input="What is the color of the sky?", output="blue").with_inputs("input"),
        dspy.Example(input="What does the fox say?", output="Ring-ding-ding-ding-dingeringeding!"),
    ]
    trainset = [examples[0]]
    student = SimpleModule("input -> output")
    teacher = SimpleModule("input -> output")
    # the teacher answers right, so its trace becomes a bootstrapped (augmented) demo
    lm = DummyLM([{"output": "blue"}, {"output": "Ring-ding-ding-ding-dingeringeding!"}])
    dspy.configure(lm=lm, trace=[])
    bootstrap = BootstrapFewShot(metric=simple_metric, max_bootstrapped_demos=1, max_labeled_demos=1)
    compiled_student = bootstrap.compile(student, teacher=teacher, trainset=trainset)
    prediction = compiled_student(input=examples[1].input)
    return compiled_student.predictor.demos, prediction, compiled_student._compiled


def test_bootstrap_few_shot(run: Runner) -> None:
    demos, prediction, compiled = run.check(bootstrap_program)
    assert compiled is True
    assert len(demos) == 1
    assert (demos[0].input, demos[0].output) == ("What is the color of the sky?", "blue")
    assert demos[0].augmented is True  # bootstrapped from the teacher's trace, not a labeled copy
    assert prediction.output == "Ring-ding-ding-ding-dingeringeding!"


def random_search_program(trainset):
    answers = {ex.question: {"answer": ex.answer} for ex in trainset[:3]}
    answers["4+4"] = {"answer": "9"}  # one answer wrong
    dspy.configure(lm=DummyLM(answers))
    optimizer = BootstrapFewShotWithRandomSearch(metric=answer_metric, max_bootstrapped_demos=2,
                                                 max_labeled_demos=2, num_candidate_programs=2, num_threads=1)
    optimized = optimizer.compile(QAModule(), trainset=trainset, valset=trainset)
    scores = [candidate["score"] for candidate in optimized.candidate_programs]
    return [d["question"] for d in optimized.predict.demos], scores


def test_bootstrap_random_search(run: Runner) -> None:
    demos, scores = run.check(random_search_program, qa_trainset())
    assert len(demos) <= 2
    assert len(scores) >= 2 and set(scores) == {75.0}  # the LM knows 3 of the 4 answers, demos or not


# -- KNNFewShot with a user-defined embedding function -------------------------------------------


def letter_counts(texts):
    """A toy embedding: how often each letter occurs (offline, deterministic)."""
    import numpy as np

    return np.array([[t.lower().count(c) for c in "abcdefghijklmnopqrstuvwxyz"] for t in texts], dtype=float)


def knn_program():
    trainset = [
        dspy.Example(question="What is the capital of Germany?", answer="Berlin").with_inputs("question"),
        dspy.Example(question="How many legs does a spider have?", answer="8").with_inputs("question"),
        dspy.Example(question="Who wrote Hamlet?", answer="Shakespeare").with_inputs("question"),
    ]
    lm = DummyLM({"France": {"answer": "Paris"}, "Germany": {"answer": "Berlin"}})  # the bootstrap asks too
    dspy.configure(lm=lm)
    knn = KNNFewShot(k=1, trainset=trainset, vectorizer=dspy.Embedder(letter_counts, caching=False))
    compiled = knn.compile(dspy.Predict("question -> answer"))
    result = compiled(question="What is the capital of France?")
    return result, [m["content"] for m in lm.history[-1]["messages"]]


def test_knn_few_shot_with_a_user_embedder(run: Runner) -> None:
    result, contents = run.check(knn_program)
    assert result.answer == "Paris"
    prompt = "\n".join(contents)
    assert "capital of Germany" in prompt and "Hamlet" not in prompt  # the nearest example is the demo


# -- Evaluate with a metric defined here ---------------------------------------------------------

CAPITALS = {"France": {"answer": "Paris"}, "Italy": {"answer": "Rome"}, "Spain": {"answer": "Barcelona"}}


def exact_match(example, prediction, trace=None):
    return example.answer == prediction.answer


def evaluate_program(metric):
    dspy.configure(lm=DummyLM(CAPITALS))
    devset = [dspy.Example(country=c, answer=a).with_inputs("country")
              for c, a in [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid")]]
    evaluate = dspy.Evaluate(devset=devset, metric=metric, num_threads=2, display_progress=False)
    result = evaluate(dspy.Predict("country -> answer"))
    return result.score, [(ex.country, pred.answer, score) for ex, pred, score in result.results]


def test_evaluate_with_a_client_defined_metric(run: Runner) -> None:
    score, rows = run.check(evaluate_program, exact_match)
    assert round(score, 2) == 66.67
    assert rows == [("France", "Paris", True), ("Italy", "Rome", True), ("Spain", "Barcelona", False)]


def evaluation_result_program(metric):
    dspy.configure(lm=DummyLM(CAPITALS))
    devset = [dspy.Example(country=c, answer=a).with_inputs("country")
              for c, a in [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid")]]
    return dspy.Evaluate(devset=devset, metric=metric, display_progress=False)(dspy.Predict("country -> answer"))


def test_evaluate_returns_its_evaluation_result(run: Runner) -> None:
    """DSPy's docs: ``result = evaluate(program)``; ``result.score``, ``result.results``."""
    result = run.check(evaluation_result_program, exact_match)
    assert type(result) is EvaluationResult and round(result.score, 2) == 66.67
    assert [type(pred) for _, pred, _ in result.results] == [dspy.Prediction] * 3


def test_evaluate_with_a_lambda_metric_through_handles(run: Runner) -> None:
    run(dspy.configure, lm=DummyLM(CAPITALS))
    devset = [dspy.Example(country="France", answer="Paris").with_inputs("country"),
              dspy.Example(country="Spain", answer="Madrid").with_inputs("country")]
    evaluate = run.put(dspy.Evaluate(devset=devset, metric=lambda ex, pred, trace=None: ex.answer == pred.answer,
                                     display_progress=False))
    result = evaluate(run.put(dspy.Predict("country -> answer")))
    assert result.score == 50.0
    assert [score for _, _, score in result.results] == [True, False]


# -- SIMBA and GEPA on small budgets -------------------------------------------------------------


class RolloutLM(DummyLM):
    """Answers right on even rollout ids only, so the models SIMBA resamples disagree."""

    def _format_answer_fields(self, field_names_and_values):
        if "answer" in field_names_and_values and (self.kwargs.get("rollout_id") or 0) % 2:
            field_names_and_values = {**field_names_and_values, "answer": "wrong"}
        return super()._format_answer_fields(field_names_and_values)


class QAModule(dspy.Module):
    def __init__(self):
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question):
        return self.predict(question=question)


class CollectLogs(logging.Handler):
    """What the optimizer logs while the block runs (its failures are only logged)."""

    def __init__(self, *names):
        super().__init__(logging.INFO)
        self.messages = []
        self.loggers = [logging.getLogger(name) for name in names]

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.addHandler(self)
            lg.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.removeHandler(self)
            lg.setLevel(level)


def answer_metric(example, prediction, trace=None, pred_name=None, pred_trace=None):
    return float(example.answer == prediction.answer)


def simba_program(trainset):
    answers = {"module_advice": {"discussion": "Digits only.", "module_advice": {"predict": "Answer with digits only."}}}
    answers.update({ex.question: {"answer": ex.answer} for ex in trainset})
    dspy.configure(lm=RolloutLM(answers))
    with CollectLogs("dspy") as logs:
        simba = SIMBA(metric=answer_metric, bsize=2, num_candidates=2, max_steps=2, max_demos=1, num_threads=1)
        optimized = simba.compile(QAModule(), trainset=trainset, seed=0)
    strategies = [m for m in logs.messages if "Invoking strategy" in m]
    failures = [m for m in logs.messages if "failed" in m.lower() or "could not get source" in m]
    return optimized.predict.signature.instructions, len(optimized.predict.demos), strategies, failures


def test_simba_small_budget(run: Runner) -> None:
    _instructions, _n_demos, strategies, failures = run.check(simba_program, qa_trainset())
    assert strategies, "SIMBA invoked no strategy: the case does not exercise it"
    assert any("append_a_rule" in m for m in strategies)
    assert failures == []


def gepa_program(trainset):
    student_lm = DummyLM({"1+1": {"answer": "2"}, "2+2": {"answer": "4"}, "3+3": {"answer": "7"},
                          "4+4": {"answer": "8"}})
    reflection_lm = DummyLM({"new_instruction": {"new_instruction": "Answer with the sum as digits only."}},
                            adapter=dspy.JSONAdapter())  # GEPA proposes through a JSONAdapter
    dspy.configure(lm=student_lm)

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        score = float(gold.answer == pred.answer)
        return dspy.Prediction(score=score, feedback="correct" if score else f"expected {gold.answer}")

    with CollectLogs("dspy", "gepa") as logs:
        gepa = GEPA(metric=metric, reflection_lm=reflection_lm, max_metric_calls=16, reflection_minibatch_size=2,
                    num_threads=1, track_stats=True, seed=0)
        optimized = gepa.compile(QAModule(), trainset=trainset, valset=trainset)
    proposals = [m for m in logs.messages if "Proposed new text" in m]
    failures = [m for m in logs.messages if "exception" in m.lower() or "failed" in m.lower()]
    return (optimized.predict.signature.instructions, optimized.detailed_results.val_aggregate_scores,
            proposals, failures)


def test_gepa_small_budget(run: Runner) -> None:
    _instructions, val_scores, proposals, failures = run.check(gepa_program, qa_trainset())
    assert val_scores[0] == 0.75
    assert proposals, "GEPA proposed nothing: the case does not exercise reflection"
    assert failures == []


def test_gepa_progress_reaches_the_caller(session: dspex.Session) -> None:
    """GEPA's log lines stream to ``on_progress`` while it runs, as they print in-process."""
    with fresh_dspy_settings():
        _, _, proposals, _ = gepa_program(qa_trainset())
    events = []
    session.apply(gepa_program, [qa_trainset()], on_progress=events.append)
    messages = [e.get("message", "") for e in events if isinstance(e, dict)]
    assert any(m.startswith("Iteration 0: Base program full valset score") for m in messages)
    assert proposals and all(p in messages for p in proposals)


# -- save on one worker, load on another ---------------------------------------------------------


def compile_and_save(path):
    dspy.configure(lm=DummyLM([{"answer": "10"}]))
    compiled = LabeledFewShot(k=2).compile(QAModule(), trainset=qa_trainset())
    compiled.save(path)
    return [d["question"] for d in compiled.predict.demos]


def load_and_run(path):
    dspy.configure(lm=DummyLM([{"answer": "10"}]))
    program = QAModule()
    program.load(path)
    return [d["question"] for d in program.predict.demos], program(question="What is 5+5?")


def test_save_and_load_across_two_workers(run: Runner) -> None:
    with tempfile.TemporaryDirectory(prefix="dxcf") as tmp:
        path = os.path.join(tmp, "program.json")
        saved = run.check(compile_and_save, path)
        with run.other_worker() as other:
            loaded, prediction = other.check(load_and_run, path)
    assert loaded == saved and len(saved) == 2
    assert prediction.answer == "10"


def save_whole_program(path):
    dspy.configure(lm=DummyLM([{"answer": "10"}]))
    compiled = LabeledFewShot(k=2).compile(QAModule(), trainset=qa_trainset())
    compiled.save(path, save_program=True)
    return type(compiled).__name__


def load_whole_program(path):
    dspy.configure(lm=DummyLM([{"answer": "10"}]))
    program = dspy.load(path, allow_pickle=True)
    return type(program).__name__, len(program.predict.demos), program(question="What is 5+5?")


def test_save_whole_program_and_load_it_on_another_worker(run: Runner) -> None:
    """``save_program=True`` pickles the program with its class (user code: by value), so another
    worker, which cannot import this test module, loads it with ``dspy.load``."""
    with tempfile.TemporaryDirectory(prefix="dxcf") as tmp:
        path = os.path.join(tmp, "program")
        assert run.check(save_whole_program, path) == "QAModule"
        with run.other_worker() as other:
            name, n_demos, prediction = other.check(load_whole_program, path)
    assert (name, n_demos, prediction.answer) == ("QAModule", 2, "10")


def compile_qa():
    dspy.configure(lm=DummyLM([{"answer": "10"}]))
    return LabeledFewShot(k=2).compile(QAModule(), trainset=qa_trainset())


def test_a_program_compiled_in_the_session_is_saved_on_the_client(run: Runner) -> None:
    """DSPy docs "Saving and loading": ``compiled.save(path)``. A program compiled in a session
    is a ref, and its methods run on the worker, where a relative path names a file of the worker's
    working directory; the state comes back as data (``dump_state``), and saving it here writes
    the client's file, which loads as the in-process save does (docs/remote-objects.md)."""
    compiled = run(compile_qa)
    state = compiled.dump_state()
    here = QAModule()
    here.load_state(state)
    with tempfile.TemporaryDirectory(prefix="dxcf") as tmp:
        path = os.path.join(tmp, "program.json")
        here.save(path)
        with fresh_dspy_settings():
            dspy.configure(lm=DummyLM([{"answer": "10"}]))
            loaded = QAModule()
            loaded.load(path)
            assert [d["question"] for d in loaded.predict.demos] == [d["question"] for d in state["predict"]["demos"]]
            assert len(loaded.predict.demos) == 2 and loaded(question="What is 5+5?").answer == "10"
