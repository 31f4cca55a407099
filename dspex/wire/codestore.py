"""A session's by-value code on its worker, and the functions its pickles call to rebuild it.

A client sends a session's code and the values its functions read once, and names them by key
afterwards (:mod:`dspex.client.sessionpickle` writes those pickles, codec ext 25). On the worker each
session has a :class:`CodeStore`:

- ``objects``: what the client sent, by key: functions, classes and values by the client's
  object identity (the same client object is always the same worker object for this session),
  code objects by content hash (``c:<hash>``). A definition that arrives for a key the store
  already holds keeps the held object (a resend after a cache miss never replaces state);
- ``modules``: one module object per (session, user module): the ``__globals__`` of every
  function of that module. Module globals keep what calls did to them, as in-process;
- ``bound``: for each (namespace, name) the key of the value the client bound there last; a
  binding is applied only when its key differs, so the worker's own rebinding
  (``global x; x += 1``) stands until the client rebinds the name; and only when the request that
  carries it is no older than the one that bound the name (``stamps``: the client's key prefix and
  binding version its request stamps its bindings with, the session context's ``at``), so a
  request that reaches the worker after a later one of its client (two threads of the session)
  never binds an older value over a newer; between two clients of one session (a forked child)
  the one that arrives last wins;
- an ``__import__`` of the session's own (:meth:`CodeStore.importer`, in its modules' builtins):
  an ``import`` in a function of a user module gives the session's module of that name;
- ``sources``: the linecache entries of the session's source files (``inspect.getsource``);
- ``versions``: for each client of the session (its key prefix: a forked child, another session
  object on the same id, count their binding changes apart), the binding version of that client
  the store holds every binding up to (a ``hint`` session's other worker may have loaded later
  ones: :func:`check_held`).

The store holds only plain containers of the session's objects; namespaces are ``ModuleType``
objects kept out of ``sys.modules`` (two sessions never share one: the worker's entry under a user
module's name reads as the running call's session's copy, :data:`on_user_module`). The pickles refer to the
``_load_*`` functions below by name; they act on the store of the load under way
(:func:`loading`), and a key the store lacks raises :class:`dspex.wire.errors.CodeCacheMiss` before
anything runs.
"""

from __future__ import annotations

import builtins
import contextvars
import functools
import importlib
import importlib.util
import io
import linecache
import pickle
import sys
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cloudpickle import cloudpickle as _cp

from dspex.wire import classes
from dspex.wire.byvalue import LineCacheEntry, register_sources
from dspex.wire.clientfiles import client_spec
from dspex.wire.errors import CodeCacheMiss, DspexError, ProtocolError

# every session's modules on this worker, by id (worker/forking.py finds a session's code by them)
SESSION_MODULES: weakref.WeakValueDictionary[int, types.ModuleType] = weakref.WeakValueDictionary()
BASE_GLOBALS = ("__name__", "__package__", "__path__", "__file__", "__doc__")  # a user module's, from the client
PARENTS = "parents"  # in a submodule's base: its user packages' bases, outermost first
IMPORTED = "i:"  # the namespace of the user modules imported in function bodies (CodeStore.importer)
CODE_OF = "code:"  # (CODE_OF, a held function's key): the code that function has now on the client
CELL_OF = "cell:"  # (CELL_OF, a held function's key), key: a cell's index: the value the client rebound it to
# called with the name of each user module a session's store makes its copy of: the worker lets
# ``sys.modules[name]`` read as the running call's copy (worker/namespace.py, present_user_module)
on_user_module: list[Callable[[str], None]] = []


@dataclass
class CodeStore:
    """One session's by-value code and module state on this worker (see the module docstring)."""

    objects: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, types.ModuleType] = field(default_factory=dict)
    bound: dict[tuple[str, str], str] = field(default_factory=dict)
    stamps: dict[tuple[str, str], tuple[str, int] | None] = field(default_factory=dict)
    sources: dict[str, LineCacheEntry] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    unsent: dict[tuple[str, str], str] = field(default_factory=dict)  # (nsid, name) -> why the client left it out

    def inherit(self, client: str, lineage: list[tuple[str, int]]) -> None:
        """A forked child's count starts at its nearest ancestor's that the store knows, as far as
        that ancestor's fork (the child's bindings up to there are that ancestor's; counts go on
        through each fork, so a farther one's fork came at a lower version): ``lineage`` is
        (prefix, its version at the fork), nearest first."""
        if client in self.versions:
            return
        for prefix, at_fork in lineage:
            held = self.versions.get(prefix)
            if held is not None:
                self.versions[client] = min(held, at_fork)
                return

    def reached(self, client: str, relied: int, reaches: int) -> None:
        """A request of ``client`` that relied on its binding version ``relied`` and carried the
        changes up to ``reaches`` was loaded: the store holds every binding of that client up to
        ``reaches`` when it held those up to ``relied`` (a request that relied on nothing was not
        checked)."""
        held = self.versions.get(client, 0)
        if held >= relied and reaches > held:
            self.versions[client] = reaches

    def module(self, nsid: str, base: dict[str, Any] | None = None) -> types.ModuleType:
        """The session's module for namespace ``nsid`` (``m:<module name>`` or ``g:<key>``)."""
        module = self.modules.get(nsid)
        if module is None:
            name = str((base or {}).get("__name__") or nsid[2:])
            module = types.ModuleType(name)
            module.__dict__["__builtins__"] = self._builtins
            self.modules[nsid] = module
            SESSION_MODULES[id(module)] = module
            if nsid.startswith("m:"):
                for callback in on_user_module:
                    callback(nsid[2:])
        if base:
            g = module.__dict__
            for k in BASE_GLOBALS:
                if k in base and g.get(k) is None:  # a new module's __package__ and __doc__ are None
                    g[k] = base[k]
            # (a script's __main__ has none, as in-process)
            if g.get("__spec__") is None and isinstance(g.get("__file__"), str) and module.__name__ != "__main__":
                g["__spec__"] = client_spec(module.__name__, g["__file__"], g.get("__path__"))
            # as importing a submodule imports its packages, which hold it: ``files(__package__)``,
            # ``pkgutil.get_data`` find the package's spec in a call that sent only the submodule
            child = module
            for parent_base in reversed(base.get(PARENTS, ())):
                parent = self.module(f"m:{parent_base['__name__']}", parent_base)
                parent.__dict__.setdefault(child.__name__.rpartition(".")[2], child)
                child = parent
        return module

    @functools.cached_property
    def _builtins(self) -> dict[str, Any]:
        """The builtins of the session's modules: Python's, with an ``__import__`` that finds the
        session's own modules first (:meth:`importer`)."""
        return {**builtins.__dict__, "__import__": self.importer}

    def importer(self, name: str, globals: dict[str, Any] | None = None, locals: Any = None,
                 fromlist: Any = (), level: int = 0) -> types.ModuleType:
        """``__import__`` for the session's code: an ``import`` in a function of a user module
        (``from .sub import helpers``, ``import app.tools``) gives the session's module of that
        name, which the client sent with the function (bound under :data:`IMPORTED`), with its
        state; any other name is imported as usual."""
        absolute = name
        if level:
            try:
                absolute = importlib.util.resolve_name("." * level + name, package_of(globals or {}))
            except (ImportError, ValueError):
                absolute = ""
        modules = self.modules
        module = modules.get("m:" + absolute) if absolute else None
        if module is None:
            return builtins.__import__(name, globals, locals, fromlist, level)
        if fromlist:
            for item in fromlist:
                sub = modules.get(f"m:{absolute}.{item}")
                if sub is not None and not hasattr(module, item):
                    setattr(module, item, sub)
            return module
        if level:
            return module
        return modules.get("m:" + absolute.partition(".")[0]) or \
            builtins.__import__(name, globals, locals, fromlist, level)

    def activate_sources(self) -> None:
        """Put this session's source files back in linecache where another session's version of
        the same file name replaced them."""
        for filename, entry in self.sources.items():
            if linecache.cache.get(filename) is not entry:
                linecache.cache[filename] = entry

    def drop(self, keys: list[Any]) -> None:
        """The client forgot these keys (its cache bound): so does the worker."""
        for key in keys:
            if isinstance(key, str):
                self.objects.pop(key, None)

    def release(self) -> None:
        """The session ended: its source files leave linecache unless another session's replaced them."""
        for filename, entry in self.sources.items():
            if linecache.cache.get(filename) is entry:
                del linecache.cache[filename]
        self.sources.clear()


def package_of(g: dict[str, Any]) -> str:
    """The package a relative import in code with globals ``g`` is relative to (as Python's)."""
    package = g.get("__package__")
    if package is None:
        package = str(g.get("__name__", ""))
        if "__path__" not in g:
            package = package.rpartition(".")[0]
    return str(package)


class Unsent:
    """What a binding carries for a global of a module sent whole that cannot be pickled and that
    no code of the request reads but through the module: it stays unbound, and ``why`` (the
    ``EncodeError`` sending it would be) notes the error of code that reads it."""

    def __init__(self, why: str) -> None:
        self.why = why


class _Load:
    """One decode of a request of a session: its store, the client that sent it (its key
    prefix), what its bindings are stamped with, the objects this load made and the module
    globals it is rebuilding."""

    __slots__ = ("client", "ephemeral", "fresh", "rebuilding", "stamp", "store")

    def __init__(self, store: CodeStore, ephemeral: bool, client: str, at: int) -> None:
        self.store = store
        self.fresh: set[int] = set()  # ids of objects made by this load (their state is set once)
        self.ephemeral = ephemeral
        self.client = client
        self.stamp = (client, at) if at else None
        # (namespace, name) of the bindings whose key was loaded and that are not bound yet: the
        # last is the global whose value is being unpickled (a failure there names it, loads)
        self.rebuilding: list[tuple[str, str]] = []

    def held(self, key: str) -> Any:
        try:
            return self.store.objects[key]
        except KeyError:
            raise CodeCacheMiss(
                "this worker does not hold the session's code or values the request refers to "
                f"({key!r}); nothing ran: the client sends it again in full",
                key=key, ephemeral=self.ephemeral, version=self.store.versions.get(self.client, 0)) from None

    def bind(self, bindings: list[tuple[str, str, str, Any]] | None) -> None:
        if not bindings:
            return
        del self.rebuilding[-len(bindings):]
        bound, stamps, stamp = self.store.bound, self.store.stamps, self.stamp
        for nsid, name, key, value in bindings:
            if nsid == CELL_OF:  # a client's rebinding of a cell: no state of the store's
                if isinstance(func := self.store.objects.get(name), types.FunctionType) and func.__closure__:
                    func.__closure__[int(key)].cell_contents = value
                continue
            where = (nsid, name)
            prior = stamps.get(where)
            if bound.get(where) == key or (stamp and prior and prior[0] == stamp[0] and prior[1] > stamp[1]):
                continue  # held already, or an older request of the client that bound it last
            if nsid == CODE_OF:
                func = self.store.objects.get(name)
                if isinstance(func, types.FunctionType):  # (forgotten here, it comes in full, with this code)
                    func.__code__ = value
            elif type(value) is Unsent:
                self.store.module(nsid).__dict__.pop(name, None)
                self.store.unsent[where] = value.why
            else:
                self.store.module(nsid).__dict__[name] = value
                self.store.unsent.pop(where, None)
            bound[where] = key
            stamps[where] = stamp


_load: contextvars.ContextVar[_Load | None] = contextvars.ContextVar("dspex_code_load", default=None)


class loading:
    """``with loading(store, ephemeral, client, at):`` session pickles decoded in the block use
    ``store``; they come from ``client`` (its key prefix) and the bindings they carry are stamped
    with its binding version ``at`` (``CodeStore.stamps``)."""

    __slots__ = ("_load", "_token")

    def __init__(self, store: CodeStore, ephemeral: bool = False, client: str = "", at: int = 0) -> None:
        self._load = _Load(store, ephemeral, client, at)

    def __enter__(self) -> None:
        self._token = _load.set(self._load)
        self._load.store.activate_sources()

    def __exit__(self, *exc: object) -> None:
        _load.reset(self._token)


def check_held(relied: int) -> None:
    """Refuse a request that refers to what the session holds (``FLAG_HELD``: code by key,
    globals left out as bound up to the client's binding version ``relied``) when this worker's
    store of the session holds nothing, or not every binding of that client up to that version:
    the session moved here (a ``hint`` session's call sent to a free worker), or calls that
    rebound globals ran on the other worker. Loaded, it would run without the globals its new code reads (NameError), or with their
    old values; refused with :class:`CodeCacheMiss` (``details["version"]``: the version the store
    holds) before anything is loaded, it comes again in full with every binding changed since.
    Another client's versions count apart: a store far along in one's says nothing of the other's."""
    load = _active()
    store = load.store
    held = store.versions.get(load.client, 0)
    if held < relied or not (store.objects or store.modules or store.bound):
        raise CodeCacheMiss("this worker does not hold the session's bindings the request relies on (calls ran on "
                            "another worker); nothing ran: the client sends it again in full with them",
                            ephemeral=load.ephemeral, version=held)


def _active() -> _Load:
    load = _load.get()
    if load is None:
        raise ProtocolError("session code (ext 25) outside a session's request")
    return load


class SessionUnpickler(pickle.Unpickler):
    """Loads a session pickle: a persistent id is the key of an object the session holds, or a
    global of one of its modules (``dspex.client.sessionpickle.SessionPickler._held_id``)."""

    def persistent_load(self, pid: Any) -> Any:
        if type(pid) is str:
            return _active().held(pid)
        if type(pid) is tuple and len(pid) == 4 and pid[0] == "g":
            return _load_global(*pid[1:])
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.60}")


def _unpickle(data: bytes) -> Any:
    return SessionUnpickler(io.BytesIO(data)).load()  # peers are authenticated; a client may exec code anyway


def loads(data: bytes, sources: dict[str, str]) -> Any:
    """Unpickle a session pickle into the store of the load under way."""
    load = _active()
    if sources:
        load.store.sources.update(register_sources(sources))
    try:
        return _unpickle(data)
    except (DspexError, ModuleNotFoundError):
        raise  # a miss, or a package the worker lacks (dspex.wire.decoding says which)
    except (Exception, SystemExit, KeyboardInterrupt, GeneratorExit) as exc:  # (a worker's time limit goes on)
        if not load.rebuilding:
            raise
        nsid, name = load.rebuilding[-1]
        owner = f" of {nsid[2:]}" if nsid.startswith("m:") else ""
        raise ProtocolError(f"cannot unpickle the value of module global {name!r}{owner} here: "
                            f"{type(exc).__name__}: {str(exc)[:300]}", name=name, namespace=nsid) from None


# -- what session pickles call (by name: keep these names) ------------------------------------

def _load_held(key: str, bindings: list[tuple[str, str, str, Any]] | None = None) -> Any:
    """An object the session already holds (and the client's bindings that changed since)."""
    load = _active()
    obj = load.held(key)
    load.bind(bindings)
    return obj


def _load_binding_key(nsid: str, name: str, key: str) -> str:
    """The key of a binding, loaded before its value: the global being rebuilt (see ``_Load.rebuilding``)."""
    _active().rebuilding.append((nsid, name))
    return key


def _load_bindings(bindings: list[tuple[str, str, str, Any]]) -> None:
    """Bindings a request carries beside its code: the session's bindings changed since the
    version this store holds (a resend after :func:`check_held` refused it)."""
    _active().bind(bindings)


def _load_value(key: str, value: Any, _end: object = None) -> Any:
    """A value sent by identity: the held one if the session has it already; after the store
    forgot it (a resend in full), the module global the session bound under that key, which
    keeps its state, rather than the copy sent again. (``_end`` marks, in the pickle, where the
    value ended.)"""
    store = _active().store
    if key not in store.objects:
        for (nsid, name), bound_key in store.bound.items():
            module = store.modules.get(nsid) if bound_key == key else None
            if module is not None and name in module.__dict__:
                value = module.__dict__[name]
                break
    return store.objects.setdefault(key, value)


def _load_context_var(key: str, name: str, *default: Any) -> Any:
    """A ``contextvars.ContextVar`` of the user's code (a module global): one variable of that
    name and default per session, as the module's one variable in-process. Its value in the
    caller's context travels with each request (the request context's ``vars``)."""
    held = _active().store.objects.get(key)
    if held is not None:
        return held
    return _load_value(key, contextvars.ContextVar(name, default=default[0]) if default else contextvars.ContextVar(name))


def _load_code(key: str, code: types.CodeType | None = None) -> Any:
    load = _active()
    if code is None:
        return load.held(key)
    return load.store.objects.setdefault(key, code)


def _load_function(key: str, code: types.CodeType, nsid: str, base: dict[str, Any] | None,
                   cells: int | tuple[tuple[str, int] | None, ...]) -> Any:
    """A by-value function whose ``__globals__`` is the session's module ``nsid`` (a ``lib:<name>``
    namespace is the importable module's own). ``cells``: its number of cells, or for each the
    ``(key, index)`` of the held function's cell it shares (functions made together), else None."""
    load = _active()
    held = load.store.objects.get(key)
    if held is not None:
        return held
    if nsid.startswith("lib:"):
        name = nsid[4:]
        module = sys.modules.get(name) or importlib.import_module(name)
        namespace = module.__dict__
    else:
        namespace = load.store.module(nsid, base).__dict__
    closure = tuple(_cp._make_empty_cell() for _ in range(cells)) if isinstance(cells, int) else \
        tuple(_cp._make_empty_cell() if at is None else load.held(at[0]).__closure__[at[1]] for at in cells)
    func = types.FunctionType(code, namespace, None, None, closure or None)
    held = load.store.objects.setdefault(key, func)  # a concurrent request of the session may have won
    if held is func:
        load.fresh.add(id(func))
    return held


def _load_function_state(func: types.FunctionType, state: tuple[Any, Any, Any]) -> None:
    fstate, slotstate, bindings = state
    load = _active()
    if id(func) in load.fresh:
        function_setstate(func, (fstate, slotstate))
    load.bind(bindings)


def function_setstate(func: types.FunctionType, state: tuple[Any, Any]) -> None:
    """cloudpickle's ``_function_setstate``, leaving the builtins of the function's module as they
    were (it puts Python's there: the session's ``__import__`` would be lost, CodeStore.importer)."""
    g = func.__globals__
    own = g.get("__builtins__")
    _cp._function_setstate(func, state)
    if own is not None:
        g["__builtins__"] = own


def _load_class(key: str, tracker: str, file: str | None, make: Callable[..., type], args: tuple[Any, ...]) -> Any:
    """A by-value class of this session. cloudpickle's process-wide tracker would hand every
    session the class the first one got (with methods whose globals are that session's): the
    class is tracked per session here, and only registered class -> tracker id, so it travels
    back to the client as the client's own class."""
    load = _active()
    held = load.store.objects.get(key)
    if held is not None:
        return held
    if make is _cp._make_skeleton_class:
        with classes.class_hooks_skipped(args[0], args[2]):
            cls = make(*args)
    else:
        cls = make(*args)
    with _cp._DYNAMIC_CLASS_TRACKER_LOCK:
        _cp._DYNAMIC_CLASS_TRACKER_BY_CLASS[cls] = tracker
    if file:
        classes.register_class_file(cls, file)
    held = load.store.objects.setdefault(key, cls)  # a concurrent request of the session may have won
    if held is cls:
        load.fresh.add(id(cls))
    return held


def _load_class_state(cls: type, state: tuple[Any, Any]) -> None:
    clsstate, bindings = state
    load = _active()
    if id(cls) in load.fresh:
        _cp._class_setstate(cls, clsstate)
    load.bind(bindings)


def _load_module(nsid: str, base: dict[str, Any] | None, bindings: list[tuple[str, str, str, Any]] | None) -> Any:
    """A user module referenced as a module (``import helpers``): the session's module object."""
    load = _active()
    module = load.store.module(nsid, base)
    load.bind(bindings)
    return module


def _load_global(nsid: str, name: str, bindings: bytes | None = None) -> Any:
    """A global of the session's module ``nsid``: a call's argument that is a module global on the
    client is the session's global, bound first when the client sent it with the request
    (``bindings``: a pickle of its own, so that the value sent is never taken for the global the
    session keeps)."""
    load = _active()
    if bindings is not None:
        load.bind(_unpickle(bindings))
    module = load.store.modules.get(nsid)
    try:
        return module.__dict__[name] if module is not None else load.held(f"{nsid}.{name}")
    except KeyError:
        return load.held(f"{nsid}.{name}")  # a worker that lacks it: CodeCacheMiss, sent again in full


def _load_attribute(module: str, qualname: str) -> Any:
    """A global of the user's code that lives in a module the worker imports: by reference."""
    obj: Any = sys.modules.get(module) or importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj
