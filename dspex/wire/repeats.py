"""One object in two places of one encoded value: in-process it is one object (``fn([x, x])``,
``return [x, x]``), while each occurrence the codec encodes arrives as its own copy. The encoder
tells a :class:`Repeats` what it met; a request or result with a repeat goes as one pickle."""

from __future__ import annotations

import gc
from typing import Any

__all__ = ["Repeats", "list_or_dict_twice"]


class Repeats:
    """Told by ``encode`` whether one object with an identity of its own went twice: by value
    (pickled or as a record) or as a container (a list, dict, tuple, set, array, subclass value...)
    anywhere in the value. Each occurrence arrives as its own copy, where in-process they are one
    object."""

    __slots__ = ("met", "plain", "plain_only", "seen")

    def __init__(self, *, plain_only: bool = False) -> None:
        self.seen = False
        self.plain = True  # no ref made, no record: one pickle of the whole value loses nothing
        # the caller acts on a repeat only in a plain value (the worker's result, then one pickle):
        # in any other (a Prediction's record, a ref) the walk for a list or dict met twice is skipped
        self.plain_only = plain_only
        # what convert met, kept alive so that an id stays that object's for the encode
        self.met: dict[int, object] = {}

    def meet(self, obj: object) -> None:
        if id(obj) in self.met:
            self.seen = True
        else:
            self.met[id(obj)] = obj


def list_or_dict_twice(obj: object, parts: list[list[Any]]) -> bool:
    """Whether one list or dict is in two places of ``obj``, or inside itself. The packer takes
    them without a hook; the other containers went through the encoder's hook (``parts``: their items).
    Plain loops: a comprehension costs a frame, and most bodies hold a few short lists."""
    todo: list[Any] = []
    push = todo.append
    if type(obj) is list or type(obj) is dict:
        push(obj)
    for part in parts:
        for v in part:
            if type(v) is list or type(v) is dict:
                push(v)
    seen: set[int] = set()
    pop, add = todo.pop, seen.add
    while todo:
        o = pop()
        if id(o) in seen:
            return True
        add(id(o))
        if type(o) is dict:
            if not gc.is_tracked(o):  # CPython tracks a dict once it holds a container: this one holds none
                continue
            values: Any = o.values()
        else:
            values = o
        if len(values) > 24:  # a long one: its types gathered at C speed (a list of floats)
            kinds = set(map(type, values))
            if list not in kinds and dict not in kinds:
                continue
        for v in values:
            if type(v) is list or type(v) is dict:
                push(v)
    return False
