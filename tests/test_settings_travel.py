"""A DSPy user's settings and history read and change the same in-process and through a session.

Each case runs the same program text in-process (``program()``, DSPy's settings fresh) and
through a session (``s.run(program)``), with an equal ``DummyLM`` configured on the client, and
compares what the program saw. DSPy's global history (``dspy.clients.base_lm.GLOBAL_HISTORY``,
what ``dspy.inspect_history`` prints) is a per-session stand-in on the worker
(``worker.dspy_settings.SessionHistory``): every list operation must act on the session's list
and give what it gives on a plain list.
"""

from __future__ import annotations

import copy
import importlib
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import dspy
import pytest
from dspy.utils import DummyLM

import dspex
from tests.conformance.harness import fresh_dspy_settings
from tests.harness import shared_pool

base_lm: Any = importlib.import_module("dspy.clients.base_lm")


@pytest.fixture(scope="module")
def dx() -> Iterator[dspex.Client]:
    yield from shared_pool("p:strict_queue", 1)


@pytest.fixture
def session(dx: dspex.Client) -> Iterator[dspex.Session]:
    s = dx.session("p")
    try:
        yield s
    finally:
        s.close(timeout=10)


def _three_calls() -> list[Any]:
    """Three LM calls; the three entries they recorded in the global history."""
    qa = dspy.Predict("question -> answer")
    for q in ("a", "b", "c"):
        qa(question=q)
    return list(base_lm.GLOBAL_HISTORY)[-3:]


# (name, operation on the history ``h`` holding exactly the entries ``e`` of three calls): what it
# returns must not depend on the entries' contents (timestamps, uuids), only on which they are
OPERATIONS: list[tuple[str, Callable[[list[Any], list[Any]], Any]]] = [
    ("len", lambda h, e: len(h)),
    ("bool", lambda h, e: bool(h)),
    ("contains", lambda h, e: (e[1] in h, "x" in h)),
    ("index", lambda h, e: h.index(e[2])),
    ("count", lambda h, e: h.count(e[0])),
    ("getitem", lambda h, e: (h[0] is e[0], h[-1] is e[2])),
    ("slice", lambda h, e: (type(h[1:]).__name__, [x is y for x, y in zip(h[1:], e[1:])])),
    ("copy", lambda h, e: (type(h.copy()).__name__, [x is y for x, y in zip(h.copy(), e)])),
    ("copy.copy", lambda h, e: (type(copy.copy(h)).__name__, len(copy.copy(h)))),
    ("copy.deepcopy", lambda h, e: (type(copy.deepcopy(h)).__name__, len(copy.deepcopy(h)))),
    ("pickle", lambda h, e: (type(pickle.loads(pickle.dumps(h))).__name__, len(pickle.loads(pickle.dumps(h))))),
    ("list", lambda h, e: [x is y for x, y in zip(list(h), e)]),
    ("iter", lambda h, e: [x is y for x, y in zip(h, e)] + [len(list(iter(h)))]),
    ("reversed", lambda h, e: [x is y for x, y in zip(reversed(h), reversed(e))]),
    ("eq", lambda h, e: (h == e, h == [], h != e, e == h, [] == h)),
    ("order", lambda h, e: (h < e + [1], h <= e, h > [], [] < h, h >= e)),
    ("add", lambda h, e: (type(h + [1]).__name__, len(h + [1]), len([1] + h), len(h * 2), len(2 * h))),
    ("isinstance", lambda h, e: isinstance(h, list)),
    ("repr", lambda h, e: repr(h) == repr(e)),
    ("append", lambda h, e: (h.append("x"), len(h), h[-1])),
    ("insert", lambda h, e: (h.insert(0, "y"), len(h), h[0])),
    ("remove", lambda h, e: (h.remove("y"), len(h), h[0] is e[0])),
    ("extend", lambda h, e: (h.extend(["z", "w"]), len(h), h[-2:])),
    ("setitem", lambda h, e: (h.__setitem__(-1, "v"), h[-1], len(h))),
    ("delitem", lambda h, e: (h.__delitem__(-1), len(h), h[-1])),
    ("pop", lambda h, e: (h.pop(), h.pop(-1), len(h))),
    ("pop(0)", lambda h, e: (h.pop(0) is e[0], len(h), h.insert(0, e[0]))),
    ("setslice", lambda h, e: (h.__setitem__(slice(0, 0), ["s", "t"]), len(h), h[:2])),
    ("delslice", lambda h, e: (h.__delitem__(slice(0, 2)), len(h), h[0] is e[0])),
    ("reverse", lambda h, e: (h.reverse(), h[0] is e[2], h.reverse(), h[0] is e[0])),
    ("sort", lambda h, e: (h.sort(key=lambda x: -e.index(x)), h[0] is e[2], h.sort(key=e.index), h[0] is e[0])),
    ("iadd", lambda h, e: (len(h.__iadd__(["u"])), h.pop())),
    ("imul", lambda h, e: (len(h.__imul__(2)), h.__delitem__(slice(3, None)), len(h))),
    ("clear", lambda h, e: (h.clear(), len(h), h == [], bool(h))),
]


def _outcome(op: Callable[[list[Any], list[Any]], Any], h: list[Any], e: list[Any]) -> Any:
    try:
        return op(h, e)
    except Exception as exc:  # noqa: BLE001 - the error is the outcome compared
        return type(exc).__name__


def global_history_operations() -> dict[str, Any]:
    entries = _three_calls()
    h = base_lm.GLOBAL_HISTORY
    del h[:-3]
    return {name: _outcome(op, h, entries) for name, op in OPERATIONS}


def lm_history_operations() -> dict[str, Any]:
    _three_calls()
    h = dspy.settings.lm.history
    return {name: _outcome(op, h, list(h)) for name, op in OPERATIONS}


def _lm() -> DummyLM:
    return DummyLM([{"answer": str(i)} for i in range(8)])


def _both(session: dspex.Session, program: Callable[[], Any]) -> tuple[Any, Any]:
    """(in-process result, session result) of ``program`` with a fresh client LM each."""
    results = []
    for through_session in (False, True):
        base_lm.GLOBAL_HISTORY.clear()
        with fresh_dspy_settings():
            dspy.configure(lm=_lm())
            results.append(session.run(program) if through_session else program())
    return results[0], results[1]


@pytest.mark.parametrize("program", [global_history_operations, lm_history_operations])
def test_list_operations_on_the_history_are_as_in_process(session: dspex.Session,
                                                           program: Callable[[], dict[str, Any]]) -> None:
    expected, got = _both(session, program)
    assert {k: v for k, v in expected.items() if isinstance(v, str) and v.endswith("Error")} == {}  # all work here
    assert {k: v for k, v in got.items() if v != expected[k]} == {}
    assert got == expected


def rebinds_the_global_history() -> tuple[int, int]:
    """``base_lm.GLOBAL_HISTORY += [...]`` (and ``dspy.inspect_history`` after it)."""
    qa = dspy.Predict("question -> answer")
    qa(question="a")
    base_lm.GLOBAL_HISTORY += ["mine"]
    qa(question="b")
    return len(base_lm.GLOBAL_HISTORY), base_lm.GLOBAL_HISTORY.index("mine")


def test_in_place_add_keeps_the_global_history_the_sessions(session: dspex.Session) -> None:
    expected, got = _both(session, rebinds_the_global_history)
    assert got == expected == (3, 1)


def global_history_length() -> int:
    return len(base_lm.GLOBAL_HISTORY)


def replaces_the_global_history() -> tuple[int, int]:
    """Replaces DSPy's module global with a new list (a reset, in-process)."""
    dspy.Predict("question -> answer")(question="a")
    mine: list[Any] = []
    base_lm.GLOBAL_HISTORY = mine
    dspy.Predict("question -> answer")(question="b")
    return len(base_lm.GLOBAL_HISTORY), len(mine)


def test_a_session_replacing_the_global_history_keeps_it_its_own(dx: dspex.Client) -> None:
    """In-process the new list is the history from then on; through a session it is the session's
    (the worker's stand-in is back after the call), never another session's."""
    saved = base_lm.GLOBAL_HISTORY
    try:
        expected = []
        with fresh_dspy_settings():
            dspy.configure(lm=_lm())
            expected.append(replaces_the_global_history())
            expected.append(global_history_length())
    finally:
        base_lm.GLOBAL_HISTORY = saved
    first, second = dx.session("p"), dx.session("p")
    try:
        with fresh_dspy_settings():
            dspy.configure(lm=_lm())
            assert second.run(_three_calls) is not None
            got = [first.run(replaces_the_global_history), first.run(global_history_length)]
            assert got == expected == [(1, 1), 1]
            assert second.run(global_history_length) == 3
            assert second.run(lambda: type(base_lm.GLOBAL_HISTORY).__name__) == "SessionHistory"
    finally:
        first.close(timeout=10)
        second.close(timeout=10)


def test_the_global_history_comes_back_as_the_list_it_is(session: dspex.Session) -> None:
    def history() -> list[Any]:
        _three_calls()
        return base_lm.GLOBAL_HISTORY

    expected, got = _both(session, history)
    assert type(got) is type(expected) is list
    assert [e["outputs"] for e in got] == [e["outputs"] for e in expected]


class Pipeline(dspy.Module):
    """A custom module with a sub-module (DSPy docs "Modules")."""

    def __init__(self) -> None:
        super().__init__()
        self.draft = dspy.ChainOfThought("question -> answer")

    def forward(self, question: str) -> dspy.Prediction:
        return self.draft(question=question)


QA = dspy.Predict("question -> answer")  # module globals: one object in the session, as here
PIPELINE = Pipeline()
MODULES = {"QA": QA, "PIPELINE": PIPELINE, "PIPELINE.draft": PIPELINE.draft,
           "PIPELINE.draft.predict": PIPELINE.draft.predict}


def uses_the_modules() -> list[str]:
    return [QA(question="a").answer, PIPELINE(question="b").answer, QA(question="c").answer]


def _module_histories(lm: Any) -> dict[str, Any]:
    """Each module's history as the indexes of its entries in the LM's, and what
    ``module.inspect_history`` prints of its last one (timestamps aside)."""
    import io
    import re

    out: dict[str, Any] = {}
    for name, module in MODULES.items():
        text = io.StringIO()
        module.inspect_history(n=1, file=text)
        out[name] = ([next(i for i, e in enumerate(lm.history) if e is entry) for entry in module.history],
                     re.sub(r"\[\d{4}-\d\d-\d\dT[\d:.]+\]", "[time]", text.getvalue()))
    return out


def test_the_history_of_the_clients_modules_is_as_in_process(session: dspex.Session) -> None:
    """DSPy 3.4 records each LM call in the history of every module it was made in
    (``module.history``, ``module.inspect_history()``): after ``s.run(program)`` the client's
    modules that are globals of its code (sub-modules included) hold the call's entries, as
    after ``program()``."""
    seen = []
    for through_session in (False, True):
        for module in MODULES.values():
            module.history.clear()
        with fresh_dspy_settings():
            lm = DummyLM([{"reasoning": "r", "answer": str(i)} for i in range(6)])
            dspy.configure(lm=lm)
            answers = session.run(uses_the_modules) if through_session else uses_the_modules()
            seen.append((answers, _module_histories(lm)))
    assert seen[1] == seen[0]
    assert seen[0][1]["PIPELINE.draft.predict"][0] == [1]


OWN_LM = Pipeline()  # DSPy docs: a program whose predictors have their own LM (set_lm), not the configured one
OWN_LM.set_lm(DummyLM([{"reasoning": "r", "answer": str(i)} for i in range(6)]))


def uses_its_own_lm() -> str:
    return str(OWN_LM(question="q").answer)


def test_the_history_of_an_lm_a_clients_module_holds_is_as_in_process(session: dspex.Session) -> None:
    """``program.set_lm(lm)`` on a module global: the LM (no global itself) is the module's
    predictors' ``lm``; its history and DSPy's global history get the call's entries as
    in-process."""
    lm = OWN_LM.draft.predict.lm
    seen = []
    for through_session in (False, True):
        for history in (lm.history, base_lm.GLOBAL_HISTORY, OWN_LM.history, OWN_LM.draft.predict.history):
            history.clear()
        with fresh_dspy_settings():
            answer = session.run(uses_its_own_lm) if through_session else uses_its_own_lm()
        seen.append((len(lm.history), len(base_lm.GLOBAL_HISTORY), len(OWN_LM.history),
                     lm.history[0] is OWN_LM.draft.predict.history[0] if lm.history else None))
    assert answer == "1"  # the session's copy of the LM was sent after the in-process call
    assert seen == [(1, 1, 1, True), (1, 1, 1, True)]


def best_of_three() -> str:
    """DSPy's BestOfN: each attempt runs on a copy of the configured LM (``lm.copy(rollout_id=...)``),
    made by the call."""
    qa = dspy.BestOfN(dspy.Predict("question -> answer"), N=3, threshold=1.0,
                      reward_fn=lambda args, pred: 1.0 if pred.answer == "2" else 0.0)
    return str(qa(question="q").answer)


def test_the_global_history_holds_the_calls_of_lms_the_call_made(session: dspex.Session) -> None:
    """In-process ``dspy.inspect_history(n)`` shows every LM call of the program, those of LMs it
    made (BestOfN's and Refine's copies of the configured LM) too: so does the client's after
    ``s.run(program)``."""
    seen = []
    for through_session in (False, True):
        base_lm.GLOBAL_HISTORY.clear()
        with fresh_dspy_settings():
            lm = DummyLM([{"answer": str(i)} for i in range(6)])
            dspy.configure(lm=lm)
            answer = session.run(best_of_three) if through_session else best_of_three()
        seen.append((answer, len(lm.history), [e["outputs"] for e in base_lm.GLOBAL_HISTORY]))
    assert seen[1] == seen[0]
    assert seen[0][1] == 0 and len(seen[0][2]) == 3


def test_a_call_of_the_sessions_own_objects_alone_brings_no_history_back(session: dspex.Session) -> None:
    """The session holds a client's module (``QA``, a global of code it ran), so its requests ask
    for history; a ref call of a ``s.put`` Predict under the session's own LM records in none of
    the client's LMs or modules: its reply carries no entry (the client reads and records none),
    while a call through ``QA`` still brings its entries back."""
    session.exec("import dspy\nfrom dspy.utils import DummyLM\n"
                 "dspy.configure(lm=DummyLM([{'reasoning': 'r', 'answer': str(i)} for i in range(9)]))\n")
    with fresh_dspy_settings():
        qa_ref = session.put(dspy.Predict("question -> answer"))
        session.run(uses_the_modules)  # the session now holds QA and PIPELINE
        QA.history.clear()
        base_lm.GLOBAL_HISTORY.clear()
        answer = qa_ref(question="d").answer
        after_ref = (len(base_lm.GLOBAL_HISTORY), len(QA.history))
        session.run(uses_the_modules)
        after_run = (len(base_lm.GLOBAL_HISTORY), len(QA.history))
    assert answer == "3"  # the session's LM answered
    assert after_ref == (0, 0)
    assert after_run == (3, 2)  # its three LM calls, QA's two of them


def test_the_clients_histories_stay_plain_lists(session: dspex.Session) -> None:
    """The entries a session's call brings back are in the client's histories as in-process: in
    the same plain ``list`` objects, where C code that reads a list's storage past its methods
    (``[] + h``, ``list.__len__``) finds them too. (What rules out recording them lazily in
    a ``list`` subclass: docs/benchmarks.md, *perfc18*.)"""
    global_history = base_lm.GLOBAL_HISTORY
    seen = []
    for through_session in (False, True):
        for module in MODULES.values():
            module.history.clear()
        global_history.clear()
        with fresh_dspy_settings():
            dspy.configure(lm=DummyLM([{"reasoning": "r", "answer": str(i)} for i in range(6)]))
            session.run(uses_the_modules) if through_session else uses_the_modules()
        seen.append([(type(h) is list, list.__len__(h), len([] + h), [] + h == h)
                     for h in (base_lm.GLOBAL_HISTORY, QA.history, PIPELINE.draft.predict.history)])
        assert base_lm.GLOBAL_HISTORY is global_history
    assert seen[1] == seen[0] == [(True, 3, 3, True), (True, 2, 2, True), (True, 1, 1, True)]


def two_step_answer() -> str:
    return str(dspy.Predict("question -> answer")(question="q").answer)


def test_the_history_of_an_lm_the_configured_adapter_holds_is_as_in_process(session: dspex.Session) -> None:
    """DSPy docs "Adapters": ``dspy.configure(lm=lm, adapter=dspy.TwoStepAdapter(extraction_model=...))``
    on the client. The extraction LM, held by the configured adapter (no setting nor global
    itself), records its calls in its own ``history`` in-process: through a session too (it was
    a copy inside the adapter's, whose entries reached the global history only)."""
    seen = []
    for through_session in (False, True):
        base_lm.GLOBAL_HISTORY.clear()
        with fresh_dspy_settings():
            main = DummyLM([{"answer": "draft"}] * 3)
            extract = DummyLM([{"answer": str(i)} for i in range(3)])
            dspy.configure(lm=main, adapter=dspy.TwoStepAdapter(extraction_model=extract))
            answer = session.run(two_step_answer) if through_session else two_step_answer()
            answer2 = session.run(two_step_answer) if through_session else two_step_answer()
        seen.append((answer, answer2, len(main.history), len(extract.history), len(base_lm.GLOBAL_HISTORY),
                     extract.history[-1] is base_lm.GLOBAL_HISTORY[-1] if extract.history else None))
    assert seen[0] == ("0", "1", 2, 2, 4, True)
    assert seen[1] == seen[0]


JUDGES = {"strict": DummyLM([{"verdict": str(i)} for i in range(6)])}  # LMs in a global dict: none a global itself


def judged() -> str:
    with dspy.context(lm=JUDGES["strict"]):
        return str(dspy.Predict("claim -> verdict")(claim="c").verdict)


def test_the_history_of_an_lm_in_a_global_dict_is_as_in_process(session: dspex.Session) -> None:
    """An LM kept in a global of the user's code (``JUDGES["strict"]``), used with
    ``dspy.context(lm=...)`` in the program, records its calls in its ``history`` as in-process."""
    lm = JUDGES["strict"]
    seen = []
    for through_session in (False, True):
        lm.history.clear()
        with fresh_dspy_settings():
            answer = session.run(judged) if through_session else judged()
        seen.append(len(lm.history))
    assert answer == "1"  # the session's copy was sent after the in-process call
    assert seen == [1, 1]


PROGRAMS = {"qa": dspy.Predict("question -> answer")}  # a program in a global dict: no global itself


class Holder:
    def __init__(self) -> None:
        self.program = dspy.ChainOfThought("question -> answer")


HOLDER = Holder()


def uses_held_programs() -> list[str]:
    return [str(PROGRAMS["qa"](question="q").answer), str(HOLDER.program(question="q").answer)]


def test_the_history_of_programs_inside_globals_is_as_in_process(session: dspex.Session) -> None:
    """DSPy (3.4) records each call in the ``history`` of the modules it was made in: so for a
    program kept in a global dict or held by a global object of the user's code."""
    modules = (PROGRAMS["qa"], HOLDER.program, HOLDER.program.predict)
    seen = []
    for through_session in (False, True):
        for module in modules:
            module.history.clear()
        with fresh_dspy_settings():
            dspy.configure(lm=DummyLM([{"reasoning": "r", "answer": "a"}] * 2))
            answers = session.run(uses_held_programs) if through_session else uses_held_programs()
        seen.append((answers, [len(m.history) for m in modules]))
    assert seen == [(["a", "a"], [1, 1, 1])] * 2


PANEL = {"strict": DummyLM([{"verdict": str(i)} for i in range(8)])}  # LMs in a global dict: none a global itself


def panel_verdict() -> str:
    with dspy.context(lm=PANEL["strict"], adapter=dspy.ChatAdapter()):
        return str(dspy.Predict("claim -> verdict")(claim="c").verdict)


def doubler(i: int) -> Callable[[], int]:
    return lambda: i * 2


def test_an_lm_inside_a_global_or_setting_keeps_its_history_past_the_code_cache_bound(
        dx: dspex.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """The LMs inside a global's value (``PANEL["strict"]``) or a setting's (a configured
    TwoStepAdapter's extraction model) are keys of their own: the session's code cache (its
    least recently used keys forgotten past ``DSPEX_CODE_CACHE``) keeps them as long as it keeps
    what holds them, so their history keeps coming back, as in-process, after many other
    objects were sent."""
    lm = PANEL["strict"]
    lm.history.clear()
    monkeypatch.setenv("DSPEX_CODE_CACHE", "6")  # read when a client is made
    with dspex.connect(dx.endpoint, timeout=dx.timeout) as small, fresh_dspy_settings():
        main = DummyLM([{"answer": "draft"}] * 8)
        extract = DummyLM([{"answer": str(i)} for i in range(8)])
        dspy.configure(lm=main, adapter=dspy.TwoStepAdapter(extraction_model=extract))
        s = small.session("p")
        assert s.run(panel_verdict) == "0" and s.run(two_step_answer) == "0"
        assert (len(lm.history), len(extract.history)) == (1, 1)
        fns = [doubler(i) for i in range(20)]  # 20 functions: 20 keys, over the bound
        assert [s.run(f) for f in fns] == [i * 2 for i in range(20)]
        assert (s.run(panel_verdict), len(lm.history)) == ("1", 2)  # the same LM on the worker, its history here
        assert (s.run(two_step_answer), len(extract.history)) == ("1", 2)
        s.close()
