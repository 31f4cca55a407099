"""What a call returns is what the program returned: a class is that class (not a ref to it), an
array keeps its dtype, shape and memory order, as in-process (and as pickle keeps them)."""

from __future__ import annotations

import collections
import dataclasses
import enum
import typing
from typing import Annotated, Any, Literal, Optional

import dspy
import numpy as np

from tests.conformance.harness import SESSION, Runner


class Plain:
    kind = "plain"


class Mood(enum.Enum):
    HAPPY = "happy"


def the_class(cls: type) -> type:
    return cls


def made_class() -> type:
    return type("Made", (), {"answer": 42})


def class_of(obj: object) -> type:
    return type(obj)


def test_a_returned_class_is_the_class(run: Runner) -> None:
    for cls in (Plain, Mood, int, collections.OrderedDict, dspy.Predict, dspy.Example):
        assert run(the_class, cls) is cls, cls
    assert run(lambda: Plain) is Plain
    assert run(class_of, Plain()) is Plain
    made = run(made_class)
    assert isinstance(made, type) and made.__name__ == "Made" and made.answer == 42


class Answer(dspy.Signature):
    question: str = dspy.InputField()
    moods: list[Mood] = dspy.OutputField()
    note: Optional[Mood] = dspy.OutputField()  # noqa: UP045 (the spelling DSPy's docs use)


def annotations_of(signature: type[dspy.Signature]) -> dict[str, Any]:
    return {name: field.annotation for name, field in signature.fields.items()}


def test_a_returned_type_annotation_is_that_annotation(run: Runner) -> None:
    """DSPy users read a signature's field types (``Sig.fields[name].annotation``): ``list[Mood]``,
    ``Optional[Mood]``, ``Literal[...]`` are annotations, not objects to keep on the worker."""
    assert run(annotations_of, Answer) == {"question": str, "moods": list[Mood], "note": Optional[Mood]}  # noqa: UP045
    spelled = (list[Plain], dict[str, list[Mood]], Literal["a", "b"], Plain | None, typing.Union[int, Plain],  # noqa: UP007
               Annotated[int, "meta"], typing.List[int], collections.abc.Callable[[int], str])  # noqa: UP006
    got = run(lambda: spelled)
    assert got == spelled
    assert [type(a) for a in got] == [type(a) for a in spelled]
    assert typing.get_args(got[0])[0] is Plain


T = typing.TypeVar("T")
Score = typing.NewType("Score", float)


class Shelf(typing.Generic[T]):
    def get(self) -> T:
        raise NotImplementedError


def test_a_type_variable_and_a_new_type_come_back_as_themselves(run: Runner) -> None:
    """What an annotation is made of besides classes: ``typing.get_type_hints`` of a generic
    class's method gives its ``TypeVar``; a ``NewType`` (they came back as refs)."""
    got = run(lambda: (T, Score, typing.get_type_hints(Shelf.get)["return"]))
    assert got[0] is T and got[1] is Score and got[2] is T, got


def test_a_class_through_a_ref_is_the_class(run: Runner) -> None:
    held = run.put(Plain())
    assert run(class_of, held) is Plain


def layout(a: np.ndarray[Any, Any]) -> tuple[str, tuple[int, ...], tuple[int, ...], bool, bool]:
    return a.dtype.str, a.shape, a.strides, a.flags.f_contiguous, a.flags.c_contiguous


def describe_fields(a: np.ndarray[Any, Any]) -> tuple[Any, bool, int]:
    return a.dtype.names, a.dtype.isalignedstruct, a.dtype.itemsize


def fortran() -> np.ndarray[Any, Any]:
    return np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4))


def test_array_order_dtype_and_shape_both_ways(run: Runner) -> None:
    f = fortran()
    assert run(layout, f) == layout(f)  # arrives Fortran-ordered
    assert layout(run(fortran)) == layout(f)  # comes back Fortran-ordered
    t = np.zeros((3, 5), dtype=">f4").T
    assert run(layout, t) == layout(t)
    padded = np.zeros(2, dtype=np.dtype([("a", "i1"), ("b", "<i4")], align=True))
    assert run(describe_fields, padded) == describe_fields(padded)  # padding is no field there either
    assert describe_fields(run(lambda a: a, padded)) == describe_fields(padded)
    view = np.arange(10.0)[::2]
    np.testing.assert_array_equal(run(lambda a: a, view), view)
    if run.mode == SESSION:  # a strided view travels as a C-contiguous copy (as pickle makes it)
        assert run(layout, view) == layout(np.ascontiguousarray(view))


@dataclasses.dataclass
class Box:
    items: list[int] = dataclasses.field(default_factory=list)


def a_list_twice() -> list[list[int]]:
    x = [1]
    return [x, x]


def a_dict_and_an_object_twice() -> dict[str, Any]:
    d = {"k": [1, 2]}
    box = Box()
    return {"a": d, "b": d, "boxes": (box, box), "inner": [d["k"]]}


def test_an_object_twice_in_a_result_is_one_object(run: Runner) -> None:
    pair = run(a_list_twice)
    assert pair == [[1], [1]] and pair[0] is pair[1]
    out = run(a_dict_and_an_object_twice)
    assert out["a"] is out["b"] and out["boxes"][0] is out["boxes"][1] and out["inner"][0] is out["a"]["k"]
    assert isinstance(out["boxes"][0], Box)


def twice_beside_a_lock() -> list[Any]:
    import threading

    x = [1]
    return [x, x, threading.Lock()]


def test_a_result_twice_beside_what_stays_a_ref(run: Runner) -> None:
    """What cannot travel still comes back as a ref; the rest is data (one object twice then
    comes back as two equal copies: a documented limit)."""
    out = run(twice_beside_a_lock)
    assert out[0] == out[1] == [1]
    assert hasattr(out[2], "acquire")
