"""What a DSPy user does through a session beyond ``run``: names bound by ``define`` for
``eval``/``exec`` code, exec'd code that behaves like module code, output and warnings, the
asyncio client. Each compares with the same code run here where an in-process meaning exists.
"""

import asyncio
import dataclasses
import linecache
import sys
import textwrap
import time
import types
import warnings

import dspy
import pytest
from dspy.utils.dummies import DummyLM
from pydantic import BaseModel

import dspex
from dspex.errors import EncodeError
from tests.conformance.harness import Runner, as_data, fresh_dspy_settings


class Ticket(BaseModel):
    category: str
    urgent: bool


def exact_match(example, prediction, trace=None):
    return example.answer == prediction.answer


def test_define_binds_client_code_for_eval_and_exec(session: dspex.Session) -> None:
    session.define(exact_match)
    session.define(Ticket)
    session.define(DummyLM([{"answer": "Paris"}]), name="lm")
    session.exec("import dspy\ndspy.configure(lm=lm)\npred = dspy.Predict('question -> answer')(question='Capital?')")
    assert session.eval("exact_match(dspy.Example(answer='Paris'), pred)") is True
    ticket = session.eval("Ticket(category='billing', urgent=True)")
    assert isinstance(ticket, Ticket) and ticket == Ticket(category="billing", urgent=True)


TRIAGE_SOURCE = textwrap.dedent('''
    import inspect
    import dspy
    from dspy.utils.dummies import DummyLM
    from pydantic import BaseModel

    class Ticket(BaseModel):
        category: str
        urgent: bool

    class Triage(dspy.Signature):
        """Triage a support ticket."""

        text: str = dspy.InputField()
        ticket: Ticket = dspy.OutputField()

    class Triager(dspy.Module):
        def __init__(self):
            super().__init__()
            self.triage = dspy.Predict(Triage)

        def forward(self, text):
            return self.triage(text=text)

    dspy.configure(lm=DummyLM([{"ticket": {"category": "billing", "urgent": True}}]))
    result = Triager()(text="I was charged twice!").ticket.model_dump()
    source_lines = inspect.getsource(Triager).splitlines()[0]
    module_name = Triager.__module__
    annotation = Triage.model_fields["ticket"].annotation.__name__
''')


def exec_as_module(source):
    """What exec'd source means in-process: a module of its own with its source known to
    ``linecache`` (as IPython runs a cell, or ``python file.py`` a file)."""
    filename = "<user_code>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType("user_code")
    module.__file__ = filename
    sys.modules["user_code"] = module
    try:
        exec(compile(source, filename, "exec", dont_inherit=True), module.__dict__)  # noqa: S102 - a user's script, as python runs it
    finally:
        del sys.modules["user_code"]
        linecache.cache.pop(filename, None)
    return module.__dict__


def test_exec_code_behaves_like_module_code(session: dspex.Session) -> None:
    """Pydantic types in signatures resolve (no inherited ``from __future__ import annotations``),
    classes get a module of their own, and ``inspect.getsource`` works (dspy.Refine and SIMBA need it)."""
    with fresh_dspy_settings():
        expected = exec_as_module(TRIAGE_SOURCE)["result"]
    session.exec(TRIAGE_SOURCE)
    assert session.eval("result") == expected == {"category": "billing", "urgent": True}
    assert session.eval("annotation") == "Ticket"
    assert session.eval("source_lines") == "class Triager(dspy.Module):"
    assert session.eval("module_name") not in ("builtins", "__main__", "")


def test_exec_code_with_its_own_future_annotations(session: dspex.Session) -> None:
    """User code that itself says ``from __future__ import annotations``: string annotations
    resolve against its own module, as they do in a module file in-process."""
    source = "from __future__ import annotations\n" + TRIAGE_SOURCE
    with fresh_dspy_settings():
        expected = exec_as_module(source)["result"]
    session.exec(source)
    assert session.eval("result") == expected == {"category": "billing", "urgent": True}


def test_sessions_have_their_own_namespaces(dx: dspex.Client) -> None:
    """Two sessions on one worker define the same names: each sees its own, as two processes would."""
    a, b = dx.session("c4"), dx.session("c4")
    try:
        a.exec("class Ticket:\n    kind = 'a'\ndef which():\n    return Ticket.kind")
        b.exec("class Ticket:\n    kind = 'b'\ndef which():\n    return Ticket.kind")
        assert (a.eval("which()"), b.eval("which()")) == ("a", "b")
        assert a.worker == b.worker
        assert a.eval("Ticket.__module__") != b.eval("Ticket.__module__")
    finally:
        a.close(timeout=10)
        b.close(timeout=10)


def chatty_program():
    dspy.configure(lm=DummyLM([{"answer": "Paris"}]))
    print("hello from the program")
    warnings.warn("careful with that", UserWarning)
    dspy.Predict("question -> answer")(question="Capital of France?")
    dspy.inspect_history(n=1)
    return 42


def test_print_warnings_and_inspect_history_reach_the_caller(session: dspex.Session, capsys) -> None:
    with pytest.warns(UserWarning, match="careful with that"):
        assert chatty_program() == 42
    printed = capsys.readouterr().out
    events: list[dict] = []
    with pytest.warns(UserWarning, match="careful with that"):  # forwarded here, as in-process
        assert session.apply(chatty_program, on_output=events.append) == 42  # run() with options
    stdout = "".join(e["text"] for e in events if e["stream"] == "stdout")
    assert "hello from the program" in stdout
    assert "Paris" in stdout and "hello from the program" in printed  # inspect_history's print, both sides
    assert any(e["stream"] == "warning" and "careful with that" in e["text"] for e in events)


def show_history():
    dspy.inspect_history(n=5)


def test_inspect_history_shows_only_the_sessions_own_calls(dx: dspex.Client) -> None:
    """``dspy.inspect_history`` reads a process-wide list in DSPy: a session must see only its own
    calls there, as a fresh process would."""
    a, b = dx.session("c4"), dx.session("c4")
    try:
        a.run(predict_program)
        out_a: list[dict] = []
        out_b: list[dict] = []
        a.apply(show_history, on_output=out_a.append)
        b.apply(show_history, on_output=out_b.append)
        assert "Paris" in "".join(e["text"] for e in out_a)
        assert "Paris" not in "".join(e["text"] for e in out_b)
    finally:
        a.close(timeout=10)
        b.close(timeout=10)


def test_progress_events_on_run(session: dspex.Session) -> None:
    def report_progress():
        from dspex.progress import report

        for i in range(3):
            report({"step": i})
        return "done"

    events: list = []
    assert session.apply(report_progress, on_progress=events.append) == "done"
    assert [e.get("step") for e in events if isinstance(e, dict) and "step" in e] == [0, 1, 2]


def predict_program():
    dspy.configure(lm=DummyLM([{"answer": "Paris"}]))
    return dspy.Predict("question -> answer")(question="What is the capital of France?")


def test_asyncio_client_runs_the_same_program(cstack) -> None:
    with fresh_dspy_settings():
        expected = predict_program()

    async def main():
        import dspex as dx_module  # ``dspex.aio`` is reachable after ``import dspex``

        client = dx_module.aio.connect(cstack.frontend, timeout=60)
        try:
            s = client.session("c1")
            try:
                got = await s.run(predict_program)
                prog = await s.put(dspy.Predict("question -> answer"))
                await s.run(dspy.configure, lm=DummyLM([{"answer": "Rome"}, {"answer": "Madrid"}]))
                second = await s.method(prog, "acall", kwargs={"question": "Capital of Italy?"})
                third = await prog(question="Capital of Spain?")  # an aio handle's call is awaitable
                return got, second, third
            finally:
                await s.close()
        finally:
            await client.close()

    got, second, third = asyncio.run(main())
    assert as_data(got) == as_data(expected)
    assert isinstance(second, dspy.Prediction) and second.answer == "Rome"
    assert isinstance(third, dspy.Prediction) and third.answer == "Madrid"


def test_unpicklable_argument_names_its_path(session: dspex.Session) -> None:
    import threading

    with pytest.raises(EncodeError) as info:
        session.run(lambda *a, **k: None, 1, {"reward_fn": threading.Lock()})
    assert "args[1]['reward_fn']" in str(info.value)
    assert session.run(int, "7") == 7


@dataclasses.dataclass(frozen=True)
class Score:
    name: str
    value: float


def data_results_program():
    lm = DummyLM([{"answer": "Paris"}])
    dspy.configure(lm=lm)
    prediction = dspy.Predict("question -> answer")(question="Capital of France?")
    return {
        "score": Score("exact", 1.0),
        "error": ValueError("kept as a value"),
        "example": dspy.Example(question="q", answer="a").with_inputs("question"),
        "prediction": prediction,
        "ticket": Ticket(category="billing", urgent=False),
        "lm": lm,
    }


def test_results_that_can_be_data_are_data(session: dspex.Session) -> None:
    with fresh_dspy_settings():
        local = data_results_program()
    got = session.run(data_results_program)
    for key in ("score", "error", "example", "prediction", "ticket"):
        assert type(got[key]) is type(local[key]), key
        assert as_data(got[key]) == as_data(local[key]), key
    assert got["example"].inputs().keys() == local["example"].inputs().keys() == ["question"]
    lm = got["lm"]  # an LM stays on the worker: a handle in place, reading like the LM
    assert isinstance(lm, dspex.Ref)
    assert lm.model == "dummy"
    assert len(lm.history) == 1 and lm.history[-1:][0]["outputs"] == local["lm"].history[-1]["outputs"]


def test_refs_end_with_their_session(dx: dspex.Client) -> None:
    s = dx.session("c1")
    prog = s.put(dspy.Predict("question -> answer"))
    released = s.put(dspy.Predict("a -> b"))
    s.release(released)
    with pytest.raises(dspex.RefNotFound):
        released.signature  # noqa: B018 - reading it is the request that fails
    s.close(timeout=10)
    with pytest.raises(dspex.SessionClosed):
        prog(question="still there?")


def prediction_with_a_lock():
    import threading

    return dspy.Prediction(answer="Paris", guard=threading.Lock())


def test_a_leaf_that_cannot_travel_stays_a_ref_in_place(session: dspex.Session) -> None:
    local = prediction_with_a_lock()
    got = session.run(prediction_with_a_lock)
    assert isinstance(got, dspy.Prediction) and got.answer == local.answer
    assert isinstance(got.guard, dspex.Ref)
    assert got.guard.locked() is False  # the handle reads like the lock it stands for


def print_from_a_thread():
    import threading

    thread = threading.Thread(target=lambda: print("hello from a user thread"))
    thread.start()
    thread.join()
    return "joined"


def test_print_from_a_user_thread_reaches_the_caller(session: dspex.Session, capsys) -> None:
    assert print_from_a_thread() == "joined"
    assert "hello from a user thread" in capsys.readouterr().out
    events: list[dict] = []
    assert session.apply(print_from_a_thread, on_output=events.append) == "joined"
    assert "hello from a user thread" in "".join(e["text"] for e in events if e["stream"] == "stdout")


def test_cancelling_an_asyncio_call_stops_it_on_the_worker(cstack) -> None:
    """``task.cancel()`` on an awaited session call (a web request whose client went away): as an
    in-process ``await react.acall(...)`` stops at cancellation, the worker stops the call, so the
    session's next call does not wait behind it and no more LM calls are spent."""
    from tests.conformance.test_containment import SlowLM, react_program

    step = {"next_thought": "Look it up again.", "next_tool_name": "lookup", "next_tool_args": {"term": "dspex"}}

    async def main():
        client = dspex.aio.connect(cstack.frontend, timeout=60)
        try:
            s = client.session("t")
            try:
                lm = await s.put(SlowLM([step] * 20))  # about 6 s of LM calls
                task = asyncio.create_task(s.apply(react_program, [lm]))
                await asyncio.sleep(1.0)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                started = time.monotonic()
                calls_after_cancel = len(await lm.history)
                waited = time.monotonic() - started
                await s.run(time.sleep, 1.0)  # an observation window on the worker
                return waited, calls_after_cancel, len(await lm.history)
            finally:
                await s.close()
        finally:
            await client.close()

    waited, calls_after_cancel, calls_later = asyncio.run(main())
    assert waited < 3, f"the next call waited {waited:.1f}s behind the cancelled one"
    assert calls_later == calls_after_cancel


class QA(dspy.Module):
    def __init__(self):
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question):
        return self.predict(question=question)


def test_a_program_handle_reads_like_the_program(run: Runner) -> None:
    """DSPy's Module API through a handle, with Python's protocols: the same answers as the object."""
    lm = run.put(DummyLM([{"answer": "a"}] * 10))
    run(dspy.configure, lm=lm)
    prog = run.put(QA())
    assert str(prog) == str(QA()) and f"{prog}".startswith("predict = Predict(")  # print(program)
    assert [name for name, _ in prog.named_parameters()] == ["predict"]
    assert len(prog.predictors()) == 1 and prog.predictors()[0] == prog.predict
    twin = prog.deepcopy()  # DSPy's copy: an independent program
    twin.predict.demos = [dspy.Example(question="q", answer="a")]
    assert (len(prog.predict.demos), len(twin.predict.demos)) == (0, 1)
    prog.load_state(twin.dump_state())
    assert len(prog.predict.demos) == 1 and len(prog.reset_copy().predict.demos) == 0
    assert prog(question="x").answer == "a" and prog.forward(question="x").answer == "a"
    assert len(lm.history) == 2 and "x" in str(lm.history[-1]["messages"])
    assert len(prog.predict.signature.output_fields) == 1 and "answer" in prog.predict.signature.output_fields
