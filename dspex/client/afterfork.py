"""Clients made before ``os.fork()`` work in the child (a pre-fork server: gunicorn's
``preload_app``, a ``multiprocessing`` pool with the fork start method).

A forked child has copies of the parent's zmq context and sockets but not the I/O threads that
move their messages: a request on one would wait for ever. Each client (and each session's send
cache) registers here; in the child, right after the fork and before any other thread exists,
each gets a fresh transport, made at the child's first request. The parent's objects are kept
referenced in the child and never used or closed: closing them there would be zmq's
undefined behaviour, and collecting them would warn about unclosed sockets (pyzmq leaves another
process's sockets alone anyway).
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Protocol


class ForkAware(Protocol):
    def _after_fork(self) -> None:
        """Called in a forked child: drop what belongs to the parent (see the module)."""


_REGISTERED: weakref.WeakSet[Any] = weakref.WeakSet()
_INHERITED: list[Any] = []  # the parent's transport objects, in a child: kept, never touched


def register(obj: ForkAware) -> None:
    _REGISTERED.add(obj)


def keep(*objects: Any) -> None:
    """Keep the parent's objects alive in the child, unused (see the module)."""
    _INHERITED.extend(o for o in objects if o is not None)


def _in_child() -> None:
    for obj in list(_REGISTERED):
        obj._after_fork()


os.register_at_fork(after_in_child=_in_child)
