"""What a process's clients share: one zmq context of each kind, and what becomes of the clients
in a child after ``os.fork()``.

**One context per process, never terminated.** A client closes its own sockets; it does not own
a context. A context of its own, terminated at ``close()``, made a client that was collected
without ``close()`` hang the process: collected in a reference cycle (a service object that holds
the client and a bound method of its own, an asyncio client's reader tasks), the context's
finalizer ran with its weak references to the sockets already cleared, so it closed none of them
and waited for them for ever. zmq wants one context per process anyway; its I/O thread is shared.

**A fork's child** (a pre-fork server: gunicorn's ``preload_app``, a ``multiprocessing`` pool with
the fork start method) has copies of the parent's context and sockets but not the I/O threads that
move their messages: a request on one would wait for ever. Each client (and each session's send
cache) registers here; in the child, right after the fork and before any other thread exists,
each gets a fresh transport on a fresh context, made at the child's first request. The parent's
objects are kept referenced in the child and never used or closed: closing them there would be
zmq's undefined behaviour, and collecting them would warn about unclosed sockets (pyzmq leaves
another process's sockets alone anyway).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Protocol, TypeVar

import zmq

Z = TypeVar("Z", bound=zmq.Context[Any])


class ForkAware(Protocol):
    def _after_fork(self) -> None:
        """Called in a forked child: drop what belongs to the parent (see the module)."""


_REGISTERED: weakref.WeakSet[Any] = weakref.WeakSet()
_INHERITED: list[Any] = []  # the parent's transport objects, in a child: kept, never touched
_CONTEXTS: dict[type[Any], Any] = {}  # this process's context of each kind (zmq.Context, zmq.asyncio.Context)
_lock = threading.Lock()


def context(kind: type[Z]) -> Z:
    """This process's context of ``kind``, made at the first call (see the module)."""
    with _lock:
        ctx = _CONTEXTS.get(kind)
        if ctx is None:
            ctx = _CONTEXTS[kind] = kind()
        return ctx


def register(obj: ForkAware) -> None:
    _REGISTERED.add(obj)


def keep(*objects: Any) -> None:
    """Keep the parent's objects alive in the child, unused (see the module)."""
    _INHERITED.extend(o for o in objects if o is not None)


def _in_child() -> None:
    global _lock
    _lock = threading.Lock()  # a parent thread may have held it at the fork
    keep(*_CONTEXTS.values())
    _CONTEXTS.clear()
    for obj in list(_REGISTERED):
        obj._after_fork()


os.register_at_fork(after_in_child=_in_child)
