"""An LM history entry as a checkpoint blob: plain data, so the C pickler alone writes it,
several times faster than the session pickler (``worker.checkpoint_pickler``), with the same bytes
``pickle.dumps`` would write. DSPy's LM responses are slotted dataclasses, whose own
``__getstate__`` calls ``dataclasses.fields()`` per object: here their fields are read by one
``attrgetter`` made once per type."""

from __future__ import annotations

import copyreg
import dataclasses
import io
import operator
import pickle
from collections.abc import Callable
from typing import Any

from worker.checkpoint_pickler import PROTOCOL, SESSION_MODULE_PREFIX, dumps_blob

_OBJECT_REDUCE_EX: Any = object.__reduce_ex__
_OBJECT_REDUCE: Any = object.__reduce__
_NEWOBJ: Any = copyreg.__newobj__  # type: ignore[attr-defined]  # (not in typeshed)


def _default_reduce(cls: type) -> bool:
    """Instances of ``cls`` reduce as ``(copyreg.__newobj__, (cls,), cls.__getstate__(obj))``:
    object's own ``__reduce_ex__``, no constructor arguments, not a list or dict (no items)."""
    return (cls.__reduce_ex__ is _OBJECT_REDUCE_EX and cls.__reduce__ is _OBJECT_REDUCE
            and getattr(cls, "__getnewargs_ex__", None) is None and getattr(cls, "__getnewargs__", None) is None
            and not issubclass(cls, (list, dict)))


_REDUCE_EX = operator.methodcaller("__reduce_ex__", PROTOCOL)  # what pickle calls when no table has the type
_DATACLASS_GETSTATE = getattr(dataclasses, "_dataclass_getstate", None)  # a slotted dataclass's __getstate__


def _slotted_dataclass_reducer(cls: type) -> Callable[[Any], Any] | None:
    """For a slotted dataclass with dataclasses' own ``__getstate__``: the reduction
    ``__reduce_ex__`` makes, with the fields read by one C call instead of ``fields()`` per
    object (a DSPy LM response is several of these)."""
    if _DATACLASS_GETSTATE is None or getattr(cls, "__getstate__", None) is not _DATACLASS_GETSTATE \
            or not _default_reduce(cls):
        return None
    names = [f.name for f in dataclasses.fields(cls)]
    if not names:
        return None
    getter = operator.attrgetter(*names)
    if len(names) == 1:
        return lambda obj: (_NEWOBJ, (cls,), [getter(obj)])
    return lambda obj: (_NEWOBJ, (cls,), list(getter(obj)))


class _DataReducers(dict):  # type: ignore[type-arg]
    """The data pickler's ``dispatch_table``: per type, copyreg's reducer or ``__reduce_ex__`` (what
    pickle does by default) or a slotted dataclass's faster equivalent; made once per type, then
    looked up in C. Classes are never in it (pickle saves them by name)."""

    def __missing__(self, cls: type) -> Any:
        if issubclass(cls, type):
            raise KeyError(cls)
        reducer = copyreg.dispatch_table.get(cls) or _slotted_dataclass_reducer(cls) or _REDUCE_EX
        self[cls] = reducer
        return reducer


_data_reducers = _DataReducers()
_DATA_REDUCERS_MAX = 256
_data_reducers_for = -1  # len(copyreg.dispatch_table) they were made with


class _DataPickler(pickle.Pickler):
    dispatch_table = _data_reducers


def dumps_data_blob(obj: Any) -> bytes:
    """A blob of plain data (an LM history entry): the C pickler alone, several times faster,
    when what it wrote refers to nothing of the session (a class of the session's namespace
    would be looked up by name before that module is filled); :func:`dumps_blob` otherwise."""
    global _data_reducers_for
    # (bounded: a type in it is kept alive, and a session may make classes at runtime)
    if _data_reducers_for != len(copyreg.dispatch_table) or len(_data_reducers) > _DATA_REDUCERS_MAX:
        _data_reducers.clear()
        _data_reducers_for = len(copyreg.dispatch_table)
    buf = io.BytesIO()
    try:
        _DataPickler(buf, PROTOCOL).dump(obj)
    except Exception:  # noqa: BLE001 - by-value code (a lambda, a class made at runtime): cloudpickle
        return dumps_blob(obj)
    data = buf.getvalue()
    if SESSION_MODULE_PREFIX in data:
        return dumps_blob(obj)
    return data
