"""Ref handles: small immutable values naming an object that lives on one worker.

A ref a session returned also reads like the object it names: ``prog(question=...)`` is one
``method __call__`` round trip, ``lm.model`` a ``getattr``, ``ref[key]`` a ``__getitem__``,
``ref.attr = v`` a ``setattr``. Names that clash with the ref's own fields (``id``, ``session``,
``pool``, ``worker``, ``type_name``, ``repr``) and its methods are reached with
``session.attr(ref, name)``. Equality and hash are by the object named (id and session), never remote.
"""

from __future__ import annotations

import contextvars
import inspect
import sys
import types
from collections.abc import Callable, Generator
from typing import Any

from dspex.wire import refprotocols
from dspex.wire.errors import (
    ConnectionError,
    EncodeError,
    RefNotFound,
    SessionClosed,
    SessionWorkerUnavailable,
)

EPHEMERAL_SESSION = "eph-"  # the session id prefix of a call outside any session (nothing is kept)
_FIELDS = ("id", "session", "pool", "worker", "type_name", "repr")
_OWN = frozenset((*_FIELDS, "_owner", "as_tuple", "bind"))

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

    # by the object named (its id in its session): two handles of one object are equal whatever
    # its repr became or which worker holds it now (a durable session's move), as `a is b` is
    def __eq__(self, other: object) -> bool:
        return type(other) is Ref and self.id == other.id and self.session == other.session

    def __hash__(self) -> int:
        return hash((self.id, self.session))

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

    # -- the handle -----------------------------------------------------------------------
    def _session(self, what: str, error: type[Exception] = AttributeError) -> Any:
        owner = self._owner
        if owner is None:
            if self.session.startswith(EPHEMERAL_SESSION):
                raise error(f"{what}: this ref came from a call outside any session (client.call), whose objects "
                            "the worker does not keep; make it in a session (session.call, session.run)")
            raise error(f"{what}: this ref is not bound to a session (one built by hand, or unpickled): bind it, "
                        "ref.bind(session), or use session.attr/method")
        return owner

    def _owner_now(self, what: str, instead: str) -> Any:
        """The owner, for what Python needs an answer to at once (``len``, ``in``, ``del``,
        ``with``): an asyncio session's ref cannot give one, so it raises before anything is sent."""
        return self._owner_of_kind(what, False, f"{what} on an asyncio session's ref cannot be awaited: use {instead}")

    def _owner_of_kind(self, what: str, awaitable: bool, wrong_kind: str) -> Any:
        """The owner, when its ops are awaitable or not as ``awaitable`` says; else a TypeError ``wrong_kind``."""
        owner = self._session(what, TypeError)
        if owner._ops_awaitable is not awaitable:
            raise TypeError(wrong_kind)
        return owner

    def _run_there(self, what: str, fn: str, *args: Any) -> Any:
        """``fn(*args)`` on the worker (``module.name``), the ref among ``args`` being its object
        there: Python's own protocol runs where the object is, reflected operands and all."""
        module, _, name = fn.rpartition(".")
        return self._session(what, TypeError).call(module, name, list(args))

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN or name.startswith("__"):
            raise AttributeError(f"{name!r} is the ref's own (its fields and dunder names are never forwarded): "
                                 f"the object's is set with session.set_attr(ref, {name!r}, value)")
        owner = self._session(f"setting {name!r}")
        if owner._ops_awaitable:
            raise TypeError(f"assignment through an asyncio session's ref cannot be awaited: use "
                            f"await session.set_attr(ref, {name!r}, value)")
        owner.set_attr(self, name, value)

    def __delattr__(self, name: str) -> None:
        if name in _OWN or name.startswith("__"):
            raise AttributeError(f"{name!r} is the ref's own (its fields and dunder names are never forwarded): "
                                 f"the object's is deleted with session.run(delattr, ref, {name!r})")
        self._owner_now(f"del ref.{name}", f"await session.run(delattr, ref, {name!r})").call(
            "builtins", "delattr", [self, name])

    def __getattr__(self, name: str) -> Any:
        # only names a Ref does not have itself reach here; protocols that probe for dunders
        # (copy, pickle, numpy, IPython's _repr_*_) must never cost a round trip
        if name.startswith(("__", "_repr_", "_ipython_")):
            raise AttributeError(name)
        owner = self._session(f"attribute {name!r}")
        method = _method_of(self.type_name, name)
        if owner._ops_awaitable:
            # nothing is sent until it is awaited or called
            return _remote_method_type(method, RemoteAttribute)(self, name, owner)
        if method is not None:
            return _remote_method_type(method, RemoteMethod)(self, name, owner)
        return owner.attr(self, name)

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        return self._session("calling").method(self, "__call__", list(args), kwargs)

    def __getitem__(self, key: Any) -> Any:
        return self._session("item access").method(self, "__getitem__", [key], {})

    def __setitem__(self, key: Any, value: Any) -> None:
        self._owner_now("item assignment", 'await session.method(ref, "__setitem__", [key, value])').method(
            self, "__setitem__", [key, value], {})

    def __delitem__(self, key: Any) -> None:
        self._owner_now("del ref[key]", "await session.run(operator.delitem, ref, key)").call(
            "operator", "delitem", [self, key])

    def __len__(self) -> int:
        owner = self._owner_now("len()", "await session.run(len, ref)")
        cls = _find_class(self.type_name)
        if cls is not None and not hasattr(cls, "__len__"):
            # known here to have none: list(gen_ref) asks len() first (a length hint), for nothing
            raise TypeError(f"object of type {cls.__name__!r} has no len()")
        return int(owner.call("builtins", "len", [self]))

    def __contains__(self, item: Any) -> bool:
        return bool(self._owner_now("in", "await session.run(operator.contains, ref, item)").call(
            "operator", "contains", [self, item]))

    def __bool__(self) -> bool:
        # a handle is true, as an object without __bool__/__len__ is (and a Ray ObjectRef): `if ref:`
        # and `ref or default` never cost a round trip; the object's own truth is s.run(bool, ref)
        return True

    def __iter__(self) -> Any:
        # in batches, each a call (dspex.wire.refprotocols): never a silent __getitem__(0), (1)...
        # loop, and never a stream holding the session while the loop's body calls it
        owner = self._owner_of_kind("iterating", False, "an asyncio session's ref is iterated with `async for`")
        return refprotocols.items(owner, self)

    def __next__(self) -> Any:
        # a ref to an iterator (a generator) is one, as the object is: an item per round trip
        owner = self._owner_now("next()", "await anext(ref)")
        item, more = refprotocols.taken_ahead(self) or owner.call(refprotocols.MODULE, "next_item", [self])
        if not more:
            raise StopIteration(item)
        return item

    async def __anext__(self) -> Any:
        owner = self._owner_of_kind("anext()", True, "a blocking session's ref takes its next item with next()")
        item, more = refprotocols.taken_ahead(self) or await owner.call(refprotocols.MODULE, "next_item", [self, True])
        if not more:
            raise StopAsyncIteration
        return item

    def __reversed__(self) -> Any:
        # else reversed() would run len() and __getitem__(n - 1), (n - 2)... a round trip each
        owner = self._owner_now("reversed()", "async for x in await session.call('builtins', 'reversed', [ref])")
        return refprotocols.items(owner, self, reverse=True)

    def __aiter__(self) -> Any:
        owner = self._owner_of_kind("iterating", True, "a blocking session's ref is iterated with `for`")
        return refprotocols.aitems(owner, self)

    def __enter__(self) -> Any:
        return self._owner_now("with", "async with").call(refprotocols.MODULE, "enter", [self, False])

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        owner = self._owner_now("with", "async with")
        try:
            return bool(owner.call(refprotocols.MODULE, "leave", [self, False, exc_type, exc]))
        except EncodeError:
            if exc is None:
                raise
        # an exception that cannot travel (it holds a lock...) must still reach __exit__, or a
        # transaction would commit: its type with its message, and the body's exception goes on
        return bool(owner.call(refprotocols.MODULE, "leave", [self, False, exc_type, refprotocols.stand_in(exc)]))

    def __aenter__(self) -> Any:
        owner = self._owner_of_kind("async with", True, "a blocking session's ref is entered with `with`")
        return owner.call(refprotocols.MODULE, "enter", [self, True])

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        owner = self._session("async with", TypeError)
        try:
            return bool(await owner.call(refprotocols.MODULE, "leave", [self, True, exc_type, exc]))
        except EncodeError:
            if exc is None:
                raise
        return bool(await owner.call(refprotocols.MODULE, "leave", [self, True, exc_type, refprotocols.stand_in(exc)]))

    def __str__(self) -> str:
        return self.__format__("")

    def __format__(self, spec: str) -> str:
        # print(prog) and f"{prog}" read like the object; the repr (local, never failing) where no
        # answer can come: a ref without a session, an asyncio session's, one whose session,
        # worker, object or connection is gone (a log line must not fail for that)
        owner = self._owner
        if owner is not None and not owner._ops_awaitable and not owner.closed:
            try:
                return str(owner.call("builtins", "format", [self, spec]))
            except (ConnectionError, RefNotFound, SessionClosed, SessionWorkerUnavailable):
                pass  # the object cannot be reached (its format raising is raised, as here)
        return format(self.__repr__(), spec)


def _operator(fn: str, reflected: bool) -> Callable[..., Any]:
    def op(self: Ref, other: Any, *modulo: Any) -> Any:  # pow(ref, exp, mod) gives a third
        if self._owner is None:
            return NotImplemented
        return self._run_there(fn, fn, *((other, self) if reflected else (self, other, *modulo)))
    return op


def _in_place(name: str) -> Callable[[Ref, Any], Any]:
    def op(self: Ref, other: Any) -> Any:
        # `ref += x` rebinds the name to what comes back: an awaitable could never be awaited there
        return self._owner_now(f"{name} (an in-place operator)", f"ref = await session.run(operator.{name}, ref, x)").call(
            "operator", name, [self, other])
    return op


def _unary(fn: str) -> Callable[..., Any]:
    def op(self: Ref, *ndigits: Any) -> Any:  # round(ref, n) gives one
        return self._run_there(fn, fn, self, *ndigits)
    return op


def _conversion(name: str) -> Callable[[Ref], Any]:
    def op(self: Ref) -> Any:
        # float(ref) must be a float at once: an awaitable cannot be one
        return self._owner_now(f"{name}()", f"await session.run({name}, ref)").call("builtins", name, [self])
    return op


# operators run on the worker as Python runs them there (reflected operands, NotImplemented and
# all); == and != stay a ref's value equality, so refs keep working as dict keys and set members
for _name in ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "pow", "lshift", "rshift", "and_",
              "xor", "or_"):
    _dunder = _name.rstrip("_")
    _fn = "builtins.pow" if _name == "pow" else f"operator.{_name}"  # operator.pow takes no modulus
    setattr(Ref, f"__{_dunder}__", _operator(_fn, False))
    setattr(Ref, f"__r{_dunder}__", _operator(_fn, True))
    setattr(Ref, f"__i{_dunder}__", _in_place(f"i{_name}"))
for _name, _reflected in (("divmod", False), ("rdivmod", True)):
    setattr(Ref, f"__{_name}__", _operator("builtins.divmod", _reflected))
for _name in ("lt", "le", "gt", "ge"):
    setattr(Ref, f"__{_name}__", _operator(f"operator.{_name}", False))
# these return what the object's method returns, so through an asyncio session they are
# awaitables, as operators are; float(), int(), complex() and bytes() must give their type at once
for _name, _fn in (("neg", "operator.neg"), ("pos", "operator.pos"), ("abs", "operator.abs"),
                   ("invert", "operator.invert"), ("round", "builtins.round"), ("trunc", "math.trunc"),
                   ("floor", "math.floor"), ("ceil", "math.ceil")):
    setattr(Ref, f"__{_name}__", _unary(_fn))
for _name in ("float", "int", "complex", "bytes"):
    setattr(Ref, f"__{_name}__", _conversion(_name))


class RemoteMethod:
    """``ref.name`` when ``name`` is a method of the ref's class: calling it is one round trip."""

    __slots__ = ("_owner", "name", "ref")

    def __init__(self, ref: Ref, name: str, owner: Any) -> None:
        self.ref = ref
        self.name = name
        self._owner = owner

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        return self._session(f"calling {self.name!r}").method(self.ref, self.name, list(args), kwargs)

    def _session(self, what: str) -> Any:
        return self._owner if self._owner is not None else self.ref._session(what, TypeError)

    def __repr__(self) -> str:
        return f"<remote method {self.name} of {self.ref!r}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # sent in a call (``s.run(prog.acall, ...)``, a partial of it), it is the bound method there;
        # unpickled on a client, the method of an unbound ref, as an unpickled ref is a value
        kind = RemoteAttribute if isinstance(self, RemoteAttribute) else RemoteMethod  # not the per-method subclass
        return (_unpickle_method, (kind, self.ref, self.name))


class RemoteAttribute(RemoteMethod):
    """``ref.name`` through an asyncio session: ``await ref.name`` reads the attribute (``getattr``),
    ``await ref.name(...)`` calls it (one ``method`` round trip, whatever the client knows of the
    object's class). Until then nothing is sent, so a name only probed (``hasattr``) costs nothing."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, Any]:
        return self._session(f"reading {self.name!r}").attr(self.ref, self.name).__await__()  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"<remote attribute {self.name} of {self.ref!r}>"


def _unpickle_method(kind: type[RemoteMethod], target: Any, name: str) -> Any:
    return kind(target, name, None) if isinstance(target, Ref) else getattr(target, name)


def _find_class(type_name: str) -> type | None:
    """The class a worker's ``type_name`` names, among modules already imported here."""
    module_name, _, qualname = type_name.rpartition(".")
    if module_name in sys.modules:
        return _walk(sys.modules[module_name], qualname)
    # builtins and __main__ classes travel as their qualname alone (worker.refs.type_name): a
    # class of the user's script, sent by value, is found in this process's __main__
    return _walk(sys.modules["builtins"], type_name) or _UNNAMED_BUILTINS.get(type_name) \
        or _walk(sys.modules.get("__main__"), type_name)


# builtin classes the builtins module does not name: generator, coroutine, function, method...
_UNNAMED_BUILTINS = {cls.__name__: cls for cls in vars(types).values()
                     if isinstance(cls, type) and cls.__module__ == "builtins"}


def _walk(obj: Any, qualname: str) -> type | None:
    for part in qualname.split("."):
        if obj is None:
            return None
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None


def _method_of(type_name: str, name: str) -> Any:
    """The plain method ``name`` of the ref's class, found among modules already imported here,
    else None: when there is one, ``ref.name(...)`` needs no ``getattr`` round trip first."""
    obj = _find_class(type_name)
    if obj is None:
        return None
    attr = inspect.getattr_static(obj, name, None)
    is_method = inspect.isfunction(attr) or inspect.ismethoddescriptor(attr) and not inspect.isdatadescriptor(attr)
    return attr if is_method else None


_method_types: dict[tuple[Callable[..., Any], type[RemoteMethod]], type[RemoteMethod]] = {}


def _remote_method_type(method: Any, base: type[RemoteMethod]) -> type[RemoteMethod]:
    """``base``, or for a method written in Python a subclass of it that reads like that method
    bound: its ``__name__``, ``__doc__``, ``inspect.signature`` and type hints (of the instance
    and of its ``__call__``, which is what ``dspy.Tool`` reads for a tool's name, description and
    argument schema), as ``obj.method`` does in-process."""
    if not inspect.isfunction(method):
        return base
    found = _method_types.get((method, base))
    if found is not None:
        return found
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError):
        return base

    def __call__(self: RemoteMethod, /, *args: Any, **kwargs: Any) -> Any:
        return RemoteMethod.__call__(self, *args, **kwargs)

    # the signature of the method as written (``self`` first), its annotations and, for the
    # globals its string annotations resolve in, the method itself
    __call__.__signature__ = signature  # type: ignore[attr-defined]
    __call__.__annotations__ = dict(method.__annotations__)
    __call__.__wrapped__ = method  # type: ignore[attr-defined]
    parameters = list(signature.parameters.values())
    if parameters and parameters[0].kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        parameters = parameters[1:]  # the instance, as binding drops it (``def m(*args)`` keeps its ``*args``)
    bound = signature.replace(parameters=parameters)
    found = type(base.__name__, (base,), {
        "__slots__": (), "__call__": __call__, "__name__": method.__name__, "__doc__": method.__doc__,
        "__signature__": bound})
    if len(_method_types) < 1024:
        _method_types[(method, base)] = found
    return found
