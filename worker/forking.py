"""A session's own code in the processes user code starts with ``multiprocessing``.

``multiprocessing`` pickles a task's function (and the classes of its arguments and results) by
reference: module and name. A session's by-value code lives in modules of the session's own, kept
out of ``sys.modules`` (two sessions never share one), so where in-process the child finds the
script's function, on a worker that lookup fails (``Can't pickle <function square>: attribute
lookup square on __main__ failed``). The worker's ``ForkingPickler`` names such a function or
class by its session module instead (the module object's id, the same in a forked child) and
sends it by value too (cloudpickle): a forked child finds the very object it had at the fork, a
copy from the parent comes back to it as the parent's own object (a result's class is the
session's class, as in-process), and a process that has neither (a ``spawn`` child, an object
made after the fork) uses the copy. What would fail in-process (a lambda, a local function: no
name to look up) fails the same way here.
"""

from __future__ import annotations

import sys
import types
from multiprocessing.reduction import ForkingPickler
from typing import Any

import cloudpickle

from dspex.wire.codestore import SESSION_MODULES


def _lookup(root: Any, qualname: str) -> Any:
    for part in qualname.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def _session_module(obj: Any) -> types.ModuleType | None:
    """The session module that holds ``obj`` under its qualified name."""
    owners = list(SESSION_MODULES.values())
    if isinstance(obj, types.FunctionType):  # its globals are its module's: look there first
        owners.sort(key=lambda module: module.__dict__ is not obj.__globals__)
    return next((module for module in owners if _lookup(module, obj.__qualname__) is obj), None)


def _rebuild(module_id: int, qualname: str, data: bytes) -> Any:
    module = SESSION_MODULES.get(module_id)
    found = _lookup(module, qualname) if module is not None else None
    return found if found is not None else cloudpickle.loads(data)


def _reducer_override(self: Any, obj: Any) -> Any:
    kind = type(obj)
    if kind is not types.FunctionType and not issubclass(kind, type):
        return NotImplemented
    qualname = obj.__qualname__
    if "<" in qualname or _lookup(sys.modules.get(getattr(obj, "__module__", None) or ""), qualname) is obj:
        return NotImplemented  # pickle's own way: by name, or its error
    module = _session_module(obj)
    return _rebuild, (id(module) if module is not None else 0, qualname, cloudpickle.dumps(obj))


def install() -> None:
    """Name the session's own functions and classes by their session module in this process and
    the processes it forks (``ForkingPickler`` consults ``reducer_override`` before pickling by
    name)."""
    ForkingPickler.reducer_override = _reducer_override  # type: ignore[method-assign]
