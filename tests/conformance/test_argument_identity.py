"""One object given twice in one call's arguments is one object where the call runs.

In-process ``fn(a, a)`` gets the same object twice, and code relies on it (a list appended to
through one name is seen through the other; ``dspy.Evaluate`` given the same program twice).
pickle keeps identity within one ``dumps``; a call's arguments are one message, so they must too.
"""

from __future__ import annotations

import dspy
import numpy as np

from tests.conformance.harness import Runner


class Box:
    def __init__(self) -> None:
        self.items: list[int] = []


def same(a: object, b: object) -> bool:
    return a is b


def pair_is_one(xs: list[object]) -> bool:
    return xs[0] is xs[1]


def keyword_pair_is_one(*, items: list[object]) -> bool:
    return items[0] is items[1]


def across_args_and_kwargs(a: object, *, b: object) -> bool:
    return a is b


def fill_one_read_other(a: Box, b: Box) -> list[int]:
    a.items.append(1)
    return b.items


def test_an_object_given_twice_as_arguments_is_one_object(run: Runner) -> None:
    box = Box()
    assert run(same, box, box) is True
    assert run(fill_one_read_other, box, box) == [1]
    assert run(across_args_and_kwargs, box, b=box) is True


def test_an_object_twice_inside_an_argument_is_one_object(run: Runner) -> None:
    box = Box()
    assert run(pair_is_one, [box, box]) is True
    assert run(keyword_pair_is_one, items=[box, box]) is True
    assert run(pair_is_one, (box, box)) is True


def test_containers_records_and_arrays_given_twice_are_one_object(run: Runner) -> None:
    shared = [1, 2]
    example = dspy.Example(question="q", answer="a").with_inputs("question")
    array = np.arange(4)
    assert run(same, shared, shared) is True
    assert run(same, example, example) is True
    assert run(pair_is_one, [example, example]) is True
    assert run(same, array, array) is True


def test_equal_objects_stay_two_objects(run: Runner) -> None:
    assert run(same, Box(), Box()) is False
    assert run(same, [1, 2], [1, 2]) is False
    assert run(pair_is_one, [Box(), Box()]) is False


def holds_a_box_and_a_pair(r: object, a: object, b: object) -> tuple[bool, bool]:
    return isinstance(r, Box), a is b


def test_a_ref_beside_a_repeated_object_is_its_object(run: Runner) -> None:
    ref = run.put(Box())
    box = Box()
    assert run(holds_a_box_and_a_pair, ref, box, box) == (True, True)


def second_of_pair_after_append(xs: list[list[int]]) -> list[int]:
    xs[0].append(2)
    return xs[1]


def values_are_one(m: dict[str, object]) -> bool:
    return m["a"] is m["b"]


def nested_pair_is_one(xs: list[object]) -> bool:
    return xs[0][0] is xs[1]["k"]  # type: ignore[index]


def test_a_container_twice_inside_one_argument_is_one_object(run: Runner) -> None:
    """Any container, not only by-value objects: ``[x, x]`` is one list twice, so appending
    through one is seen through the other, at any depth and in dicts, tuples, sets too."""
    x = [1]
    assert run(pair_is_one, [x, x]) is True
    assert run(second_of_pair_after_append, [x, x]) == [1, 2]
    d = {"k": 1}
    assert run(pair_is_one, [d, d]) is True
    assert run(values_are_one, {"a": d, "b": d}) is True
    assert run(values_are_one, {"a": x, "b": x}) is True
    assert run(nested_pair_is_one, [[x], {"k": x}]) is True
    assert run(pair_is_one, [{1, 2}] * 2) is True
    assert run(pair_is_one, [(1, x)] * 2) is True
    assert run(pair_is_one, [np.arange(3)] * 2) is True
    assert run(keyword_pair_is_one, items=[x, x]) is True


def test_equal_containers_inside_one_argument_stay_two(run: Runner) -> None:
    assert run(pair_is_one, [[1], [1]]) is False
    assert run(values_are_one, {"a": {"k": 1}, "b": {"k": 1}}) is False
    assert run(second_of_pair_after_append, [[1], [1]]) == [1]
