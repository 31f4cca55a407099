"""A directory whose files are part of a session's state (``dspex.SessionDir``).

For code that keeps its state in files of its own, such as GEPA's ``log_dir`` (``gepa_state.bin``,
from which a compile with the same ``log_dir`` resumes): made inside a durable session and held by
it, the directory's files go with the session's checkpoint and come back with it after a move,
also on another host. They are read when the checkpoint is built, after each call, so they are
part of the same guarantee as the rest of the session (docs/reliability.md): after a move the
directory holds the files of the last acknowledged call, never a half-written call's.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
import weakref
from typing import Any

_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
_OURS = re.compile(r"^dspex-sd(\d+)-")  # dspex-sd<pid>-<name>-<random>: the process that made it


@functools.cache
def _sweep() -> None:
    """Remove the directories of processes of this user that are gone (a worker killed with -9
    never removes its own), once per process."""
    base = tempfile.gettempdir()
    try:
        names = os.listdir(base)
    except OSError:
        return
    for entry in names:
        found = _OURS.match(entry)
        if found is None:
            continue
        path = os.path.join(base, entry)
        try:
            if os.lstat(path).st_uid != os.getuid():
                continue
            os.kill(int(found.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue  # alive (another user's process: EPERM) or already gone


class FileData:
    """One file's bytes as a session directory last read them. The directory hands out the same
    object while the file's bytes are equal, so a checkpoint keeps an unchanged file as the blob
    it already holds (worker/checkpoint.py) instead of carrying it again."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        return FileData, (self.data,)


class SessionDir:
    """A directory of the worker, removed when the session lets go of this object (or, for a
    process killed with -9, by the next process of the host that makes one).

    After a move the directory is made again on the new worker, with another ``path``: read
    ``path`` in each call (``log_dir=logs.path``), never keep it from an earlier one. Each
    checkpoint build reads every file, and a checkpoint carries the files whose bytes changed
    (each file is a blob of its own): meant for state of kilobytes to a few megabytes (the
    session's checkpoint cap counts it)."""

    def __init__(self, name: str = "dir") -> None:
        _sweep()
        self.name = name
        self.path = tempfile.mkdtemp(prefix=f"dspex-sd{os.getpid()}-{_NAME.sub('_', name)[:40]}-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.path, True)
        self._read: dict[str, FileData] = {}  # relative path -> its bytes as last read

    def __fspath__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"SessionDir({self.name!r}, path={self.path!r})"

    def contents(self) -> tuple[list[str], dict[str, FileData]]:
        """The directories and files under ``path`` (relative paths, sorted; a symbolic link is
        refused: its target is not the session's). Every file is read: an unchanged one is the
        same :class:`FileData` as the last time."""
        dirs: list[str] = []
        files: dict[str, FileData] = {}
        for root, subdirs, names in os.walk(self.path):
            subdirs.sort()
            for name in [*subdirs, *sorted(names)]:
                full = os.path.join(root, name)
                if os.path.islink(full):
                    raise TypeError(f"{self!r} holds a symbolic link ({full}): it cannot be part of a checkpoint")
            dirs += (os.path.relpath(os.path.join(root, name), self.path) for name in subdirs)
            for name in sorted(names):
                full = os.path.join(root, name)
                with open(full, "rb") as f:
                    data = f.read()
                rel = os.path.relpath(full, self.path)
                held = self._read.get(rel)
                files[rel] = held if held is not None and held.data == data else FileData(data)
        self._read = files
        return dirs, files

    def __reduce__(self) -> tuple[Any, ...]:
        return _restore, (self.name, *self.contents())


def _inside(base: str, rel: str) -> str:
    full = os.path.normpath(os.path.join(base, rel))
    if os.path.isabs(rel) or not full.startswith(base + os.sep):
        raise ValueError(f"a session directory's entry {rel!r} is outside it")
    return full


def _restore(name: str, dirs: list[str], files: dict[str, FileData]) -> SessionDir:
    """A new directory on this worker with the files the pickle carried."""
    made = SessionDir(name)
    for rel in dirs:
        os.makedirs(_inside(made.path, rel), exist_ok=True)
    for rel, held in files.items():
        full = _inside(made.path, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(held.data)
    made._read = dict(files)  # the blobs a restored checkpoint holds stay its blobs
    return made
