"""Client code run as a notebook runs it: cells compiled under names that are no files and
executed in ``__main__``, their source known only to ``linecache`` (as IPython's compiler
registers it: ``<ipython-input-N-...>`` in a terminal, ``/tmp/ipykernel_PID/HASH.py`` in Jupyter),
functions and classes redefined in later cells. Each cell's program runs in-process and through
one session of the stack; the results must be the same, and the session's module state must go
on from cell to cell as the notebook's does."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.harness import Stack

DRIVER = textwrap.dedent('''
    import json, linecache, sys, __main__

    CELLS = json.loads(open(sys.argv[2]).read())
    STYLE = sys.argv[3]
    for n, source in enumerate(CELLS, 1):
        name = f"<ipython-input-{n}-0123456789ab>" if STYLE == "terminal" else f"/tmp/ipykernel_4242/{n:08x}.py"
        linecache.cache[name] = (len(source), None, source.splitlines(True), name)
        exec(compile(source, name, "exec"), __main__.__dict__)
    print(json.dumps(__main__.RESULTS))
''')

CELLS = [
    '''
import dataclasses, enum, functools, inspect
from typing import Literal

import dspy
import pydantic
from dspy.utils.dummies import DummyLM

import dspex

dx = dspex.connect(FRONTEND, timeout=60)
s = dx.session("c1")
RESULTS = []

def both(fn, *args):
    # the session first: its copy of a global is taken when a call first needs it, and must not
    # hold what the in-process run did to the client's
    remote = s.run(fn, *args)
    RESULTS.append([fn(*args), remote])

def scale(x):
    return x * 2

HISTORY = []

def remember(x):
    HISTORY.append(x)
    return list(HISTORY)
''', '''
both(scale, 21)
both(remember, "a")
both(remember, "b")
''', '''
def scale(x):  # redefined: the session must run this one, keeping the module's state
    return x * 100

both(scale, 21)
both(remember, "c")
both(lambda: inspect.getsource(scale).splitlines()[0])
''', '''
class Mood(enum.Enum):
    HAPPY = "happy"
    SAD = "sad"

class Reading(pydantic.BaseModel):
    mood: Mood
    why: str

@dataclasses.dataclass
class Note:
    text: str

def typed():
    class Judge(dspy.Signature):
        """Read the mood."""
        text: str = dspy.InputField()
        reading: Reading = dspy.OutputField()
        label: Literal["pos", "neg"] = dspy.OutputField()
        mood: Mood = dspy.OutputField()
    lm = DummyLM([{"reading": '{"mood": "happy", "why": "sun"}', "label": "pos", "mood": "sad"}])
    with dspy.context(lm=lm):
        pred = dspy.Predict(Judge)(text="sunny")
    return [type(pred.reading) is Reading, pred.reading.mood is Mood.HAPPY, pred.label, pred.mood is Mood.SAD,
            pred.reading.model_dump(mode="json"), Note(pred.label) == Note("pos")]

both(typed)

class Judge(dspy.Signature):
    """Read the mood."""
    text: str = dspy.InputField()
    reading: Reading = dspy.OutputField()
    mood: Mood = dspy.OutputField()

def judge_answers():
    return DummyLM([{"reading": '{"mood": "sad", "why": "rain"}', "mood": "happy"}])

with dspy.context(lm=judge_answers()):
    local = dspy.Predict(Judge)(text="rainy")
judge = s.put(dspy.Predict(Judge))  # through a ref: the program lives in the session
s.run(lambda: dspy.configure(lm=judge_answers()))
remote = judge(text="rainy")
RESULTS.append([[type(p.reading) is Reading, p.mood is Mood.HAPPY, p.reading.model_dump(mode="json")]
                for p in (local, remote)])
''', '''
class Reading(pydantic.BaseModel):  # redefined with another field
    mood: Mood
    score: float

def typed_again():
    class Judge(dspy.Signature):
        text: str = dspy.InputField()
        reading: Reading = dspy.OutputField()
    with dspy.context(lm=DummyLM([{"reading": '{"mood": "sad", "score": 0.5}'}])):
        reading = dspy.Predict(Judge)(text="rain").reading
    return [sorted(type(reading).model_fields), reading.model_dump(mode="json")]

both(typed_again)
''', '''
@functools.lru_cache(maxsize=None)
def slow_square(x):
    return x * x

def cache_hits():
    slow_square(3)
    return slow_square.cache_info().hits

both(cache_hits)
both(cache_hits)
both(functools.partial(scale, 5))
both(lambda: [Mood("happy") is Mood.HAPPY, isinstance(Note("x"), Note)])
RESULTS.append([HISTORY, s.run(lambda: list(HISTORY))])  # the client's list is not changed by calls
s.close()
dx.close()
''',
]


@pytest.mark.parametrize("style", ["terminal", "jupyter"])
def test_cells_of_a_notebook_run_the_same_in_process_and_in_a_session(cstack: Stack, tmp_path: Path,
                                                                      style: str) -> None:
    cells = [f"FRONTEND = {cstack.frontend!r}\n" + textwrap.dedent(CELLS[0])] + [textwrap.dedent(c) for c in CELLS[1:]]
    (tmp_path / "cells.json").write_text(json.dumps(cells))
    (tmp_path / "driver.py").write_text(DRIVER)
    out = subprocess.run([sys.executable, "driver.py", cstack.frontend, "cells.json", style], env=cstack.env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for local, remote in results[:-1]:
        assert remote == local
    assert [local for local, _ in results[:6]] == [42, ["a"], ["a", "b"], 2100, ["a", "b", "c"], "def scale(x):  # redefined: the session must run this one, keeping the module's state"]
    assert results[6][0] == [True, True, "pos", True, {"mood": "happy", "why": "sun"}, True]
    assert results[7][0] == [True, True, {"mood": "sad", "why": "rain"}]
    assert results[8][0] == [["mood", "score"], {"mood": "sad", "score": 0.5}]
    assert [results[9][0], results[10][0], results[11][0]] == [0, 1, 500]
    history, remote_history = results[-1]
    assert history == ["a", "b", "c"] and remote_history == ["a", "b", "c"]
