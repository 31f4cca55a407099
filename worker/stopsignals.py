"""The worker's stop signals stay the worker's, whatever user code does with ``signal.signal``.

SIGTERM (supervisord's stop, a deploy) and SIGINT (an operator's Ctrl-C, and the soft time limit
and cancels of a capacity-1 worker: worker.limits) keep the handler installed here,
:func:`_on_stop_signal`, for the worker's whole life. User code that calls ``signal.signal`` for
one of them on the main thread (a capacity-1 worker's call; DSPy's ``ParallelExecutor`` does for
SIGINT) sets the *call's* handler: ``signal.getsignal`` gives it back, and when the signal
arrives it runs first, then the worker's part (drain and exit, or the time limit) unless the
call's handler chained to the handler it replaced, which ran it. The call's handlers end with the
call (worker.limits clears :data:`call_handlers`). So a call that ignores SIGTERM, or handles it
itself, cannot make the worker deaf to a stop that arrives while it runs, nor a call that ignores
SIGINT outlive its deadline. On any other thread ``signal.signal`` raises ``ValueError``, as
in-process, and in a process user code forks it is Python's own.

A pool thread gets no SIGINT: :func:`cancel_parallel_jobs` does for it what DSPy's
``ParallelExecutor`` handler would.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

# the handlers the call on the main thread set for the stop signals (signal.signal of user code)
call_handlers: dict[int, Any] = {}
# what each stop signal does for the worker (SIGINT: the time limits'; SIGTERM: the worker's own)
_worker_handlers: dict[int, Callable[[int, Any], Any]] = {}
# stop signal -> whether the worker's part has run, while the call's handler for it runs
_dispatching: dict[int, bool] = {}
_python_signal = signal.signal
_python_getsignal = signal.getsignal
_sigint_before: Any = signal.default_int_handler  # the worker's SIGINT handler before keep()
_worker_pid = 0


def keep(on_sigint: Callable[[int, Any], Any]) -> None:
    """From the main thread, once per process: the stop signals' handler (SIGINT's part is
    ``on_sigint``, which calls :func:`sigint_before` for a SIGINT that is not a time limit's) and
    the ``signal.signal``/``signal.getsignal`` that give user code the call's handlers."""
    global _sigint_before, _worker_pid
    if _worker_pid == os.getpid():
        return
    _sigint_before = _python_getsignal(signal.SIGINT)
    _worker_handlers[signal.SIGINT] = on_sigint
    sigterm = _python_getsignal(signal.SIGTERM)
    if callable(sigterm):  # the worker's stop (supervisord's)
        _worker_handlers[signal.SIGTERM] = sigterm
    for signum in _worker_handlers:
        _python_signal(signum, _on_stop_signal)
    _worker_pid = os.getpid()
    vars(signal).update(signal=_call_signal, getsignal=_call_getsignal)


def sigint_before(signum: int, frame: Any) -> None:
    """A SIGINT that is no time limit's: the handler the worker had (stop the worker)."""
    if callable(_sigint_before):
        _sigint_before(signum, frame)


def _on_stop_signal(signum: int, frame: Any) -> None:
    """The handler of the stop signals: the call's own first, if it set one, then the worker's."""
    theirs = call_handlers.get(signum)
    if theirs is None or signum in _dispatching:
        if signum in _dispatching:
            _dispatching[signum] = True  # the call's handler chained to the one it replaced
        _worker_handlers[signum](signum, frame)
        return
    _dispatching[signum] = False
    try:
        if callable(theirs):
            theirs(signum, frame)
    finally:
        if not _dispatching.pop(signum):
            _worker_handlers[signum](signum, frame)


def _taken_over(signalnum: Any) -> bool:
    """``signalnum`` is a stop signal the worker keeps, and the caller runs on its main thread."""
    return (signalnum in _worker_handlers and threading.current_thread() is threading.main_thread()
            and os.getpid() == _worker_pid)


def _call_signal(signalnum: Any, handler: Any) -> Any:
    """``signal.signal`` of the worker process: a stop signal's handler is the call's (module
    docstring), any other call is Python's."""
    if not _taken_over(signalnum):
        return _python_signal(signalnum, handler)
    if not callable(handler):
        if handler not in (signal.SIG_IGN, signal.SIG_DFL):
            raise TypeError("signal handler must be signal.SIG_IGN, signal.SIG_DFL, or a callable object")
        handler = signal.Handlers(handler)
    previous = call_handlers.pop(signalnum, _on_stop_signal)
    if handler is not _on_stop_signal:  # (putting back the one it replaced ends the call's)
        call_handlers[signalnum] = handler
    return previous


def _call_getsignal(signalnum: Any) -> Any:
    if not _taken_over(signalnum):
        return _python_getsignal(signalnum)
    return call_handlers.get(signalnum, _on_stop_signal)


def cancel_parallel_jobs(thread_id: int) -> None:
    """Set ``cancel_jobs`` of DSPy ``ParallelExecutor``s running on the thread's stack: what their SIGINT
    handler does, for a pool thread, which gets no SIGINT (worker.limits)."""
    # sys._current_frames() holds the interpreter's thread-list lock while it makes frame objects:
    # a garbage collection there runs finalizers, which may hand the GIL to a thread that then
    # waits for that lock holding the GIL (PyThreadState_SetAsyncExc does: the pool thread clearing
    # its interruption) - a deadlock, seen under load. Without a collection nothing in it lets go
    # of the GIL.
    enabled = gc.isenabled()
    gc.disable()
    try:
        frame = sys._current_frames().get(thread_id)
    finally:
        if enabled:
            gc.enable()
    while frame is not None:
        owner = frame.f_locals.get("self")
        event = getattr(owner, "cancel_jobs", None) if owner is not None else None
        if isinstance(event, threading.Event) and type(owner).__name__ == "ParallelExecutor":
            event.set()
        frame = frame.f_back
