"""Unit tests for dspex.wire.codec: round trips, array frames, graceful refs, errors."""

from __future__ import annotations

import datetime as dt
import itertools
import math
import reprlib
import traceback
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from dspex.errors import ProtocolError
from dspex.wire.codec import EncodeError, decode, encode, packb, unpackb
from dspex.wire.ref import Ref


def assert_same(a: Any, b: Any) -> None:
    """Equal *and* of exactly the same types, all the way down."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        b_keys = {k: k for k in b}
        for k, v in a.items():
            assert_same(k, b_keys[k])
            assert_same(v, b[k])
    elif isinstance(a, (set, frozenset)):
        assert a == b and {type(x) for x in a} == {type(x) for x in b}
    elif isinstance(a, dt.datetime):
        assert a == b and a.utcoffset() == b.utcoffset()
    else:
        assert a == b


def roundtrip(x: object, **kw: Any) -> Any:
    return decode(encode(x, **kw))


class Refs:
    """A to_ref that counts calls and hands out distinct refs."""

    def __init__(self) -> None:
        self.calls: list[object] = []
        self.by_id: dict[str, object] = {}
        self.counter = itertools.count()

    def __call__(self, obj: object) -> Ref:
        self.calls.append(obj)
        ref = Ref(f"{next(self.counter):032x}", "sess", "pool", "w1", type(obj).__name__, reprlib.repr(obj))
        self.by_id[ref.id] = obj
        return ref


class Opaque:
    pass


UTC5 = dt.timezone(dt.timedelta(hours=5, minutes=30))
NATIVE = [
    None, True, False, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, 2**200, -(2**64), -(2**300),
    0.5, math.inf, -math.inf, "", "héllo", b"", b"\x00\xff", (), (1,), (1, (2, (3,))), [1, (2, [3])],
    {"a": 1}, {1: "x", (1, "t"): 2, b"k": 3, None: 4, 2.5: 5, frozenset({1}): 6},
    {1, 2, (3, 4)}, frozenset({"a", (1,)}), set(), 1 + 2j, complex(-0.0, math.inf),
    dt.datetime(2024, 2, 29, 13, 5, 7, 123456), dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
    dt.datetime(1, 1, 1, 0, 0, tzinfo=UTC5), dt.date(1999, 12, 31), dt.time(23, 59, 59, 1),
    dt.time(1, 2, tzinfo=UTC5), dt.timedelta(days=-5, seconds=3, microseconds=9), dt.timedelta(),
    {"nested": [{"t": (1, 2)}, {3, 4}, [dt.date(2020, 1, 1), 3j]]},
]


@pytest.mark.parametrize("value", NATIVE, ids=repr)
def test_native_round_trip_exact_types(value: object) -> None:
    assert_same(value, roundtrip(value))
    assert len(encode(value)) == 1


def test_nan() -> None:
    assert math.isnan(roundtrip(math.nan))


# exact types beyond these (subclasses, enum members, OrderedDict, namedtuples, Decimal, UUID,
# paths, zoned datetimes, records' subclasses): tests/test_codec_types.py


@pytest.mark.parametrize(
    "value",
    [np.float32(1.5), np.float64(-2.0), np.float16(0.25), np.int8(-3), np.uint64(2**64 - 1), np.bool_(True),
     np.complex64(1 - 2j), np.str_("hé"), np.bytes_(b"ab"), np.datetime64("2020-01-02T03:04"),
     np.timedelta64(5, "ms")],
    ids=repr,
)
def test_numpy_scalars_keep_their_type(value: np.generic) -> None:
    out = roundtrip(value)
    assert type(out) is type(value) and out.dtype == value.dtype and out == value


A = np.arange(24, dtype=np.float64).reshape(4, 6)
ARRAYS = {
    "bool": np.array([True, False, True]),
    "int8": np.arange(-5, 5, dtype=np.int8),
    "int64": np.arange(10, dtype=np.int64) * -(2**40),
    "uint16": np.arange(7, dtype=np.uint16),
    "uint64": np.array([2**64 - 1], dtype=np.uint64),
    "float16": np.linspace(0, 1, 5, dtype=np.float16),
    "float32": np.linspace(0, 1, 5, dtype=np.float32).reshape(5, 1),
    "complex128": np.array([1 + 2j, -3j]),
    "complex64": np.array([1 + 2j], dtype=np.complex64),
    "bigendian": np.arange(4, dtype=">i4"),
    "datetime64": np.array(["2020-01-01T00:00", "NaT"], dtype="M8[ns]"),
    "timedelta64": np.array([1, 2], dtype="m8[s]"),
    "unicode": np.array(["a", "héllo"]),
    "bytes": np.array([b"x", b"yz"]),
    "structured": np.array([(1, 2.5)], dtype=[("a", "<i4"), ("b", "<f8")]),
    # padding between fields: no field of its own on the other side either (names, offsets kept)
    "aligned": np.array([(1, 2)], dtype=np.dtype([("a", "i1"), ("b", "<i4")], align=True)),
    "offsets": np.array([(1, 2.5)], dtype=np.dtype({"names": ["x", "y"], "formats": ["<i2", "<f8"],
                                                   "offsets": [0, 8], "itemsize": 24})),
    "nested": np.zeros(2, dtype=[("p", np.dtype([("a", "i1"), ("b", "<i8")], align=True)), ("v", "<f4", (3,))]),
    "titled": np.zeros(1, dtype=np.dtype({"names": ["a"], "formats": ["<i4"], "titles": ["The A"]})),
    "slice": A[:, ::2],
    "transposed": A.T,
    "fortran": np.asfortranarray(A),
    "zero_d": np.array(7.0),
    "empty": np.zeros((0, 3), dtype=np.int32),
    "3d": np.arange(60, dtype=np.int16).reshape(3, 4, 5)[::-1, 1:, ::2],
}


@pytest.mark.parametrize("name", list(ARRAYS))
def test_arrays_round_trip(name: str) -> None:
    arr = ARRAYS[name]
    frames = encode({"arr": arr, "n": 1})
    assert len(frames) == 2
    out = decode(frames)["arr"]  # type: ignore[index]
    assert type(out) is np.ndarray and out.dtype == arr.dtype and out.shape == arr.shape
    assert out.dtype.names == arr.dtype.names and out.dtype.isalignedstruct == arr.dtype.isalignedstruct
    assert out.dtype.fields == arr.dtype.fields
    np.testing.assert_array_equal(out, arr)
    # as pickle has it: a Fortran-ordered array stays Fortran-ordered (same strides), any other
    # layout (a strided view) arrives as a C-contiguous copy
    fortran = arr.flags.f_contiguous and not arr.flags.c_contiguous
    assert out.flags.writeable and (out.flags.f_contiguous if fortran else out.flags.c_contiguous)
    if arr.size:
        assert out.strides == pickle.loads(pickle.dumps(arr)).strides
    out[...] = arr  # really writable


def test_array_is_a_separate_frame_without_copy() -> None:
    arr = np.arange(1_000_000, dtype=np.float64)
    body, raw = encode([arr, arr[:3]])[0:2]
    assert len(body) < 200
    assert isinstance(raw, memoryview) and raw.nbytes == arr.nbytes
    assert np.shares_memory(np.frombuffer(raw, dtype=np.float64), arr)  # no copy on encode


def test_several_arrays_and_frame_indices() -> None:
    a, b = np.arange(3), np.ones((2, 2))
    frames = encode((a, {"b": b}, [a]))
    assert len(frames) == 4
    out = decode(frames)
    assert type(out) is tuple
    np.testing.assert_array_equal(out[0], a)
    np.testing.assert_array_equal(out[1]["b"], b)
    out[0][0] = 99  # decoded arrays never alias one another
    assert out[2][0][0] == 0


def test_decode_through_zmq_frames() -> None:
    value = {"x": np.arange(100_000, dtype=np.int32).reshape(100, 1000), "t": (1, "a"), "r": Ref("i", "s", "p", "w", "T")}
    frames = [zmq.Frame(bytes(f)) for f in encode(value)]
    out = decode(frames)
    assert isinstance(out, dict)
    np.testing.assert_array_equal(out["x"], value["x"])
    assert out["x"].flags.writeable
    assert out["t"] == (1, "a") and out["r"] == value["r"]


def test_graceful_leaf_inside_dict_inside_list() -> None:
    refs = Refs()
    thing = Opaque()
    out = roundtrip([1, {"ok": "data", "response": thing}, {Opaque()}], to_ref=refs)
    assert isinstance(out, list) and out[0] == 1 and out[1]["ok"] == "data"
    ref = out[1]["response"]
    assert isinstance(ref, Ref) and refs.by_id[ref.id] is thing and ref.type_name == "Opaque"
    (member,) = out[2]
    assert isinstance(member, Ref)


def test_object_arrays_and_non_native_keys_become_refs() -> None:
    refs = Refs()
    obj_arr = np.array([Opaque()], dtype=object)
    key = Opaque()
    out = roundtrip({"a": obj_arr, key: 1}, to_ref=refs)
    assert isinstance(out, dict) and isinstance(out["a"], Ref)
    assert [k for k in out if isinstance(k, Ref)] and refs.calls[0] is obj_arr


def test_same_object_twice_gives_same_ref_once() -> None:
    refs = Refs()
    thing = Opaque()
    out = roundtrip({"a": thing, "b": [thing, (thing,)]}, to_ref=refs)
    assert isinstance(out, dict) and out["a"] == out["b"][0] == out["b"][1][0]
    assert refs.calls == [thing]


def test_self_referencing_list_becomes_ref() -> None:
    refs = Refs()
    lst: list[Any] = [1, Opaque()]
    lst.append(lst)
    out = roundtrip(lst, to_ref=refs)
    assert isinstance(out, list) and out[0] == 1 and isinstance(out[1], Ref)
    assert isinstance(out[2], Ref) and refs.by_id[out[2].id] is lst
    assert len(refs.calls) == 2


def test_dict_cycle_through_list_becomes_ref() -> None:
    refs = Refs()
    d: dict[str, Any] = {"k": np.arange(3)}
    d["loop"] = [1, d, (d,)]
    frames = encode(d, to_ref=refs)
    out = decode(frames)
    assert isinstance(out, dict) and len(frames) == 2
    np.testing.assert_array_equal(out["k"], np.arange(3))
    assert out["loop"][1] == out["loop"][2][0] and refs.by_id[out["loop"][1].id] is d
    assert refs.calls == [d]


def test_too_deep_nesting_is_cut_by_a_ref() -> None:
    deep: list[Any] = []
    cur = deep
    for _ in range(2000):  # beyond msgpack's own limit of ~1024 levels
        cur.append([])
        cur = cur[0]
    out = roundtrip(deep, to_ref=Refs())
    depth = 0
    while isinstance(out, list):
        out, depth = out[0], depth + 1
    assert isinstance(out, Ref) and 100 < depth < 1024
    with pytest.raises(EncodeError, match="nested too deeply"):
        encode(deep)


def test_encode_error_names_type_and_path() -> None:
    with pytest.raises(EncodeError) as info:
        encode([0, 1, {"x": Opaque()}])
    assert "Opaque" in str(info.value) and "result[2]['x']" in str(info.value)
    assert info.value.code == "encode_error" and isinstance(info.value, ProtocolError)
    assert info.value.details["path"] == "result[2]['x']"
    lst: list[Any] = []
    lst.append({"me": lst})
    with pytest.raises(EncodeError, match=r"cycle"):
        encode(lst)
    with pytest.raises(EncodeError, match=r"args\[0\]"):
        encode([np.array([None])], root="args")


def test_resolve_ref_on_decode() -> None:
    refs = Refs()
    thing = Opaque()
    frames = encode({"a": [thing], thing: 1}, to_ref=refs)
    assert decode(frames, resolve_ref=lambda r: refs.by_id[r.id]) == {"a": [thing], thing: 1}
    assert len(refs.calls) == 1
    ref = Ref("ab" * 16, "s", "p", "w", "T", "repr")
    assert decode(encode({"r": ref}))["r"] == ref  # type: ignore[index]


def test_packb_helpers() -> None:
    hdr = {"op": "call", "id": 7, "args": (1, {2}), "ref": Ref("i", "s", "p", "w", "T"), "x": np.int16(3)}
    assert_same(hdr, unpackb(packb(hdr)))
    with pytest.raises(EncodeError, match="frames"):
        packb({"a": np.arange(3)})
    with pytest.raises(EncodeError, match=r"header\['o'\]"):
        packb({"o": Opaque()})


@pytest.mark.parametrize(
    "frames",
    [[b"\xc1"], [], [packb([1])[:-1] + b"\xc7"], encode(np.arange(3))[:1], [b"\xc7\x00\x0c"]],
)
def test_malformed_input_is_a_protocol_error(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        decode(frames)


def test_object_dtype_never_accepted_from_wire() -> None:
    import msgpack

    payload = packb(["|O", [1], 1])
    body = msgpack.packb(msgpack.ExtType(10, payload))
    with pytest.raises(ProtocolError, match="object"):
        decode([body, b"\x00" * 8])


offsets = st.timedeltas(min_value=-dt.timedelta(hours=23), max_value=dt.timedelta(hours=23))
zones = st.none() | st.just(dt.UTC) | st.builds(dt.timezone, offsets)
keys = st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.binary(max_size=5)
leaves = (
    keys
    | st.floats(allow_nan=False)
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.complex_numbers(allow_nan=False)
    | st.datetimes(timezones=zones)
    | st.dates()
    | st.timedeltas()
    | st.times(timezones=zones)
)
hashables = st.recursive(keys, lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3), max_leaves=6)
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4)
    | st.tuples(inner, inner)
    | st.dictionaries(hashables, inner, max_size=4)
    | st.sets(hashables, max_size=4)
    | st.frozensets(hashables, max_size=4),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(values)
def test_property_round_trip(value: object) -> None:
    assert_same(value, roundtrip(value))


# -- by value (ext 13), records (ext 14), policies ------------------------------------------------

import dataclasses
import inspect
import pickle
import threading

import cloudpickle
import dspy
import pydantic

from dspex.wire import byvalue, usercode
from dspex.wire.codec import EXT_PICKLE, Policy
from dspex.wire.record import Record
from dspex.wire.remoteerror import RemoteError, error_from_wire


def reward_fn(example: Any, pred: Any) -> float:
    """A metric defined in a user module (this test module): it travels by value."""
    return float(example.answer == pred.answer)


class Ticket(pydantic.BaseModel):
    title: str
    priority: int = 1


@dataclasses.dataclass
class Point:
    x: int
    y: int


def test_client_policy_sends_code_and_objects_by_value() -> None:
    values = [reward_fn, lambda y: y + 1, Ticket(title="t"), Point(1, 2), Ticket, {"nested": [reward_fn]}]
    out: Any = decode(encode(values, policy=Policy.ALL))
    assert out[0](dspy.Example(answer="a"), dspy.Prediction(answer="a")) == 1.0
    assert out[1](1) == 2
    assert out[2] == Ticket(title="t") and out[3] == Point(1, 2)
    assert out[4] is Ticket  # cloudpickle's class tracking: the same class comes back in one process
    assert out[5]["nested"][0](dspy.Example(answer="a"), dspy.Prediction(answer="b")) == 0.0


def test_by_value_code_carries_its_source_for_linecache() -> None:
    data, sources = byvalue.dumps(reward_fn)
    assert reward_fn.__code__.co_filename in sources
    assert "def reward_fn(" in sources[reward_fn.__code__.co_filename]
    fn = byvalue.loads(data, sources)
    assert fn.__code__.co_filename == reward_fn.__code__.co_filename  # not cloudpickle's "<dynamic-code>"
    assert "A metric defined in a user module" in inspect.getsource(fn)


def test_registered_sources_make_getsource_work_for_files_that_do_not_exist() -> None:
    filename = "/nonexistent/dspex-test/user_code.py"
    byvalue.register_sources({filename: "def f():\n    return 41 + 1\n"})
    scope: dict[str, Any] = {}
    exec(compile("def f():\n    return 41 + 1\n", filename, "exec"), scope)  # noqa: S102
    assert inspect.getsource(scope["f"]) == "def f():\n    return 41 + 1\n"


def test_user_modules_go_by_value_installed_ones_by_reference() -> None:
    assert usercode.is_user_module(__name__)
    assert not usercode.is_user_module("json")
    assert not usercode.is_user_module("dspy.predict.predict")
    assert not usercode.is_user_module("dspex.codec")


def test_records_round_trip_as_dspy_objects() -> None:
    example = dspy.Example(question="q", answer="a", base="b").with_inputs("question")
    pred = dspy.Prediction(answer="42", reasoning="r")
    out: Any = decode(encode([example, pred], policy=Policy.ALL))
    assert type(out[0]) is dspy.Example and out[0].toDict() == example.toDict()
    assert out[0].inputs().toDict() == {"question": "q"}
    assert type(out[1]) is dspy.Prediction and out[1].answer == "42" and out[1].reasoning == "r"


def test_worker_policy_data_by_value_rest_refs_even_inside_records() -> None:
    refs = Refs()
    lock = threading.Lock()
    value = {"pred": dspy.Prediction(answer="1", lock=lock), "fn": reward_fn, "ticket": Ticket(title="x"),
             "point": Point(3, 4), "err": ValueError("v"), "module": dspy.Predict("q -> a")}
    out: Any = decode(encode(value, refs, policy=Policy.DATA))
    assert type(out["pred"]) is dspy.Prediction and out["pred"].answer == "1"
    assert isinstance(out["pred"].lock, Ref) and refs.by_id[out["pred"].lock.id] is lock
    assert isinstance(out["fn"], Ref) and isinstance(out["module"], Ref)
    assert out["ticket"] == Ticket(title="x") and out["point"] == Point(3, 4)
    assert type(out["err"]) is ValueError and out["err"].args == ("v",)


def test_record_stand_in_has_attribute_access_and_round_trips() -> None:
    rec = Record("prediction", {"answer": "42"})
    assert rec.answer == "42" and rec["answer"] == "42" and rec.toDict() == {"answer": "42"}
    with pytest.raises(AttributeError):
        _ = rec.missing
    out: Any = decode(encode(rec, policy=Policy.DATA, to_ref=Refs()))
    assert type(out) is dspy.Prediction and out.answer == "42"  # dspy is importable here


def test_unpicklable_argument_error_names_the_argument() -> None:
    body = ["mod", "fn", [1, {"reward_fn": threading.Lock()}], {}]
    with pytest.raises(EncodeError) as info:
        encode(body, policy=Policy.ALL, names=("module", "fn", "args", "kwargs"))
    assert info.value.details["path"] == "args[1]['reward_fn']"
    assert "cannot pickle" in str(info.value)


def test_unpicklable_closure_error_names_the_argument() -> None:
    lock = threading.Lock()
    with pytest.raises(EncodeError) as info:
        encode([lambda: lock, [], {"metric": 1}], policy=Policy.ALL, names=("fn", "args", "kwargs"))
    assert info.value.details["path"] == "fn"


def test_each_object_is_pickled_once_per_message(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    real = byvalue.dumps

    def counting(obj: object) -> Any:
        calls.append(obj)
        return real(obj)

    monkeypatch.setattr(byvalue, "dumps", counting)
    ticket = Ticket(title="t")
    out: Any = decode(encode([ticket, ticket, {"t": ticket}, threading.Lock], policy=Policy.ALL))
    assert out[:3] == [ticket, ticket, {"t": ticket}]
    assert [type(c) for c in calls] == [Ticket, type(threading.Lock)]


def test_cyclic_containers_go_by_value_under_the_client_policy() -> None:
    cyclic: list[Any] = [1]
    cyclic.append(cyclic)
    out: Any = decode(encode([cyclic], policy=Policy.ALL))
    assert out[0][0] == 1 and out[0][1] is out[0]  # the list itself, not a copy holding the cycle
    table: dict[str, Any] = {"n": 2}
    table["rows"] = [table, (table,)]
    back: Any = decode(encode({"t": table}, policy=Policy.DATA, to_ref=Refs()))
    assert back["t"]["rows"][0] is back["t"] and back["t"]["rows"][1][0] is back["t"]


def test_malformed_pickle_ext_is_a_protocol_error() -> None:
    body = msgpack.packb(msgpack.ExtType(EXT_PICKLE, msgpack.packb({"pickle": b"not a pickle"})))
    with pytest.raises(ProtocolError, match="cannot unpickle"):
        decode([body])


class ParseFailure(ValueError):
    """Like dspy's AdapterParseError: __init__ takes more than the message."""

    def __init__(self, adapter: str, lm_response: str) -> None:
        super().__init__(f"{adapter} could not parse")
        self.lm_response = lm_response


def _wire_of(exc: BaseException) -> dict[str, Any]:
    return {"code": "remote_error", "message": str(exc), "type": type(exc).__qualname__,
            "module": type(exc).__module__, "traceback": "Traceback ...\n", "pickled": byvalue.dumps_exception(exc)}


def test_remote_error_is_an_instance_of_the_original_type_with_its_attributes() -> None:
    err = error_from_wire(_wire_of(ParseFailure("ChatAdapter", "garbled")))
    assert isinstance(err, RemoteError) and isinstance(err, ParseFailure) and isinstance(err, ValueError)
    assert err.lm_response == "garbled" and str(err) == "ChatAdapter could not parse"
    assert err.remote_traceback == "Traceback ...\n" and err.type_name == "ParseFailure"
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is type(err) and again.lm_response == "garbled"
    with pytest.raises(ZeroDivisionError):
        raise error_from_wire(_wire_of(ZeroDivisionError("division by zero")))
    assert type(error_from_wire(_wire_of(KeyError("k")))) is type(error_from_wire(_wire_of(KeyError("j"))))


class Adapter:
    class Failure(ValueError):
        """An exception class nested in another (or defined in a function): a dotted qualname."""


def test_a_remote_error_of_a_nested_class_reads_as_its_class() -> None:
    err = error_from_wire(_wire_of(Adapter.Failure("could not parse")))
    assert isinstance(err, Adapter.Failure)
    # repr takes the class name after its last dot: the qualname's dots must not cut it
    assert repr(err) == "RemoteError[Failure]('could not parse')"
    assert type(err).__qualname__ == "RemoteError[Adapter.Failure]"
    assert "RemoteError[Adapter.Failure]: could not parse" in "".join(traceback.format_exception_only(err))


class NotFound(LookupError):
    """An error class with class-level attributes named like RemoteError's own (web frameworks'
    HTTP errors have a class-level ``code``)."""

    code = 404
    message = "the page is not here"
    details = {"retry": False}  # noqa: RUF012 - as such classes are written


def test_a_remote_error_keeps_the_class_attributes_of_its_type() -> None:
    err = error_from_wire(_wire_of(NotFound("no /x")))
    assert isinstance(err, NotFound) and isinstance(err, RemoteError)
    assert (err.code, err.message, err.details) == (404, "the page is not here", {"retry": False})
    assert str(err) == "no /x" and err.remote_traceback == "Traceback ...\n" and err.type_name == "NotFound"
    assert err.to_wire()["code"] == "remote_error"  # the wire form is the remote error's, kept apart
    assert err.wire_details["type"] == "NotFound" and NotFound.details == {"retry": False}
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is type(err) and again.code == 404 and str(again) == "no /x"


def test_remote_error_builtin_fields_and_fallbacks() -> None:
    err = error_from_wire(_wire_of(FileNotFoundError(2, "No such file", "/x")))
    assert isinstance(err, FileNotFoundError) and err.errno == 2 and err.filename == "/x"
    unpickled = error_from_wire({"code": "remote_error", "message": "m", "type": "ZeroDivisionError",
                                 "module": "builtins", "traceback": ""})
    assert isinstance(unpickled, ZeroDivisionError) and str(unpickled) == "m"
    unknown = error_from_wire({"code": "remote_error", "message": "m", "type": "Nope", "module": "no.such"})
    assert type(unknown) is RemoteError and str(unknown) == "Nope: m"
    exit_err = error_from_wire(_wire_of(SystemExit(3)))
    assert type(exit_err) is RemoteError  # never a BaseException that would end the client
    bad = error_from_wire({"code": "remote_error", "message": "m", "type": "X", "pickled": b"junk"})
    assert type(bad) is RemoteError
    assert isinstance(cloudpickle.loads(byvalue.dumps_exception(ParseFailure("a", "b"))), ParseFailure)


def test_refs_inside_by_value_objects_resolve_like_top_level_refs() -> None:
    refs = Refs()
    target = object()
    ref = refs(target)
    captured = (lambda: ref)  # a closure that captured a ref, as `s.run(lambda: prog(...))` does
    out: Any = decode(encode([captured, [ref]], policy=Policy.ALL), resolve_ref=lambda r: refs.by_id[r.id])
    assert out[0]() is target and out[1][0] is target
    plain: Any = decode(encode([captured], policy=Policy.ALL))
    assert plain[0]() == ref and pickle.loads(pickle.dumps(ref)) == ref


SIGNATURE_PROGRAM = """
def signature_program():
    class Triage(dspy.Signature):  # a class body reading a module global (Ticket): LOAD_NAME
        \"\"\"Triage a ticket.\"\"\"

        text: str = dspy.InputField()
        ticket: Ticket = dspy.OutputField()

    return Triage
"""


def test_class_bodies_in_by_value_functions_keep_the_globals_they_read() -> None:
    # compiled without this module's `from __future__ import annotations`, as a user script is
    scope: dict[str, Any] = {"dspy": dspy, "Ticket": Ticket, "__name__": "__main__"}
    exec(compile(SIGNATURE_PROGRAM, "<user script>", "exec", dont_inherit=True), scope)  # noqa: S102
    data, _ = byvalue.dumps(scope["signature_program"])
    fn = cloudpickle.loads(data)
    assert "Ticket" in fn.__globals__ and fn().output_fields["ticket"].annotation is Ticket


def test_remote_traceback_is_a_note_of_the_raised_error() -> None:
    original = ParseFailure("ChatAdapter", "garbled")
    original.add_note("user note")
    err = error_from_wire(_wire_of(original))
    assert err.__notes__ == ["user note", "Remote traceback (on the worker):\nTraceback ..."]


def test_prediction_completions_travel_for_majority() -> None:
    from dspy.primitives.prediction import Completions

    pred = dspy.Prediction.from_completions([{"answer": "Paris"}, {"answer": "Lyon"}, {"answer": "Paris"}],
                                            signature=dspy.Signature("question -> answer"))
    out: Any = decode(encode(pred, to_ref=Refs(), policy=Policy.DATA))
    assert isinstance(out.completions, Completions) and out.completions.answer == ["Paris", "Lyon", "Paris"]
    assert list(out.completions.signature.output_fields) == ["answer"]
    assert dspy.majority(out).answer == "Paris" and out.answer == "Paris"


def test_a_user_module_referenced_as_a_module_goes_by_value(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import sys

    (tmp_path / "dspex_test_helpers_mod.py").write_text("def normalize(text):\n    return text.strip().lower()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    helpers = importlib.import_module("dspex_test_helpers_mod")
    scope: dict[str, Any] = {"helpers": helpers, "__name__": "__main__"}
    exec("def program(x):\n    return helpers.normalize(x)\n", scope)  # noqa: S102
    data, sources = byvalue.dumps(scope["program"])
    assert str(tmp_path / "dspex_test_helpers_mod.py") in sources
    monkeypatch.delitem(sys.modules, "dspex_test_helpers_mod")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    assert byvalue.loads(data, sources)("  PARIS ") == "paris"  # the other side cannot import it


def _raised_with_cause() -> BaseException:
    try:
        try:
            {}["k"]  # the KeyError is the point
        except KeyError as key:
            raise ParseFailure("ChatAdapter", "garbled") from key
    except ParseFailure as exc:
        return exc
    raise AssertionError("unreachable")


def _over_the_wire(exc: BaseException) -> Any:
    from worker.remote_errors import remote_error

    return error_from_wire(msgpack.unpackb(msgpack.packb(remote_error(exc).to_wire())))


def test_remote_error_chain_links_are_remote_errors_of_their_own_types() -> None:
    err = _over_the_wire(_raised_with_cause())
    assert isinstance(err, ParseFailure) and err.lm_response == "garbled"
    cause = err.__cause__
    assert isinstance(cause, KeyError) and isinstance(cause, RemoteError) and cause.args == ("k",)
    assert err.__context__ is cause and err.__suppress_context__
    assert "The above exception was the direct cause" in err.remote_traceback  # the whole chain
    assert "KeyError: 'k'" in cause.remote_traceback and "ParseFailure" not in cause.remote_traceback
    printed = "".join(traceback.format_exception(err))  # as an uncaught error prints on the client
    assert printed.index("KeyError") < printed.index("direct cause") < printed.index("ParseFailure")
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again.__cause__, KeyError) and again.__suppress_context__


def test_remote_error_implicit_context_and_bounds() -> None:
    try:
        try:
            raise OSError(2, "gone", "/x")
        except OSError:
            raise RuntimeError("while handling")  # the implicit __context__ is the point
    except RuntimeError as exc:
        err = _over_the_wire(exc)
    assert isinstance(err.__context__, FileNotFoundError) and err.__context__.filename == "/x"
    assert err.__cause__ is None and not err.__suppress_context__
    a, b = ValueError("a"), KeyError("b")
    a.__context__, b.__context__ = b, a
    cyclic = _over_the_wire(a)
    assert isinstance(cyclic.__context__, KeyError) and cyclic.__context__.__context__ is cyclic
    head = cur = ValueError("0")
    for i in range(1, 3000):
        cur.__context__ = cur = ValueError(str(i))
    long = _over_the_wire(head)
    depth, link = 0, long
    while link is not None:
        depth, link = depth + 1, link.__context__
    assert depth == 17  # the error and MAX_CHAIN links
    assert len(msgpack.packb(long.to_wire())) < 1_000_000


def test_remote_module_not_found_names_the_module_and_where_to_install_it() -> None:
    try:
        import dspex_test_absent_pkg  # type: ignore[import-not-found]  # noqa: F401
    except ImportError as exc:
        err = _over_the_wire(exc)
    assert isinstance(err, ModuleNotFoundError) and isinstance(err, RemoteError)
    assert err.name == "dspex_test_absent_pkg"
    assert str(err) == "No module named 'dspex_test_absent_pkg' (install it on the workers' environment)"


def test_remote_exception_groups_top_and_in_a_chain() -> None:
    group = ExceptionGroup("unhandled errors in a TaskGroup", [ValueError("inner")])
    err = _over_the_wire(group)
    assert isinstance(err, ExceptionGroup) and isinstance(err, RemoteError)
    assert err.message == "unhandled errors in a TaskGroup" and isinstance(err.exceptions[0], ValueError)
    try:
        raise group
    except ExceptionGroup:
        try:
            raise ValueError("failed after the answer")
        except ValueError as exc:
            chained = _over_the_wire(exc)
    assert isinstance(chained, ValueError) and isinstance(chained.__context__, ExceptionGroup)


def test_queues_go_by_value_as_copies_with_their_items() -> None:
    import queue

    fifo: queue.Queue[int] = queue.Queue(maxsize=5)
    for i in (3, 1, 2):
        fifo.put(i)
    fifo.get()
    lifo: queue.LifoQueue[int] = queue.LifoQueue()
    prio: queue.PriorityQueue[int] = queue.PriorityQueue()
    for i in (3, 1, 2):
        lifo.put(i)
        prio.put(i)
    out: Any = decode(encode([fifo, lifo, prio], policy=Policy.ALL))
    assert [type(q) for q in out] == [queue.Queue, queue.LifoQueue, queue.PriorityQueue]
    assert out[0].maxsize == 5 and out[0].unfinished_tasks == 3
    assert [q.get_nowait() for q in out for _ in range(q.qsize())] == [1, 2, 2, 1, 3, 1, 2, 3]
    out[0].task_done()  # a working queue: its own locks and conditions
    with pytest.raises(TypeError, match="pickle"):
        pickle.dumps(queue.Queue())  # only dspex's by-value pickles copy a queue


class _Thing:
    pass


def test_repeats_tells_an_object_that_went_by_value_twice() -> None:
    import dspy

    from dspex.wire.codec import Repeats

    thing, example = _Thing(), dspy.Example(q="a")
    for value, repeated in (([thing, thing], True), ([thing, [{"x": thing}]], True), ([example, example], True),
                            ([_Thing(), _Thing()], False), ([_Thing, _Thing], False), ([[1], [1]], False)):
        repeats = Repeats()
        encode(value, policy=Policy.ALL, repeats=repeats)
        assert repeats.seen is repeated, value


def test_repeats_tells_a_container_met_twice_anywhere() -> None:
    """A list, dict, set, tuple or subclass value met twice in one encode (in-process
    ``fn([x, x])`` gets one object twice); equal values that are two objects are two."""
    import collections

    from dspex.wire.codec import Repeats

    x, d, st, t, od = [1], {"k": 1}, {1}, (1, [2]), collections.OrderedDict(a=1)
    many = list(range(100))
    for value, repeated in (([x, x], True), ({"a": d, "b": d}, True), ([[x], {"k": x}], True), ([st, st], True),
                            ([t, t], True), ([od, od], True), ([many, [many]], True), ([[*many, x], x], True),
                            ([[1], [1]], False), ([{"k": 1}, {"k": 1}], False), ([(1, 2), (1, 3)], False),
                            ([many, list(many)], False), ([(), ()], False), (["s", "s", 10**30, 10**30], False)):
        repeats = Repeats()
        encode(value, policy=Policy.ALL, repeats=repeats)
        assert repeats.seen is repeated, value


def test_repeats_for_plain_values_only_still_tells_a_plain_repeat() -> None:
    """The worker's result walk (``plain_only``): skipped once a record or a ref made the value
    not plain (a repeat would change nothing there), never for a plain value."""
    from dspex.wire.codec import Repeats

    x = [1]
    for value, policy, repeated in (([x, x], Policy.DATA, True), ({"a": {"k": x}, "b": x}, Policy.DATA, True),
                                    ([[1], [1]], Policy.DATA, False)):
        repeats = Repeats(plain_only=True)
        encode(value, policy=policy, repeats=repeats)
        assert repeats.seen is repeated and repeats.plain, value


def test_a_repeated_container_with_a_cycle_is_a_repeat() -> None:
    from dspex.wire.codec import Repeats

    x: list[object] = [1]
    x.append(x)
    repeats = Repeats()
    encode([x, x], policy=Policy.ALL, repeats=repeats)
    assert repeats.seen


class OverQuota(Exception):
    """An exception class with ``__slots__``: their values are not in its ``vars()``."""

    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        super().__init__(f"over the quota of {limit}")
        self.limit = limit


def test_a_remote_error_keeps_the_values_of_its_slots() -> None:
    err = error_from_wire(_wire_of(OverQuota(5)))
    assert isinstance(err, OverQuota) and err.limit == 5 and str(err) == "over the quota of 5"
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is type(err) and again.limit == 5
