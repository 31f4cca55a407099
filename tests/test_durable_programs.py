"""A durable session running a script's own DSPy program survives a kill -9 of its worker.

The program is what a user's script holds at module level: a ``dspy.ReAct`` agent whose tool is a
function of the script, that tool's log, a notebook object of a class of the script, the LM
configured on the client, a ``BootstrapFewShot``-compiled program. The same sequence of calls runs
in-process and through a durable session whose worker is SIGKILLed halfway; both must give the
same answers and leave the same state (the LM's answers prove it is the same LM, moved on).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from tests.conformance.harness import as_data, fresh_dspy_settings
from tests.harness import Stack, wait_for

dspy = pytest.importorskip("dspy")
from dspy.utils import DummyLM

pytestmark = pytest.mark.timeout(120)

LOOKED_UP: list[str] = []


def weather(city: str) -> str:
    """Look up the weather of a city."""
    LOOKED_UP.append(city)
    return f"sunny in {city}"


class Notebook:
    def __init__(self) -> None:
        self.notes: list[str] = []

    def add(self, note: str) -> int:
        self.notes.append(note)
        return len(self.notes)


NOTEBOOK = Notebook()
AGENT = dspy.ReAct("question -> answer", tools=[weather], max_iters=3)


class Answer(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cot = dspy.ChainOfThought("question -> answer")

    def forward(self, question: str) -> Any:
        return self.cot(question=question)


def agent_answers(n: int) -> list[dict[str, Any]]:
    """The LM's script: for each question, call the tool once, finish, answer (numbered)."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        out += [{"next_thought": f"look up {i}", "next_tool_name": "weather", "next_tool_args": {"city": f"city{i}"}},
                {"next_thought": "done", "next_tool_name": "finish", "next_tool_args": {}},
                {"reasoning": f"reason {i}", "answer": f"answer {i}"}]
    return out


def compile_program() -> Any:
    trainset = [dspy.Example(question=f"q{i}", answer=f"a{i}").with_inputs("question") for i in range(3)]
    teacher = DummyLM([{"reasoning": f"r{i}", "answer": f"a{i}"} for i in range(3)])
    with dspy.context(lm=teacher):
        optimizer = dspy.BootstrapFewShot(metric=lambda ex, pred, trace=None: ex.answer == pred.answer,
                                          max_bootstrapped_demos=2, max_labeled_demos=0)
        return optimizer.compile(Answer(), trainset=trainset)


def state(program: Any) -> dict[str, Any]:
    return {"looked_up": list(LOOKED_UP), "notes": list(NOTEBOOK.notes), "lm_history": len(dspy.settings.lm.history),
            "demos": [d.toDict() for d in program.cot.predict.demos]}


def scenario(run: Callable[..., Any], kill: Callable[[], None]) -> list[Any]:
    out: list[Any] = [run(NOTEBOOK.add, "before")]
    program = run(compile_program)  # through a session: a ref (a Module stays on the worker)
    out.append(run(AGENT, question="weather in city0?").answer)
    out.append(run(state, program))
    kill()
    out.append(run(NOTEBOOK.add, "after"))
    out.append(run(AGENT, question="weather in city1?").answer)
    out.append(run(program, question="q9").answer)
    out.append(run(state, program))
    return out


def test_a_scripts_program_in_a_durable_session_survives_kill_9_as_if_nothing_happened(stack: Stack) -> None:
    global LOOKED_UP, NOTEBOOK
    answers = agent_answers(2) + [{"reasoning": "r9", "answer": "a9"}]
    with fresh_dspy_settings():
        dspy.configure(lm=DummyLM(answers))
        expected = scenario(lambda fn, *a, **kw: fn(*a, **kw), lambda: None)
    LOOKED_UP, NOTEBOOK = [], Notebook()  # as the script starts again

    dx = stack.pool("p:strict_queue", 2)
    s = dx.session("p", durable=True)
    killed: list[int] = []

    def kill() -> None:
        pid = s.run(os.getpid)
        stack.kill(pid)
        wait_for(lambda: pid not in {w["pid"] for w in dx.status()["pools"]["p"]["workers"]}, what="worker gone")
        killed.append(pid)

    with fresh_dspy_settings():
        dspy.configure(lm=DummyLM(answers))
        got = scenario(s.run, kill)
    assert killed and s.run(os.getpid) != killed[0]
    assert as_data(got) == as_data(expected)
    assert got[2]["looked_up"] == ["city0"] and got[-1]["looked_up"] == ["city0", "city1"]
    assert got[-1]["notes"] == ["before", "after"] and len(got[-1]["demos"]) == 2
    assert (LOOKED_UP, NOTEBOOK.notes) == ([], [])  # the session's module state, not the client's
    s.close()
