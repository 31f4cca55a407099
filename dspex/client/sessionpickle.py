"""Pickles of a session's requests: by-value code sent once, module globals kept on the worker.

cloudpickle as :mod:`dspex.wire.byvalue` uses it (:class:`SessionPickler`), for what
docs/remote-objects.md (*A session is your own Python, remembered*) tells: a by-value function's
``__globals__`` is the session's module object on the worker (``m:<module name>``), which the
bindings of :mod:`dspex.client.bindings` fill; functions, classes, code objects and big values
are defined in full the first time a session uses them and referred to by key after
(``codestore._load_held``); a global the worker can import goes by reference (one a user module
imported, read from its source; one found in an importable module when by value it cannot be
pickled), and one of the user's code that cannot be pickled at all is an :class:`EncodeError`
naming it and its module; a class is rebuilt per session (not through cloudpickle's process-wide
class tracker). The reducers name functions of :mod:`dspex.wire.codestore`, which runs them on
the worker.
"""

from __future__ import annotations

import contextvars
import functools
import io
import sys
import types
from typing import Any

from cloudpickle import cloudpickle as _cp

from dspex.client import codeindex, senderrors
from dspex.client.bindings import _ATOMS, Binding, BindingKey, Bindings, _Attribute, _Value
from dspex.client.callglobals import ModuleGlobal, PartialOfGlobals
from dspex.client.lmhistory import history_classes
from dspex.client.sendcache import Restated, SendCache, SettingsSent
from dspex.client.sentcells import CellSent
from dspex.client.standins import END_OF_VALUE, CodeRef, EndOfValue, held_pickle
from dspex.wire import byvalue, codestore, reducers
from dspex.wire.errors import EncodeError

# values whose identity means nothing (a default of None or 0 is no module's global) or that are
# one object per session already (functions: by key)
_NOT_GLOBALS = _ATOMS | {types.FunctionType}
_NOT_HELD = _NOT_GLOBALS | {types.ModuleType, tuple}
_MAX_RETRIES = 8  # unpicklable globals found by reference in one request before giving up


class Message:
    """The encoding of one request of a session: its pickles share what they define (a later
    pickle of the message refers to what an earlier one defined) and commit together."""

    def __init__(self, cache: SendCache, *, full: bool = False) -> None:
        self.cache = cache
        # ``full``: a resend after a miss trusts nothing the cache says the worker holds (another
        # request of the session, still in flight, may have claimed it)
        self.trusted = cache.keep and not full
        self.new_keys: dict[int, tuple[Any, str]] = {}
        self.defined: set[str] = set()
        self.used: set[str] = set()
        self.globals = Bindings(cache, trusted=self.trusted, key=self.key, namespace=self.namespace)
        self.namespaces: set[str] = set()
        self.sources: dict[str, list[str]] = {}
        self._nsids: dict[int, tuple[Any, str, dict[str, Any] | None]] = {}
        self._budget = byvalue.MAX_SOURCES
        self.settings_sent: SettingsSent | None = None
        self.restated: list[Restated] = []  # client settings whose state it sends (sendsettings)
        self.pinned: list[str] = []  # the client settings a dspy.context holds (client_dspy_settings)
        # id(cell) -> each (cell, function key, index, value) of the functions it defines that hold it
        self.cells: dict[int, tuple[CellSent, ...]] = {}
        self.holders: dict[str, str] = {}  # key of a value inside another's -> the key of that value

    @property
    def relies(self) -> bool:
        """It refers to what the session's worker holds (a key, a global left out): a worker
        that holds nothing of the session (one it moved to) must refuse it (``FLAG_HELD``)."""
        return bool(self.used) or self.globals.relied

    def key(self, obj: Any) -> str:
        held = self.cache.held.lookup(obj) if self.cache.keep else None
        if held is not None:
            return held
        hit = self.new_keys.get(id(obj))
        if hit is None:
            hit = self.new_keys[id(obj)] = (obj, self.cache.key_of(obj))
        return hit[1]

    def refers(self, key: str) -> bool:
        """Whether a pickle refers to ``key`` (the worker has it by the time it reads the
        reference) rather than defines it: False makes this message its definer."""
        if key in self.defined:
            return True
        if self.trusted and key in self.cache.held.sent:
            self.used.add(key)
            return True
        self.defined.add(key)
        return False

    def dumps(self, obj: Any) -> tuple[bytes, dict[str, str]]:
        """(pickle, {filename: source}) of ``obj``; EncodeError naming an unpicklable global."""
        if type(obj) is types.FunctionType:
            held = self._held_function(obj)
            if held is not None:
                return held, {}
        retries = 0
        while retries < _MAX_RETRIES:
            saved = self._snapshot()
            buf = io.BytesIO()
            pickler = SessionPickler(buf, self)
            try:
                pickler.dump(obj)
                return buf.getvalue(), pickler.sources
            except Exception as exc:
                before = saved[2]  # the bindings made before this pickle
                emitted = [(where, value) for where, (value, _) in self.globals.bindings.items() if where not in before]
                needed = self.globals.needed
                self._restore(saved)
                # an EncodeError names what it is already (a session's unpicklable global)
                culprit = None if isinstance(exc, EncodeError) else senderrors.culprit(emitted, _transient_dumps)
                if culprit is None:
                    raise
                (nsid, name), value = culprit
                if (nsid, name) not in needed:  # only its module's walk sent it: left out, named if read there
                    self.cache.left_out[nsid, name] = (value, senderrors.global_error(nsid, name, value, exc).message)
                    continue
                retries += 1
                if codeindex.find_importable(value) is None:  # found: by reference from now on
                    raise senderrors.global_error(nsid, name, value, exc) from None
        raise EncodeError("cannot pickle: too many globals had to be sent by reference")

    def _held_function(self, func: types.FunctionType) -> bytes | None:
        """The pickle :class:`SessionPickler` writes for a by-value function the worker holds and
        whose globals are as the session has them (``s.run(fn)`` after its first call): the
        function's key, made without a pickler. None when anything must be sent with it."""
        key = self.cache.held.lookup(func) if self.trusted else None
        if key is None or func.__code__ is reducers.SINGLEDISPATCH_CODE or not codeindex.by_value(func) \
                or not self.globals.unchanged(func):
            return None
        self.used.add(key)
        return held_pickle(key)

    def _snapshot(self) -> tuple[Any, ...]:
        g = self.globals
        return (dict(self.new_keys), set(self.defined), dict(g.bindings), dict(g.walked), dict(g.walks),
                set(self.namespaces), dict(self.sources), set(self.used), self._budget, set(g.incidental),
                set(g.needed), dict(self.cells), list(g.cells_rebound),
                dict(self.holders))

    def _restore(self, saved: tuple[Any, ...]) -> None:
        g = self.globals
        (self.new_keys, self.defined, g.bindings, g.walked, g.walks, self.namespaces, self.sources, self.used,
         self._budget, g.incidental, g.needed, self.cells, g.cells_rebound,
         self.holders) = saved

    def namespace(self, g: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
        """The id of a function's globals on the worker: ``m:<module>`` (a session module of a
        user module), ``lib:<module>`` (an importable module's own), ``g:<key>`` (other dicts)."""
        hit = self._nsids.get(id(g))
        if hit is not None and hit[0] is g:
            return hit[1], hit[2]
        name = g.get("__name__")
        module = sys.modules.get(name) if isinstance(name, str) else None
        base: dict[str, Any] | None = {k: g[k] for k in codestore.BASE_GLOBALS if k in g}
        if module is not None and getattr(module, "__dict__", None) is g:
            if codeindex.user_module(module):
                nsid, base = "m:" + str(name), module_base(module)
            else:
                nsid, base = "lib:" + str(name), None
        elif isinstance(name, str) and name.startswith("dspex_session_"):
            nsid, base = "lib:" + name, None  # a worker's exec module, come back by value
        else:
            nsid = "g:" + self.key(g)
            self.namespaces.add(nsid[2:])
        self._nsids[id(g)] = (g, nsid, base)
        return nsid, base

    def closure(self, func: types.FunctionType, key: str,
                cells: tuple[types.CellType, ...]) -> tuple[tuple[types.CellType, ...], tuple[Any, ...] | None]:
        """A function's closure to send with its big values sent by identity, and, when it shares
        cells with functions the worker holds or this request defines (made together, as
        ``inc`` and ``get`` of one ``make_counter()``), for each cell the ``(function key, index)``
        of the worker's cell to use, else None (``codestore._load_function``). A shared cell's value
        goes only when the client rebound it since it was sent (an empty cell in its place keeps
        the worker's, which the session's calls may have changed)."""
        out: list[types.CellType] = []
        shared: list[tuple[str, int] | None] | None = None
        own = func.__closure__ or ()
        for at, cell in enumerate(cells):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                value = None
            mine = at < len(own) and cell is own[at]  # (not a stand-in cell of reducers.closure_cells)
            held = self._shared_cell(cell) if mine else None
            if held is not None:
                shared = shared or [None] * len(cells)
                shared[at] = held[:2]
            if held is not None and value is held[2]:
                out.append(types.CellType())  # empty: the worker's value stays
            else:
                out.append(cell if not codeindex.is_big(value) else types.CellType(_Value(self.key(value), value)))
            if mine:
                self.cells[id(cell)] = (*self.cells.get(id(cell), ()), (cell, key, at, value))
        return tuple(out), None if shared is None else tuple(shared)

    def _shared_cell(self, cell: types.CellType) -> tuple[str, int, Any] | None:
        """(function key, index, value sent) of a function this request defined before, or the
        worker holds, that has ``cell``."""
        mine = self.cells.get(id(cell))
        if mine is not None and mine[0][0] is cell:
            return mine[0][1], mine[0][2], mine[0][3]
        if not self.trusted or not self.cache.held.cells:
            return None
        held = self.cache.held.cells.held(cell, self.cache.held.sent)
        if held is not None:
            self.used.add(held[0])
        return held

    def note_source(self, filename: str | None, sources: dict[str, str]) -> None:
        """Send a by-value object's source file with it, once per session."""
        if not filename or filename in self.sources:
            return
        lines = byvalue.source_lines(filename)
        if lines is None or (self.trusted and self.cache.sources.get(filename) is lines):
            return
        text = "".join(lines)
        if len(text) > self._budget:
            return
        self._budget -= len(text)
        self.sources[filename] = lines
        sources[filename] = text


class SessionPickler(byvalue.SourcePickler):
    """cloudpickle writing a session's code as definitions once and keys after (module docstring)."""

    def __init__(self, file: io.BytesIO, msg: Message) -> None:
        super().__init__(file, {})
        self.msg = msg
        self._defining: list[str] = []  # the keys of the values being defined that this pickle is inside of
        self._globals: dict[int, tuple[str, str, Any]] | None = None
        self._valued: set[int] = set()  # ids of the objects this pickle defines as values
        self._keeps_history: tuple[type, ...] | None = None  # history_classes, once a value needs them

    def reducer_override(self, obj: Any) -> Any:
        t = type(obj)
        if t is types.FunctionType:
            return self._function(obj)
        if t is _Value:
            return self._value(obj)
        if t is CodeRef:
            return self._code(obj.code)
        if t is EndOfValue:
            self._defining.pop()
            return bool, ()
        if t is _Attribute:
            return codestore._load_attribute, (obj.module, obj.name)
        if t is BindingKey:
            return codestore._load_binding_key, (obj.nsid, obj.name, obj.key)
        if t is PartialOfGlobals:
            return functools.partial, (obj.func,), (obj.func, obj.args, obj.keywords, obj.state)
        if t is ModuleGlobal:
            if obj.attr is not None:
                return getattr, (ModuleGlobal(obj.module, obj.name, obj.obj), obj.attr)
            where = ("m:" + obj.module, obj.name)
            data = self._binding(*where, obj.obj)
            return codestore._load_global, (where if data is None else (*where, data))
        if t is types.ModuleType and codeindex.by_value(obj):
            return self._module(obj)
        if issubclass(t, type) and codeindex.by_value(obj):
            return reducers.parametrized_model(obj) or self._class(obj)
        if self._defining and id(obj) not in self._valued and isinstance(obj, self._history_classes()):
            # an LM or module inside a value (a configured TwoStepAdapter's extraction model, a
            # program in a global dict) is a value of its own, keyed as a configured LM or a global
            # module is: the session's calls record its history entries in the client's (SendCache.lms)
            return self._value(_Value(self.msg.key(obj), obj))
        return super().reducer_override(obj)

    def _history_classes(self) -> tuple[type, ...]:
        if self._keeps_history is None:
            self._keeps_history = history_classes() or ()
        return self._keeps_history

    def _held_id(self, obj: Any) -> Any:
        """The pickler's ``persistent_id`` once a global's value is being defined. Inside such a
        value (not elsewhere: ``_defining``), an object that is another global of the user's
        modules (``HOLDER = Holder(STORE)``) is the session's global, as in-process it is that
        one object: the key of the object the session holds from an earlier request, or, for a
        global the session lacks, ``("g", namespace, name, bindings)`` that binds it first (a
        pickle of its own: :meth:`_binding`); ``codestore.SessionUnpickler`` loads either.
        A global bound by this request already is left to the pickle's memo. Functions, classes
        and modules are the reducers' (a held function still sends its changed bindings); lists
        and dicts never reach ``reducer_override``, hence this hook, installed only in pickles
        that define a value, as it costs a call per object pickled."""
        t = type(obj)
        if not self._defining or t in _NOT_HELD or isinstance(obj, type):
            return None
        msg = self.msg
        if not msg.trusted:
            return None
        key = msg.cache.held.lookup(obj)
        if key is not None:
            if key in msg.defined:  # being defined by this request
                return None
            msg.used.add(key)
            return key
        new = msg.new_keys.get(id(obj))
        if new is not None and new[0] is obj and new[1] in msg.defined:
            # defined by this request under its own key (a client setting that is also a module
            # global: ``LM = dspy.LM(...)``, ``dspy.configure(lm=LM)``): bound as the global, it
            # would refer to that key before the definition loaded
            return None
        found = self._module_globals().get(id(obj))
        if found is None or found[2] is not obj:
            return None
        nsid, name = "m:" + found[0], found[1]
        if (nsid, name) in msg.globals.bindings:
            return None
        data = self._binding(nsid, name, obj)
        return None if data is None else ("g", nsid, name, data)

    def _module_globals(self) -> dict[int, tuple[str, str, Any]]:
        """id -> (module, name, value) of the globals of the user modules this session uses."""
        if self._globals is None:
            msg = self.msg
            modules = {nsid[2:] for nsid, _ in msg.globals.bindings if nsid.startswith("m:")}
            self._globals = {}
            for module_name in (*msg.cache.globals.modules, *modules):
                for name, value in codeindex.user_globals(module_name):
                    if not name.startswith("__") and type(value) not in _NOT_HELD and not isinstance(value, type):
                        self._globals.setdefault(id(value), (module_name, name, value))
        return self._globals

    def _held(self, key: str, bindings: list[Binding]) -> Any:
        return codestore._load_held, ((key, bindings) if bindings else (key,))

    def _function(self, func: types.FunctionType) -> Any:
        msg = self.msg
        if not codeindex.by_value(func):
            return NotImplemented  # importable: by reference
        if func.__code__ is reducers.SINGLEDISPATCH_CODE:
            return reducers.singledispatch_reduced(func)
        bindings = msg.globals.walk(func)
        key = msg.key(func)
        if msg.refers(key):
            return self._held(key, bindings)
        nsid, base = msg.namespace(func.__globals__)
        bindings = msg.globals.own_name(nsid, func, bindings)
        msg.cache.held.codes[key] = func.__code__
        msg.note_source(func.__code__.co_filename, self.sources)
        state, slotstate = _cp._function_getstate(func)
        slotstate["__globals__"] = {}  # the session's module is its globals; bindings fill it
        module = func.__globals__.get("__name__")
        if isinstance(module, str):
            defaults, kwdefaults = slotstate["__defaults__"], slotstate["__kwdefaults__"]
            if defaults:
                slotstate["__defaults__"] = tuple(_module_globals(msg, module, dict(enumerate(defaults))).values())
            if kwdefaults:
                slotstate["__kwdefaults__"] = _module_globals(msg, module, kwdefaults)
        cells = reducers.closure_cells(func)
        shape: int | tuple[Any, ...] = len(func.__code__.co_freevars)
        if cells:
            slotstate["__closure__"], shared = msg.closure(func, key, cells)
            if shared is not None:
                shape = shared
        args = (key, CodeRef(func.__code__), nsid, base, shape)
        return (codestore._load_function, args, (state, slotstate, bindings or None), None, None,
                codestore._load_function_state)

    def _class(self, cls: type) -> Any:
        msg = self.msg
        bindings = msg.globals.walk(cls)
        key = msg.key(cls)
        if msg.refers(key):
            return self._held(key, bindings)
        bindings = msg.globals.own_name("m:" + cls.__module__, cls, bindings)
        file = byvalue.class_source_file(cls)
        msg.note_source(file, self.sources)
        make, newargs, state = _cp._dynamic_class_reduce(cls)[:3]
        args = list(byvalue.skeleton_args(cls, make, newargs))
        is_enum = make is _cp._make_skeleton_enum
        at = 5 if is_enum else 4  # the tracker id: codestore tracks the class per session, not by it
        tracker, args[at] = args[at], None
        clsdict = byvalue.class_state(cls, state[0])
        if not is_enum:  # members named again as module globals are the class's own
            clsdict = _module_globals(msg, cls.__module__, clsdict)
        state = (clsdict, state[1])
        return (codestore._load_class, (key, tracker, file, make, tuple(args)), (state, bindings or None), None,
                None, codestore._load_class_state)

    def _module(self, module: types.ModuleType) -> Any:
        msg = self.msg
        byvalue.register_user_module(module.__name__)
        bindings = msg.globals.walk(module)
        msg.note_source(getattr(module, "__file__", None), self.sources)
        return codestore._load_module, ("m:" + module.__name__, module_base(module), bindings or None)

    def _value(self, value: _Value) -> Any:
        if not value.key:  # an argument that is a setting's value (callglobals): keyed by identity here
            value = _Value(self.msg.key(value.obj), value.obj)
        if self._defining:  # held as long as the value it is inside of (HeldKeys.evict)
            self.msg.holders[value.key] = self._defining[-1]
        if self.msg.refers(value.key):
            return codestore._load_held, (value.key,)
        if type(value.obj) in _NOT_HELD:
            return codestore._load_value, (value.key, value.obj)
        if type(value.obj) is contextvars.ContextVar:  # a variable, not its value: that goes per call
            return codestore._load_context_var, (value.key, value.obj.name, *_default_of(value.obj))
        if not self._defining and self.msg.trusted:
            self.persistent_id = self._held_id
        self._defining.append(value.key)  # until the EndOfValue after it
        self._valued.add(id(value.obj))
        return codestore._load_value, (value.key, value.obj, END_OF_VALUE)

    def _binding(self, nsid: str, name: str, obj: Any) -> bytes | None:
        """The pickle that binds the session's global ``name`` of user module ``nsid`` to ``obj``,
        None where the session has it so: within a session a global is one object, whether code
        reads it or a call is given it (``s.run(QA, ...)``, ``s.run(COUNTER.bump)``), as
        in-process. A pickle of its own: pickled here, the value would be memoized as ``obj``
        itself, and the copy sent would stand for the global even where the session keeps its own."""
        bindings: list[Binding] = []
        self.msg.globals.bind(bindings, [], nsid, name, obj)
        if not bindings:
            return None
        data, sources = self.msg.dumps(bindings)
        self.sources.update(sources)
        return data

    def _code(self, code: types.CodeType) -> Any:
        key = codeindex.code_key(code)
        if self.msg.refers(key):
            return codestore._load_code, (key,)
        return codestore._load_code, (key, code)


def _module_globals(msg: Message, module: str, values: dict[Any, Any]) -> dict[Any, Any]:
    """``values`` (a function's defaults, a class's attributes) with each object that is bound as
    a global of the user module ``module`` as the session's global of that name: in-process
    ``def add(x, acc=STATE)`` and ``class Plugins: registry = REGISTRY`` hold the module's own
    object, which a copy sent with the function or class would not be once the session has it.
    A global this request binds (the function reads it too) stays in place: the binding, in the
    same pickle, is that same object."""
    names: dict[int, str] | None = None
    out = values
    for k, value in values.items():
        if type(value) in _NOT_GLOBALS or isinstance(value, type):
            continue
        if names is None:
            names = {id(v): n for n, v in codeindex.user_globals(module)
                     if not n.startswith("__") and type(v) not in _NOT_GLOBALS}
        name = names.get(id(value))
        if name is not None and ("m:" + module, name) not in msg.globals.bindings:
            if out is values:
                out = dict(values)
            out[k] = ModuleGlobal(module, name, value)
    return out


def _default_of(variable: contextvars.ContextVar[Any]) -> tuple[Any, ...]:
    """``(default,)`` of a ContextVar made with one, else ``()`` (what it gives where it is unset)."""
    try:
        return (contextvars.Context().run(variable.get),)
    except LookupError:
        return ()


def _transient_dumps(obj: Any) -> object:
    """A session pickle of ``obj`` on its own (raises what pickling it raises)."""
    return Message(SendCache.transient()).dumps(obj)


def module_base(module: types.ModuleType) -> dict[str, Any]:
    """What the worker's copy of user module ``module`` starts from: its :data:`codestore.BASE_GLOBALS`,
    and those of the user packages it is in (:data:`codestore.PARENTS`)."""
    parts = module.__name__.split(".")
    parents = [sys.modules.get(".".join(parts[:i])) for i in range(1, len(parts))]
    base = _own_base(module)
    if parents and all(p is not None and codeindex.user_module(p) for p in parents):
        base[codestore.PARENTS] = [_own_base(p) for p in parents if p is not None]
    return base


def _own_base(module: types.ModuleType) -> dict[str, Any]:
    g = vars(module)
    base = {k: g[k] for k in codestore.BASE_GLOBALS if k in g}
    if "__path__" in base:  # a namespace package's is a _NamespacePath, which finds its directories here
        base["__path__"] = list(base["__path__"])
    return base
