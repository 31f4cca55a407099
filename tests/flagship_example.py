"""The flagship script imported as a module, the way the flagship tests drive it."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests.harness import REPO

EXAMPLE = REPO / "examples" / "flagship_multi_pool_gepa.py"


def load_flagship(module_name: str) -> ModuleType:
    """Execute examples/flagship_multi_pool_gepa.py as ``module_name`` (registered in sys.modules, so
    its functions pickle and its dataclasses resolve as in a script run)."""
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
