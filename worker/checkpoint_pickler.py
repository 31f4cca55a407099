"""The pickler of session checkpoints (worker/checkpoint.py) and what its pickles call on load.

A checkpoint is one pickle of a session's state (the *skeleton*) plus *blobs*: objects pickled
once and referred to by slot number afterwards, so a call that changed a little sends a little.

- **Slots** are numbered positions the skeleton's pickler memo is seeded with (``Pickler.memo``:
  a reference to a seeded object is a memo GET, written in C, no Python call): the session's
  module dicts (functions keep them as ``__globals__``, so they are restored as the new module's
  dict, not a copy) and LM history entries (dicts; the pickler never asks Python about dicts).
  The loader seeds the same positions (:func:`seed_pickle`) before it reads the skeleton.
- **Code objects** and DSPy **signature classes** made by ``make_signature`` are immutable in
  practice: the pickler turns each into a blob once and writes ``_slot(i)`` in the skeleton (via
  ``reducer_override``, so each build knows which are still used). A signature class becomes its
  spec (name, instructions, fields), rebuilt with DSPy's own ``make_signature``: a fraction
  of cloudpickle's pydantic class, and exact (same fields, types, prefixes,
  descriptions, instructions). A signature whose spec needs the session's own classes is written
  inline, so those stay one object.
- **Dynamic classes** are made fresh per session on load (cloudpickle would hand every session
  the first one's class by tracker id) and keep their tracker id, so they travel back to the
  client as the client's own class.
- A function whose globals are an importable module's (a closure made by a library) gets that
  module's live globals back, not a copy.

Blobs must stand alone (they are loaded before the skeleton): a blob pickle that would need a
class, function or module by value raises :class:`NotSelfContained` and the object is written
inline instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import copyreg
import hashlib
import io
import operator
import pickle
import struct
import sys
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import cloudpickle
from cloudpickle import cloudpickle as _cp

from dspex.wire import byvalue, classes, codestore, reducers
from dspex.wire.sessiondir import FileData

PROTOCOL = 5
_DYNAMIC = "<dynamic-code>"
SESSION_MODULE_PREFIX = b"dspex_session_"  # worker/namespace.py names the sessions' modules so
_SIGNATURE_MODULE = "dspy.signatures.signature"


class NotSelfContained(Exception):
    """A blob would need an object by value: write it inline in the skeleton instead."""


def digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


def _code_reduce(obj: types.CodeType) -> tuple[Any, ...]:
    """cloudpickle's code reduction with the real file name (it writes ``<dynamic-code>``), so
    tracebacks and ``inspect.getsource`` of restored functions still work."""
    make, args = _cp._code_reduce(obj)
    return make, tuple(obj.co_filename if a == _DYNAMIC else a for a in args)


_owners: tuple[type, ...] = ()


def _history_owners() -> tuple[type, ...]:
    """DSPy's classes whose instances keep an LM ``history`` (once dspy is imported)."""
    global _owners
    if len(_owners) < 2:
        found = []
        for module, name in (("dspy.clients.base_lm", "BaseLM"), ("dspy.primitives.module", "Module")):
            cls = getattr(sys.modules.get(module), name, None)
            if isinstance(cls, type):
                found.append(cls)
        _owners = tuple(found)
    return _owners


# cloudpickle's dispatch table is a ChainMap (a Python __getitem__ per object the pickler looks
# up); a plain dict of the same entries, rebuilt when copyreg's table changes
_dispatch: dict[Any, Any] = {}
_dispatch_size = -1
# classes cloudpickle pickles by reference (importable), asked once per class; forgotten when a
# module is registered for pickling by value
_by_reference: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()
_by_value_modules = -1


def _dispatch_table() -> dict[Any, Any]:
    global _dispatch, _dispatch_size
    if _dispatch_size != len(copyreg.dispatch_table):
        _dispatch = dict(cloudpickle.Pickler.dispatch)
        _dispatch[types.CellType] = _cell_reduce
        _dispatch_size = len(copyreg.dispatch_table)
    return _dispatch


def _cell_reduce(cell: types.CellType) -> Any:
    """A closure cell made empty and filled once it is in the memo: the session's functions are
    made with their own cells (:meth:`SkeletonPickler._function`), so functions that share a cell
    (made together, ``inc`` and ``get`` of one ``make_counter()``) share it after a restore, and a
    cell that holds its own function (a nested recursive function) is no recursion."""
    try:
        value = cell.cell_contents
    except ValueError:
        return _cp._make_empty_cell, ()
    return _cp._make_empty_cell, (), (value,), None, None, _fill_cell  # (a state of None is none)


def _fill_cell(cell: types.CellType, state: tuple[Any]) -> None:
    cell.cell_contents = state[0]


def _class_by_reference(cls: type) -> bool:
    global _by_value_modules
    if _by_value_modules != len(_cp._PICKLE_BY_VALUE_MODULES):
        _by_reference.clear()
        _by_value_modules = len(_cp._PICKLE_BY_VALUE_MODULES)
    try:
        return _by_reference[cls]
    except (KeyError, TypeError):
        pass
    try:
        known = bool(_cp._should_pickle_by_reference(cls))
    except Exception:  # noqa: BLE001 - not importable by name, whatever the reason
        known = False
    try:
        _by_reference[cls] = known
    except TypeError:
        pass
    return known


def is_made_signature(obj: type) -> bool:
    """A signature class made by ``dspy.make_signature`` (string signatures, ``with_instructions``,
    ``load_state``...): nothing in it but its fields and instructions."""
    base = getattr(sys.modules.get(_SIGNATURE_MODULE), "Signature", None)
    return (base is not None and obj.__module__ == _SIGNATURE_MODULE and obj.__bases__ == (base,)
            and getattr(sys.modules[_SIGNATURE_MODULE], obj.__qualname__, None) is not obj)


def signature_spec(cls: Any) -> tuple[str, str | None, list[tuple[str, Any, Any]]]:
    fields = [(name, info.annotation, info) for name, info in cls.model_fields.items()]
    return cls.__name__, cls.__doc__, fields


def signature_version(cls: Any) -> tuple[Any, ...]:
    """What may change in place on a signature class (its instructions, a field's prefix or
    description): a cached blob of it is valid while this is equal."""
    return (cls.__doc__, tuple((name, id(info), tuple(info.json_schema_extra.items())
                                if isinstance(info.json_schema_extra, dict) else None)
                               for name, info in cls.model_fields.items()))


def _make_signature(name: str, doc: str | None, fields: list[tuple[str, Any, Any]]) -> Any:
    from dspy.signatures.signature import make_signature

    return make_signature({n: (annotation, info) for n, annotation, info in fields}, doc, name)


def _make_class(tracker: str | None, type_constructor: type, name: str, bases: tuple[type, ...],
                type_kwargs: dict[str, Any], extra: Any) -> type:
    """A dynamic class of this session only: made fresh, registered class -> tracker id (so it
    pickles back to the client as the client's class), never tracker id -> class (another
    session's copy of it must stay another class)."""
    with classes.class_hooks_skipped(type_constructor, bases):  # it ran on the client; its effects are restored
        cls: type = _cp._make_skeleton_class(type_constructor, name, bases, type_kwargs, None, extra)
    return _tracked(cls, tracker)


def _make_enum(tracker: str | None, bases: tuple[type, ...], name: str, qualname: str, members: dict[str, Any],
               module: str, extra: Any) -> type:
    return _tracked(_cp._make_skeleton_enum(bases, name, qualname, members, module, None, extra), tracker)


def _tracked(cls: type, tracker: str | None) -> type:
    if tracker is not None:
        with _cp._DYNAMIC_CLASS_TRACKER_LOCK:
            _cp._DYNAMIC_CLASS_TRACKER_BY_CLASS[cls] = tracker
    return cls


def _exception_reduce(obj: BaseException) -> Any:
    """An exception rebuilt from its state, never by calling ``__init__`` (dspy's
    ``AdapterParseError`` takes other arguments than its ``args``), as dspex.wire.byvalue does."""
    cls = type(obj)
    if cls.__module__ == "builtins" or cls.__reduce__ is not BaseException.__reduce__:
        return NotImplemented
    return byvalue.exception_from_state, (cls, obj.args, dict(vars(obj)))


def _make_lib_function(code: types.CodeType, module: str, closure: tuple[Any, ...] | None) -> types.FunctionType:
    """A function whose globals are an importable module's: the live module, not a copy."""
    import importlib

    namespace = (sys.modules.get(module) or importlib.import_module(module)).__dict__
    return types.FunctionType(code, namespace, None, None, closure)


# -- the load under way ---------------------------------------------------------------------

class Fill:
    """Names to set in a namespace (a seeded module dict) as soon as they are loaded: pickled as
    ``_fill(namespace, names)``, which runs before the rest of the skeleton is read."""

    __slots__ = ("names", "namespace")

    def __init__(self, namespace: dict[str, Any], names: dict[str, Any]) -> None:
        self.namespace, self.names = namespace, names


def _fill(namespace: dict[str, Any], names: dict[str, Any]) -> None:
    namespace.update(names)


class LoadContext:
    """What a checkpoint's pickles refer to while it is loaded: slot objects, module objects."""

    def __init__(self) -> None:
        self.objects: dict[int, Any] = {}  # slot -> loaded blob object
        self.modules: dict[int, types.ModuleType] = {}  # id(module dict) -> module


_load: contextvars.ContextVar[LoadContext | None] = contextvars.ContextVar("dspex_checkpoint_load", default=None)


def _active() -> LoadContext:
    context = _load.get()
    if context is None:
        raise pickle.UnpicklingError("a checkpoint pickle loaded outside a checkpoint restore")
    return context


def _slot(index: int) -> Any:
    try:
        return _active().objects[index]
    except KeyError:
        raise pickle.UnpicklingError(f"the checkpoint refers to slot {index}, which it does not hold") from None


def _module_of(namespace: dict[str, Any]) -> types.ModuleType:
    module = _active().modules.get(id(namespace))
    if module is None:
        raise pickle.UnpicklingError("the checkpoint refers to a module it does not hold")
    return module


@contextlib.contextmanager
def loading(context: LoadContext) -> Iterator[None]:
    """Checkpoint pickles loaded in the block resolve against ``context``."""
    token = _load.set(context)
    try:
        yield
    finally:
        _load.reset(token)


def seed_pickle(count: int) -> bytes:
    """A pickle that puts ``persistent_load(i)`` at memo index ``i`` for ``i < count``.

    Loaded by the unpickler that then loads the skeleton (its memo carries over between
    ``load()`` calls), so the skeleton's memo GETs of seeded slots find the restored objects
    (the memo setter of the C unpickler cannot be used: it drops a dict's items and, from a
    proxy, does not advance the index MEMOIZE uses)."""
    out = [b"\x80\x04"]
    for i in range(count):
        out.append(b"J" + struct.pack("<i", i) + b"Q\x940")  # BININT i, BINPERSID, MEMOIZE, POP
    out.append(b"N.")
    return b"".join(out)


def load_seeded(seed_objects: Sequence[Any], skeleton: bytes | memoryview) -> Any:
    """Unpickle ``skeleton`` with memo index ``i`` holding ``seed_objects[i]``."""
    stream = io.BytesIO(seed_pickle(len(seed_objects)))
    unpickler = pickle.Unpickler(stream)
    unpickler.persistent_load = seed_objects.__getitem__  # type: ignore[method-assign]
    unpickler.load()
    stream.seek(0)
    stream.truncate()
    stream.write(skeleton)
    stream.seek(0)
    return unpickler.load()


# -- writing ---------------------------------------------------------------------------------

def _make_session_function(code: types.CodeType, globals_: dict[str, Any], name: str, argdefs: Any,
                           closure: Any) -> types.FunctionType:
    """A function of a session's module, made with the module's own builtins (cloudpickle's
    ``_make_function`` puts Python's in the module first: the session's ``__import__``, which
    finds its modules, would be lost: dspex.wire.codestore.CodeStore.importer)."""
    return types.FunctionType(code, globals_, name, argdefs, closure)


class BlobPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """Pickles one blob that must load on its own: by-value code or modules are refused."""

    def __init__(self, file: io.BytesIO) -> None:
        reducers.register_library_reducers()
        super().__init__(file, protocol=PROTOCOL)

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.CodeType:
            return _code_reduce(obj)
        if isinstance(obj, (type, types.FunctionType)):
            if isinstance(obj, type) and is_made_signature(obj):
                return _make_signature, signature_spec(obj)
            reduced = super().reducer_override(obj)
            if reduced is not NotImplemented:
                raise NotSelfContained(f"{type(obj).__name__} {getattr(obj, '__qualname__', '?')} goes by value")
            return reduced
        if isinstance(obj, types.ModuleType) and not _cp._should_pickle_by_reference(obj):
            raise NotSelfContained(f"module {obj.__name__} goes by value")
        if type(obj) is io.TextIOWrapper:
            raise TypeError(f"cannot checkpoint an open file ({getattr(obj, 'name', '?')!r})")
        return NotImplemented


def dumps_blob(obj: Any) -> bytes:
    """``obj`` pickled on its own; raises NotSelfContained, or what pickling raises."""
    buf = io.BytesIO()
    BlobPickler(buf).dump(obj)
    return buf.getvalue()


class _SharedHistory:
    """A history written as a copy of the session's history list (loads as a list of its own)."""

    __slots__ = ("entries",)

    def __init__(self, entries: list[Any]) -> None:
        self.entries = entries


class SkeletonPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle for the skeleton: seeded memo, code and signatures as slots, per-session
    dynamic classes, session modules by slot."""

    def __init__(self, file: io.BytesIO, seed: dict[int, tuple[int, Any]], module_dicts: dict[int, dict[str, Any]],
                 slot_for: Callable[[Any, str], int | None], history_limit: int,
                 session_history: list[Any] | None = None) -> None:
        reducers.register_library_reducers()
        super().__init__(file, protocol=PROTOCOL)
        self.memo = seed
        # functions of the session's modules keep the module dict itself (seeded) as globals
        self.globals_ref.update(module_dicts)
        self._module_dicts = module_dicts
        self._slot_for = slot_for
        self._history_limit = history_limit
        self._history_owners = _history_owners()
        # an LM's or a module's history holding the same entries as the session's history list
        # is written as a copy of that list: one reference, not one per entry
        self._session_history = session_history

    @property
    def dispatch_table(self) -> dict[Any, Any]:  # read once, by the C pickler's __init__
        return _dispatch_table()

    def reducer_override(self, obj: Any) -> Any:
        # by type(obj) only: an isinstance() that fails asks the instance for __class__, a Python
        # call on a DSPy module (its __getattribute__)
        kind = type(obj)
        if kind is Fill:
            return _fill, (obj.namespace, obj.names)
        if kind is _SharedHistory:
            return list, (obj.entries,)
        if kind is FileData:  # a session directory's file: a blob while its bytes stay the same
            slot = self._slot_for(obj, "file")
            return (_slot, (slot,)) if slot is not None else NotImplemented
        if kind is types.CodeType:
            slot = self._slot_for(obj, "code")
            return (_slot, (slot,)) if slot is not None else _code_reduce(obj)
        if kind is types.FunctionType:
            return self._function(obj)
        if kind is reducers.LRU_WRAPPER and type(obj.__wrapped__) is types.FunctionType \
                and self._function_reduce(obj.__wrapped__) is not NotImplemented:
            # the session's functools.lru_cache of its own function: made again around it (by
            # name the wrapper is not importable); its cache starts empty after a move
            params = obj.cache_parameters()
            return reducers.make_lru_cache, (obj.__wrapped__, params["maxsize"], params["typed"]), dict(vars(obj))
        if kind is types.ModuleType:
            if id(obj.__dict__) in self._module_dicts:
                return _module_of, (obj.__dict__,)
            return super().reducer_override(obj)
        if issubclass(kind, type):
            return self._class(obj)
        if kind is io.TextIOWrapper:
            # cloudpickle would pickle a text file's contents and load them as a StringIO: a
            # different object, silently. An open file is not durable.
            raise TypeError(f"cannot checkpoint an open file ({getattr(obj, 'name', '?')!r})")
        if self._history_owners and issubclass(kind, self._history_owners):
            return self._with_history(obj)
        if issubclass(kind, BaseException):
            return _exception_reduce(obj)
        return NotImplemented

    def _with_history(self, obj: Any) -> Any:
        """A DSPy module or LM with its ``history`` bounded (the worker's LM history bound) and,
        for a module, its ``history`` and ``callbacks`` kept (``Module.__getstate__`` drops them
        for pickles; a durable session must not lose them silently)."""
        reduced = obj.__reduce_ex__(PROTOCOL)
        if not (isinstance(reduced, tuple) and len(reduced) >= 3 and isinstance(reduced[2], dict)):
            return NotImplemented
        state = dict(reduced[2])
        for key in ("history", "callbacks"):
            if key not in state and key in obj.__dict__:
                state[key] = obj.__dict__[key]
        history = state.get("history")
        if isinstance(history, list):
            if len(history) > self._history_limit:
                history = state["history"] = history[len(history) - self._history_limit:]
            shared = self._session_history
            # the same entries, by identity (all/map/is_ run in C: no Python call per entry)
            if (shared and type(history) is list and len(history) == len(shared)
                    and all(map(operator.is_, history, shared))):
                state["history"] = _SharedHistory(shared)
        return (reduced[0], reduced[1], state, *reduced[3:])

    def _class(self, obj: type) -> Any:
        if _class_by_reference(obj):
            self._slot_for(obj, "global")  # seeded in the next build's memo: no call for it then
            return NotImplemented
        if is_made_signature(obj):
            slot = self._slot_for(obj, "signature")
            return (_slot, (slot,)) if slot is not None else (_make_signature, signature_spec(obj))
        reduced = super().reducer_override(obj)
        if reduced is NotImplemented or not isinstance(reduced, tuple):
            return reduced
        make, args, *rest = reduced
        if make is _cp._make_skeleton_class:
            type_constructor, name, bases, type_kwargs, tracker, extra = byvalue.skeleton_args(obj, make, args)
            return (_make_class, (tracker, type_constructor, name, bases, type_kwargs, extra), *rest)
        if make is _cp._make_skeleton_enum:
            bases, name, qualname, members, module, tracker, extra = args
            return (_make_enum, (tracker, bases, name, qualname, members, module, extra), *rest)
        return reduced

    def _function(self, func: types.FunctionType) -> Any:
        reduced = self._function_reduce(func)
        if reduced is NotImplemented:
            self._slot_for(func, "global")  # importable by name: seeded in the next build's memo
            return reduced
        namespace = func.__globals__
        if id(namespace) in self._module_dicts:
            # its globals are the module dict itself (seeded, restored whole): the copy of the
            # globals it reads that cloudpickle adds to its state is dropped (a global that cannot
            # be pickled is then that global's problem, named for itself, not this function's)
            make, args, (state, slotstate), *rest = reduced
            if make is _cp._make_function:  # the module's own builtins kept (its __import__)
                make = _make_session_function
                rest = [codestore.function_setstate if f is _cp._function_setstate else f for f in rest]
                args = (*args[:4], func.__closure__)  # its own cells (cloudpickle's are new ones): shared ones stay so
            return (make, args, (state, {**slotstate, "__globals__": {}}), *rest)
        name = namespace.get("__name__")
        module = sys.modules.get(name) if isinstance(name, str) else None
        if module is None or module.__dict__ is not namespace or _cp._is_registered_pickle_by_value(module):
            return reduced
        # a library's closure: its module's live globals on load, none of them copied
        state, slotstate = _cp._function_getstate(func)
        slotstate["__globals__"] = {}
        closure = None if func.__closure__ is None else tuple(_cp._make_empty_cell() for _ in func.__closure__)
        return _make_lib_function, (func.__code__, name, closure), (state, slotstate), None, None, \
            _cp._function_setstate
