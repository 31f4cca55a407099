"""Reductions of objects that plain pickling names by reference or cannot pickle, made again
where they arrive: a user function's ``functools.lru_cache`` / ``functools.cache`` wrapper and
``functools.singledispatch`` function (by-value code: the picklers of :mod:`dspex.wire.byvalue`,
:mod:`dspex.client.sessionpickle` and the worker's checkpoints call these), and library objects
that hold a thread and ``functools.cached_property`` (Python 3.11's holds a lock), made again, and
``dataclasses``' sentinels, by name (registered in ``copyreg``); a parametrized Pydantic generic model as its
parametrization; a user's ``typing.NewType`` from its parts; ``queue.Queue`` as a copy with new locks and weak containers as copies (the
by-value picklers only: pickle elsewhere in the process still refuses a queue). The ``make_*`` functions are named in pickles:
keep their names.
"""

from __future__ import annotations

import collections
import copyreg
import dataclasses
import functools
import operator
import queue
import sys
import types
import typing
import weakref
from typing import Any

from cloudpickle import cloudpickle as _cp


def register_library_reducers() -> None:
    """Library objects that hold a thread, made again from their arguments where they arrive:
    DSPy's ``Unbatchify`` (the batching thread of ``dspy.retrievers.Embeddings``, which DSPy's RAG
    tutorial builds at the top of the script). Registered in ``copyreg`` once DSPy loaded it, so
    every pickler of this process (a session's, a checkpoint's) uses it."""
    cls = getattr(sys.modules.get("dspy.utils.unbatchify"), "Unbatchify", None)
    if isinstance(cls, type) and cls not in copyreg.dispatch_table:
        copyreg.pickle(cls, _unbatchify_reduced)


def _unbatchify_reduced(obj: Any) -> Any:
    return type(obj), (obj.batch_fn, obj.max_batch_size, obj.max_wait_time)


def _dataclass_sentinel(name: str) -> Any:
    return lambda obj: name  # pickle's "a global of the object's module, by this name"


# A dataclass's fields hold ``dataclasses.MISSING`` where they have no default, and Pydantic (so a
# DSPy output field typed as the dataclass) and ``dataclasses.fields`` readers test ``is MISSING``:
# by name, as the module's singletons, not the copies plain pickling makes of a user's dataclass
# sent by value (registered in copyreg: every pickler of the process, checkpoints' included).
for _sentinel in ("MISSING", "_HAS_DEFAULT_FACTORY"):
    copyreg.pickle(type(getattr(dataclasses, _sentinel)), _dataclass_sentinel(_sentinel))


def _cached_property_reduced(prop: Any) -> Any:
    # Python 3.11's holds a lock, which cannot be pickled: made again (with a lock of its own), its
    # name and doc set back (a class's dict restored by pickling never calls ``__set_name__``)
    return functools.cached_property, (prop.func,), {k: v for k, v in vars(prop).items() if k != "lock"}


copyreg.pickle(functools.cached_property, _cached_property_reduced)  # a user class's @cached_property travels


def parametrized_model(cls: type) -> Any:
    """A parametrized Pydantic generic model (``Page[Item]``) as ``origin[args]``, made again by
    subscripting where it arrives: Pydantic caches one class per parametrization, so an instance
    is of the receiver's ``Page[Item]`` (``type(x) is Page[Item]``, as in-process); None for any
    other class (a subclass of one included: its own class)."""
    meta = cls.__dict__.get("__pydantic_generic_metadata__")
    if not isinstance(meta, dict) or meta.get("origin") is None or not meta.get("args"):
        return None
    return operator.getitem, (meta["origin"], tuple(meta["args"]))


# a queue's locks and conditions cannot be pickled; its items, size and count of unfinished tasks can
QUEUES = frozenset({queue.Queue, queue.LifoQueue, queue.PriorityQueue})


def queue_reduced(q: Any) -> Any:
    """A ``queue.Queue`` (``LifoQueue``, ``PriorityQueue``) as a copy with its own locks: its
    items (in their order), ``maxsize`` and unfinished-task count, and its instance attributes.
    DSPy's ``StreamListener`` holds one, so a ``dspy.streamify`` program built on the client
    travels."""
    with q.mutex:
        items = list(q.queue)
        unfinished = q.unfinished_tasks
    own = {k: v for k, v in vars(q).items() if k not in _QUEUE_PARTS}
    return make_queue, (type(q), q.maxsize, items, unfinished), own or None


_QUEUE_PARTS = frozenset(vars(queue.Queue()))


def make_queue(cls: Any, maxsize: int, items: list[Any], unfinished: int) -> Any:
    made = cls(maxsize)
    made.queue.extend(items)  # a PriorityQueue's list is a heap already: its order is kept
    made.unfinished_tasks = unfinished
    return made


def newtype_reduced(new_type: Any) -> Any:
    """A ``typing.NewType`` of the user's code made again from its parts: pickle names it by its
    module and name, which the receiver may not have (a session's module being given it)."""
    return make_newtype, (new_type.__qualname__, new_type.__supertype__, new_type.__module__)


def make_newtype(qualname: str, supertype: Any, module: str) -> Any:
    """The receiver's own ``NewType`` of that name where its module has it (the client's, for one
    a call returns), else a new one."""
    own = getattr(sys.modules.get(module), qualname, None)
    if type(own) is typing.NewType and own.__supertype__ is supertype:
        return own
    made = typing.NewType(qualname, supertype)  # type: ignore[misc]  # (a NewType made at run time)
    made.__module__ = module
    return made


# weak containers cannot be pickled (a weak reference cannot); what they hold while they are sent can
WEAK_CONTAINERS = frozenset({weakref.WeakValueDictionary, weakref.WeakKeyDictionary, weakref.WeakSet})


def weak_reduced(container: Any) -> Any:
    """A weak container of the user's code (a ``WeakValueDictionary`` cache at the top of a
    module) as a copy holding its live items weakly: an item nothing else holds where it arrives
    is gone from it there, as it would be here."""
    items = list(container) if type(container) is weakref.WeakSet else list(container.items())
    return make_weak, (type(container), items)


def make_weak(cls: Any, items: list[Any]) -> Any:
    return cls(items)


def closure_cells(func: types.FunctionType) -> tuple[types.CellType, ...] | None:
    """``func.__closure__`` to pickle: for ``dspy.streamify``'s inner ``_stream_program``, its
    listeners indexed by ``id(listener.predict)`` become a :class:`ListenerIndex`, which indexes
    them again by the ids of the predictors where the program arrives (the ids of this process
    would match no predictor there, and no chunk would stream)."""
    cells = func.__closure__
    if cells is None or func.__code__.co_name != "_stream_program" or \
            func.__module__ != "dspy.streaming.streamify" or "predict_id_to_listener" not in func.__code__.co_freevars:
        return cells
    at = func.__code__.co_freevars.index("predict_id_to_listener")
    try:
        index = cells[at].cell_contents
    except ValueError:
        return cells
    listeners = [listener for group in index.values() for listener in group]
    return (*cells[:at], types.CellType(ListenerIndex(listeners)), *cells[at + 1:])


class ListenerIndex:
    """``dspy.streamify``'s listeners by predictor, made again where it arrives (:func:`closure_cells`)."""

    __slots__ = ("listeners",)

    def __init__(self, listeners: list[Any]) -> None:
        self.listeners = listeners

    def __reduce__(self) -> Any:
        return make_listener_index, (self.listeners,)


def make_listener_index(listeners: list[Any]) -> Any:
    index: collections.defaultdict[int, list[Any]] = collections.defaultdict(list)
    for listener in listeners:
        index[id(listener.predict)].append(listener)
    return index


LRU_WRAPPER = type(functools.lru_cache(lambda: None))


def lru_reduced(wrapper: Any) -> Any:
    """A ``functools.lru_cache`` / ``functools.cache`` wrapper of by-value code: made again on the
    other side around the function sent by value (pickle would name the wrapper by module and
    qualname, which the other side cannot import). Its cache starts empty there; within a
    session the wrapper is sent once, so its cache lives across calls."""
    func = wrapper.__wrapped__
    try:
        if _cp._should_pickle_by_reference(func):
            return NotImplemented
    except Exception:  # noqa: BLE001 - an odd __module__: cloudpickle decides (and fails) itself
        return NotImplemented
    params = wrapper.cache_parameters()
    return make_lru_cache, (func, params["maxsize"], params["typed"]), dict(vars(wrapper))


def make_lru_cache(func: Any, maxsize: int | None, typed: bool) -> Any:
    return functools.lru_cache(maxsize=maxsize, typed=typed)(func)


SINGLEDISPATCH_CODE: types.CodeType = getattr(functools.singledispatch(lambda x: x), "__code__")  # noqa: B009 - a function at run time


def singledispatch_reduced(wrapper: Any) -> Any:
    """A ``functools.singledispatch`` function of by-value code: made again around the function
    and its registered implementations (its closure holds a weak-keyed dispatch cache, which
    cannot be pickled)."""
    impls = [(cls, impl) for cls, impl in wrapper.registry.items() if cls is not object]
    return make_singledispatch, (wrapper.__wrapped__, impls)


def make_singledispatch(func: Any, impls: list[tuple[type, Any]]) -> Any:
    made = functools.singledispatch(func)
    for cls, impl in impls:
        made.register(cls, impl)
    return made
