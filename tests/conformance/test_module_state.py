"""A session is the user's own Python: programs that keep module state, that configure the LM on
the client, that read module globals of DSPy itself.

Each case runs twice (``run``: in-process, then through a session) and asserts the same results,
written out. The user modules are written to a temp dir per case (only this process has it on its
path, so the workers get that code by value) and imported fresh for each run, so both runs start
from the same module state.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import dspy
import pytest
from dspy.utils.callback import ACTIVE_CALL_ID, BaseCallback
from dspy.utils.dummies import DummyLM

from tests.conformance.harness import Runner, as_data

CACHED_QA = '''
import dspy

ANSWERED = {}
CALLS = 0


class CachedQA(dspy.Module):
    """A program that remembers its answers in a module-level dict and counts its calls."""

    def __init__(self):
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question):
        global CALLS
        CALLS += 1
        if question not in ANSWERED:
            ANSWERED[question] = self.predict(question=question).answer
        return dspy.Prediction(answer=ANSWERED[question], calls=CALLS, cached=len(ANSWERED))


QA = CachedQA()


def ask(question):
    return QA(question=question)
'''


def capitals() -> DummyLM:
    return DummyLM({"France?": {"answer": "Paris"}, "Italy?": {"answer": "Rome"}})


def test_module_state_of_a_program_lives_across_calls(run: Runner, usercode: Any) -> None:
    mod = usercode(CACHED_QA)
    dspy.configure(lm=capitals())  # at the top of the client script
    got = [run(mod.ask, q) for q in ("France?", "Italy?", "France?")]
    assert as_data(got) == as_data([dspy.Prediction(answer="Paris", calls=1, cached=1),
                                    dspy.Prediction(answer="Rome", calls=2, cached=2),
                                    dspy.Prediction(answer="Paris", calls=3, cached=2)])


def test_lm_and_adapter_configured_on_the_client(run: Runner, usercode: Any) -> None:
    mod = usercode('''
        import dspy


        def triage(ticket):
            return dspy.ChainOfThought("ticket -> category")(ticket=ticket)
    ''')
    dspy.configure(lm=DummyLM({"printer on fire": {"reasoning": "hardware", "category": "hardware"}}))
    plain = run(mod.triage, "printer on fire")
    json_lm = DummyLM({"printer on fire": {"reasoning": "hardware", "category": "hardware"}},
                      adapter=dspy.JSONAdapter())
    with dspy.context(lm=json_lm, adapter=dspy.JSONAdapter()):
        in_context = run(mod.triage, "printer on fire")
    expected = dspy.Prediction(reasoning="hardware", category="hardware")
    assert as_data(plain) == as_data(expected) and as_data(in_context) == as_data(expected)
    assert len(json_lm.history) == 1  # the session's copy recorded it; its entry came back here, as in-process


def test_a_client_context_wins_over_the_lm_the_program_configured(run: Runner, usercode: Any) -> None:
    """DSPy's docs: ``dspy.context`` overrides ``dspy.configure`` for one block, whoever configured
    (here a setup call of the session), also when the program configures again inside the block."""
    mod = usercode('''
        import dspy
        from dspy.utils.dummies import DummyLM


        def setup():
            dspy.configure(lm=DummyLM([{"answer": "configured"}] * 5))


        def ask():
            return dspy.Predict("question -> answer")(question="which LM?").answer


        def configure_then_ask():
            setup()
            return ask()
    ''')
    run(mod.setup)
    assert run(mod.ask) == "configured"
    with dspy.context(lm=DummyLM([{"answer": "from the context"}] * 5)):
        assert [run(mod.ask), run(mod.configure_then_ask)] == ["from the context"] * 2
    assert run(mod.ask) == "configured"  # the block ended


def parallel_children_see_their_parent_call_id() -> tuple[Any, int, bool]:
    """DSPy's callback lineage through ``dspy.Parallel``: each child's active call id (the
    ContextVar this module imported from dspy) is its parent's call id."""

    class Leaf(dspy.Module):
        def forward(self, value):
            return value * 10

    class Fanout(dspy.Module):
        def __init__(self, leaves):
            super().__init__()
            self.leaves = leaves
            self.parallel = dspy.Parallel(num_threads=2, disable_progress_bar=True)

        def forward(self):
            return self.parallel([(leaf, {"value": i}) for i, leaf in enumerate(self.leaves)])

    class Lineage(BaseCallback):
        def __init__(self):
            self.seen = []
            self.lock = threading.Lock()

        def on_module_start(self, call_id, instance, inputs):
            with self.lock:
                self.seen.append((instance, call_id, ACTIVE_CALL_ID.get()))

    leaves = [Leaf(), Leaf()]
    root = Fanout(leaves)
    lineage = Lineage()
    dspy.configure(callbacks=[lineage])
    out = root()
    root_call = next(c for c in lineage.seen if c[0] is root)
    children = [c for c in lineage.seen if any(c[0] is leaf for leaf in leaves)]
    return out, len(children), all(c[2] == root_call[1] for c in children)


def test_parallel_children_inherit_the_parent_callback_call_id(run: Runner) -> None:
    assert run.check(parallel_children_see_their_parent_call_id) == ([0, 10], 2, True)


def test_a_refine_reward_reads_module_state(run: Runner, usercode: Any) -> None:
    mod = usercode('''
        import dspy

        SCORED = []


        def short(args, pred):
            SCORED.append(pred.answer)
            return 1.0 if len(pred.answer.split()) == 1 else 0.0


        def refined(question):
            refine = dspy.Refine(module=dspy.Predict("question -> answer"), N=2, reward_fn=short, threshold=1.0)
            return refine(question=question).answer, list(SCORED)
    ''')
    dspy.configure(lm=DummyLM([{"answer": "Paris, France"}, {"answer": "Paris"}] * 4))
    assert run(mod.refined, "Capital of France?") == ("Paris", ["Paris, France", "Paris"])
    assert run(mod.refined, "Capital of France?")[1][2:] == ["Paris, France", "Paris"]  # SCORED grew


def test_module_globals_passed_to_a_call_are_the_sessions_globals(run: Runner, usercode: Any) -> None:
    """``s.run(QA, question=...)`` with ``QA`` a program at the top of the script, or a method of
    such an object (``COUNTER.bump``, ``NOTES.append``), calls that global as in-process calls it:
    its state (its history, a counter) is the one the session's code reads, and lives across calls."""
    mod = usercode('''
        import dspy


        class Counter:
            def __init__(self):
                self.n = 0

            def bump(self):
                self.n += 1
                return self.n


        COUNTER = Counter()
        QA = dspy.Predict("question -> answer")
        NOTES = []


        def seen():
            return COUNTER.n, len(QA.history), list(NOTES)
    ''')
    dspy.configure(lm=DummyLM([{"answer": str(i)} for i in range(5)]))
    assert [run(mod.COUNTER.bump) for _ in range(3)] == [1, 2, 3]
    assert [run(mod.QA, question=q).answer for q in ("a", "b")] == ["0", "1"]
    run(mod.NOTES.append, "noted")
    assert run(mod.seen) == (3, 2, ["noted"])
    assert run(mod.COUNTER.bump) == 4  # the same object the session's code read
    mod.COUNTER = mod.Counter()  # rebound, as re-running the cell that made it does
    assert run(mod.COUNTER.bump) == 1 and run(mod.seen)[0] == 1


def test_module_globals_bound_in_a_partial_are_the_sessions_globals(run: Runner, usercode: Any) -> None:
    """``functools.partial`` over a global program or a method of a global object (``partial(ask,
    QA)``, ``partial(COUNTER.bump, by=2)``), as the callable or an argument: the partial's function
    and arguments are those globals, as in-process."""
    mod = usercode('''
        import functools

        import dspy


        class Counter:
            def __init__(self):
                self.n = 0

            def bump(self, by=1):
                self.n += by
                return self.n


        COUNTER = Counter()
        QA = dspy.Predict("question -> answer")


        def ask(program, question):
            return program(question=question).answer


        def seen():
            return COUNTER.n, len(QA.history)


        def call(fn, *args):
            return fn(*args)
    ''')
    dspy.configure(lm=DummyLM([{"answer": str(i)} for i in range(5)]))
    assert [run(functools.partial(mod.COUNTER.bump, by=2)) for _ in range(2)] == [2, 4]
    assert [run(functools.partial(mod.ask, mod.QA), q) for q in ("a", "b")] == ["0", "1"]
    assert run(mod.call, functools.partial(mod.COUNTER.bump, 3)) == 7
    assert run(mod.seen) == (7, 2)


def test_a_callback_configured_on_the_client_is_the_modules_global(run: Runner, usercode: Any) -> None:
    """DSPy docs "Callbacks": a ``BaseCallback`` that records what runs, made at the top of the
    user's module and configured on the client; the program's code reads the same object (one
    object in-process, so one in the session: the callback the settings carry is the module's
    global, not a copy of it)."""
    mod = usercode('''
        import dspy
        from dspy.utils.callback import BaseCallback


        class Recorder(BaseCallback):
            def __init__(self):
                self.events = []

            def on_module_start(self, call_id, instance, inputs):
                self.events.append((type(instance).__name__, inputs["kwargs"]))


        RECORDER = Recorder()


        def answer(question):
            return dspy.Predict("question -> answer")(question=question).answer


        def recorded():
            return list(RECORDER.events), dspy.settings.callbacks[0] is RECORDER
    ''')
    dspy.configure(lm=DummyLM([{"answer": "one"}, {"answer": "two"}]), callbacks=[mod.RECORDER])
    assert [run(mod.answer, "q1"), run(mod.answer, "q2")] == ["one", "two"]
    assert as_data(run(mod.recorded)) == [[["Predict", {"question": "q1"}], ["Predict", {"question": "q2"}]], True]


@pytest.mark.parametrize("kind", ["function", "method"])
def test_a_retriever_configured_on_the_client(run: Runner, usercode: Any, kind: str) -> None:
    """DSPy's ``dspy.configure(rm=...)`` with the user's own search function, or a method of the
    user's retriever object, then ``dspy.Retrieve`` in the program: the setting is the module's
    function or the method of the module's object in the session (the queries it logged
    included)."""
    mod = usercode('''
        import dspy
        from dspy.dsp.utils import dotdict

        CORPUS = ["Paris is the capital of France.", "Rome is the capital of Italy.", "Berlin is in Germany."]
        QUERIES = []


        def search(query, k=3, **kwargs):
            QUERIES.append(query)
            return [dotdict(long_text=p) for p in CORPUS if any(w in p for w in query.split())][:k]


        class Retriever:
            def __init__(self):
                self.queries = []

            def search(self, query, k=3, **kwargs):
                self.queries.append(query)
                return search(query, k)


        RETRIEVER = Retriever()


        def retrieve(question):
            return dspy.Retrieve(k=2)(question).passages, list(QUERIES), list(RETRIEVER.queries)
    ''')
    dspy.configure(rm=mod.search if kind == "function" else mod.RETRIEVER.search)
    logged = ["Paris France"] if kind == "method" else []
    assert run(mod.retrieve, "Paris France") == (["Paris is the capital of France."], ["Paris France"], logged)
    assert run(mod.retrieve, "Rome")[1:] == (["Paris France", "Rome"], [*logged, "Rome"] if logged else [])
