"""Objects by value (codec ext 13): cloudpickle, with the source of by-value code alongside.

Code from the user's own modules (``__main__``, a test module, the application's package: anything
not in the standard library or installed in site-packages, as :mod:`dspex.wire.usercode` tells) is
pickled by value, since the other side may not be able to import it
(``cloudpickle.register_pickle_by_value``). The source lines of every by-value function and class
travel with the pickle, and the receiver registers them in ``linecache`` (as IPython does for its
cells), so ``inspect.getsource`` works there too: dspy's ``Refine`` and ``SIMBA`` read the source of
the code they run.
"""

from __future__ import annotations

import dis
import importlib
import inspect
import io
import linecache
import pickle
import sys
import types
import typing
from typing import Any

import cloudpickle
from cloudpickle import cloudpickle as _cp

from dspex.wire import reducers, usercode

MAX_SOURCE_FILE = 2 * 1024 * 1024  # a bigger "source" file is not hand-written code: skip it
MAX_SOURCES = 8 * 1024 * 1024  # all source text of one pickle
_DYNAMIC = "<dynamic-code>"
MAX_CHAIN_LINKS = 16  # exceptions of one pickle whose __cause__/__context__ travel: chains are bounded


_walk_global_ops = _cp._walk_global_ops
_LOAD_NAME, _STORE_NAME = dis.opmap["LOAD_NAME"], dis.opmap["STORE_NAME"]


def _walk_global_and_class_body_ops(co: types.CodeType) -> Any:
    """cloudpickle's global names of a code object, plus the module globals a class body nested
    in a function reads (``LOAD_NAME``; cloudpickle only follows ``LOAD_GLOBAL``): without them a
    function that defines ``class Triage(dspy.Signature): ticket: Ticket = ...`` arrives without
    ``Ticket``. Names the class body assigns itself are its own, not globals."""
    yield from _walk_global_ops(co)
    if co.co_flags & inspect.CO_OPTIMIZED:
        return  # a function body: no LOAD_NAME
    loads, stores = [], set()
    for ins in dis.get_instructions(co):
        if ins.opcode == _LOAD_NAME:
            loads.append(ins.argval)
        elif ins.opcode == _STORE_NAME:
            stores.add(ins.argval)
    yield from (name for name in dict.fromkeys(loads)
                if name not in stores and not (name.startswith("__") and name.endswith("__")))


_cp._walk_global_ops = _walk_global_and_class_body_ops


def register_user_module(module_name: Any) -> None:
    """A user module's code pickles by value (``cloudpickle.register_pickle_by_value``)."""
    if isinstance(module_name, str) and usercode.is_user_module(module_name):
        module = sys.modules[module_name]
        if not _cp._is_registered_pickle_by_value(module):
            cloudpickle.register_pickle_by_value(module)


def class_own_file(cls: type) -> str | None:
    """The file a class's own methods were compiled from (its source is there)."""
    for value in vars(cls).values():
        func = getattr(value, "__func__", value)  # classmethod / staticmethod
        func = getattr(func, "fget", func)  # property
        code = getattr(func, "__code__", None)
        own = str(getattr(func, "__qualname__", "")).startswith(cls.__qualname__ + ".")
        if code is not None and own and code.co_filename != "<string>":  # dataclass-made: <string>
            return str(code.co_filename)
    return None


def class_source_file(cls: type) -> str | None:
    """Where a class's source is on this side: its methods' file, else its module's (a
    Signature or a plain class has no methods)."""
    own = class_own_file(cls)
    if own is not None:
        return own
    file = getattr(sys.modules.get(cls.__module__), "__file__", None)
    return file if isinstance(file, str) else None


def source_lines(filename: str | None) -> list[str] | None:
    """linecache's lines of a by-value object's file, or None (no file, a library's, too big)."""
    if not filename:
        return None
    if not filename.startswith("<"):
        if usercode.is_installed_file(filename):
            return None  # a library's dynamically made function: its source is the library's, not needed
        linecache.checkcache(filename)  # an edited file: its new text
    lines = linecache.getlines(filename)
    if not lines or sum(map(len, lines)) > MAX_SOURCE_FILE:
        return None
    return lines


def _note_code(obj: Any, sources: dict[str, str], budget: list[int]) -> None:
    """Register ``obj``'s module for by-value pickling if it is user code; keep its source."""
    register_user_module(getattr(obj, "__module__", None))
    try:
        if _cp._should_pickle_by_reference(obj):
            return
    except Exception:  # noqa: BLE001 - an odd __module__: cloudpickle decides (and fails) itself
        return
    if isinstance(obj, types.FunctionType):
        _note_file(obj.__code__.co_filename, sources, budget)
    else:
        _note_file(getattr(sys.modules.get(obj.__module__), "__file__", None), sources, budget)


def _note_module(module: types.ModuleType, sources: dict[str, str], budget: list[int]) -> None:
    """A user module referenced as a module (``import helpers`` ... ``helpers.normalize(x)``)
    goes by value too (cloudpickle would import it by name on the other side)."""
    if usercode.is_user_module(module.__name__):
        register_user_module(module.__name__)
        _note_file(getattr(module, "__file__", None), sources, budget)


def _note_file(filename: Any, sources: dict[str, str], budget: list[int]) -> None:
    if not isinstance(filename, str) or filename in sources:
        return
    lines = source_lines(filename)
    text = "".join(lines or ())
    if not text or len(text) > budget[0]:
        return
    budget[0] -= len(text)
    sources[filename] = text


class SourcePickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle that notes the source file of every function and class it pickles by value;
    exceptions keep their ``__cause__``/``__context__`` chain (``chain_links`` of them at most)."""

    def __init__(self, file: io.BytesIO, sources: dict[str, str], chain_links: int = MAX_CHAIN_LINKS) -> None:
        reducers.register_library_reducers()
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.sources = sources
        self._budget = [MAX_SOURCES]
        self._chain_links = chain_links

    def _exception(self, obj: BaseException) -> Any:
        cls = type(obj)
        if cls.__module__ != "builtins" and cls.__reduce__ is BaseException.__reduce__:
            # the default reduce calls cls(*args) on load, which fails for exceptions whose
            # __init__ takes other arguments (dspy's AdapterParseError): rebuild from state
            reduced: tuple[Any, ...] = (exception_from_state, (cls, obj.args, {**vars(obj), **slot_values(obj)}))
        else:
            reduced = NotImplemented
        chain: dict[str, Any] = {}
        if self._chain_links > 0 and cls.__setstate__ is BaseException.__setstate__:
            if obj.__cause__ is not None:
                chain["__cause__"] = obj.__cause__
            if obj.__context__ is not None:
                chain["__context__"] = obj.__context__
            if obj.__suppress_context__:
                chain["__suppress_context__"] = True
        if chain:
            self._chain_links -= 1
        if isinstance(obj, (AttributeError, NameError)) and obj.name is not None \
                and cls.__setstate__ is BaseException.__setstate__:
            chain["name"] = obj.name  # the name looked up: no argument, and Python's own reduce leaves it out
        if not chain:
            return reduced
        if reduced is NotImplemented:
            default = obj.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
            if not (isinstance(default, tuple) and 2 <= len(default) <= 3):
                return NotImplemented
            reduced = default
        state = reduced[2] if len(reduced) == 3 and reduced[2] is not None else {}
        if not isinstance(state, dict):
            return reduced
        # applied by BaseException.__setstate__ once the exception exists: a cycle in the chain is
        # pickle's memo, not a recursion
        return reduced[0], reduced[1], {**state, **chain}

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, BaseException):
            reduced = self._exception(obj)
            if reduced is not NotImplemented:
                return reduced
        if type(obj) is reducers.LRU_WRAPPER and isinstance(getattr(obj, "__wrapped__", None), types.FunctionType):
            register_user_module(getattr(obj.__wrapped__, "__module__", None))
            reduced = reducers.lru_reduced(obj)
            if reduced is not NotImplemented:
                return reduced
        if type(obj) in reducers.QUEUES:
            return reducers.queue_reduced(obj)
        if type(obj) in reducers.WEAK_CONTAINERS:
            return reducers.weak_reduced(obj)
        if type(obj) is typing.NewType and (obj.__module__ == "__main__" or usercode.is_user_module(obj.__module__)):
            return reducers.newtype_reduced(obj)
        if isinstance(obj, type):
            parametrized = reducers.parametrized_model(obj)
            if parametrized is not None:
                return parametrized
            _note_code(obj, self.sources, self._budget)
            return _class_reduced(obj, super().reducer_override(obj))
        if isinstance(obj, types.FunctionType):
            if obj.__code__ is reducers.SINGLEDISPATCH_CODE:
                return reducers.singledispatch_reduced(obj)
            _note_code(obj, self.sources, self._budget)
            cells = reducers.closure_cells(obj)
            if cells is not obj.__closure__:
                reduced = super().reducer_override(obj)
                if isinstance(reduced, tuple) and len(reduced) > 2 and isinstance(reduced[2], tuple):
                    reduced[2][1]["__closure__"] = cells  # cloudpickle's (state, slotstate) of a function
                return reduced
        elif isinstance(obj, types.ModuleType):
            _note_module(obj, self.sources, self._budget)
        elif isinstance(obj, types.CodeType):
            # cloudpickle writes "<dynamic-code>" as the file name; keep the real one, so that
            # inspect.getsource (with the sources registered in linecache) and tracebacks work
            make, args = _cp._code_reduce(obj)
            return make, tuple(obj.co_filename if a == _DYNAMIC else a for a in args)
        return super().reducer_override(obj)


def class_state(cls: type, clsdict: dict[str, Any]) -> dict[str, Any]:
    """cloudpickle's state of a class by value, as it was defined in a function: with its
    ``__qualname__`` (cloudpickle rebuilds a class under its bare name), and a complete Pydantic
    model (DSPy Signatures too) without the defining function's locals that Pydantic keeps for
    forward references (``__pydantic_parent_namespace__``: a script's client and session, a lock)."""
    if cls.__qualname__ == cls.__name__ and "__pydantic_parent_namespace__" not in clsdict:
        return clsdict
    clsdict = dict(clsdict)
    if cls.__qualname__ != cls.__name__:
        clsdict["__qualname__"] = cls.__qualname__
    if clsdict.get("__pydantic_parent_namespace__") is not None and clsdict.get("__pydantic_complete__") is True:
        clsdict["__pydantic_parent_namespace__"] = None
    return clsdict


def skeleton_args(cls: type, make: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """cloudpickle's arguments to ``make`` ``cls``, with its own ``__slots__`` among the type's keywords.

    cloudpickle sets ``__slots__`` with the rest of the class's state, once the class exists: too
    late to lay its slots out, so the copy's instances had a ``__dict__`` (``obj.typo = 1`` worked
    where in-process it is an ``AttributeError``) and the slots' descriptors were gone."""
    slots = cls.__dict__.get("__slots__")
    # (typing.NamedTuple makes its class's slots itself, and refuses them in the class body)
    if make is not _cp._make_skeleton_class or slots is None or typing.NamedTuple in args[2]:
        return args
    return (*args[:3], {**args[3], "__slots__": slots}, *args[4:])


def _class_reduced(cls: type, reduced: Any) -> Any:
    """cloudpickle's reduction of a class by value with :func:`class_state` and :func:`skeleton_args`."""
    if not isinstance(reduced, tuple) or len(reduced) < 3:
        return reduced
    state = reduced[2]
    if not (isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict)):
        return reduced
    return (reduced[0], skeleton_args(cls, reduced[0], reduced[1]), (class_state(cls, state[0]), state[1]),
            *reduced[3:])


def dumps(obj: Any, *, chain_links: int = MAX_CHAIN_LINKS) -> tuple[bytes, dict[str, str]]:
    """(pickle bytes, {filename: source text}) of ``obj``; raises what pickling raises."""
    buf = io.BytesIO()
    sources: dict[str, str] = {}
    SourcePickler(buf, sources, chain_links).dump(obj)
    return buf.getvalue(), sources


def exception_from_state(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    """Rebuild an exception without calling its ``__init__`` (see ``SourcePickler``); ``state``:
    its ``__dict__`` and the values of its ``__slots__``."""
    exc = cls.__new__(cls, *args)
    exc.args = args
    slots = _slot_names(cls)
    for name, value in state.items():
        if name in slots:
            setattr(exc, name, value)
        else:
            exc.__dict__[name] = value
    return exc


def _slot_names(cls: type) -> set[str]:
    """The names of the ``__slots__`` of ``cls`` and its bases (not ``__dict__``, ``__weakref__``)."""
    names: set[str] = set()
    for base in cls.__mro__:
        declared = vars(base).get("__slots__", ())
        names.update((declared,) if isinstance(declared, str) else declared)
    return names - {"__dict__", "__weakref__"}


def slot_values(obj: object) -> dict[str, Any]:
    """The values set in ``obj``'s ``__slots__``, which ``vars()`` lacks."""
    return {name: getattr(obj, name) for name in _slot_names(type(obj)) if hasattr(obj, name)}


def dumps_exception(exc: BaseException) -> bytes:
    """The exception alone by value (its chain travels beside it, see worker/remote_errors.py),
    loadable even when its ``__init__`` takes other arguments."""
    return dumps(exc, chain_links=0)[0]


def importable_name(obj: Any) -> str | None:
    """``"module:qualname"`` of a class or function the other side imports by name (the standard
    library's, installed packages'), None for the user's own code, which goes by value."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or module == "__main__" or usercode.is_user_module(module):
        return None
    try:
        if not _cp._should_pickle_by_reference(obj):
            return None
    except TypeError:  # not a class or function (a functools.partial...)
        return None
    return f"{module}:{qualname}"


def resolve_code(wire: Any) -> Any:
    """The class or function a ``code`` names (imported by name) or carried (already unpickled)."""
    return resolve_name(wire) if type(wire) is str else wire


def resolve_name(name: str) -> Any:
    """The object ``importable_name`` named (its module imported as pickle would)."""
    module_name, _, qualname = name.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f"{module_name} has no {qualname} here (another version?)") from None
    return obj



LineCacheEntry = tuple[int, None, list[str], str]


def register_sources(sources: dict[str, str]) -> dict[str, LineCacheEntry]:
    """Make ``inspect.getsource`` find code that arrived by value (linecache, like IPython);
    returns the entries made (a session's code store keeps them to put back after a move)."""
    made: dict[str, LineCacheEntry] = {}
    for filename, text in sources.items():
        if not isinstance(filename, str) or not isinstance(text, str):
            continue
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        # mtime None: linecache.checkcache never drops the entry (there may be no such file here)
        made[filename] = linecache.cache[filename] = (len(text), None, lines, filename)
    return made


class _Unpickler(pickle.Unpickler):
    """``pickle.loads`` that never rewrites a class this process already has.

    A class that goes by value and comes back (a client's dataclass in a result) is found again
    by cloudpickle's class tracker, which then sets the arriving class dict on it: the client's own
    methods would be replaced by copies whose ``__globals__`` are not their module's. Here a
    tracked class keeps its own dict.
    """

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self._found: set[int] = set()
        # what a failure names when its traceback does not: the last class found by value (the
        # user's own), else by reference
        self.last_class: type | None = None
        self.last_own_class: type | None = None

    def find_class(self, module: str, name: str) -> Any:
        if module == "cloudpickle.cloudpickle":
            if name == "_make_skeleton_class":
                return self._tracked(_cp._make_skeleton_class, 4)
            if name == "_make_skeleton_enum":
                return self._tracked(_cp._make_skeleton_enum, 5)
            if name == "_class_setstate":
                return self._class_setstate
        found = super().find_class(module, name)
        if isinstance(found, type) and module not in _MACHINERY and not module.startswith("cloudpickle"):
            self.last_class = found
        return found

    def _tracked(self, make: Any, tracker_at: int) -> Any:
        def skeleton(*args: Any) -> Any:
            tracker = args[tracker_at] if len(args) > tracker_at else None
            found = _cp._DYNAMIC_CLASS_TRACKER_BY_ID.get(tracker) if tracker is not None else None
            if found is not None:
                self._found.add(id(found))
            made = self.last_own_class = found if found is not None else make(*args)
            return made

        return skeleton

    def _class_setstate(self, cls: type, state: Any) -> Any:
        if id(cls) in self._found:
            return cls
        return _cp._class_setstate(cls, state)


_MACHINERY = frozenset({"builtins", "copyreg", "copy", "functools", "types", "_codecs"})  # no class of the user's


class LoadFailed(Exception):
    """A pickle did not load: ``error`` is why, ``type_name`` the last class it found ("": none)."""

    def __init__(self, error: BaseException, type_name: str) -> None:
        super().__init__(f"{type_name or 'a by-value object'}: {type(error).__name__}: {error}")
        self.error, self.type_name = error, type_name


def loads(data: bytes, sources: dict[str, str]) -> Any:
    register_sources(sources)
    unpickler = _Unpickler(io.BytesIO(data))
    try:
        return unpickler.load()  # peers are authenticated; a client may exec code anyway
    except Exception as exc:
        cls = unpickler.last_own_class or unpickler.last_class
        raise LoadFailed(exc, f"{cls.__module__}.{cls.__qualname__}" if cls is not None else "") from exc
