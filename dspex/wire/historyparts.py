"""How the client and a worker name the parts of a DSPy module whose history a call records in.

DSPy records an LM call in the LM's history and in each module it was made in. A client's module
that a session holds is one object on each side; its sub-modules and their own LMs
(``program.set_lm(lm)``) travel inside it and have no key of their own, so the worker names them
by their path from the held module (:func:`module_parts`) and the client finds its own by the same
path (``worker.lm_history``, ``dspex.client.lmhistory``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def module_parts(module: Any) -> Iterator[tuple[str, Any]]:
    """(path, object) of each sub-module of DSPy ``module`` (its attributes that are modules, and
    the modules among the items of its list, tuple and dict attributes, recursively) and of each
    one's own LM (``.lm``, ``"lm"`` for the module's own), each object once. Not DSPy's
    ``named_sub_modules()``: that walks into every value, the modules' growing histories too."""
    seen = {id(module)}
    todo = [("", module)]
    while todo:
        path, obj = todo.pop()
        lm = getattr(obj, "lm", None)
        if lm is not None and id(lm) not in seen:
            seen.add(id(lm))
            yield f"{path}.lm", lm
        for name, value in getattr(obj, "__dict__", {}).items():
            if name == "history":
                continue
            if isinstance(value, dict):
                items: Any = ((f"{path}.{name}[{k!r}]", v) for k, v in value.items())
            elif isinstance(value, (list, tuple)):
                items = ((f"{path}.{name}[{i}]", v) for i, v in enumerate(value))
            else:
                items = ((f"{path}.{name}", value),)
            for sub_path, sub in items:
                if hasattr(sub, "named_sub_modules") and id(sub) not in seen:  # a DSPy module
                    seen.add(id(sub))
                    yield sub_path, sub
                    todo.append((sub_path, sub))
