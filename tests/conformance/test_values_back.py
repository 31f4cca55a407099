"""What a call returns is what the program returned: a class is that class (not a ref to it), an
array keeps its dtype, shape and memory order, as in-process (and as pickle keeps them)."""

from __future__ import annotations

import collections
import enum
from typing import Any

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
