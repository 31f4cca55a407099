"""By-value classes on the worker: the client's source file of each (``inspect.getfile``,
``inspect.getsource``), and their rebuilding without running again the class-creation hooks
that ran on the client (:mod:`dspex.wire.codestore` rebuilds a session's classes, and
``worker/checkpoint_pickler.py`` a restored session's)."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from cloudpickle import cloudpickle as _cp

_CLASS_FILES: weakref.WeakKeyDictionary[type, str] = weakref.WeakKeyDictionary()


def register_class_file(cls: type, file: str) -> None:
    """A restored session's class (worker/checkpoint.py) names its client file again."""
    _CLASS_FILES[cls] = file


def class_file(cls: type) -> str | None:
    """The client's source file of a class that arrived by value (for ``inspect.getfile``)."""
    try:
        return _CLASS_FILES.get(cls)
    except TypeError:
        return None


@contextlib.contextmanager
def class_hooks_skipped(metaclass: type, bases: tuple[type, ...]) -> Iterator[None]:
    """Rebuilding a class that arrived by value does not run again the hooks of class creation
    that arrived by value too: the ``__init_subclass__`` of its bases, the ``__new__`` and
    ``__init__`` of its metaclass. They ran when the client defined the class, and what they did
    travels with the class's and the module's state (a registry in a module global, which is not
    even bound yet while the class is rebuilt). Libraries' hooks run; the patched ones are put
    back at once."""
    tracked = _cp._DYNAMIC_CLASS_TRACKER_BY_CLASS
    patched: list[tuple[type, str, Any]] = []

    def patch(owner: type, name: str, replacement: Any) -> None:
        own = vars(owner).get(name)
        if own is not None and owner in tracked:
            patched.append((owner, name, own))
            type.__setattr__(owner, name, replacement)

    # (``__orig_bases__``: a base may be ``typing.NamedTuple``, a function, or a generic alias)
    for base in dict.fromkeys(c for b in bases if isinstance(b, type) for c in b.__mro__):
        patch(base, "__init_subclass__", classmethod(_next_hook(base, "__init_subclass__")))
    for meta in metaclass.__mro__ if isinstance(metaclass, type) else ():
        patch(meta, "__new__", staticmethod(_next_new(meta)))
        patch(meta, "__init__", _next_hook(meta, "__init__"))
    try:
        yield
    finally:
        for owner, name, own in reversed(patched):
            type.__setattr__(owner, name, own)


def _next_hook(owner: type, name: str) -> Callable[..., None]:
    """The hook ``name`` of the class after ``owner`` in the MRO."""
    def skip(cls: type, *args: Any, **kwargs: Any) -> None:
        getattr(super(owner, cls), name)(*args, **kwargs)

    return skip


def _next_new(owner: type) -> Callable[..., Any]:
    """``__new__`` of the metaclass after ``owner`` (mypy wants a class statement's name as
    ``super``'s first argument)."""
    def skip(mcs: type, *args: Any, **kwargs: Any) -> Any:
        return super(owner, mcs).__new__(mcs, *args, **kwargs)  # type: ignore[arg-type]

    return skip
