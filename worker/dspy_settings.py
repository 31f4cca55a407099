"""Per-session DSPy settings on a worker shared by many sessions.

DSPy keeps one process-wide configuration (``main_thread_config``), changed by ``dspy.configure``
/ ``dspy.settings.configure`` / ``dspy.settings.X = ...`` (all three end in
``Settings.configure``), owned by the first thread that configured it, and per-context overrides
(``dspy.context``, a contextvar). On a worker:

- ``Settings.configure`` is replaced: called inside a session's call, it stores the values on the
  session and applies them to the rest of the call; outside any session it is DSPy's own.
  So every spelling works on whichever thread runs the call, and one session never sees
  another's LM. A new session sees DSPy's defaults. DSPy's ownership rule holds within a call as
  it holds in-process for the code the client runs: the call's thread and its first task that
  configures (an awaitable call's own task) own the configuration, and ``dspy.configure`` from a
  thread or another task the call started raises DSPy's ``RuntimeError`` (use ``dspy.context``).
- Each call runs inside ``dspy.context(**session settings)``; ``dspy.context`` in user code nests
  inside it as usual.
- Threads and executor tasks a call starts carry it (worker.threads) and see the session's
  settings as configured (``thread_settings``), as a thread sees ``dspy.configure``'s in-process,
  not the ``dspy.context`` blocks around its start; one left running after its call keeps them.
  DSPy's process-wide configuration stays the worker's: a thread no call started never sees a
  session's settings.
- DSPy's global LM history (``dspy.inspect_history()``) is per session too, and bounded by the
  worker's ``--lm-history``: one session never sees another's prompts.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import importlib
import threading
import types
from collections.abc import Callable, Iterable
from typing import Any, Self, SupportsIndex

from worker.refs import SessionState

# The session a request runs in; read by the configure interceptor.
current_session: contextvars.ContextVar[SessionState | None] = contextvars.ContextVar(
    "dspex_session", default=None)
# The settings the calling client's dspy.context holds for this call: a dspy.configure in the call
# does not change them for the rest of the call, as in-process it does not inside such a block.
client_pins: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("dspex_client_pins", default=frozenset())
# What threads the call starts see as DSPy's configuration (in-process: what
# dspy.configure set), kept up to date by configure calls in the call; None outside calls.
thread_settings: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "dspex_thread_settings", default=None)


class ConfigureOwner:
    """Who may call ``dspy.configure`` during one call: its thread, and its first task that does
    (DSPy's rule for the process, applied to the call as the client's code runs it). The call's
    awaitable runs on its session's loop, which another thread may be running (worker.session_loop):
    that loop counts as the call's thread."""

    __slots__ = ("loop", "task", "thread")

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.task: Any = None
        self.loop: Any = None


configure_owner: contextvars.ContextVar[ConfigureOwner | None] = contextvars.ContextVar(
    "dspex_configure_owner", default=None)


def claim_configure() -> None:
    """The running task is the call's own (its awaitable, its async generator's driver): it owns
    the configuration, as the client's task that awaits the call owns it in-process."""
    owner = configure_owner.get()
    if owner is not None and owner.task is None:
        owner.task = asyncio.current_task()
        owner.loop = asyncio.get_running_loop()


def _ensure_configure_allowed() -> None:
    """DSPy's ``Settings._ensure_configure_allowed`` for a call (same errors and messages)."""
    owner = configure_owner.get()
    if owner is None:
        return
    if owner.thread != threading.get_ident() and (owner.loop is None or asyncio._get_running_loop() is not owner.loop):
        raise RuntimeError("dspy.settings can only be changed by the thread that initially configured it.")
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop on this thread
        return
    if task is None:
        return
    if owner.task is None:
        owner.task = task
    elif owner.task is not task:
        raise RuntimeError(
            "dspy.configure(...) can only be called from the same async task that called it first. Please "
            "use `dspy.context(...)` in other async tasks instead.")


def _as_it_is() -> None:
    """A thread of a call on a worker without DSPy: its copy of the call's context is enough."""


class SessionHistory(list):  # type: ignore[type-arg]
    """Stands in for ``dspy.clients.base_lm.GLOBAL_HISTORY``: each session's own list.

    DSPy appends to and reads that module global in place (``record_history``,
    ``inspect_history``), and so may the session's code: every list method acts on the current
    session's list (outside a session: this object's own storage) and returns what it returns
    there, so ``h.copy()``, ``h[1:]``, ``h + x`` are plain lists, as in-process. A ``list`` still,
    for ``isinstance``; C code that reads a list's storage directly past its methods
    (``[] + h``, ``orjson.dumps(h)``) sees the worker's own storage.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def _target(self) -> list[Any]:
        state = current_session.get()
        return state.lm_history if state is not None else self  # list.* on self: its own storage

    def append(self, entry: Any) -> None:
        target = self._target()
        list.append(target, entry)
        if len(target) > self.limit:  # the worker's bound (--lm-history) on DSPy's records
            del target[: len(target) - self.limit]

    def __iadd__(self, values: Iterable[Any]) -> Self:  # type: ignore[misc]  # as list.__iadd__; the module global stays this object
        list.__iadd__(self._target(), values)
        return self

    def __imul__(self, n: SupportsIndex) -> Self:
        list.__imul__(self._target(), n)
        return self

    def __radd__(self, other: Any) -> Any:
        # ``[x] + h``: list's own concatenation would read this object's storage
        return list.__add__(other, self._target()) if isinstance(other, list) else NotImplemented

    def __copy__(self) -> list[Any]:
        return list.copy(self._target())

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return copy.deepcopy(self._target(), memo)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return list, (list.copy(self._target()),)  # pickled as the list it stands for


def _delegated(name: str) -> Callable[..., Any]:
    method = getattr(list, name)

    def delegated(self: SessionHistory, *args: Any, **kwargs: Any) -> Any:
        return method(self._target(), *args, **kwargs)

    delegated.__name__ = delegated.__qualname__ = name
    delegated.__doc__ = method.__doc__
    return delegated


for _name in ("__len__", "__getitem__", "__setitem__", "__delitem__", "__iter__", "__reversed__", "__contains__",
              "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__add__", "__mul__", "__rmul__",
              "__repr__", "__sizeof__", "extend", "insert", "remove", "pop", "clear", "index", "count", "copy",
              "sort", "reverse"):
    setattr(SessionHistory, _name, _delegated(_name))


class _HistoryModule(types.ModuleType):
    """``dspy.clients.base_lm`` on a worker: a list a session's call puts in place of the global
    history (``base_lm.GLOBAL_HISTORY = []``, a reset in-process) becomes that session's history,
    which the stand-in goes on standing for; no other session records into it."""

    def __setattr__(self, name: str, value: Any) -> None:
        state = current_session.get()
        # (``base_lm.GLOBAL_HISTORY += [...]`` sets the stand-in itself back: that is the default)
        if name == "GLOBAL_HISTORY" and state is not None and isinstance(value, list) and not isinstance(value, SessionHistory):
            state.lm_history = value
        else:
            super().__setattr__(name, value)


class SessionSettings:
    """Installs the interceptor once per process; scopes each call in its session's settings."""

    def __init__(self) -> None:
        self._dspy: Any = None
        self._module: Any = None
        # DSPy's process-wide configuration as the worker set it, and its values (put_back)
        self._config: dict[str, Any] = {}
        self._config_values: dict[str, Any] = {}

    def install(self, max_history: int = 200) -> None:
        import dspy

        # the module, not the `settings` object that dspy.dsp.utils re-exports under that name
        module = importlib.import_module("dspy.dsp.utils.settings")
        dspy.configure(max_history_size=max_history)  # the main thread owns the process config
        cls = type(dspy.settings)
        original = cls.configure
        if getattr(original, "_dspex", False):
            return
        scoped = self

        def configure(settings: Any, **kwargs: Any) -> None:
            state = current_session.get()
            if state is None:
                original(settings, **kwargs)
                return
            _ensure_configure_allowed()
            scoped._configure(state, kwargs)

        configure.__doc__ = original.__doc__
        configure._dspex = True  # type: ignore[attr-defined]
        cls.configure = configure  # dspy.settings.configure and dspy.settings.X = ... go here
        dspy.configure = dspy.settings.configure  # the alias was bound to the original at import
        base_lm: Any = importlib.import_module("dspy.clients.base_lm")
        history = SessionHistory(max_history)
        list.extend(history, base_lm.GLOBAL_HISTORY)
        base_lm.GLOBAL_HISTORY = history  # record_history and inspect_history read the module global
        base_lm.__class__ = _HistoryModule
        self._module = module
        self._dspy = dspy
        self._config = module.main_thread_config
        self._config_values = dict(self._config)

    def put_back(self) -> None:
        """DSPy's process-wide configuration as the worker set it: a call that wrote it directly,
        past ``dspy.configure`` (``main_thread_config[...] = ...``, the module global rebound),
        must not hand its LM to every later call of every session (a new session's base)."""
        module = self._module
        if module is None:
            return
        config = self._config
        if module.main_thread_config is not config:
            module.main_thread_config = config
        if config != self._config_values:  # (values are compared as objects: a list DSPy appends to stays one)
            config.clear()
            config.update(self._config_values)

    def _configure(self, state: SessionState, kwargs: dict[str, Any]) -> None:
        module = self._module
        state.dspy_settings.update(kwargs)
        # visible for the rest of this call (the enclosing dspy.context restores it after)
        pins = client_pins.get()
        visible = {k: v for k, v in kwargs.items() if k not in pins} if pins else kwargs
        overrides = module.thread_local_overrides.get()
        module.thread_local_overrides.set(type(overrides)({**overrides, **visible}))
        layer = thread_settings.get()
        if layer is not None:
            layer.update(kwargs)

    def thread_entry(self) -> Callable[[], None] | None:
        """For worker.threads: None outside a call; inside one, what a thread or task it starts
        does first, in its copy of the call's context: take the settings as configured."""
        if current_session.get() is None:
            return None
        layer = thread_settings.get()
        if layer is None or self._module is None:
            return _as_it_is
        overrides = self._module.thread_local_overrides

        def configured() -> None:
            overrides.set(layer)

        return configured

    def scope(self, state: SessionState) -> _Scope:
        """``with`` runs the block in the session's settings."""
        return _Scope(self, state)


def own_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A session's own copies of DSPy's mutable defaults (``callbacks``, ``stream_listeners``):
    ``dspy.settings.callbacks.append(cb)`` with nothing configured changes the default list in
    place, in-process the process's, seen by its later calls; here the session's, not the worker's
    that every session starts from. Not configured values: the client's ``dspy.configure`` still
    wins over them (the trace is the session's own setting already)."""
    return {key: copy.copy(value) for key, value in config.items()
            if key != "trace" and isinstance(value, (list, dict, set))}


class _Scope:
    """One call's block in its session's settings: the session and the overrides. A class, not generator context managers: it is entered on
    every call, and a class is cheaper to enter than each nested generator."""

    __slots__ = ("_base", "_layer", "_owner", "_pins", "_token", "owner", "state")

    def __init__(self, owner: SessionSettings, state: SessionState) -> None:
        self.owner = owner
        self.state = state
        self._base: Any = None
        self._pins: Any = None
        self._layer: Any = None

    def __enter__(self) -> _Scope:  # noqa: PYI034 - a final class: Self adds nothing
        owner, state = self.owner, self.state
        self._token = current_session.set(state)
        self._owner = configure_owner.set(ConfigureOwner())
        if owner._dspy is None:
            return self
        try:
            module = owner._module
            settings = state.dspy_settings
            # a trace of its own: DSPy appends to the configured list in place
            settings.setdefault("trace", [])
            defaults = state.dspy_defaults
            if defaults is None:
                defaults = state.dspy_defaults = own_defaults(module.main_thread_config)
            # what ``dspy.context(**settings)`` does, on top of no overrides: nothing a cut-short
            # earlier call left on this thread leaks in (one contextvar set instead of two and
            # dspy's generator)
            overrides = module.thread_local_overrides
            base = type(overrides.get())({**module.main_thread_config, **defaults, **settings})
            self._base = overrides.set(base)
            self._layer = thread_settings.set(type(base)(base))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def add_client(self, values: Any, pinned: Any = None) -> None:
        """The calling client's DSPy settings, for this call: under the session's own (a setting
        the session configured wins, key by key), except those of ``pinned``, which the client's
        ``dspy.context`` holds: they win, as a ``dspy.context`` block wins over ``dspy.configure``
        in-process."""
        owner = self.owner
        if owner._dspy is None or not isinstance(values, dict) or not values:
            return
        own = self.state.dspy_settings
        pins = frozenset(k for k in pinned if isinstance(k, str) and k in values) if isinstance(pinned, list) else ()
        under = {k: v for k, v in values.items() if isinstance(k, str) and k not in own}
        if pins:
            self._pins = client_pins.set(pins)
        elif not under:
            return
        layer = thread_settings.get()
        if layer is not None and under:  # threads the call starts see them too (worker.threads)
            layer.update(under)
        overrides = owner._module.thread_local_overrides
        # undone with the scope's own
        overrides.set(type(overrides.get())({**overrides.get(), **under, **{k: values[k] for k in pins}}))

    def track_usage(self) -> Any:
        """A ``dspy.track_usage()`` tracker of this call, standing in for the calling client's
        (its block is around the call there): None without DSPy."""
        owner = self.owner
        if owner._dspy is None:
            return None
        from dspy.utils.usage_tracker import UsageTracker

        tracker = UsageTracker()
        overrides = owner._module.thread_local_overrides
        overrides.set(type(overrides.get())({**overrides.get(), "usage_tracker": tracker}))  # undone with the scope's own
        return tracker

    def __exit__(self, *exc: object) -> None:
        try:
            if self._pins is not None:
                client_pins.reset(self._pins)
            if self._layer is not None:
                thread_settings.reset(self._layer)
            if self._base is not None:
                self.owner._module.thread_local_overrides.reset(self._base)
        finally:
            configure_owner.reset(self._owner)
            current_session.reset(self._token)
            self.owner.put_back()
