"""Which DSPy settings a client's ``dspy.context`` blocks name.

DSPy's ``dspy.context(**settings)`` copies the whole configuration into its overrides, so the
overrides alone cannot tell a block that names the LM already configured from a block about
something else. A client's named block wins over the session's own settings in the call it
makes (docs/remote-objects.md, "What travels"), so the client records the names: DSPy's
``Settings.context`` is wrapped once in this process, at import when DSPy is loaded already, else
by an import hook as DSPy's settings module loads (before ``dspy.context`` is bound). DSPy's
``ParallelExecutor`` (``dspy.Parallel``, ``module.batch``, ``Evaluate(num_threads=...)``) copies
the calling thread's overrides into its threads but not its context: its ``execute`` is wrapped
the same way to carry the names along with them. The blocks already open where this module is
loaded (``with dspy.context(lm=lm): import dspex ...``) are found once, as it loads
(:func:`_open_blocks`), and named while they stay open.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import gc
import importlib.abc
import importlib.util
import sys
import types
import weakref
from typing import Any

# DSPy settings that belong to the call under way on the client (its trace, stream, callers, usage
# tracker), not to the configuration a program runs with: never sent
CALL_LOCAL = frozenset({"trace", "send_stream", "caller_predict", "caller_modules", "usage_tracker",
                         "stream_listeners"})
SETTINGS = "dspy.dsp.utils.settings"
PARALLELIZER = "dspy.utils.parallelizer"
# The names of the settings the calling thread's or task's ``dspy.context`` blocks set, nested
# ones together (their call-local ones aside): DSPy's block copies the whole configuration, so
# its names are the one sign of what the user chose. A ContextVar, as DSPy's overrides are:
# threads and tasks started with a copy of the context inherit it. Read by :func:`names`.
named: contextvars.ContextVar[frozenset[str] | _OpenBefore] = contextvars.ContextVar(
    "dspex_dspy_context_names", default=frozenset())


class _OpenBefore:
    """The blocks the loading context had open when this module wrapped DSPy's (each block's
    generator, weakly, with its names; :func:`_open_blocks`): their names count while they are open."""

    __slots__ = ("blocks",)

    def __init__(self, blocks: list[tuple[weakref.ref[Any], frozenset[str]]]) -> None:
        self.blocks = blocks

    def names(self) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for ref, block_names in self.blocks:
            block = ref()
            if block is not None and block.gi_frame is not None:  # (a left block's generator has ended)
                out |= block_names
        return out


def names() -> frozenset[str]:
    """The names of the settings the calling thread's or task's ``dspy.context`` blocks set."""
    got = named.get()
    return got if isinstance(got, frozenset) else got.names()


class _NamedBlock(contextlib.ContextDecorator):
    """DSPy's ``dspy.context(**settings)`` block ``block`` that also records ``names`` in :data:`named`."""

    __slots__ = ("block", "names", "token")

    def __init__(self, block: Any, names: frozenset[str]) -> None:
        self.block, self.names = block, names

    def _recreate_cm(self) -> _NamedBlock:  # as a decorator: a new block per call, as DSPy's own
        return _NamedBlock(self.block._recreate_cm(), self.names)

    def __enter__(self) -> Any:
        self.token = named.set(names() | self.names)
        try:
            return self.block.__enter__()
        except BaseException:
            named.reset(self.token)
            raise

    def __exit__(self, *exc: object) -> Any:
        try:
            return self.block.__exit__(*exc)
        finally:
            named.reset(self.token)


def _name_blocks(module: Any) -> None:
    """Make DSPy's ``Settings.context`` (``dspy.context``) record the names a block sets."""
    cls = getattr(module, "Settings", None)
    original = getattr(cls, "context", None)
    if cls is None or original is None or getattr(original, "_dspex", False):
        return

    def context(settings: Any, **kwargs: Any) -> Any:
        block = original(settings, **kwargs)
        if kwargs.keys() <= CALL_LOCAL:  # (DSPy's own per-call blocks: every module call)
            return block
        return _NamedBlock(block, frozenset(kwargs.keys() - CALL_LOCAL))

    context.__doc__ = original.__doc__
    context._dspex = True  # type: ignore[attr-defined]
    open_before = _open_blocks(module, original)
    cls.context = context
    if open_before:
        named.set(_OpenBefore(open_before))
    dspy = sys.modules.get("dspy")
    if getattr(getattr(dspy, "context", None), "__func__", None) is original:
        dspy.context = getattr(module, "settings", None).context  # type: ignore[union-attr]  # bound at DSPy's import


def _open_blocks(module: Any, original: Any) -> list[tuple[weakref.ref[Any], frozenset[str]]]:
    """The blocks of DSPy's unwrapped ``Settings.context`` (``original``) open in the calling
    context, innermost first, with the names each sets: the generator whose overrides are the
    context's, then the one whose overrides its token replaced, and so on. Searched only when a
    block is open (``gc.get_referrers``: about 15 ms per block with DSPy loaded, once)."""
    code = getattr(getattr(original, "__wrapped__", None), "__code__", None)
    overrides = module.thread_local_overrides.get()
    blocks = []
    while isinstance(overrides, dict) and overrides and code is not None:
        block = next((g for g in gc.get_referrers(overrides) if getattr(g, "gi_code", None) is code
                      and g.gi_frame is not None and g.gi_frame.f_locals.get("new_overrides") is overrides), None)
        if block is None:  # set by other code than a block (a ParallelExecutor thread's)
            break
        frame = block.gi_frame.f_locals
        blocks.append((weakref.ref(block), frozenset(frame.get("kwargs", {}).keys() - CALL_LOCAL)))
        overrides = getattr(frame.get("token"), "old_value", None)
    return [b for b in blocks if b[1]]


def _carry_names(module: Any) -> None:
    """Make DSPy's ``ParallelExecutor`` run each task with the names of the blocks around
    ``execute``, as it runs them with those blocks' settings."""
    cls = getattr(module, "ParallelExecutor", None)
    original = getattr(cls, "execute", None)
    if cls is None or original is None or getattr(original, "_dspex", False):
        return

    def execute(executor: Any, function: Any, data: Any) -> Any:
        held = named.get()
        if not held:
            return original(executor, function, data)

        @functools.wraps(function)
        def with_names(*args: Any, **kwargs: Any) -> Any:
            token = named.set(held)
            try:
                return function(*args, **kwargs)
            finally:
                named.reset(token)

        return original(executor, with_names, data)

    execute.__doc__ = original.__doc__
    execute._dspex = True  # type: ignore[attr-defined]
    cls.execute = execute


_WRAP = {SETTINGS: _name_blocks, PARALLELIZER: _carry_names}


class _WrapOnImport(importlib.abc.MetaPathFinder):
    """Wraps DSPy's modules of :data:`_WRAP` as they are imported, when DSPy is imported after
    dspex: before any block is entered and ``dspy.context`` is bound."""

    def __init__(self, pending: set[str]) -> None:
        self.pending = pending

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in self.pending:
            return None
        self.pending.discard(name)
        if not self.pending:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module, wrap = loader.exec_module, _WRAP[name]

        def exec_and_wrap(module: types.ModuleType) -> None:
            exec_module(module)
            wrap(module)

        loader.exec_module = exec_and_wrap  # type: ignore[method-assign]
        return spec


_pending = {name for name in _WRAP if name not in sys.modules}
for _name in _WRAP.keys() - _pending:
    _WRAP[_name](sys.modules[_name])
if _pending:
    sys.meta_path.insert(0, _WrapOnImport(_pending))
