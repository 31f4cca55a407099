"""A directory whose files are part of a session's state (``dspex.SessionDir``).

For code that keeps its state in files of its own, such as GEPA's ``log_dir`` (``gepa_state.bin``,
from which a compile with the same ``log_dir`` resumes): made inside a durable session and held by
it, the directory's files go with the session's checkpoint and come back with it after a move,
also on another host. They are read when the checkpoint is built, after each call, so they are
part of the same guarantee as the rest of the session (docs/reliability.md): after a move the
directory holds the files of the last acknowledged call, never a half-written call's.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from typing import Any

_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


class SessionDir:
    """A directory of the worker, removed when the session lets go of this object.

    After a move the directory is made again on the new worker, with another ``path``: read
    ``path`` in each call (``log_dir=logs.path``), never keep it from an earlier one. Every file
    is read and carried whole by each checkpoint of a session that changed it: meant for state
    of kilobytes to a few megabytes (the session's checkpoint cap counts it)."""

    def __init__(self, name: str = "dir") -> None:
        self.name = name
        self.path = tempfile.mkdtemp(prefix=f"dspex-{_NAME.sub('_', name)[:40]}-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.path, True)

    def __fspath__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"SessionDir({self.name!r}, path={self.path!r})"

    def contents(self) -> tuple[list[str], dict[str, bytes]]:
        """The directories and files under ``path`` (relative paths, sorted; symlinks are not
        followed, and a link is refused: its target is not the session's)."""
        dirs: list[str] = []
        files: dict[str, bytes] = {}
        for root, subdirs, names in os.walk(self.path):
            subdirs.sort()
            for name in subdirs:
                full = os.path.join(root, name)
                if os.path.islink(full):
                    raise TypeError(f"{self!r} holds a symbolic link ({full}): it cannot be part of a checkpoint")
                dirs.append(os.path.relpath(full, self.path))
            for name in sorted(names):
                full = os.path.join(root, name)
                if os.path.islink(full):
                    raise TypeError(f"{self!r} holds a symbolic link ({full}): it cannot be part of a checkpoint")
                with open(full, "rb") as f:
                    files[os.path.relpath(full, self.path)] = f.read()
        return dirs, files

    def __reduce__(self) -> tuple[Any, ...]:
        return _restore, (self.name, *self.contents())


def _inside(base: str, rel: str) -> str:
    full = os.path.normpath(os.path.join(base, rel))
    if os.path.isabs(rel) or not full.startswith(base + os.sep):
        raise ValueError(f"a session directory's entry {rel!r} is outside it")
    return full


def _restore(name: str, dirs: list[str], files: dict[str, bytes]) -> SessionDir:
    """A new directory on this worker with the files the pickle carried."""
    made = SessionDir(name)
    for rel in dirs:
        os.makedirs(_inside(made.path, rel), exist_ok=True)
    for rel, data in files.items():
        full = _inside(made.path, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)
    return made
