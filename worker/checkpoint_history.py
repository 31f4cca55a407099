"""The LM history entries of a durable session's checkpoint (worker/checkpoint.py): each entry a
blob of its own in a seeded slot, pickled once, when it appears; one that cannot be a blob is
pickled inline in the skeleton.

An entry is plain data, so the C pickler alone writes its blob, several times faster than the
session pickler (``worker.checkpoint_pickler``), with the same bytes ``pickle.dumps`` would write.
DSPy's LM responses are slotted dataclasses, whose own ``__getstate__`` calls
``dataclasses.fields()`` per object: here their fields are read by one ``attrgetter`` made once per
type."""

from __future__ import annotations

import copyreg
import dataclasses
import io
import operator
import pickle
from collections.abc import Callable
from typing import Any

from worker.checkpoint_pickler import PROTOCOL, SESSION_MODULE_PREFIX, dumps_blob
from worker.checkpoint_slots import ENTRY, Slots


class HistoryEntries:
    """Which history entries of one session have a slot (``Tracker.history``); acts through the
    tracker's ``add_blob`` (a slot's new blob) and ``drop`` (a slot gone)."""

    def __init__(self, slots: Slots, *, add_blob: Callable[[int, bytes], None], drop: Callable[[int], None]) -> None:
        self._slots, self._add_blob, self._drop = slots, add_blob, drop
        self.entries: dict[int, int] = {}  # id(history entry) -> slot
        self.inline: dict[int, Any] = {}  # history entries that cannot be blobs
        self.first: Any = None  # the first history entry at the last build

    def sync(self, entries: list[Any]) -> None:
        """Slots for the entries the session's history gained, none for those it dropped."""
        known, inline = self.entries, self.inline
        n = len(entries)
        if n == len(known) + len(inline) and (
                not entries or all(id(e) in known or id(e) in inline for e in (entries[0], entries[-1]))):
            return  # entries are appended at the end and dropped at the front: no change
        first = self.first
        if (n >= 2 and not inline and id(entries[-1]) not in known and id(entries[-2]) in known
                and id(entries[0]) in known):
            # the usual call: one entry in at the end and, at the bound, the first one out (a
            # wrong guess only costs speed: an entry still listed but not held is pickled inline,
            # then held again by the next full pass)
            if n == len(known) + 1 and first is entries[0]:
                self._add(entries[-1])
                return
            if n == len(known) and first is not None and first is not entries[0] and id(first) in known:
                self._drop(known.pop(id(first)))
                self._add(entries[-1])
                self.first = entries[0]
                return
        current = {id(e): e for e in entries}
        for key in [k for k in known if k not in current]:
            self._drop(known.pop(key))
        for key in [k for k in inline if k not in current]:
            del inline[key]
        for key, entry in current.items():
            if key not in known and key not in inline:
                self._add(entry)
        self.first = entries[0] if entries else None

    def _add(self, entry: Any) -> None:
        """A history entry the session has not had: a blob of its own, pickled once."""
        if not isinstance(entry, dict):
            self.inline[id(entry)] = entry
            return
        try:
            blob = dumps_data_blob(entry)
        except Exception:  # noqa: BLE001 - needs session objects, or fails: inline, where a failure names its root
            self.inline[id(entry)] = entry
            return
        i = self._slots.alloc(entry, ENTRY)
        self.entries[id(entry)] = i
        self._add_blob(i, blob)


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
