"""Unit tests for exact types through dspex.wire.codec (dspex.wire.wiretypes): every value comes back as
the type it was, under each encode policy, never silently its base type."""

from __future__ import annotations

import collections
import datetime as dt
import decimal
import enum
import math
import pathlib
import pickle
import sys
import threading
import typing
import uuid
import zoneinfo
from typing import Any

import dspy
import msgpack
import pytest
from dspy.evaluate.evaluate import EvaluationResult
from hypothesis import given, settings
from hypothesis import strategies as st

from dspex.errors import MissingModule, ProtocolError
from dspex.wire import record
from dspex.wire.codec import EncodeError, Policy, decode, encode, packb, unpackb
from dspex.wire.record import Record
from dspex.wire.ref import Ref
from dspex.wire.wiretypes import ENUM, EXT_PICKLE, SUBCLASS


def assert_exact(a: Any, b: Any) -> None:
    """Equal, of exactly the same types all the way down, with the same instance attributes,
    defaultdict factory, tzinfo and fold."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
        return
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_exact(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)  # order too
        for (ka, va), (kb, vb) in zip(a.items(), b.items()):
            assert_exact(ka, kb)
            assert_exact(va, vb)
        if isinstance(a, collections.defaultdict):
            if a.default_factory is None or isinstance(a.default_factory, type):
                assert a.default_factory is b.default_factory
            else:
                assert a.default_factory() == b.default_factory()
    elif isinstance(a, (set, frozenset)):
        assert a == b
        members = {y: y for y in b}
        for x in a:
            assert_exact(x, members[x])
    elif isinstance(a, (dt.datetime, dt.time)):
        assert a == b and a.tzinfo == b.tzinfo and a.fold == b.fold
        assert a.utcoffset() == b.utcoffset()
    elif isinstance(a, decimal.Decimal):
        assert str(a) == str(b)
    else:
        assert a == b
    if not isinstance(a, enum.Enum):
        assert getattr(a, "__dict__", None) == getattr(b, "__dict__", None)


class NoRefs:
    """A worker's to_ref that must not be called: values are never refs."""

    def __call__(self, obj: object) -> Ref:
        raise AssertionError(f"a value became a ref: {obj!r}")


def through(value: object, policy: Policy) -> Any:
    """``value`` as the worker returns it (DATA), as the client sends it (ALL), in a header (REFS)."""
    if policy is Policy.REFS:
        return unpackb(packb(value))
    return decode(encode(value, NoRefs() if policy is Policy.DATA else None, policy=policy))


POLICIES = [Policy.ALL, Policy.DATA, Policy.REFS]


# -- the types: module-level ones (this test module is user code: it goes by value), and ones of
# a "__main__" that the receiver does not have

class Color(enum.IntEnum):
    RED = 3
    GREEN = 4


class Mood(enum.Enum):
    HAPPY = "h"
    TUPLE = (1, 2)


class Letter(enum.StrEnum):
    A = "a"


class Perm(enum.Flag):
    R = 1
    W = 2
    X = 4


Pair = collections.namedtuple("Pair", "x y")
MainPair = collections.namedtuple("MainPair", "a b", module="__main__")  # not importable anywhere


class Typed(typing.NamedTuple):
    name: str
    score: float = 0.5


class Tag(str):
    pass


class Upper(str):
    """Its __new__ changes the value: the value is what travels, __new__ never runs again."""

    def __new__(cls, text: str) -> Upper:  # noqa: PYI034 - as users write it
        return super().__new__(cls, text.upper())


class Count(int):
    pass


class Meters(float):
    pass


class Blob(bytes):
    pass


class Row(dict):  # type: ignore[type-arg]
    def __init__(self, required: int) -> None:  # never called on the receiving side
        super().__init__()
        self.required = required

    def __setitem__(self, key: Any, value: Any) -> None:  # nor is this
        raise AssertionError("overridden methods never run while decoding")


class Items(list):  # type: ignore[type-arg]
    pass


class Vec(tuple):  # type: ignore[type-arg]
    pass


class Bag(set):  # type: ignore[type-arg]
    pass


class Frozen(frozenset):  # type: ignore[type-arg]
    pass


def default_five() -> int:
    return 5


def _with_attrs() -> list[Any]:
    tag = Tag("urgent")
    tag.source = "lm"  # type: ignore[attr-defined]
    row = Row(1)
    dict.update(row, {"k": [1, Count(2)]})
    row.extra = {"note": Pair(1, 2)}  # type: ignore[attr-defined]
    items = Items([1, "two"])
    items.label = "x"  # type: ignore[attr-defined]
    return [tag, row, items]


UTC5 = dt.timezone(dt.timedelta(hours=5, minutes=30))
PARIS = zoneinfo.ZoneInfo("Europe/Paris")
EXACT = [
    collections.OrderedDict([("b", 1), ("a", [2])]),
    collections.defaultdict(list, {"k": [1]}),
    collections.defaultdict(None, {1: 2}),
    collections.defaultdict(default_five),
    collections.defaultdict(lambda: "lambda", {"x": "y"}),
    Pair(1, "y"), [Pair(Pair(1, 2), None)], MainPair(1, 2), Typed("a"), Typed("b", 2.0),
    Color.RED, Mood.TUPLE, Mood.HAPPY, Letter.A, Perm.R | Perm.W, Perm(0),
    {Color.GREEN: Pair(3, 4), Letter.A: "v"},
    decimal.Decimal("1.10"), decimal.Decimal("-0"), decimal.Decimal("NaN"), decimal.Decimal("-Infinity"),
    decimal.Decimal("1E+400"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"), uuid.uuid4(),
    pathlib.PurePosixPath("/a/b"), pathlib.Path("rel/x.txt"), pathlib.PurePath("/p"),
    pathlib.PureWindowsPath(r"C:\Users\a b"), pathlib.PurePosixPath("/bad\udcffname"),
    dt.datetime(2024, 10, 27, 2, 30, tzinfo=PARIS), dt.datetime(2024, 10, 27, 2, 30, tzinfo=PARIS, fold=1),
    dt.datetime(2024, 7, 1, 12, tzinfo=zoneinfo.ZoneInfo("America/New_York")),
    dt.datetime(2024, 1, 1, fold=1), dt.datetime(2024, 1, 1, tzinfo=UTC5, fold=1),
    dt.datetime(2024, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1), "CET")),
    dt.time(1, 2, fold=1), dt.time(3, 4, tzinfo=PARIS),
    dt.datetime(2000, 1, 1, tzinfo=dt.timezone(dt.timedelta(microseconds=1))),  # isoformat reads it back as UTC
    dt.time(5, tzinfo=dt.timezone(dt.timedelta(microseconds=1))),
    {1, "a", (2, 3)}, frozenset({Pair(1, 2)}), 3 - 4j, 2**100,
    Tag("t"), Upper("shout"), Count(7), Meters(1.5), Blob(b"\x00b"), Vec((1, Vec((2,)))), Bag({1, 2}), Frozen({"f"}),
    Items([Tag("x")]), Row(0), *_with_attrs(),
    collections.Counter("abracadabra"),  # keeps state of its own (__reduce__): by value as a whole
    "lone \udcff surrogate", {"key \ud800": Tag("val \udfff")}, Pair("\udc80", b""),
    bytearray(b"ab"), bytearray(), [b"\xc4", bytearray(b"\xc5")], (bytearray(b"t"),), Pair(b"x", bytearray(b"y")),
    collections.OrderedDict(k=bytearray(b"o")), collections.defaultdict(list, {"k": [bytearray(b"d")]}),
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.value)
@pytest.mark.parametrize("value", EXACT, ids=repr)
def test_values_come_back_as_their_exact_types(value: object, policy: Policy) -> None:
    assert_exact(value, through(value, policy))


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.value)
def test_all_of_them_in_one_message(policy: Policy) -> None:
    assert_exact(EXACT, through(EXACT, policy))


def test_classes_and_functions_of_installed_code_travel_by_name_the_users_by_value() -> None:
    body = encode([Color.RED, collections.defaultdict(list), dt.datetime(2024, 1, 1, tzinfo=PARIS)],
                  policy=Policy.ALL)[0]
    assert b"builtins:list" in body and b"Europe/Paris" in body
    assert msgpack.ExtType(EXT_PICKLE, b"") not in msgpack.unpackb(body, ext_hook=lambda c, d: msgpack.ExtType(c, b""))
    # an enum of installed code is its name, not a pickle
    enum_body = msgpack.unpackb(encode(enum.Enum("Tmp", "A").A, policy=Policy.ALL)[0],
                                ext_hook=lambda c, d: msgpack.ExtType(c, b""))
    assert enum_body[0] == msgpack.ExtType(ENUM.code, b"")
    http = msgpack.unpackb(encode(__import__("http").HTTPStatus.OK)[0], ext_hook=lambda c, d: (c, d))
    assert http[1] == "http:HTTPStatus" and http[2] == 200


def test_the_same_user_class_comes_back_as_itself() -> None:
    out = through([Pair(1, 2), MainPair(3, 4), Typed("t")], Policy.DATA)
    assert type(out[0]) is Pair and type(out[1]) is MainPair and type(out[2]) is Typed  # cloudpickle's class tracking


def test_a_path_of_another_platform_is_a_typed_error_there() -> None:
    wire = msgpack.packb(msgpack.ExtType(17, bytes((3,)) + b"C:\\x"))  # a WindowsPath
    with pytest.raises(ProtocolError, match="WindowsPath cannot be made here"):
        decode([wire])


def test_a_subclass_class_that_is_not_what_it_claims_is_a_protocol_error() -> None:
    wire = msgpack.packb([SUBCLASS, "builtins:object", "x", None])
    with pytest.raises(ProtocolError, match="malformed"):
        decode([wire])


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.value)
def test_a_bytearray_stays_a_bytearray_wherever_the_packer_met_it(policy: Policy) -> None:
    """msgpack's C packer packs a bytearray as bin before any hook sees it; the codec notices and
    re-encodes: in containers, a subclass's attributes, beside a value that needs the walk."""
    items = Items([bytearray(b"i")])
    items.note = {"attr": bytearray(b"a")}  # type: ignore[attr-defined]
    tag = Tag("t")
    tag.raw = bytearray(b"r")  # type: ignore[attr-defined]
    for value in (items, tag, [bytearray(b"ab"), "\udcff"], {Pair(1, 2): [{"deep": (bytearray(b"z"),)}]}):
        assert_exact(value, through(value, policy))
    out = through([bytearray(b"x"), b"x"], policy)
    out[0].append(0x79)  # the receiver's own mutable copy
    assert out == [bytearray(b"xy"), b"x"] and type(out[1]) is bytes


def test_a_bytearray_in_a_prediction_field_stays_a_bytearray() -> None:
    pred = dspy.Prediction(image=bytearray(b"\x89PNG"), caption="c")
    out = through(pred, Policy.DATA)
    assert type(out) is dspy.Prediction and type(out.image) is bytearray and out.image == pred.image


class Shelf(bytearray):
    pass


def test_a_bytearray_subclass_goes_by_value() -> None:
    assert_exact(Shelf(b"x"), through(Shelf(b"x"), Policy.DATA))


def test_an_unencodable_value_inside_a_subclass_names_its_path() -> None:
    body = ["mod", "fn", [Pair(1, threading.Lock())], {"row": Items([1, threading.Lock()])}]
    with pytest.raises(EncodeError) as info:
        encode(body, policy=Policy.ALL, names=("module", "fn", "args", "kwargs"))
    assert info.value.details["path"] == "args[0][1]"
    with pytest.raises(EncodeError) as info:
        encode(body[:2] + [[], body[3]], policy=Policy.ALL, names=("module", "fn", "args", "kwargs"))
    assert info.value.details["path"] == "kwargs['row'][1]"


class Graph(dict):  # type: ignore[type-arg]
    pass


def test_a_cycle_through_a_subclass_goes_by_value() -> None:
    graph = Graph(name="g")
    graph["self"] = graph
    out = through([graph], Policy.ALL)
    # as for a list (test_codec): the reference that closes the cycle is the container by value
    inner = out[0]["self"]
    assert type(out[0]) is Graph and type(inner) is Graph and inner["self"] is inner and inner["name"] == "g"


def test_worker_results_keep_refs_inside_subclasses() -> None:
    lock = threading.Lock()
    made: list[object] = []

    def to_ref(obj: object) -> Ref:
        made.append(obj)
        return Ref("0" * 32, "s", "p", "w", type(obj).__name__, "r")

    out: Any = decode(encode(Pair(1, lock), to_ref, policy=Policy.DATA))
    assert type(out) is Pair and isinstance(out.y, Ref) and made == [lock]


# -- hypothesis: nested mixes of all of them -------------------------------------------------------

surrogate_text = st.text(st.characters(blacklist_categories=()), max_size=6)
hashable_leaves = (st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80) | surrogate_text
                   | st.binary(max_size=4) | st.decimals(allow_nan=False).map(lambda d: d.normalize() if d.is_finite() else d)
                   | st.uuids() | st.sampled_from([*Color, *Mood, *Letter, Perm.R | Perm.X])
                   | st.builds(pathlib.PurePosixPath, surrogate_text) | st.builds(Tag, surrogate_text)
                   | st.builds(Count, st.integers()) | st.dates()
                   | st.datetimes(timezones=st.none() | st.timezones() | st.just(UTC5), allow_imaginary=False))
hashables = st.recursive(hashable_leaves, lambda inner: st.builds(Pair, inner, inner) | st.tuples(inner)
                         | st.frozensets(inner, max_size=3), max_leaves=5)
exact_values = st.recursive(
    hashables | st.builds(Meters, st.floats(allow_nan=False)) | st.complex_numbers(allow_nan=False)
    | st.binary(max_size=4).map(bytearray),
    lambda inner: st.lists(inner, max_size=3) | st.lists(inner, max_size=3).map(Items)
    | st.dictionaries(hashables, inner, max_size=3)
    | st.dictionaries(hashables, inner, max_size=3).map(collections.OrderedDict)
    | st.dictionaries(hashables, inner, max_size=3).map(lambda d: collections.defaultdict(list, d))
    | st.builds(Typed, surrogate_text, st.floats(allow_nan=False)) | st.sets(hashables, max_size=3),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(exact_values, st.sampled_from(POLICIES))
def test_property_exact_round_trip(value: object, policy: Policy) -> None:
    assert_exact(value, through(value, policy))


# -- records: subclasses of dspy.Example / dspy.Prediction ----------------------------------------

class Scored(dspy.Prediction):
    """A user subclass whose __init__ takes other arguments, with state outside its fields."""

    def __init__(self, answer: str, confidence: float) -> None:
        super().__init__(answer=answer)
        self._confidence = confidence

    def confident(self) -> bool:
        return self._confidence > 0.5


class Labeled(dspy.Example):
    pass


def test_evaluation_results_and_user_record_subclasses_come_back_as_their_classes() -> None:
    rows = [(dspy.Example(q="1+1", a="2").with_inputs("q"), dspy.Prediction(a="2"), True)]
    result = EvaluationResult(score=100.0, results=rows)
    scored = Scored("Paris", 0.9)
    scored.set_lm_usage({"m": {"total_tokens": 3}})
    labeled = Labeled(text="t", label="l").with_inputs("text")
    for policy in (Policy.ALL, Policy.DATA):
        out = through([result, scored, labeled], policy)
        assert type(out[0]) is EvaluationResult and out[0].score == 100.0
        ex, pred, ok = out[0].results[0]
        assert type(ex) is dspy.Example and ex.inputs().toDict() == {"q": "1+1"} and pred.a == "2" and ok is True
        assert repr(out[0]) == repr(result)
        assert type(out[1]) is Scored and out[1].answer == "Paris" and out[1].confident()
        assert out[1].get_lm_usage() == {"m": {"total_tokens": 3}}
        assert type(out[2]) is Labeled and out[2].inputs().toDict() == {"text": "t"} and out[2].label == "l"


def test_exact_records_keep_their_short_form() -> None:
    wire = msgpack.unpackb(encode(dspy.Prediction(a=1), NoRefs(), policy=Policy.DATA)[0],
                           ext_hook=lambda c, d: c)
    assert wire == [14, "prediction", {"a": 1}, None, {}]


def test_a_record_subclass_on_a_client_without_dspy_is_a_record(monkeypatch: pytest.MonkeyPatch) -> None:
    frames = encode(EvaluationResult(score=1.0, results=[]), NoRefs(), policy=Policy.DATA)
    monkeypatch.setattr(record, "_dspy", lambda: None)
    out: Any = decode(frames)
    assert type(out) is Record and out.kind == "prediction" and out.score == 1.0


def test_an_unencodable_record_field_of_a_subclass_names_it() -> None:
    with pytest.raises(EncodeError) as info:
        encode([Scored(threading.Lock(), 0.1)], policy=Policy.ALL, names=("pred",))  # type: ignore[arg-type]
    assert info.value.details["path"] == "pred.answer"


# -- exceptions by value keep their chain ---------------------------------------------------------

def _chained() -> ValueError:
    try:
        try:
            raise KeyError("k")
        except KeyError as key:
            raise ValueError("v") from key
    except ValueError as err:
        return err


def test_an_exception_result_keeps_cause_context_and_suppress_context() -> None:
    out = through(_chained(), Policy.DATA)
    assert type(out) is ValueError and type(out.__cause__) is KeyError and out.__cause__.args == ("k",)
    assert out.__context__ is out.__cause__ and out.__suppress_context__
    try:
        try:
            raise OSError(2, "gone", "/x")
        except OSError:
            raise RuntimeError("while handling")  # the implicit __context__ is the point
    except RuntimeError as implicit:
        again = through(implicit, Policy.DATA)
    assert type(again.__context__) is FileNotFoundError and again.__context__.filename == "/x"
    assert again.__cause__ is None and not again.__suppress_context__


def test_an_exception_chain_is_bounded_and_cycles_survive() -> None:
    a, b = ValueError("a"), KeyError("b")
    a.__context__, b.__context__ = b, a
    out = through(a, Policy.DATA)
    assert type(out.__context__) is KeyError and out.__context__.__context__ is out
    head = cur = ValueError("0")
    for i in range(1, 5000):
        nxt = ValueError(str(i))
        cur.__context__ = nxt
        cur = nxt
    long = through(head, Policy.DATA)
    depth, link = 0, long
    while link is not None:
        depth, link = depth + 1, link.__context__
    assert 2 <= depth <= 20


# -- a module the receiver lacks -------------------------------------------------------------------

def test_a_class_named_from_a_missing_module_is_a_missing_module_error() -> None:
    wire = msgpack.packb([ENUM, "dspex_test_no_such_pkg.sub:Color", 1])
    with pytest.raises(ModuleNotFoundError) as info:
        decode([wire])
    err = info.value
    assert isinstance(err, MissingModule) and isinstance(err, ImportError)
    assert err.name == "dspex_test_no_such_pkg" and "install it in the client's environment" in str(err)
    with pytest.raises(MissingModule, match="install it on the workers' environment"):
        decode([wire], side="worker")


def test_a_pickle_that_imports_a_missing_package_is_a_missing_module_error(tmp_path: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "dspex_test_onlyhere"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import dspex_test_onlyhere  # type: ignore[import-not-found]

    blob = pickle.dumps(dspex_test_onlyhere.Thing())  # by reference, as an installed package would be
    monkeypatch.delitem(sys.modules, "dspex_test_onlyhere")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    wire = msgpack.packb(msgpack.ExtType(EXT_PICKLE, msgpack.packb({"pickle": blob, "sources": {}})))
    with pytest.raises(ModuleNotFoundError) as info:
        decode([wire], side="worker")
    assert isinstance(info.value, MissingModule) and info.value.name == "dspex_test_onlyhere"
    assert "install it on the workers' environment" in str(info.value)
    again = pickle.loads(pickle.dumps(info.value))  # as it crosses the wire: the same typed error
    assert type(again) is MissingModule and again.name == "dspex_test_onlyhere"
