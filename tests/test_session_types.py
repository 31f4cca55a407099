"""Values keep their exact types through real broker and worker processes, both ways; errors
keep their chain; a module missing where a value arrives is a catchable ModuleNotFoundError."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy.evaluate.evaluate import EvaluationResult
from dspy.utils.dummies import DummyLM

import dspex
from tests.harness import Stack
from tests.test_codec_types import EXACT, Scored, assert_exact

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def dx(stack: Stack) -> dspex.Client:
    return stack.pool("p:strict_queue", 1)


def echo_with_types(values: list[Any]) -> tuple[list[Any], list[str]]:
    """What the worker received, and the types it saw."""
    return values, [f"{type(v).__module__}.{type(v).__qualname__}" for v in values]


def test_every_exact_type_as_an_argument_and_as_a_result(dx: dspex.Client) -> None:
    s = dx.session("p")
    back, seen = s.run(echo_with_types, EXACT)
    assert seen == [f"{type(v).__module__}.{type(v).__qualname__}" for v in EXACT]
    for i, (sent, got) in enumerate(zip(EXACT, back)):
        try:
            assert_exact(sent, got)
        except AssertionError as exc:
            raise AssertionError(f"EXACT[{i}] = {sent!r} came back as {got!r}") from exc


def test_values_made_on_the_worker_come_back_exact(dx: dspex.Client) -> None:
    s = dx.session("p")
    out = s.eval("(__import__('collections').OrderedDict(b=1, a=2), __import__('decimal').Decimal('0.1'), "
                 "__import__('uuid').UUID(int=5), __import__('pathlib').Path('/tmp/x'), "
                 "__import__('enum').IntFlag('Perm', 'R W').W, 'lone \\udcff')")
    import collections
    import decimal
    import pathlib
    import uuid

    assert type(out[0]) is collections.OrderedDict and list(out[0]) == ["b", "a"]
    assert out[1:4] == (decimal.Decimal("0.1"), uuid.UUID(int=5), pathlib.PosixPath("/tmp/x"))
    assert [type(x) for x in out[1:4]] == [decimal.Decimal, uuid.UUID, pathlib.PosixPath]
    assert type(out[4]).__name__ == "Perm" and int(out[4]) == 2  # an enum class made on the worker, by value
    assert out[5] == "lone \udcff"


def make_stdlib_values() -> list[Any]:
    import array
    import collections
    import datetime
    import fractions
    import re
    import types
    import zoneinfo

    return [fractions.Fraction(1, 3), collections.deque([1, 2], maxlen=5), types.SimpleNamespace(a=1, b=[2]),
            range(3, 10, 2), slice(1, None, 2), array.array("i", [1, 2]), re.compile("a+b", re.IGNORECASE), ...,
            collections.ChainMap({"a": 1}, {"b": 2}),
            # time zones alone, as a scheduling program returns them beside its datetimes
            datetime.UTC, datetime.timezone(datetime.timedelta(hours=2), "CEST"),
            zoneinfo.ZoneInfo("Europe/Paris")]


def test_standard_library_values_made_on_the_worker_come_back_as_values(dx: dspex.Client) -> None:
    """Values of the standard library's value types are data: they come back as themselves, not
    as refs to the worker's copy."""
    s = dx.session("p")
    got, expected = s.run(make_stdlib_values), make_stdlib_values()
    assert [type(v) for v in got] == [type(v) for v in expected]
    assert [repr(v) for v in got] == [repr(v) for v in expected]
    assert got[1].maxlen == 5 and got[7] is ...


def make_numpy_values() -> list[Any]:
    import numpy as np

    return [np.zeros(2, dtype=np.float32).dtype, np.dtype([("id", "i4"), ("score", "f8")]),
            np.array([1, "two", None, [3]], dtype=object), np.ma.masked_array([1, 2], mask=[False, True])]


def test_numpy_dtypes_and_arrays_of_objects_or_masked_made_on_the_worker_come_back_as_values(dx: dspex.Client) -> None:
    # they came back as refs: `s.run(lambda: arr.dtype) == np.float32` was False (refs compare by identity)
    import numpy as np

    s = dx.session("p")
    got, expected = s.run(make_numpy_values), make_numpy_values()
    assert [type(v) for v in got] == [type(v) for v in expected]
    assert got[0] == np.float32 and got[1] == expected[1] and got[1].names == ("id", "score")
    assert got[2].dtype == object and got[2].tolist() == [1, "two", None, [3]]
    assert got[3].mask.tolist() == [False, True] and got[3].sum() == 1


def test_a_class_defined_in_the_session_comes_back_as_that_class(dx: dspex.Client) -> None:
    s = dx.session("p")
    s.exec("import typing\nclass Hit(typing.NamedTuple):\n    doc: str\n    score: float\n")
    hit = s.eval("Hit('d', 0.5)")
    assert type(hit).__name__ == "Hit" and hit.doc == "d" and hit._fields == ("doc", "score")
    assert s.run(lambda h: (type(h).__module__.startswith("dspex_session_"), h.score), hit) == (True, 0.5)


# -- records ----------------------------------------------------------------------------------

def evaluate_program() -> Any:
    dspy.configure(lm=DummyLM({"France": {"answer": "Paris"}, "Spain": {"answer": "Barcelona"}}))
    devset = [dspy.Example(country=c, answer=a).with_inputs("country") for c, a in [("France", "Paris"),
                                                                                     ("Spain", "Madrid")]]
    evaluate = dspy.Evaluate(devset=devset, metric=lambda ex, pred, trace=None: ex.answer == pred.answer,
                             display_progress=False)
    return evaluate(dspy.Predict("country -> answer"))


def test_evaluate_returns_an_evaluation_result(dx: dspex.Client) -> None:
    s = dx.session("p")
    result = s.run(evaluate_program)
    assert type(result) is EvaluationResult and result.score == 50.0
    assert [(ex.country, pred.answer, ok) for ex, pred, ok in result.results] == [
        ("France", "Paris", True), ("Spain", "Barcelona", False)]
    assert type(result.results[0][1]) is dspy.Prediction
    assert repr(result) == "EvaluationResult(score=50.0, results=<list of 2 results>)"


def test_a_user_prediction_subclass_comes_back_as_itself(dx: dspex.Client) -> None:
    s = dx.session("p")
    out = s.run(lambda: Scored("Paris", 0.9))
    assert type(out) is Scored and out.answer == "Paris" and out.confident()
    assert s.run(lambda p: (type(p) is Scored, p.confident()), out) == (True, True)


# -- errors ---------------------------------------------------------------------------------------

def lookup(table: dict[str, int], key: str) -> int:
    try:
        return table[key]
    except KeyError as missing:
        raise ValueError(f"no entry {key!r}") from missing


class Shelf:
    def search(self, query: str) -> str:
        """Search the shelf."""
        raise ValueError(f"no book {query!r}")


def frames_of(traceback_text: str) -> list[str]:
    """The (file, function) of each frame of a formatted traceback."""
    return [line.split(", ")[0].strip() + " " + line.rsplit(" in ", 1)[-1]
            for line in traceback_text.splitlines() if line.startswith("  File ")]


def test_a_remote_traceback_starts_at_the_users_code(dx: dspex.Client) -> None:
    """The worker's traceback of a call's error shows what in-process shows below the call: the
    frames of the user's code (and what it called), not the worker's own that ran it. It is what
    ``dspy.ReAct`` on the client writes into the observation the LM reads when a tool that is a
    handle's method raises (``format_error_for_lm``)."""
    s = dx.session("p")
    shelf = s.put(Shelf())
    for call in (lambda: shelf.search("x"), lambda: s.run(lookup, {}, "x"), lambda: s.run(Shelf().search, "x")):
        with pytest.raises(ValueError) as info:
            call()
        for err in (info.value, info.value.__cause__):
            if err is None:
                continue
            frames = frames_of(err.remote_traceback)
            assert frames and frames[0].endswith((" search", " lookup")), frames
            assert not any("/worker/" in f or "<dspex" in f for f in frames), frames
    with pytest.raises(TypeError) as wrong:  # an error of the call itself: the frames that tell it stay
        s.run(lookup, {})
    assert "Traceback" in wrong.value.remote_traceback


def test_a_chained_exception_keeps_its_chain_as_remote_errors(dx: dspex.Client) -> None:
    s = dx.session("p")
    with pytest.raises(ValueError, match="no entry 'x'") as info:
        s.run(lookup, {}, "x")
    err = info.value
    cause = err.__cause__
    assert isinstance(err, dspex.RemoteError)
    assert isinstance(cause, dspex.RemoteError) and isinstance(cause, KeyError) and cause.args == ("x",)
    assert err.__context__ is cause and err.__suppress_context__
    assert "The above exception was the direct cause of the following exception" in err.remote_traceback
    assert "table[key]" in cause.remote_traceback
    with pytest.raises(RuntimeError) as implicit:
        s.exec("try:\n    1 / 0\nexcept ZeroDivisionError:\n    raise RuntimeError('while handling')\n")
    assert isinstance(implicit.value.__context__, ZeroDivisionError) and implicit.value.__cause__ is None
    assert s.run(len, [1, 2]) == 2  # the worker serves on


def test_lone_surrogates_travel_both_ways(dx: dspex.Client) -> None:
    s = dx.session("p")
    value = {"key \ud800": ["\udcff", ("t\udfff",)]}
    assert s.run(lambda v: (v, len(v["key \ud800"][0])), value) == (value, 1)
    assert s.eval("b'caf\\xe9'.decode('utf-8', 'surrogateescape')") == "caf\udce9"


def cycle_shapes(items: list[Any], table: dict[str, Any]) -> tuple[bool, bool, bool]:
    return items[1] is items, table["self"] is table, table["rows"][0] is table


def make_cycles() -> tuple[list[Any], dict[str, Any]]:
    items: list[Any] = [1]
    items.append(items)
    table: dict[str, Any] = {"n": 2}
    table["self"] = table
    table["rows"] = [table]
    return items, table


def test_a_recursive_structure_stays_recursive_both_ways(dx: dspex.Client) -> None:
    s = dx.session("p")
    items, table = make_cycles()
    assert cycle_shapes(items, table) == (True, True, True)  # in-process
    assert s.run(cycle_shapes, items, table) == (True, True, True)
    back_items, back_table = s.run(make_cycles)
    assert back_items[0] == 1 and back_items[1] is back_items
    assert back_table["n"] == 2 and back_table["self"] is back_table and back_table["rows"][0] is back_table
    assert s.run(len, [items]) == 1  # one inside another argument too


class Slotted:
    __slots__ = ("__hidden", "a")

    def __init__(self, a: int) -> None:
        self.a = a
        self.__hidden = -a


@dataclasses.dataclass(frozen=True, slots=True)
class Point:
    x: int
    y: int = 0


def slots_kept(objs: list[Any]) -> list[tuple[bool, bool, str]]:
    """Per object: whether it has a __dict__, whether a new attribute is refused, its slots' values."""
    seen = []
    for obj in objs:
        try:
            object.__setattr__(obj, "typo", 1)
            refused = False
        except AttributeError:
            refused = True
        names = [f"_{cls.__name__.lstrip('_')}{name}" if name.startswith("__") else name  # mangled as in the class
                 for cls in type(obj).__mro__ for name in cls.__dict__.get("__slots__", ())]
        values = {name: getattr(obj, name) for name in names}
        seen.append((hasattr(obj, "__dict__"), refused, repr(sorted(values.items()))))
    return seen


def made_with_slots() -> list[Any]:
    @dataclasses.dataclass(slots=True)
    class Local:
        v: int

    return [Local(1), Point(3)]


def test_a_class_with_slots_keeps_them_on_the_worker_and_back(dx: dspex.Client) -> None:
    # cloudpickle rebuilt a class by value without its __slots__: its instances had a __dict__
    s = dx.session("p")
    objs: list[Any] = [Slotted(1), Point(1, 2)]
    assert slots_kept(objs) == [(False, True, "[('_Slotted__hidden', -1), ('a', 1)]"),
                                (False, True, "[('x', 1), ('y', 2)]")]
    assert s.run(slots_kept, objs) == slots_kept(objs)  # arguments, and their classes by value
    assert s.run(lambda: slots_kept([Slotted(1), Point(1, 2)])) == slots_kept(objs)  # made there
    back = s.run(made_with_slots)  # a class made on the worker comes back by value
    assert slots_kept(back) == slots_kept(made_with_slots()) == [(False, True, "[('v', 1)]"),
                                                                 (False, True, "[('x', 3), ('y', 0)]")]


def test_import_of_a_package_the_worker_lacks_names_it(dx: dspex.Client) -> None:
    s = dx.session("p")
    with pytest.raises(ModuleNotFoundError) as info:
        s.exec("import dspex_test_not_installed_anywhere")
    err = info.value
    assert isinstance(err, dspex.RemoteError) and err.name == "dspex_test_not_installed_anywhere"
    assert "install it on the workers' environment" in str(err)


def _distribution(root: Path, name: str, code: str) -> None:
    """An installed distribution (dist-info and all) in ``root``: code of it goes by reference."""
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(textwrap.dedent(code))
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "top_level.txt").write_text(f"{name}\n")
    (info / "RECORD").write_text(f"{name}/__init__.py,,\n")


def test_a_result_the_client_cannot_load_says_the_call_ran_and_what_to_install(stack: Stack, tmp_path: Path) -> None:
    """Catchable as ModuleNotFoundError, as in-process, and of the MayHaveRun family: the call ran
    (a retry loop must not take it for a request to fix and run it again blindly)."""
    _distribution(tmp_path, "dspex_workeronly", """
        import dataclasses, enum

        class Level(enum.Enum):
            HIGH = "high"

        @dataclasses.dataclass
        class Reading:
            value: float
    """)
    stack.env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{stack.env.get('PYTHONPATH', '')}"
    dx = stack.pool("p:strict_queue", 1)
    s = dx.session("p")
    for expr in ("__import__('dspex_workeronly').Level.HIGH", "[__import__('dspex_workeronly').Reading(1.5)]"):
        with pytest.raises(ModuleNotFoundError) as info:
            s.eval(expr)
        err = info.value
        assert isinstance(err, dspex.UndecodableResult) and isinstance(err, dspex.MayHaveRun)
        assert not isinstance(err, (dspex.UsageError, dspex.DidNotRun)), type(err).__mro__
        assert err.name == "dspex_workeronly" and err.details["side"] == "client"
        assert "the call ran" in str(err) and "install it in the client's environment" in str(err)
    assert s.eval("__import__('dspex_workeronly').Reading(2.0).value") == 2.0  # the worker serves on


CLIENT_SCRIPT = '''
import collections, enum, json, sys
import dspy
import dspex
import dspex_clientonly
from dspex_clientonly import shout


def use_module(x):
    return dspex_clientonly.shout(x)


def use_function(x):
    return shout(x)


Pair = collections.namedtuple("Pair", "x y")


class Level(enum.IntEnum):
    LOW = 1


class Name(str):
    pass


class Answer(dspy.Prediction):
    pass


def echo(v):
    return v, type(v).__name__


out = {}
with dspex.connect(sys.argv[1], timeout=60) as dx:
    s = dx.session("p")
    for name, fn in (("module", use_module), ("function", use_function)):
        try:
            s.run(fn, "x")
            out[name] = "no error"
        except ModuleNotFoundError as e:
            out[name] = [type(e).__name__, e.name, str(e), isinstance(e, dspex.UsageError)
                         and not isinstance(e, dspex.MayHaveRun)]
    out["after"] = s.run(len, [1, 2])
    values = [Pair(1, "y"), Level.LOW, Name("n"), Answer(a=1), collections.defaultdict(lambda: 7)]
    got = [s.run(echo, v) for v in values]
    out["main"] = [[type(g) is type(v), g == v, seen] for v, (g, seen) in zip(values, got)]
    out["factory"] = got[-1][0].default_factory()
print(json.dumps(out))
'''


def test_by_value_code_needing_a_package_the_worker_lacks(stack: Stack, tmp_path: Path) -> None:
    """A script's function (by value) uses a package installed on the client only: catchable as
    ModuleNotFoundError with its name, a UsageError (the call did not run); the session serves on;
    the script's __main__ types come back."""
    dx = stack.pool("p:strict_queue", 1)
    assert dx.session("p").run(len, "ab") == 2
    _distribution(tmp_path, "dspex_clientonly", "def shout(x):\n    return x.upper()\n")
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    env = dict(stack.env, PYTHONPATH=f"{tmp_path}{os.pathsep}{stack.env.get('PYTHONPATH', '')}")
    run = subprocess.run([sys.executable, str(script), stack.frontend], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=100, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for name in ("module", "function"):
        kind, module, message, usage_error = out[name]
        assert (kind, module, usage_error) == ("MissingModule", "dspex_clientonly", True), out[name]
        assert "install it on the workers' environment" in message
    assert out["after"] == 2
    assert out["main"] == [[True, True, "Pair"], [True, True, "Level"], [True, True, "Name"],
                           [True, True, "Answer"], [True, True, "defaultdict"]]
    assert out["factory"] == 7
