"""Ref handles: small immutable values naming an object that lives on one worker.

A ref a session returned also reads like the object it names: ``prog(question=...)`` is one
``method __call__`` round trip, ``lm.model`` a ``getattr``, ``ref[key]`` a ``__getitem__``,
``ref.attr = v`` a ``setattr``. Names that clash with the ref's own fields (``id``, ``session``,
``pool``, ``worker``, ``type_name``, ``repr``) and its methods are reached with
``session.attr(ref, name)``. Equality and hash are by value (the six fields), never remote.
"""

from __future__ import annotations

import contextvars
import inspect
import sys
from collections.abc import Callable
from typing import Any

_FIELDS = ("id", "session", "pool", "worker", "type_name", "repr")
_OWN = frozenset((*_FIELDS, "_owner", "as_tuple", "bind", "unbound"))

# Set by codec.decode while it decodes one message: refs inside by-value objects (a closure that
# captured a ref, a pickled list of refs) resolve like the refs of the message itself.
resolver: contextvars.ContextVar[Callable[[Ref], Any] | None] = contextvars.ContextVar("dspex_ref_resolver",
                                                                                      default=None)


def _unpickle(*fields: str) -> Any:
    ref = Ref(*fields)
    resolve = resolver.get()
    return ref if resolve is None else resolve(ref)


class Ref:
    """A handle to a Python object held by a worker for one session.

    ``id`` is ≥128 bits of randomness (hex); ``session`` scopes it; ``worker`` is the incarnation
    id of the worker holding it. ``type_name`` and ``repr`` are informational.
    """

    __slots__ = (*_FIELDS, "_owner")
    __match_args__ = _FIELDS

    id: str
    session: str
    pool: str
    worker: str
    type_name: str
    repr: str

    def __init__(self, id: str, session: str, pool: str, worker: str, type_name: str,
                 repr: str = "", _owner: Any = None) -> None:
        for name, value in zip(_FIELDS, (id, session, pool, worker, type_name, repr)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_owner", _owner)

    # -- the value ------------------------------------------------------------------------
    def as_tuple(self) -> tuple[str, str, str, str, str, str]:
        return (self.id, self.session, self.pool, self.worker, self.type_name, self.repr)

    def __eq__(self, other: object) -> bool:
        return type(other) is Ref and self.as_tuple() == other.as_tuple()

    def __hash__(self) -> int:
        return hash(self.as_tuple())

    def __repr__(self) -> str:
        short = self.repr if len(self.repr) <= 60 else self.repr[:57] + "..."
        return f"<dspex.Ref {self.type_name} {self.id[:8]} on {self.pool}/{self.worker[:8]}: {short}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unpickle, self.as_tuple())  # the owner (a live session) never travels

    def __copy__(self) -> Ref:
        return self

    def __deepcopy__(self, memo: Any) -> Ref:
        return self

    def bind(self, owner: Any) -> Ref:
        """This ref as a handle that calls through ``owner`` (a Session or AsyncSession)."""
        return Ref(*self.as_tuple(), _owner=owner)

    def unbound(self) -> Ref:
        return self if self._owner is None else Ref(*self.as_tuple())

    # -- the handle -----------------------------------------------------------------------
    def _session(self, what: str) -> Any:
        owner = self._owner
        if owner is None:
            raise AttributeError(
                f"{what}: this ref is not bound to a session; use session.attr/method, or a ref a session returned")
        return owner

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN or name.startswith("__"):
            raise AttributeError(f"a Ref's own field {name!r} cannot be set")
        _sync(self._session(f"setting {name!r}").set_attr(self, name, value), f"await session.set_attr(ref, {name!r}, value)")

    def __getattr__(self, name: str) -> Any:
        # only names a Ref does not have itself reach here; protocols that probe for dunders
        # (copy, pickle, numpy, IPython's _repr_*_) must never cost a round trip
        if name.startswith(("__", "_repr_", "_ipython_")):
            raise AttributeError(name)
        owner = self._session(f"attribute {name!r}")
        if _is_method(self.type_name, name):
            return RemoteMethod(self, name, owner)
        return owner.attr(self, name)

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        return self._session("calling").method(self, "__call__", list(args), kwargs)

    def __iter__(self) -> Any:
        # without this, iter() would fall back to remote __getitem__(0), (1)... one round trip each
        raise TypeError("a Ref is not iterable here: stream it (session.stream_method(ref, '__iter__')) or "
                        "fetch it as data")

    def __getitem__(self, key: Any) -> Any:
        return self._session("item access").method(self, "__getitem__", [key], {})

    def __setitem__(self, key: Any, value: Any) -> None:
        _sync(self._session("item assignment").method(self, "__setitem__", [key, value], {}),
              'await session.method(ref, "__setitem__", [key, value])')


class RemoteMethod:
    """``ref.name`` when ``name`` is a method of the ref's class: calling it is one round trip."""

    __slots__ = ("_owner", "name", "ref")

    def __init__(self, ref: Ref, name: str, owner: Any) -> None:
        self.ref = ref
        self.name = name
        self._owner = owner

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        return self._owner.method(self.ref, self.name, list(args), kwargs)

    def __repr__(self) -> str:
        return f"<remote method {self.name} of {self.ref!r}>"


def _sync(result: Any, instead: str) -> None:
    """Assignments cannot be awaited: through an asyncio session they need the explicit call."""
    if inspect.iscoroutine(result):
        result.close()
        raise TypeError(f"assignment through an asyncio session's ref cannot be awaited: use {instead}")


def _find_class(type_name: str) -> type | None:
    """The class a worker's ``type_name`` names, among modules already imported here."""
    module_name, _, qualname = type_name.rpartition(".")
    if module_name in sys.modules:
        return _walk(sys.modules[module_name], qualname)
    # builtins and __main__ classes travel as their qualname alone (worker.refs.type_name): a
    # class of the user's script, sent by value, is found in this process's __main__
    for module in ("builtins", "__main__"):
        found = _walk(sys.modules.get(module), type_name)
        if found is not None:
            return found
    return None


def _walk(obj: Any, qualname: str) -> type | None:
    for part in qualname.split("."):
        if obj is None:
            return None
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None


def _is_method(type_name: str, name: str) -> bool:
    """True when the ref's class, found among modules already imported here, has a plain method
    ``name``: then ``ref.name(...)`` needs no ``getattr`` round trip first."""
    obj = _find_class(type_name)
    if obj is None:
        return False
    attr = inspect.getattr_static(obj, name, None)
    return inspect.isfunction(attr) or inspect.ismethoddescriptor(attr) and not inspect.isdatadescriptor(attr)
