"""A user's script: program text in ``__main__``, run as ``python script.py`` against the stack.

Classes and functions of ``__main__`` cannot be imported by the worker: they must travel by value
with their source (dspy.Refine reads the module class's and the reward function's source).
"""

import json
import subprocess
import sys
import textwrap

from tests.harness import Stack

SCRIPT = textwrap.dedent('''
    import json
    import sys

    import dspy
    import dspex
    from dspy.utils.dummies import DummyLM
    from pydantic import BaseModel


    class Verdict(BaseModel):
        label: str
        confidence: float


    class Judge(dspy.Module):
        def __init__(self):
            super().__init__()
            self.judge = dspy.ChainOfThought("claim -> verdict: str")

        def forward(self, claim):
            return self.judge(claim=claim)


    def short_verdict(args, pred):
        return 1.0 if len(pred.verdict.split()) == 1 else 0.0


    def program():
        dspy.configure(lm=DummyLM([{"reasoning": "r", "verdict": "probably true"},
                                   {"reasoning": "r", "verdict": "true"}] * 3))
        refine = dspy.Refine(module=Judge(), N=2, reward_fn=short_verdict, threshold=1.0)
        pred = refine(claim="The sky is blue.")
        return {"verdict": pred.verdict, "model": Verdict(label=pred.verdict, confidence=1.0).model_dump()}


    local = program()
    dspy.configure(lm=None)
    with dspex.connect(sys.argv[1], timeout=60) as dx:
        session = dx.session("c1")
        remote = session.run(program)
        defined = (session.define(Verdict), session.eval("Verdict(label='x', confidence=0.5)"))[1]
        session.close()
    print(json.dumps({"local": local, "remote": remote, "defined": defined.model_dump(),
                      "defined_type": type(defined).__name__}))
''')


def test_a_script_main_module_travels_by_value(cstack: Stack, tmp_path) -> None:
    script = tmp_path / "judge.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script), cstack.frontend], env=cstack.env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["remote"] == result["local"]
    assert result["local"]["verdict"] == "true"
    assert result["defined_type"] == "Verdict" and result["defined"] == {"label": "x", "confidence": 0.5}


HELPERS = textwrap.dedent('''
    """The user's own helper module, next to the script (the worker cannot import it)."""

    def normalize(text):
        return text.strip().lower()
''')

SCRIPT_WITH_HELPERS = textwrap.dedent('''
    import json
    import sys

    import dspy
    import dspex
    import helpers
    from dspy.utils.dummies import DummyLM
    from helpers import normalize


    def program():
        dspy.configure(lm=DummyLM([{"answer": "  PARIS "}]))
        answer = dspy.Predict("question -> answer")(question="Capital of France?").answer
        return [helpers.normalize(answer), normalize(answer)]


    local = program()
    dspy.configure(lm=None)
    with dspex.connect(sys.argv[1], timeout=60) as dx:
        session = dx.session("c1")
        try:
            remote = session.run(program)
        except dspex.DspexError as err:
            remote = f"{type(err).__name__}: {err}"
        session.close()
    print(json.dumps({"local": local, "remote": remote}))
''')


def test_a_script_using_its_own_helper_module(cstack: Stack, tmp_path) -> None:
    """``import helpers`` next to the script: its functions, and the module object itself, travel by
    value like the script's code (the app's own modules are not installed on the worker)."""
    (tmp_path / "helpers.py").write_text(HELPERS)
    script = tmp_path / "main.py"
    script.write_text(SCRIPT_WITH_HELPERS)
    out = subprocess.run([sys.executable, str(script), cstack.frontend], env=cstack.env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["local"] == ["paris", "paris"]
    assert result["remote"] == result["local"]


SCRIPT_DEFERRED = textwrap.dedent('''
    from __future__ import annotations

    import json
    import sys
    import typing
    from typing import Optional

    import dspy
    import dspex
    import pydantic
    from dspy.utils.dummies import DummyLM


    class Tag(pydantic.BaseModel):
        name: str


    class Entry(pydantic.BaseModel):
        tag: Tag
        after: Optional[Entry] = None


    def program():
        class Tagging(dspy.Signature):
            """Tag the text."""

            text: str = dspy.InputField()
            tags: list[Tag] = dspy.OutputField()

        class Ticket(pydantic.BaseModel):
            tags: list[Tag]
            parent: Optional[Ticket] = None

        with dspy.context(lm=DummyLM([{"tags": '[{"name": "urgent"}]'}])):
            tags = dspy.Predict(Tagging)(text="the server is down").tags
        return {"tags": repr(tags), "ticket": repr(Ticket(tags=tags, parent=Ticket(tags=[]))),
                "hints": sorted(typing.get_type_hints(Entry)), "entry": repr(Entry(tag=Tag(name="e")))}


    local = program()
    with dspex.connect(sys.argv[1], timeout=60) as dx:
        session = dx.session("c1")
        remote = session.run(program)
        session.close()
    print(json.dumps({"local": local, "remote": remote}))
''')


def test_a_script_under_deferred_annotations_makes_classes_in_the_session(cstack: Stack, tmp_path) -> None:
    """``from __future__ import annotations`` in ``__main__``: a Signature and a model made by the
    program on the worker, ``typing.get_type_hints`` of a class sent by value, resolve in the
    session's copy of the script's module, not the worker's own ``__main__``."""
    script = tmp_path / "tagger.py"
    script.write_text(SCRIPT_DEFERRED)
    out = subprocess.run([sys.executable, str(script), cstack.frontend], env=cstack.env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["local"]["tags"] == "[Tag(name='urgent')]" and result["local"]["hints"] == ["after", "tag"]
    assert result["remote"] == result["local"]


SUMMARIZER = textwrap.dedent('''
    """The user's program module, next to the script (the worker cannot import it)."""
    import dspy


    class Summarize(dspy.Module):
        def __init__(self):
            super().__init__()
            self.predict = dspy.Predict("text -> summary")

        def forward(self, text):
            return self.predict(text=text)
''')

SCRIPT_LOADING_A_SAVED_PROGRAM = textwrap.dedent('''
    import json
    import sys

    import dspy
    import dspex
    from dspy.utils.dummies import DummyLM
    from summarizer import Summarize


    def load_and_run(path):
        import summarizer  # the session's copy of the module the saved program's class is in

        dspy.configure(lm=DummyLM([{"summary": "short"}]))
        program = dspy.load(path, allow_pickle=True)
        return [type(program).__name__, isinstance(program, summarizer.Summarize),
                [demo["summary"] for demo in program.predict.demos], program(text="a long text").summary]


    def load_without_its_module(path):
        return dspy.load(path, allow_pickle=True)


    program = Summarize()
    program.predict.demos = [dspy.Example(text="a", summary="b")]
    program.save(sys.argv[2], save_program=True)
    local = load_and_run(sys.argv[2])
    dspy.configure(lm=None)
    with dspex.connect(sys.argv[1], timeout=60) as dx:
        session = dx.session("c1")
        try:
            session.run(load_without_its_module, sys.argv[2])
            missing = "loaded"
        except ModuleNotFoundError as err:
            missing = [err.name, [note for note in getattr(err, "__notes__", []) if "summarizer" in note[:20]]]
        try:
            remote = session.run(load_and_run, sys.argv[2])
        except dspex.DspexError as err:
            remote = f"{type(err).__name__}: {err}"
        session.close()
    print(json.dumps({"local": local, "remote": remote, "missing": missing}))
''')


def test_a_program_saved_whole_loads_in_the_session_with_its_module(cstack: Stack, tmp_path) -> None:
    """DSPy docs "Saving and loading": ``save(path, save_program=True)`` of a program whose class is in
    the user's own module, then ``dspy.load(path, allow_pickle=True)`` in a call that imports that
    module: pickle finds the class in the session's copy (``AttributeError: Can't get attribute
    'Summarize' on <module 'summarizer'>`` before: the worker's ``sys.modules`` entry answered
    namespace reads with the session's copy, not attribute reads). A call that does not import it
    gets a ``ModuleNotFoundError`` whose note says it is the user's own module to import (it said
    only "install it on the workers' environment")."""
    (tmp_path / "summarizer.py").write_text(SUMMARIZER)
    script = tmp_path / "main.py"
    script.write_text(SCRIPT_LOADING_A_SAVED_PROGRAM)
    out = subprocess.run([sys.executable, str(script), cstack.frontend, str(tmp_path / "saved")], env=cstack.env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["local"] == ["Summarize", True, ["b"], "short"]
    assert result["remote"] == result["local"]
    # a call that does not import the module: the worker cannot import it, and the error says why
    # (a module of the user's code here, not a package to install on the workers)
    name, notes = result["missing"]
    assert name == "summarizer"
    assert notes and "your own code" in notes[0] and "import summarizer" in notes[0], notes


SCRIPT_WITH_A_DEPRECATION = textwrap.dedent('''
    import sys
    import warnings

    import dspex


    def old_api():
        warnings.warn("old_api is deprecated", DeprecationWarning, stacklevel=1)
        return 1


    if sys.argv[2] == "inprocess":
        old_api()
    else:
        with dspex.connect(sys.argv[1], timeout=60) as dx:
            session = dx.session("c1")
            session.run(old_api)
            session.close()
''')


def test_a_deprecation_warned_in_the_scripts_own_code_shows_as_in_process(cstack: Stack, tmp_path) -> None:
    """Python shows a DeprecationWarning only when the code that warns is ``__main__``'s (its
    default filter ``default::DeprecationWarning:__main__``): a function of the script (or DSPy
    warning at the script's line, ``lm(messages=[...])``) shows it in-process. Through a session the
    worker showed it, and the client, filtering it again with a module name made from the file's
    path (``/tmp/.../main``), dropped it."""
    script = tmp_path / "main.py"
    script.write_text(SCRIPT_WITH_A_DEPRECATION)
    shown = {}
    for mode in ("inprocess", "session"):
        out = subprocess.run([sys.executable, str(script), cstack.frontend, mode], env=cstack.env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        shown[mode] = [line for line in out.stderr.splitlines() if "DeprecationWarning:" in line]
    assert shown["inprocess"] == [f"{script}:9: DeprecationWarning: old_api is deprecated"]
    assert shown["session"] == shown["inprocess"]


SCRIPT_CALLING_A_DEPRECATED_API = textwrap.dedent('''
    import sys

    import dspy

    import dspex

    if sys.argv[2] == "inprocess":
        dspy.InputField(prefix="Question:")
    else:
        with dspex.connect(sys.argv[1], timeout=60) as dx:
            session = dx.session("c1")
            session.run(dspy.InputField, prefix="Question:")
            session.close()
''')


def test_a_deprecation_a_library_warns_at_its_callers_line_shows_at_the_line_of_the_call(
        cstack: Stack, tmp_path) -> None:
    """DSPy warns ``dspy.InputField(prefix=...)`` at its caller's line: the script's, in-process,
    so ``__main__``'s default filter shows it. ``s.run(dspy.InputField, prefix=...)`` is the script
    calling it through the session: its caller on the worker is the worker's own dispatch, whose
    place the client dropped as a module of no one's; it shows at the line of ``s.run``."""
    script = tmp_path / "main.py"
    script.write_text(SCRIPT_CALLING_A_DEPRECATED_API)
    shown = {}
    for mode in ("inprocess", "session"):
        out = subprocess.run([sys.executable, str(script), cstack.frontend, mode], env=cstack.env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        shown[mode] = [line for line in out.stderr.splitlines() if "DeprecationWarning:" in line]
    message = "DeprecationWarning: The 'prefix' argument in InputField/OutputField is deprecated"
    assert [line.startswith(f"{script}:9: {message}") for line in shown["inprocess"]] == [True], shown
    assert [line.startswith(f"{script}:13: {message}") for line in shown["session"]] == [True], shown


SCRIPT_AWAITING_A_DEPRECATED_API = textwrap.dedent('''
    import asyncio
    import sys

    import dspy

    import dspex


    async def main():
        if sys.argv[2] == "inprocess":
            dspy.InputField(prefix="Question:")
            return
        async with dspex.aio.connect(sys.argv[1], timeout=60) as dx:
            session = dx.session("c1")
            if sys.argv[2] == "await":
                await session.run(dspy.InputField, prefix="Question:")
            elif sys.argv[2] == "gather":
                await asyncio.gather(session.run(dspy.InputField, prefix="Question:"))
            else:
                await asyncio.wait_for(session.run(dspy.InputField, prefix="Question:"), 60)
            await session.close()

    asyncio.run(main())
''')


def test_a_deprecation_a_library_warns_at_its_callers_line_shows_at_the_line_of_the_await(
        cstack: Stack, tmp_path) -> None:
    """The asyncio twin of the test above: ``s.run(dspy.InputField, prefix=...)`` in a coroutine of
    the script shows DSPy's DeprecationWarning at the line of that ``s.run``, as the same call
    in-process shows it at its own line, also when the call is awaited in a task of its own
    (``asyncio.gather``, ``asyncio.wait_for``), whose stack holds none of the script's frames."""
    script = tmp_path / "main.py"
    script.write_text(SCRIPT_AWAITING_A_DEPRECATED_API)
    shown = {}
    for mode in ("inprocess", "await", "gather", "wait_for"):
        out = subprocess.run([sys.executable, str(script), cstack.frontend, mode], env=cstack.env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        shown[mode] = [line for line in out.stderr.splitlines() if "DeprecationWarning:" in line]
    message = "DeprecationWarning: The 'prefix' argument in InputField/OutputField is deprecated"
    assert [line.startswith(f"{script}:12: {message}") for line in shown["inprocess"]] == [True], shown
    for mode, line in (("await", 17), ("gather", 19), ("wait_for", 21)):
        assert [text.startswith(f"{script}:{line}: {message}") for text in shown[mode]] == [True], shown
