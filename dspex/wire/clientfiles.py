"""The spec of a session's copy of a user module on the worker: its loader loads nothing (the
module came by value) and reads the files beside the client's module, which a worker finds when it
shares the client's filesystem (one machine)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.readers
from typing import Any


class ClientFiles(importlib.abc.Loader):
    """The loader of a session's module: it loads nothing (the module came by value) and reads
    the files beside the client's (``importlib.resources.files(pkg)``, a prompt template in the
    package), which this worker finds when it shares the client's filesystem."""

    def __init__(self, path: str) -> None:
        self.path = path

    def get_resource_reader(self, name: str) -> Any:
        return importlib.readers.FileReader(self)  # type: ignore[arg-type]  # (reads .path only)

    def get_data(self, path: str) -> bytes:
        """A file beside the client's module, as a source loader reads it (``pkgutil.get_data``)."""
        with open(path, "rb") as f:
            return f.read()


def client_spec(name: str, file: str, path: Any) -> importlib.machinery.ModuleSpec:
    spec = importlib.machinery.ModuleSpec(name, ClientFiles(file), origin=file, is_package=path is not None)
    if isinstance(path, list):
        spec.submodule_search_locations = list(path)
    spec.has_location = True
    return spec
