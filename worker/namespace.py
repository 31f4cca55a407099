"""Each session's own module: exec'd and bound code behaves like module-level code.

Code a session runs through ``exec``/``eval`` is compiled with ``dont_inherit=True`` (the worker's
own ``from __future__`` flags must not turn user annotations into strings), into a module of its
own registered in ``sys.modules`` (so classes get a real ``__module__``, Pydantic resolves
forward references, pickle finds them) and marked for cloudpickle's by-value pickling (so they
can travel back to the client). The source goes into ``linecache`` under the module's
``__file__``, as IPython does for cells, so ``inspect.getsource`` works for functions and classes
(dspy.Refine and SIMBA read source).
"""

from __future__ import annotations

import inspect
import itertools
import linecache
import sys
import threading
import types
from typing import Any

import cloudpickle

from dspex.wire import byvalue, classes
from worker.dspy_settings import current_session
from worker.refs import SessionState

_PREFIX = "dspex_session_"
_serial = itertools.count(1)
_lock = threading.Lock()


def session_module(state: SessionState, name: str | None = None) -> types.ModuleType:
    """The session's module, made on first use. A restored session (worker/checkpoint_restore.py)
    makes it under the ``name`` it had on its earlier worker (classes it defined keep their
    ``__module__``), and puts back the lines of code it ran there (``inspect.getsource`` finds them)."""
    module = state.module
    if module is None:
        with _lock:
            module = state.module
            if module is None:
                if name is None or name in sys.modules:
                    name = f"{_PREFIX}{state.id[:16]}_{next(_serial)}"
                module = types.ModuleType(name, f"dspex session {state.id[:8]}")
                module.__file__ = f"<{name}>"
                module.__dict__["__builtins__"] = __builtins__
                sys.modules[name] = module
                cloudpickle.register_pickle_by_value(module)
                set_lines(module.__file__, [])
                state.module = module
    return module


def session_lines(state: SessionState) -> list[str]:
    """The code the session's module ran so far (its linecache entry)."""
    return _lines(state.module.__file__ or "") if state.module is not None else []


def _lines(filename: str) -> list[str]:
    entry = linecache.cache.get(filename)
    return list(entry[2]) if entry is not None and len(entry) == 4 else []


def set_lines(filename: str, lines: list[str]) -> None:
    linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)


def namespace(state: SessionState) -> dict[str, Any]:
    return session_module(state).__dict__


_OWN_DICT = vars(types.ModuleType)["__dict__"]  # a module's own namespace (the view below overrides it)


# what ``sys.modules["__main__"]`` reads from the script's copy in a call (the rest are the worker's)
_SCRIPT_DUNDERS = frozenset({"__file__", "__doc__"})


class _UserModuleView(types.ModuleType):
    """``sys.modules[name]`` of a user module the client sends by value: its ``__dict__`` is the
    running call's session's copy of that module (outside a call, or in a session without one, the
    module's own: the worker's ``__main__``, a module of that name the worker imported, or nothing).

    A class made by the session's code, and one that arrived by value, resolve their deferred
    annotations (``from __future__ import annotations``) in ``sys.modules[cls.__module__].__dict__``:
    Pydantic (a model's, a DSPy Signature's fields), ``typing.get_type_hints``. Sessions of one
    worker each have their own copy of the module and run concurrently, so the entry cannot be the
    copy; the call's session is a context variable, carried into the threads and tasks it starts.
    Attributes are read from the session's copy first, then the module's own; for ``__main__``,
    only the copy's, but for its dunders other than ``__file__`` and ``__doc__``, always its own
    (:meth:`__getattribute__`)."""

    @property
    def __dict__(self) -> dict[str, Any]:  # type: ignore[override]
        copy = _session_copy(self)
        return copy.__dict__ if copy is not None else _OWN_DICT.__get__(self)

    def __getattribute__(self, name: str) -> Any:
        # the call's session's copy first (``getattr(sys.modules[__name__], name)`` in the user's
        # code; a package's ``__path__``; pickle's ``find_class``, for dspy.load of a program whose
        # class is in this module). The worker's own ``__main__`` (worker/__main__.py: ``run``
        # starts a worker) is never the script's: a call sees none of its names, nor its
        # ``__file__`` and ``__doc__``, but its other dunders, which multiprocessing reads to start
        # its children (spawn and forkserver run ``__spec__.name``, ``worker.__main__``; they read
        # ``__file__`` only when ``__spec__`` is None, and a worker always runs as ``-m worker``).
        copy = _session_copy(self)
        if copy is not None:
            main = _OWN_DICT.__get__(self).get("__name__") == "__main__"
            if not (main and name[:2] == "__" and name not in _SCRIPT_DUNDERS):
                try:
                    return copy.__dict__[name]
                except KeyError:
                    if main:
                        raise AttributeError(f"module '__main__' has no attribute {name!r}") from None
            lazy = copy.__dict__.get("__getattr__")  # a PEP 562 module __getattr__ of the user's
            if lazy is not None:
                try:
                    return super().__getattribute__(name)
                except AttributeError:
                    return lazy(name)
        return super().__getattribute__(name)


def _session_copy(view: _UserModuleView) -> types.ModuleType | None:
    """The running call's session's copy of the module ``view`` stands for (None outside calls, or
    in a session without one)."""
    state = current_session.get()
    if state is None:
        return None
    return state.code.modules.get(f"m:{_OWN_DICT.__get__(view).get('__name__')}")


def note_unsent(state: SessionState, exc: NameError | AttributeError) -> None:
    """A NameError or AttributeError for a global of the session's module that the client left
    out (it could not be pickled: dspex.wire.codestore.Unsent) gets a note saying so."""
    name = exc.name
    if isinstance(exc, AttributeError):
        owner = exc.obj
        g = vars(owner) if isinstance(owner, types.ModuleType) else None
    else:
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        g = tb.tb_frame.f_globals if tb is not None else None
    why = state.code.unsent.get((f"m:{g.get('__name__')}", name)) if g is not None and name else None
    if why is not None:
        exc.add_note(f"dspex: {name} was not sent with its module: {why}")


def present_user_module(name: str) -> None:
    """Let ``sys.modules[name]`` read as each call's session's copy of user module ``name``."""
    module = sys.modules.setdefault(name, _UserModuleView(name))
    if type(module) is types.ModuleType:  # the worker's own (its __main__): its own outside calls
        module.__class__ = _UserModuleView
    # the module's classes and functions are the session's, found by attribute in its copy: cloudpickle
    # must keep sending them by value (a program saved whole loads where no session has the module)
    cloudpickle.register_pickle_by_value(module)


def exec_in_session(state: SessionState, source: str, scope: dict[str, Any] | None = None) -> None:
    """Run ``source`` as the next lines of the session's module, in ``scope`` (default: the
    module's namespace). Its lines stay in the module's source only if it left something that
    reads them later (a function, class or lambda): a loop of ``exec`` calls must not grow the
    source, nor a durable session's checkpoint, without bound."""
    code, span = _compile_in_session(state, source)
    exec(code, namespace(state) if scope is None else scope)  # noqa: S102 - the op's purpose
    if not _defines_code(code):
        _forget_lines(state, span)


def _compile_in_session(state: SessionState, source: str) -> tuple[types.CodeType, range]:
    """Compile ``source`` as the next lines of the session module's file; return the code and
    the lines it took there.

    Every piece of code a session runs is appended to one linecache entry (the module's
    ``__file__``); it is compiled padded with blank lines to its offset there, so tracebacks and
    ``inspect.getsource`` of functions and classes see the right lines.
    """
    module = session_module(state)
    filename = module.__file__
    assert filename is not None
    with _lock:
        lines = _lines(filename)
        offset = len(lines)
        text = source if source.endswith("\n") else source + "\n"
        lines.extend(text.splitlines(keepends=True))
        set_lines(filename, lines)
        span = range(offset, len(lines))
    return compile("\n" * offset + source, filename, "exec", dont_inherit=True), span


# nested code that finishes with the code that runs it (3.11 compiles comprehensions as functions)
_FINISHING = frozenset({"<listcomp>", "<dictcomp>", "<setcomp>"})


def _defines_code(code: types.CodeType) -> bool:
    """Whether running ``code`` may leave functions, classes or lambdas behind, whose source and
    tracebacks read its lines later."""
    return any(isinstance(const, types.CodeType) and (const.co_name not in _FINISHING or _defines_code(const))
               for const in code.co_consts)


def _forget_lines(state: SessionState, span: range) -> None:
    """Take the lines ``span`` out of the session's linecache entry, if they are still its last."""
    module = state.module
    filename = module.__file__ if module is not None else None
    if not filename:
        return
    with _lock:
        lines = _lines(filename)
        if len(lines) == span.stop:
            set_lines(filename, lines[:span.start])


def drop_session_module(state: SessionState) -> None:
    """Forget a closed session's module (sys.modules, cloudpickle, linecache)."""
    module = state.module
    if module is None:
        return
    state.module = None
    try:
        cloudpickle.unregister_pickle_by_value(module)
    except ValueError:
        pass
    sys.modules.pop(module.__name__, None)
    if module.__file__:
        linecache.cache.pop(module.__file__, None)
    # the module's dict stays as it is: functions of it may still run (a thread the session
    # started) and are freed with their last reference


_delegate = inspect.getfile  # what ``inspect.getfile`` was before (dspy patches it too)


def _getfile(obj: Any) -> str:
    """``inspect.getfile`` that finds classes sent by value or defined in a session.

    For a class, ``inspect`` reads ``sys.modules[cls.__module__].__file__``: wrong for a class that
    arrived by value (its ``__module__`` is the client's ``__main__`` or test module, which on the
    worker is another file or nothing). A session's class carries the client's file name of its
    source (Signatures and plain classes have no methods to tell it), whose lines came with it in
    ``linecache``; a class of an exec'd session module is found by its methods' code.
    """
    if inspect.isclass(obj):
        sent = classes.class_file(obj)
        if sent is not None:
            return sent
        module = sys.modules.get(obj.__module__)
        if module is None or not getattr(module, "__file__", None) or obj.__module__ == "__main__":
            own = byvalue.class_own_file(obj)
            if own is not None:
                return own
    return _delegate(obj)


def install_getsource() -> None:
    """Let ``inspect.getsource`` find by-value and session classes.

    Again after importing dspy: ``dspy.teleprompt.utils`` replaces ``inspect.getfile`` with one
    that answers ``sys.modules["__main__"].__file__`` for a class of ``__main__`` (on a worker,
    worker/__main__.py); ours goes first and hands everything else to it.
    """
    global _delegate
    if inspect.getfile is not _getfile:
        _delegate = inspect.getfile
        inspect.getfile = _getfile  # type: ignore[assignment]
