"""Which DSPy settings a client's ``dspy.context`` blocks name.

DSPy's ``dspy.context(**settings)`` copies the whole configuration into its overrides, so the
overrides alone cannot tell a block that names the LM already configured from a block about
something else. A client's named block wins over the session's own settings in the call it
makes (docs/remote-objects.md, "What travels"), so the client records the names: DSPy's
``Settings.context`` is wrapped once in this process, at import when DSPy is loaded already, else
by an import hook as DSPy's settings module loads (before ``dspy.context`` is bound).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.abc
import importlib.util
import sys
import types
from typing import Any

# DSPy settings that belong to the call under way on the client (its trace, stream, callers, usage
# tracker), not to the configuration a program runs with: never sent
CALL_LOCAL = frozenset({"trace", "send_stream", "caller_predict", "caller_modules", "usage_tracker",
                         "stream_listeners"})
SETTINGS = "dspy.dsp.utils.settings"
# The names of the settings the calling thread's or task's ``dspy.context`` blocks set, nested
# ones together (their call-local ones aside): DSPy's block copies the whole configuration, so
# its names are the one sign of what the user chose. A ContextVar, as DSPy's overrides are:
# threads and tasks started with a copy of the context inherit it.
named: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("dspex_dspy_context_names",
                                                                        default=frozenset())


class _NamedBlock(contextlib.ContextDecorator):
    """DSPy's ``dspy.context(**settings)`` block ``block`` that also records ``names`` in :data:`named`."""

    __slots__ = ("block", "names", "token")

    def __init__(self, block: Any, names: frozenset[str]) -> None:
        self.block, self.names = block, names

    def _recreate_cm(self) -> _NamedBlock:  # as a decorator: a new block per call, as DSPy's own
        return _NamedBlock(self.block._recreate_cm(), self.names)

    def __enter__(self) -> Any:
        self.token = named.set(named.get() | self.names)
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
    cls.context = context
    dspy = sys.modules.get("dspy")
    if getattr(getattr(dspy, "context", None), "__func__", None) is original:
        dspy.context = getattr(module, "settings", None).context  # type: ignore[union-attr]  # bound at DSPy's import


class _NameBlocksOnImport(importlib.abc.MetaPathFinder):
    """Runs :func:`_name_blocks` on DSPy's settings module as it is imported, when DSPy is
    imported after dspex: before any block is entered and ``dspy.context`` is bound."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != SETTINGS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_name(module: types.ModuleType) -> None:
            exec_module(module)
            _name_blocks(module)

        loader.exec_module = exec_and_name  # type: ignore[method-assign]
        return spec


if SETTINGS in sys.modules:
    _name_blocks(sys.modules[SETTINGS])
else:
    sys.meta_path.insert(0, _NameBlocksOnImport())
