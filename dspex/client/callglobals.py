"""A request's arguments that are globals of the client's code, or objects the session holds:
the session's own object, as in-process the module's one object or the configured one
(docs/remote-objects.md, *A session is your own Python, remembered*)."""

from __future__ import annotations

import functools
import types
from typing import Any

from dspex.client import codeindex
from dspex.client.bindings import _ATOMS, _Value
from dspex.client.sendcache import SendCache
from dspex.wire.ref import Ref

_DATA = frozenset({list, tuple, dict, set, frozenset})
_NOT_GLOBALS = frozenset({types.FunctionType, Ref})  # sent as they are


class ModuleGlobal:
    """An argument of a request that is a global of the client's code (or a method of one,
    ``attr``): on the worker, the session's global of that name (``dspex.client.sessionpickle.SessionPickler._binding``)."""

    __slots__ = ("attr", "module", "name", "obj")

    def __init__(self, module: str, name: str, obj: Any, attr: str | None = None) -> None:
        self.module, self.name, self.obj, self.attr = module, name, obj, attr


class PartialOfGlobals:
    """A ``functools.partial`` argument whose function or arguments are :class:`ModuleGlobal`
    (a partial cannot hold them: they are not callable); pickled as that partial."""

    __slots__ = ("args", "func", "keywords", "state")

    def __init__(self, func: Any, args: tuple[Any, ...], keywords: dict[str, Any], state: dict[str, Any] | None) -> None:
        self.func, self.args, self.keywords, self.state = func, args, keywords, state


def as_module_globals(cache: SendCache, op_args: tuple[str, ...], body: list[Any],
                      settings: dict[str, Any] | None = None) -> list[Any]:
    """``body`` of a worker op with each argument that is an object bound as a global of the
    client's code, or a method of one (at the top: the callable, an element of ``args``, a value
    of ``kwargs`` or ``namespace``, and the function and arguments of a ``functools.partial``
    there), wrapped as a :class:`ModuleGlobal`; one that is a value of the client's DSPy
    ``settings`` sent with the request (or of a list there: ``callbacks``), or that the session
    holds by identity already, as a value sent by identity. Data (lists, dicts, tuples, sets)
    stays an argument sent with each call, with its exact types."""
    out = list(body)
    # id -> object of the settings' values that go by identity, and of the items of their lists
    configured = {id(item): item for value in settings.values() for item in (
        value if type(value) in (list, tuple) else (value,)) if type(item) not in _ATOMS} if settings else {}

    def wrapped(value: Any) -> Any:
        t = type(value)
        if t in _ATOMS or t in _DATA or t in _NOT_GLOBALS or isinstance(value, type):
            return value
        if t is functools.partial:  # partial(ask, QA), partial(COUNTER.bump, by=2): the same rule inside
            func, args = wrapped(value.func), tuple(wrapped(v) for v in value.args)
            keywords = {k: wrapped(v) for k, v in value.keywords.items()}
            if func is value.func and all(a is b for a, b in zip(args, value.args)) and \
                    all(keywords[k] is v for k, v in value.keywords.items()):
                return value
            return PartialOfGlobals(func, args, keywords, value.__dict__ or None)
        if t is types.MethodType or t is types.BuiltinMethodType:  # COUNTER.bump, NOTES.append
            owner = value.__self__
            if owner is None or isinstance(owner, (types.ModuleType, type)):
                return value
            found = _global_of(cache, owner)
            return value if found is None else ModuleGlobal(found[0], found[1], owner, value.__name__)
        found = _global_of(cache, value)
        if found is not None:
            return ModuleGlobal(found[0], found[1], value)
        if configured.get(id(value)) is value or cache.held.lookup(value) is not None:
            return _Value("", value)  # keyed by identity as it is pickled (SessionPickler._value)
        return value

    for i, (name, value) in enumerate(zip(op_args, body)):
        if name in ("fn", "value"):
            out[i] = wrapped(value)
        elif name == "args" and type(value) in (list, tuple):
            items = [wrapped(v) for v in value]
            out[i] = items if any(a is not b for a, b in zip(items, value)) else value
        elif name in ("kwargs", "namespace") and type(value) is dict:
            items_d = {k: wrapped(v) for k, v in value.items()}
            out[i] = items_d if any(items_d[k] is not value[k] for k in value) else value
    return out


def _global_of(cache: SendCache, obj: Any) -> tuple[str, str] | None:
    """``(module, name)`` when ``obj`` is bound as a global of the client's code: of the
    script's ``__main__``, of the module it or its class names (a decorated function's wrapper
    names the function's), or of a module this session's code uses; looked up as they are now (a
    global rebound since is found under its new object)."""
    own = getattr(obj, "__module__", None)
    modules = ["__main__", getattr(type(obj), "__module__", ""), *([own] if isinstance(own, str) else []),
               *cache.globals.modules]
    for module_name in dict.fromkeys(modules):
        for name, value in codeindex.user_globals(module_name):
            if value is obj and not name.startswith("__"):
                return module_name, name
    return None

