"""Exec'd code behaves like module code on the worker; the apply/bind/put ops."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

import dspex
from dspex.wire.ops import Op
from tests.harness import Stack


@pytest.fixture
def dx(stack: Stack) -> dspex.Client:
    return stack.pool("p:strict_queue", 1)


def test_the_workers_start_up_objects_are_out_of_the_collectors_walks(dx: dspex.Client) -> None:
    # dspy and what it imports (tens of thousands of objects): a full collection that walked them
    # all cost a worker ~50 ms every few thousand calls
    s = dx.session("p")
    frozen, walked = s.eval("(__import__('gc').get_freeze_count(), len(__import__('gc').get_objects()))")
    assert frozen > 20_000 and walked < frozen / 10, (frozen, walked)
    assert s.eval("__import__('dspy').__name__") == "dspy"


def test_exec_code_is_module_code(dx: dspex.Client) -> None:
    s = dx.session("p")
    s.exec(textwrap.dedent("""
        import inspect, sys
        def f(x: int) -> str:
            return str(x)

        class Ticket:
            '''a ticket'''
            def describe(self) -> str:
                return "ticket"
    """))
    # the worker's own `from __future__ import annotations` must not leak into user code
    assert s.eval("f.__annotations__['x'] is int")
    module = s.eval("Ticket.__module__")
    assert module.startswith("dspex_session_")
    assert s.eval("sys.modules[Ticket.__module__].Ticket is Ticket")
    assert s.eval("inspect.getsource(f)") == "def f(x: int) -> str:\n    return str(x)\n"
    assert "def describe(self) -> str:" in s.eval("inspect.getsource(Ticket)")
    # a later exec: its lines follow on in the same module file
    s.exec("def g():\n    return 1 / 0\n")
    assert s.eval("inspect.getsource(g)") == "def g():\n    return 1 / 0\n"
    with pytest.raises(dspex.RemoteError) as info:
        s.eval("g()")
    assert "return 1 / 0" in info.value.remote_traceback
    # each session has its own module
    other = dx.session("p")
    other.exec("class Ticket:\n    pass\n")
    assert other.eval("Ticket.__module__") != module


def test_a_loop_of_exec_calls_keeps_only_the_code_that_defines_something(dx: dspex.Client) -> None:
    """A session driven by ``exec`` (a service running ``s.exec("answer = prog(q)")`` per request)
    must not grow its module's source, nor a durable session's checkpoint, with every call: code
    that leaves no function, class or lambda behind has no later reader of its lines."""
    s = dx.session("p")
    s.exec("import inspect, linecache\ntotal = 0\nsquares = [i * i for i in range(3)]\n")
    s.exec("def bump(n):\n    return n + 1\n")
    lines = s.eval("len(linecache.getlines(bump.__code__.co_filename))")
    for _ in range(200):
        s.exec("total = bump(total)\n")
    assert s.eval("total") == 200
    assert s.eval("len(linecache.getlines(bump.__code__.co_filename))") == lines
    assert s.eval("inspect.getsource(bump)") == "def bump(n):\n    return n + 1\n"
    s.exec("later = lambda: 1 / 0\n")  # a lambda keeps its line: its traceback reads it
    with pytest.raises(dspex.RemoteError) as info:
        s.eval("later()")
    assert "later = lambda: 1 / 0" in info.value.remote_traceback
    with pytest.raises(dspex.RemoteError) as info:  # a failing exec's traceback shows its own line
        s.exec("total = total / 0\n")
    assert "total = total / 0" in info.value.remote_traceback


def test_exec_user_future_import_applies_to_that_code_only(dx: dspex.Client) -> None:
    s = dx.session("p")
    s.exec("from __future__ import annotations\ndef f(x: int): pass\n")
    assert s.eval("f.__annotations__['x']") == "int"
    s.exec("def h(x: int): pass\n")
    assert s.eval("h.__annotations__['x'] is int")


def test_pydantic_field_and_refine_work_from_exec(dx: dspex.Client) -> None:
    s = dx.session("p")
    s.exec(textwrap.dedent("""
        import dspy, pydantic
        from dspy.utils import DummyLM

        class Ticket(pydantic.BaseModel):
            title: str
            priority: int

        class Triage(dspy.Signature):
            ticket: Ticket = dspy.InputField()
            label: str = dspy.OutputField()

        class QA(dspy.Module):
            def __init__(self):
                super().__init__()
                self.predict = dspy.Predict("question -> answer")

            def forward(self, question):
                return self.predict(question=question)

        dspy.configure(lm=DummyLM([{"label": "bug"}] + [{"answer": "4"}] * 4))
        triage = dspy.Predict(Triage)(ticket=Ticket(title="crash", priority=1)).label
        refine = dspy.Refine(module=QA(), N=2, reward_fn=lambda args, pred: 1.0, threshold=1.0)
        answer = refine(question="2+2?").answer
    """))
    assert s.eval("triage") == "bug"
    assert s.eval("answer") == "4"


def test_apply_bind_put(dx: dspex.Client) -> None:
    s = dx.session("p")
    fn = s.exec("def add(a, b=0):\n    return a + b\n")["add"]
    assert dx.request(Op.APPLY.value, "p", s.id, [fn, [2], {"b": 3}]) == 5
    assert dx.request(Op.BIND.value, "p", s.id, ["limit", 7]) is None
    assert s.eval("add(limit, 1)") == 8
    ref = dx.request(Op.PUT.value, "p", s.id, [{"k": [1, 2]}])
    assert isinstance(ref, dspex.Ref)
    assert s.eval("x['k']", {"x": ref}) == [1, 2]
    with pytest.raises(dspex.ProtocolError, match="identifier"):
        dx.request(Op.BIND.value, "p", s.id, ["not a name", 1])
    with pytest.raises(dspex.RemoteError, match="not callable"):
        dx.request(Op.APPLY.value, "p", s.id, [5, [], {}])


class ClientModule:
    """A class defined in the client's own (test) module: it travels by value."""

    def forward(self, question: str) -> str:
        return question.upper()


def test_by_value_code_has_its_source_on_the_worker(dx: dspex.Client) -> None:
    import inspect

    s = dx.session("p")
    assert s.run(lambda: inspect.getsource(ClientModule)) == inspect.getsource(ClientModule)
    assert s.run(lambda: ClientModule().forward("q")) == "Q"
    # bound by name for exec'd code, source included
    s.define(ClientModule)
    assert s.eval("__import__('inspect').getsource(ClientModule)") == inspect.getsource(ClientModule)
    assert s.eval("ClientModule().forward('x')") == "X"


SCRIPT = '''
import inspect, json, sys
import dspex


class Judge:
    def forward(self, claim):
        return claim.upper()


with dspex.connect(sys.argv[1], timeout=60) as dx:
    s = dx.session("p")
    remote = s.run(lambda: inspect.getsource(Judge))
    print(json.dumps({"same": remote == inspect.getsource(Judge), "call": s.run(lambda: Judge().forward("x"))}))
'''


def test_classes_of_a_scripts_main_keep_their_source(stack: Stack, dx: dspex.Client, tmp_path: Any) -> None:
    import json
    import subprocess
    import sys

    script = tmp_path / "judge.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script), stack.frontend], env=stack.env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"same": True, "call": "X"}
