"""The module globals one request of a session binds on the worker (``Message.globals``;
dspex/client/sessionpickle.py), as ``(namespace, name, key, value)``, only where the session lacks
them or the client bound another object since; a value goes by reference where the worker can
import it, else once per session by the client object's identity."""

from __future__ import annotations

import contextvars
import sys
import types
from collections.abc import Callable
from typing import Any

from dspex.client import codeindex
from dspex.client.sendcache import SendCache, Walk
from dspex.wire import codestore

_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes})
# a module's globals that are the import system's (the worker makes its own) or go with the module
# itself: its other dunders (``__version__``, ``__all__``, a PEP 562 ``__getattr__``) are the module's
_LEFT_OUT = "x:"  # the key prefix of a global left out (codestore.Unsent)
_IMPORT_SYSTEM = frozenset({"__builtins__", "__loader__", "__spec__", "__cached__", *codestore.BASE_GLOBALS})


class BindingKey:
    """The key of a binding's value as a request carries it: the worker loads it before the value
    and so knows which global it is rebuilding (an error unpickling the value names it)."""

    __slots__ = ("key", "name", "nsid")

    def __init__(self, nsid: str, name: str, key: str) -> None:
        self.nsid, self.name, self.key = nsid, name, key


Binding = tuple[str, str, BindingKey, Any]  # (namespace id, name, key of the value, value or its stand-in)


class _Value:
    """A value sent once per session, by the client object's identity."""

    __slots__ = ("key", "obj")

    def __init__(self, key: str, obj: Any) -> None:
        self.key, self.obj = key, obj


class _Attribute:
    """A global that is an attribute of a module the worker imports: by reference."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name


class Bindings:
    """The bindings of one request (``bindings``: (namespace, name) -> (value, key)), the objects
    its walks reached and the walks it remembers for the session; keys come from the message's
    ``key`` and a function's namespace id from its ``namespace``."""

    def __init__(self, cache: SendCache, *, trusted: bool, key: Callable[[Any], str],
                 namespace: Callable[[dict[str, Any]], tuple[str, dict[str, Any] | None]]) -> None:
        self.cache, self.trusted = cache, trusted
        self._key, self._namespace = key, namespace
        self.bindings: dict[tuple[str, str], tuple[Any, str]] = {}
        self.walked: dict[int, Any] = {}
        self.walks: dict[int, Walk] = {}
        self.relied = False  # a global was left out because the session holds it (Message.relies)
        # what a module walk alone reached (a module goes whole, used or not): a global among them
        # that cannot be pickled is left out (SendCache.left_out) instead of failing the request
        self.incidental: set[int] = set()  # ids of the objects walked
        self.needed: set[tuple[str, str]] = set()  # the bindings some other path reached
        self.cells_rebound: list[tuple[types.CellType, Any]] = []  # (held cell, the new value it sends)

    def walk(self, root: Any) -> list[Binding]:
        """The bindings to send for ``root`` (a by-value function, class or user module): the
        globals it reads and those of every by-value function and class it reaches, where the
        session lacks them or the client bound another object since. Each object is walked once
        per request. A walk remembers every global it read (and the size of each user module it
        walked, the closure cells it followed): while each still holds what the session has bound
        there, the next request of ``root`` checks only those."""
        if self.unchanged(root):
            return []
        out: list[Binding] = []
        memo = Walk(root)
        reads, reached = memo.reads, memo.reached
        complete = True  # every object it reaches was walked by this walk (not earlier in the request)
        # (a function pickled because a module walk reached it is walked again as a root: as incidental)
        todo: list[tuple[Any, bool]] = [(root, id(root) in self.incidental)]
        while todo:
            obj, incidental = todo.pop()
            if id(obj) in reached or id(obj) in self.walked:
                if incidental or id(obj) not in self.incidental:
                    complete = complete and id(obj) in reached
                    continue
                self.incidental.discard(id(obj))  # needed after all: its globals are too
            elif incidental:
                self.incidental.add(id(obj))
            self.walked[id(obj)] = reached[id(obj)] = obj
            if type(obj) is types.ModuleType:
                nsid = "m:" + obj.__name__
                g = vars(obj)
                memo.sizes.append((g, len(g)))  # a name added or deleted: walked again
                for name, value in list(g.items()):
                    if name not in _IMPORT_SYSTEM:
                        reads.append((g, name, (nsid, name)))
                        self.bind(out, todo, nsid, name, value, True)
                continue
            if isinstance(obj, type):
                functions = codeindex.functions_of(obj)
                todo.extend((c, incidental) for c in (*obj.__bases__, *vars(obj).values())
                            if isinstance(c, type) and codeindex.by_value(c))
            else:
                functions = [obj]
            for func in functions:
                g = func.__globals__
                nsid = self._namespace(g)[0]
                if nsid.startswith("lib:"):
                    continue
                self._code_of(out, func, memo)
                for name in (*codeindex.globals_read(func.__code__), *codeindex.annotation_names(func)):
                    reads.append((g, name, (nsid, name)))
                    if name in g:
                        self.bind(out, todo, nsid, name, g[name], incidental)
                # types named in strings: DSPy's custom types in a string signature, deferred annotations
                for name in (*codeindex.signature_type_names(func.__code__),
                             *codeindex.deferred_annotation_names(func.__code__)):
                    if codeindex.names_a_type(g.get(name)):
                        reads.append((g, name, (nsid, name)))
                        self.bind(out, todo, nsid, name, g[name], incidental)
                for module in codeindex.user_modules_imported(func.__code__, g):
                    # an import in the body finds the session's module (codestore.CodeStore.importer)
                    reads.append((sys.modules, module.__name__, (codestore.IMPORTED, module.__name__)))
                    self.bind(out, todo, codestore.IMPORTED, module.__name__, module, incidental)
                for at, cell in enumerate(func.__closure__ or ()):
                    try:
                        value = cell.cell_contents
                    except ValueError:
                        continue
                    memo.cells.append((cell, value))
                    if self.trusted and self.cache.held.cells:
                        self._cell_rebound(out, func, at, cell, value)
                    if isinstance(value, (types.FunctionType, type)) and codeindex.by_value(value):
                        todo.append((value, incidental))
        if self.trusted and complete:
            self.walks[id(root)] = memo
        return out

    def unchanged(self, root: Any) -> bool:
        """The walk of ``root`` this request would make binds nothing: the session's last walk of
        it is remembered, every global it read still holds what the session has bound there, and
        its modules and closure cells are as they were (what it reached counts as walked by this
        request)."""
        if not self.trusted or id(root) in self.walked:
            return False
        memo = self.cache.walks.get(id(root))
        if memo is None or memo.root is not root:
            return False
        bound, unconfirmed = self.cache.globals.bound, self.cache.globals.unconfirmed
        if unconfirmed and any(where in unconfirmed for _, _, where in memo.reads):
            return False  # walked again: those bindings go again (bind)
        for g, name, where in memo.reads:
            entry = bound.get(where)
            value = g.get(name, codeindex.ABSENT)
            if (value is not codeindex.ABSENT) if entry is None else (entry[0] is not value):
                return False
        if not all(len(g) == n for g, n in memo.sizes):
            return False
        for cell, value in memo.cells:
            try:
                if cell.cell_contents is not value:
                    return False
            except ValueError:  # emptied since
                return False
        if any(func.__code__ is not code for func, code in memo.codes):
            return False
        self.walked.update(memo.reached)
        self.relied = True
        return True

    def bind(self, out: list[Binding], todo: list[tuple[Any, bool]], nsid: str, name: str, value: Any,
             incidental: bool = False) -> None:
        where = (nsid, name)
        if not incidental:
            self.needed.add(where)
        left_out = self.cache.left_out.get(where)
        unsent = left_out is not None and left_out[0] is value
        entry = self.bindings.get(where)
        again = False  # a binding the worker may lack yet (SendCache.commit): sent again, its value by key
        if entry is None and self.trusted:
            entry = self.cache.globals.bound.get(where)
            again = entry is not None and where in self.cache.globals.unconfirmed
        if unsent and not incidental and entry is not None and entry[1].startswith(_LEFT_OUT):
            entry = None  # needed now: sent, to fail naming it
        if entry is None or entry[0] is not value or again:
            if unsent and incidental:
                key, sent = _LEFT_OUT + self._key(value), codestore.Unsent(left_out[1])  # type: ignore[index]
            else:
                key, sent = self._bound_value(nsid, name, value)
            self.bindings[where] = (value, key)
            if entry is None or entry[1] != key or again:
                out.append((nsid, name, BindingKey(nsid, name, key), sent))
        elif where not in self.bindings:
            self.relied = True
        if (type(value) in (types.FunctionType, types.ModuleType) or isinstance(value, type)) and codeindex.by_value(value):
            todo.append((value, incidental))

    def _code_of(self, out: list[Binding], func: types.FunctionType, memo: Walk) -> None:
        """A function the session holds whose code was replaced in place since it was sent (IPython's
        ``%autoreload`` updates an edited module's functions so): its new code, bound under
        :data:`codestore.CODE_OF`, replaces the ``__code__`` of the session's function."""
        memo.codes.append((func, func.__code__))
        key = self.cache.held.lookup(func) if self.trusted else None
        if key is None:
            return
        entry = self.bindings.get((codestore.CODE_OF, key)) or self.cache.globals.bound.get((codestore.CODE_OF, key))
        sent = entry[0] if entry is not None else self.cache.held.codes.get(key)
        if sent is not None and func.__code__ is not sent and func.__code__.co_freevars == sent.co_freevars:
            self.bind(out, [], codestore.CODE_OF, key, func.__code__)

    def _cell_rebound(self, out: list[Binding], func: types.FunctionType, at: int, cell: types.CellType,
                      value: Any) -> None:
        """A closure cell of a function the session holds that the client rebound since it was
        sent (in-process the function sees the new value): the new value, bound under
        :data:`codestore.CELL_OF`, replaces the worker's cell's (every function of the session that
        shares the cell sees it, as in-process). A cell the client left alone keeps what the
        session's calls made of it."""
        held = self.cache.held.cells.held(cell, self.cache.held.sent)
        if held is None or held[2] is value or any(c is cell for c, _ in self.cells_rebound):
            return
        key = self.cache.held.lookup(func)
        if key is None:
            return
        self.cells_rebound.append((cell, value))
        sent = _Value(self._key(value), value) if codeindex.is_big(value) else value
        out.append((codestore.CELL_OF, key, BindingKey(codestore.CELL_OF, key, str(at)), sent))

    def own_name(self, nsid: str, obj: Any, bindings: list[Binding]) -> list[Binding]:
        """``bindings`` plus the module global that names ``obj`` where it was defined (a
        top-level ``def`` or ``class`` of a user module), so that code looking names up at run
        time (``globals()[name]``, DSPy's ``ToolCall.execute()``) finds every function and class
        of the module that reached the session, as in-process."""
        name = obj.__name__
        if not nsid.startswith("m:") or obj.__qualname__ != name:
            return bindings
        module = sys.modules.get(nsid[2:])
        if module is None or vars(module).get(name) is not obj or not codeindex.user_module(module):
            return bindings
        out = list(bindings)
        self.bind(out, [], nsid, name, obj)
        return out

    def _bound_value(self, nsid: str, name: str, value: Any) -> tuple[str, Any]:
        """(key, what to pickle) of a global's value."""
        t = type(value)
        if nsid == codestore.CODE_OF:
            return codeindex.code_key(value), value
        if t is types.ModuleType:
            return ("mod:" if codeindex.by_value(value) else "ref:") + value.__name__, value
        if t is types.FunctionType or isinstance(value, type):
            if codeindex.by_value(value):
                return self._key(value), value
            return f"ref:{getattr(value, '__module__', '')}:{getattr(value, '__qualname__', '')}", value
        if t not in _ATOMS:
            found = codeindex.imported_reference(nsid[2:] if nsid.startswith("m:") else None, name, value)
            if found is None and t is contextvars.ContextVar:
                # a library's variable (ALIAS = module.VAR) is the worker's own; only yours go by value
                found = codeindex.find_importable(value)
            if found is not None:
                return f"imp:{found[0]}:{found[1]}", _Attribute(*found)
        key = self._key(value)
        return key, _Value(key, value)
